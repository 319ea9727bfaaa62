//! Checking a user's password, with the lockout recorded on their stream.
//!
//! Race-proof by construction: checks of one user take turns in this process
//! ([`Turns`]), and each check is decided on the stream version it read and
//! recorded at exactly that version. So N parallel guesses cannot all see
//! "4 failures so far": the fifth failure's `UserLocked` is appended before
//! the next guess reads the stream, and no password is checked while a lock
//! is in force. Across several command-API processes a guess that loses the
//! append race to another process is not answered from its verification: it
//! decides again on the fresh stream, which then shows the lock.
//!
//! An unknown user costs the same argon2 verification as a wrong password
//! (against a hash made at start-up), and both answer the same.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use events::domain::{EventMetadata, PasswordRehashed};
use events::{PasswordHash, UserEvent};
use secrecy::SecretString;
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

use crate::domain::sign_in::{may_check, record_check, LockoutPolicy, Refusal};
use crate::domain::User;
use crate::password::{needs_rehash, HashError, Hasher};
use crate::sessions::Revoke;
use crate::store::{AppendError, EventStore, LoadError};

/// How often a check decides again after losing an append race.
const MAX_ATTEMPTS: usize = 3;

/// The outcome of one sign-in's password check.
#[derive(Debug)]
pub enum Checked {
    /// The password is right; `user` is the state after recording it.
    Passed(Box<User>),
    /// Wrong password, or no password was checked (why is for logs only:
    /// every refusal answers the same).
    Refused(Refusal),
    Failed,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Append(#[from] AppendError),
    #[error("other checks kept winning the race for this user")]
    Contended,
}

#[derive(Clone)]
pub struct SignIn {
    store: EventStore,
    hasher: Hasher,
    policy: LockoutPolicy,
    /// A hash of a random password, made at start-up: unknown users are
    /// checked against it so that they cost what a known one does.
    decoy: PasswordHash,
    turns: Turns,
}

impl SignIn {
    pub fn new(
        store: EventStore,
        hasher: Hasher,
        policy: LockoutPolicy,
        decoy: PasswordHash,
    ) -> Self {
        Self {
            store,
            hasher,
            policy,
            decoy,
            turns: Turns::default(),
        }
    }

    pub fn policy(&self) -> LockoutPolicy {
        self.policy
    }

    /// A sign-in naming no user: one verification against the decoy, then
    /// the same refusal a wrong password gets.
    #[tracing::instrument(name = "check_unknown_user", skip_all)]
    pub async fn check_unknown(&self, password: &SecretString) -> Result<Checked, CheckError> {
        self.hasher
            .verify(password.clone(), self.decoy.clone())
            .await?;
        Ok(Checked::Refused(Refusal::Unknown))
    }

    /// Checks `password` for `user_id` and records the outcome.
    #[tracing::instrument(name = "check_password", skip(self, password, metadata))]
    pub async fn check(
        &self,
        user_id: Uuid,
        password: &SecretString,
        metadata: &EventMetadata,
    ) -> Result<Checked, CheckError> {
        let _turn = self.turns.take(user_id).await;
        for _ in 0..MAX_ATTEMPTS {
            let now = Utc::now();
            let user = User::from_events(&self.store.load(user_id).await?);
            match may_check(&user, now) {
                Ok(()) => {}
                Err(Refusal::Unknown) => return self.check_unknown(password).await,
                Err(refusal @ Refusal::Deactivated) => {
                    // The same work as any other known user; nothing recorded.
                    if let Some(hash) = user.password_hash.clone() {
                        self.hasher.verify(password.clone(), hash).await?;
                    }
                    return Ok(Checked::Refused(refusal));
                }
                // No verification at all: that is what the lock is for.
                Err(refusal @ Refusal::Locked { .. }) => {
                    metrics::counter!("sign_in_refused_total", "reason" => "locked").increment(1);
                    return Ok(Checked::Refused(refusal));
                }
            }
            let Some(hash) = user.password_hash.clone() else {
                return Ok(Checked::Refused(Refusal::Unknown));
            };
            let passed = self.hasher.verify(password.clone(), hash.clone()).await?;
            let mut events = record_check(&user, passed, now, self.policy);
            if passed && needs_rehash(&hash) {
                match self.hasher.hash(password.clone()).await {
                    Ok(password_hash) => {
                        events.push(UserEvent::PasswordRehashed(PasswordRehashed {
                            password_hash,
                        }));
                    }
                    // The sign-in stands; the next one rehashes.
                    Err(error) => tracing::warn!(%error, "could not rehash the password"),
                }
            }
            if !events.is_empty() {
                match self
                    .store
                    .append(
                        user_id,
                        user.version,
                        &events,
                        metadata,
                        None,
                        Revoke::Nothing,
                    )
                    .await
                {
                    Ok(_) => {}
                    Err(AppendError::VersionConflict) => {
                        tracing::debug!("lost an append race; checking again on fresh state");
                        continue;
                    }
                    Err(other) => return Err(other.into()),
                }
            }
            if events.iter().any(|e| matches!(e, UserEvent::Locked(_))) {
                tracing::warn!(%user_id, "too many failed password checks: account locked");
                metrics::counter!("accounts_locked_total").increment(1);
            }
            let after = events.iter().fold(user, User::evolve);
            return Ok(if passed {
                Checked::Passed(Box::new(after))
            } else {
                Checked::Failed
            });
        }
        Err(CheckError::Contended)
    }
}

/// One password check per user at a time in this process; others wait their
/// turn (each holds no database connection while it waits).
#[derive(Clone, Default)]
struct Turns {
    users: Arc<Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>>,
}

/// A user's turn; the next check of that user starts when it is dropped.
struct Turn {
    guard: Option<OwnedMutexGuard<()>>,
    user_id: Uuid,
    turns: Turns,
}

impl Turns {
    async fn take(&self, user_id: Uuid) -> Turn {
        let lock = {
            let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(users.entry(user_id).or_default())
        };
        Turn {
            guard: Some(lock.lock_owned().await),
            user_id,
            turns: self.clone(),
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut users = self.turns.users.lock().unwrap_or_else(|p| p.into_inner());
        // Forget the user's lock once nobody holds or awaits it.
        if users
            .get(&self.user_id)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            users.remove(&self.user_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn checks_of_one_user_take_turns_and_the_map_empties() {
        let turns = Turns::default();
        let user = Uuid::now_v7();
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (turns, inside, most) = (turns.clone(), inside.clone(), most.clone());
                tokio::spawn(async move {
                    let _turn = turns.take(user).await;
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 1);
        assert!(turns.users.lock().unwrap().is_empty());
        // Another user's turn does not wait for this one's.
        let _a = turns.take(user).await;
        let _b = turns.take(Uuid::now_v7()).await;
    }
}
