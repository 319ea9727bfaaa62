//! Email verification and email change: a code goes to the address, and
//! confirming it makes the address the user's verified email. A change
//! reserves the new address like a registration does and swaps it in only
//! when confirmed; the old address stays the user's until then.

use chrono::{DateTime, Utc};
use events::codes::{CodeKey, Purpose};
use events::domain::{EmailCodeFailed, EmailVerificationRequested, EmailVerified, SealedCode};
use events::UserEvent;
use uuid::Uuid;

use super::codes::{self, Checked, CodeRefusal, IssuePolicy};
use super::{Decision, DomainError, Status, User};

fn must_be_active(user: &User) -> Result<(), DomainError> {
    match user.status {
        Status::Unregistered => Err(DomainError::NotFound),
        Status::Deactivated => Err(DomainError::Deactivated),
        Status::Active => Ok(()),
    }
}

/// A code to `email` (normalised): the current address again while it is
/// unverified, or a new address to change to. The new code replaces any
/// outstanding one (and its reservation, see [`reserved`]). No code goes out
/// within `policy.resend_after` of the last one, whatever the address: a
/// user cannot make the service mail someone else's address over and over.
pub fn request(
    user: &User,
    email: &str,
    sealed_code: SealedCode,
    now: DateTime<Utc>,
    policy: IssuePolicy,
) -> Result<Vec<UserEvent>, DomainError> {
    must_be_active(user)?;
    if email == user.email && user.email_verified {
        return Err(DomainError::EmailUnchanged);
    }
    if let Some(wait) = policy.retry_after(user.email_code.as_ref(), now) {
        let millis = u64::try_from(wait.num_milliseconds()).unwrap_or(0);
        return Err(DomainError::CodeRecentlySent {
            retry_after_secs: millis.div_ceil(1000).max(1),
        });
    }
    let expires_at = now + policy.ttl;
    Ok(vec![UserEvent::EmailVerificationRequested(
        EmailVerificationRequested {
            email: email.to_owned(),
            sealed_code,
            expires_at,
        },
    )])
}

/// Confirms the outstanding code with what the user typed.
pub fn confirm(
    user: &User,
    user_id: Uuid,
    typed: &str,
    key: &CodeKey,
    now: DateTime<Utc>,
    max_attempts: u32,
) -> Result<Decision<CodeRefusal>, DomainError> {
    must_be_active(user)?;
    let outstanding = user.email_code.as_ref();
    Ok(
        match codes::check(
            outstanding,
            typed,
            key,
            Purpose::EmailVerification,
            user_id,
            now,
            max_attempts,
        ) {
            Checked::Right => {
                let email = outstanding.map(|c| c.email.clone()).unwrap_or_default();
                Decision::accept(vec![UserEvent::EmailVerified(EmailVerified { email })])
            }
            Checked::Wrong => Decision {
                events: vec![UserEvent::EmailCodeFailed(EmailCodeFailed {})],
                refusal: Some(CodeRefusal::Invalid),
            },
            Checked::Refused(refusal) => Decision::refuse(refusal),
        },
    )
}

