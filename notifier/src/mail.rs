//! Which events ask for a mail, and what that mail says.
//!
//! Templates are plain text in `notifier/templates/`, compiled in: the first
//! line is `Subject: …`, then a blank line, then the body. `{name}`
//! placeholders are filled from a short list; nothing else is interpreted.

use chrono::{DateTime, SecondsFormat, Utc};
use events::codes::Purpose;
use events::{IntegrationEvent, PublicChange};
use uuid::Uuid;

/// The kinds of mail, as stored in `notifier_mails.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// After `user.registered.v1`, with the email verification code when the
    /// registration carries one.
    Welcome,
    /// After `user.email_verification_requested.v1`, to the address to verify.
    EmailVerification,
    /// After `user.password_reset_requested.v1`.
    PasswordReset,
}

impl Kind {
    /// What the code of this kind of mail proves (its seal is bound to it).
    pub fn purpose(self) -> Purpose {
        match self {
            Self::Welcome | Self::EmailVerification => Purpose::EmailVerification,
            Self::PasswordReset => Purpose::PasswordReset,
        }
    }

    /// Whether a mail of this kind is pointless without its code.
    pub fn needs_code(self) -> bool {
        !matches!(self, Self::Welcome)
    }
}

/// The `ce_type`s that ask for a mail.
pub const MAIL_TYPES: [&str; 3] = [
    "user.registered.v1",
    "user.email_verification_requested.v1",
    "user.password_reset_requested.v1",
];

/// One mail to send, as the consumer queues it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMail {
    pub event_id: Uuid,
    pub user_id: Uuid,
    pub kind: Kind,
    pub recipient: String,
    /// On the topic for the request events; a registration's is in the log
    /// only (read with the code at send time).
    pub code_expires_at: Option<DateTime<Utc>>,
}

impl NewMail {
    /// The mail an event asks for, if it asks for one.
    pub fn for_event(event: &IntegrationEvent) -> Option<Self> {
        let (kind, recipient, code_expires_at) = match &event.change {
            PublicChange::Registered { email, .. } => (Kind::Welcome, email, None),
            PublicChange::EmailVerificationRequested { email, expires_at } => {
                (Kind::EmailVerification, email, Some(*expires_at))
            }
            PublicChange::PasswordResetRequested { email, expires_at } => {
                (Kind::PasswordReset, email, Some(*expires_at))
            }
            _ => return None,
        };
        Some(Self {
            event_id: event.event_id,
            user_id: event.user_id,
            kind,
            recipient: recipient.clone(),
            code_expires_at,
        })
    }
}

/// A rendered mail: subject and plain-text body. It may hold a code, so it
/// never prints.
pub struct Rendered {
    pub subject: String,
    pub body: String,
}

impl std::fmt::Debug for Rendered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendered")
            .field("subject", &self.subject)
            .field("body", &"<redacted>")
            .finish()
    }
}

const WELCOME: &str = include_str!("../templates/welcome.txt");
const WELCOME_WITHOUT_CODE: &str = include_str!("../templates/welcome_without_code.txt");
const EMAIL_VERIFICATION: &str = include_str!("../templates/email_verification.txt");
const PASSWORD_RESET: &str = include_str!("../templates/password_reset.txt");

/// The mail of `kind`, with `code` (and its expiry) when there is one.
pub fn render(kind: Kind, code: Option<(&str, Option<DateTime<Utc>>)>) -> Rendered {
    let template = match (kind, code.is_some()) {
        (Kind::Welcome, true) => WELCOME,
        (Kind::Welcome, false) => WELCOME_WITHOUT_CODE,
        (Kind::EmailVerification, _) => EMAIL_VERIFICATION,
        (Kind::PasswordReset, _) => PASSWORD_RESET,
    };
    let (code, expires_at) = match code {
        Some((code, Some(at))) => (code, at.to_rfc3339_opts(SecondsFormat::Secs, true)),
        Some((code, None)) => (code, "further notice".to_owned()),
        None => ("", String::new()),
    };
    fill(template, &[("code", code), ("expires_at", &expires_at)])
}

/// Splits off the `Subject:` line and fills the placeholders.
fn fill(template: &str, values: &[(&str, &str)]) -> Rendered {
    let mut text = template.to_owned();
    for (name, value) in values {
        text = text.replace(&format!("{{{name}}}"), value);
    }
    let (first, body) = text.split_once('\n').unwrap_or((&text, ""));
    Rendered {
        subject: first
            .strip_prefix("Subject:")
            .unwrap_or(first)
            .trim()
            .to_owned(),
        body: body.trim_start_matches('\n').to_owned(),
    }
}

/// The `Message-ID` of the mail of `event_id`: the same on every attempt, so
/// a mail sent again after a crash between the send and its record can be
/// recognised as a duplicate by the mail systems on the way.
pub fn message_id(event_id: Uuid) -> String {
    format!("<{event_id}@userstream>")
}

/// The recipient's domain: the most of an address a log line may show.
pub fn domain(address: &str) -> &str {
    address.rsplit_once('@').map_or("", |(_, domain)| domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_has_a_subject_and_no_placeholder_left() {
        let at = Some("2026-12-04T10:00:00Z".parse().unwrap());
        for (kind, code) in [
            (Kind::Welcome, Some(("12345678", at))),
            (Kind::Welcome, None),
            (Kind::EmailVerification, Some(("12345678", at))),
            (Kind::PasswordReset, Some(("12345678", at))),
        ] {
            let mail = render(kind, code);
            assert!(!mail.subject.is_empty(), "{kind:?}");
            assert!(!mail.subject.contains('\n'));
            assert!(!mail.body.contains('{'), "{kind:?}: {}", mail.body);
            // Short lines keep the body 7bit: readable as is in any mailbox.
            assert!(mail.body.lines().all(|l| l.len() <= 72), "{kind:?}");
            assert_eq!(mail.body.contains("12345678"), code.is_some(), "{kind:?}");
            if code.is_some() {
                assert!(mail.body.contains("2026-12-04T10:00:00Z"));
            }
        }
    }

    #[test]
    fn a_rendered_mail_never_prints_its_body() {
        let mail = render(Kind::PasswordReset, Some(("87654321", None)));
        assert!(!format!("{mail:?}").contains("87654321"));
    }

    #[test]
    fn only_the_domain_of_an_address_is_shown() {
        assert_eq!(domain("alice@example.com"), "example.com");
        assert_eq!(domain("no-at-sign"), "");
    }
}
