//! The commands the portal publishes to `trusted_contact.commands`, one payload
//! type each. Unknown fields are ignored on purpose, so the portal can add a
//! field before every worker knows it.

use std::fmt;

use chrono::NaiveDate;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Message;

/// The message types of the commands, which are also their routing keys.
pub mod command_type {
    pub const ACCOUNT_UPDATED: &str = "account.updated";
    pub const INVITATION_REQUESTED: &str = "invitation.requested";
    pub const INVITATION_ACCEPTED: &str = "invitation.accepted";
    pub const INVITATION_DECLINED: &str = "invitation.declined";
    pub const CONTACT_DISCONNECT_REQUESTED: &str = "contact.disconnect_requested";
    pub const RECOVERY_REQUESTED: &str = "recovery.requested";
    pub const RECOVERY_CONFIRMED: &str = "recovery.confirmed";
    pub const RECOVERY_CODE_SUBMITTED: &str = "recovery.code_submitted";
    pub const RECOVERY_DECLINED: &str = "recovery.declined";
    pub const RECOVERY_CANCELLED: &str = "recovery.cancelled";

    /// Every command type, for binding queues and exporting schemas.
    pub const ALL: &[&str] = &[
        ACCOUNT_UPDATED,
        INVITATION_REQUESTED,
        INVITATION_ACCEPTED,
        INVITATION_DECLINED,
        CONTACT_DISCONNECT_REQUESTED,
        RECOVERY_REQUESTED,
        RECOVERY_CONFIRMED,
        RECOVERY_CODE_SUBMITTED,
        RECOVERY_DECLINED,
        RECOVERY_CANCELLED,
    ];
}

/// The portal's profile service reports an account's current profile. It is
/// the only source of the names, ages and phones that eligibility needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AccountUpdated {
    pub account_id: Uuid,
    pub first_name: String,
    pub last_name: String,
    pub birth_date: NaiveDate,
    /// ISO 3166-1 alpha-2 code, `RU` for the Russian Federation.
    pub citizenship: String,
    /// The account is verified ("confirmed") on the portal.
    pub verified: bool,
    pub has_passport: bool,
    /// E.164; null when the profile holds no current phone.
    pub phone: Option<String>,
}

/// A truster asks to connect a trusted contact, named by the first name in
/// their passport and the phone registered on the portal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct InvitationRequested {
    pub truster_id: Uuid,
    pub contact_first_name: String,
    /// Any common Russian notation; normalised by the service.
    pub contact_phone: String,
}

/// The invited person accepts the invitation in their cabinet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct InvitationAccepted {
    pub invitation_id: Uuid,
    pub actor_id: Uuid,
}

/// The invited person declines the invitation in their cabinet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct InvitationDeclined {
    pub invitation_id: Uuid,
    pub actor_id: Uuid,
}

/// The truster, or the truster's contact, asks to end the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ContactDisconnectRequested {
    pub actor_id: Uuid,
    pub truster_id: Uuid,
}

/// The portal's recovery flow reports that a recovery of the truster's
/// password has started. Whoever started it is not known to be the truster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecoveryRequested {
    pub truster_id: Uuid,
}

/// The contact confirms that the truster really asked, and wants a code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecoveryConfirmed {
    pub recovery_id: Uuid,
    pub actor_id: Uuid,
}

/// The contact types the SMS code into their cabinet.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecoveryCodeSubmitted {
    pub recovery_id: Uuid,
    pub actor_id: Uuid,
    pub code: String,
}

/// Written by hand because a derived `Debug` would put the code into any log
/// line or panic message that formats the command.
impl fmt::Debug for RecoveryCodeSubmitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecoveryCodeSubmitted")
            .field("recovery_id", &self.recovery_id)
            .field("actor_id", &self.actor_id)
            .field("code", &"<redacted>")
            .finish()
    }
}

