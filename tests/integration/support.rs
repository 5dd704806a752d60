//! What every integration test needs: a fresh ledger database and topology
//! prefix, the service running in-process or as a child process, a publisher
//! for commands and a tap on the events.

#![allow(dead_code)]

use std::{
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
        ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use serde::Serialize;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trusted_contact::{
    app,
    runtime::{Runtime, WorkerSpec, message::properties_of},
    settings::{Secret, Settings},
};
use trusted_contact_contracts::{Envelope, Topology};
use uuid::Uuid;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const PG_SERVER: &str = "postgres://postgres@127.0.0.1:5432";

/// One test's world: its own database, its own broker names.
pub struct TestEnv {
    pub settings: Settings,
    pub pool: PgPool,
    pub database: String,
    pub connection: Connection,
    pub channel: Channel,
}

impl TestEnv {
    pub async fn new() -> Self {
        let id = Uuid::new_v4().simple().to_string();
        let database = format!("tc_test_{}", &id[..16]);
        let mut settings = Settings::from_env().expect("settings");
        settings.amqp_url = Secret::new(AMQP_URL);
        settings.database_url = Secret::new(format!("{PG_SERVER}/{database}"));
        settings.topology = Topology::new(format!("test-{}.", &id[..12]));
        settings.retry_base_delay = Duration::from_millis(200);
        settings.retry_max_delay = Duration::from_secs(2);
        settings.retry_limit = 5;
        settings.reconnect_give_up = Duration::from_secs(60);
        settings.shutdown_grace = Duration::from_secs(10);
        settings.outbox_poll_interval = Duration::from_millis(200);
        settings.http_port = 0;
        let pool = trusted_contact::ledger::connect(&settings).await.expect("ledger");
        trusted_contact::ledger::migrate(&pool).await.expect("migrations");
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("test-harness {}", settings.topology.prefix()).into());
        let connection = Connection::connect(AMQP_URL, properties).await.expect("broker");
        let channel = connection.create_channel().await.expect("channel");
        channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
        TestEnv { settings, pool, database, connection, channel }
    }

    pub fn topology(&self) -> &Topology {
        &self.settings.topology
    }

    /// Declares the topology for `workers` without running them, so that
    /// messages published before the workers start are kept.
    pub async fn declare(&self, workers: &[WorkerSpec]) {
        trusted_contact::runtime::broker::declare_topology(&self.channel, &self.settings, workers)
            .await
            .expect("topology");
    }

    /// Runs the service in this process, with the workers `start` spawns.
    pub fn serve(
        &self,
        start: impl FnOnce(&Runtime) -> Vec<JoinHandle<anyhow::Result<()>>> + Send + 'static,
    ) -> InProcess {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app::serve(self.settings.clone(), shutdown.clone(), start));
        InProcess { stop_on_drop: shutdown.drop_guard(), handle }
    }

    /// The service binary as a child process, with this test's settings.
    pub fn spawn_binary(&self, args: &[&str]) -> tokio::process::Child {
        self.binary_command(args).spawn().expect("spawn trusted-contact")
    }

    pub fn binary_command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_trusted-contact"));
        command
            .args(args)
            .env("TC_AMQP_URL", AMQP_URL)
            .env("TC_DATABASE_URL", self.settings.database_url.expose())
            .env("TC_TOPOLOGY_PREFIX", self.topology().prefix())
            .env("TC_RETRY_BASE_MS", "200")
            .env("TC_RETRY_MAX_MS", "2000")
            .env("TC_HTTP_PORT", "0")
            // A test that reads the output pipes it, and must drain it: a
            // full pipe would stall the child's logging and with it the
            // child.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Publishes bytes with confirms, as the portal would.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "broker refused a test message");
    }

    /// Publishes an envelope with the properties the service's outbox gives.
    async fn publish_to(&self, exchange: &str, routing_key: &str, envelope: &Envelope) {
        let body = serde_json::to_vec(envelope).expect("json");
        let properties = properties_of(envelope);
        self.publish_raw(exchange, routing_key, &body, properties).await;
    }

    /// Publishes an envelope on the commands exchange, routing key = type.
    pub async fn publish_envelope(&self, envelope: &Envelope) {
        let exchange = self.topology().commands_exchange();
        self.publish_to(&exchange, &envelope.kind, envelope).await;
    }

    /// Publishes an envelope on the internal exchange, routing key = type, as
    /// another worker's outbox would (an SMS request, say).
    pub async fn publish_internal(&self, envelope: &Envelope) {
        let exchange = self.topology().internal_exchange();
        self.publish_to(&exchange, &envelope.kind, envelope).await;
    }

    /// Puts an envelope straight into `worker`'s queue, as a delayed message
    /// leaving its delay queue would arrive.
    pub async fn publish_to_worker(&self, worker: &str, envelope: &Envelope) {
        let queue = self.topology().worker_queue(worker);
        self.publish_to("", &queue, envelope).await;
    }

    /// Takes every message waiting in `worker`'s own queue: what other
    /// workers sent it directly (replies such as `sms.failed`), when no such
    /// worker runs in the test.
    pub async fn take_from_worker_queue(&self, worker: &str) -> Vec<Envelope> {
        let queue = self.topology().worker_queue(worker);
        let mut out = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("basic_get")
        {
            message.delivery.ack(BasicAckOptions::default()).await.expect("ack");
            out.push(Envelope::parse(&message.delivery.data).expect("an envelope"));
        }
        out
    }

    /// Builds and publishes a new command; returns it for matching outcomes.
    pub async fn command<P: Serialize>(&self, kind: &str, payload: &P) -> Envelope {
        let envelope = Envelope::new_command(kind, payload).expect("envelope");
        self.publish_envelope(&envelope).await;
        envelope
    }

    /// A queue bound to every event the service publishes, read in the
    /// background.
    pub async fn tap_events(&self) -> EventTap {
        let exchange = self.topology().events_exchange();
        self.tap(&exchange, "#").await
    }

    /// A tap on the service-internal exchange (SMS requests and the like).
    pub async fn tap_internal(&self, routing_key: &str) -> EventTap {
        let exchange = self.topology().internal_exchange();
        self.tap(&exchange, routing_key).await
    }

    async fn tap(&self, exchange: &str, routing_key: &str) -> EventTap {
        let channel = self.connection.create_channel().await.expect("channel");
        let queue = format!("{}tap.{}", self.topology().prefix(), Uuid::new_v4().simple());
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("tap queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("tap bind");
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "tap".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("tap consume");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                if let Ok(envelope) = Envelope::parse(&delivery.data) {
                    sink.lock().unwrap().push(envelope);
                }
            }
        });
        EventTap { seen, _channel: channel, reader }
    }

    /// Takes every message out of `worker`'s dead-letter queue.
    pub async fn dead_letters(&self, worker: &str) -> Vec<lapin::message::Delivery> {
        let queue = self.topology().dead_letter_queue(worker);
        let mut out = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("basic_get")
        {
            message.delivery.ack(BasicAckOptions::default()).await.expect("ack");
            out.push(message.delivery);
        }
        out
    }

    /// Waits until `worker`'s dead-letter queue holds `count` messages.
    pub async fn wait_dead_letters(
        &self,
        worker: &str,
        count: usize,
        within: Duration,
    ) -> Vec<lapin::message::Delivery> {
        let deadline = tokio::time::Instant::now() + within;
        let mut taken = Vec::new();
        loop {
            taken.extend(self.dead_letters(worker).await);
            if taken.len() >= count || tokio::time::Instant::now() > deadline {
                return taken;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `worker`'s queue holds no ready message. The count leaves
    /// out deliveries still in a handler (the runtime acks only after
    /// handling), so callers that assert on the ledger add a short grace.
    pub async fn wait_queue_drained(&self, worker: &str, within: Duration) {
        let queue = self.topology().worker_queue(worker);
        eventually(&format!("{queue} drained"), within, || async {
            let declared = self
                .channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() },
                    FieldTable::default(),
                )
                .await
                .expect("passive queue_declare");
            declared.message_count() == 0
        })
        .await;
    }

    /// Closes the broker connections of this test's service, as a broker
    /// restart would, leaving other tests' connections alone.
    pub async fn close_service_connections(&self) -> usize {
        let output = tokio::process::Command::new("rabbitmqctl")
            .args(["list_connections", "-q", "--no-table-headers", "pid", "client_properties"])
            .output()
            .await
            .expect("rabbitmqctl");
        let text = String::from_utf8_lossy(&output.stdout);
        let marker = format!("trusted-contact {}", self.topology().prefix());
        let mut closed = 0;
        for line in text.lines().filter(|line| line.contains(&marker)) {
            let Some(pid) = line.split_whitespace().next() else { continue };
            let status = tokio::process::Command::new("rabbitmqctl")
                .args(["close_connection", pid, "closed by an integration test"])
                .output()
                .await
                .expect("rabbitmqctl close_connection");
            if status.status.success() {
                closed += 1;
            }
        }
        closed
    }
}

