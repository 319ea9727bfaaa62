//! Input rules for registration. Each check returns the normalised value or a
//! message for the field, so a refusal can name every bad field at once.

use std::collections::BTreeMap;

pub const USERNAME_CHARS: std::ops::RangeInclusive<usize> = 3..=32;
pub const PASSWORD_CHARS: std::ops::RangeInclusive<usize> = 12..=128;
pub const REASON_MAX_CHARS: usize = 500;
pub const EMAIL_MAX_CHARS: usize = 254;

/// 3–32 characters of `[A-Za-z0-9_.-]` once surrounding ASCII whitespace is
/// trimmed; stored trimmed and lower-cased.
pub fn username(raw: &str) -> Result<String, String> {
    let name = events::domain::normalise(raw);
    let len = name.chars().count();
    if !USERNAME_CHARS.contains(&len) {
        return Err(format!(
            "must be {} to {} characters",
            USERNAME_CHARS.start(),
            USERNAME_CHARS.end()
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
    {
        return Err("may contain only a-z, 0-9, '_', '.' and '-'".into());
    }
    Ok(name)
}

/// `local@domain` once surrounding ASCII whitespace is trimmed, stored
/// trimmed and lower-cased: a dot-atom local part of at most 64
/// characters and a dotted domain of letters, digits and hyphens (labels of
/// 1–63, not starting or ending with a hyphen), at most 254 characters; no
/// spaces anywhere (the pattern `RegisterRequest` documents).
pub fn email(raw: &str) -> Result<String, String> {
    let email = events::domain::normalise(raw);
    let invalid = || "must be a valid email address".to_owned();
    if email.chars().count() > EMAIL_MAX_CHARS {
        return Err(format!("must be at most {EMAIL_MAX_CHARS} characters"));
    }
    let (local, domain) = email.rsplit_once('@').ok_or_else(invalid)?;
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if local_ok && domain_ok {
        Ok(email)
    } else {
        Err(invalid())
    }
}

/// 12–128 characters (characters, not bytes); kept exactly as typed.
pub fn password(raw: &str) -> Result<(), String> {
    let len = raw.chars().count();
    if PASSWORD_CHARS.contains(&len) {
        Ok(())
    } else {
        Err(format!(
            "must be {} to {} characters",
            PASSWORD_CHARS.start(),
            PASSWORD_CHARS.end()
        ))
    }
}

/// An optional free-text reason, at most 500 characters as sent; stored
/// trimmed, and an empty one is no reason.
pub fn reason(raw: Option<String>) -> Result<Option<String>, String> {
    if raw
        .as_ref()
        .is_some_and(|r| r.chars().count() > REASON_MAX_CHARS)
    {
        return Err(format!("must be at most {REASON_MAX_CHARS} characters"));
    }
    match raw.map(|r| r.trim().to_owned()) {
        Some(r) if r.is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// Collects per-field failures.
#[derive(Debug, Default)]
pub struct FieldErrors(pub BTreeMap<String, String>);

impl FieldErrors {
    /// Keeps the value on success, records the message under `field` on failure.
    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        result
            .map_err(|message| {
                self.0.insert(field.to_owned(), message);
            })
            .ok()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_trimmed_and_lower_cased() {
        assert_eq!(username(" \tAlice_1.x-Y\n").unwrap(), "alice_1.x-y");
        assert!(
            username("\u{a0}alice").is_err(),
            "only ASCII whitespace is trimmed"
        );
        assert!(
            username("\u{212A}elvin").is_err(),
            "only ASCII is lower-cased"
        );
    }

    #[test]
    fn usernames_outside_the_rules_are_refused() {
        for bad in ["ab", "  ab  ", &"a".repeat(33), "al ice", "alice!", "ålice"] {
            assert!(username(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(username(&"a".repeat(32)).is_ok());
    }

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(email(" Alice@Example.COM ").unwrap(), "alice@example.com");
        assert!(
            email("\u{3000}alice@example.com").is_err(),
            "only ASCII whitespace is trimmed"
        );
        for bad in [
            "alice",
            "alice@",
            "@example.com",
            "alice@example",
            "al ice@example.com",
            "alice@exa_mple.com",
            "alice@-example.com",
            "alice..b@example.com",
            "alice@example..com",
        ] {
            assert!(email(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn password_length_counts_characters_not_bytes() {
        // 12 characters, 24 bytes.
        assert!(password(&"é".repeat(12)).is_ok());
        assert!(password(&"é".repeat(11)).is_err());
        assert!(password(&"x".repeat(128)).is_ok());
        assert!(password(&"x".repeat(129)).is_err());
    }

    #[test]
    fn reasons_are_optional_and_bounded() {
        assert_eq!(reason(None).unwrap(), None);
        assert_eq!(reason(Some("  ".into())).unwrap(), None);
        assert_eq!(reason(Some(" spam ".into())).unwrap(), Some("spam".into()));
        assert!(reason(Some("x".repeat(501))).is_err());
    }
}
