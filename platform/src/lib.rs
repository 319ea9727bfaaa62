//! Plumbing shared by the userstream services (command-api, query-api, projector, notifier), so none of them copies it.

pub mod config;
pub mod consumer;
pub mod db;
pub mod http;
pub mod kafka;
pub mod service;
pub mod shutdown;
pub mod tasks;
pub mod telemetry;
