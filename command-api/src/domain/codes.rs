//! Codes that went by mail, as the write side keeps them: sealed, with an
//! expiry and a count of wrong tries. What a typed code does is decided here
//! for both purposes (email verification and password reset).

use chrono::{DateTime, Duration, Utc};
use events::codes::{CodeKey, Purpose};
use events::domain::SealedCode;
use uuid::Uuid;

/// How codes are issued.
#[derive(Debug, Clone, Copy)]
pub struct IssuePolicy {
    /// How long a code is valid.
    pub ttl: Duration,
    /// No new code within this time of the last one: repeated requests
    /// cannot flood the user's mailbox.
    pub resend_after: Duration,
}

impl IssuePolicy {
    /// How long until a new code may go out, if `last` (the outstanding
    /// code) went out less than `resend_after` ago. Codes carry their
    /// expiry, so the time they went out is read as expiry minus `ttl`.
    pub fn retry_after(&self, last: Option<&MailedCode>, now: DateTime<Utc>) -> Option<Duration> {
        let allowed_at = last?.expires_at - self.ttl + self.resend_after;
        (allowed_at > now).then(|| allowed_at - now)
    }
}

/// An outstanding code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailedCode {
    /// Where it went.
    pub email: String,
    pub sealed: SealedCode,
    pub expires_at: DateTime<Utc>,
    /// Wrong tries so far.
    pub failures: u32,
}

impl MailedCode {
    pub fn new(email: &str, sealed: SealedCode, expires_at: DateTime<Utc>) -> Self {
        Self {
            email: email.to_owned(),
            sealed,
            expires_at,
            failures: 0,
        }
    }
}

/// Why a typed code is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodeRefusal {
    /// Wrong, already used, or none was sent.
    #[error("the code is not valid")]
    Invalid,
    #[error("the code has expired; ask for a new one")]
    Expired,
    #[error("too many wrong codes; ask for a new one")]
    TooManyAttempts,
}

/// What checking a typed code concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The code is right: the caller may do what it proves.
    Right,
    /// The code is wrong: record the failure, then refuse.
    Wrong,
    /// Refused without counting (nothing outstanding, expired, or the
    /// attempts are used up).
    Refused(CodeRefusal),
}

/// Checks `typed` against `outstanding` at `now`. At most `max_attempts`
/// wrong tries are ever compared: once they are used up, no comparison runs
/// until a new code is issued. Each comparison's outcome is an event on the
/// stream, appended at the version it was decided on, so racing tries are
/// decided one after another.
pub fn check(
    outstanding: Option<&MailedCode>,
    typed: &str,
    key: &CodeKey,
    purpose: Purpose,
    user_id: Uuid,
    now: DateTime<Utc>,
    max_attempts: u32,
) -> Checked {
    let Some(code) = outstanding else {
        return Checked::Refused(CodeRefusal::Invalid);
    };
    if code.expires_at <= now {
        return Checked::Refused(CodeRefusal::Expired);
    }
    if code.failures >= max_attempts {
        return Checked::Refused(CodeRefusal::TooManyAttempts);
    }
    // A code sealed under another key (after a key change) cannot be opened:
    // it counts as wrong, and the user asks for a new one.
    match key.open(purpose, user_id, &code.sealed) {
        Ok(sent) if sent.matches(typed) => Checked::Right,
        _ => Checked::Wrong,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use events::codes::Code;

    pub(crate) fn test_key() -> CodeKey {
        CodeKey::from_base64("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap()
    }

    fn outstanding(user: Uuid, code: &Code, failures: u32) -> MailedCode {
        MailedCode {
            failures,
            ..MailedCode::new(
                "a@example.com",
                test_key().seal(Purpose::PasswordReset, user, code),
                Utc::now() + chrono::Duration::minutes(10),
            )
        }
    }

    #[test]
    fn a_code_is_right_only_while_outstanding_unexpired_and_within_the_attempts() {
        let user = Uuid::new_v4();
        let code = Code::generate();
        let now = Utc::now();
        let check_at = |mailed: Option<&MailedCode>, typed: &str, now| {
            check(
                mailed,
                typed,
                &test_key(),
                Purpose::PasswordReset,
                user,
                now,
                3,
            )
        };
        let fresh = outstanding(user, &code, 0);
        assert_eq!(check_at(Some(&fresh), code.expose(), now), Checked::Right);
        assert_eq!(check_at(Some(&fresh), "00000000x", now), Checked::Wrong);
        assert_eq!(
            check_at(None, code.expose(), now),
            Checked::Refused(CodeRefusal::Invalid)
        );
        assert_eq!(
            check_at(Some(&fresh), code.expose(), fresh.expires_at),
            Checked::Refused(CodeRefusal::Expired)
        );
        let used_up = outstanding(user, &code, 3);
        assert_eq!(
            check_at(Some(&used_up), code.expose(), now),
            Checked::Refused(CodeRefusal::TooManyAttempts),
            "the right code is not even compared once the attempts are used up"
        );
        // Sealed for another purpose or user: never right.
        assert_eq!(
            check(
                Some(&fresh),
                code.expose(),
                &test_key(),
                Purpose::EmailVerification,
                user,
                now,
                3
            ),
            Checked::Wrong
        );
        assert_eq!(
            check(
                Some(&fresh),
                code.expose(),
                &test_key(),
                Purpose::PasswordReset,
                Uuid::new_v4(),
                now,
                3
            ),
            Checked::Wrong
        );
    }
}
