//! `contact.disconnect_requested`: the truster may end the connection at any
//! time; the contact only while no recovery request of that truster is
//! active (one past its deadline is ended on the spot). Both sides are told.

use serde_json::json;
use trusted_contact_contracts::{
    Envelope, commands::ContactDisconnectRequested, event_type, events, reasons,
};
use uuid::Uuid;

use super::ledger_queries::{account, audit, notify};
use crate::{
    ledger::LedgerTx,
    runtime::{Context, HandlerError},
    sms::templates::without_final_period,
};

pub async fn handle(context: &Context, message: &Envelope) -> Result<(), HandlerError> {
    let command: ContactDisconnectRequested = message.payload_as()?;
    let Some(mut tx) = context.begin(message).await? else { return Ok(()) };
    // FOR UPDATE also conflicts with the key-share lock that inserting a
    // recovery request takes on its link, so a request opened concurrently
    // is either seen by the check below or waits for this disconnection.
    let link: Option<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT link_id, contact_id FROM trust_links \
         WHERE truster_id = $1 AND status = 'active' FOR UPDATE",
    )
    .bind(command.truster_id)
    .fetch_optional(tx.conn())
    .await?;
    let refusal = match link {
        None if command.actor_id == command.truster_id => Some(reasons::NO_ACTIVE_CONTACT),
        None => Some(reasons::NOT_A_PARTY),
        Some(_) if command.actor_id == command.truster_id => None,
        Some((_, contact)) if contact == command.actor_id => {
            let open = crate::recovery::truster_has_open_request(&mut tx, command.truster_id);
            open.await?.then_some(reasons::RECOVERY_ACTIVE)
        }
        Some(_) => Some(reasons::NOT_A_PARTY),
    };
    match (link, refusal) {
        (Some((link_id, contact_id)), None) => {
            // Only the truster gets here with a request open (the contact is
            // refused above); no request may outlive its contact.
            crate::recovery::end_active_for_disconnection(&mut tx, command.truster_id).await?;
            disconnect(&mut tx, &command, link_id, contact_id).await?;
        }
        (link, refusal) => {
            let reason = refusal.unwrap_or(reasons::NO_ACTIVE_CONTACT);
            // An outsider learns nothing of who the truster's contact is.
            let contact_id =
                link.map(|(_, contact)| contact).filter(|_| reason != reasons::NOT_A_PARTY);
            let detail = json!({ "reason": reason, "truster_id": command.truster_id });
            let subject_id = link.map(|(id, _)| id);
            audit(
                &mut tx,
                Some(command.actor_id),
                "trust_link",
                subject_id,
                "disconnect_refused",
                detail,
            )
            .await?;
            let event = events::ContactDisconnectRejected {
                truster_id: command.truster_id,
                contact_id,
                actor_id: command.actor_id,
                reason: reason.to_owned(),
            };
            tx.publish_event(event_type::CONTACT_DISCONNECT_REJECTED, &event)?;
            tracing::info!(truster.id = %command.truster_id, reason, "disconnection refused");
        }
    }
    context.commit(tx).await
}

async fn disconnect(
    tx: &mut LedgerTx,
    command: &ContactDisconnectRequested,
    link_id: Uuid,
    contact_id: Uuid,
) -> Result<(), HandlerError> {
    sqlx::query(
        "UPDATE trust_links SET status = 'disconnected', disconnected_at = now(), \
                                disconnected_by = $2 \
         WHERE link_id = $1 AND status = 'active'",
    )
    .bind(link_id)
    .bind(command.actor_id)
    .execute(tx.conn())
    .await?;
    let detail = json!({ "truster_id": command.truster_id, "contact_id": contact_id });
    audit(tx, Some(command.actor_id), "trust_link", Some(link_id), "link_disconnected", detail)
        .await?;
    let event = events::ContactDisconnected {
        truster_id: command.truster_id,
        contact_id,
        actor_id: command.actor_id,
    };
    tx.publish_event(event_type::CONTACT_DISCONNECTED, &event)?;

    let truster = account(tx.conn(), command.truster_id).await?;
    let contact = account(tx.conn(), contact_id).await?;
    let contact_name = contact.map(|c| c.short_name()).unwrap_or_default();
    let truster_name = truster.map(|t| t.short_name()).unwrap_or_default();
    let to_truster = format!(
        "{contact_name} больше не ваше доверенное лицо. Вы можете пригласить другого человека."
    );
    notify(tx, command.truster_id, "contact_disconnected", to_truster.trim_start().to_owned())?;
    let to_contact = format!(
        "Вы больше не доверенное лицо пользователя {}.",
        without_final_period(&truster_name)
    );
    notify(tx, contact_id, "contact_disconnected", to_contact)?;
    tracing::info!(link.id = %link_id, "contact disconnected");
    Ok(())
}
