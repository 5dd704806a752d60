//! `recovery.confirmed`: the contact checked with the truster and asks for a
//! code. Draws a new one-time code (the previous one dies), keeps its HMAC
//! and sends the code by SMS, within the limits on count and pace.

use chrono::{DateTime, Utc};
use serde_json::json;
use trusted_contact_contracts::{
    Envelope, Message, commands::RecoveryConfirmed, events::RecoveryCodeSent, reasons,
};

use super::{
    NAME, RecoverySettings, chrono_duration,
    code::{OneTimeCode, code_hmac},
    expiry,
    store::{self, RecoveryRow, Refusal},
    whole_minutes,
};
use crate::{
    ledger::{LedgerTx, db_now},
    recovery::seal::CodeSeal,
    runtime::{Context, HandlerError},
    sms::{SmsTemplate, request_sms},
};

pub async fn handle(
    settings: &RecoverySettings,
    context: &Context,
    message: &Envelope,
) -> Result<(), HandlerError> {
    let command: RecoveryConfirmed = message.payload_as()?;
    context.once(message, async |tx| step(settings, tx, &command).await).await
}

async fn step(
    settings: &RecoverySettings,
    tx: &mut LedgerTx,
    command: &RecoveryConfirmed,
) -> Result<(), HandlerError> {
    let now = db_now(tx.conn()).await?;
    let (recovery_id, actor_id) = (command.recovery_id, command.actor_id);
    let Some(request) = store::open_for_contact(tx, recovery_id, actor_id, now).await? else {
        return Ok(());
    };
    if let Some(reason) = pace_problem(settings, &request, now) {
        let refusal = Refusal { truster_id: Some(request.truster_id), reason };
        return store::refuse(tx, Some(recovery_id), Some(actor_id), refusal).await;
    }
    let truster = store::person(tx.conn(), request.truster_id).await?;
    let contact = store::person(tx.conn(), request.contact_id).await?;
    let Some(phone) = contact.phone else {
        let refusal =
            Refusal { truster_id: Some(request.truster_id), reason: reasons::CONTACT_NO_PHONE };
        return store::refuse(tx, Some(recovery_id), Some(actor_id), refusal).await;
    };

    let code = OneTimeCode::generate();
    let code_number = request.codes_sent + 1;
    let code_expires_at = now + chrono_duration(settings.code_ttl);
    store_code(tx, &request, &code, settings, code_expires_at, now).await?;
    let detail = json!({ "code_number": code_number, "code_expires_at": code_expires_at });
    store::audit(tx, Some(actor_id), Some(recovery_id), "code_sent", detail).await?;
    // The code leaves this handler only sealed; the SMS worker opens it to
    // write the text.
    let template = SmsTemplate::RecoveryCode {
        sealed_code: CodeSeal::new(&settings.code_secret)?.seal(code.expose())?,
        truster_short_name: truster.short_name,
        valid_minutes: u32::try_from(whole_minutes(settings.code_ttl)).unwrap_or(u32::MAX),
    };
    request_sms(tx, NAME, request.contact_id, &phone, template)?;
    let codes_left = settings.code_max_sends.saturating_sub(code_number.unsigned_abs());
    tx.publish_event(
        RecoveryCodeSent::TYPE,
        &RecoveryCodeSent {
            recovery_id,
            truster_id: request.truster_id,
            contact_id: request.contact_id,
            code_expires_at,
            codes_left,
        },
    )?;
    expiry::schedule_code_deadline(tx, recovery_id, code_number, settings.code_ttl)?;
    tracing::debug!(recovery_id = %recovery_id, code_number, "recovery code sent");
    Ok(())
}

/// At most `code_max_sends` codes per request, at least `code_min_interval`
/// apart.
fn pace_problem(
    settings: &RecoverySettings,
    request: &RecoveryRow,
    now: DateTime<Utc>,
) -> Option<&'static str> {
    if request.codes_sent.unsigned_abs() >= settings.code_max_sends {
        return Some(reasons::CODE_LIMIT_REACHED);
    }
    let next_allowed = request.last_code_at? + chrono_duration(settings.code_min_interval);
    (now < next_allowed).then_some(reasons::CODE_TOO_SOON)
}

/// Replaces the stored HMAC, so the previous code stops matching.
async fn store_code(
    tx: &mut LedgerTx,
    request: &RecoveryRow,
    code: &OneTimeCode,
    settings: &RecoverySettings,
    code_expires_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), HandlerError> {
    let hmac = code_hmac(&settings.code_secret, request.recovery_id, code)
        .map_err(HandlerError::permanent)?;
    let updated = sqlx::query(
        "UPDATE recovery_requests \
         SET status = 'code_sent', code_hmac = $2, code_expires_at = $3, \
             codes_sent = codes_sent + 1, last_code_at = $4 \
         WHERE recovery_id = $1 AND status IN ('awaiting_contact', 'code_sent') \
           AND codes_sent = $5",
    )
    .bind(request.recovery_id)
    .bind(hmac)
    .bind(code_expires_at)
    .bind(now)
    .bind(request.codes_sent)
    .execute(tx.conn())
    .await?
    .rows_affected();
    store::expect_one(updated, request.recovery_id)
}
