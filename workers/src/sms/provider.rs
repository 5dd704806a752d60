//! The interface the SMS worker sends through, and its implementation over the
//! aggregator's HTTP API. Failures are classified here, where the HTTP status
//! is known: transient ones are worth a retry, permanent ones never will
//! succeed.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::{Deserialize, Serialize};

use trusted_contact_contracts::phone::mask_phone;

use crate::settings::Secret;

/// One SMS to hand to the provider.
///
/// `client_message_id` is the idempotency key: the provider delivers a given id
/// once, so a retry after a lost reply cannot send the SMS twice.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingSms {
    pub phone: String,
    pub text: String,
    pub client_message_id: String,
}

/// The text may hold a one-time code, so `Debug` leaves it out and masks the
/// phone.
impl fmt::Debug for OutgoingSms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutgoingSms")
            .field("phone", &mask_phone(&self.phone))
            .field("client_message_id", &self.client_message_id)
            .finish_non_exhaustive()
    }
}

/// The provider took the message; `provider_id` is its own id for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderAccepted {
    pub provider_id: String,
}

/// Why the provider did not take a message.
///
/// `reason` is a short stable code (`timeout`, `http_503`, `invalid_number`,
/// ...) that is safe to log and to put in a dead-letter header; the underlying
/// error, when there is one, stays reachable through `source()`.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Worth retrying later; `retry_after` is the provider's own hint, when it
    /// gave one.
    #[error("SMS provider failed transiently: {reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
        #[source]
        source: Option<reqwest::Error>,
    },
    /// The provider refused the recipient (an invalid or a blocked number):
    /// this SMS will never go through, and the requesting flow must hear so.
    #[error("SMS provider refused the recipient: {reason}")]
    Refused { reason: String },
    /// The provider turned down the request itself (our credentials, the
    /// endpoint, the account, the request's shape), or refused without saying
    /// why. Nothing says the SMS is undeliverable: it may go once an operator
    /// has fixed the cause and replayed it.
    #[error("SMS provider rejected the request: {reason}")]
    Rejected { reason: String },
}

/// The provider's error codes that refuse a recipient rather than a request.
/// Anything else that is not transient is taken as our side's problem.
const RECIPIENT_REFUSALS: &[&str] = &["invalid_number", "blocked_recipient"];

impl ProviderError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Transient { retry_after, .. } => *retry_after,
            Self::Refused { .. } | Self::Rejected { .. } => None,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Self::Transient { reason, .. }
            | Self::Refused { reason }
            | Self::Rejected { reason } => reason,
        }
    }
}

/// Something that delivers SMS. Implementations must be safe to call
/// concurrently and must pass `client_message_id` on, so that a retried send is
/// delivered at most once.
pub trait SmsProvider: Send + Sync {
    fn send(
        &self,
        request: &OutgoingSms,
    ) -> impl Future<Output = Result<ProviderAccepted, ProviderError>> + Send;
}

impl<P: SmsProvider> SmsProvider for Arc<P> {
    fn send(
        &self,
        request: &OutgoingSms,
    ) -> impl Future<Output = Result<ProviderAccepted, ProviderError>> + Send {
        (**self).send(request)
    }
}

/// The aggregator's HTTP API: `POST {base_url}/v1/messages` with a bearer
/// token.
#[derive(Debug, Clone)]
pub struct HttpSmsProvider {
    client: reqwest::Client,
    endpoint: String,
    token: Option<Secret>,
}

#[derive(Serialize)]
struct SendBody<'a> {
    phone: &'a str,
    text: &'a str,
    client_message_id: &'a str,
}

#[derive(Deserialize)]
struct AcceptedBody {
    id: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

impl HttpSmsProvider {
    /// `timeout` bounds the whole exchange; a reply that comes later counts as
    /// a timeout, which is transient because the provider may well have taken
    /// the message.
    pub fn new(base_url: &str, token: Option<Secret>, timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .context("building the HTTP client for the SMS provider")?;
        let endpoint = format!("{}/v1/messages", base_url.trim_end_matches('/'));
        Ok(Self { client, endpoint, token })
    }

    async fn post(&self, request: &OutgoingSms) -> Result<ProviderAccepted, ProviderError> {
        let body = SendBody {
            phone: &request.phone,
            text: &request.text,
            client_message_id: &request.client_message_id,
        };
        let mut builder = self.client.post(&self.endpoint).json(&body);
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token.expose());
        }
        let response = builder.send().await.map_err(transport_error)?;
        let status = response.status();
        if status.is_success() {
            let accepted: AcceptedBody = response.json().await.map_err(|error| {
                // The provider may have kept the message; a retry with the same
                // client id is safe, so an unreadable success is not a reason
                // to give up.
                ProviderError::Transient {
                    reason: "unreadable_success_reply".into(),
                    retry_after: None,
                    source: Some(error),
                }
            })?;
            return Ok(ProviderAccepted { provider_id: accepted.id });
        }
        let retry_after = parse_retry_after(response.headers());
        let code = response.json::<ErrorBody>().await.ok().map(|body| body.error);
        Err(classify_status(status, code, retry_after))
    }
}

