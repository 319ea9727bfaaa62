//! Domain events as stored in the `events` table.
//!
//! Each variant is stored as `event_type` + `schema_version` + a JSON `payload`.
//! Reading goes through [`UserEvent::decode`], which upcasts older payloads to the
//! current schema first, so stored history never has to be rewritten.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An argon2id PHC string. It never prints and is never part of a public event.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PasswordHash(String);

impl PasswordHash {
    pub fn new(phc: String) -> Self {
        Self(phc)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHash(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserRegistered {
    pub username: String,
    pub email: String,
    pub password_hash: PasswordHash,
    /// The code that verifies `email`, sealed (see [`crate::codes`]); absent
    /// from registrations made before email verification existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_code: Option<SealedCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_expires_at: Option<DateTime<Utc>>,
}

/// A code that goes by mail, encrypted so that only the write side and the
/// notifier can read it ([`crate::codes`]). Stored under the payload key
/// `sealed_code`, which `events_public` drops: it never reaches the topic, a
/// read model or Redis. It never prints.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SealedCode(String);

impl SealedCode {
    pub fn new(sealed: String) -> Self {
        Self(sealed)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SealedCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealedCode(<redacted>)")
    }
}

/// The user's profile as it is after a change: every field, not only the
/// changed ones, so a reader needs no earlier event to know it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileChanged {
    pub display_name: Option<String>,
    /// A BCP 47 language tag.
    pub locale: Option<String>,
    /// An IANA time zone name.
    pub time_zone: Option<String>,
    /// Small client-defined settings: string keys, scalar values.
    #[serde(default)]
    pub preferences: std::collections::BTreeMap<String, serde_json::Value>,
}

/// A code was issued to prove control of `email`: a new address the user
/// asked to change to (reserved like a registration's), or the current one
/// again. It replaces any earlier code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailVerificationRequested {
    pub email: String,
    pub sealed_code: SealedCode,
    pub expires_at: DateTime<Utc>,
}

/// A wrong email verification code was tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailCodeFailed {}

/// The code was confirmed: `email` is the user's verified address (when it
/// differs from the current one, this is the swap of an email change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailVerified {
    pub email: String,
}

/// A password reset was asked for: a code went to `email`. It replaces any
/// earlier reset code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordResetRequested {
    pub email: String,
    pub sealed_code: SealedCode,
    pub expires_at: DateTime<Utc>,
}

/// A wrong password reset code was tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordResetFailed {}

/// The password was reset with a mailed code. It also lifts a lock from
/// failed password checks (see ARCHITECTURE.md, "Mail").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordReset {
    pub password_hash: PasswordHash,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDeactivated {
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserReactivated {
    pub reason: Option<String>,
}

/// A password check failed. Consecutive failures are counted from the stream
/// and lead to [`UserLocked`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordCheckFailed {}

/// A password check succeeded after failures: the count starts again. Recorded
/// only when it ends a run of failures, so an ordinary sign-in appends nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordCheckSucceeded {}

/// Too many consecutive failed password checks: no password is checked for
/// this user until `until` (or an administrator's [`UserUnlocked`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserLocked {
    pub until: DateTime<Utc>,
}

/// An administrator lifted a lock before it ran out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserUnlocked {
    pub reason: Option<String>,
}

/// The user chose a new password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordChanged {
    pub password_hash: PasswordHash,
}

/// The same password, hashed again under the current argon2 parameters at a
/// successful sign-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordRehashed {
    pub password_hash: PasswordHash,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleGranted {
    pub role: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleRevoked {
    pub role: String,
}

/// Everything that can happen to a user, in the past tense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserEvent {
    Registered(UserRegistered),
    Deactivated(UserDeactivated),
    Reactivated(UserReactivated),
    PasswordCheckFailed(PasswordCheckFailed),
    PasswordCheckSucceeded(PasswordCheckSucceeded),
    Locked(UserLocked),
    Unlocked(UserUnlocked),
    PasswordChanged(PasswordChanged),
    PasswordRehashed(PasswordRehashed),
    RoleGranted(RoleGranted),
    RoleRevoked(RoleRevoked),
    ProfileChanged(ProfileChanged),
    EmailVerificationRequested(EmailVerificationRequested),
    EmailCodeFailed(EmailCodeFailed),
    EmailVerified(EmailVerified),
    PasswordResetRequested(PasswordResetRequested),
    PasswordResetFailed(PasswordResetFailed),
    PasswordReset(PasswordReset),
}

