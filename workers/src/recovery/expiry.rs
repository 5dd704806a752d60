//! The end of a recovery request's time, and of a code's. Deadlines travel as
//! delayed messages to the sweeper; the sweeper also sweeps the ledger for
//! deadlines whose message was lost. Both build the same message id, so they
//! meet on one inbox row and each deadline takes effect once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use trusted_contact_contracts::{
    Envelope, Message, SUPPORTED_VERSION, Topology, events::RecoveryExpired,
};
use uuid::Uuid;

use super::{
    NAME, notices,
    store::{self, RecoveryRow},
};
use crate::{
    ledger::{LedgerTx, db_now},
    runtime::{Context, HandlerError},
    sms::{SmsTemplate, request_sms},
    sweeper,
};

/// A request's window has passed (to the sweeper's queue).
pub const RECOVERY_DEADLINE: &str = "recovery.deadline";
/// A code's validity has passed (to the sweeper's queue).
pub const CODE_DEADLINE: &str = "recovery.code_deadline";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecoveryDeadline {
    pub recovery_id: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CodeDeadline {
    pub recovery_id: Uuid,
    /// Which of the request's codes (1, 2, 3): a deadline of a code already
    /// replaced by a newer one does nothing.
    pub code_number: i32,
}

/// Namespace of the deadline message ids (a fixed random UUID).
const DEADLINE_NAMESPACE: Uuid = Uuid::from_u128(0x6c1f_0a53_2e7d_4b39_9a0e_55d1_c3f8_7b12);

/// The message id of a deadline: the same whoever builds it.
pub fn deadline_id(kind: &str, recovery_id: Uuid, code_number: Option<i32>) -> Uuid {
    let name = match code_number {
        Some(number) => format!("{kind}:{recovery_id}:{number}"),
        None => format!("{kind}:{recovery_id}"),
    };
    Uuid::new_v5(&DEADLINE_NAMESPACE, name.as_bytes())
}

pub fn schedule_request_deadline(
    tx: &mut LedgerTx,
    recovery_id: Uuid,
    window: Duration,
) -> anyhow::Result<()> {
    let id = deadline_id(RECOVERY_DEADLINE, recovery_id, None);
    let payload = RecoveryDeadline { recovery_id };
    let delay = window + sweeper::DEADLINE_MARGIN;
    tx.schedule_with_id(sweeper::NAME, delay, RECOVERY_DEADLINE, id, &payload)?;
    Ok(())
}

pub fn schedule_code_deadline(
    tx: &mut LedgerTx,
    recovery_id: Uuid,
    code_number: i32,
    ttl: Duration,
) -> anyhow::Result<()> {
    let id = deadline_id(CODE_DEADLINE, recovery_id, Some(code_number));
    let payload = CodeDeadline { recovery_id, code_number };
    let delay = ttl + sweeper::DEADLINE_MARGIN;
    tx.schedule_with_id(sweeper::NAME, delay, CODE_DEADLINE, id, &payload)?;
    Ok(())
}

/// Handles a delayed `recovery.deadline` or `recovery.code_deadline` in the
/// sweeper.
pub async fn expire_recovery(context: &Context, message: &Envelope) -> Result<(), HandlerError> {
    let expire = async |tx: &mut LedgerTx| {
        let now = db_now(tx.conn()).await?;
        apply_deadline(tx, message, now).await.map(|_expired| ())
    };
    context.once(message, expire).await
}

/// What one sweep ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub requests_expired: u64,
    pub codes_expired: u64,
}