/// The address an outstanding change holds besides the current one, if any.
pub fn pending_change(user: &User) -> Option<&str> {
    user.email_code
        .as_ref()
        .map(|c| c.email.as_str())
        .filter(|email| *email != user.email)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::codes::tests::test_key;
    use chrono::Duration;
    use events::codes::Code;
    use events::domain::{PasswordHash, UserDeactivated, UserRegistered};

    /// Codes valid for an hour (as [`registered`]'s), sent again at once.
    const NO_WAIT: IssuePolicy = IssuePolicy {
        ttl: Duration::hours(1),
        resend_after: Duration::zero(),
    };

    fn registered(user: Uuid, code: &Code) -> Vec<UserEvent> {
        vec![UserEvent::Registered(UserRegistered {
            username: "alice".into(),
            email: "alice@example.com".into(),
            password_hash: PasswordHash::new("$argon2id$test".into()),
            sealed_code: Some(test_key().seal(Purpose::EmailVerification, user, code)),
            code_expires_at: Some(Utc::now() + chrono::Duration::hours(1)),
        })]
    }

    fn decided(history: &mut Vec<UserEvent>, user: Uuid, typed: &str) -> Decision<CodeRefusal> {
        let state = User::from_events(history.iter());
        let decision = confirm(&state, user, typed, &test_key(), Utc::now(), 3).unwrap();
        history.extend(decision.events.clone());
        decision
    }

    #[test]
    fn the_registration_code_verifies_the_address_once() {
        let user = Uuid::new_v4();
        let code = Code::generate();
        let mut history = registered(user, &code);
        assert!(!User::from_events(&history).email_verified);
        let wrong = decided(&mut history, user, "12345678x");
        assert_eq!(wrong.refusal, Some(CodeRefusal::Invalid));
        assert_eq!(
            wrong.events,
            [UserEvent::EmailCodeFailed(EmailCodeFailed {})]
        );
        let right = decided(&mut history, user, code.expose());
        assert_eq!(right.refusal, None);
        let state = User::from_events(&history);
        assert!(state.email_verified);
        assert_eq!(
            decided(&mut history, user, code.expose()),
            Decision::refuse(CodeRefusal::Invalid),
            "a used code is not valid again"
        );
        assert_eq!(
            request(
                &state,
                "alice@example.com",
                SealedCode::new("x".into()),
                Utc::now(),
                NO_WAIT,
            ),
            Err(DomainError::EmailUnchanged)
        );
    }

    #[test]
    fn a_change_swaps_the_address_only_when_confirmed() {
        let user = Uuid::new_v4();
        let mut history = registered(user, &Code::generate());
        let code = Code::generate();
        let sealed = test_key().seal(Purpose::EmailVerification, user, &code);
        history.extend(
            request(
                &User::from_events(&history),
                "alice@new.example",
                sealed,
                Utc::now(),
                NO_WAIT,
            )
            .unwrap(),
        );
        let state = User::from_events(&history);
        assert_eq!(
            state.email, "alice@example.com",
            "the old address stays until confirmed"
        );
        assert_eq!(pending_change(&state), Some("alice@new.example"));
        decided(&mut history, user, code.expose());
        let state = User::from_events(&history);
        assert_eq!(
            (state.email.as_str(), state.email_verified),
            ("alice@new.example", true)
        );
        assert_eq!(pending_change(&state), None);
    }

    #[test]
    fn wrong_codes_are_counted_up_to_the_limit_then_nothing_is_compared() {
        let user = Uuid::new_v4();
        let code = Code::generate();
        let mut history = registered(user, &code);
        for _ in 0..3 {
            assert_eq!(decided(&mut history, user, "nope").events.len(), 1);
        }
        let refused = decided(&mut history, user, code.expose());
        assert_eq!(refused, Decision::refuse(CodeRefusal::TooManyAttempts));
    }

    #[test]
    fn a_deactivated_user_cannot_verify_or_change() {
        let user = Uuid::new_v4();
        let code = Code::generate();
        let mut history = registered(user, &code);
        history.push(UserEvent::Deactivated(UserDeactivated { reason: None }));
        let state = User::from_events(&history);
        assert_eq!(
            confirm(&state, user, code.expose(), &test_key(), Utc::now(), 3),
            Err(DomainError::Deactivated)
        );
        assert_eq!(
            request(
                &state,
                "b@example.com",
                SealedCode::new("x".into()),
                Utc::now(),
                NO_WAIT,
            ),
            Err(DomainError::Deactivated)
        );
    }

    #[test]
    fn no_second_code_goes_out_within_the_resend_interval_whatever_the_address() {
        let policy = IssuePolicy {
            ttl: Duration::hours(1),
            resend_after: Duration::minutes(1),
        };
        let user = Uuid::new_v4();
        // The registration's code went out just now.
        let state = User::from_events(&registered(user, &Code::generate()));
        let now = Utc::now();
        for address in ["alice@example.com", "someone.else@example.com"] {
            let refused = request(&state, address, SealedCode::new("x".into()), now, policy);
            assert!(
                matches!(
                    refused,
                    Err(DomainError::CodeRecentlySent {
                        retry_after_secs: 1..=60
                    })
                ),
                "{address}: {refused:?}"
            );
        }
        let later = now + Duration::seconds(61);
        let events = request(
            &state,
            "someone.else@example.com",
            SealedCode::new("x".into()),
            later,
            policy,
        )
        .unwrap();
        assert!(matches!(
            events.as_slice(),
            [UserEvent::EmailVerificationRequested(requested)] if requested.expires_at == later + policy.ttl
        ));
    }
}
