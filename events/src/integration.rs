//! The public contract on Kafka: one CloudEvents 1.0 message per event, in the
//! Kafka binary binding (attributes as `ce_*` headers, the data as a JSON body).
//!
//! The body carries the user id, the stream version, the global position, the
//! time and the event's public data. Secrets never enter this type: it is built
//! from a [`RecordedEvent`] by dropping them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{self, DecodeError, RecordedEvent, UserEvent};
use crate::view::Profile;

pub const SPEC_VERSION: &str = "1.0";
pub const CONTENT_TYPE: &str = "application/json";

/// The public data of an event, by type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PublicChange {
    Registered {
        username: String,
        email: String,
    },
    Deactivated {
        reason: Option<String>,
    },
    Reactivated {
        reason: Option<String>,
    },
    PasswordCheckFailed,
    PasswordCheckSucceeded,
    Locked {
        until: DateTime<Utc>,
    },
    Unlocked {
        reason: Option<String>,
    },
    /// Only that it changed: the hash stays on the write side.
    PasswordChanged,
    /// Only that it was rehashed: the hash stays on the write side.
    PasswordRehashed,
    RoleGranted {
        role: String,
    },
    RoleRevoked {
        role: String,
    },
    /// The whole profile after the change.
    ProfileChanged(Profile),
    /// A code went to `email` (sealed in the log, not here).
    EmailVerificationRequested {
        email: String,
        expires_at: DateTime<Utc>,
    },
    EmailCodeFailed,
    EmailVerified {
        email: String,
    },
    /// A reset code went to `email` (sealed in the log, not here).
    PasswordResetRequested {
        email: String,
        expires_at: DateTime<Utc>,
    },
    PasswordResetFailed,
    /// Only that it was reset: the hash stays on the write side.
    PasswordReset,
}

/// One row of the `events_public` view (the log without secrets), as read.
#[derive(Debug, Clone, PartialEq)]
pub struct PublicRow {
    pub global_position: i64,
    pub stream_id: Uuid,
    pub stream_version: i32,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i16,
    pub payload: serde_json::Value,
    pub recorded_at: DateTime<Utc>,
}

/// One message on the topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegrationEvent {
    pub event_id: Uuid,
    pub user_id: Uuid,
    pub stream_version: i32,
    pub global_position: i64,
    pub occurred_at: DateTime<Utc>,
    pub change: PublicChange,
}

/// The JSON body of a message. Readers ignore fields they do not know, so the
/// producer may add fields without breaking consumers.
#[derive(Debug, Serialize, Deserialize)]
struct Body<D> {
    user_id: Uuid,
    stream_version: i32,
    global_position: i64,
    occurred_at: DateTime<Utc>,
    data: D,
}

#[derive(Serialize, Deserialize)]
struct RegisteredData {
    username: String,
    email: String,
}

