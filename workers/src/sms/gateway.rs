//! A stand-in for the SMS aggregator's HTTP API, run as `trusted-contact
//! sms-gateway`. It records what it delivered and every attempt it saw, and
//! misbehaves on demand (errors, throttling, latency, accepted-then-stalled
//! replies) so tests can check retries.
//!
//! Numbers starting with [`BLOCKED_PREFIX`] (`+7999000…`) are always refused as
//! blocked recipients, so a test can reach that refusal without configuring the
//! gateway.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::header::{AUTHORIZATION, RETRY_AFTER};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use trusted_contact_contracts::phone::mask_phone;

use crate::settings::Secret;

/// Refused as blocked recipients without any configuration.
pub const BLOCKED_PREFIX: &str = "+7999000";

const DEFAULT_PORT: u16 = 8090;
const DEFAULT_RETRY_AFTER_SECS: u64 = 1;
const DEFAULT_STALL_MS: u64 = 30_000;
const DEFAULT_MAX_LOGGED_REQUESTS: usize = 100_000;

/// Start-up settings; the CLI flattens these into `trusted-contact
/// sms-gateway`.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayConfig {
    /// Port to listen on.
    #[arg(long, env = "SMS_GATEWAY_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,

    /// Address to listen on.
    #[arg(long, env = "SMS_GATEWAY_HOST", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub host: IpAddr,

    /// Bearer token callers must present; without one, every caller is let in.
    #[arg(long, env = "SMS_GATEWAY_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,

    /// Phones refused as blocked recipients, besides those starting with
    /// +7999000.
    #[arg(long = "blocked-phone", env = "SMS_GATEWAY_BLOCKED_PHONES", value_delimiter = ',')]
    pub blocked_phones: Vec<String>,

    /// How many attempts `GET /requests` remembers; the oldest are forgotten
    /// first.
    #[arg(
        long,
        env = "SMS_GATEWAY_MAX_LOGGED_REQUESTS",
        default_value_t = DEFAULT_MAX_LOGGED_REQUESTS
    )]
    pub max_logged_requests: usize,

    #[command(flatten)]
    pub behaviour: Behaviour,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            port: DEFAULT_PORT,
            host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            token: None,
            blocked_phones: Vec::new(),
            max_logged_requests: DEFAULT_MAX_LOGGED_REQUESTS,
            behaviour: Behaviour::default(),
        }
    }
}

impl GatewayConfig {
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }
}

/// How badly the gateway behaves; set at start and changed with `POST
/// /control`.
#[derive(Debug, Clone, Copy, PartialEq, clap::Args, Serialize, Deserialize)]
pub struct Behaviour {
    /// Share (0..1) of sends answered 500 or 503 before anything is accepted.
    #[arg(long, env = "SMS_GATEWAY_FAIL_RATIO", default_value_t = 0.0)]
    pub fail_ratio: f64,

    /// Share (0..1) of sends answered 429 with `Retry-After`.
    #[arg(long, env = "SMS_GATEWAY_THROTTLE_RATIO", default_value_t = 0.0)]
    pub throttle_ratio: f64,

    /// Seconds announced in `Retry-After` on a 429.
    #[arg(long, env = "SMS_GATEWAY_RETRY_AFTER_SECS", default_value_t = DEFAULT_RETRY_AFTER_SECS)]
    pub retry_after_secs: u64,

    /// Delay added before every send is looked at.
    #[arg(long, env = "SMS_GATEWAY_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,

    /// Share (0..1) of new messages that are delivered but answered only after
    /// `stall_ms`.
    #[arg(long, env = "SMS_GATEWAY_ACCEPT_THEN_STALL_RATIO", default_value_t = 0.0)]
    pub accept_then_stall_ratio: f64,

    /// How long a stalled reply is held back.
    #[arg(long, env = "SMS_GATEWAY_STALL_MS", default_value_t = DEFAULT_STALL_MS)]
    pub stall_ms: u64,

    /// Sends answered 2xx (new or repeated) in any rolling second before the
    /// next is answered 429; 0 for no limit.
    #[arg(long, env = "SMS_GATEWAY_RATE_LIMIT_PER_SEC", default_value_t = 0)]
    pub rate_limit_per_sec: u32,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            fail_ratio: 0.0,
            throttle_ratio: 0.0,
            retry_after_secs: DEFAULT_RETRY_AFTER_SECS,
            latency_ms: 0,
            accept_then_stall_ratio: 0.0,
            stall_ms: DEFAULT_STALL_MS,
            rate_limit_per_sec: 0,
        }
    }
}

