//! Invitation deadlines: the message that expires an invitation, built the
//! same way by the request step (delayed through the broker) and by the
//! sweeper's periodic sweep (for deadlines whose message was lost), so that
//! the sweeper's inbox keeps one of them; and the step that expires.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::{FromRow, PgPool};
use trusted_contact_contracts::{Envelope, SUPPORTED_VERSION, event_type, events};
use uuid::Uuid;

use super::ledger_queries::{audit, invitation, lock_account, notify};
use crate::{
    runtime::{Context, HandlerError},
    sweeper,
};

/// Type of the deadline message, sent straight to the sweeper's queue.
pub const INVITATION_DEADLINE: &str = "invitation.deadline";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InvitationDeadline {
    pub invitation_id: Uuid,
}

/// The deadline message of an invitation. Its id is derived from the
/// invitation id alone, and every other field from the invitation's row, so
/// the delayed copy and any copy a sweep sends again are the same message.
pub fn deadline_envelope(
    invitation_id: Uuid,
    request_message_id: Option<Uuid>,
    correlation_id: &str,
    expires_at: DateTime<Utc>,
) -> anyhow::Result<Envelope> {
    Ok(Envelope {
        message_id: deadline_message_id(invitation_id),
        kind: INVITATION_DEADLINE.to_owned(),
        version: SUPPORTED_VERSION,
        occurred_at: expires_at,
        correlation_id: Some(correlation_id.to_owned()),
        causation_id: request_message_id.map(|id| id.to_string()),
        payload: serde_json::to_value(InvitationDeadline { invitation_id })?,
    })
}

/// A name-based UUID (version 8, SHA-256) of the invitation's deadline.
fn deadline_message_id(invitation_id: Uuid) -> Uuid {
    let mut hash = Sha256::new();
    hash.update(b"trusted-contact/invitation.deadline/");
    hash.update(invitation_id.as_bytes());
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Expires the invitation if it is still pending and due. A deadline that
/// arrives early (clock skew between broker and database) is retried later
/// without being recorded, so that its id stays free for the real expiry.
pub async fn handle_deadline(context: &Context, message: &Envelope) -> Result<(), HandlerError> {
    let deadline: InvitationDeadline = message.payload_as()?;
    let Some(mut tx) = context.begin(message).await? else { return Ok(()) };
    let Some(unlocked) = invitation(tx.conn(), deadline.invitation_id, false).await? else {
        tracing::warn!(invitation.id = %deadline.invitation_id, "deadline of unknown invitation");
        return context.commit(tx).await;
    };
    // The acceptance's lock order: the contact's account, then the
    // invitation. An acceptance that began before the deadline and waits for
    // the contact's row (other trusters' acceptances ahead of it) then
    // decides first, rather than finding the invitation expired under it.
    lock_account(tx.conn(), unlocked.contact_id).await?;
    let Some(found) = invitation(tx.conn(), deadline.invitation_id, true).await? else {
        return context.commit(tx).await;
    };
    if found.status != "pending" {
        return context.commit(tx).await;
    }
    if !found.overdue {
        return Err(sweeper::arrived_early(found.expires_at, Utc::now()));
    }
    let expired = sqlx::query(
        "UPDATE invitations SET status = 'expired', decided_at = now() \
         WHERE invitation_id = $1 AND status = 'pending' AND expires_at <= now()",
    )
    .bind(found.invitation_id)
    .execute(tx.conn())
    .await?
    .rows_affected();
    if expired == 1 {
        let detail = json!({ "truster_id": found.truster_id, "contact_id": found.contact_id });
        let id = Some(found.invitation_id);
        audit(&mut tx, None, "invitation", id, "invitation_expired", detail).await?;
        let event = events::InvitationExpired {
            invitation_id: found.invitation_id,
            truster_id: found.truster_id,
            contact_id: found.contact_id,
        };
        tx.publish_event(event_type::INVITATION_EXPIRED, &event)?;
        let text = "Приглашение не было принято вовремя и истекло. \
                    Вы можете отправить новое приглашение."
            .to_owned();
        notify(&mut tx, found.truster_id, "invitation_expired", text)?;
        tracing::info!(invitation.id = %found.invitation_id, "invitation expired");
    }
    context.commit(tx).await
}

#[derive(FromRow)]
struct DueInvitation {
    invitation_id: Uuid,
    request_message_id: Option<Uuid>,
    correlation_id: String,
    expires_at: DateTime<Utc>,
}

/// Deadline messages for pending invitations past their deadline, oldest
/// first. Rows another transaction holds (being expired or accepted right
/// now) are skipped: that transaction decides them.
pub async fn due_deadlines(pool: &PgPool, limit: i64) -> anyhow::Result<Vec<Envelope>> {
    let due: Vec<DueInvitation> = sqlx::query_as(
        "SELECT invitation_id, request_message_id, correlation_id, expires_at \
         FROM invitations WHERE status = 'pending' AND expires_at <= now() \
         ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    due.into_iter()
        .map(|row| {
            deadline_envelope(
                row.invitation_id,
                row.request_message_id,
                &row.correlation_id,
                row.expires_at,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_of_one_invitation_always_has_the_same_id() {
        let invitation = Uuid::now_v7();
        assert_eq!(deadline_message_id(invitation), deadline_message_id(invitation));
        assert_ne!(deadline_message_id(invitation), deadline_message_id(Uuid::now_v7()));
    }
}
