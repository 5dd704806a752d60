//! The recovery ledger as the steps see it: a request read under lock, the
//! checks of who may act on it, the parties' names and phones, and the audit
//! rows, refusals and notifications every step writes.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgConnection;
use trusted_contact_contracts::{
    Message,
    events::{CabinetNotification, RecoveryRejected},
    reasons,
};
use uuid::Uuid;

use crate::{ledger::LedgerTx, runtime::HandlerError, sms::short_name};

/// `audit_log.subject` of every row this worker writes.
pub const SUBJECT: &str = "recovery_request";

/// The statuses in which a request still waits for the contact.
pub const ACTIVE_STATUSES: &[&str] = &["awaiting_contact", "code_sent"];

#[derive(Debug, sqlx::FromRow)]
pub struct RecoveryRow {
    pub recovery_id: Uuid,
    pub truster_id: Uuid,
    pub contact_id: Uuid,
    pub link_id: Uuid,
    pub status: String,
    pub expires_at: DateTime<Utc>,
    pub code_hmac: Option<Vec<u8>>,
    pub code_expires_at: Option<DateTime<Utc>>,
    pub codes_sent: i32,
    pub last_code_at: Option<DateTime<Utc>>,
    pub wrong_attempts: i32,
    /// The flow of the `recovery.requested` that opened the request: every
    /// event about the request's end carries it, whatever caused the end.
    pub correlation_id: String,
}

impl RecoveryRow {
    pub fn is_active(&self) -> bool {
        ACTIVE_STATUSES.contains(&self.status.as_str())
    }
}

const COLUMNS: &str = "recovery_id, truster_id, contact_id, link_id, status, expires_at, \
                       code_hmac, code_expires_at, codes_sent, last_code_at, wrong_attempts, \
                       correlation_id";

/// Reads a request and holds its row until the transaction ends, so that two
/// commands about one request take turns.
pub async fn lock_request(
    conn: &mut PgConnection,
    recovery_id: Uuid,
) -> Result<Option<RecoveryRow>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM recovery_requests WHERE recovery_id = $1 FOR UPDATE");
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(recovery_id).fetch_optional(conn).await
}

/// The truster's active request, locked.
pub async fn lock_active_request(
    conn: &mut PgConnection,
    truster_id: Uuid,
) -> Result<Option<RecoveryRow>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM recovery_requests \
         WHERE truster_id = $1 AND status IN ('awaiting_contact', 'code_sent') FOR UPDATE"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(truster_id).fetch_optional(conn).await
}

/// Why a command about a request is refused, before anything changes.
#[derive(Debug)]
pub struct Refusal {
    /// Null only when the request does not exist.
    pub truster_id: Option<Uuid>,
    pub reason: &'static str,
}

/// A request a command may act on, or the reason it may not.
enum Gate {
    Open(RecoveryRow),
    Refused(Refusal),
}

