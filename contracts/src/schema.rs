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
        properties.insert("type".to_owned(), json!({ "type": "string", "const": P::TYPE }));
        properties
            .insert("version".to_owned(), json!({ "type": "integer", "const": SUPPORTED_VERSION }));
    }
    (P::TYPE.to_owned(), schema.to_value())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{command_type, event_type};
    use uuid::Uuid;

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
        assert_eq!(schema["properties"]["type"]["const"], "recovery.code_submitted");
        assert_eq!(schema["properties"]["version"]["const"], 1);
        let required = schema["required"].as_array().unwrap();
        assert!(required.contains(&json!("payload")));
        assert!(required.contains(&json!("message_id")));
        let payload = serde_json::to_string(&schema["$defs"]).unwrap();
        assert!(payload.contains("recovery_id"), "payload not described: {payload}");
    }

    #[test]
    fn refusal_and_decline_reasons_are_listed_for_clients() {
        let schemas = json_schemas();
        let rejected = &schemas["events"]["invitation.rejected"];
        let reason = &rejected["$defs"]["InvitationRejected"]["properties"]["reason"];
        assert_eq!(reason["enum"], json!(crate::reasons::ALL));
        let declined = &schemas["commands"]["recovery.declined"];
        let reason = &declined["$defs"]["RecoveryDeclined"]["properties"]["reason"];
        assert_eq!(reason["enum"], json!(crate::reasons::decline_reason::ALL));
        let validator = jsonschema::validator_for(declined).unwrap();
        let command = Envelope::new_command(
            "recovery.declined",
            &json!({ "recovery_id": Uuid::nil(), "actor_id": Uuid::nil(), "reason": "suspect" }),
        )
        .unwrap();
        assert!(!validator.is_valid(&serde_json::to_value(&command).unwrap()));
    }

    /// Serialises `payload` the way a worker publishes it and checks it
    /// against the exported schema, so the schema cannot drift from the types.
    fn assert_published_form_validates<P: Message>(group: &str, payload: P) {
        let schemas = json_schemas();
        let validator = jsonschema::validator_for(&schemas[group][P::TYPE]).unwrap();
        let cause = Envelope::new_command("recovery.requested", &json!({})).unwrap();
        let envelope = cause.caused(P::TYPE, &payload).unwrap();
        let instance = serde_json::to_value(&envelope).unwrap();
        let errors: Vec<String> = validator.iter_errors(&instance).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{} does not match its schema: {errors:?}", P::TYPE);
    }

    #[test]
    fn published_commands_match_their_schemas() {
        use crate::commands::*;
        let id = Uuid::now_v7();
        assert_published_form_validates(
            "commands",
            AccountUpdated {
                account_id: id,
                first_name: "Ксения".to_owned(),
                last_name: "Дорофеева".to_owned(),
                birth_date: chrono::NaiveDate::from_ymd_opt(1962, 5, 16).unwrap(),
                citizenship: "RU".to_owned(),
                verified: true,
                has_passport: true,
                phone: None,
            },
        );
        assert_published_form_validates(
            "commands",
            InvitationRequested {
                truster_id: id,
                contact_first_name: "Анна".to_owned(),
                contact_phone: "8 (900) 123-45-67".to_owned(),
            },
        );
        let invitation = InvitationAccepted { invitation_id: id, actor_id: id };
        assert_published_form_validates("commands", invitation);
        let invitation = InvitationDeclined { invitation_id: id, actor_id: id };
        assert_published_form_validates("commands", invitation);
        let disconnect = ContactDisconnectRequested { actor_id: id, truster_id: id };
        assert_published_form_validates("commands", disconnect);
        assert_published_form_validates("commands", RecoveryRequested { truster_id: id });
        let confirmed = RecoveryConfirmed { recovery_id: id, actor_id: id };
        assert_published_form_validates("commands", confirmed);
        let code = "123456".to_owned();
        let submitted = RecoveryCodeSubmitted { recovery_id: id, actor_id: id, code };
        assert_published_form_validates("commands", submitted);
        let reason = "suspected_fraud".to_owned();
        let declined = RecoveryDeclined { recovery_id: id, actor_id: id, reason };
        assert_published_form_validates("commands", declined);
        let cancelled = RecoveryCancelled { recovery_id: id, actor_id: id };
        assert_published_form_validates("commands", cancelled);
    }

    #[test]
    fn published_events_match_their_schemas() {
        use crate::events::*;
        let (id, at) = (Uuid::now_v7(), chrono::Utc::now());
        let reason = || "contact_not_found".to_owned();
        let parties = (id, id, id);
        assert_published_form_validates(
            "events",
            InvitationSent {
                invitation_id: id,
                truster_id: id,
                contact_id: id,
                expires_at: at,
                replaced_invitation_id: None,
            },
        );
        for invitation_id in [None, Some(id)] {
            let rejected = InvitationRejected {
                invitation_id,
                truster_id: Some(id),
                actor_id: id,
                reason: reason(),
            };
            assert_published_form_validates("events", rejected);
        }
        let (invitation_id, truster_id, contact_id) = parties;
        let accepted = InvitationAccepted { invitation_id, truster_id, contact_id };
        assert_published_form_validates("events", accepted);
        let declined = InvitationDeclined { invitation_id, truster_id, contact_id };
        assert_published_form_validates("events", declined);
        let expired = InvitationExpired { invitation_id, truster_id, contact_id };
        assert_published_form_validates("events", expired);
        let disconnected = ContactDisconnected { truster_id, contact_id, actor_id: id };
        assert_published_form_validates("events", disconnected);
        let refused = ContactDisconnectRejected {
            truster_id,
            contact_id: None,
            actor_id: id,
            reason: reason(),
        };
        assert_published_form_validates("events", refused);
        let awaiting = RecoveryAwaitingContact {
            recovery_id: id,
            truster_id,
            contact_id,
            expires_at: at,
            existing: true,
        };
        assert_published_form_validates("events", awaiting);
        let rejected = RecoveryRejected {
            recovery_id: None,
            truster_id: None,
            actor_id: None,
            reason: reason(),
        };
        assert_published_form_validates("events", rejected);
        let recovery_id = id;
        let sent = RecoveryCodeSent {
            recovery_id,
            truster_id,
            contact_id,
            code_expires_at: at,
            codes_left: 2,
        };
        assert_published_form_validates("events", sent);
        let wrong = RecoveryCodeRejected {
            recovery_id,
            truster_id,
            contact_id,
            attempts_left: 0,
            reason: reason(),
        };
        assert_published_form_validates("events", wrong);
        let approved = RecoveryApproved { recovery_id, truster_id, contact_id };
        assert_published_form_validates("events", approved);
        let reason = crate::reasons::decline_reason::SUSPECTED_FRAUD.to_owned();
        let declined = RecoveryDeclined { recovery_id, truster_id, contact_id, reason };
        assert_published_form_validates("events", declined);
        let expired = RecoveryExpired { recovery_id, truster_id, contact_id };
        assert_published_form_validates("events", expired);
        let cancelled = RecoveryCancelled { recovery_id, truster_id, contact_id };
        assert_published_form_validates("events", cancelled);
        let text = "Анна П. просит вас стать доверенным лицом".to_owned();
        let notification =
            CabinetNotification { account_id: id, kind: "invitation".to_owned(), text };
        assert_published_form_validates("events", notification);
    }

    #[test]
    fn a_payload_missing_a_field_or_under_another_type_is_invalid() {
        let schemas = json_schemas();
        let schema = &schemas["commands"]["recovery.confirmed"];
        let validator = jsonschema::validator_for(schema).unwrap();
        let id = Uuid::now_v7();
        let payload = json!({ "recovery_id": id, "actor_id": id });
        let valid = Envelope::new_command("recovery.confirmed", &payload).unwrap();
        assert!(validator.is_valid(&serde_json::to_value(&valid).unwrap()));

        let missing = Envelope::new_command("recovery.confirmed", &json!({ "recovery_id": id }));
        assert!(!validator.is_valid(&serde_json::to_value(missing.unwrap()).unwrap()));
        let other_type = Envelope::new_command("recovery.cancelled", &payload).unwrap();
        assert!(!validator.is_valid(&serde_json::to_value(&other_type).unwrap()));
        let mut other_version = serde_json::to_value(&valid).unwrap();
        other_version["version"] = json!(2);
        assert!(!validator.is_valid(&other_version));
    }
}
