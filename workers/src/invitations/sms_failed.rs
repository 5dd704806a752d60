//! `sms.failed` for the invitation notice: the contact could not be reached
//! by SMS. The invitation stays valid in the contact's cabinet; the truster
//! is told so they can let the contact know another way.

use serde::Deserialize;
use serde_json::json;
use trusted_contact_contracts::Envelope;
use uuid::Uuid;

use super::ledger_queries::{audit, notify};
use crate::runtime::{Context, HandlerError};

/// The fields this step needs; the SMS worker may send more.
#[derive(Deserialize)]
struct SmsFailed {
    idempotency_key: String,
    reason: String,
}

pub async fn handle(context: &Context, message: &Envelope) -> Result<(), HandlerError> {
    let failed: SmsFailed = message.payload_as()?;
    let Some(mut tx) = context.begin(message).await? else { return Ok(()) };
    let found: Option<(Uuid, Uuid, Uuid, String)> = sqlx::query_as(
        "SELECT invitation_id, truster_id, contact_id, status FROM invitations \
         WHERE sms_idempotency_key = $1",
    )
    .bind(&failed.idempotency_key)
    .fetch_optional(tx.conn())
    .await?;
    let Some((invitation_id, truster_id, contact_id, status)) = found else {
        tracing::warn!("sms.failed names no invitation notice of this worker");
        return context.commit(tx).await;
    };
    let detail = json!({ "reason": failed.reason, "contact_id": contact_id });
    audit(&mut tx, None, "invitation", Some(invitation_id), "invitation_sms_failed", detail)
        .await?;
    // Only a pending invitation is worth a word: once decided, the truster
    // already knows how it ended.
    if status == "pending" {
        let text = "Не удалось отправить SMS приглашённому человеку. Приглашение доступно \
                    в его личном кабинете; сообщите ему об этом сами."
            .to_owned();
        notify(&mut tx, truster_id, "invitation_sms_failed", text)?;
    }
    tracing::info!(invitation.id = %invitation_id, "invitation notice SMS failed");
    context.commit(tx).await
}