#[derive(Serialize, Deserialize)]
struct ReasonData {
    reason: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct LockedData {
    until: DateTime<Utc>,
}

#[derive(Serialize, Deserialize)]
struct RoleData {
    role: String,
}

#[derive(Serialize, Deserialize)]
struct EmailData {
    email: String,
}

#[derive(Serialize, Deserialize)]
struct CodeSentData {
    email: String,
    expires_at: DateTime<Utc>,
}

/// The `data` of events that carry nothing public beyond their type.
#[derive(Serialize, Deserialize)]
struct NoData {}

/// Why a message could not be read as an integration event.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("unknown ce_type {0:?}")]
    UnknownType(String),
    #[error("ce_id {0:?} is not a uuid")]
    BadId(String),
    #[error("malformed body")]
    Body(#[from] serde_json::Error),
}

/// `ce_type` of every public change, and how its `data` is read: the one
/// table the producer's and the readers' code is written from.
macro_rules! public_types {
    ($($const:ident = $ce_type:literal, $event_type:literal:
        $pattern:pat => $data:expr, |$d:ident: $data_type:ty| $change:expr;)+) => {
        impl IntegrationEvent {
            $(pub const $const: &'static str = $ce_type;)+

            /// Every `ce_type` this build produces and reads.
            pub const TYPES: &'static [&'static str] = &[$($ce_type),+];

            /// The `ce_type` attribute.
            pub fn ce_type(&self) -> &'static str {
                #[allow(unused_variables)]
                match &self.change {
                    $($pattern => $ce_type,)+
                }
            }

            /// The JSON body.
            pub fn body(&self) -> Vec<u8> {
                match &self.change {
                    $($pattern => self.encode($data),)+
                }
            }

            /// The body's `data`: the event's public data.
            pub fn data(&self) -> serde_json::Value {
                let data = match &self.change {
                    $($pattern => serde_json::to_value($data),)+
                };
                data.expect("integration events serialise to JSON")
            }

            /// The change from a `data` value, by `ce_type`.
            fn change_from_ce(
                ce_type: &str,
                data: serde_json::Value,
            ) -> Result<Option<PublicChange>, serde_json::Error> {
                Ok(Some(match ce_type {
                    $($ce_type => {
                        let $d: $data_type = serde_json::from_value(data)?;
                        $change
                    })+
                    _ => return Ok(None),
                }))
            }

            /// The change from a payload of `events_public`, by `event_type`.
            fn change_from_log(
                event_type: &str,
                payload: serde_json::Value,
            ) -> Result<Option<PublicChange>, serde_json::Error> {
                Ok(Some(match event_type {
                    $($event_type => {
                        let $d: $data_type = serde_json::from_value(payload)?;
                        $change
                    })+
                    _ => return Ok(None),
                }))
            }
        }
    };
}

