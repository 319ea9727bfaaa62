//! The user aggregate: its state is a fold of its stream, and every decision is
//! the pure function [`decide`], so the rules are tested without any I/O.

pub mod codes;
pub mod email;
pub mod password_reset;
pub mod profile;
pub mod roles;
pub mod sign_in;

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use events::domain::{
    PasswordChanged, ProfileChanged, RoleGranted, RoleRevoked, SealedCode, UserDeactivated,
    UserReactivated, UserRegistered, UserUnlocked,
};
use events::{PasswordHash, UserEvent};

use self::codes::MailedCode;

/// What the write side knows of one user, rebuilt from their stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct User {
    /// The stream's last version; 0 for a stream with no events.
    pub version: i32,
    pub status: Status,
    /// The current argon2id hash; `None` only before registration.
    pub password_hash: Option<PasswordHash>,
    /// Failed password checks since the last success, lock, unlock or
    /// password change.
    pub failed_checks: u32,
    /// The end of the last lock, unless an administrator lifted it.
    pub locked_until: Option<DateTime<Utc>>,
    pub roles: BTreeSet<String>,
    /// The current address (normalised), reserved in `email_reservations`.
    pub email: String,
    pub email_verified: bool,
    /// The outstanding email verification code: for the current address or
    /// for the one the user asked to change to (then reserved as well).
    pub email_code: Option<MailedCode>,
    /// The outstanding password reset code.
    pub reset_code: Option<MailedCode>,
    pub profile: ProfileChanged,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Status {
    #[default]
    Unregistered,
    Active,
    Deactivated,
}

/// What a client asks for, already validated.
#[derive(Debug, Clone)]
pub enum Command {
    Register {
        username: String,
        email: String,
        password_hash: PasswordHash,
        /// The code that will verify `email`, sealed for this user.
        sealed_code: SealedCode,
        code_expires_at: DateTime<Utc>,
    },
    Deactivate {
        reason: Option<String>,
    },
    Reactivate {
        reason: Option<String>,
    },
    /// Lift a lock before it runs out (an administrator).
    Unlock {
        reason: Option<String>,
    },
    /// The user's own new password, after their current one was checked.
    ChangePassword {
        password_hash: PasswordHash,
    },
    GrantRole {
        role: String,
    },
    RevokeRole {
        role: String,
    },
}

/// Why a command was refused by the rules (not by the infrastructure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("the user is already registered")]
    AlreadyRegistered,
    #[error("no such user")]
    NotFound,
    #[error("the user is already deactivated")]
    AlreadyDeactivated,
    #[error("the user is already active")]
    AlreadyActive,
    #[error("the user is not locked")]
    NotLocked,
    #[error("the user is deactivated")]
    Deactivated,
    #[error("the user already has this role")]
    RoleAlreadyGranted,
    #[error("the user does not have this role")]
    RoleNotGranted,
    #[error("this address is already the user's verified email")]
    EmailUnchanged,
    /// A code went to this user less than the resend interval ago.
    #[error("a code was sent moments ago; retry in {retry_after_secs} s")]
    CodeRecentlySent { retry_after_secs: u64 },
}

/// What a command decided: the events to append, and, when the command is
/// refused all the same, why. A wrong code is both: its failure is recorded
/// (it counts towards the limit) and the caller is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<R> {
    pub events: Vec<UserEvent>,
    pub refusal: Option<R>,
}

impl<R> Decision<R> {
    pub fn accept(events: Vec<UserEvent>) -> Self {
        Self {
            events,
            refusal: None,
        }
    }

    pub fn refuse(refusal: R) -> Self {
        Self {
            events: Vec::new(),
            refusal: Some(refusal),
        }
    }
}

