//! The request another worker sends to the SMS worker, through the internal
//! exchange, in the same ledger transaction as the state change it reports.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::SmsTemplate;
use crate::ledger::LedgerTx;

/// Type and routing key of an SMS request on the internal exchange.
pub const SMS_REQUESTED: &str = "sms.requested";
/// Type and routing key of the event the SMS worker sends back to the
/// requesting worker when an SMS failed for good.
pub const SMS_FAILED: &str = "sms.failed";

/// One SMS to send. The idempotency key is derived from the message that
/// caused the request, so a redelivered cause maps to the same key and the
/// provider (which receives it as the client message id) sends it once.
#[derive(Clone, Serialize, Deserialize)]
pub struct SmsRequested {
    pub idempotency_key: String,
    pub recipient_id: Uuid,
    /// Normalised `+7XXXXXXXXXX`.
    pub phone: String,
    pub template: SmsTemplate,
    /// The worker that asked, which hears of a permanent failure.
    pub requested_by: String,
}

impl std::fmt::Debug for SmsRequested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmsRequested")
            .field("idempotency_key", &self.idempotency_key)
            .field("recipient_id", &self.recipient_id)
            .field("phone", &trusted_contact_contracts::phone::mask_phone(&self.phone))
            .field("template", &self.template.kind())
            .finish()
    }
}

/// What the SMS worker reports back when an SMS cannot be sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmsFailed {
    pub idempotency_key: String,
    pub recipient_id: Uuid,
    pub template: String,
    pub reason: String,
}

/// Queues an SMS to `recipient_id` as part of `tx`. `requested_by` is the
/// worker whose transaction this is.
pub fn request_sms(
    tx: &mut LedgerTx,
    requested_by: &str,
    recipient_id: Uuid,
    phone: &str,
    template: SmsTemplate,
) -> anyhow::Result<()> {
    let idempotency_key = format!("{}:{}:{}", tx.cause().message_id, template.kind(), recipient_id);
    let request = SmsRequested {
        idempotency_key,
        recipient_id,
        phone: phone.to_owned(),
        template,
        requested_by: requested_by.to_owned(),
    };
    tx.send_internal(SMS_REQUESTED, &request)?;
    Ok(())
}
