//! `recovery.cancelled`: the truster, from a session still logged in, ends a
//! request they did not start. The contact is told that nothing is needed.

use serde_json::json;
use trusted_contact_contracts::{Envelope, Message, commands::RecoveryCancelled, events};

use super::{NAME, notices, store};
use crate::{
    ledger::{LedgerTx, db_now},
    runtime::{Context, HandlerError},
    sms::{SmsTemplate, request_sms},
};

pub async fn handle(context: &Context, message: &Envelope) -> Result<(), HandlerError> {
    let command: RecoveryCancelled = message.payload_as()?;
    context.once(message, async |tx| step(tx, &command).await).await
}

async fn step(tx: &mut LedgerTx, command: &RecoveryCancelled) -> Result<(), HandlerError> {
    let (recovery_id, actor_id) = (command.recovery_id, command.actor_id);
    let now = db_now(tx.conn()).await?;
    let Some(request) = store::open_for_truster(tx, recovery_id, actor_id, now).await? else {
        return Ok(());
    };
    let cancelled = sqlx::query(
        "UPDATE recovery_requests SET status = 'cancelled', decided_at = now(), code_hmac = NULL \
         WHERE recovery_id = $1 AND status IN ('awaiting_contact', 'code_sent')",
    )
    .bind(recovery_id)
    .execute(tx.conn())
    .await?
    .rows_affected();
    store::expect_one(cancelled, recovery_id)?;
    store::audit(tx, Some(actor_id), Some(recovery_id), "cancelled", json!({})).await?;
    tx.publish_event(
        events::RecoveryCancelled::TYPE,
        &events::RecoveryCancelled {
            recovery_id,
            truster_id: request.truster_id,
            contact_id: request.contact_id,
        },
    )?;
    // The contact was asked by SMS to act, so an SMS also says they need not.
    let truster = store::person(tx.conn(), request.truster_id).await?;
    let contact = store::person(tx.conn(), request.contact_id).await?;
    let notice = notices::contact_cancelled(&truster.short_name);
    store::notify(tx, request.contact_id, notice.kind, notice.text)?;
    if let Some(phone) = contact.phone.as_deref() {
        let template = SmsTemplate::RecoveryCancelled { truster_short_name: truster.short_name };
        request_sms(tx, NAME, request.contact_id, phone, template)?;
    }
    tracing::debug!(recovery_id = %recovery_id, "recovery cancelled by the truster");
    Ok(())
}

/// Ends the truster's active request because the link it was sent over is
/// gone (the truster disconnected the contact). Meant for the disconnection
/// step, in its own transaction; `requested` also calls it for a request
/// whose link ended before this rule ran.
pub async fn end_for_disconnection(
    tx: &mut LedgerTx,
    request: &store::RecoveryRow,
) -> Result<(), HandlerError> {
    let ended = sqlx::query(
        "UPDATE recovery_requests SET status = 'cancelled', decided_at = now(), code_hmac = NULL \
         WHERE recovery_id = $1 AND status IN ('awaiting_contact', 'code_sent')",
    )
    .bind(request.recovery_id)
    .execute(tx.conn())
    .await?
    .rows_affected();
    store::expect_one(ended, request.recovery_id)?;
    let detail = json!({ "link_id": request.link_id });
    store::audit(tx, None, Some(request.recovery_id), "ended_by_disconnection", detail).await?;
    tx.publish_event_in_flow(
        &request.correlation_id,
        events::RecoveryCancelled::TYPE,
        &events::RecoveryCancelled {
            recovery_id: request.recovery_id,
            truster_id: request.truster_id,
            contact_id: request.contact_id,
        },
    )?;
    tracing::debug!(recovery_id = %request.recovery_id, "recovery ended by disconnection");
    Ok(())
}

/// The truster's active request, if any, ended because its link is gone.
/// For the disconnection step: call it in the same transaction that ends the
/// link, so no request outlives its contact.
pub async fn end_active_for_disconnection(
    tx: &mut LedgerTx,
    truster_id: uuid::Uuid,
) -> Result<Option<uuid::Uuid>, HandlerError> {
    let Some(request) = store::lock_active_request(tx.conn(), truster_id).await? else {
        return Ok(None);
    };
    end_for_disconnection(tx, &request).await?;
    Ok(Some(request.recovery_id))
}
