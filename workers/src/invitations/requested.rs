//! `invitation.requested`: checks every rule for both sides, finds the
//! contact by phone and first name, replaces a pending invitation, opens the
//! new one, tells the contact (cabinet and SMS) and schedules its deadline.

use chrono::{DateTime, Utc};
use serde_json::json;
use trusted_contact_contracts::{
    Envelope, Role, commands::InvitationRequested, eligibility_problems, event_type,
    events::InvitationSent, names_match, normalize_phone, reasons,
};
use uuid::Uuid;

use super::{
    InvitationSettings, expiry,
    ledger_queries::{
        Account, MAX_TRUSTERS_PER_CONTACT, accounts_by_phone, audit, link_counts, lock_account,
        moscow_date, notify, reject_invitation,
    },
};
use crate::{
    ledger::LedgerTx,
    runtime::{Context, HandlerError},
    sms::{SmsTemplate, request_sms},
    sweeper::{self, SWEEPER},
};

/// Deliveries after the first on which an unknown truster is retried (fewer
/// if the runtime's retry limit is lower); with the default delays they wait
/// about 7 seconds in all.
const UNKNOWN_TRUSTER_RETRIES: u32 = 3;

pub async fn handle(
    context: &Context,
    settings: &InvitationSettings,
    message: &Envelope,
) -> Result<(), HandlerError> {
    let request: InvitationRequested = message.payload_as()?;
    let Some(mut tx) = context.begin(message).await? else { return Ok(()) };
    match check(&mut tx, settings, &request).await? {
        // Commands are handled concurrently, and an `account.updated` sent
        // just before may still be in flight or waiting out a fault: an
        // unknown truster is given a few retries before the refusal.
        Err(reasons::TRUSTER_UNKNOWN)
            if context.attempt < UNKNOWN_TRUSTER_RETRIES && context.may_retry() =>
        {
            return Err(HandlerError::transient(anyhow::anyhow!(
                "truster {} not in the ledger yet",
                request.truster_id
            )));
        }
        Err(reason) => {
            let truster = Some(request.truster_id);
            reject_invitation(&mut tx, None, truster, request.truster_id, reason).await?;
        }
        Ok((truster, contact)) => open_invitation(&mut tx, settings, &truster, &contact).await?,
    }
    context.commit(tx).await
}

/// The truster and the contact when every rule holds, else the first reason.
async fn check(
    tx: &mut LedgerTx,
    settings: &InvitationSettings,
    request: &InvitationRequested,
) -> Result<Result<(Account, Account), &'static str>, HandlerError> {
    let Some(truster) = lock_account(tx.conn(), request.truster_id).await? else {
        return Ok(Err(reasons::TRUSTER_UNKNOWN));
    };
    let today = moscow_date(tx.conn()).await?;
    if let Some(reason) = eligibility_problems(&truster.profile(), Role::Truster, today) {
        return Ok(Err(reason));
    }
    let Ok(phone) = normalize_phone(&request.contact_phone) else {
        return Ok(Err(reasons::CONTACT_PHONE_INVALID));
    };
    // An unknown phone and a wrong first name give the same answer, so the
    // service cannot be used to find out who has an account; and only a few
    // such answers an hour, so it cannot be used to guess the name either.
    if failed_lookups_last_hour(tx, truster.account_id).await? >= settings.failed_lookups_per_hour {
        return Ok(Err(reasons::CONTACT_LOOKUPS_EXHAUSTED));
    }
    let candidates = accounts_by_phone(tx.conn(), &phone).await?;
    let Some(contact) =
        candidates.into_iter().find(|a| names_match(&request.contact_first_name, &a.first_name))
    else {
        return Ok(Err(reasons::CONTACT_NOT_FOUND));
    };
    // Two accounts on one phone are one person as far as the SMS goes: the
    // codes would reach the truster's own phone.
    if contact.account_id == truster.account_id
        || (contact.phone.is_some() && contact.phone == truster.phone)
    {
        return Ok(Err(reasons::SELF_INVITATION));
    }
    if let Some(reason) = eligibility_problems(&contact.profile(), Role::Contact, today) {
        return Ok(Err(reason));
    }
    let counts = link_counts(tx.conn(), truster.account_id, contact.account_id).await?;
    if counts.truster_has_contact {
        return Ok(Err(reasons::CONTACT_ALREADY_ACTIVE));
    }
    if counts.contact_links >= MAX_TRUSTERS_PER_CONTACT {
        return Ok(Err(reasons::CONTACT_LIMIT_REACHED));
    }
    if counts.sent_last_hour >= settings.invitations_per_hour {
        return Ok(Err(reasons::INVITATION_RATE_LIMITED));
    }
    Ok(Ok((truster, contact)))
}