impl Behaviour {
    fn validate(&self) -> anyhow::Result<()> {
        let ratios = [
            ("fail_ratio", self.fail_ratio),
            ("throttle_ratio", self.throttle_ratio),
            ("accept_then_stall_ratio", self.accept_then_stall_ratio),
        ];
        for (name, ratio) in ratios {
            anyhow::ensure!((0.0..=1.0).contains(&ratio), "{name} must be within 0..1");
        }
        Ok(())
    }
}

/// The body of `POST /control`: every field is optional and only those given
/// change.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BehaviourPatch {
    fail_ratio: Option<f64>,
    throttle_ratio: Option<f64>,
    retry_after_secs: Option<u64>,
    latency_ms: Option<u64>,
    accept_then_stall_ratio: Option<f64>,
    stall_ms: Option<u64>,
    rate_limit_per_sec: Option<u32>,
}

impl BehaviourPatch {
    fn apply(self, to: Behaviour) -> Behaviour {
        Behaviour {
            fail_ratio: self.fail_ratio.unwrap_or(to.fail_ratio),
            throttle_ratio: self.throttle_ratio.unwrap_or(to.throttle_ratio),
            retry_after_secs: self.retry_after_secs.unwrap_or(to.retry_after_secs),
            latency_ms: self.latency_ms.unwrap_or(to.latency_ms),
            accept_then_stall_ratio: self
                .accept_then_stall_ratio
                .unwrap_or(to.accept_then_stall_ratio),
            stall_ms: self.stall_ms.unwrap_or(to.stall_ms),
            rate_limit_per_sec: self.rate_limit_per_sec.unwrap_or(to.rate_limit_per_sec),
        }
    }
}

#[derive(Debug, Deserialize)]
struct SendRequest {
    phone: String,
    text: String,
    client_message_id: String,
}

/// A message the gateway delivered, as `GET /messages` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveredMessage {
    pub phone: String,
    pub text: String,
    pub client_message_id: String,
    pub provider_id: String,
    pub received_at: DateTime<Utc>,
}

/// One `POST /v1/messages` attempt and what it was answered, as `GET /requests`
/// shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub at: DateTime<Utc>,
    pub client_message_id: Option<String>,
    pub phone: Option<String>,
    pub status: u16,
    pub outcome: String,
}

struct Gateway {
    token: Option<Secret>,
    blocked: HashSet<String>,
    max_logged_requests: usize,
    ledger: Mutex<Ledger>,
}

/// Everything the gateway remembers. Deliveries and the dedupe map are kept
/// for the life of the process, since forgetting an id would let a late retry
/// deliver twice; a long load test therefore grows memory until `DELETE
/// /messages`. Only the attempt log is capped.
#[derive(Default)]
struct Ledger {
    behaviour: Behaviour,
    delivered: Vec<DeliveredMessage>,
    provider_ids: HashMap<String, String>,
    requests: VecDeque<RequestRecord>,
    /// When each recent 2xx was answered, for the rolling-second rate limit.
    answered: VecDeque<Instant>,
}

/// What a send is answered, and how long the answer is held back.
struct Reply {
    status: StatusCode,
    body: serde_json::Value,
    retry_after: Option<u64>,
    delay: Option<Duration>,
}

impl Reply {
    fn error(status: StatusCode, code: &str) -> Self {
        Self { status, body: serde_json::json!({ "error": code }), retry_after: None, delay: None }
    }

    fn accepted(status: StatusCode, provider_id: &str) -> Self {
        Self {
            status,
            body: serde_json::json!({ "id": provider_id, "status": "accepted" }),
            retry_after: None,
            delay: None,
        }
    }

    fn outcome(&self) -> String {
        match self.body.get("error").and_then(|code| code.as_str()) {
            Some(code) => code.to_owned(),
            None if self.status == StatusCode::OK => "duplicate".to_owned(),
            None => "accepted".to_owned(),
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(RETRY_AFTER, seconds.into());
        }
        response
    }
}

impl Gateway {
    fn new(config: GatewayConfig) -> Self {
        Self {
            token: config.token,
            blocked: config.blocked_phones.into_iter().map(|p| p.trim().to_owned()).collect(),
            max_logged_requests: config.max_logged_requests,
            ledger: Mutex::new(Ledger { behaviour: config.behaviour, ..Ledger::default() }),
        }
    }

