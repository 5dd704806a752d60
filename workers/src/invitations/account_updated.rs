//! `account.updated`: keeps the ledger's copy of what eligibility needs. An
//! update older (by `occurred_at`) than the copy is ignored, so updates may
//! arrive in any order; of two with the same `occurred_at`, the one handled
//! last stands. One dated in the future is refused, since it would shut out
//! every real update until then. A phone that cannot be normalised makes the message
//! fail for good (it is dead-lettered with the reason), but the rest of the
//! update is applied with no phone first: keeping the older, perhaps more
//! permissive copy would let a de-verified account, or one whose phone
//! changed, go on as before.

use anyhow::anyhow;
use chrono::Utc;
use trusted_contact_contracts::{Envelope, commands::AccountUpdated, normalize_phone};

use super::ledger_queries::audit;
use crate::runtime::{Context, HandlerError};

pub async fn handle(context: &Context, message: &Envelope) -> Result<(), HandlerError> {
    let account: AccountUpdated = message.payload_as()?;
    let names_ok = [&account.first_name, &account.last_name]
        .iter()
        .all(|name| !name.trim().is_empty() && name.chars().count() <= MAX_NAME_CHARS);
    if !names_ok {
        return Err(HandlerError::permanent(anyhow!(
            "account {}: a name is empty or longer than {MAX_NAME_CHARS} characters",
            account.account_id
        )));
    }
    if message.occurred_at > Utc::now() + MAX_CLOCK_LEAD {
        return Err(HandlerError::permanent(anyhow!(
            "account {}: occurred_at {} is more than {} minutes ahead of this service's clock; \
             the update was not applied",
            account.account_id,
            message.occurred_at,
            MAX_CLOCK_LEAD.num_minutes()
        )));
    }
    let (phone, phone_error) = match account.phone.as_deref().map(normalize_phone) {
        None => (None, None),
        Some(Ok(phone)) => (Some(phone), None),
        Some(Err(error)) => (None, Some(error)),
    };
    let Some(mut tx) = context.begin(message).await? else { return Ok(()) };

    // The guard in the WHERE clause keeps the newer copy whichever update
    // commits first.
    let applied = sqlx::query(
        "INSERT INTO accounts (account_id, first_name, last_name, birth_date, citizenship, \
                               verified, has_passport, phone, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (account_id) DO UPDATE SET \
             first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name, \
             birth_date = EXCLUDED.birth_date, citizenship = EXCLUDED.citizenship, \
             verified = EXCLUDED.verified, has_passport = EXCLUDED.has_passport, \
             phone = EXCLUDED.phone, updated_at = EXCLUDED.updated_at \
         WHERE accounts.updated_at <= EXCLUDED.updated_at",
    )
    .bind(account.account_id)
    .bind(account.first_name.trim())
    .bind(account.last_name.trim())
    .bind(account.birth_date)
    .bind(account.citizenship.trim())
    .bind(account.verified)
    .bind(account.has_passport)
    .bind(phone)
    .bind(message.occurred_at)
    .execute(tx.conn())
    .await?
    .rows_affected()
        > 0;

    if applied {
        let detail = serde_json::json!({ "occurred_at": message.occurred_at });
        audit(&mut tx, None, "account", Some(account.account_id), "account_projected", detail)
            .await?;
    } else {
        tracing::debug!(account.id = %account.account_id, "older account update ignored");
    }
    context.commit(tx).await?;
    match phone_error {
        None => Ok(()),
        Some(error) => Err(HandlerError::permanent(anyhow!(
            "account {}: {error}; the profile was stored without a phone",
            account.account_id
        ))),
    }
}

/// How far ahead of our clock the portal's may run before its updates are
/// refused.
const MAX_CLOCK_LEAD: chrono::Duration = chrono::Duration::minutes(5);

/// Longer names are not names: a bound keeps a hostile profile from
/// travelling into notifications and SMS texts.
const MAX_NAME_CHARS: usize = 100;
