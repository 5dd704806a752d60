//! `recovery.cancelled`: the truster, from a session still logged in, ends a
//! request they did not start. The contact is told that nothing is needed.

use chrono::Utc;
use serde_json::json;
use trusted_contact_contracts::{Envelope, Message, commands::RecoveryCancelled, events};

use super::{
    NAME, notices,
    store::{self, Gate},
};
use crate::{
    ledger::LedgerTx,
    runtime::{Context, HandlerError},
    sms::{SmsTemplate, request_sms},
};

pub async fn handle(context: &Context, message: &Envelope) -> Result<(), HandlerError> {
    let command: RecoveryCancelled = message.payload_as()?;
    let Some(mut tx) = context.begin(message).await? else { return Ok(()) };
    step(&mut tx, &command).await?;
    context.commit(tx).await
}

async fn step(tx: &mut LedgerTx, command: &RecoveryCancelled) -> Result<(), HandlerError> {
    let (recovery_id, actor_id) = (command.recovery_id, command.actor_id);
    let request = match store::truster_gate(tx.conn(), recovery_id, actor_id, Utc::now()).await? {
        Gate::Open(request) => request,
        Gate::Refused(refusal) => {
            return store::refuse(tx, Some(recovery_id), Some(actor_id), refusal).await;
        }
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