/// Ends every request and code whose deadline passed by `now`, at most
/// `batch` of each, as the sweeper consumer. Safe to run from several
/// processes at once and alongside the delayed messages.
pub async fn sweep_due_recoveries(
    pool: &PgPool,
    topology: &Topology,
    now: DateTime<Utc>,
    batch: i64,
) -> anyhow::Result<SweepReport> {
    let mut report = SweepReport::default();
    let due: Vec<(Uuid, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT recovery_id, correlation_id, expires_at FROM recovery_requests \
         WHERE status IN ('awaiting_contact', 'code_sent') AND expires_at <= $1 \
         ORDER BY expires_at LIMIT $2",
    )
    .bind(now)
    .bind(batch)
    .fetch_all(pool)
    .await?;
    for (recovery_id, correlation_id, expires_at) in due {
        let payload = serde_json::to_value(RecoveryDeadline { recovery_id })?;
        let id = deadline_id(RECOVERY_DEADLINE, recovery_id, None);
        let envelope = swept_envelope(id, RECOVERY_DEADLINE, correlation_id, expires_at, payload);
        if sweep_one(pool, topology, &envelope, now).await? {
            report.requests_expired += 1;
        }
    }
    let due: Vec<(Uuid, String, i32, DateTime<Utc>)> = sqlx::query_as(
        "SELECT recovery_id, correlation_id, codes_sent, code_expires_at \
         FROM recovery_requests \
         WHERE status = 'code_sent' AND code_hmac IS NOT NULL AND code_expires_at <= $1 \
         ORDER BY code_expires_at LIMIT $2",
    )
    .bind(now)
    .bind(batch)
    .fetch_all(pool)
    .await?;
    for (recovery_id, correlation_id, code_number, expires_at) in due {
        let payload = serde_json::to_value(CodeDeadline { recovery_id, code_number })?;
        let id = deadline_id(CODE_DEADLINE, recovery_id, Some(code_number));
        let envelope = swept_envelope(id, CODE_DEADLINE, correlation_id, expires_at, payload);
        if sweep_one(pool, topology, &envelope, now).await? {
            report.codes_expired += 1;
        }
    }
    Ok(report)
}

/// The deadline message as the sweep rebuilds it: the scheduled one's id and
/// flow; it has no cause of its own.
fn swept_envelope(
    message_id: Uuid,
    kind: &str,
    correlation_id: String,
    occurred_at: DateTime<Utc>,
    payload: serde_json::Value,
) -> Envelope {
    Envelope {
        message_id,
        kind: kind.to_owned(),
        version: SUPPORTED_VERSION,
        occurred_at,
        correlation_id: Some(correlation_id),
        causation_id: None,
        payload,
    }
}

async fn sweep_one(
    pool: &PgPool,
    topology: &Topology,
    envelope: &Envelope,
    now: DateTime<Utc>,
) -> anyhow::Result<bool> {
    let Some(mut tx) = LedgerTx::begin(pool, topology, sweeper::NAME, envelope).await? else {
        return Ok(false);
    };
    let ended = apply_deadline(&mut tx, envelope, now).await?;
    tx.commit().await?;
    Ok(ended)
}

/// Applies one deadline inside `tx`; returns whether it ended anything. A
/// deadline whose request already ended, or whose code was replaced, does
/// nothing but mark the message handled; one that came before its time is
/// sent back (see [`sweeper::arrived_early`]).
async fn apply_deadline(
    tx: &mut LedgerTx,
    message: &Envelope,
    now: DateTime<Utc>,
) -> Result<bool, HandlerError> {
    match message.kind.as_str() {
        RECOVERY_DEADLINE => {
            let deadline: RecoveryDeadline = message.payload_as()?;
            let Some(request) = store::lock_request(tx.conn(), deadline.recovery_id).await? else {
                return Ok(false);
            };
            if !request.is_active() {
                return Ok(false);
            }
            if request.expires_at > now {
                return Err(sweeper::arrived_early(request.expires_at, now));
            }
            expire_request(tx, &request, now).await?;
            Ok(true)
        }
        CODE_DEADLINE => {
            let deadline: CodeDeadline = message.payload_as()?;
            expire_code(tx, &deadline, now).await
        }
        other => {
            Err(HandlerError::permanent(anyhow::anyhow!("{other:?} is not a recovery deadline")))
        }
    }
}

