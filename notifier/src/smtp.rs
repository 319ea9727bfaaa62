//! Sending one mail over SMTP (lettre), with a deadline, and telling a
//! permanent refusal (park it) from a passing failure (try again later).

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;

use crate::config::{SmtpSettings, SmtpTls};
use crate::mail::Rendered;

/// Why a mail did not go.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The server refused it for good (a 5xx reply) or the mail cannot be
    /// written (an address that is not one): sending again changes nothing.
    #[error("refused permanently: {0}")]
    Permanent(String),
    /// Unreachable, a 4xx reply, a broken connection, the deadline.
    #[error("failed: {0}")]
    Transient(String),
}

#[derive(Debug, thiserror::Error)]
pub enum MailerError {
    #[error("MAIL_FROM is not a mail address")]
    From(#[source] lettre::address::AddressError),
    #[error("cannot set up TLS for SMTP_HOST")]
    Tls(#[source] lettre::transport::smtp::Error),
}

/// The SMTP client: one connection per mail (no pool, so a restarted server
/// leaves no stale connection behind; the volume is small).
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    deadline: std::time::Duration,
}

impl Mailer {
    pub fn new(settings: &SmtpSettings) -> Result<Self, MailerError> {
        let from: Mailbox = settings.from.parse().map_err(MailerError::From)?;
        let builder = match settings.tls {
            SmtpTls::None => {
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&settings.host)
            }
            SmtpTls::StartTls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&settings.host)
                    .map_err(MailerError::Tls)?
            }
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&settings.host)
                .map_err(MailerError::Tls)?,
        };
        let mut builder = builder.port(settings.port).timeout(Some(settings.timeout));
        if let Some((user, password)) = &settings.credentials {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                password.expose_secret().to_owned(),
            ));
        }
        Ok(Self {
            transport: builder.build(),
            from,
            deadline: settings.timeout,
        })
    }

    /// Sends `mail` to `to` with the given `Message-ID`, within the deadline.
    #[tracing::instrument(name = "smtp_send", skip_all)]
    pub async fn send(
        &self,
        to: &str,
        message_id: String,
        mail: Rendered,
    ) -> Result<(), SendError> {
        let to: Mailbox = to.parse().map_err(|e: lettre::address::AddressError| {
            SendError::Permanent(format!("recipient: {e}"))
        })?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject)
            .message_id(Some(message_id))
            .header(ContentType::TEXT_PLAIN)
            .body(mail.body)
            .map_err(|e| SendError::Permanent(format!("message: {e}")))?;
        match tokio::time::timeout(self.deadline, self.transport.send(message)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) if error.is_permanent() => Err(SendError::Permanent(
                platform::telemetry::error_chain(&error),
            )),
            Ok(Err(error)) => Err(SendError::Transient(platform::telemetry::error_chain(
                &error,
            ))),
            Err(_) => Err(SendError::Transient(format!(
                "no answer within {:?}",
                self.deadline
            ))),
        }
    }
}
