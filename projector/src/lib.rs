//! userstream's projector: consumes `users.events.v1` in a consumer group and
//! keeps the PostgreSQL read model and the Redis views up to date, applying
//! each event's effect once.

pub mod apply;
pub mod config;
pub mod startup;
pub mod worker;