/// The contact refuses to approve the recovery, saying why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecoveryDeclined {
    pub recovery_id: Uuid,
    pub actor_id: Uuid,
    /// Any other value is refused with `invalid_decline_reason`.
    #[schemars(schema_with = "crate::reasons::decline_schema")]
    pub reason: String,
}

/// The truster, from a session still logged in, cancels a request they did
/// not start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecoveryCancelled {
    pub recovery_id: Uuid,
    pub actor_id: Uuid,
}

macro_rules! command {
    ($($payload:ty => $kind:ident),* $(,)?) => {
        $(impl Message for $payload {
            const TYPE: &'static str = command_type::$kind;
        })*
    };
}

command! {
    AccountUpdated => ACCOUNT_UPDATED,
    InvitationRequested => INVITATION_REQUESTED,
    InvitationAccepted => INVITATION_ACCEPTED,
    InvitationDeclined => INVITATION_DECLINED,
    ContactDisconnectRequested => CONTACT_DISCONNECT_REQUESTED,
    RecoveryRequested => RECOVERY_REQUESTED,
    RecoveryConfirmed => RECOVERY_CONFIRMED,
    RecoveryCodeSubmitted => RECOVERY_CODE_SUBMITTED,
    RecoveryDeclined => RECOVERY_DECLINED,
    RecoveryCancelled => RECOVERY_CANCELLED,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Envelope;
    use serde_json::json;

    #[test]
    fn debug_output_never_contains_the_code() {
        let command = RecoveryCodeSubmitted {
            recovery_id: Uuid::nil(),
            actor_id: Uuid::nil(),
            code: "493817".to_owned(),
        };
        let printed = format!("{command:?} {command:#?}");
        assert!(!printed.contains("493817"));
        assert!(printed.contains("redacted"));
    }

    #[test]
    fn unknown_payload_fields_are_ignored() {
        let payload = json!({
            "truster_id": "0b9e6a52-3f49-4c1a-9b0e-2a7f4d0c9e11",
            "added_by_a_newer_portal": true
        });
        let command: RecoveryRequested = serde_json::from_value(payload).unwrap();
        assert_eq!(command.truster_id.to_string(), "0b9e6a52-3f49-4c1a-9b0e-2a7f4d0c9e11");
    }

    #[test]
    fn an_account_without_a_phone_reads_as_none() {
        let payload = json!({
            "account_id": "0b9e6a52-3f49-4c1a-9b0e-2a7f4d0c9e11",
            "first_name": "Ксения",
            "last_name": "Дорофеева",
            "birth_date": "1962-05-16",
            "citizenship": "RU",
            "verified": true,
            "has_passport": true,
            "phone": null
        });
        let account: AccountUpdated = serde_json::from_value(payload).unwrap();
        assert_eq!(account.phone, None);
        assert_eq!(account.birth_date, NaiveDate::from_ymd_opt(1962, 5, 16).unwrap());
    }

    #[test]
    fn a_missing_field_makes_the_payload_invalid() {
        let command = json!({ "invitation_id": "0b9e6a52-3f49-4c1a-9b0e-2a7f4d0c9e11" });
        let envelope = Envelope::new_command(InvitationAccepted::TYPE, &command).unwrap();
        assert!(envelope.payload_as::<InvitationAccepted>().is_err());
    }

    #[test]
    fn a_command_survives_the_envelope_round_trip() {
        let command = InvitationRequested {
            truster_id: Uuid::now_v7(),
            contact_first_name: "Анна".to_owned(),
            contact_phone: "8 (900) 123-45-67".to_owned(),
        };
        let envelope = Envelope::new_command(InvitationRequested::TYPE, &command).unwrap();
        let body = serde_json::to_vec(&envelope).unwrap();
        let parsed = Envelope::parse(&body).unwrap();
        assert_eq!(parsed.kind, "invitation.requested");
        assert_eq!(parsed.payload_as::<InvitationRequested>().unwrap(), command);
    }
}
