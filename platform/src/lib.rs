//! Plumbing shared by command-api, query-api and projector, so none of them copies it.

pub mod config;
pub mod db;
pub mod http;
pub mod kafka;
pub mod shutdown;
pub mod tasks;
pub mod telemetry;