/// Every stored event type, with its variant: the one table that
/// [`UserEvent::event_type`], [`UserEvent::payload`] and [`UserEvent::decode`]
/// are written from.
macro_rules! event_types {
    ($($variant:ident => $name:literal),+ $(,)?) => {
        impl UserEvent {
            /// Every `event_type` this build writes and reads.
            pub const TYPES: &'static [&'static str] = &[$($name),+];

            /// The `event_type` column.
            pub fn event_type(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => $name,)+
                }
            }

            /// The `payload` column.
            pub fn payload(&self) -> serde_json::Value {
                let encoded = match self {
                    $(Self::$variant(e) => serde_json::to_value(e),)+
                };
                // Serialising plain structs of strings and times cannot fail.
                encoded.expect("event payloads serialise to JSON")
            }

            fn decode_current(
                event_type: &str,
                payload: serde_json::Value,
            ) -> Result<Self, DecodeError> {
                let malformed = |source| DecodeError::Payload {
                    event_type: event_type.to_owned(),
                    source,
                };
                Ok(match event_type {
                    $($name => Self::$variant(serde_json::from_value(payload).map_err(malformed)?),)+
                    other => return Err(DecodeError::UnknownType(other.to_owned())),
                })
            }
        }
    };
}

event_types! {
    Registered => "UserRegistered",
    Deactivated => "UserDeactivated",
    Reactivated => "UserReactivated",
    PasswordCheckFailed => "PasswordCheckFailed",
    PasswordCheckSucceeded => "PasswordCheckSucceeded",
    Locked => "UserLocked",
    Unlocked => "UserUnlocked",
    PasswordChanged => "PasswordChanged",
    PasswordRehashed => "PasswordRehashed",
    RoleGranted => "RoleGranted",
    RoleRevoked => "RoleRevoked",
    ProfileChanged => "ProfileChanged",
    EmailVerificationRequested => "EmailVerificationRequested",
    EmailCodeFailed => "EmailCodeFailed",
    EmailVerified => "EmailVerified",
    PasswordResetRequested => "PasswordResetRequested",
    PasswordResetFailed => "PasswordResetFailed",
    PasswordReset => "PasswordReset",
}

/// Why a stored event could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("{event_type} has schema version {found}, newer than this build knows ({known})")]
    FutureSchema {
        event_type: String,
        found: i16,
        known: i16,
    },
    #[error("malformed {event_type} payload")]
    Payload {
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
}

impl UserEvent {
    pub const REGISTERED: &'static str = "UserRegistered";
    pub const DEACTIVATED: &'static str = "UserDeactivated";
    pub const REACTIVATED: &'static str = "UserReactivated";

    /// The `schema_version` written for this event type today.
    pub fn current_schema_version(event_type: &str) -> Option<i16> {
        Self::TYPES.contains(&event_type).then_some(1)
    }

    /// Reads a stored event, upcasting older schema versions to the current one.
    pub fn decode(
        event_type: &str,
        schema_version: i16,
        payload: serde_json::Value,
    ) -> Result<Self, DecodeError> {
        let payload = upcast_checked(event_type, schema_version, payload)?;
        Self::decode_current(event_type, payload)
    }
}

/// Refuses unknown types and schemas newer than this build, then upcasts.
pub(crate) fn upcast_checked(
    event_type: &str,
    schema_version: i16,
    payload: serde_json::Value,
) -> Result<serde_json::Value, DecodeError> {
    let known = UserEvent::current_schema_version(event_type)
        .ok_or_else(|| DecodeError::UnknownType(event_type.to_owned()))?;
    if schema_version > known {
        return Err(DecodeError::FutureSchema {
            event_type: event_type.to_owned(),
            found: schema_version,
            known,
        });
    }
    Ok(upcast(event_type, schema_version, payload))
}

/// Brings a payload written under an older `schema_version` up to the current
/// one, one version step at a time, so stored history is never rewritten.
fn upcast(event_type: &str, from: i16, mut payload: serde_json::Value) -> serde_json::Value {
    let current = UserEvent::current_schema_version(event_type).unwrap_or(from);
    for version in from..current {
        payload = match (event_type, version) {
            (UserEvent::REGISTERED, 0) => registered_v0_to_v1(payload),
            // No shape change between these versions.
            _ => payload,
        };
    }
    payload
}

/// How usernames and email addresses are stored, compared and looked up:
/// surrounding ASCII whitespace trimmed, ASCII letters lower-cased, nothing
/// else changed. Only ASCII is mapped, so no other character can turn into an
/// allowed one (under Unicode rules the Kelvin sign `K` lower-cases to `k`),
/// and the APIs' documents can state exactly what is accepted.
pub fn normalise(raw: &str) -> String {
    raw.trim_ascii().to_ascii_lowercase()
}

/// UserRegistered v0 was the pre-release draft: the address was stored as
/// typed under `email_address`. v1 names it `email` and stores it normalised
/// (trimmed, lower-case), which is what uniqueness is decided on. The
/// migrations only admit v1 rows; this step is the worked example of the hook
/// that the next payload change will extend.
fn registered_v0_to_v1(mut payload: serde_json::Value) -> serde_json::Value {
    if let Some(object) = payload.as_object_mut() {
        if let Some(serde_json::Value::String(address)) = object.remove("email_address") {
            object.insert(
                "email".into(),
                serde_json::Value::String(normalise(&address)),
            );
        }
    }
    payload
}

/// Who caused an event and in answer to what; stored in the `metadata` column.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// The request id of the HTTP request that caused the event.
    pub correlation_id: Option<String>,
    /// The id of the message that directly caused this one, when it was another event.
    pub causation_id: Option<String>,
    /// The acting principal: `anonymous` for self-registration and sign-in,
    /// `bootstrap` for the `ADMIN_TOKEN`, otherwise the acting user's id.
    pub actor: String,
    /// The client's `Idempotency-Key`, when one was sent.
    pub idempotency_key: Option<String>,
}

