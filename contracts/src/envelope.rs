//! The JSON envelope around every message, and its strict parsing.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

/// The only envelope version this service speaks.
pub const SUPPORTED_VERSION: u32 = 1;

/// Correlation and causation ids are opaque to the service; this bound keeps
/// them inside an AMQP short string with room to spare.
const MAX_ID_LEN: usize = 128;

/// One message as it travels on the wire: the envelope every command and
/// event shares, around the payload of its `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Envelope<P = serde_json::Value> {
    /// The idempotency key: the same id delivered again changes nothing.
    pub message_id: Uuid,
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u32,
    pub occurred_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    pub payload: P,
}

/// Why a body could not be accepted as an envelope. Every variant is a
/// permanent failure: the same bytes will never parse on a retry.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("body is not a JSON envelope")]
    NotAnEnvelope(#[source] serde_json::Error),
    #[error("unsupported envelope version {0} (this service speaks {SUPPORTED_VERSION})")]
    UnsupportedVersion(u32),
    #[error("{0} is longer than {MAX_ID_LEN} characters")]
    IdTooLong(&'static str),
    #[error("payload of {kind} is invalid")]
    InvalidPayload {
        kind: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Envelope {
    /// Parses and checks an envelope: valid JSON, every envelope field
    /// present and typed, a version this service speaks.
    pub fn parse(body: &[u8]) -> Result<Self, EnvelopeError> {
        let envelope: Envelope =
            serde_json::from_slice(body).map_err(EnvelopeError::NotAnEnvelope)?;
        if envelope.version != SUPPORTED_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(envelope.version));
        }
        if envelope.correlation_id.as_ref().is_some_and(|id| id.len() > MAX_ID_LEN) {
            return Err(EnvelopeError::IdTooLong("correlation_id"));
        }
        if envelope.causation_id.as_ref().is_some_and(|id| id.len() > MAX_ID_LEN) {
            return Err(EnvelopeError::IdTooLong("causation_id"));
        }
        Ok(envelope)
    }

    /// Reads the payload as the type its handler expects.
    pub fn payload_as<P: DeserializeOwned>(&self) -> Result<P, EnvelopeError> {
        P::deserialize(&self.payload)
            .map_err(|source| EnvelopeError::InvalidPayload { kind: self.kind.clone(), source })
    }

    /// The flow this message belongs to: its own correlation id, or its
    /// message id when it opens a flow.
    pub fn flow_id(&self) -> String {
        self.correlation_id.clone().unwrap_or_else(|| self.message_id.to_string())
    }

    /// A new message caused by this one: it names this message as its cause
    /// and carries this message's flow over.
    pub fn caused<P: Serialize>(
        &self,
        kind: &str,
        payload: &P,
    ) -> Result<Envelope, serde_json::Error> {
        Ok(Envelope {
            message_id: Uuid::now_v7(),
            kind: kind.to_owned(),
            version: SUPPORTED_VERSION,
            occurred_at: Utc::now(),
            correlation_id: Some(self.flow_id()),
            causation_id: Some(self.message_id.to_string()),
            payload: serde_json::to_value(payload)?,
        })
    }

    /// A message that opens its own flow (the portal's commands, the load
    /// publisher's and the demo's).
    pub fn new_command<P: Serialize>(kind: &str, payload: &P) -> Result<Self, serde_json::Error> {
        Ok(Envelope {
            message_id: Uuid::now_v7(),
            kind: kind.to_owned(),
            version: SUPPORTED_VERSION,
            occurred_at: Utc::now(),
            correlation_id: None,
            causation_id: None,
            payload: serde_json::to_value(payload)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(value: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&value).unwrap()
    }

    fn valid() -> serde_json::Value {
        json!({
            "message_id": "0b9e6a52-3f49-4c1a-9b0e-2a7f4d0c9e11",
            "type": "invitation.requested",
            "version": 1,
            "occurred_at": "2026-12-03T10:15:00Z",
            "payload": {}
        })
    }

    #[test]
    fn a_well_formed_envelope_parses() {
        let envelope = Envelope::parse(&body(valid())).unwrap();
        assert_eq!(envelope.kind, "invitation.requested");
        assert_eq!(envelope.flow_id(), "0b9e6a52-3f49-4c1a-9b0e-2a7f4d0c9e11");
    }

    #[test]
    fn bytes_that_are_not_json_are_refused() {
        assert!(matches!(Envelope::parse(b"\xff not json"), Err(EnvelopeError::NotAnEnvelope(_))));
    }

    #[test]
    fn a_missing_message_id_is_refused() {
        let mut value = valid();
        value.as_object_mut().unwrap().remove("message_id");
        assert!(matches!(Envelope::parse(&body(value)), Err(EnvelopeError::NotAnEnvelope(_))));
    }

    #[test]
    fn an_unknown_version_is_refused() {
        let mut value = valid();
        value["version"] = json!(2);
        assert!(matches!(Envelope::parse(&body(value)), Err(EnvelopeError::UnsupportedVersion(2))));
    }

    #[test]
    fn a_caused_message_carries_the_flow_and_names_its_cause() {
        let mut value = valid();
        value["correlation_id"] = json!("flow-7");
        let cause = Envelope::parse(&body(value)).unwrap();
        let effect = cause.caused("invitation.sent", &json!({})).unwrap();
        assert_eq!(effect.correlation_id.as_deref(), Some("flow-7"));
        assert_eq!(effect.causation_id, Some(cause.message_id.to_string()));
        assert_ne!(effect.message_id, cause.message_id);
    }
}