    /// A handler that panicked mid-update leaves nothing half-written that
    /// matters to a stand-in, so a poisoned lock is simply taken over.
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn authorised(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let presented = headers.get(AUTHORIZATION).and_then(|value| value.to_str().ok());
        presented.and_then(|value| value.strip_prefix("Bearer ")) == Some(token.expose())
    }

    fn blocked(&self, phone: &str) -> bool {
        phone.starts_with(BLOCKED_PREFIX) || self.blocked.contains(phone)
    }

    /// Decides the answer to one send and records it, all under one lock so
    /// that dedupe and the rate limit hold when sends for the same id arrive at
    /// once.
    fn decide(&self, headers: &HeaderMap, body: &[u8], behaviour: &Behaviour) -> Reply {
        let at = Utc::now();
        let request = serde_json::from_slice::<SendRequest>(body).ok();
        let mut ledger = self.ledger();
        let reply = self.answer(&mut ledger, headers, request.as_ref(), behaviour, at);
        let record = RequestRecord {
            at,
            client_message_id: request.as_ref().map(|r| r.client_message_id.clone()),
            phone: request.as_ref().map(|r| r.phone.clone()),
            status: reply.status.as_u16(),
            outcome: reply.outcome(),
        };
        if ledger.requests.len() >= self.max_logged_requests {
            ledger.requests.pop_front();
        }
        ledger.requests.push_back(record);
        drop(ledger);

        tracing::debug!(
            sms.phone = %request.as_ref().map_or_else(String::new, |r| mask_phone(&r.phone)),
            sms.client_message_id = request.as_ref().map(|r| r.client_message_id.as_str()),
            http.status = reply.status.as_u16(),
            "sms gateway answered"
        );
        reply
    }

    fn answer(
        &self,
        ledger: &mut Ledger,
        headers: &HeaderMap,
        request: Option<&SendRequest>,
        behaviour: &Behaviour,
        at: DateTime<Utc>,
    ) -> Reply {
        if !self.authorised(headers) {
            return Reply::error(StatusCode::UNAUTHORIZED, "unauthorized");
        }
        let Some(request) = request else {
            return Reply::error(StatusCode::BAD_REQUEST, "invalid_request");
        };
        if rand::random_bool(behaviour.fail_ratio) {
            return if rand::random_bool(0.5) {
                Reply::error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
            } else {
                Reply::error(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            };
        }
        if rand::random_bool(behaviour.throttle_ratio) {
            return throttled("throttled", behaviour.retry_after_secs);
        }
        if !is_valid_phone(&request.phone) {
            return Reply::error(StatusCode::BAD_REQUEST, "invalid_number");
        }
        if self.blocked(&request.phone) {
            return Reply::error(StatusCode::FORBIDDEN, "blocked_recipient");
        }

        let now = Instant::now();
        while ledger
            .answered
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            ledger.answered.pop_front();
        }
        let limit = behaviour.rate_limit_per_sec as usize;
        if limit > 0 && ledger.answered.len() >= limit {
            return throttled("rate_limited", 1);
        }
        ledger.answered.push_back(now);

        if let Some(provider_id) = ledger.provider_ids.get(&request.client_message_id) {
            return Reply::accepted(StatusCode::OK, provider_id);
        }
        let provider_id = uuid::Uuid::new_v4().to_string();
        ledger.provider_ids.insert(request.client_message_id.clone(), provider_id.clone());
        ledger.delivered.push(DeliveredMessage {
            phone: request.phone.clone(),
            text: request.text.clone(),
            client_message_id: request.client_message_id.clone(),
            provider_id: provider_id.clone(),
            received_at: at,
        });
        let mut reply = Reply::accepted(StatusCode::CREATED, &provider_id);
        if rand::random_bool(behaviour.accept_then_stall_ratio) {
            reply.delay = Some(Duration::from_millis(behaviour.stall_ms));
        }
        reply
    }
}

fn throttled(code: &str, retry_after_secs: u64) -> Reply {
    let mut reply = Reply::error(StatusCode::TOO_MANY_REQUESTS, code);
    reply.retry_after = Some(retry_after_secs);
    reply
}

/// `+7` and ten digits: the only form the aggregator accepts.
fn is_valid_phone(phone: &str) -> bool {
    phone
        .strip_prefix("+7")
        .is_some_and(|rest| rest.len() == 10 && rest.bytes().all(|b| b.is_ascii_digit()))
}

