//! userstream's write side: validates commands, decides events from the user's
//! stream, appends them to the PostgreSQL log and relays the log to Kafka.

pub mod config;
pub mod domain;
pub mod http;
pub mod password;
pub mod relay;
pub mod sessions;
pub mod signin;
pub mod startup;
pub mod store;
pub mod tokens;
pub mod validation;