public_types! {
    TYPE_REGISTERED = "user.registered.v1", "UserRegistered":
        PublicChange::Registered { username, email } => RegisteredData {
            username: username.clone(),
            email: email.clone(),
        },
        |d: RegisteredData| PublicChange::Registered { username: d.username, email: d.email };
    TYPE_DEACTIVATED = "user.deactivated.v1", "UserDeactivated":
        PublicChange::Deactivated { reason } => ReasonData { reason: reason.clone() },
        |d: ReasonData| PublicChange::Deactivated { reason: d.reason };
    TYPE_REACTIVATED = "user.reactivated.v1", "UserReactivated":
        PublicChange::Reactivated { reason } => ReasonData { reason: reason.clone() },
        |d: ReasonData| PublicChange::Reactivated { reason: d.reason };
    TYPE_PASSWORD_CHECK_FAILED = "user.password_check_failed.v1", "PasswordCheckFailed":
        PublicChange::PasswordCheckFailed => NoData {},
        |_d: NoData| PublicChange::PasswordCheckFailed;
    TYPE_PASSWORD_CHECK_SUCCEEDED = "user.password_check_succeeded.v1", "PasswordCheckSucceeded":
        PublicChange::PasswordCheckSucceeded => NoData {},
        |_d: NoData| PublicChange::PasswordCheckSucceeded;
    TYPE_LOCKED = "user.locked.v1", "UserLocked":
        PublicChange::Locked { until } => LockedData { until: *until },
        |d: LockedData| PublicChange::Locked { until: d.until };
    TYPE_UNLOCKED = "user.unlocked.v1", "UserUnlocked":
        PublicChange::Unlocked { reason } => ReasonData { reason: reason.clone() },
        |d: ReasonData| PublicChange::Unlocked { reason: d.reason };
    TYPE_PASSWORD_CHANGED = "user.password_changed.v1", "PasswordChanged":
        PublicChange::PasswordChanged => NoData {},
        |_d: NoData| PublicChange::PasswordChanged;
    TYPE_PASSWORD_REHASHED = "user.password_rehashed.v1", "PasswordRehashed":
        PublicChange::PasswordRehashed => NoData {},
        |_d: NoData| PublicChange::PasswordRehashed;
    TYPE_ROLE_GRANTED = "user.role_granted.v1", "RoleGranted":
        PublicChange::RoleGranted { role } => RoleData { role: role.clone() },
        |d: RoleData| PublicChange::RoleGranted { role: d.role };
    TYPE_ROLE_REVOKED = "user.role_revoked.v1", "RoleRevoked":
        PublicChange::RoleRevoked { role } => RoleData { role: role.clone() },
        |d: RoleData| PublicChange::RoleRevoked { role: d.role };
    TYPE_PROFILE_CHANGED = "user.profile_changed.v1", "ProfileChanged":
        PublicChange::ProfileChanged(profile) => profile,
        |d: Profile| PublicChange::ProfileChanged(d);
    TYPE_EMAIL_VERIFICATION_REQUESTED = "user.email_verification_requested.v1", "EmailVerificationRequested":
        PublicChange::EmailVerificationRequested { email, expires_at } => CodeSentData {
            email: email.clone(),
            expires_at: *expires_at,
        },
        |d: CodeSentData| PublicChange::EmailVerificationRequested { email: d.email, expires_at: d.expires_at };
    TYPE_EMAIL_CODE_FAILED = "user.email_code_failed.v1", "EmailCodeFailed":
        PublicChange::EmailCodeFailed => NoData {},
        |_d: NoData| PublicChange::EmailCodeFailed;
    TYPE_EMAIL_VERIFIED = "user.email_verified.v1", "EmailVerified":
        PublicChange::EmailVerified { email } => EmailData { email: email.clone() },
        |d: EmailData| PublicChange::EmailVerified { email: d.email };
    TYPE_PASSWORD_RESET_REQUESTED = "user.password_reset_requested.v1", "PasswordResetRequested":
        PublicChange::PasswordResetRequested { email, expires_at } => CodeSentData {
            email: email.clone(),
            expires_at: *expires_at,
        },
        |d: CodeSentData| PublicChange::PasswordResetRequested { email: d.email, expires_at: d.expires_at };
    TYPE_PASSWORD_RESET_FAILED = "user.password_reset_failed.v1", "PasswordResetFailed":
        PublicChange::PasswordResetFailed => NoData {},
        |_d: NoData| PublicChange::PasswordResetFailed;
    TYPE_PASSWORD_RESET = "user.password_reset.v1", "PasswordReset":
        PublicChange::PasswordReset => NoData {},
        |_d: NoData| PublicChange::PasswordReset;
}

impl IntegrationEvent {
    /// The public form of a stored event (secrets stay behind).
    pub fn from_recorded(recorded: &RecordedEvent) -> Self {
        let change = match &recorded.event {
            UserEvent::Registered(e) => PublicChange::Registered {
                username: e.username.clone(),
                email: e.email.clone(),
            },
            UserEvent::Deactivated(e) => PublicChange::Deactivated {
                reason: e.reason.clone(),
            },
            UserEvent::Reactivated(e) => PublicChange::Reactivated {
                reason: e.reason.clone(),
            },
            UserEvent::PasswordCheckFailed(_) => PublicChange::PasswordCheckFailed,
            UserEvent::PasswordCheckSucceeded(_) => PublicChange::PasswordCheckSucceeded,
            UserEvent::Locked(e) => PublicChange::Locked { until: e.until },
            UserEvent::Unlocked(e) => PublicChange::Unlocked {
                reason: e.reason.clone(),
            },
            UserEvent::PasswordChanged(_) => PublicChange::PasswordChanged,
            UserEvent::PasswordRehashed(_) => PublicChange::PasswordRehashed,
            UserEvent::RoleGranted(e) => PublicChange::RoleGranted {
                role: e.role.clone(),
            },
            UserEvent::RoleRevoked(e) => PublicChange::RoleRevoked {
                role: e.role.clone(),
            },
            UserEvent::ProfileChanged(e) => PublicChange::ProfileChanged(Profile::from(e)),
            UserEvent::EmailVerificationRequested(e) => PublicChange::EmailVerificationRequested {
                email: e.email.clone(),
                expires_at: e.expires_at,
            },
            UserEvent::EmailCodeFailed(_) => PublicChange::EmailCodeFailed,
            UserEvent::EmailVerified(e) => PublicChange::EmailVerified {
                email: e.email.clone(),
            },
            UserEvent::PasswordResetRequested(e) => PublicChange::PasswordResetRequested {
                email: e.email.clone(),
                expires_at: e.expires_at,
            },
            UserEvent::PasswordResetFailed(_) => PublicChange::PasswordResetFailed,
            UserEvent::PasswordReset(_) => PublicChange::PasswordReset,
        };
        Self {
            event_id: recorded.event_id,
            user_id: recorded.stream_id,
            stream_version: recorded.stream_version,
            global_position: recorded.global_position,
            occurred_at: recorded.recorded_at,
            change,
        }
    }

