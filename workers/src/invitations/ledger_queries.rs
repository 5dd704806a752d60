//! The ledger reads and writes the invitation steps share: accounts as the
//! eligibility rules see them, the counts behind the limits, the audit trail
//! and the refusal and notification messages every step sends.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;
use sqlx::{FromRow, PgConnection};
use trusted_contact_contracts::{
    Profile, event_type,
    events::{CabinetNotification, InvitationRejected},
    moscow_today,
};
use uuid::Uuid;

use crate::{
    ledger::{LedgerTx, db_now},
    runtime::HandlerError,
    sms::short_name,
};

/// The most trusters one person may be the trusted contact of.
pub const MAX_TRUSTERS_PER_CONTACT: i64 = 5;

/// The ledger's copy of an account, as projected from `account.updated`.
#[derive(Debug, Clone, FromRow)]
pub struct Account {
    pub account_id: Uuid,
    pub first_name: String,
    pub last_name: String,
    pub birth_date: NaiveDate,
    pub citizenship: String,
    pub verified: bool,
    pub has_passport: bool,
    pub phone: Option<String>,
}

impl Account {
    pub fn profile(&self) -> Profile {
        Profile {
            birth_date: self.birth_date,
            citizenship: self.citizenship.clone(),
            verified: self.verified,
            has_passport: self.has_passport,
            phone: self.phone.clone(),
        }
    }

    /// First name and last-name initial: all a contact may learn of a truster.
    pub fn short_name(&self) -> String {
        short_name(&self.first_name, &self.last_name)
    }
}

const ACCOUNT_COLUMNS: &str = "account_id, first_name, last_name, birth_date, citizenship, \
                               verified, has_passport, phone";

pub async fn account(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<Account>> {
    let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1");
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(conn).await
}

/// Reads the account and locks its row until the transaction ends. Locking
/// the truster serialises their invitations (rate limit, replacement);
/// locking the contact serialises acceptances that count their links.
pub async fn lock_account(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<Account>> {
    let sql = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1 FOR UPDATE");
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(conn).await
}

/// Accounts registered with a normalised phone, newest profile first.
pub async fn accounts_by_phone(conn: &mut PgConnection, phone: &str) -> sqlx::Result<Vec<Account>> {
    let sql = format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE phone = $1 ORDER BY updated_at DESC LIMIT 10"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(phone).fetch_all(conn).await
}

pub async fn moscow_date(conn: &mut PgConnection) -> sqlx::Result<NaiveDate> {
    Ok(moscow_today(db_now(conn).await?))
}

/// What the link rules need, read in one round trip: whether the truster
/// already has an active contact, how many trusters the contact serves, and
/// how many invitations the truster opened in the last hour (replaced ones
/// included: replacing is still sending).
#[derive(Debug, Clone, Copy, FromRow)]
pub struct LinkCounts {
    pub truster_has_contact: bool,
    pub contact_links: i64,
    pub sent_last_hour: i64,
}

pub async fn link_counts(
    conn: &mut PgConnection,
    truster_id: Uuid,
    contact_id: Uuid,
) -> sqlx::Result<LinkCounts> {
    sqlx::query_as(
        "SELECT \
           EXISTS (SELECT 1 FROM trust_links WHERE truster_id = $1 AND status = 'active') \
             AS truster_has_contact, \
           (SELECT count(*) FROM trust_links WHERE contact_id = $2 AND status = 'active') \
             AS contact_links, \
           (SELECT count(*) FROM invitations \
             WHERE truster_id = $1 AND created_at > now() - interval '1 hour') \
             AS sent_last_hour",
    )
    .bind(truster_id)
    .bind(contact_id)
    .fetch_one(conn)
    .await
}

/// An invitation as the acceptance, decline and expiry steps see it.
#[derive(Debug, Clone, FromRow)]
pub struct Invitation {
    pub invitation_id: Uuid,
    pub truster_id: Uuid,
    pub contact_id: Uuid,
    pub status: String,
    /// Whether the deadline has passed by the database clock.
    pub overdue: bool,
    pub expires_at: DateTime<Utc>,
}

pub async fn invitation(
    conn: &mut PgConnection,
    id: Uuid,
    lock: bool,
) -> sqlx::Result<Option<Invitation>> {
    let sql = format!(
        "SELECT invitation_id, truster_id, contact_id, status, expires_at <= now() AS overdue, \
         expires_at FROM invitations WHERE invitation_id = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(conn).await
}

/// One row of the append-only audit trail, in the handler's transaction.
/// `detail` must hold no personal data: ids, statuses and reason codes only.
pub async fn audit(
    tx: &mut LedgerTx,
    actor_id: Option<Uuid>,
    subject: &str,
    subject_id: Option<Uuid>,
    action: &str,
    detail: Value,
) -> Result<(), HandlerError> {
    tx.audit(actor_id, subject, subject_id, action, &detail).await?;
    Ok(())
}

/// A message for a person's cabinet, sent when the transaction commits.
pub fn notify(
    tx: &mut LedgerTx,
    account_id: Uuid,
    kind: &str,
    text: String,
) -> Result<(), HandlerError> {
    let notification = CabinetNotification { account_id, kind: kind.to_owned(), text };
    tx.publish_event(event_type::CABINET_NOTIFICATION, &notification)?;
    Ok(())
}

/// Refuses an invitation command: the audit row and the one outcome event.
pub async fn reject_invitation(
    tx: &mut LedgerTx,
    invitation_id: Option<Uuid>,
    truster_id: Option<Uuid>,
    actor_id: Uuid,
    reason: &str,
) -> Result<(), HandlerError> {
    let action = format!("{}_refused", tx.cause().kind.replace('.', "_"));
    let detail = serde_json::json!({ "reason": reason, "truster_id": truster_id });
    audit(tx, Some(actor_id), "invitation", invitation_id, &action, detail).await?;
    let event =
        InvitationRejected { invitation_id, truster_id, actor_id, reason: reason.to_owned() };
    tx.publish_event(event_type::INVITATION_REJECTED, &event)?;
    tracing::info!(invitation.id = ?invitation_id, reason, "invitation command refused");
    Ok(())
}
