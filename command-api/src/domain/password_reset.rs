//! Password reset by a mailed code. The caller is anonymous, so every
//! refusal looks the same ([`CodeRefusal::Invalid`]) and a request for an
//! address that has no active user does nothing visible.

use chrono::{DateTime, Utc};
use events::codes::{CodeKey, Purpose};
use events::domain::{PasswordReset, PasswordResetFailed, PasswordResetRequested, SealedCode};
use events::{PasswordHash, UserEvent};
use uuid::Uuid;

use super::codes::{self, Checked, CodeRefusal, IssuePolicy};
use super::{Decision, Status, User};

/// A reset code to the user's current address, unless the user is not
/// active or a code went out less than `resend_after` ago.
pub fn request(
    user: &User,
    sealed_code: SealedCode,
    now: DateTime<Utc>,
    policy: IssuePolicy,
) -> Vec<UserEvent> {
    if user.status != Status::Active {
        return Vec::new();
    }
    if policy.retry_after(user.reset_code.as_ref(), now).is_some() {
        return Vec::new();
    }
    vec![UserEvent::PasswordResetRequested(PasswordResetRequested {
        email: user.email.clone(),
        sealed_code,
        expires_at: now + policy.ttl,
    })]
}

/// Completes a reset with what the caller typed and the new password's hash.
pub fn complete(
    user: &User,
    user_id: Uuid,
    typed: &str,
    key: &CodeKey,
    now: DateTime<Utc>,
    max_attempts: u32,
    password_hash: PasswordHash,
) -> Decision<CodeRefusal> {
    if user.status != Status::Active {
        return Decision::refuse(CodeRefusal::Invalid);
    }
    match codes::check(
        user.reset_code.as_ref(),
        typed,
        key,
        Purpose::PasswordReset,
        user_id,
        now,
        max_attempts,
    ) {
        Checked::Right => Decision::accept(vec![UserEvent::PasswordReset(PasswordReset {
            password_hash,
        })]),
        Checked::Wrong => Decision {
            events: vec![UserEvent::PasswordResetFailed(PasswordResetFailed {})],
            refusal: Some(CodeRefusal::Invalid),
        },
        // Expired or used up: the same answer as a wrong code.
        Checked::Refused(_) => Decision::refuse(CodeRefusal::Invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::codes::tests::test_key;
    use chrono::Duration;
    use events::codes::Code;
    use events::domain::{UserDeactivated, UserLocked, UserRegistered};

    const POLICY: IssuePolicy = IssuePolicy {
        ttl: Duration::minutes(30),
        resend_after: Duration::minutes(1),
    };

    fn registered() -> Vec<UserEvent> {
        vec![UserEvent::Registered(UserRegistered {
            username: "alice".into(),
            email: "alice@example.com".into(),
            password_hash: PasswordHash::new("$argon2id$old".into()),
            sealed_code: None,
            code_expires_at: None,
        })]
    }

    fn new_hash() -> PasswordHash {
        PasswordHash::new("$argon2id$new".into())
    }

    #[test]
    fn a_reset_replaces_the_password_lifts_the_lock_and_the_code_is_single_use() {
        let user = Uuid::new_v4();
        let code = Code::generate();
        let now = Utc::now();
        let mut history = registered();
        history.push(UserEvent::Locked(UserLocked {
            until: now + Duration::minutes(10),
        }));
        let sealed = test_key().seal(Purpose::PasswordReset, user, &code);
        history.extend(request(&User::from_events(&history), sealed, now, POLICY));
        let state = User::from_events(&history);
        let done = complete(&state, user, code.expose(), &test_key(), now, 5, new_hash());
        assert_eq!(done.refusal, None);
        history.extend(done.events);
        let state = User::from_events(&history);
        assert_eq!(state.password_hash, Some(new_hash()));
        assert!(!state.locked_at(now));
        let again = complete(&state, user, code.expose(), &test_key(), now, 5, new_hash());
        assert_eq!(again, Decision::refuse(CodeRefusal::Invalid));
    }

    #[test]
    fn every_refusal_looks_the_same_and_only_wrong_codes_are_counted() {
        let user = Uuid::new_v4();
        let code = Code::generate();
        let now = Utc::now();
        let mut history = registered();
        let sealed = test_key().seal(Purpose::PasswordReset, user, &code);
        history.extend(request(&User::from_events(&history), sealed, now, POLICY));
        let state = User::from_events(&history);
        let wrong = complete(&state, user, "00000000", &test_key(), now, 5, new_hash());
        assert_eq!(wrong.refusal, Some(CodeRefusal::Invalid));
        assert_eq!(wrong.events.len(), 1);
        let expired = complete(
            &state,
            user,
            code.expose(),
            &test_key(),
            now + POLICY.ttl,
            5,
            new_hash(),
        );
        assert_eq!(expired, Decision::refuse(CodeRefusal::Invalid));
    }

    #[test]
    fn no_code_goes_to_a_deactivated_user_or_twice_within_the_resend_interval() {
        let now = Utc::now();
        let seal = || SealedCode::new("v1.x".into());
        let mut history = registered();
        let first = request(&User::from_events(&history), seal(), now, POLICY);
        assert_eq!(first.len(), 1);
        history.extend(first);
        let state = User::from_events(&history);
        assert!(request(&state, seal(), now + Duration::seconds(30), POLICY).is_empty());
        assert_eq!(
            request(&state, seal(), now + Duration::seconds(61), POLICY).len(),
            1
        );
        history.push(UserEvent::Deactivated(UserDeactivated { reason: None }));
        assert!(request(
            &User::from_events(&history),
            seal(),
            now + Duration::hours(1),
            POLICY
        )
        .is_empty());
    }
}