impl SmsProvider for HttpSmsProvider {
    async fn send(&self, request: &OutgoingSms) -> Result<ProviderAccepted, ProviderError> {
        let result = self.post(request).await;
        match &result {
            Ok(accepted) => tracing::debug!(
                sms.phone = %mask_phone(&request.phone),
                sms.client_message_id = %request.client_message_id,
                sms.provider_id = %accepted.provider_id,
                "sms accepted by provider"
            ),
            Err(error) => tracing::debug!(
                sms.phone = %mask_phone(&request.phone),
                sms.client_message_id = %request.client_message_id,
                sms.transient = error.is_transient(),
                sms.reason = error.reason(),
                "sms not accepted by provider"
            ),
        }
        result
    }
}

/// Every failure to get a reply is transient: the network, the provider or our
/// timeout may all be fine a moment later.
fn transport_error(error: reqwest::Error) -> ProviderError {
    let reason = if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else {
        "transport"
    };
    ProviderError::Transient { reason: reason.into(), retry_after: None, source: Some(error) }
}

fn classify_status(
    status: StatusCode,
    code: Option<String>,
    retry_after: Option<Duration>,
) -> ProviderError {
    let reason = code.unwrap_or_else(|| format!("http_{}", status.as_u16()));
    let transient = status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT;
    if transient {
        ProviderError::Transient { reason, retry_after, source: None }
    } else if RECIPIENT_REFUSALS.contains(&reason.as_str()) {
        ProviderError::Refused { reason }
    } else {
        ProviderError::Rejected { reason }
    }
}

/// `Retry-After` as delay-seconds, or as an HTTP date turned into the time left
/// until it.
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let left = at.signed_duration_since(chrono::Utc::now());
    Some(left.to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    fn headers_with_retry_after(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn retry_after_in_seconds_is_read() {
        let headers = headers_with_retry_after("2");
        assert_eq!(parse_retry_after(&headers), Some(Duration::from_secs(2)));
    }

    #[test]
    fn retry_after_as_a_past_date_means_now() {
        let headers = headers_with_retry_after("Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(parse_retry_after(&headers), Some(Duration::ZERO));
    }

    #[test]
    fn garbage_retry_after_is_ignored() {
        assert_eq!(parse_retry_after(&headers_with_retry_after("soon")), None);
        assert_eq!(parse_retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn server_errors_and_throttling_are_transient_a_bad_recipient_refused_the_rest_rejected() {
        let hint = Some(Duration::from_secs(3));
        let throttled = classify_status(StatusCode::TOO_MANY_REQUESTS, None, hint);
        assert!(throttled.is_transient());
        assert_eq!(throttled.retry_after(), hint);
        assert!(classify_status(StatusCode::SERVICE_UNAVAILABLE, None, None).is_transient());
        assert!(classify_status(StatusCode::BAD_GATEWAY, None, None).is_transient());

        let invalid = classify_status(StatusCode::BAD_REQUEST, Some("invalid_number".into()), None);
        assert!(
            matches!(&invalid, ProviderError::Refused { reason } if reason == "invalid_number")
        );
        let blocked =
            classify_status(StatusCode::FORBIDDEN, Some("blocked_recipient".into()), None);
        assert!(matches!(blocked, ProviderError::Refused { .. }));

        let unauthorized = classify_status(StatusCode::UNAUTHORIZED, None, None);
        assert!(
            matches!(&unauthorized, ProviderError::Rejected { reason } if reason == "http_401")
        );
        for (status, code) in [
            (StatusCode::NOT_FOUND, None),
            (StatusCode::PAYMENT_REQUIRED, Some("insufficient_funds".to_owned())),
            (StatusCode::FORBIDDEN, Some("sender_suspended".to_owned())),
            (StatusCode::BAD_REQUEST, Some("invalid_request".to_owned())),
        ] {
            let error = classify_status(status, code, None);
            assert!(matches!(error, ProviderError::Rejected { .. }), "{status}: {error:?}");
        }
    }

    #[test]
    fn neither_the_token_nor_the_text_shows_in_debug_output() {
        let token = Some(Secret::new("very-secret-token"));
        let provider =
            HttpSmsProvider::new("http://localhost:1", token, Duration::from_secs(1)).unwrap();
        assert!(!format!("{provider:?}").contains("very-secret-token"));

        let sms = OutgoingSms {
            phone: "+79001234567".into(),
            text: "Код 123456".into(),
            client_message_id: "m-1".into(),
        };
        let shown = format!("{sms:?}");
        assert!(!shown.contains("123456"));
        assert!(shown.contains("+7900***4567"));
    }
}
