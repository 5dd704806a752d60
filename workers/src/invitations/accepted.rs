//! `invitation.accepted`: only the invited person, only before the deadline
//! by the database clock, and only if eligibility and both limits still hold.
//! The contact's account row is locked before their links are counted, so
//! concurrent acceptances for one contact link at most five trusters.

use serde_json::json;
use trusted_contact_contracts::{
    Envelope, Role, commands::InvitationAccepted, eligibility_problems, event_type, events, reasons,
};
use uuid::Uuid;

use super::ledger_queries::{
    Account, Invitation, MAX_TRUSTERS_PER_CONTACT, account, audit, invitation, link_counts,
    lock_account, moscow_date, notify, reject_invitation,
};
use crate::{
    ledger::LedgerTx,
    runtime::{Context, HandlerError},
    sms::templates::without_final_period,
};

pub async fn handle(context: &Context, message: &Envelope) -> Result<(), HandlerError> {
    let command: InvitationAccepted = message.payload_as()?;
    let Some(mut tx) = context.begin(message).await? else { return Ok(()) };
    let found = invitation(tx.conn(), command.invitation_id, false).await?;
    let outcome = match found {
        None => Err((None, reasons::INVITATION_NOT_FOUND)),
        // Someone else's invitation: they learn nothing of who sent it.
        Some(found) if found.contact_id != command.actor_id => {
            Err((None, reasons::NOT_INVITED_CONTACT))
        }
        Some(_) => accept(&mut tx, command.invitation_id).await?,
    };
    if let Err((truster, reason)) = outcome {
        let id = Some(command.invitation_id);
        reject_invitation(&mut tx, id, truster, command.actor_id, reason).await?;
    }
    context.commit(tx).await
}

type Refusal = (Option<Uuid>, &'static str);

/// Accepts the invitation of the actor, who is its contact.
async fn accept(
    tx: &mut LedgerTx,
    invitation_id: Uuid,
) -> Result<Result<(), Refusal>, HandlerError> {
    // Lock order: the contact's account, then the invitation. The request
    // step locks the truster's account, then the invitation; no step locks
    // an account after an invitation, so the two cannot deadlock.
    let Some(found) = invitation(tx.conn(), invitation_id, false).await? else {
        return Ok(Err((None, reasons::INVITATION_NOT_FOUND)));
    };
    let contact = lock_account(tx.conn(), found.contact_id).await?;
    let Some(current) = invitation(tx.conn(), invitation_id, true).await? else {
        return Ok(Err((None, reasons::INVITATION_NOT_FOUND)));
    };
    let truster_id = Some(current.truster_id);
    if let Some(reason) = not_acceptable(&current) {
        return Ok(Err((truster_id, reason)));
    }
    let truster = account(tx.conn(), current.truster_id).await?;
    if let Some(reason) = rule_broken(tx, truster.as_ref(), contact.as_ref()).await? {
        refuse_for_good(tx, &current, reason).await?;
        return Ok(Err((truster_id, reason)));
    }
    let (Some(truster), Some(contact)) = (truster, contact) else {
        return Ok(Err((truster_id, reasons::TRUSTER_UNKNOWN)));
    };
    link(tx, &current, &truster, &contact).await?;
    Ok(Ok(()))
}

fn not_acceptable(invitation: &Invitation) -> Option<&'static str> {
    match invitation.status.as_str() {
        "pending" if invitation.overdue => Some(reasons::INVITATION_EXPIRED),
        "pending" => None,
        "expired" => Some(reasons::INVITATION_EXPIRED),
        "replaced" => Some(reasons::INVITATION_REPLACED),
        _ => Some(reasons::INVITATION_NOT_PENDING),
    }
}

