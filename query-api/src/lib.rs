//! userstream's query API: serves the user views from Redis, falling back to
//! the PostgreSQL read model on a miss or when Redis is away.

pub mod coalesce;
pub mod config;
pub mod consistency;
pub mod gate;
pub mod http;
pub mod list;
pub mod startup;
