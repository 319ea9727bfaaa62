//! Password checks and the lockout they lead to, as pure decisions.
//!
//! A check is only made when [`may_check`] allows it; its outcome is recorded
//! by [`record_check`] as events on the user's stream, so the count of
//! consecutive failures and the lock are part of the log like everything else.
//! What makes the limit race-proof is the caller's: one check per user at a
//! time, each recorded at the stream version it was decided on (see
//! `signin.rs`).

use chrono::{DateTime, Duration, SubsecRound as _, Utc};
use events::domain::{PasswordCheckFailed, PasswordCheckSucceeded, UserLocked};
use events::UserEvent;

use super::{Status, User};

/// `LOCKOUT_MAX_FAILURES` consecutive failures lock the account for
/// `LOCKOUT_SECONDS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// At least 1.
    pub max_failures: u32,
    pub lock_for: Duration,
}

/// Why no password is checked for this user now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No such user, or not registered.
    Unknown,
    Deactivated,
    Locked {
        until: DateTime<Utc>,
    },
}

/// Whether a password may be checked for `user` at `now`.
pub fn may_check(user: &User, now: DateTime<Utc>) -> Result<(), Refusal> {
    match (user.status, user.locked_until) {
        (Status::Unregistered, _) => Err(Refusal::Unknown),
        (Status::Deactivated, _) => Err(Refusal::Deactivated),
        (Status::Active, Some(until)) if until > now => Err(Refusal::Locked { until }),
        (Status::Active, _) => Ok(()),
    }
}

/// The events that record one check's outcome: a failure, and the lock when
/// it is the last one allowed; a success only when it ends a run of failures,
/// so an ordinary sign-in appends nothing.
pub fn record_check(
    user: &User,
    succeeded: bool,
    now: DateTime<Utc>,
    policy: LockoutPolicy,
) -> Vec<UserEvent> {
    if succeeded {
        return if user.failed_checks > 0 {
            vec![UserEvent::PasswordCheckSucceeded(PasswordCheckSucceeded {})]
        } else {
            Vec::new()
        };
    }
    let mut events = vec![UserEvent::PasswordCheckFailed(PasswordCheckFailed {})];
    if user.failed_checks + 1 >= policy.max_failures.max(1) {
        // Microseconds: what PostgreSQL and the read model keep, so every
        // copy of the lock shows the same instant.
        let until = (now + policy.lock_for).trunc_subsecs(6);
        events.push(UserEvent::Locked(UserLocked { until }));
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::domain::UserRegistered;
    use events::PasswordHash;

    const POLICY: LockoutPolicy = LockoutPolicy {
        max_failures: 3,
        lock_for: Duration::minutes(15),
    };

    fn registered() -> Vec<UserEvent> {
        vec![UserEvent::Registered(UserRegistered {
            username: "alice".into(),
            email: "alice@example.com".into(),
            password_hash: PasswordHash::new("$argon2id$test".into()),
            sealed_code: None,
            code_expires_at: None,
        })]
    }

    /// Records `outcomes` one after the other, as the sign-in does.
    fn after(outcomes: &[bool], now: DateTime<Utc>) -> (Vec<UserEvent>, User) {
        let mut history = registered();
        for &ok in outcomes {
            let user = User::from_events(&history);
            history.extend(record_check(&user, ok, now, POLICY));
        }
        let user = User::from_events(&history);
        (history, user)
    }

    #[test]
    fn the_last_allowed_failure_locks_the_account() {
        let now = Utc::now().trunc_subsecs(6);
        let (history, user) = after(&[false, false], now);
        assert_eq!(user.failed_checks, 2);
        assert_eq!(may_check(&user, now), Ok(()));
        let events = record_check(&user, false, now, POLICY);
        assert!(matches!(
            events.as_slice(),
            [UserEvent::PasswordCheckFailed(_), UserEvent::Locked(l)] if l.until == (now + POLICY.lock_for).trunc_subsecs(6)
        ));
        let locked = User::from_events(history.iter().chain(&events));
        assert_eq!(
            may_check(&locked, now),
            Err(Refusal::Locked {
                until: now + POLICY.lock_for
            })
        );
        // The lock runs out on its own, and the count starts again.
        let later = now + POLICY.lock_for;
        assert_eq!(may_check(&locked, later), Ok(()));
        assert_eq!(locked.failed_checks, 0);
    }

    #[test]
    fn a_success_ends_a_run_of_failures_and_is_recorded_only_then() {
        let now = Utc::now();
        let (_, fresh) = after(&[], now);
        assert!(record_check(&fresh, true, now, POLICY).is_empty());
        let (_, user) = after(&[false, false, true], now);
        assert_eq!(user.failed_checks, 0);
        assert_eq!(user.version, 4);
        let (_, user) = after(&[false, false, true, false, false], now);
        assert_eq!(may_check(&user, now), Ok(()), "not consecutive");
    }

    #[test]
    fn unknown_and_deactivated_users_are_not_checked() {
        let now = Utc::now();
        assert_eq!(may_check(&User::default(), now), Err(Refusal::Unknown));
        let mut history = registered();
        history.push(UserEvent::Deactivated(events::domain::UserDeactivated {
            reason: None,
        }));
        assert_eq!(
            may_check(&User::from_events(&history), now),
            Err(Refusal::Deactivated)
        );
    }
}
