//! The events the service publishes to `trusted_contact.events` for the portal,
//! plus the internal events workers send each other. Each command other than
//! `account.updated` yields exactly one of these as its outcome.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Message;

/// The message types of the events, which are also their routing keys.
pub mod event_type {
    pub const INVITATION_SENT: &str = "invitation.sent";
    pub const INVITATION_REJECTED: &str = "invitation.rejected";
    pub const INVITATION_ACCEPTED: &str = "invitation.accepted";
    pub const INVITATION_DECLINED: &str = "invitation.declined";
    pub const INVITATION_EXPIRED: &str = "invitation.expired";
    pub const CONTACT_DISCONNECTED: &str = "contact.disconnected";
    pub const CONTACT_DISCONNECT_REJECTED: &str = "contact.disconnect_rejected";
    pub const RECOVERY_AWAITING_CONTACT: &str = "recovery.awaiting_contact";
    pub const RECOVERY_REJECTED: &str = "recovery.rejected";
    pub const RECOVERY_CODE_SENT: &str = "recovery.code_sent";
    pub const RECOVERY_CODE_REJECTED: &str = "recovery.code_rejected";
    pub const RECOVERY_APPROVED: &str = "recovery.approved";
    pub const RECOVERY_DECLINED: &str = "recovery.declined";
    pub const RECOVERY_EXPIRED: &str = "recovery.expired";
    pub const RECOVERY_CANCELLED: &str = "recovery.cancelled";
    pub const CABINET_NOTIFICATION: &str = "cabinet.notification";

    /// Internal: an SMS failed for good. Travels on the internal exchange only.
    pub const SMS_FAILED: &str = "sms.failed";

    /// Every event the portal receives, for binding queues and exporting
    /// schemas.
    pub const ALL: &[&str] = &[
        INVITATION_SENT,
        INVITATION_REJECTED,
        INVITATION_ACCEPTED,
        INVITATION_DECLINED,
        INVITATION_EXPIRED,
        CONTACT_DISCONNECTED,
        CONTACT_DISCONNECT_REJECTED,
        RECOVERY_AWAITING_CONTACT,
        RECOVERY_REJECTED,
        RECOVERY_CODE_SENT,
        RECOVERY_CODE_REJECTED,
        RECOVERY_APPROVED,
        RECOVERY_DECLINED,
        RECOVERY_EXPIRED,
        RECOVERY_CANCELLED,
        CABINET_NOTIFICATION,
    ];

    /// Events that stay between workers and are never published to the portal.
    pub const INTERNAL: &[&str] = &[SMS_FAILED];
}

/// An invitation was opened and the contact notified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct InvitationSent {
    pub invitation_id: Uuid,
    pub truster_id: Uuid,
    pub contact_id: Uuid,
    /// The contact must accept before this instant (30 minutes by default).
    pub expires_at: DateTime<Utc>,
    /// The pending invitation this one replaced, if there was one.
    pub replaced_invitation_id: Option<Uuid>,
}

/// A command about an invitation (`invitation.requested`, `.accepted` or
/// `.declined`) was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct InvitationRejected {
    /// Null when the request was refused before an invitation was opened.
    pub invitation_id: Option<Uuid>,
    /// Null when the command named an invitation that does not exist, or
    /// one its sender was not invited to (nobody learns whose it is).
    pub truster_id: Option<Uuid>,
    /// Who sent the refused command: the truster, or the invited person.
    pub actor_id: Uuid,
    #[schemars(schema_with = "crate::reasons::refusal_schema")]
    pub reason: String,
}

/// The contact accepted: the truster now has an active trusted contact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct InvitationAccepted {
    pub invitation_id: Uuid,
    pub truster_id: Uuid,
    pub contact_id: Uuid,
}

/// The invited person declined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct InvitationDeclined {
    pub invitation_id: Uuid,
    pub truster_id: Uuid,
    pub contact_id: Uuid,
}

/// Nobody accepted within the time allowed; the truster may invite again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct InvitationExpired {
    pub invitation_id: Uuid,
    pub truster_id: Uuid,
    pub contact_id: Uuid,
}

/// The connection between the truster and the contact ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ContactDisconnected {
    pub truster_id: Uuid,
    pub contact_id: Uuid,
    /// Who asked: equal to `truster_id` or to `contact_id`.
    pub actor_id: Uuid,
}

/// A `contact.disconnect_requested` was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ContactDisconnectRejected {
    pub truster_id: Uuid,
    /// The truster's active contact; null when there is none, or when the
    /// sender is neither the truster nor the contact (`not_a_party`).
    pub contact_id: Option<Uuid>,
    pub actor_id: Uuid,
    #[schemars(schema_with = "crate::reasons::refusal_schema")]
    pub reason: String,
}

/// A recovery request is open and waits for the contact to confirm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecoveryAwaitingContact {
    pub recovery_id: Uuid,
    pub truster_id: Uuid,
    pub contact_id: Uuid,
    /// The request lapses at this instant (60 minutes by default).
    pub expires_at: DateTime<Utc>,
    /// True when a request was already active and is returned instead of
    /// opening a second one.
    pub existing: bool,
}