impl Drop for TestEnv {
    /// Drops the database and deletes every queue and exchange with this
    /// test's prefix, even when the test failed.
    fn drop(&mut self) {
        let database = self.database.clone();
        let prefix = self.topology().prefix().to_owned();
        let pool = self.pool.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Runtime::new() else { return };
            runtime.block_on(async move {
                pool.close().await;
                if let Ok(admin) = PgPool::connect(&format!("{PG_SERVER}/postgres")).await {
                    let statement = format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&admin).await;
                }
                delete_broker_names(&prefix).await;
            });
        });
        let _ = cleanup.join();
    }
}

async fn delete_broker_names(prefix: &str) {
    let Ok(connection) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await
    else {
        return;
    };
    let Ok(mut channel) = connection.create_channel().await else { return };
    for (kind, names) in [("queues", "list_queues"), ("exchanges", "list_exchanges")] {
        let Ok(output) = tokio::process::Command::new("rabbitmqctl")
            .args([names, "-q", "--no-table-headers", "name"])
            .output()
            .await
        else {
            continue;
        };
        for name in String::from_utf8_lossy(&output.stdout).lines() {
            let name = name.trim();
            if !name.starts_with(prefix) {
                continue;
            }
            // A refused delete (a tap's exclusive queue, still held by the
            // test's connection) closes the channel: go on with a new one.
            if !channel.status().connected() {
                let Ok(fresh) = connection.create_channel().await else { break };
                channel = fresh;
            }
            if kind == "queues" {
                let _ = channel.queue_delete(name.into(), QueueDeleteOptions::default()).await;
            } else {
                let _ = channel.exchange_delete(name.into(), Default::default()).await;
            }
        }
    }
    let _ = connection.close(200, "test cleanup".into()).await;
}

