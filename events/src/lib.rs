//! The vocabulary of userstream, shared by every binary and free of I/O.
//!
//! * [`domain`]: the events stored in the PostgreSQL log (write side; may hold secrets).
//! * [`integration`]: the public form published to Kafka (CloudEvents, no secrets).
//! * [`codes`]: mailed codes and how the log keeps them sealed.
//! * [`view`]: the read model and the pure projection that builds it.

pub mod codes;
pub mod domain;
pub mod integration;
pub mod view;

pub use domain::{DecodeError, PasswordHash, UserEvent};
pub use integration::{IntegrationEvent, PublicChange, PublicRow};
pub use view::{project, Profile, Projection, UserStatus, UserView};
