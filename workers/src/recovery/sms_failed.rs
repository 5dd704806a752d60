//! `sms.failed` for an SMS this worker asked for: the failure is audited on
//! its recovery request and the recipient hears of it in the cabinet, which
//! needs no phone. Nothing else changes: a failed code still counts towards
//! the limit, and the contact may confirm again after the minimum interval.

use serde_json::json;
use trusted_contact_contracts::Envelope;
use uuid::Uuid;

use super::{notices, store};
use crate::{
    runtime::{Context, HandlerError},
    sms::SmsFailed,
};

pub async fn handle(context: &Context, message: &Envelope) -> Result<(), HandlerError> {
    let failed: SmsFailed = message.payload_as()?;
    let Some(mut tx) = context.begin(message).await? else { return Ok(()) };
    // The idempotency key starts with the id of the message whose handling
    // asked for the SMS; the audit row of that step names the request.
    let action = match failed.template.as_str() {
        "recovery_request_notice" => "opened",
        "recovery_code" => "code_sent",
        "recovery_cancelled" => "cancelled",
        _ => "expired",
    };
    let cause = failed.idempotency_key.split(':').next().and_then(|id| id.parse::<Uuid>().ok());
    let recovery_id: Option<Uuid> = match cause {
        Some(cause) => sqlx::query_scalar(
            "SELECT subject_id FROM audit_log \
                 WHERE message_id = $1 AND subject = $2 AND action = $3 \
                 ORDER BY id LIMIT 1",
        )
        .bind(cause)
        .bind(store::SUBJECT)
        .bind(action)
        .fetch_optional(tx.conn())
        .await?
        .flatten(),
        None => None,
    };
    let detail = json!({
        "template": failed.template,
        "reason": failed.reason,
        "recipient_id": failed.recipient_id,
    });
    store::audit(&mut tx, None, recovery_id, "sms_failed", detail).await?;
    let notice = notices::sms_failed(failed.template == "recovery_code");
    store::notify(&mut tx, failed.recipient_id, notice.kind, notice.text)?;
    tracing::warn!(
        recovery_id = ?recovery_id,
        template = %failed.template,
        reason = %failed.reason,
        "an SMS about a recovery failed for good"
    );
    context.commit(tx).await
}