/// A command about a recovery was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecoveryRejected {
    /// Null when `recovery.requested` was refused before a request was opened.
    pub recovery_id: Option<Uuid>,
    /// Null when the command named a request that does not exist, or when
    /// its sender may not act on it (nobody learns whose it is).
    pub truster_id: Option<Uuid>,
    /// Who sent the refused command; null for `recovery.requested`, which
    /// comes from the portal's recovery flow rather than a person.
    pub actor_id: Option<Uuid>,
    #[schemars(schema_with = "crate::reasons::refusal_schema")]
    pub reason: String,
}

/// A one-time code went to the contact's phone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecoveryCodeSent {
    pub recovery_id: Uuid,
    pub truster_id: Uuid,
    pub contact_id: Uuid,
    /// The code is accepted until this instant (5 minutes by default).
    pub code_expires_at: DateTime<Utc>,
    /// How many more codes may be sent for this request.
    pub codes_left: u32,
}

/// A submitted code was not accepted; the request stays open. The wrong
/// attempt that locks the request is answered with `recovery.rejected`
/// (`reason` = `recovery_locked`) instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecoveryCodeRejected {
    pub recovery_id: Uuid,
    pub truster_id: Uuid,
    pub contact_id: Uuid,
    pub attempts_left: u32,
    /// Why, e.g. `code_incorrect` or `code_expired`.
    #[schemars(schema_with = "crate::reasons::refusal_schema")]
    pub reason: String,
}

/// The contact approved: the portal may issue the temporary password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecoveryApproved {
    pub recovery_id: Uuid,
    pub truster_id: Uuid,
    pub contact_id: Uuid,
}

/// The contact declined the recovery; recorded for the fraud team.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecoveryDeclined {
    pub recovery_id: Uuid,
    pub truster_id: Uuid,
    pub contact_id: Uuid,
    #[schemars(schema_with = "crate::reasons::decline_schema")]
    pub reason: String,
}

/// The request lapsed without approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecoveryExpired {
    pub recovery_id: Uuid,
    pub truster_id: Uuid,
    pub contact_id: Uuid,
}

/// The truster cancelled the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RecoveryCancelled {
    pub recovery_id: Uuid,
    pub truster_id: Uuid,
    pub contact_id: Uuid,
}

/// Something a person should see in their personal account. Texts addressed
/// to a contact name the truster only by first name and last-name initial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CabinetNotification {
    pub account_id: Uuid,
    /// What the notification is about, so the portal can style or group it.
    pub kind: String,
    /// The text in Russian.
    pub text: String,
}

/// Internal: an SMS could not be delivered and will not be retried. Sent to
/// the flow that asked for it, so that flow can tell the people involved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SmsFailed {
    /// The idempotency key the SMS was requested under.
    pub idempotency_key: String,
    /// Why, e.g. `sms_rejected`.
    #[schemars(schema_with = "crate::reasons::refusal_schema")]
    pub reason: String,
}

macro_rules! event {
    ($($payload:ty => $kind:ident),* $(,)?) => {
        $(impl Message for $payload {
            const TYPE: &'static str = event_type::$kind;
        })*
    };
}

event! {
    InvitationSent => INVITATION_SENT,
    InvitationRejected => INVITATION_REJECTED,
    InvitationAccepted => INVITATION_ACCEPTED,
    InvitationDeclined => INVITATION_DECLINED,
    InvitationExpired => INVITATION_EXPIRED,
    ContactDisconnected => CONTACT_DISCONNECTED,
    ContactDisconnectRejected => CONTACT_DISCONNECT_REJECTED,
    RecoveryAwaitingContact => RECOVERY_AWAITING_CONTACT,
    RecoveryRejected => RECOVERY_REJECTED,
    RecoveryCodeSent => RECOVERY_CODE_SENT,
    RecoveryCodeRejected => RECOVERY_CODE_REJECTED,
    RecoveryApproved => RECOVERY_APPROVED,
    RecoveryDeclined => RECOVERY_DECLINED,
    RecoveryExpired => RECOVERY_EXPIRED,
    RecoveryCancelled => RECOVERY_CANCELLED,
    CabinetNotification => CABINET_NOTIFICATION,
    SmsFailed => SMS_FAILED,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reasons;
    use serde_json::json;

    #[test]
    fn a_refusal_before_an_invitation_was_opened_carries_a_null_id() {
        let truster = Uuid::now_v7();
        let event = InvitationRejected {
            invitation_id: None,
            truster_id: Some(truster),
            actor_id: truster,
            reason: reasons::CONTACT_NOT_FOUND.to_owned(),
        };
        let value = serde_json::to_value(&event).unwrap();
        assert_eq!(value["invitation_id"], json!(null));
        assert_eq!(value["reason"], json!("contact_not_found"));
    }

    #[test]
    fn internal_events_are_not_among_the_portals() {
        for kind in event_type::INTERNAL {
            assert!(!event_type::ALL.contains(kind));
        }
    }
}
