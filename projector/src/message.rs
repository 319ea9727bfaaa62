//! A Kafka message as the projector keeps it: owned, so a batch can outlive
//! the consumer's buffers, be retried, and be parked as it arrived.

use events::integration::MessageError;
use events::IntegrationEvent;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::Message as _;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub ce_id: Option<String>,
    pub ce_type: Option<String>,
    pub body: Vec<u8>,
}

/// Why a message is not an event this projector can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreadable {
    /// A `ce_type` this build does not know (perhaps a newer producer).
    UnknownType(String),
    /// Missing headers, a bad id, a body that is not the contract's JSON.
    Undecodable(String),
}

impl Message {
    pub fn from_kafka(message: &BorrowedMessage<'_>) -> Self {
        let header = |name: &str| -> Option<String> {
            message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            ce_id: header("ce_id"),
            ce_type: header("ce_type"),
            body: message.payload().unwrap_or_default().to_vec(),
        }
    }

    /// The integration event this message carries.
    pub fn decode(&self) -> Result<IntegrationEvent, Unreadable> {
        let id = self
            .ce_id
            .as_deref()
            .ok_or_else(|| Unreadable::Undecodable("no ce_id header".into()))?;
        let ce_type = self
            .ce_type
            .as_deref()
            .ok_or_else(|| Unreadable::Undecodable("no ce_type header".into()))?;
        IntegrationEvent::decode(id, ce_type, &self.body).map_err(|error| match error {
            MessageError::UnknownType(t) => Unreadable::UnknownType(t),
            other => Unreadable::Undecodable(platform::telemetry::error_chain(&other)),
        })
    }
}
