//! The user read model and the pure projection that builds it.
//!
//! [`project`] decides what one event does to the current view: apply it when it
//! is the next version, skip it when it was already applied (Kafka delivers at
//! least once), and report a gap when versions are missing, so the caller can
//! surface it instead of papering over it.

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use std::collections::BTreeMap;

use crate::domain::ProfileChanged;
use crate::integration::{IntegrationEvent, PublicChange};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserStatus {
    Active,
    Deactivated,
}

impl UserStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Deactivated => "deactivated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "deactivated" => Some(Self::Deactivated),
            _ => None,
        }
    }
}

/// What a user tells about themself: all optional, set with
/// `PATCH /users/{id}/profile`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub display_name: Option<String>,
    /// A BCP 47 language tag.
    pub locale: Option<String>,
    /// An IANA time zone name.
    pub time_zone: Option<String>,
    /// Small client-defined settings: string keys, scalar values.
    #[serde(default)]
    pub preferences: BTreeMap<String, serde_json::Value>,
}

impl From<&ProfileChanged> for Profile {
    fn from(e: &ProfileChanged) -> Self {
        Self {
            display_name: e.display_name.clone(),
            locale: e.locale.clone(),
            time_zone: e.time_zone.clone(),
            preferences: e.preferences.clone(),
        }
    }
}

/// What the query API serves for one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserView {
    pub id: Uuid,
    /// Normalised (trimmed, lower-case).
    pub username: String,
    /// Normalised (trimmed, lower-case).
    pub email: String,
    pub status: UserStatus,
    /// The user's stream version this view reflects; also the `ETag`.
    pub version: i32,
    pub registered_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The roles granted and not revoked, sorted.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Set while a lock from failed password checks may be in force: no
    /// password is checked before this time (unless an administrator unlocks).
    #[serde(default)]
    pub locked_until: Option<DateTime<Utc>>,
    /// Whether `email` was confirmed with a mailed code.
    #[serde(default)]
    pub email_verified: bool,
    #[serde(default)]
    pub profile: Profile,
}

impl UserView {
    /// Whether a lock is in force at `now`.
    pub fn locked_at(&self, now: DateTime<Utc>) -> bool {
        self.locked_until.is_some_and(|until| until > now)
    }
}

/// What one event does to a view.
// A Projection is returned and matched at once, never stored or collected,
// so the size of `Apply` costs nothing; boxing it would cost an allocation
// per applied event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Projection {
    /// The event is the next one: this is the new view.
    Apply(UserView),
    /// The view already includes this event (a redelivery).
    AlreadyApplied,
    /// Versions are missing between the view and the event.
    Gap { current: i32, event: i32 },
    /// The event cannot follow the view (e.g. a second UserRegistered, or a
    /// status change of a user the view has never seen at version 0).
    Invalid { current: i32, event: i32 },
}