impl User {
    /// Folds a stream, oldest first.
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a UserEvent>) -> Self {
        events.into_iter().fold(Self::default(), Self::evolve)
    }

    /// The state after one more event.
    pub fn evolve(mut self, event: &UserEvent) -> Self {
        self.version += 1;
        match event {
            UserEvent::Registered(e) => {
                self.status = Status::Active;
                self.password_hash = Some(e.password_hash.clone());
                self.email = e.email.clone();
                self.email_code = e
                    .sealed_code
                    .clone()
                    .zip(e.code_expires_at)
                    .map(|(sealed, expires_at)| MailedCode::new(&e.email, sealed, expires_at));
            }
            UserEvent::Reactivated(_) => self.status = Status::Active,
            UserEvent::Deactivated(_) => self.status = Status::Deactivated,
            UserEvent::PasswordCheckFailed(_) => self.failed_checks += 1,
            UserEvent::PasswordCheckSucceeded(_) => self.failed_checks = 0,
            UserEvent::Locked(e) => {
                self.locked_until = Some(e.until);
                self.failed_checks = 0;
            }
            UserEvent::Unlocked(_) => {
                self.locked_until = None;
                self.failed_checks = 0;
            }
            UserEvent::PasswordChanged(e) => {
                self.password_hash = Some(e.password_hash.clone());
                self.failed_checks = 0;
                // A reset code asked for before is no longer wanted.
                self.reset_code = None;
            }
            UserEvent::PasswordRehashed(e) => self.password_hash = Some(e.password_hash.clone()),
            UserEvent::RoleGranted(e) => {
                self.roles.insert(e.role.clone());
            }
            UserEvent::RoleRevoked(e) => {
                self.roles.remove(&e.role);
            }
            UserEvent::ProfileChanged(e) => self.profile = e.clone(),
            UserEvent::EmailVerificationRequested(e) => {
                self.email_code = Some(MailedCode::new(
                    &e.email,
                    e.sealed_code.clone(),
                    e.expires_at,
                ));
            }
            UserEvent::EmailCodeFailed(_) => {
                if let Some(code) = &mut self.email_code {
                    code.failures += 1;
                }
            }
            UserEvent::EmailVerified(e) => {
                self.email = e.email.clone();
                self.email_verified = true;
                self.email_code = None;
            }
            UserEvent::PasswordResetRequested(e) => {
                self.reset_code = Some(MailedCode::new(
                    &e.email,
                    e.sealed_code.clone(),
                    e.expires_at,
                ));
            }
            UserEvent::PasswordResetFailed(_) => {
                if let Some(code) = &mut self.reset_code {
                    code.failures += 1;
                }
            }
            UserEvent::PasswordReset(e) => {
                self.password_hash = Some(e.password_hash.clone());
                self.reset_code = None;
                // Control of the mailbox outweighs the lock (ARCHITECTURE.md, "Mail").
                self.locked_until = None;
                self.failed_checks = 0;
            }
        }
        self
    }

    /// Whether a lock is in force at `now`.
    pub fn locked_at(&self, now: DateTime<Utc>) -> bool {
        self.locked_until.is_some_and(|until| until > now)
    }
}

