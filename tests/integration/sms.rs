//! The SMS worker against the stand-in gateway over real HTTP: one delivery
//! per idempotency key through duplicates, crashes and late replies; retries
//! that honour `Retry-After`; the send rate; permanent refusals reported to
//! the requesting worker.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    process::Stdio,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::{process::Child, task::JoinHandle};
use trusted_contact::{
    runtime::{Source, WorkerSpec},
    settings::Secret,
    sms::{
        SMS_FAILED, SMS_REQUESTED, SmsFailed, SmsRequested, SmsSettings, SmsTemplate, SmsWorker,
        gateway::{self, Behaviour, DeliveredMessage, GatewayConfig, RequestRecord},
        worker::SPEC,
    },
};
use trusted_contact_contracts::{Envelope, reasons};
use uuid::Uuid;

use crate::support::{InProcess, TestEnv, eventually};

const SECOND: Duration = Duration::from_secs(1);

/// Stands for the worker that asked for the SMS; only its queue exists, so
/// the test can read what the SMS worker sends back to it.
const REQUESTER: WorkerSpec =
    WorkerSpec { name: "requester", bindings: &[(Source::Direct, SMS_FAILED)] };

/// The stand-in gateway, served in this process on a free port.
struct Gateway {
    base: String,
    http: reqwest::Client,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    async fn start(behaviour: Behaviour) -> Gateway {
        Gateway::start_with(GatewayConfig { behaviour, ..GatewayConfig::default() }).await
    }