/// Eligibility of both sides and both limits, checked again at acceptance.
async fn rule_broken(
    tx: &mut LedgerTx,
    truster: Option<&Account>,
    contact: Option<&Account>,
) -> Result<Option<&'static str>, HandlerError> {
    let today = moscow_date(tx.conn()).await?;
    let Some(truster) = truster else { return Ok(Some(reasons::TRUSTER_UNKNOWN)) };
    let Some(contact) = contact else { return Ok(Some(reasons::CONTACT_NOT_FOUND)) };
    if let Some(reason) = eligibility_problems(&truster.profile(), Role::Truster, today) {
        return Ok(Some(reason));
    }
    if let Some(reason) = eligibility_problems(&contact.profile(), Role::Contact, today) {
        return Ok(Some(reason));
    }
    let counts = link_counts(tx.conn(), truster.account_id, contact.account_id).await?;
    if counts.truster_has_contact {
        return Ok(Some(reasons::CONTACT_ALREADY_ACTIVE));
    }
    if counts.contact_links >= MAX_TRUSTERS_PER_CONTACT {
        return Ok(Some(reasons::CONTACT_LIMIT_REACHED));
    }
    Ok(None)
}

/// A rule broken at acceptance ends the invitation: the truster is told and
/// may invite someone else.
async fn refuse_for_good(
    tx: &mut LedgerTx,
    invitation: &Invitation,
    reason: &str,
) -> Result<(), HandlerError> {
    let refused = sqlx::query(
        "UPDATE invitations SET status = 'refused', decided_at = now() \
         WHERE invitation_id = $1 AND status = 'pending'",
    )
    .bind(invitation.invitation_id)
    .execute(tx.conn())
    .await?
    .rows_affected();
    if refused == 0 {
        return Ok(());
    }
    let detail = json!({ "reason": reason });
    let id = Some(invitation.invitation_id);
    audit(tx, Some(invitation.contact_id), "invitation", id, "invitation_refused", detail).await?;
    let text = "Приглашение не может быть принято: условия для доверенного лица не выполнены. \
                Вы можете пригласить другого человека."
        .to_owned();
    notify(tx, invitation.truster_id, "invitation_refused", text)
}

async fn link(
    tx: &mut LedgerTx,
    invitation: &Invitation,
    truster: &Account,
    contact: &Account,
) -> Result<(), HandlerError> {
    let accepted = sqlx::query(
        "UPDATE invitations SET status = 'accepted', decided_at = now() \
         WHERE invitation_id = $1 AND status = 'pending' AND expires_at > now()",
    )
    .bind(invitation.invitation_id)
    .execute(tx.conn())
    .await?
    .rows_affected();
    if accepted == 0 {
        // The row is locked and was checked above; this is a ledger bug.
        return Err(HandlerError::permanent(anyhow::anyhow!("invitation changed under its lock")));
    }
    let link_id = Uuid::now_v7();
    let inserted = sqlx::query(
        "INSERT INTO trust_links (link_id, truster_id, contact_id, invitation_id, status) \
         VALUES ($1, $2, $3, $4, 'active') \
         ON CONFLICT (truster_id) WHERE status = 'active' DO NOTHING",
    )
    .bind(link_id)
    .bind(truster.account_id)
    .bind(contact.account_id)
    .bind(invitation.invitation_id)
    .execute(tx.conn())
    .await?
    .rows_affected();
    if inserted == 0 {
        // Another link for the truster committed after the check; on retry
        // the check sees it and refuses.
        return Err(HandlerError::transient(anyhow::anyhow!("truster linked concurrently")));
    }
    let detail = json!({ "truster_id": truster.account_id, "link_id": link_id });
    let id = Some(invitation.invitation_id);
    audit(tx, Some(contact.account_id), "invitation", id, "invitation_accepted", detail).await?;
    let detail = json!({ "invitation_id": invitation.invitation_id });
    audit(tx, Some(contact.account_id), "trust_link", Some(link_id), "link_created", detail)
        .await?;

    let event = events::InvitationAccepted {
        invitation_id: invitation.invitation_id,
        truster_id: truster.account_id,
        contact_id: contact.account_id,
    };
    tx.publish_event(event_type::INVITATION_ACCEPTED, &event)?;
    let to_truster = format!("{} стал(а) вашим доверенным лицом.", contact.short_name());
    notify(tx, truster.account_id, "invitation_accepted", to_truster)?;
    let to_contact = format!(
        "Вы стали доверенным лицом пользователя {}.",
        without_final_period(&truster.short_name())
    );
    notify(tx, contact.account_id, "contact_connected", to_contact)?;
    tracing::info!(invitation.id = %invitation.invitation_id, link.id = %link_id, "accepted");
    Ok(())
}
