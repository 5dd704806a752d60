//! JSON Schema export of every message the portal sends or receives, for the
//! portal's clients in other languages. Each schema describes the whole
//! envelope with that message's payload, its `type` and `version` pinned.

use schemars::schema_for;
use serde_json::{Map, Value, json};

use crate::{Envelope, Message, SUPPORTED_VERSION, commands, events};

/// One schema per command and per portal-facing event, as
/// `{"commands": {type: schema}, "events": {type: schema}}`. The two are kept
/// apart because some types (`invitation.accepted`, `recovery.declined`, ...)
/// name both a command and the event that reports its outcome, on different
/// exchanges and with different payloads. Internal events are left out: the
/// portal never sees them.
pub fn json_schemas() -> Value {
    let commands = [
        envelope_schema::<commands::AccountUpdated>(),
        envelope_schema::<commands::InvitationRequested>(),
        envelope_schema::<commands::InvitationAccepted>(),
        envelope_schema::<commands::InvitationDeclined>(),
        envelope_schema::<commands::ContactDisconnectRequested>(),
        envelope_schema::<commands::RecoveryRequested>(),
        envelope_schema::<commands::RecoveryConfirmed>(),
        envelope_schema::<commands::RecoveryCodeSubmitted>(),
        envelope_schema::<commands::RecoveryDeclined>(),
        envelope_schema::<commands::RecoveryCancelled>(),
    ];
    let events = [
        envelope_schema::<events::InvitationSent>(),
        envelope_schema::<events::InvitationRejected>(),
        envelope_schema::<events::InvitationAccepted>(),
        envelope_schema::<events::InvitationDeclined>(),
        envelope_schema::<events::InvitationExpired>(),
        envelope_schema::<events::ContactDisconnected>(),
        envelope_schema::<events::ContactDisconnectRejected>(),
        envelope_schema::<events::RecoveryAwaitingContact>(),
        envelope_schema::<events::RecoveryRejected>(),
        envelope_schema::<events::RecoveryCodeSent>(),
        envelope_schema::<events::RecoveryCodeRejected>(),
        envelope_schema::<events::RecoveryApproved>(),
        envelope_schema::<events::RecoveryDeclined>(),
        envelope_schema::<events::RecoveryExpired>(),
        envelope_schema::<events::RecoveryCancelled>(),
        envelope_schema::<events::CabinetNotification>(),
    ];
    json!({
        "commands": commands.into_iter().collect::<Map<String, Value>>(),
        "events": events.into_iter().collect::<Map<String, Value>>(),
    })
}

/// The schema of `Envelope<P>`, narrowed so that a client validating against
/// it also checks the `type` and `version` the generic envelope leaves open.
fn envelope_schema<P: Message>() -> (String, Value) {
    let mut schema = schema_for!(Envelope<P>);
    schema.insert("title".to_owned(), json!(P::TYPE));
    if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        properties.insert(
            "type".to_owned(),
            json!({ "type": "string", "const": P::TYPE }),
        );
        properties.insert(
            "version".to_owned(),
            json!({ "type": "integer", "const": SUPPORTED_VERSION }),
        );
    }
    (P::TYPE.to_owned(), schema.to_value())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{command_type, event_type};

    fn assert_exactly(schemas: &Value, kinds: &[&str]) {
        let schemas = schemas.as_object().unwrap();
        for kind in kinds {
            assert!(schemas.contains_key(*kind), "no schema for {kind}");
        }
        assert_eq!(schemas.len(), kinds.len());
    }

    #[test]
    fn every_message_type_has_a_schema_and_nothing_else_does() {
        let schemas = json_schemas();
        assert_exactly(&schemas["commands"], command_type::ALL);
        assert_exactly(&schemas["events"], event_type::ALL);
    }

    #[test]
    fn a_type_shared_by_a_command_and_an_event_has_both_schemas() {
        let schemas = json_schemas();
        let command = serde_json::to_string(&schemas["commands"]["invitation.accepted"]).unwrap();
        let event = serde_json::to_string(&schemas["events"]["invitation.accepted"]).unwrap();
        assert!(command.contains("actor_id") && !command.contains("contact_id"));
        assert!(event.contains("contact_id") && !event.contains("actor_id"));
    }

    #[test]
    fn a_schema_pins_the_type_and_requires_the_payload_fields() {
        let schemas = json_schemas();
        let schema = &schemas["commands"]["recovery.code_submitted"];
        assert_eq!(
            schema["properties"]["type"]["const"],
            "recovery.code_submitted"
        );
        assert_eq!(schema["properties"]["version"]["const"], 1);
        let required = schema["required"].as_array().unwrap();
        assert!(required.contains(&json!("payload")));
        assert!(required.contains(&json!("message_id")));
        let payload = serde_json::to_string(&schema["$defs"]).unwrap();
        assert!(
            payload.contains("recovery_id"),
            "payload not described: {payload}"
        );
    }
}
