//! The profile: display name, locale, time zone and small preferences,
//! changed with JSON merge patch semantics (RFC 7396): a member sets its
//! field, `null` clears it, an absent member keeps it; `preferences` merges
//! key by key the same way.

use std::collections::BTreeMap;

use events::domain::ProfileChanged;
use events::UserEvent;
use serde_json::Value;

use super::{DomainError, Status, User};

pub const DISPLAY_NAME_MAX: usize = 100;
pub const LOCALE_PATTERN: &str = "^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,4}$";
pub const LOCALE_MAX: usize = 35;
pub const PREFERENCES_MAX: usize = 32;
pub const PREFERENCE_KEY_PATTERN: &str = "^[a-z][a-z0-9_.-]{0,63}$";
pub const PREFERENCE_STRING_MAX: usize = 256;

/// One member of a merge patch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Patch<T> {
    #[default]
    Keep,
    Clear,
    Set(T),
}

impl<T: Clone> Patch<T> {
    fn apply(&self, current: &Option<T>) -> Option<T> {
        match self {
            Self::Keep => current.clone(),
            Self::Clear => None,
            Self::Set(value) => Some(value.clone()),
        }
    }
}

/// A validated change to the profile.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProfilePatch {
    pub display_name: Patch<String>,
    pub locale: Patch<String>,
    pub time_zone: Patch<String>,
    /// `None` for a key deletes it.
    pub preferences: Patch<BTreeMap<String, Option<Value>>>,
}

/// Field name → what is wrong with it.
pub type FieldErrors = BTreeMap<String, String>;

/// Reads a merge patch document, checking every member.
pub fn parse(document: &serde_json::Map<String, Value>) -> Result<ProfilePatch, FieldErrors> {
    let mut errors = FieldErrors::new();
    let mut patch = ProfilePatch::default();
    for (name, value) in document {
        let outcome = match name.as_str() {
            "display_name" => text(value, display_name).map(|p| patch.display_name = p),
            "locale" => text(value, locale).map(|p| patch.locale = p),
            "time_zone" => text(value, time_zone).map(|p| patch.time_zone = p),
            "preferences" => preferences(value).map(|p| patch.preferences = p),
            _ => Err("unknown field".to_owned()),
        };
        if let Err(message) = outcome {
            errors.insert(name.clone(), message);
        }
    }
    if errors.is_empty() {
        Ok(patch)
    } else {
        Err(errors)
    }
}

fn text(value: &Value, check: fn(&str) -> Result<(), String>) -> Result<Patch<String>, String> {
    match value {
        Value::Null => Ok(Patch::Clear),
        Value::String(s) => check(s).map(|()| Patch::Set(s.clone())),
        _ => Err("must be a string or null".into()),
    }
}

fn display_name(s: &str) -> Result<(), String> {
    let length = s.chars().count();
    if s.trim().is_empty() || length > DISPLAY_NAME_MAX {
        return Err(format!("1–{DISPLAY_NAME_MAX} characters, not only spaces"));
    }
    if s.chars().any(char::is_control) {
        return Err("no control characters".into());
    }
    Ok(())
}

/// A BCP 47 tag in its common shape: a 2–3 letter language, then up to four
/// subtags of 2–8 letters or digits (`en`, `pt-BR`, `zh-Hant-TW`).
fn locale(s: &str) -> Result<(), String> {
    let mut parts = s.split('-');
    let language = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    let ok = s.len() <= LOCALE_MAX
        && (2..=3).contains(&language.len())
        && language.bytes().all(|b| b.is_ascii_alphabetic())
        && rest.len() <= 4
        && rest
            .iter()
            .all(|t| (2..=8).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_alphanumeric()));
    if ok {
        Ok(())
    } else {
        Err("a BCP 47 language tag such as `en` or `pt-BR`".into())
    }
}

/// A name of the IANA time zone database (`Europe/Paris`, `UTC`).
fn time_zone(s: &str) -> Result<(), String> {
    match s.parse::<chrono_tz::Tz>() {
        Ok(_) => Ok(()),
        Err(_) => Err("an IANA time zone name such as `Europe/Paris`".into()),
    }
}

pub fn is_preference_key(key: &str) -> bool {
    let mut chars = key.chars();
    key.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
}

fn preferences(value: &Value) -> Result<Patch<BTreeMap<String, Option<Value>>>, String> {
    let members = match value {
        Value::Null => return Ok(Patch::Clear),
        Value::Object(members) => members,
        _ => return Err("must be an object or null".into()),
    };
    if members.len() > PREFERENCES_MAX {
        return Err(format!("at most {PREFERENCES_MAX} keys"));
    }
    let mut merged = BTreeMap::new();
    for (key, value) in members {
        if !is_preference_key(key) {
            return Err(format!("key {key:?} must match {PREFERENCE_KEY_PATTERN}"));
        }
        let value = match value {
            Value::Null => None,
            Value::Bool(_) | Value::Number(_) => Some(value.clone()),
            Value::String(s) if s.chars().count() <= PREFERENCE_STRING_MAX => Some(value.clone()),
            _ => {
                return Err(format!(
                    "{key:?}: a string of at most {PREFERENCE_STRING_MAX} characters, a number, a boolean, or null to remove it"
                ))
            }
        };
        merged.insert(key.clone(), value);
    }
    Ok(Patch::Set(merged))
}

