//! `invitation.declined`: the invited person says no before the deadline;
//! the truster is told and may invite someone else.

use serde_json::json;
use trusted_contact_contracts::{
    Envelope, commands::InvitationDeclined, event_type, events, reasons,
};

use super::ledger_queries::{audit, invitation, notify, reject_invitation};
use crate::runtime::{Context, HandlerError};

pub async fn handle(context: &Context, message: &Envelope) -> Result<(), HandlerError> {
    let command: InvitationDeclined = message.payload_as()?;
    let Some(mut tx) = context.begin(message).await? else { return Ok(()) };
    let id = command.invitation_id;
    let found = invitation(tx.conn(), id, true).await?;
    let reason = match &found {
        None => Some(reasons::INVITATION_NOT_FOUND),
        Some(found) if found.contact_id != command.actor_id => Some(reasons::NOT_INVITED_CONTACT),
        Some(found) => match found.status.as_str() {
            "pending" if found.overdue => Some(reasons::INVITATION_EXPIRED),
            "pending" => None,
            "expired" => Some(reasons::INVITATION_EXPIRED),
            "replaced" => Some(reasons::INVITATION_REPLACED),
            _ => Some(reasons::INVITATION_NOT_PENDING),
        },
    };
    match (found, reason) {
        (Some(found), None) => {
            sqlx::query(
                "UPDATE invitations SET status = 'declined', decided_at = now() \
                 WHERE invitation_id = $1 AND status = 'pending' AND expires_at > now()",
            )
            .bind(id)
            .execute(tx.conn())
            .await?;
            let detail = json!({ "truster_id": found.truster_id });
            audit(
                &mut tx,
                Some(command.actor_id),
                "invitation",
                Some(id),
                "invitation_declined",
                detail,
            )
            .await?;
            let event = events::InvitationDeclined {
                invitation_id: id,
                truster_id: found.truster_id,
                contact_id: found.contact_id,
            };
            tx.publish_event(event_type::INVITATION_DECLINED, &event)?;
            let text = "Приглашение стать доверенным лицом отклонено. \
                        Вы можете пригласить другого человека."
                .to_owned();
            notify(&mut tx, found.truster_id, "invitation_declined", text)?;
        }
        (found, reason) => {
            let reason = reason.unwrap_or(reasons::INVITATION_NOT_FOUND);
            // Someone else's invitation: they learn nothing of who sent it.
            let truster =
                found.map(|f| f.truster_id).filter(|_| reason != reasons::NOT_INVITED_CONTACT);
            reject_invitation(&mut tx, Some(id), truster, command.actor_id, reason).await?;
        }
    }
    context.commit(tx).await
}