/// The service running inside the test process. A test that fails before
/// calling [`InProcess::stop`] still stops it, so that the service does not
/// declare its queues again while [`TestEnv`] deletes them.
pub struct InProcess {
    stop_on_drop: tokio_util::sync::DropGuard,
    pub handle: JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    pub async fn stop(self) {
        drop(self.stop_on_drop);
        let result = tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("service did not stop within 30 s")
            .expect("service task panicked");
        result.expect("service stopped with an error");
    }
}

/// The events seen so far on a tapped exchange.
pub struct EventTap {
    seen: Arc<Mutex<Vec<Envelope>>>,
    _channel: Channel,
    reader: JoinHandle<()>,
}

impl EventTap {
    pub fn all(&self) -> Vec<Envelope> {
        self.seen.lock().unwrap().clone()
    }

    /// Every event caused by `cause` (by `causation_id`).
    pub fn caused_by(&self, cause: &Envelope) -> Vec<Envelope> {
        let id = cause.message_id.to_string();
        self.all().into_iter().filter(|e| e.causation_id.as_deref() == Some(&id)).collect()
    }

    /// Waits until `predicate` holds for the events seen, or panics.
    pub async fn wait_until(
        &self,
        what: &str,
        within: Duration,
        predicate: impl Fn(&[Envelope]) -> bool,
    ) -> Vec<Envelope> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let seen = self.all();
            if predicate(&seen) {
                return seen;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; saw {} messages: {:?}",
                    seen.len(),
                    seen.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits for the one outcome of `kind` caused by `cause`, and returns it.
    pub async fn outcome(&self, cause: &Envelope, kind: &str) -> Envelope {
        let id = cause.message_id.to_string();
        let seen = self
            .wait_until(&format!("{kind} caused by {}", cause.kind), Duration::from_secs(10), |s| {
                s.iter().any(|e| e.kind == kind && e.causation_id.as_deref() == Some(&id))
            })
            .await;
        seen.into_iter().find(|e| e.kind == kind && e.causation_id.as_deref() == Some(&id)).unwrap()
    }
}

impl Drop for EventTap {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Polls `check` until it returns true, or panics after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
