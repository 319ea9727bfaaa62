//! A Kafka message as the projector keeps it ([`platform::consumer::Message`]:
//! owned, so a batch can outlive the consumer's buffers, be retried, and be
//! parked as it arrived), and what the projector reads in it.

use events::integration::MessageError;
use events::IntegrationEvent;
pub use platform::consumer::Message;

/// Why a message is not an event this projector can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreadable {
    /// A `ce_type` this build does not know (perhaps a newer producer).
    UnknownType(String),
    /// Missing headers, a bad id, a body that is not the contract's JSON.
    Undecodable(String),
}

/// The integration event `message` carries.
pub fn decode(message: &Message) -> Result<IntegrationEvent, Unreadable> {
    let id = message
        .ce_id
        .as_deref()
        .ok_or_else(|| Unreadable::Undecodable("no ce_id header".into()))?;
    let ce_type = message
        .ce_type
        .as_deref()
        .ok_or_else(|| Unreadable::Undecodable("no ce_type header".into()))?;
    IntegrationEvent::decode(id, ce_type, &message.body).map_err(|error| match error {
        MessageError::UnknownType(t) => Unreadable::UnknownType(t),
        other => Unreadable::Undecodable(platform::telemetry::error_chain(&other)),
    })
}
