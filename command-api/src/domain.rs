//! The user aggregate: its state is a fold of its stream, and every decision is
//! the pure function [`decide`], so the rules are tested without any I/O.

use events::domain::{UserDeactivated, UserReactivated, UserRegistered};
use events::{PasswordHash, UserEvent};

/// What the write side knows of one user, rebuilt from their stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct User {
    /// The stream's last version; 0 for a stream with no events.
    pub version: i32,
    pub status: Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Status {
    #[default]
    Unregistered,
    Active,
    Deactivated,
}

/// What a client asks for, already validated.
#[derive(Debug, Clone)]
pub enum Command {
    Register {
        username: String,
        email: String,
        password_hash: PasswordHash,
    },
    Deactivate {
        reason: Option<String>,
    },
    Reactivate {
        reason: Option<String>,
    },
}

/// Why a command was refused by the rules (not by the infrastructure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("the user is already registered")]
    AlreadyRegistered,
    #[error("no such user")]
    NotFound,
    #[error("the user is already deactivated")]
    AlreadyDeactivated,
    #[error("the user is already active")]
    AlreadyActive,
}

impl User {
    /// Folds a stream, oldest first.
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a UserEvent>) -> Self {
        events.into_iter().fold(Self::default(), Self::evolve)
    }

    /// The state after one more event.
    pub fn evolve(self, event: &UserEvent) -> Self {
        let status = match event {
            UserEvent::Registered(_) | UserEvent::Reactivated(_) => Status::Active,
            UserEvent::Deactivated(_) => Status::Deactivated,
            // Identity events (checks, locks, passwords, roles) leave the
            // status as it is; their commands are not decided here yet.
            _ => self.status,
        };
        Self {
            version: self.version + 1,
            status,
        }
    }
}

/// The events a command produces on a user in `state`, or why it is refused.
pub fn decide(state: &User, command: Command) -> Result<Vec<UserEvent>, DomainError> {
    match (state.status, command) {
        (
            Status::Unregistered,
            Command::Register {
                username,
                email,
                password_hash,
            },
        ) => Ok(vec![UserEvent::Registered(UserRegistered {
            username,
            email,
            password_hash,
        })]),
        (_, Command::Register { .. }) => Err(DomainError::AlreadyRegistered),
        (Status::Unregistered, _) => Err(DomainError::NotFound),
        (Status::Active, Command::Deactivate { reason }) => {
            Ok(vec![UserEvent::Deactivated(UserDeactivated { reason })])
        }
        (Status::Deactivated, Command::Deactivate { .. }) => Err(DomainError::AlreadyDeactivated),
        (Status::Deactivated, Command::Reactivate { reason }) => {
            Ok(vec![UserEvent::Reactivated(UserReactivated { reason })])
        }
        (Status::Active, Command::Reactivate { .. }) => Err(DomainError::AlreadyActive),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered() -> UserEvent {
        UserEvent::Registered(UserRegistered {
            username: "alice".into(),
            email: "alice@example.com".into(),
            password_hash: PasswordHash::new("$argon2id$test".into()),
        })
    }

    fn deactivated() -> UserEvent {
        UserEvent::Deactivated(UserDeactivated { reason: None })
    }

    fn register() -> Command {
        Command::Register {
            username: "alice".into(),
            email: "alice@example.com".into(),
            password_hash: PasswordHash::new("$argon2id$test".into()),
        }
    }

    /// given past events, when a command, then events or an error.
    fn given(history: &[UserEvent]) -> impl FnOnce(Command) -> Result<Vec<UserEvent>, DomainError> {
        let state = User::from_events(history);
        move |command| decide(&state, command)
    }

    #[test]
    fn registering_a_new_user_records_user_registered() {
        assert_eq!(given(&[])(register()), Ok(vec![registered()]));
    }

    #[test]
    fn registering_twice_is_refused() {
        assert_eq!(
            given(&[registered()])(register()),
            Err(DomainError::AlreadyRegistered)
        );
    }

    #[test]
    fn deactivating_an_active_user_records_user_deactivated() {
        let reason = Some("abuse".to_owned());
        assert_eq!(
            given(&[registered()])(Command::Deactivate {
                reason: reason.clone()
            }),
            Ok(vec![UserEvent::Deactivated(UserDeactivated { reason })])
        );
    }

    #[test]
    fn deactivating_twice_is_refused() {
        assert_eq!(
            given(&[registered(), deactivated()])(Command::Deactivate { reason: None }),
            Err(DomainError::AlreadyDeactivated)
        );
    }

    #[test]
    fn reactivating_a_deactivated_user_records_user_reactivated() {
        assert_eq!(
            given(&[registered(), deactivated()])(Command::Reactivate { reason: None }),
            Ok(vec![UserEvent::Reactivated(UserReactivated {
                reason: None
            })])
        );
    }

    #[test]
    fn reactivating_an_active_user_is_refused() {
        assert_eq!(
            given(&[registered()])(Command::Reactivate { reason: None }),
            Err(DomainError::AlreadyActive)
        );
    }

    #[test]
    fn commands_on_an_unknown_user_are_refused() {
        assert_eq!(
            given(&[])(Command::Deactivate { reason: None }),
            Err(DomainError::NotFound)
        );
        assert_eq!(
            given(&[])(Command::Reactivate { reason: None }),
            Err(DomainError::NotFound)
        );
    }

    #[test]
    fn the_version_counts_the_events_folded() {
        let state = User::from_events(&[registered(), deactivated()]);
        assert_eq!(
            state,
            User {
                version: 2,
                status: Status::Deactivated
            }
        );
    }
}
