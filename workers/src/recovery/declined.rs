//! `recovery.declined`: the contact refuses to approve, saying why. The
//! request ends, the truster is told, and the decline goes to the fraud team.

use serde_json::json;
use trusted_contact_contracts::{
    Envelope, Message,
    commands::RecoveryDeclined,
    events,
    reasons::{self, decline_reason},
};

use super::{
    notices,
    store::{self, Refusal},
};
use crate::{
    ledger::{LedgerTx, db_now},
    runtime::{Context, HandlerError},
};

pub async fn handle(context: &Context, message: &Envelope) -> Result<(), HandlerError> {
    let command: RecoveryDeclined = message.payload_as()?;
    context.once(message, async |tx| step(tx, &command).await).await
}

async fn step(tx: &mut LedgerTx, command: &RecoveryDeclined) -> Result<(), HandlerError> {
    let (recovery_id, actor_id) = (command.recovery_id, command.actor_id);
    let now = db_now(tx.conn()).await?;
    let Some(request) = store::open_for_contact(tx, recovery_id, actor_id, now).await? else {
        return Ok(());
    };
    if !decline_reason::is_valid(&command.reason) {
        let refusal = Refusal {
            truster_id: Some(request.truster_id),
            reason: reasons::INVALID_DECLINE_REASON,
        };
        return store::refuse(tx, Some(recovery_id), Some(actor_id), refusal).await;
    }
    let declined = sqlx::query(
        "UPDATE recovery_requests SET status = 'declined', decided_at = now(), code_hmac = NULL \
         WHERE recovery_id = $1 AND status IN ('awaiting_contact', 'code_sent')",
    )
    .bind(recovery_id)
    .execute(tx.conn())
    .await?
    .rows_affected();
    store::expect_one(declined, recovery_id)?;
    sqlx::query(
        "INSERT INTO fraud_reports (recovery_id, truster_id, contact_id, reason) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(recovery_id)
    .bind(request.truster_id)
    .bind(request.contact_id)
    .bind(&command.reason)
    .execute(tx.conn())
    .await?;
    let detail = json!({ "reason": command.reason });
    store::audit(tx, Some(actor_id), Some(recovery_id), "declined", detail).await?;
    tx.publish_event(
        events::RecoveryDeclined::TYPE,
        &events::RecoveryDeclined {
            recovery_id,
            truster_id: request.truster_id,
            contact_id: request.contact_id,
            reason: command.reason.clone(),
        },
    )?;
    let notice = notices::truster_declined();
    store::notify(tx, request.truster_id, notice.kind, notice.text)?;
    tracing::debug!(recovery_id = %recovery_id, "recovery declined by the contact");
    Ok(())
}
