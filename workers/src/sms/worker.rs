//! The SMS worker: takes `sms.requested` off the internal exchange, records
//! every SMS in the ledger (`sms_messages`), sends it through the provider no
//! faster than the provider's rate, and tells the requesting worker when an SMS
//! fails for good.

use std::num::NonZeroU32;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use sqlx::PgPool;
use trusted_contact_contracts::{Envelope, normalize_phone, reasons};
use uuid::Uuid;

use super::provider::{HttpSmsProvider, OutgoingSms, ProviderError, SmsProvider};
use super::rate::{RateLimitedProvider, SendRateLimiter};
use super::request::{SMS_FAILED, SMS_REQUESTED, SmsFailed, SmsRequested};
use crate::recovery::seal::CodeSeal;
use crate::runtime::{
    Context, HandlerError, Source, Worker, WorkerSpec,
    metrics::{METRICS, SmsLabels},
};
use crate::settings::{Environment, Secret, millis_var, parse_var, var_or};

/// The worker's name, which also names its queues.
pub const SMS_WORKER: &str = "sms";

pub const SPEC: WorkerSpec =
    WorkerSpec { name: SMS_WORKER, bindings: &[(Source::Internal, SMS_REQUESTED)] };

/// The stable code the ledger keeps when a number is refused before any send.
const INVALID_NUMBER: &str = "invalid_number";

/// How the worker reaches the provider, read from `TC_SMS_*` at start-up.
#[derive(Debug, Clone)]
pub struct SmsSettings {
    /// Base URL of the provider's HTTP API; the default is the stand-in
    /// gateway (`trusted-contact sms-gateway`) on this machine.
    pub gateway_url: String,
    pub gateway_token: Option<Secret>,
    /// Bounds one send; a reply that comes later is retried.
    pub timeout: Duration,
    /// The provider's rate, kept by a token bucket that every concurrent
    /// handler of the process shares.
    pub rate_per_sec: NonZeroU32,
    pub burst: NonZeroU32,
    /// Opens the sealed codes of code messages (`TC_CODE_SECRET`, as the
    /// recovery worker has it).
    pub code_secret: Secret,
}

impl SmsSettings {
    pub fn from_env(environment: &Environment) -> anyhow::Result<Self> {
        let token = std::env::var("TC_SMS_GATEWAY_TOKEN").ok().filter(|token| !token.is_empty());
        Ok(SmsSettings {
            gateway_url: var_or("TC_SMS_GATEWAY_URL", "http://127.0.0.1:8090"),
            gateway_token: token.map(Secret::new),
            timeout: millis_var("TC_SMS_TIMEOUT_MS", 10_000)?,
            rate_per_sec: parse_var("TC_SMS_RATE_PER_SEC", non_zero(50))?,
            burst: parse_var("TC_SMS_BURST", non_zero(10))?,
            code_secret: crate::recovery::settings::code_secret(environment)?,
        })
    }
}

const fn non_zero(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => NonZeroU32::MIN,
    }
}

/// Sends SMS through `P`. The runtime runs one handler per delivery at once,
/// all on this value, so a rate limit inside `P` is shared by all of them.
pub struct SmsWorker<P> {
    provider: P,
    seal: CodeSeal,
}

/// The production provider: the HTTP API behind the shared token bucket.
pub type ProductionProvider = RateLimitedProvider<HttpSmsProvider>;

impl SmsWorker<ProductionProvider> {
    pub fn from_settings(settings: &SmsSettings) -> anyhow::Result<Self> {
        reqwest::Url::parse(&settings.gateway_url).context("TC_SMS_GATEWAY_URL is not a URL")?;
        let http = HttpSmsProvider::new(
            &settings.gateway_url,
            settings.gateway_token.clone(),
            settings.timeout,
        )?;
        let limiter = SendRateLimiter::new(settings.rate_per_sec, settings.burst);
        let seal = CodeSeal::new(&settings.code_secret)?;
        Ok(SmsWorker::new(RateLimitedProvider::new(http, limiter), seal))
    }
}