async fn send(State(gateway): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Reply {
    let behaviour = gateway.ledger().behaviour;
    if behaviour.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(behaviour.latency_ms)).await;
    }
    let reply = gateway.decide(&headers, &body, &behaviour);
    if let Some(delay) = reply.delay {
        tokio::time::sleep(delay).await;
    }
    reply
}

#[derive(Debug, Deserialize)]
struct MessagesFilter {
    phone: Option<String>,
}

async fn list_messages(
    State(gateway): State<Arc<Gateway>>,
    Query(filter): Query<MessagesFilter>,
) -> Json<Vec<DeliveredMessage>> {
    // An unencoded `+` arrives as a space; take it for the `+` the caller
    // meant.
    let wanted = filter.phone.map(|phone| {
        let digits = phone.trim().trim_start_matches('+');
        format!("+{digits}")
    });
    let ledger = gateway.ledger();
    let messages = ledger
        .delivered
        .iter()
        .filter(|m| wanted.as_ref().is_none_or(|phone| &m.phone == phone))
        .cloned()
        .collect();
    Json(messages)
}

async fn clear(State(gateway): State<Arc<Gateway>>) -> StatusCode {
    let mut ledger = gateway.ledger();
    ledger.delivered.clear();
    ledger.provider_ids.clear();
    ledger.requests.clear();
    ledger.answered.clear();
    StatusCode::NO_CONTENT
}

#[derive(Debug, Deserialize)]
struct RequestsFilter {
    client_message_id: Option<String>,
}

async fn list_requests(
    State(gateway): State<Arc<Gateway>>,
    Query(filter): Query<RequestsFilter>,
) -> Json<Vec<RequestRecord>> {
    let ledger = gateway.ledger();
    let wanted = filter.client_message_id.as_deref();
    let records = ledger
        .requests
        .iter()
        .filter(|r| wanted.is_none_or(|id| r.client_message_id.as_deref() == Some(id)))
        .cloned()
        .collect();
    Json(records)
}

async fn show_control(State(gateway): State<Arc<Gateway>>) -> Json<Behaviour> {
    Json(gateway.ledger().behaviour)
}

async fn change_control(State(gateway): State<Arc<Gateway>>, body: Bytes) -> Response {
    let patch = match serde_json::from_slice::<BehaviourPatch>(&body) {
        Ok(patch) => patch,
        Err(error) => return control_refused(&error.to_string()),
    };
    let mut ledger = gateway.ledger();
    let behaviour = patch.apply(ledger.behaviour);
    if let Err(error) = behaviour.validate() {
        return control_refused(&error.to_string());
    }
    ledger.behaviour = behaviour;
    drop(ledger);
    tracing::info!(?behaviour, "sms gateway behaviour changed");
    Json(behaviour).into_response()
}

fn control_refused(detail: &str) -> Response {
    let body = serde_json::json!({ "error": "invalid_control", "detail": detail });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/messages", post(send))
        .route("/messages", get(list_messages).delete(clear))
        .route("/requests", get(list_requests))
        .route("/control", get(show_control).post(change_control))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(gateway)
}

/// Serves the gateway on `listener` until `shutdown` completes.
///
/// N.B. shutdown waits for replies in flight, so a stalled reply holds it up to
/// `stall_ms`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.behaviour.validate().context("invalid SMS gateway behaviour")?;
    let addr = listener.local_addr().context("reading the SMS gateway's address")?;
    let app = router(Arc::new(Gateway::new(config)));
    tracing::info!(%addr, "sms gateway listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving the SMS gateway")?;
    tracing::info!("sms gateway stopped");
    Ok(())
}