/// Why a patch cannot be applied to the current profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("the preferences would have more than {PREFERENCES_MAX} keys")]
    TooManyPreferences,
}

/// The profile after `patch`, as a ProfileChanged event. A patch that
/// changes nothing is still recorded: the answer's version then names the
/// state the caller's patch was applied to.
pub fn change(user: &User, patch: &ProfilePatch) -> Result<Vec<UserEvent>, ProfileError> {
    match user.status {
        Status::Unregistered => return Err(DomainError::NotFound.into()),
        Status::Deactivated => return Err(DomainError::Deactivated.into()),
        Status::Active => {}
    }
    let current = &user.profile;
    let preferences = match &patch.preferences {
        Patch::Keep => current.preferences.clone(),
        Patch::Clear => BTreeMap::new(),
        Patch::Set(changes) => {
            let mut merged = current.preferences.clone();
            for (key, value) in changes {
                match value {
                    Some(value) => merged.insert(key.clone(), value.clone()),
                    None => merged.remove(key),
                };
            }
            merged
        }
    };
    if preferences.len() > PREFERENCES_MAX {
        return Err(ProfileError::TooManyPreferences);
    }
    Ok(vec![UserEvent::ProfileChanged(ProfileChanged {
        display_name: patch.display_name.apply(&current.display_name),
        locale: patch.locale.apply(&current.locale),
        time_zone: patch.time_zone.apply(&current.time_zone),
        preferences,
    })])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user() -> User {
        User {
            status: Status::Active,
            version: 1,
            ..User::default()
        }
    }

    fn patch(document: Value) -> Result<ProfilePatch, FieldErrors> {
        parse(document.as_object().unwrap())
    }

    fn changed(user: &User, document: Value) -> ProfileChanged {
        match change(user, &patch(document).unwrap()).unwrap().pop() {
            Some(UserEvent::ProfileChanged(p)) => p,
            other => panic!("expected ProfileChanged, got {other:?}"),
        }
    }

    #[test]
    fn members_set_null_clears_and_absent_keeps() {
        let mut user = user();
        user.profile = changed(
            &user,
            json!({"display_name": "Alice", "locale": "en-GB", "time_zone": "Europe/London",
                   "preferences": {"theme": "dark", "digest": true}}),
        );
        let next = changed(
            &user,
            json!({"locale": null, "preferences": {"digest": null, "size": 12}}),
        );
        assert_eq!(next.display_name.as_deref(), Some("Alice"));
        assert_eq!(next.locale, None);
        assert_eq!(next.time_zone.as_deref(), Some("Europe/London"));
        assert_eq!(
            next.preferences,
            BTreeMap::from([("size".into(), json!(12)), ("theme".into(), json!("dark"))])
        );
        assert!(changed(&user, json!({"preferences": null}))
            .preferences
            .is_empty());
    }

    #[test]
    fn invalid_members_are_named() {
        let errors = patch(json!({
            "display_name": " ", "locale": "english", "time_zone": "Mars/Olympus",
            "preferences": {"Bad Key": 1}, "nickname": "x",
        }))
        .unwrap_err();
        let named: Vec<&str> = errors.keys().map(String::as_str).collect();
        assert_eq!(
            named,
            [
                "display_name",
                "locale",
                "nickname",
                "preferences",
                "time_zone"
            ]
        );
        assert!(patch(json!({"preferences": {"nested": {"a": 1}}})).is_err());
        assert!(patch(json!({"display_name": 5})).is_err());
        assert!(patch(json!({"locale": "zh-Hant-TW", "time_zone": "UTC"})).is_ok());
    }

    #[test]
    fn preferences_stay_bounded_after_merging() {
        let mut user = user();
        let full: serde_json::Map<String, Value> = (0..PREFERENCES_MAX)
            .map(|i| (format!("k{i}"), json!(i)))
            .collect();
        user.profile = changed(&user, json!({ "preferences": full }));
        let one_more = patch(json!({"preferences": {"extra": 1}})).unwrap();
        assert_eq!(
            change(&user, &one_more),
            Err(ProfileError::TooManyPreferences)
        );
        let swap = patch(json!({"preferences": {"k0": null, "extra": 1}})).unwrap();
        assert!(change(&user, &swap).is_ok());
    }

    #[test]
    fn a_deactivated_user_keeps_their_profile() {
        let user = User {
            status: Status::Deactivated,
            ..user()
        };
        assert_eq!(
            change(&user, &ProfilePatch::default()),
            Err(ProfileError::Domain(DomainError::Deactivated))
        );
    }
}