impl<P: SmsProvider + 'static> SmsWorker<P> {
    pub fn new(provider: P, seal: CodeSeal) -> Self {
        SmsWorker { provider, seal }
    }

    /// One request, in three steps so that no transaction is open while the
    /// provider is called: mark the SMS as sending (or find it already
    /// finished), send it, then record the outcome with the inbox row.
    ///
    /// N.B. A crash between the provider's acceptance and the last step leaves
    /// the row `sending`; the redelivery sends again under the same client
    /// message id, which the provider answers with the same id and does not
    /// deliver twice.
    async fn send(
        &self,
        context: &Context,
        message: &Envelope,
        request: &SmsRequested,
    ) -> Result<(), HandlerError> {
        let phone = match normalize_phone(&request.phone) {
            Ok(phone) => phone,
            Err(_) => {
                let refusal = Refusal { reason: INVALID_NUMBER, told: reasons::SMS_REJECTED };
                return record_failed(context, message, request, &request.phone, refusal).await;
            }
        };
        let Some(attempt) = start_attempt(&context.pool, message, request, &phone).await? else {
            tracing::debug!(
                sms.idempotency_key = %request.idempotency_key,
                "sms already sent or failed, nothing to do"
            );
            return Ok(());
        };
        let sms = OutgoingSms {
            phone: phone.clone(),
            // A code that does not open will not open on a retry either.
            text: request.template.render(&self.seal).map_err(HandlerError::Permanent)?,
            client_message_id: request.idempotency_key.clone(),
        };
        match self.provider.send(&sms).await {
            Ok(accepted) => record_sent(context, message, request, &accepted.provider_id).await,
            // Failing the SMS would tell the requesting flow something false:
            // the request is dead-lettered, unhandled, for replay once the
            // cause (a token, a URL, the account's balance) is fixed.
            Err(ProviderError::Rejected { reason }) => {
                if let Err(db) = record_not_sent(&context.pool, request, &reason).await {
                    tracing::warn!(error = %db, "cannot record the rejected sms attempt");
                }
                Err(HandlerError::permanent(anyhow::anyhow!(
                    "the SMS provider rejected the request ({reason}); check \
                     TC_SMS_GATEWAY_URL, TC_SMS_GATEWAY_TOKEN and the provider account, then replay"
                )))
            }
            Err(ProviderError::Refused { reason }) => {
                let refusal = Refusal { reason: &reason, told: reasons::SMS_REJECTED };
                record_failed(context, message, request, &phone, refusal).await
            }
            // On the last delivery the runtime allows, the SMS fails, so the
            // requesting flow hears of it instead of waiting for an SMS that
            // will never come.
            Err(error) if !context.may_retry() => {
                tracing::warn!(
                    sms.idempotency_key = %request.idempotency_key,
                    sms.attempt = attempt,
                    sms.reason = error.reason(),
                    "sms not accepted on the last attempt allowed, failing it"
                );
                let refusal =
                    Refusal { reason: error.reason(), told: reasons::SMS_ATTEMPTS_EXHAUSTED };
                record_failed(context, message, request, &phone, refusal).await?;
                // Still an error, so that the runtime dead-letters the request
                // with its history for the operators.
                Err(HandlerError::transient(error))
            }
            Err(error) => {
                tracing::warn!(
                    sms.idempotency_key = %request.idempotency_key,
                    sms.phone = %trusted_contact_contracts::mask_phone(&phone),
                    sms.attempt = attempt,
                    sms.reason = error.reason(),
                    "sms not accepted, will retry"
                );
                // The row only informs operators; the retry does not depend
                // on it, so a ledger hiccup here must not hide the provider's
                // Retry-After behind a database error.
                if let Err(db) = record_not_sent(&context.pool, request, error.reason()).await {
                    tracing::warn!(error = %db, "cannot record the failed sms attempt");
                }
                let retry_after = error.retry_after();
                Err(HandlerError::Transient { source: error.into(), retry_after })
            }
        }
    }
}

impl<P: SmsProvider + 'static> Worker for SmsWorker<P> {
    fn spec(&self) -> WorkerSpec {
        SPEC
    }

    async fn handle(&self, context: &Context, message: &Envelope) -> Result<(), HandlerError> {
        let request: SmsRequested = message.payload_as()?;
        self.send(context, message, &request).await
    }
}

/// Creates the row as `sending`, or moves an unfinished one back to
/// `sending`, counting the attempt. `None` when the SMS is already sent or
/// failed: a repeated request that must change nothing.
async fn start_attempt(
    pool: &PgPool,
    message: &Envelope,
    request: &SmsRequested,
    phone: &str,
) -> Result<Option<i32>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO sms_messages \
           (idempotency_key, recipient_id, phone, template, requested_by, status, attempts, \
            correlation_id, request_message_id, last_attempt_at) \
         VALUES ($1, $2, $3, $4, $5, 'sending', 1, $6, $7, now()) \
         ON CONFLICT (idempotency_key) DO UPDATE \
           SET status = 'sending', attempts = sms_messages.attempts + 1, \
               last_attempt_at = now(), updated_at = now() \
           WHERE sms_messages.status IN ('queued', 'sending') \
         RETURNING attempts",
    )
    .bind(&request.idempotency_key)
    .bind(request.recipient_id)
    .bind(phone)
    .bind(request.template.kind())
    .bind(&request.requested_by)
    .bind(message.flow_id())
    .bind(message.message_id)
    .fetch_optional(pool)
    .await
}