/// One row of the log, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub global_position: i64,
    pub stream_id: Uuid,
    pub stream_version: i32,
    pub event_id: Uuid,
    pub recorded_at: DateTime<Utc>,
    pub event: UserEvent,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered() -> UserEvent {
        UserEvent::Registered(UserRegistered {
            username: "alice".into(),
            email: "alice@example.com".into(),
            password_hash: PasswordHash::new("$argon2id$v=19$secret".into()),
            sealed_code: Some(SealedCode::new("v1.sealed".into())),
            code_expires_at: Some("2026-12-04T10:00:00Z".parse().unwrap()),
        })
    }

    #[test]
    fn every_event_round_trips_through_its_stored_form() {
        let all = [
            registered(),
            UserEvent::Deactivated(UserDeactivated {
                reason: Some("spam".into()),
            }),
            UserEvent::Reactivated(UserReactivated { reason: None }),
            UserEvent::PasswordCheckFailed(PasswordCheckFailed {}),
            UserEvent::PasswordCheckSucceeded(PasswordCheckSucceeded {}),
            UserEvent::Locked(UserLocked {
                until: "2026-12-03T10:00:00Z".parse().unwrap(),
            }),
            UserEvent::Unlocked(UserUnlocked {
                reason: Some("verified by phone".into()),
            }),
            UserEvent::PasswordChanged(PasswordChanged {
                password_hash: PasswordHash::new("$argon2id$v=19$new".into()),
            }),
            UserEvent::PasswordRehashed(PasswordRehashed {
                password_hash: PasswordHash::new("$argon2id$v=19$again".into()),
            }),
            UserEvent::RoleGranted(RoleGranted {
                role: "admin".into(),
            }),
            UserEvent::RoleRevoked(RoleRevoked {
                role: "admin".into(),
            }),
            UserEvent::ProfileChanged(ProfileChanged {
                display_name: Some("Alice".into()),
                locale: Some("en-GB".into()),
                time_zone: None,
                preferences: [("theme".to_owned(), serde_json::json!("dark"))].into(),
            }),
            UserEvent::EmailVerificationRequested(EmailVerificationRequested {
                email: "alice@new.example".into(),
                sealed_code: SealedCode::new("v1.sealed".into()),
                expires_at: "2026-12-04T10:00:00Z".parse().unwrap(),
            }),
            UserEvent::EmailCodeFailed(EmailCodeFailed {}),
            UserEvent::EmailVerified(EmailVerified {
                email: "alice@new.example".into(),
            }),
            UserEvent::PasswordResetRequested(PasswordResetRequested {
                email: "alice@example.com".into(),
                sealed_code: SealedCode::new("v1.sealed".into()),
                expires_at: "2026-12-04T10:00:00Z".parse().unwrap(),
            }),
            UserEvent::PasswordResetFailed(PasswordResetFailed {}),
            UserEvent::PasswordReset(PasswordReset {
                password_hash: PasswordHash::new("$argon2id$v=19$reset".into()),
            }),
        ];
        assert_eq!(all.len(), UserEvent::TYPES.len(), "one example per type");
        for event in all {
            let version = UserEvent::current_schema_version(event.event_type()).unwrap();
            let back = UserEvent::decode(event.event_type(), version, event.payload()).unwrap();
            assert_eq!(back, event);
        }
    }

    #[test]
    fn password_hash_and_sealed_code_never_show_in_debug_output() {
        let shown = format!("{:?}", registered());
        assert!(!shown.contains("$argon2"));
        assert!(!shown.contains("v1.sealed"));
    }

    #[test]
    fn a_v0_registration_is_upcast_to_v1_when_read() {
        let v0 = serde_json::json!({
            "username": "alice",
            "email_address": " Alice@Example.COM ",
            "password_hash": "$argon2id$v=19$secret",
        });
        let event = UserEvent::decode(UserEvent::REGISTERED, 0, v0).unwrap();
        let UserEvent::Registered(registered) = event else {
            panic!("expected UserRegistered");
        };
        assert_eq!(registered.email, "alice@example.com");
        assert_eq!(registered.username, "alice");
        // v1 payloads pass through unchanged.
        let v1 = registered_event_payload();
        assert_eq!(
            UserEvent::decode(UserEvent::REGISTERED, 1, v1.clone())
                .unwrap()
                .payload(),
            v1
        );
    }

    fn registered_event_payload() -> serde_json::Value {
        registered().payload()
    }

    #[test]
    fn decode_refuses_unknown_types_and_future_schemas() {
        let payload = serde_json::json!({});
        assert!(matches!(
            UserEvent::decode("UserRenamed", 1, payload.clone()),
            Err(DecodeError::UnknownType(_))
        ));
        assert!(matches!(
            UserEvent::decode(UserEvent::DEACTIVATED, 2, payload),
            Err(DecodeError::FutureSchema { found: 2, .. })
        ));
    }
}
