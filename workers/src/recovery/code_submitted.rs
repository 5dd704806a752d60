//! `recovery.code_submitted`: the contact types the code. A correct, fresh
//! code approves the recovery; a wrong one costs an attempt, and the last
//! attempt locks the request.

use serde_json::json;
use trusted_contact_contracts::{
    Envelope, Message,
    commands::RecoveryCodeSubmitted,
    events::{RecoveryApproved, RecoveryCodeRejected},
    reasons,
};

use super::{
    RecoverySettings,
    code::code_matches,
    notices,
    store::{self, RecoveryRow, Refusal},
};
use crate::{
    ledger::{LedgerTx, db_now},
    runtime::{Context, HandlerError},
};

pub async fn handle(
    settings: &RecoverySettings,
    context: &Context,
    message: &Envelope,
) -> Result<(), HandlerError> {
    let command: RecoveryCodeSubmitted = message.payload_as()?;
    context.once(message, async |tx| step(settings, tx, &command).await).await
}

async fn step(
    settings: &RecoverySettings,
    tx: &mut LedgerTx,
    command: &RecoveryCodeSubmitted,
) -> Result<(), HandlerError> {
    let now = db_now(tx.conn()).await?;
    let (recovery_id, actor_id) = (command.recovery_id, command.actor_id);
    let Some(request) = store::open_for_contact(tx, recovery_id, actor_id, now).await? else {
        return Ok(());
    };
    let stored = match (&request.code_hmac, request.code_expires_at) {
        (Some(stored), Some(expires_at)) if expires_at > now => stored.clone(),
        // Neither an unsent nor an expired code costs an attempt: nothing
        // was compared.
        _ => {
            let reason = if request.codes_sent == 0 {
                reasons::CODE_NOT_SENT
            } else {
                reasons::CODE_EXPIRED
            };
            return reject_code(settings, tx, &request, request.wrong_attempts, reason).await;
        }
    };
    let matches = code_matches(&settings.code_secret, recovery_id, &command.code, &stored)
        .map_err(HandlerError::permanent)?;
    if matches {
        return approve(tx, &request).await;
    }
    let wrong = request.wrong_attempts + 1;
    if wrong.unsigned_abs() >= settings.code_max_attempts {
        return lock(tx, &request, wrong).await;
    }
    let counted = sqlx::query(
        "UPDATE recovery_requests SET wrong_attempts = $2 \
         WHERE recovery_id = $1 AND status = 'code_sent' AND wrong_attempts = $3",
    )
    .bind(recovery_id)
    .bind(wrong)
    .bind(request.wrong_attempts)
    .execute(tx.conn())
    .await?
    .rows_affected();
    store::expect_one(counted, recovery_id)?;
    reject_code(settings, tx, &request, wrong, reasons::CODE_INCORRECT).await
}

async fn reject_code(
    settings: &RecoverySettings,
    tx: &mut LedgerTx,
    request: &RecoveryRow,
    wrong_attempts: i32,
    reason: &'static str,
) -> Result<(), HandlerError> {
    let attempts_left = settings.code_max_attempts.saturating_sub(wrong_attempts.unsigned_abs());
    tx.publish_event(
        RecoveryCodeRejected::TYPE,
        &RecoveryCodeRejected {
            recovery_id: request.recovery_id,
            truster_id: request.truster_id,
            contact_id: request.contact_id,
            attempts_left,
            reason: reason.to_owned(),
        },
    )?;
    let detail = json!({ "reason": reason, "attempts_left": attempts_left });
    store::audit(tx, Some(request.contact_id), Some(request.recovery_id), "code_rejected", detail)
        .await?;
    Ok(())
}

async fn approve(tx: &mut LedgerTx, request: &RecoveryRow) -> Result<(), HandlerError> {
    let approved = sqlx::query(
        "UPDATE recovery_requests \
         SET status = 'approved', decided_at = now(), code_hmac = NULL \
         WHERE recovery_id = $1 AND status = 'code_sent'",
    )
    .bind(request.recovery_id)
    .execute(tx.conn())
    .await?
    .rows_affected();
    store::expect_one(approved, request.recovery_id)?;
    store::audit(tx, Some(request.contact_id), Some(request.recovery_id), "approved", json!({}))
        .await?;
    tx.publish_event(
        RecoveryApproved::TYPE,
        &RecoveryApproved {
            recovery_id: request.recovery_id,
            truster_id: request.truster_id,
            contact_id: request.contact_id,
        },
    )?;
    let truster = store::person(tx.conn(), request.truster_id).await?;
    let to_truster = notices::truster_approved();
    store::notify(tx, request.truster_id, to_truster.kind, to_truster.text)?;
    let to_contact = notices::contact_approved(&truster.short_name);
    store::notify(tx, request.contact_id, to_contact.kind, to_contact.text)?;
    tracing::debug!(recovery_id = %request.recovery_id, "recovery approved");
    Ok(())
}

/// The last wrong attempt ends the request; the truster must start anew.
async fn lock(tx: &mut LedgerTx, request: &RecoveryRow, wrong: i32) -> Result<(), HandlerError> {
    let locked = sqlx::query(
        "UPDATE recovery_requests \
         SET status = 'locked', decided_at = now(), code_hmac = NULL, wrong_attempts = $2 \
         WHERE recovery_id = $1 AND status = 'code_sent'",
    )
    .bind(request.recovery_id)
    .bind(wrong)
    .execute(tx.conn())
    .await?
    .rows_affected();
    store::expect_one(locked, request.recovery_id)?;
    let detail = json!({ "wrong_attempts": wrong });
    store::audit(tx, Some(request.contact_id), Some(request.recovery_id), "locked", detail).await?;
    let refusal =
        Refusal { truster_id: Some(request.truster_id), reason: reasons::RECOVERY_LOCKED };
    store::refuse(tx, Some(request.recovery_id), Some(request.contact_id), refusal).await?;
    let notice = notices::truster_locked();
    store::notify(tx, request.truster_id, notice.kind, notice.text)?;
    tracing::debug!(recovery_id = %request.recovery_id, "recovery request locked");
    Ok(())
}