/// Back to `queued`, with the reason, until the broker's retry or an
/// operator's replay brings the request again.
async fn record_not_sent(
    pool: &PgPool,
    request: &SmsRequested,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE sms_messages SET status = 'queued', last_error = $2, updated_at = now() \
         WHERE idempotency_key = $1 AND status = 'sending'",
    )
    .bind(&request.idempotency_key)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

async fn record_sent(
    context: &Context,
    message: &Envelope,
    request: &SmsRequested,
    provider_id: &str,
) -> Result<(), HandlerError> {
    let Some(mut tx) = context.begin(message).await? else { return Ok(()) };
    let sent: Option<(Uuid, i32)> = sqlx::query_as(
        "UPDATE sms_messages \
         SET status = 'sent', provider_id = $2, last_error = NULL, sent_at = now(), \
             updated_at = now() \
         WHERE idempotency_key = $1 AND status IN ('queued', 'sending') \
         RETURNING sms_id, attempts",
    )
    .bind(&request.idempotency_key)
    .bind(provider_id)
    .fetch_optional(tx.conn())
    .await?;
    // Nothing changed when a copy of this request running at the same time
    // recorded the same acceptance first.
    if let Some((sms_id, attempts)) = sent {
        let detail = json!({
            "template": request.template.kind(),
            "recipient_id": request.recipient_id,
            "attempts": attempts,
            "provider_id": provider_id,
        });
        tx.audit(None, "sms", Some(sms_id), "sms.sent", &detail).await?;
        let labels = SmsLabels { template: request.template.kind().to_owned() };
        METRICS.sms_sent.get_or_create(&labels).inc();
        tracing::debug!(
            sms.idempotency_key = %request.idempotency_key,
            sms.provider_id = provider_id,
            sms.attempts = attempts,
            "sms sent"
        );
    }
    context.commit(tx).await
}

/// Why an SMS failed: the provider's code for the ledger, and the stable code
/// from [`reasons`] the requesting worker is told.
#[derive(Debug, Clone, Copy)]
struct Refusal<'a> {
    reason: &'a str,
    told: &'static str,
}

/// Marks the SMS failed for good (creating the row when the number was refused
/// before any send) and tells the requesting worker, once.
async fn record_failed(
    context: &Context,
    message: &Envelope,
    request: &SmsRequested,
    phone: &str,
    refusal: Refusal<'_>,
) -> Result<(), HandlerError> {
    let Refusal { reason, told } = refusal;
    let Some(mut tx) = context.begin(message).await? else { return Ok(()) };
    let failed: Option<(Uuid, i32)> = sqlx::query_as(
        "INSERT INTO sms_messages \
           (idempotency_key, recipient_id, phone, template, requested_by, status, attempts, \
            failure_reason, correlation_id, request_message_id, failed_at) \
         VALUES ($1, $2, $3, $4, $5, 'failed', 0, $6, $7, $8, now()) \
         ON CONFLICT (idempotency_key) DO UPDATE \
           SET status = 'failed', failure_reason = $6, failed_at = now(), updated_at = now() \
           WHERE sms_messages.status IN ('queued', 'sending') \
         RETURNING sms_id, attempts",
    )
    .bind(&request.idempotency_key)
    .bind(request.recipient_id)
    .bind(phone)
    .bind(request.template.kind())
    .bind(&request.requested_by)
    .bind(reason)
    .bind(message.flow_id())
    .bind(message.message_id)
    .fetch_optional(tx.conn())
    .await?;
    if let Some((sms_id, attempts)) = failed {
        let detail = json!({
            "template": request.template.kind(),
            "recipient_id": request.recipient_id,
            "attempts": attempts,
            "reason": reason,
        });
        tx.audit(None, "sms", Some(sms_id), "sms.failed", &detail).await?;
        let labels = SmsLabels { template: request.template.kind().to_owned() };
        METRICS.sms_failed.get_or_create(&labels).inc();
        let report = SmsFailed {
            idempotency_key: request.idempotency_key.clone(),
            recipient_id: request.recipient_id,
            template: request.template.kind().to_owned(),
            reason: told.to_owned(),
        };
        tx.send_to_worker(&request.requested_by, SMS_FAILED, &report)?;
        tracing::warn!(
            sms.idempotency_key = %request.idempotency_key,
            sms.phone = %trusted_contact_contracts::mask_phone(phone),
            sms.reason = reason,
            requested_by = %request.requested_by,
            "sms failed for good, the requesting worker is told"
        );
    }
    context.commit(tx).await
}