/// Decides the effect of `event` on `current` (None: no view yet).
pub fn project(current: Option<&UserView>, event: &IntegrationEvent) -> Projection {
    let current_version = current.map_or(0, |v| v.version);
    if event.stream_version <= current_version {
        return Projection::AlreadyApplied;
    }
    if event.stream_version > current_version + 1 {
        return Projection::Gap {
            current: current_version,
            event: event.stream_version,
        };
    }
    let invalid = Projection::Invalid {
        current: current_version,
        event: event.stream_version,
    };
    match (current, &event.change) {
        (None, PublicChange::Registered { username, email }) => Projection::Apply(UserView {
            id: event.user_id,
            username: username.clone(),
            email: email.clone(),
            status: UserStatus::Active,
            version: event.stream_version,
            registered_at: event.occurred_at,
            updated_at: event.occurred_at,
            roles: Vec::new(),
            locked_until: None,
            email_verified: false,
            profile: Profile::default(),
        }),
        (Some(view), change) => {
            let mut next = UserView {
                version: event.stream_version,
                updated_at: event.occurred_at,
                ..view.clone()
            };
            match change {
                PublicChange::Registered { .. } => return invalid,
                PublicChange::Deactivated { .. } => next.status = UserStatus::Deactivated,
                PublicChange::Reactivated { .. } => next.status = UserStatus::Active,
                // At the read model's precision (PostgreSQL keeps
                // microseconds): the view a row, a COPY and a Redis body
                // hold must be one and the same, and `until` comes from a
                // payload, which may carry nanoseconds.
                PublicChange::Locked { until } => next.locked_until = Some(until.trunc_subsecs(6)),
                PublicChange::Unlocked { .. } => next.locked_until = None,
                PublicChange::RoleGranted { role } => {
                    if let Err(at) = next.roles.binary_search(role) {
                        next.roles.insert(at, role.clone());
                    }
                }
                PublicChange::RoleRevoked { role } => next.roles.retain(|r| r != role),
                PublicChange::ProfileChanged(profile) => next.profile = profile.clone(),
                PublicChange::EmailVerified { email } => {
                    next.email = email.clone();
                    next.email_verified = true;
                }
                // Proving control of the mailbox is as strong as the
                // password the lock protects.
                PublicChange::PasswordReset => next.locked_until = None,
                PublicChange::EmailVerificationRequested { .. }
                | PublicChange::EmailCodeFailed
                | PublicChange::PasswordResetRequested { .. }
                | PublicChange::PasswordResetFailed
                | PublicChange::PasswordCheckFailed
                | PublicChange::PasswordCheckSucceeded
                | PublicChange::PasswordChanged
                | PublicChange::PasswordRehashed => {}
            }
            Projection::Apply(next)
        }
        _ => invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(version: i32, change: PublicChange) -> IntegrationEvent {
        IntegrationEvent {
            event_id: Uuid::new_v4(),
            user_id: Uuid::nil(),
            stream_version: version,
            global_position: i64::from(version),
            occurred_at: Utc::now(),
            change,
        }
    }

    fn registered() -> IntegrationEvent {
        event(
            1,
            PublicChange::Registered {
                username: "alice".into(),
                email: "alice@example.com".into(),
            },
        )
    }

    fn applied(p: Projection) -> UserView {
        match p {
            Projection::Apply(v) => v,
            other => panic!("expected Apply, got {other:?}"),
        }
    }

    #[test]
    fn registration_then_deactivation_builds_a_deactivated_view() {
        let v1 = applied(project(None, &registered()));
        assert_eq!((v1.status, v1.version), (UserStatus::Active, 1));
        let off = event(2, PublicChange::Deactivated { reason: None });
        let v2 = applied(project(Some(&v1), &off));
        assert_eq!((v2.status, v2.version), (UserStatus::Deactivated, 2));
        assert_eq!(v2.registered_at, v1.registered_at);
        assert_eq!(v2.updated_at, off.occurred_at);
    }

    #[test]
    fn a_redelivered_event_is_skipped() {
        let v1 = applied(project(None, &registered()));
        assert_eq!(
            project(Some(&v1), &registered()),
            Projection::AlreadyApplied
        );
    }

    #[test]
    fn a_missing_version_is_reported_as_a_gap() {
        let v1 = applied(project(None, &registered()));
        let third = event(3, PublicChange::Reactivated { reason: None });
        assert_eq!(
            project(Some(&v1), &third),
            Projection::Gap {
                current: 1,
                event: 3
            }
        );
        let first_seen_at_two = event(2, PublicChange::Deactivated { reason: None });
        assert_eq!(
            project(None, &first_seen_at_two),
            Projection::Gap {
                current: 0,
                event: 2
            }
        );
    }

    #[test]
    fn roles_and_locks_are_folded_into_the_view() {
        let mut view = applied(project(None, &registered()));
        let until: DateTime<Utc> = "2030-01-01T00:00:00Z".parse().unwrap();
        let changes = [
            PublicChange::RoleGranted {
                role: "support".into(),
            },
            PublicChange::RoleGranted {
                role: "admin".into(),
            },
            PublicChange::PasswordCheckFailed,
            PublicChange::Locked { until },
        ];
        for (i, change) in changes.into_iter().enumerate() {
            view = applied(project(Some(&view), &event(2 + i as i32, change)));
        }
        assert_eq!(view.roles, ["admin", "support"]);
        assert_eq!((view.locked_until, view.version), (Some(until), 5));
        assert!(view.locked_at(until - chrono::Duration::seconds(1)));
        assert!(!view.locked_at(until));
        let changes = [
            PublicChange::Unlocked { reason: None },
            PublicChange::RoleRevoked {
                role: "support".into(),
            },
            PublicChange::PasswordChanged,
        ];
        for (i, change) in changes.into_iter().enumerate() {
            view = applied(project(Some(&view), &event(6 + i as i32, change)));
        }
        assert_eq!(view.roles, ["admin"]);
        assert_eq!((view.locked_until, view.status), (None, UserStatus::Active));
    }

    #[test]
    fn profile_email_and_reset_are_folded_into_the_view() {
        let mut view = applied(project(None, &registered()));
        assert!(!view.email_verified);
        let profile = Profile {
            display_name: Some("Alice".into()),
            locale: Some("fr-CA".into()),
            time_zone: Some("America/Toronto".into()),
            preferences: [("theme".to_owned(), serde_json::json!("dark"))].into(),
        };
        let until: DateTime<Utc> = "2030-01-01T00:00:00Z".parse().unwrap();
        let changes = [
            PublicChange::ProfileChanged(profile.clone()),
            PublicChange::EmailVerificationRequested {
                email: "alice@new.example".into(),
                expires_at: until,
            },
            PublicChange::EmailCodeFailed,
            PublicChange::EmailVerified {
                email: "alice@new.example".into(),
            },
            PublicChange::Locked { until },
            PublicChange::PasswordResetRequested {
                email: "alice@new.example".into(),
                expires_at: until,
            },
            PublicChange::PasswordResetFailed,
        ];
        for (i, change) in changes.into_iter().enumerate() {
            view = applied(project(Some(&view), &event(2 + i as i32, change)));
        }
        assert_eq!(view.profile, profile);
        assert_eq!(view.email, "alice@new.example");
        assert!(view.email_verified);
        assert_eq!(view.locked_until, Some(until));
        view = applied(project(Some(&view), &event(9, PublicChange::PasswordReset)));
        assert_eq!((view.locked_until, view.version), (None, 9));
    }

    #[test]
    fn a_lock_is_kept_to_the_microsecond_as_the_read_model_stores_it() {
        let v1 = applied(project(None, &registered()));
        let until: DateTime<Utc> = "2030-01-01T00:00:00.123456789Z".parse().unwrap();
        let locked = applied(project(
            Some(&v1),
            &event(2, PublicChange::Locked { until }),
        ));
        let stored: DateTime<Utc> = "2030-01-01T00:00:00.123456Z".parse().unwrap();
        assert_eq!(locked.locked_until, Some(stored));
    }

    #[test]
    fn a_status_change_cannot_start_a_stream() {
        let first = event(1, PublicChange::Deactivated { reason: None });
        assert_eq!(
            project(None, &first),
            Projection::Invalid {
                current: 0,
                event: 1
            }
        );
    }
}
