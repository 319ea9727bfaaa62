//! userstream's projector: consumes `users.events.v1` in a consumer group and
//! keeps the PostgreSQL read model and the Redis views up to date, applying
//! each event's effect once.

pub mod batch;
pub mod config;
pub mod keeper;
pub mod log;
pub mod message;
pub mod parked;
pub mod startup;
pub mod worker;