    async fn start_with(config: GatewayConfig) -> Gateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        // Never shut down gracefully: that would wait for stalled replies.
        // Dropping the gateway aborts it instead.
        let task = tokio::spawn(gateway::serve(listener, config, std::future::pending()));
        Gateway { base, http: reqwest::Client::new(), task }
    }

    async fn messages(&self) -> Vec<DeliveredMessage> {
        let url = format!("{}/messages", self.base);
        self.http.get(url).send().await.unwrap().json().await.unwrap()
    }

    async fn requests(&self) -> Vec<RequestRecord> {
        let url = format!("{}/requests", self.base);
        self.http.get(url).send().await.unwrap().json().await.unwrap()
    }

    async fn control(&self, patch: serde_json::Value) {
        let url = format!("{}/control", self.base);
        let response = self.http.post(url).json(&patch).send().await.unwrap();
        assert!(response.status().is_success(), "control refused: {}", response.status());
    }

    /// The worker's settings for this gateway, with a rate high enough not
    /// to matter unless a test says otherwise.
    fn settings(&self, timeout: Duration) -> SmsSettings {
        SmsSettings {
            gateway_url: self.base.clone(),
            gateway_token: None,
            timeout,
            rate_per_sec: NonZeroU32::new(1_000).unwrap(),
            burst: NonZeroU32::new(100).unwrap(),
            code_secret: Secret::new("a test secret long enough to key the seal"),
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn sms_env() -> TestEnv {
    let env = TestEnv::new().await;
    env.declare(&[SPEC, REQUESTER]).await;
    env
}

fn start_worker(env: &TestEnv, settings: SmsSettings) -> InProcess {
    let worker = SmsWorker::from_settings(&settings).unwrap();
    env.serve(move |runtime| vec![runtime.spawn_worker(worker, vec![SPEC, REQUESTER])])
}

/// The real binary running the SMS worker against `gateway`.
fn spawn_sms_binary(env: &TestEnv, gateway: &Gateway, vars: &[(&str, &str)]) -> Child {
    let mut command = env.binary_command(&["run", "--worker", "sms"]);
    // Nobody reads the child's logs; a full pipe would block it.
    command
        .env("TC_SMS_GATEWAY_URL", &gateway.base)
        .envs(vars.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command.spawn().unwrap()
}

async fn kill(mut child: Child) {
    child.start_kill().unwrap();
    child.wait().await.unwrap();
}

fn phone(n: usize) -> String {
    format!("+7900{n:07}")
}

fn request_to(phone: &str) -> SmsRequested {
    SmsRequested {
        idempotency_key: format!("{}:invitation_notice:{}", Uuid::new_v4(), Uuid::new_v4()),
        recipient_id: Uuid::new_v4(),
        phone: phone.to_owned(),
        template: SmsTemplate::InvitationNotice {
            truster_short_name: "Иван П.".into(),
            valid_minutes: 30,
        },
        requested_by: REQUESTER.name.to_owned(),
    }
}

fn envelope(request: &SmsRequested) -> Envelope {
    Envelope::new_command(SMS_REQUESTED, request).unwrap()
}

/// Publishes `count` requests to distinct phones; returns them by key.
async fn publish_many(env: &TestEnv, count: usize) -> Vec<SmsRequested> {
    let mut requests = Vec::with_capacity(count);
    for n in 0..count {
        let request = request_to(&phone(n));
        env.publish_internal(&envelope(&request)).await;
        requests.push(request);
    }
    requests
}

/// One `sms_messages` row, as the tests look at it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct SmsRow {
    idempotency_key: String,
    status: String,
    provider_id: Option<String>,
    attempts: i32,
    failure_reason: Option<String>,
    last_error: Option<String>,
    phone: String,
    template: String,
}

async fn ledger(env: &TestEnv) -> HashMap<String, SmsRow> {
    let rows: Vec<SmsRow> = sqlx::query_as(
        "SELECT idempotency_key, status, provider_id, attempts, failure_reason, last_error, \
         phone, template FROM sms_messages",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    rows.into_iter().map(|row| (row.idempotency_key.clone(), row)).collect()
}

async fn count(env: &TestEnv, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&env.pool).await.unwrap()
}

async fn wait_until_sent(env: &TestEnv, expected: i64, within: Duration) {
    eventually(&format!("{expected} sms sent"), within, || async {
        count(env, "SELECT count(*) FROM sms_messages WHERE status = 'sent'").await == expected
    })
    .await;
}

/// Every request delivered exactly once, and the ledger names the provider's
/// id for each.
async fn assert_each_delivered_once(env: &TestEnv, gateway: &Gateway, requests: &[SmsRequested]) {
    let delivered = gateway.messages().await;
    let mut provider_ids = HashMap::new();
    for message in &delivered {
        let first = provider_ids.insert(message.client_message_id.clone(), &message.provider_id);
        assert!(first.is_none(), "{} delivered twice", message.client_message_id);
    }
    assert_eq!(delivered.len(), requests.len());
    let rows = ledger(env).await;
    assert_eq!(rows.len(), requests.len());
    for request in requests {
        let row = &rows[&request.idempotency_key];
        assert_eq!(row.status, "sent");
        assert_eq!(row.provider_id.as_ref(), provider_ids.get(&request.idempotency_key).copied());
        assert_eq!(row.phone, request.phone);
    }
    let audited = count(env, "SELECT count(*) FROM audit_log WHERE action = 'sms.sent'").await;
    assert_eq!(audited, requests.len() as i64, "one audit entry per SMS sent");
}

/// The most attempts the gateway saw within any one second.
fn most_in_one_second(records: &[RequestRecord]) -> usize {
    let mut times: Vec<DateTime<Utc>> = records.iter().map(|r| r.at).collect();
    times.sort();
    let second = chrono::Duration::seconds(1);
    let mut most = 0;
    let mut end = 0;
    for start in 0..times.len() {
        while end < times.len() && times[end] - times[start] < second {
            end += 1;
        }
        most = most.max(end - start);
    }
    most
}

/// Attempts that followed a 429 for the same client id sooner than `allowed`.
fn retries_too_soon(records: &[RequestRecord], allowed: Duration) -> Vec<String> {
    let allowed = chrono::Duration::from_std(allowed).unwrap();
    let mut by_id: HashMap<&str, Vec<&RequestRecord>> = HashMap::new();
    for record in records {
        let id = record.client_message_id.as_deref().unwrap_or_default();
        by_id.entry(id).or_default().push(record);
    }
    let mut too_soon = Vec::new();
    for (id, mut attempts) in by_id {
        attempts.sort_by_key(|r| r.at);
        for pair in attempts.windows(2) {
            if pair[0].status == 429 && pair[1].at - pair[0].at < allowed {
                too_soon.push(format!("{id}: {} then {}", pair[0].at, pair[1].at));
            }
        }
    }
    too_soon
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_request_arriving_twice_is_delivered_once() {
    let env = sms_env().await;
    let gateway = Gateway::start(Behaviour::default()).await;
    let service = start_worker(&env, gateway.settings(Duration::from_secs(5)));

    let request = request_to("+79001234567");
    let first = envelope(&request);
    // The broker's redelivery (same message) and a requester that sent the
    // request again (a new message under the same idempotency key).
    let again = envelope(&request);
    env.publish_internal(&first).await;
    env.publish_internal(&first).await;
    env.publish_internal(&again).await;
    wait_until_sent(&env, 1, Duration::from_secs(10)).await;
    env.wait_queue_drained(SPEC.name, Duration::from_secs(10)).await;
    service.stop().await;

    assert_each_delivered_once(&env, &gateway, std::slice::from_ref(&request)).await;
    let delivered = gateway.messages().await;
    let seal = trusted_contact::recovery::seal::CodeSeal::new(&Secret::new(
        "a test secret long enough to key the seal",
    ))
    .unwrap();
    assert_eq!(delivered[0].text, request.template.render(&seal).unwrap());
    let row = &ledger(&env).await[&request.idempotency_key];
    assert_eq!(row.template, "invitation_notice", "the kind is kept, never the text");
    assert!(env.dead_letters(SPEC.name).await.is_empty());
    assert!(env.take_from_worker_queue(REQUESTER.name).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_after_the_provider_accepted_does_not_deliver_again_when_restarted() {
    let env = sms_env().await;
    let gateway = Gateway::start(Behaviour {
        accept_then_stall_ratio: 1.0,
        stall_ms: 120_000,
        ..Behaviour::default()
    })
    .await;
    let request = request_to("+79001234567");
    env.publish_internal(&envelope(&request)).await;
    let worker = spawn_sms_binary(&env, &gateway, &[("TC_SMS_TIMEOUT_MS", "120000")]);

    // The gateway has delivered the SMS and holds its reply back: the worker
    // waits for it with the row still `sending`.
    eventually("the gateway accepted the sms", Duration::from_secs(30), || async {
        gateway.messages().await.len() == 1
    })
    .await;
    assert_eq!(ledger(&env).await[&request.idempotency_key].status, "sending");
    kill(worker).await;
    gateway.control(json!({ "accept_then_stall_ratio": 0.0 })).await;
    let worker = spawn_sms_binary(&env, &gateway, &[("TC_SMS_TIMEOUT_MS", "5000")]);
    wait_until_sent(&env, 1, Duration::from_secs(30)).await;
    kill(worker).await;

    assert_each_delivered_once(&env, &gateway, std::slice::from_ref(&request)).await;
    let statuses: Vec<u16> = gateway.requests().await.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [201, 200], "the restart sent the same client id again");
    assert_eq!(ledger(&env).await[&request.idempotency_key].attempts, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_that_comes_after_the_timeout_is_retried_and_delivered_once() {
    let env = sms_env().await;
    let gateway = Gateway::start(Behaviour {
        accept_then_stall_ratio: 1.0,
        stall_ms: 2_000,
        ..Behaviour::default()
    })
    .await;
    let service = start_worker(&env, gateway.settings(Duration::from_millis(300)));

    let request = request_to("+79001234567");
    env.publish_internal(&envelope(&request)).await;
    wait_until_sent(&env, 1, Duration::from_secs(15)).await;
    service.stop().await;

    assert_each_delivered_once(&env, &gateway, std::slice::from_ref(&request)).await;
    let statuses: Vec<u16> = gateway.requests().await.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [201, 200]);
    assert_eq!(ledger(&env).await[&request.idempotency_key].attempts, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_server_errors_and_throttling_500_sms_are_delivered_once_and_retry_after_is_kept() {
    let mut env = sms_env().await;
    // A send fails with probability 0.3 + 0.7 * 0.2 = 0.44; 25 deliveries
    // leave about one chance in 10^8 that any of the 500 runs out.
    env.settings.retry_limit = 25;
    let gateway = Gateway::start(Behaviour {
        fail_ratio: 0.3,
        throttle_ratio: 0.2,
        retry_after_secs: 2,
        ..Behaviour::default()
    })
    .await;
    let service = start_worker(&env, gateway.settings(Duration::from_secs(5)));

    let requests = publish_many(&env, 500).await;
    wait_until_sent(&env, 500, Duration::from_secs(180)).await;
    service.stop().await;

    assert_each_delivered_once(&env, &gateway, &requests).await;
    let log = gateway.requests().await;
    let throttled = log.iter().filter(|r| r.status == 429).count();
    let failed = log.iter().filter(|r| r.status >= 500).count();
    assert!(throttled > 0 && failed > 0, "{throttled} throttled, {failed} failed");
    assert_eq!(retries_too_soon(&log, Duration::from_secs(2)), Vec::<String>::new());
    let rows = ledger(&env).await;
    let attempts: i64 = rows.values().map(|row| i64::from(row.attempts)).sum();
    assert_eq!(attempts, log.len() as i64, "the ledger counts every attempt the gateway saw");
    assert!(env.dead_letters(SPEC.name).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn at_fifty_per_second_500_sms_take_ten_seconds_and_never_exceed_the_rate() {
    let env = sms_env().await;
    let gateway = Gateway::start(Behaviour::default()).await;
    let rate = 50;
    let burst = 5;
    let settings = SmsSettings {
        rate_per_sec: NonZeroU32::new(rate).unwrap(),
        burst: NonZeroU32::new(burst).unwrap(),
        code_secret: Secret::new("a test secret long enough to key the seal"),
        ..gateway.settings(Duration::from_secs(5))
    };
    let started = Instant::now();
    let service = start_worker(&env, settings);

    let requests = publish_many(&env, 500).await;
    wait_until_sent(&env, 500, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    service.stop().await;

    // The bucket starts full: `burst` sends at once, then one every 20 ms,
    // so the 500th send cannot start before (500 - burst) / 50 s.
    let fastest = Duration::from_secs_f64(f64::from(500 - burst) / f64::from(rate));
    assert!(elapsed >= fastest, "500 sms took {elapsed:?}");
    let log = gateway.requests().await;
    assert_eq!(log.len(), 500, "no send was refused, so none was repeated");
    let most = most_in_one_second(&log);
    assert!(most <= (rate + burst) as usize, "{most} sends within one second");
    assert_each_delivered_once(&env, &gateway, &requests).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_or_blocked_number_fails_once_without_retries_and_the_requester_is_told() {
    let env = sms_env().await;
    let gateway = Gateway::start(Behaviour::default()).await;
    let service = start_worker(&env, gateway.settings(Duration::from_secs(5)));

    // Too short to be a number at all: refused before any send.
    let invalid = request_to("+7900123456");
    // A well-formed number the provider refuses for good.
    let blocked = request_to("+79990001234");
    env.publish_internal(&envelope(&invalid)).await;
    let blocked_request = envelope(&blocked);
    env.publish_internal(&blocked_request).await;
    eventually("both sms failed", Duration::from_secs(10), || async {
        count(&env, "SELECT count(*) FROM sms_messages WHERE status = 'failed'").await == 2
    })
    .await;
    // Give a retry, were there one, the time to reach the gateway.
    tokio::time::sleep(env.settings.retry_base_delay * 3).await;
    service.stop().await;

    let rows = ledger(&env).await;
    let invalid_row = &rows[&invalid.idempotency_key];
    assert_eq!(invalid_row.failure_reason.as_deref(), Some("invalid_number"));
    assert_eq!(invalid_row.attempts, 0, "never sent");
    let blocked_row = &rows[&blocked.idempotency_key];
    assert_eq!(blocked_row.failure_reason.as_deref(), Some("blocked_recipient"));
    assert_eq!(blocked_row.attempts, 1);
    let log = gateway.requests().await;
    let seen: Vec<_> = log.iter().map(|r| (r.phone.as_deref(), r.status)).collect();
    assert_eq!(seen, [(Some("+79990001234"), 403)], "one attempt, for the blocked number only");
    assert!(gateway.messages().await.is_empty());

    let replies = env.take_from_worker_queue(REQUESTER.name).await;
    assert_eq!(replies.len(), 2, "one sms.failed per request");
    let mut told = HashSet::new();
    for reply in &replies {
        assert_eq!(reply.kind, SMS_FAILED);
        let failed: SmsFailed = reply.payload_as().unwrap();
        assert_eq!(failed.reason, reasons::SMS_REJECTED);
        assert_eq!(failed.template, "invitation_notice");
        told.insert(failed.idempotency_key);
    }
    let expected: HashSet<_> = [invalid.idempotency_key, blocked.idempotency_key].into();
    assert_eq!(told, expected);
    let reply_to_blocked =
        replies.iter().find(|r| r.payload["recipient_id"] == json!(blocked.recipient_id)).unwrap();
    let cause = blocked_request.message_id.to_string();
    assert_eq!(reply_to_blocked.causation_id.as_deref(), Some(cause.as_str()));
    let audited = count(&env, "SELECT count(*) FROM audit_log WHERE action = 'sms.failed'").await;
    assert_eq!(audited, 2);
    assert!(env.dead_letters(SPEC.name).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sms_still_refused_on_the_last_attempt_fails_and_the_requester_is_told() {
    let mut env = sms_env().await;
    env.settings.retry_limit = 3;
    let gateway = Gateway::start(Behaviour { fail_ratio: 1.0, ..Behaviour::default() }).await;
    let service = start_worker(&env, gateway.settings(SECOND));

    let request = request_to("+79001234567");
    env.publish_internal(&envelope(&request)).await;
    let dead = env.wait_dead_letters(SPEC.name, 1, Duration::from_secs(15)).await;
    service.stop().await;

    assert_eq!(dead.len(), 1, "dead-lettered with its history");
    let row = &ledger(&env).await[&request.idempotency_key];
    assert_eq!(row.status, "failed");
    assert_eq!(row.attempts, 3);
    assert!(matches!(row.failure_reason.as_deref(), Some("internal_error" | "unavailable")));
    assert_eq!(gateway.requests().await.len(), 3);
    let replies = env.take_from_worker_queue(REQUESTER.name).await;
    assert_eq!(replies.len(), 1);
    let failed: SmsFailed = replies[0].payload_as().unwrap();
    assert_eq!(failed.reason, reasons::SMS_ATTEMPTS_EXHAUSTED);
    assert_eq!(failed.idempotency_key, request.idempotency_key);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_token_dead_letters_the_request_without_failing_the_sms() {
    let env = sms_env().await;
    let token = Some(Secret::new("the-right-token"));
    let gateway = Gateway::start_with(GatewayConfig { token, ..GatewayConfig::default() }).await;
    let settings = SmsSettings {
        gateway_token: Some(Secret::new("a-stale-token")),
        ..gateway.settings(SECOND)
    };
    let service = start_worker(&env, settings);

    let request = request_to("+79001234567");
    env.publish_internal(&envelope(&request)).await;
    let dead = env.wait_dead_letters(SPEC.name, 1, Duration::from_secs(10)).await;
    service.stop().await;

    assert_eq!(dead.len(), 1, "kept for a replay once the token is fixed");
    let row = &ledger(&env).await[&request.idempotency_key];
    assert_eq!(row.status, "queued");
    assert_eq!(row.failure_reason, None);
    assert_eq!(row.last_error.as_deref(), Some("unauthorized"));
    assert!(gateway.messages().await.is_empty());
    assert!(env.take_from_worker_queue(REQUESTER.name).await.is_empty(), "nothing failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_the_provider_rejects_itself_is_kept_and_its_replay_after_the_fix_delivers() {
    let env = sms_env().await;
    let gateway = Gateway::start(Behaviour::default()).await;
    // A wrong path in TC_SMS_GATEWAY_URL: the provider answers 404, which
    // says nothing about the recipient.
    let misconfigured =
        SmsSettings { gateway_url: format!("{}/wrong", gateway.base), ..gateway.settings(SECOND) };
    let service = start_worker(&env, misconfigured);
    let request = request_to("+79001234567");
    let message = envelope(&request);
    env.publish_internal(&message).await;
    let dead = env.wait_dead_letters(SPEC.name, 1, Duration::from_secs(10)).await;
    service.stop().await;

    assert_eq!(dead.len(), 1, "kept for a replay once the URL is fixed");
    let row = &ledger(&env).await[&request.idempotency_key];
    assert_eq!(row.status, "queued");
    assert_eq!(row.failure_reason, None);
    assert_eq!(row.last_error.as_deref(), Some("http_404"));
    assert!(env.take_from_worker_queue(REQUESTER.name).await.is_empty(), "nothing failed");

    // The operator fixes the URL and replays the dead letter as it was.
    let service = start_worker(&env, gateway.settings(SECOND));
    env.publish_internal(&message).await;
    wait_until_sent(&env, 1, Duration::from_secs(10)).await;
    service.stop().await;
    assert_each_delivered_once(&env, &gateway, std::slice::from_ref(&request)).await;
    assert!(env.take_from_worker_queue(REQUESTER.name).await.is_empty(), "nothing failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_in_the_middle_of_1000_sms_delivers_each_exactly_once_after_restart() {
    let env = sms_env().await;
    let gateway = Gateway::start(Behaviour::default()).await;
    let requests = publish_many(&env, 1_000).await;
    let vars = [("TC_SMS_RATE_PER_SEC", "400"), ("TC_SMS_BURST", "50")];

    let worker = spawn_sms_binary(&env, &gateway, &vars);
    eventually("300 sms delivered", Duration::from_secs(60), || async {
        gateway.messages().await.len() >= 300
    })
    .await;
    kill(worker).await;
    let delivered_before = gateway.messages().await.len();
    assert!(delivered_before < 1_000, "the worker was killed too late to prove anything");
    let worker = spawn_sms_binary(&env, &gateway, &vars);
    wait_until_sent(&env, 1_000, Duration::from_secs(60)).await;
    kill(worker).await;

    assert_each_delivered_once(&env, &gateway, &requests).await;
    let resent = gateway.requests().await.iter().filter(|r| r.status == 200).count();
    println!("killed after {delivered_before} deliveries; {resent} sends repeated after restart");
}
