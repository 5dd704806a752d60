//! `recovery.requested`: the portal reports that a recovery of the truster's
//! password started. Opens a request for the truster's active contact, or
//! returns the one already active, or refuses.

use chrono::{DateTime, Utc};
use serde_json::json;
use trusted_contact_contracts::{
    Envelope, Message, commands::RecoveryRequested, events::RecoveryAwaitingContact, reasons,
};
use uuid::Uuid;

use super::{
    NAME, RecoverySettings, cancelled, chrono_duration, expiry, notices,
    store::{self, RecoveryRow, Refusal},
    whole_minutes,
};
use crate::{
    ledger::{LedgerTx, db_now},
    runtime::{Context, HandlerError},
    sms::{SmsTemplate, request_sms},
};

pub async fn handle(
    settings: &RecoverySettings,
    context: &Context,
    message: &Envelope,
) -> Result<(), HandlerError> {
    let command: RecoveryRequested = message.payload_as()?;
    context.once(message, async |tx| step(settings, tx, &command).await).await
}

async fn step(
    settings: &RecoverySettings,
    tx: &mut LedgerTx,
    command: &RecoveryRequested,
) -> Result<(), HandlerError> {
    let now = db_now(tx.conn()).await?;
    let truster_id = command.truster_id;
    // The link row is the truster's lock: two requests of one truster, or a
    // request and a disconnection, take turns on it.
    let link: Option<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT link_id, contact_id FROM trust_links \
         WHERE truster_id = $1 AND status = 'active' FOR UPDATE",
    )
    .bind(truster_id)
    .fetch_optional(tx.conn())
    .await?;
    let Some((link_id, contact_id)) = link else {
        let refusal = Refusal { truster_id: Some(truster_id), reason: reasons::NO_ACTIVE_CONTACT };
        return store::refuse(tx, None, None, refusal).await;
    };

    if let Some(active) = store::lock_active_request(tx.conn(), truster_id).await? {
        if active.link_id != link_id {
            // Sent over a link that has since ended: nobody can approve it,
            // so it ends before a request to the new contact opens.
            cancelled::end_for_disconnection(tx, &active).await?;
        } else if active.expires_at > now {
            return answer_with_active(tx, &active).await;
        } else {
            // Its deadline passed but the sweeper has not ended it yet; it
            // must end before another may open.
            expiry::expire_request(tx, &active, now).await?;
        }
    }

    let since = now - chrono::Duration::days(1);
    let opened_today: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM recovery_requests WHERE truster_id = $1 AND created_at > $2",
    )
    .bind(truster_id)
    .bind(since)
    .fetch_one(tx.conn())
    .await?;
    if opened_today >= i64::from(settings.daily_limit) {
        let refusal =
            Refusal { truster_id: Some(truster_id), reason: reasons::RECOVERY_RATE_LIMITED };
        return store::refuse(tx, None, None, refusal).await;
    }

    let opened = Opened {
        recovery_id: Uuid::now_v7(),
        truster_id,
        contact_id,
        link_id,
        expires_at: now + chrono_duration(settings.window),
    };
    open(tx, &opened, now).await?;
    tell_the_parties(settings, tx, &opened).await?;
    expiry::schedule_request_deadline(tx, opened.recovery_id, settings.window)?;
    tracing::debug!(recovery_id = %opened.recovery_id, "recovery request opened");
    Ok(())
}

struct Opened {
    recovery_id: Uuid,
    truster_id: Uuid,
    contact_id: Uuid,
    link_id: Uuid,
    expires_at: DateTime<Utc>,
}

/// One active request per truster: asking again answers with that one.
async fn answer_with_active(tx: &mut LedgerTx, active: &RecoveryRow) -> Result<(), HandlerError> {
    tx.publish_event(
        RecoveryAwaitingContact::TYPE,
        &RecoveryAwaitingContact {
            recovery_id: active.recovery_id,
            truster_id: active.truster_id,
            contact_id: active.contact_id,
            expires_at: active.expires_at,
            existing: true,
        },
    )?;
    store::audit(tx, None, Some(active.recovery_id), "requested_again", json!({})).await?;
    Ok(())
}

async fn open(tx: &mut LedgerTx, opened: &Opened, now: DateTime<Utc>) -> Result<(), HandlerError> {
    let correlation_id = tx.cause().flow_id();
    sqlx::query(
        "INSERT INTO recovery_requests \
         (recovery_id, truster_id, contact_id, link_id, status, created_at, expires_at, \
          correlation_id) \
         VALUES ($1, $2, $3, $4, 'awaiting_contact', $5, $6, $7)",
    )
    .bind(opened.recovery_id)
    .bind(opened.truster_id)
    .bind(opened.contact_id)
    .bind(opened.link_id)
    .bind(now)
    .bind(opened.expires_at)
    .bind(correlation_id)
    .execute(tx.conn())
    .await?;
    let detail = json!({ "contact_id": opened.contact_id, "expires_at": opened.expires_at });
    store::audit(tx, None, Some(opened.recovery_id), "opened", detail).await?;
    tx.publish_event(
        RecoveryAwaitingContact::TYPE,
        &RecoveryAwaitingContact {
            recovery_id: opened.recovery_id,
            truster_id: opened.truster_id,
            contact_id: opened.contact_id,
            expires_at: opened.expires_at,
            existing: false,
        },
    )?;
    Ok(())
}

/// The contact hears in the cabinet and by SMS, and is asked to check with
/// the truster first; the truster hears that the contact was asked.
async fn tell_the_parties(
    settings: &RecoverySettings,
    tx: &mut LedgerTx,
    opened: &Opened,
) -> Result<(), HandlerError> {
    let truster = store::person(tx.conn(), opened.truster_id).await?;
    let contact = store::person(tx.conn(), opened.contact_id).await?;
    let asked =
        notices::contact_asked_to_confirm(&truster.short_name, whole_minutes(settings.window));
    store::notify(tx, opened.contact_id, asked.kind, asked.text)?;
    match contact.phone.as_deref() {
        Some(phone) => {
            let template =
                SmsTemplate::RecoveryRequestNotice { truster_short_name: truster.short_name };
            request_sms(tx, NAME, opened.contact_id, phone, template)?;
        }
        None => {
            // The cabinet notification still reaches the contact; the code
            // step refuses until the profile holds a phone again.
            store::audit(tx, None, Some(opened.recovery_id), "sms_skipped_no_phone", json!({}))
                .await?;
        }
    }
    let told = notices::truster_contact_was_asked();
    store::notify(tx, opened.truster_id, told.kind, told.text)?;
    Ok(())
}
