//! userstream's projector: consumes `users.events.v1` in a consumer group and
//! keeps the PostgreSQL read model and the Redis views up to date, applying
//! each event's effect once. Its one-shot commands rebuild the read model
//! from the log ([`rebuild`]), compare it with the log ([`verify`]) and report
//! where the projection stands ([`status`]).

pub mod batch;
pub mod config;
pub mod fold;
pub mod frontier;
pub mod keeper;
pub mod log;
pub mod message;
pub mod parked;
pub mod rebuild;
pub mod startup;
pub mod status;
pub mod verify;
pub mod worker;