    /// The public form of a row of the `events_public` view, whose payload
    /// has no secrets: the read side's way into the log. Older schema
    /// versions are upcast first; unknown payload fields are ignored.
    pub fn from_public_row(row: PublicRow) -> Result<Self, DecodeError> {
        let payload = domain::upcast_checked(&row.event_type, row.schema_version, row.payload)?;
        let change = Self::change_from_log(&row.event_type, payload)
            .map_err(|source| DecodeError::Payload {
                event_type: row.event_type.clone(),
                source,
            })?
            .ok_or_else(|| DecodeError::UnknownType(row.event_type.clone()))?;
        Ok(Self {
            event_id: row.event_id,
            user_id: row.stream_id,
            stream_version: row.stream_version,
            global_position: row.global_position,
            occurred_at: row.recorded_at,
            change,
        })
    }

    /// The Kafka message key: the user id, so one user's events share a partition.
    pub fn key(&self) -> String {
        self.user_id.to_string()
    }

    /// The CloudEvents attributes as Kafka headers (binary content mode).
    pub fn headers(&self, source: &str) -> [(&'static str, String); 7] {
        [
            ("ce_specversion", SPEC_VERSION.to_owned()),
            ("ce_id", self.event_id.to_string()),
            ("ce_type", self.ce_type().to_owned()),
            ("ce_source", source.to_owned()),
            (
                "ce_time",
                self.occurred_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ),
            ("ce_subject", self.user_id.to_string()),
            ("content-type", CONTENT_TYPE.to_owned()),
        ]
    }

    fn encode<D: Serialize>(&self, data: D) -> Vec<u8> {
        let body = Body {
            user_id: self.user_id,
            stream_version: self.stream_version,
            global_position: self.global_position,
            occurred_at: self.occurred_at,
            data,
        };
        serde_json::to_vec(&body).expect("integration events serialise to JSON")
    }

    /// Reads a message back from its `ce_id`, `ce_type` and body.
    pub fn decode(ce_id: &str, ce_type: &str, body: &[u8]) -> Result<Self, MessageError> {
        let event_id = Uuid::parse_str(ce_id).map_err(|_| MessageError::BadId(ce_id.to_owned()))?;
        let raw: Body<serde_json::Value> = serde_json::from_slice(body)?;
        let change = Self::change_from_ce(ce_type, raw.data)?
            .ok_or_else(|| MessageError::UnknownType(ce_type.to_owned()))?;
        Ok(Self {
            event_id,
            user_id: raw.user_id,
            stream_version: raw.stream_version,
            global_position: raw.global_position,
            occurred_at: raw.occurred_at,
            change,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{PasswordHash, SealedCode, UserDeactivated, UserRegistered};

    fn recorded(event: UserEvent) -> RecordedEvent {
        RecordedEvent {
            global_position: 42,
            stream_id: Uuid::new_v4(),
            stream_version: 1,
            event_id: Uuid::new_v4(),
            recorded_at: Utc::now(),
            event,
        }
    }

    #[test]
    fn registered_message_has_no_password_hash_and_round_trips() {
        let stored = recorded(UserEvent::Registered(UserRegistered {
            username: "alice".into(),
            email: "alice@example.com".into(),
            password_hash: PasswordHash::new("$argon2id$v=19$m=19456,t=2,p=1$salt$hash".into()),
            sealed_code: Some(SealedCode::new("v1.sealed-code".into())),
            code_expires_at: Some(Utc::now()),
        }));
        let public = IntegrationEvent::from_recorded(&stored);
        let body = public.body();
        assert!(!String::from_utf8_lossy(&body).contains("argon2"));
        assert!(!String::from_utf8_lossy(&body).contains("sealed"));

        let headers = public.headers("urn:test");
        let get = |k: &str| headers.iter().find(|(n, _)| *n == k).unwrap().1.clone();
        assert_eq!(get("ce_type"), "user.registered.v1");
        assert_eq!(get("ce_subject"), stored.stream_id.to_string());
        let back = IntegrationEvent::decode(&get("ce_id"), &get("ce_type"), &body).unwrap();
        assert_eq!(back, public);
    }

    #[test]
    fn decode_uses_the_type_header_to_tell_events_apart() {
        let public =
            IntegrationEvent::from_recorded(&recorded(UserEvent::Deactivated(UserDeactivated {
                reason: None,
            })));
        let id = public.event_id.to_string();
        let as_reactivated =
            IntegrationEvent::decode(&id, IntegrationEvent::TYPE_REACTIVATED, &public.body())
                .unwrap();
        assert_eq!(
            as_reactivated.change,
            PublicChange::Reactivated { reason: None }
        );
        assert!(matches!(
            IntegrationEvent::decode(&id, "user.renamed.v1", &public.body()),
            Err(MessageError::UnknownType(_))
        ));
        assert!(matches!(
            IntegrationEvent::decode(&id, IntegrationEvent::TYPE_REGISTERED, &public.body()),
            Err(MessageError::Body(_))
        ));
    }

    #[test]
    fn readers_ignore_fields_they_do_not_know() {
        let id = Uuid::new_v4();
        let body = serde_json::json!({
            "user_id": Uuid::new_v4(),
            "stream_version": 2,
            "global_position": 7,
            "occurred_at": "2026-11-21T10:00:00Z",
            "trace": {"added": "later"},
            "data": {"reason": "spam", "ticket": 42},
        });
        let event = IntegrationEvent::decode(
            &id.to_string(),
            IntegrationEvent::TYPE_DEACTIVATED,
            body.to_string().as_bytes(),
        )
        .unwrap();
        assert_eq!(
            event.change,
            PublicChange::Deactivated {
                reason: Some("spam".into())
            }
        );
    }

    #[test]
    fn a_public_row_gives_the_same_event_as_the_stored_one() {
        let stored = recorded(UserEvent::Registered(UserRegistered {
            username: "alice".into(),
            email: "alice@example.com".into(),
            password_hash: PasswordHash::new("$argon2id$v=19$secret".into()),
            sealed_code: None,
            code_expires_at: None,
        }));
        let mut payload = stored.event.payload();
        payload.as_object_mut().unwrap().remove("password_hash");
        let row = PublicRow {
            global_position: stored.global_position,
            stream_id: stored.stream_id,
            stream_version: stored.stream_version,
            event_id: stored.event_id,
            event_type: UserEvent::REGISTERED.into(),
            schema_version: 1,
            payload,
            recorded_at: stored.recorded_at,
        };
        assert_eq!(
            IntegrationEvent::from_public_row(row.clone()).unwrap(),
            IntegrationEvent::from_recorded(&stored)
        );
        let unknown = PublicRow {
            event_type: "UserRenamed".into(),
            ..row
        };
        assert!(matches!(
            IntegrationEvent::from_public_row(unknown),
            Err(DecodeError::UnknownType(_))
        ));
    }
}