/// The request, locked, when `actor_id` is the contact it was sent to, still
/// the truster's active contact, and the request is still open: only they
/// may confirm, submit a code or decline. Otherwise the refusal is published
/// and audited, and the handler has nothing more to do.
pub async fn open_for_contact(
    tx: &mut LedgerTx,
    recovery_id: Uuid,
    actor_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<RecoveryRow>, HandlerError> {
    let gate = contact_gate(tx.conn(), recovery_id, actor_id, now).await?;
    admit(tx, recovery_id, actor_id, gate).await
}

/// As [`open_for_contact`], for the one command only the truster may send:
/// cancellation.
pub async fn open_for_truster(
    tx: &mut LedgerTx,
    recovery_id: Uuid,
    actor_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<RecoveryRow>, HandlerError> {
    let gate = truster_gate(tx.conn(), recovery_id, actor_id, now).await?;
    admit(tx, recovery_id, actor_id, gate).await
}

async fn admit(
    tx: &mut LedgerTx,
    recovery_id: Uuid,
    actor_id: Uuid,
    gate: Gate,
) -> Result<Option<RecoveryRow>, HandlerError> {
    match gate {
        Gate::Open(request) => Ok(Some(request)),
        Gate::Refused(refusal) => {
            refuse(tx, Some(recovery_id), Some(actor_id), refusal).await?;
            Ok(None)
        }
    }
}

async fn contact_gate(
    conn: &mut PgConnection,
    recovery_id: Uuid,
    actor_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Gate, sqlx::Error> {
    let Some(request) = lock_request(&mut *conn, recovery_id).await? else {
        return Ok(not_found());
    };
    let link_active: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM trust_links WHERE link_id = $1 AND status = 'active')",
    )
    .bind(request.link_id)
    .fetch_one(conn)
    .await?;
    if request.contact_id != actor_id || !link_active {
        return Ok(refused_outsider(reasons::NOT_TRUSTERS_CONTACT));
    }
    Ok(state_gate(request, now))
}

async fn truster_gate(
    conn: &mut PgConnection,
    recovery_id: Uuid,
    actor_id: Uuid,
    now: DateTime<Utc>,
) -> Result<Gate, sqlx::Error> {
    let Some(request) = lock_request(conn, recovery_id).await? else {
        return Ok(not_found());
    };
    if request.truster_id != actor_id {
        return Ok(refused_outsider(reasons::NOT_THE_TRUSTER));
    }
    Ok(state_gate(request, now))
}

/// A request past its deadline is refused even before the sweeper has marked
/// it expired, so the deadline holds to the second.
fn state_gate(request: RecoveryRow, now: DateTime<Utc>) -> Gate {
    let reason = match request.status.as_str() {
        "locked" => reasons::RECOVERY_LOCKED,
        "expired" => reasons::RECOVERY_EXPIRED,
        _ if !request.is_active() => reasons::RECOVERY_NOT_ACTIVE,
        _ if request.expires_at <= now => reasons::RECOVERY_EXPIRED,
        _ => return Gate::Open(request),
    };
    refused(&request, reason)
}

fn not_found() -> Gate {
    Gate::Refused(Refusal { truster_id: None, reason: reasons::RECOVERY_NOT_FOUND })
}

/// Somebody who may not act on the request learns nothing of whose it is.
fn refused_outsider(reason: &'static str) -> Gate {
    Gate::Refused(Refusal { truster_id: None, reason })
}

fn refused(request: &RecoveryRow, reason: &'static str) -> Gate {
    Gate::Refused(Refusal { truster_id: Some(request.truster_id), reason })
}

/// What the notices need of a person: the short name and the phone.
pub struct Person {
    pub short_name: String,
    /// Normalised `+7XXXXXXXXXX`; never logged.
    pub phone: Option<String>,
}

pub async fn person(conn: &mut PgConnection, account_id: Uuid) -> Result<Person, sqlx::Error> {
    let row: Option<(String, String, Option<String>)> =
        sqlx::query_as("SELECT first_name, last_name, phone FROM accounts WHERE account_id = $1")
            .bind(account_id)
            .fetch_optional(conn)
            .await?;
    // A link implies both accounts were seen; a missing row still must not
    // stop the rules, so the texts fall back to a neutral word.
    Ok(match row {
        Some((first, last, phone)) => Person { short_name: short_name(&first, &last), phone },
        None => Person { short_name: "пользователь".to_owned(), phone: None },
    })
}

/// One audit row in the handler's transaction. `detail` carries codes of
/// reasons, counts and instants, never personal data.
pub async fn audit(
    tx: &mut LedgerTx,
    actor_id: Option<Uuid>,
    recovery_id: Option<Uuid>,
    action: &str,
    detail: serde_json::Value,
) -> Result<(), sqlx::Error> {
    tx.audit(actor_id, SUBJECT, recovery_id, action, &detail).await?;
    Ok(())
}

/// Publishes `recovery.rejected` as the command's outcome and audits it.
pub async fn refuse(
    tx: &mut LedgerTx,
    recovery_id: Option<Uuid>,
    actor_id: Option<Uuid>,
    refusal: Refusal,
) -> Result<(), HandlerError> {
    let command = tx.cause().kind.clone();
    tx.publish_event(
        RecoveryRejected::TYPE,
        &RecoveryRejected {
            recovery_id,
            truster_id: refusal.truster_id,
            actor_id,
            reason: refusal.reason.to_owned(),
        },
    )?;
    let detail = json!({ "command": command, "reason": refusal.reason });
    audit(tx, actor_id, recovery_id, "refused", detail).await?;
    tracing::debug!(reason = refusal.reason, "recovery command refused");
    Ok(())
}

/// A cabinet notification to `account_id`.
pub fn notify(tx: &mut LedgerTx, account_id: Uuid, kind: &str, text: String) -> anyhow::Result<()> {
    let notification = CabinetNotification { account_id, kind: kind.to_owned(), text };
    tx.publish_event(CabinetNotification::TYPE, &notification)?;
    Ok(())
}

/// Checks that a guarded update hit the request this transaction holds
/// locked. A miss means the ledger changed underneath; a retry rereads it.
pub fn expect_one(rows: u64, recovery_id: Uuid) -> Result<(), HandlerError> {
    if rows == 1 {
        return Ok(());
    }
    Err(HandlerError::transient(anyhow::anyhow!(
        "recovery request {recovery_id} changed while locked"
    )))
}
