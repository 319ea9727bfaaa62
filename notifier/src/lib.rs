//! userstream's notifier: consumes `users.events.v1` in its own consumer
//! group and sends the mails events ask for (welcome with the email
//! verification code, email verification, password reset). Codes are read
//! sealed from the log through the `mail_codes` view and opened with
//! `MAIL_CODE_KEY`; they are never on the topic.
//!
//! [`consumer`] queues one row per mail in `notifier_mails` (deduplicated by
//! event id), [`sender`] sends what is due, with backoff and parking.

pub mod config;
pub mod consumer;
pub mod mail;
pub mod sender;
pub mod smtp;
pub mod startup;
pub mod store;