/// Whether the truster has a recovery request still open. One whose deadline
/// has passed is ended here if the sweeper has not reached it yet, so that the
/// contact's right to leave follows the deadline to the second. For the
/// disconnection step, in its transaction.
pub async fn truster_has_open_request(
    tx: &mut LedgerTx,
    truster_id: Uuid,
) -> Result<bool, HandlerError> {
    let Some(request) = store::lock_active_request(tx.conn(), truster_id).await? else {
        return Ok(false);
    };
    let now = db_now(tx.conn()).await?;
    if request.expires_at > now {
        return Ok(true);
    }
    expire_request(tx, &request, now).await?;
    Ok(false)
}

/// Ends `request` as expired and tells both parties. `request` must be
/// locked by `tx`.
pub async fn expire_request(
    tx: &mut LedgerTx,
    request: &RecoveryRow,
    now: DateTime<Utc>,
) -> Result<(), HandlerError> {
    let expired = sqlx::query(
        "UPDATE recovery_requests SET status = 'expired', decided_at = $2, code_hmac = NULL \
         WHERE recovery_id = $1 AND status IN ('awaiting_contact', 'code_sent') \
           AND expires_at <= $2",
    )
    .bind(request.recovery_id)
    .bind(now)
    .execute(tx.conn())
    .await?
    .rows_affected();
    store::expect_one(expired, request.recovery_id)?;
    store::audit(tx, None, Some(request.recovery_id), "expired", json!({})).await?;
    tx.publish_event_in_flow(
        &request.correlation_id,
        RecoveryExpired::TYPE,
        &RecoveryExpired {
            recovery_id: request.recovery_id,
            truster_id: request.truster_id,
            contact_id: request.contact_id,
        },
    )?;
    let truster = store::person(tx.conn(), request.truster_id).await?;
    let contact = store::person(tx.conn(), request.contact_id).await?;
    let to_truster = notices::truster_expired();
    store::notify(tx, request.truster_id, to_truster.kind, to_truster.text)?;
    let to_contact = notices::contact_expired(&truster.short_name);
    store::notify(tx, request.contact_id, to_contact.kind, to_contact.text)?;
    // The contact was asked by SMS to act; an SMS also says they need not.
    if let Some(phone) = contact.phone.as_deref() {
        let template = SmsTemplate::RecoveryExpired { truster_short_name: truster.short_name };
        request_sms(tx, NAME, request.contact_id, phone, template)?;
    }
    tracing::debug!(recovery_id = %request.recovery_id, "recovery request expired");
    Ok(())
}

/// The code dies; the request stays open, and the contact may confirm again
/// for a new code (within the limits). No portal event: no command caused it.
async fn expire_code(
    tx: &mut LedgerTx,
    deadline: &CodeDeadline,
    now: DateTime<Utc>,
) -> Result<bool, HandlerError> {
    let Some(request) = store::lock_request(tx.conn(), deadline.recovery_id).await? else {
        return Ok(false);
    };
    let still_this_code = request.status == "code_sent"
        && request.codes_sent == deadline.code_number
        && request.code_hmac.is_some();
    if let Some(due) = request.code_expires_at.filter(|due| still_this_code && *due > now) {
        return Err(sweeper::arrived_early(due, now));
    }
    let cleared = sqlx::query(
        "UPDATE recovery_requests SET code_hmac = NULL \
         WHERE recovery_id = $1 AND status = 'code_sent' AND codes_sent = $2 \
           AND code_hmac IS NOT NULL AND code_expires_at <= $3",
    )
    .bind(deadline.recovery_id)
    .bind(deadline.code_number)
    .bind(now)
    .execute(tx.conn())
    .await?
    .rows_affected();
    if cleared == 0 {
        return Ok(false);
    }
    let detail = json!({ "code_number": deadline.code_number });
    store::audit(tx, None, Some(request.recovery_id), "code_expired", detail).await?;
    let notice = notices::contact_code_expired();
    store::notify(tx, request.contact_id, notice.kind, notice.text)?;
    tracing::debug!(recovery_id = %request.recovery_id, "recovery code expired");
    Ok(true)
}
