//! AMQP properties of the messages the service publishes.

use chrono::{DateTime, Utc};
use lapin::{BasicProperties, types::FieldTable};
use trusted_contact_contracts::Envelope;
use uuid::Uuid;

use super::headers;

/// Persistent, JSON, with the ids the portal matches outcomes by, both as
/// AMQP properties and as headers (some clients only read headers).
pub fn properties_for(
    message_id: Uuid,
    kind: &str,
    correlation_id: Option<&str>,
    causation_id: Option<&str>,
    occurred_at: DateTime<Utc>,
) -> BasicProperties {
    let mut table = FieldTable::default();
    if let Some(correlation) = correlation_id {
        headers::set_str(&mut table, headers::CORRELATION_ID, correlation);
    }
    if let Some(causation) = causation_id {
        headers::set_str(&mut table, headers::CAUSATION_ID, causation);
    }
    let properties = BasicProperties::default()
        .with_message_id(message_id.to_string().into())
        .with_type(kind.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(u64::try_from(occurred_at.timestamp()).unwrap_or(0))
        .with_headers(table);
    match correlation_id {
        Some(correlation) => properties.with_correlation_id(correlation.into()),
        None => properties,
    }
}

/// [`properties_for`] the ids, type and time an envelope carries.
pub fn properties_of(envelope: &Envelope) -> BasicProperties {
    properties_for(
        envelope.message_id,
        &envelope.kind,
        envelope.correlation_id.as_deref(),
        envelope.causation_id.as_deref(),
        envelope.occurred_at,
    )
}