/// Binds the configured address and serves until `shutdown` completes.
pub async fn run(
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = config.listen_addr();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the SMS gateway to {addr}"))?;
    serve(listener, config, shutdown).await
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;
    use crate::sms::provider::{HttpSmsProvider, OutgoingSms, SmsProvider};

    struct Running {
        base: String,
        http: reqwest::Client,
        _stop: oneshot::Sender<()>,
    }

    impl Running {
        fn provider(&self, timeout: Duration) -> HttpSmsProvider {
            HttpSmsProvider::new(&self.base, None, timeout).unwrap()
        }

        async fn messages(&self, query: &str) -> Vec<DeliveredMessage> {
            let url = format!("{}/messages{query}", self.base);
            self.http.get(url).send().await.unwrap().json().await.unwrap()
        }

        async fn requests(&self) -> Vec<RequestRecord> {
            let url = format!("{}/requests", self.base);
            self.http.get(url).send().await.unwrap().json().await.unwrap()
        }

        async fn control(&self, body: serde_json::Value) -> reqwest::Response {
            let url = format!("{}/control", self.base);
            self.http.post(url).json(&body).send().await.unwrap()
        }
    }

    async fn start(config: GatewayConfig) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve(listener, config, async {
            let _ = stopped.await;
        }));
        Running { base, http: reqwest::Client::new(), _stop: stop }
    }

    fn sms(phone: &str, id: &str) -> OutgoingSms {
        OutgoingSms {
            phone: phone.into(), text: "Код 123456".into(), client_message_id: id.into()
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn the_same_client_message_id_twice_is_delivered_once_with_one_provider_id() {
        let gateway = start(GatewayConfig::default()).await;
        let provider = gateway.provider(SECOND);

        let first = provider.send(&sms("+79001234567", "m-1")).await.unwrap();
        let second = provider.send(&sms("+79001234567", "m-1")).await.unwrap();

        assert_eq!(first, second);
        let delivered = gateway.messages("").await;
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].provider_id, first.provider_id);
        let statuses: Vec<_> = gateway.requests().await.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [201, 200]);
    }

    #[tokio::test]
    async fn an_invalid_number_is_refused_for_good() {
        let gateway = start(GatewayConfig::default()).await;
        let provider = gateway.provider(SECOND);

        for phone in ["89001234567", "+7900123456", "+7900123456a", "+790012345678"] {
            let error = provider.send(&sms(phone, phone)).await.unwrap_err();
            assert!(!error.is_transient(), "{phone}: {error:?}");
            assert_eq!(error.reason(), "invalid_number");
        }
        assert!(gateway.messages("").await.is_empty());
    }

    #[tokio::test]
    async fn blocked_recipients_by_prefix_or_by_configuration_are_refused_for_good() {
        let config = GatewayConfig {
            blocked_phones: vec!["+79005550000".into()],
            ..GatewayConfig::default()
        };
        let gateway = start(config).await;
        let provider = gateway.provider(SECOND);

        for phone in ["+79990001234", "+79005550000"] {
            let error = provider.send(&sms(phone, phone)).await.unwrap_err();
            assert!(!error.is_transient());
            assert_eq!(error.reason(), "blocked_recipient");
        }
    }

    #[tokio::test]
    async fn throttling_is_transient_and_carries_the_retry_after_hint() {
        let mut config = GatewayConfig::default();
        config.behaviour.throttle_ratio = 1.0;
        config.behaviour.retry_after_secs = 2;
        let gateway = start(config).await;

        let error = gateway.provider(SECOND).send(&sms("+79001234567", "m-1")).await;

        let error = error.unwrap_err();
        assert!(error.is_transient());
        assert_eq!(error.retry_after(), Some(Duration::from_secs(2)));
        assert!(gateway.messages("").await.is_empty());
    }

    #[tokio::test]
    async fn a_reply_stalled_past_the_timeout_is_transient_but_the_message_is_delivered() {
        let mut config = GatewayConfig::default();
        config.behaviour.accept_then_stall_ratio = 1.0;
        config.behaviour.stall_ms = 2_000;
        let gateway = start(config).await;

        let provider = gateway.provider(Duration::from_millis(200));
        let error = provider.send(&sms("+79001234567", "m-1")).await.unwrap_err();

        assert!(error.is_transient());
        assert_eq!(error.reason(), "timeout");
        let delivered = gateway.messages("").await;
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].client_message_id, "m-1");
    }

    #[tokio::test]
    async fn server_errors_are_transient() {
        let mut config = GatewayConfig::default();
        config.behaviour.fail_ratio = 1.0;
        let gateway = start(config).await;

        let error = gateway.provider(SECOND).send(&sms("+79001234567", "m-1")).await;

        let error = error.unwrap_err();
        assert!(error.is_transient());
        assert!(["internal_error", "unavailable"].contains(&error.reason()));
        assert!(gateway.messages("").await.is_empty());
    }

    #[tokio::test]
    async fn a_gateway_that_is_not_there_is_a_transient_failure() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);

        let provider = HttpSmsProvider::new(&base, None, SECOND).unwrap();
        let error = provider.send(&sms("+79001234567", "m-1")).await.unwrap_err();

        assert!(error.is_transient());
        assert_eq!(error.reason(), "connect");
    }

    #[tokio::test]
    async fn only_the_configured_token_is_let_in() {
        let config =
            GatewayConfig { token: Some(Secret::new("right")), ..GatewayConfig::default() };
        let gateway = start(config).await;

        let wrong = HttpSmsProvider::new(&gateway.base, Some(Secret::new("wrong")), SECOND);
        let error = wrong.unwrap().send(&sms("+79001234567", "m-1")).await.unwrap_err();
        assert!(!error.is_transient());
        assert_eq!(error.reason(), "unauthorized");

        let right = HttpSmsProvider::new(&gateway.base, Some(Secret::new("right")), SECOND);
        right.unwrap().send(&sms("+79001234567", "m-1")).await.unwrap();
        assert_eq!(gateway.messages("").await.len(), 1);
    }

    #[tokio::test]
    async fn control_changes_the_behaviour_while_running_and_refuses_nonsense() {
        let gateway = start(GatewayConfig::default()).await;
        let provider = gateway.provider(SECOND);

        let changed = gateway.control(serde_json::json!({ "fail_ratio": 1.0 })).await;
        assert_eq!(changed.status(), 200);
        assert!(provider.send(&sms("+79001234567", "m-1")).await.is_err());

        gateway.control(serde_json::json!({ "fail_ratio": 0.0 })).await;
        assert!(provider.send(&sms("+79001234567", "m-1")).await.is_ok());

        let refused = gateway.control(serde_json::json!({ "throttle_ratio": 1.5 })).await;
        assert_eq!(refused.status(), 400);
        let unknown = gateway.control(serde_json::json!({ "explode": true })).await;
        assert_eq!(unknown.status(), 400);
    }

    #[tokio::test]
    async fn more_sends_than_the_rate_limit_in_one_second_are_throttled() {
        let mut config = GatewayConfig::default();
        config.behaviour.rate_limit_per_sec = 3;
        let gateway = start(config).await;
        let provider = gateway.provider(SECOND);

        for id in ["m-1", "m-2", "m-3"] {
            provider.send(&sms("+79001234567", id)).await.unwrap();
        }
        let error = provider.send(&sms("+79001234567", "m-4")).await.unwrap_err();

        assert!(error.is_transient());
        assert_eq!(error.reason(), "rate_limited");
        assert_eq!(error.retry_after(), Some(SECOND));
    }

    #[tokio::test]
    async fn messages_are_listed_in_arrival_order_filtered_by_phone_and_cleared() {
        let gateway = start(GatewayConfig::default()).await;
        let provider = gateway.provider(SECOND);
        provider.send(&sms("+79001234567", "m-1")).await.unwrap();
        provider.send(&sms("+79007654321", "m-2")).await.unwrap();
        provider.send(&sms("+79001234567", "m-3")).await.unwrap();

        let ids = |messages: Vec<DeliveredMessage>| -> Vec<String> {
            messages.into_iter().map(|m| m.client_message_id).collect()
        };
        assert_eq!(ids(gateway.messages("").await), ["m-1", "m-2", "m-3"]);
        assert_eq!(ids(gateway.messages("?phone=%2B79001234567").await), ["m-1", "m-3"]);
        assert_eq!(ids(gateway.messages("?phone=+79007654321").await), ["m-2"]);

        let cleared = gateway.http.delete(format!("{}/messages", gateway.base)).send().await;
        assert_eq!(cleared.unwrap().status(), 204);
        assert!(gateway.messages("").await.is_empty());
        assert!(gateway.requests().await.is_empty());
    }

    #[tokio::test]
    async fn every_attempt_is_logged_with_its_answer() {
        let mut config = GatewayConfig::default();
        config.behaviour.throttle_ratio = 1.0;
        let gateway = start(config).await;
        let provider = gateway.provider(SECOND);

        let _ = provider.send(&sms("+79001234567", "m-1")).await;
        gateway.control(serde_json::json!({ "throttle_ratio": 0.0 })).await;
        provider.send(&sms("+79001234567", "m-1")).await.unwrap();

        let log = gateway.requests().await;
        let seen: Vec<_> = log.iter().map(|r| (r.status, r.outcome.as_str())).collect();
        assert_eq!(seen, [(429, "throttled"), (201, "accepted")]);
        assert!(log.iter().all(|r| r.client_message_id.as_deref() == Some("m-1")));
        assert!(log[0].at <= log[1].at);
    }

    #[test]
    fn the_phone_rule_is_plus_seven_and_ten_digits() {
        assert!(is_valid_phone("+79001234567"));
        assert!(!is_valid_phone("79001234567"));
        assert!(!is_valid_phone("+7900123456"));
        assert!(!is_valid_phone("+7９００1234567"));
    }
}