/// The events a command produces on a user in `state`, or why it is refused.
/// Locks are decided at `now`.
pub fn decide(
    state: &User,
    command: Command,
    now: DateTime<Utc>,
) -> Result<Vec<UserEvent>, DomainError> {
    match (state.status, command) {
        (
            Status::Unregistered,
            Command::Register {
                username,
                email,
                password_hash,
                sealed_code,
                code_expires_at,
            },
        ) => Ok(vec![UserEvent::Registered(UserRegistered {
            username,
            email,
            password_hash,
            sealed_code: Some(sealed_code),
            code_expires_at: Some(code_expires_at),
        })]),
        (_, Command::Register { .. }) => Err(DomainError::AlreadyRegistered),
        (Status::Unregistered, _) => Err(DomainError::NotFound),
        (Status::Active, Command::Deactivate { reason }) => {
            Ok(vec![UserEvent::Deactivated(UserDeactivated { reason })])
        }
        (Status::Deactivated, Command::Deactivate { .. }) => Err(DomainError::AlreadyDeactivated),
        (Status::Deactivated, Command::Reactivate { reason }) => {
            Ok(vec![UserEvent::Reactivated(UserReactivated { reason })])
        }
        (Status::Active, Command::Reactivate { .. }) => Err(DomainError::AlreadyActive),
        (_, Command::Unlock { reason }) => {
            if state.locked_at(now) {
                Ok(vec![UserEvent::Unlocked(UserUnlocked { reason })])
            } else {
                Err(DomainError::NotLocked)
            }
        }
        (Status::Deactivated, Command::ChangePassword { .. }) => Err(DomainError::Deactivated),
        (Status::Active, Command::ChangePassword { password_hash }) => {
            Ok(vec![UserEvent::PasswordChanged(PasswordChanged {
                password_hash,
            })])
        }
        (_, Command::GrantRole { role }) => {
            if state.roles.contains(&role) {
                Err(DomainError::RoleAlreadyGranted)
            } else {
                Ok(vec![UserEvent::RoleGranted(RoleGranted { role })])
            }
        }
        (_, Command::RevokeRole { role }) => {
            if state.roles.contains(&role) {
                Ok(vec![UserEvent::RoleRevoked(RoleRevoked { role })])
            } else {
                Err(DomainError::RoleNotGranted)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered() -> UserEvent {
        UserEvent::Registered(UserRegistered {
            username: "alice".into(),
            email: "alice@example.com".into(),
            password_hash: PasswordHash::new("$argon2id$test".into()),
            sealed_code: Some(SealedCode::new("v1.sealed".into())),
            code_expires_at: Some("2030-01-01T00:00:00Z".parse().unwrap()),
        })
    }

    fn deactivated() -> UserEvent {
        UserEvent::Deactivated(UserDeactivated { reason: None })
    }

    fn register() -> Command {
        Command::Register {
            username: "alice".into(),
            email: "alice@example.com".into(),
            password_hash: PasswordHash::new("$argon2id$test".into()),
            sealed_code: SealedCode::new("v1.sealed".into()),
            code_expires_at: "2030-01-01T00:00:00Z".parse().unwrap(),
        }
    }

    /// given past events, when a command, then events or an error.
    fn given(history: &[UserEvent]) -> impl FnOnce(Command) -> Result<Vec<UserEvent>, DomainError> {
        let state = User::from_events(history);
        move |command| decide(&state, command, Utc::now())
    }

    #[test]
    fn registering_a_new_user_records_user_registered() {
        assert_eq!(given(&[])(register()), Ok(vec![registered()]));
    }

    #[test]
    fn registering_twice_is_refused() {
        assert_eq!(
            given(&[registered()])(register()),
            Err(DomainError::AlreadyRegistered)
        );
    }

    #[test]
    fn deactivating_an_active_user_records_user_deactivated() {
        let reason = Some("abuse".to_owned());
        assert_eq!(
            given(&[registered()])(Command::Deactivate {
                reason: reason.clone()
            }),
            Ok(vec![UserEvent::Deactivated(UserDeactivated { reason })])
        );
    }

    #[test]
    fn deactivating_twice_is_refused() {
        assert_eq!(
            given(&[registered(), deactivated()])(Command::Deactivate { reason: None }),
            Err(DomainError::AlreadyDeactivated)
        );
    }

    #[test]
    fn reactivating_a_deactivated_user_records_user_reactivated() {
        assert_eq!(
            given(&[registered(), deactivated()])(Command::Reactivate { reason: None }),
            Ok(vec![UserEvent::Reactivated(UserReactivated {
                reason: None
            })])
        );
    }

    #[test]
    fn reactivating_an_active_user_is_refused() {
        assert_eq!(
            given(&[registered()])(Command::Reactivate { reason: None }),
            Err(DomainError::AlreadyActive)
        );
    }

    #[test]
    fn commands_on_an_unknown_user_are_refused() {
        assert_eq!(
            given(&[])(Command::Deactivate { reason: None }),
            Err(DomainError::NotFound)
        );
        assert_eq!(
            given(&[])(Command::Reactivate { reason: None }),
            Err(DomainError::NotFound)
        );
    }

    #[test]
    fn the_version_counts_the_events_folded() {
        let state = User::from_events(&[registered(), deactivated()]);
        assert_eq!((state.version, state.status), (2, Status::Deactivated));
    }

    #[test]
    fn roles_are_granted_once_and_revoked_once() {
        let grant = || Command::GrantRole {
            role: "admin".into(),
        };
        let granted = given(&[registered()])(grant()).unwrap();
        let mut history = vec![registered()];
        history.extend(granted);
        assert_eq!(
            given(&history)(grant()),
            Err(DomainError::RoleAlreadyGranted)
        );
        let revoke = || Command::RevokeRole {
            role: "admin".into(),
        };
        history.extend(given(&history)(revoke()).unwrap());
        assert!(User::from_events(&history).roles.is_empty());
        assert_eq!(given(&history)(revoke()), Err(DomainError::RoleNotGranted));
    }

    #[test]
    fn only_a_lock_in_force_can_be_lifted() {
        let unlock = || Command::Unlock { reason: None };
        assert_eq!(
            given(&[registered()])(unlock()),
            Err(DomainError::NotLocked)
        );
        let locked = |until| UserEvent::Locked(events::domain::UserLocked { until });
        let future = Utc::now() + chrono::Duration::minutes(5);
        let past = Utc::now() - chrono::Duration::minutes(5);
        assert!(given(&[registered(), locked(future)])(unlock()).is_ok());
        assert_eq!(
            given(&[registered(), locked(past)])(unlock()),
            Err(DomainError::NotLocked)
        );
    }

    #[test]
    fn a_deactivated_user_cannot_change_their_password() {
        let change = Command::ChangePassword {
            password_hash: PasswordHash::new("$argon2id$new".into()),
        };
        assert_eq!(
            given(&[registered(), deactivated()])(change),
            Err(DomainError::Deactivated)
        );
    }
}