/// How many of the truster's invitations in the last hour named nobody.
/// The reason is written out, not bound, so that the planner can use the
/// partial index made for this count.
async fn failed_lookups_last_hour(tx: &mut LedgerTx, truster_id: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM audit_log \
         WHERE actor_id = $1 AND action = 'invitation_requested_refused' \
           AND detail->>'reason' = 'contact_not_found' \
           AND recorded_at > now() - interval '1 hour'",
    )
    .bind(truster_id)
    .fetch_one(tx.conn())
    .await
}

async fn open_invitation(
    tx: &mut LedgerTx,
    settings: &InvitationSettings,
    truster: &Account,
    contact: &Account,
) -> Result<(), HandlerError> {
    let replaced = replace_pending(tx, truster.account_id).await?;

    let invitation_id = Uuid::now_v7();
    let request_id = tx.cause().message_id;
    let correlation_id = tx.cause().flow_id();
    let sms_key = format!("{request_id}:invitation_notice:{}", contact.account_id);
    let window_ms = i64::try_from(settings.window.as_millis()).unwrap_or(i64::MAX);
    // The truster's pending invitation may have been accepted while
    // `replace_pending` waited on its row, after the link rules were read:
    // the insert reads the links again (a new statement sees that commit) and
    // opens nothing if the truster now has a contact.
    let opened: Option<DateTime<Utc>> = sqlx::query_scalar(
        "INSERT INTO invitations (invitation_id, truster_id, contact_id, status, expires_at, \
                                  correlation_id, request_message_id, sms_idempotency_key) \
         SELECT $1, $2, $3, 'pending', now() + make_interval(secs => $4::float8 / 1000), \
                $5, $6, $7 \
         WHERE NOT EXISTS (SELECT 1 FROM trust_links WHERE truster_id = $2 AND status = 'active') \
         RETURNING expires_at",
    )
    .bind(invitation_id)
    .bind(truster.account_id)
    .bind(contact.account_id)
    .bind(window_ms)
    .bind(&correlation_id)
    .bind(request_id)
    .bind(&sms_key)
    .fetch_optional(tx.conn())
    .await?;
    let Some(expires_at) = opened else {
        // On the next delivery the link rules see the new contact and refuse.
        return Err(HandlerError::transient(anyhow::anyhow!("truster linked concurrently")));
    };
    let detail = json!({
        "contact_id": contact.account_id,
        "expires_at": expires_at,
        "replaced_invitation_id": replaced,
    });
    audit(
        tx,
        Some(truster.account_id),
        "invitation",
        Some(invitation_id),
        "invitation_sent",
        detail,
    )
    .await?;

    let sent = InvitationSent {
        invitation_id,
        truster_id: truster.account_id,
        contact_id: contact.account_id,
        expires_at,
        replaced_invitation_id: replaced,
    };
    tx.publish_event(event_type::INVITATION_SENT, &sent)?;
    let minutes = settings.window.as_secs().div_ceil(60);
    let text = format!(
        "Пользователь {} приглашает вас стать доверенным лицом. Примите или отклоните \
         приглашение в личном кабинете в течение {minutes} мин.",
        truster.short_name()
    );
    notify(tx, contact.account_id, "invitation_received", text)?;
    // The contact's phone was checked by eligibility; the SMS worker sends it.
    if let Some(phone) = contact.phone.as_deref() {
        let template = SmsTemplate::InvitationNotice {
            truster_short_name: truster.short_name(),
            valid_minutes: u32::try_from(minutes).unwrap_or(u32::MAX),
        };
        request_sms(tx, super::INVITATIONS.name, contact.account_id, phone, template)?;
    }
    let deadline =
        expiry::deadline_envelope(invitation_id, Some(request_id), &correlation_id, expires_at)?;
    tx.schedule_envelope(SWEEPER.name, settings.window + sweeper::DEADLINE_MARGIN, deadline);
    tracing::info!(invitation.id = %invitation_id, "invitation sent");
    Ok(())
}

/// Marks the truster's pending invitation replaced; the rows are already
/// serialised by the lock on the truster's account.
async fn replace_pending(
    tx: &mut LedgerTx,
    truster_id: Uuid,
) -> Result<Option<Uuid>, HandlerError> {
    let replaced: Option<(Uuid, Uuid)> = sqlx::query_as(
        "UPDATE invitations SET status = 'replaced', decided_at = now() \
         WHERE truster_id = $1 AND status = 'pending' \
         RETURNING invitation_id, contact_id",
    )
    .bind(truster_id)
    .fetch_optional(tx.conn())
    .await?;
    let Some((old_id, old_contact)) = replaced else { return Ok(None) };
    let detail = json!({ "contact_id": old_contact });
    audit(tx, Some(truster_id), "invitation", Some(old_id), "invitation_replaced", detail).await?;
    let text = "Приглашение стать доверенным лицом отозвано отправителем.".to_owned();
    notify(tx, old_contact, "invitation_withdrawn", text)?;
    Ok(Some(old_id))
}
