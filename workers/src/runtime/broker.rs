//! Connections to RabbitMQ: the consuming connection a worker supervises, the
//! pooled publishing connection with publisher confirms, and the durable
//! topology, declared idempotently by every process at start.

use std::{
    collections::HashMap,
    sync::Mutex as StdMutex,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use backon::{ExponentialBuilder, Retryable};
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use tokio::sync::Mutex;
use trusted_contact_contracts::{Topology, names::UNROUTED};

use crate::settings::{QueueType, Settings};

/// Where a worker's queue receives messages from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The portal's commands.
    Commands,
    /// Other workers' requests and the service's own deadlines.
    Internal,
    /// Sent straight to this worker's queue by another worker (replies such
    /// as `sms.failed`, deadlines): accepted, but bound to no exchange.
    Direct,
}

/// A worker's place in the topology: its name (which names its queues) and
/// the message types bound to its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSpec {
    pub name: &'static str,
    pub bindings: &'static [(Source, &'static str)],
}

/// Connects with exponential backoff until `give_up` has passed.
pub async fn connect(settings: &Settings, name: &str) -> anyhow::Result<Connection> {
    let properties = connection_properties(settings, name);
    let url = settings.amqp_url.expose().to_owned();
    let started = Instant::now();
    let give_up = settings.reconnect_give_up;
    let attempt = || async { Connection::connect(&url, properties.clone()).await };
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_jitter()
                .without_max_times(),
        )
        .when(|_| started.elapsed() < give_up)
        .notify(|error, delay| {
            tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64,
                "broker unreachable, retrying");
        })
        .await
        .with_context(|| format!("broker unreachable for {give_up:?}, giving up"))
}

/// Names the connection after the process's role and topology prefix, so an
/// operator (or a test) can find it among the broker's connections.
fn connection_properties(settings: &Settings, name: &str) -> ConnectionProperties {
    let label = format!("trusted-contact {}{name}", settings.topology.prefix());
    ConnectionProperties::default().with_connection_name(LongString::from(label))
}

fn queue_arguments(queue_type: QueueType) -> FieldTable {
    let mut arguments = FieldTable::default();
    let kind = match queue_type {
        QueueType::Classic => "classic",
        QueueType::Quorum => "quorum",
    };
    arguments.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    arguments
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() }
}

/// Declares the exchanges and, for every worker, its queue with bindings and
/// its dead-letter queue. Every process declares every worker's queue, so a
/// message for a worker that is not running yet waits in its durable queue.
pub async fn declare_topology(
    channel: &Channel,
    settings: &Settings,
    workers: &[WorkerSpec],
) -> anyhow::Result<()> {
    let topology = &settings.topology;
    let unrouted = declare_unrouted(channel, settings).await?;
    let mut commands_arguments = FieldTable::default();
    commands_arguments.insert("alternate-exchange".into(), AMQPValue::LongString(unrouted.into()));
    for (exchange, arguments) in [
        (topology.commands_exchange(), commands_arguments),
        (topology.events_exchange(), FieldTable::default()),
        (topology.internal_exchange(), FieldTable::default()),
    ] {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
                arguments,
            )
            .await
            .with_context(|| format!("cannot declare exchange {exchange}"))?;
    }
    for worker in workers {
        let queue = topology.worker_queue(worker.name);
        let dead = topology.dead_letter_queue(worker.name);
        for name in [&queue, &dead] {
            channel
                .queue_declare(
                    name.as_str().into(),
                    durable(),
                    queue_arguments(settings.queue_type),
                )
                .await
                .with_context(|| format!("cannot declare queue {name}"))?;
        }
        for (source, routing_key) in worker.bindings {
            let exchange = match source {
                Source::Commands => topology.commands_exchange(),
                Source::Internal => topology.internal_exchange(),
                Source::Direct => continue,
            };
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    (*routing_key).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .with_context(|| format!("cannot bind {queue} to {exchange}/{routing_key}"))?;
        }
    }
    Ok(())
}

/// The alternate exchange of the commands exchange and the dead-letter queue
/// behind it; returns the exchange's name.
async fn declare_unrouted(channel: &Channel, settings: &Settings) -> anyhow::Result<String> {
    let exchange = settings.topology.unrouted_exchange();
    let queue = settings.topology.dead_letter_queue(UNROUTED);
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("cannot declare exchange {exchange}"))?;
    channel
        .queue_declare(queue.as_str().into(), durable(), queue_arguments(settings.queue_type))
        .await
        .with_context(|| format!("cannot declare queue {queue}"))?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("cannot bind {queue} to {exchange}"))?;
    Ok(exchange)
}

/// Deletes every queue and exchange the topology declared. Tests use it to
/// leave nothing behind; nothing in the service calls it.
pub async fn delete_topology(
    channel: &Channel,
    topology: &Topology,
    workers: &[WorkerSpec],
) -> anyhow::Result<()> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    for worker in workers {
        for queue in [topology.worker_queue(worker.name), topology.dead_letter_queue(worker.name)] {
            channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
        }
    }
    let unrouted = topology.dead_letter_queue(UNROUTED);
    channel.queue_delete(unrouted.as_str().into(), QueueDeleteOptions::default()).await?;
    for exchange in [
        topology.commands_exchange(),
        topology.events_exchange(),
        topology.internal_exchange(),
        topology.unrouted_exchange(),
    ] {
        channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await?;
    }
    Ok(())
}

/// One message to publish. A non-zero `delay` sends it through the delay
/// queue of the queue named by `routing_key` (the exchange must then be the
/// default exchange, "").
#[derive(Debug, Clone)]
pub struct Publication {
    pub exchange: String,
    pub routing_key: String,
    pub delay: Duration,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

/// Publishes with publisher confirms over a pooled connection kept apart from
/// the consuming one, so that broker flow control on publishers never stalls
/// acknowledgements.
pub struct Publisher {
    pool: deadpool_lapin::Pool,
    channel: Mutex<Option<(deadpool_lapin::Connection, Channel)>>,
    queue_type: QueueType,
    topology: Topology,
    /// Delay queues this process declared, and when: they expire when unused,
    /// so they are declared again before that can happen.
    declared_delay_queues: StdMutex<HashMap<String, Instant>>,
}

/// Delay queues vanish this long after their last declaration plus their
/// delay; re-declaring them every `DELAY_QUEUE_REDECLARE` keeps any queue
/// holding a message alive until the message has left.
const DELAY_QUEUE_IDLE_EXPIRY: Duration = Duration::from_secs(3600);
const DELAY_QUEUE_REDECLARE: Duration = Duration::from_secs(600);

impl Publisher {
    pub fn new(settings: &Settings, name: &str) -> anyhow::Result<Self> {
        let properties = connection_properties(settings, &format!("{name} publisher"));
        let config = deadpool_lapin::Config {
            url: Some(settings.amqp_url.expose().to_owned()),
            ..deadpool_lapin::Config::default()
        };
        let pool = config
            .create_pool(move || properties.clone(), deadpool_lapin::Runtime::Tokio1)
            .context("cannot create the publisher pool")?;
        Ok(Publisher {
            pool,
            channel: Mutex::new(None),
            queue_type: settings.queue_type,
            topology: settings.topology.clone(),
            declared_delay_queues: StdMutex::new(HashMap::new()),
        })
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        let mut cached = self.channel.lock().await;
        if let Some((connection, channel)) = cached.as_ref()
            && connection.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        *cached = None;
        let connection = self.pool.get().await.map_err(|e| anyhow!("{e}"))?;
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        *cached = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// Forgets the cached channel after an error, so the next call opens a
    /// fresh one (and the pool a fresh connection if the old one died).
    async fn reset(&self) {
        *self.channel.lock().await = None;
        self.declared_delay_queues.lock().map(|mut queues| queues.clear()).ok();
    }

    /// Publishes every message, then waits for the broker to confirm them
    /// all. Returns an error if any was refused or the channel failed; the
    /// caller must then treat all of them as unpublished.
    pub async fn publish_all(&self, publications: &[Publication]) -> anyhow::Result<()> {
        let result = self.try_publish_all(publications).await;
        if result.is_err() {
            self.reset().await;
        }
        result
    }

    async fn try_publish_all(&self, publications: &[Publication]) -> anyhow::Result<()> {
        let channel = self.channel().await?;
        let mut confirms = Vec::with_capacity(publications.len());
        for publication in publications {
            let (exchange, routing_key) = if publication.delay.is_zero() {
                (publication.exchange.as_str(), publication.routing_key.clone())
            } else {
                let queue =
                    self.delay_queue(&channel, &publication.routing_key, publication.delay).await?;
                ("", queue)
            };
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &publication.body,
                    publication.properties.clone(),
                )
                .await
                .with_context(|| format!("cannot publish to {exchange}/{routing_key}"))?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            let confirmation = confirm.await.context("no publisher confirm")?;
            if confirmation.is_nack() {
                bail!("the broker refused a message (nack)");
            }
        }
        Ok(())
    }

    /// The delay queue that returns messages to `target_queue` after `delay`,
    /// declared if this process has not declared it recently.
    async fn delay_queue(
        &self,
        channel: &Channel,
        target_queue: &str,
        delay: Duration,
    ) -> anyhow::Result<String> {
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1);
        let worker = target_queue
            .strip_prefix(&format!("{}trusted_contact.", self.topology.prefix()))
            .unwrap_or(target_queue);
        let name = self.topology.delay_queue(worker, delay_ms);
        let fresh = self
            .declared_delay_queues
            .lock()
            .ok()
            .and_then(|queues| queues.get(&name).copied())
            .is_some_and(|at| at.elapsed() < DELAY_QUEUE_REDECLARE);
        if fresh {
            return Ok(name);
        }
        let mut arguments = queue_arguments(self.queue_type);
        let ttl = i64::try_from(delay_ms).unwrap_or(i64::MAX);
        let expiry = ttl.saturating_add(DELAY_QUEUE_IDLE_EXPIRY.as_millis() as i64);
        arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(expiry));
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        arguments
            .insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(target_queue.into()));
        channel
            .queue_declare(ShortString::from(name.as_str()), durable(), arguments)
            .await
            .with_context(|| format!("cannot declare delay queue {name}"))?;
        if let Ok(mut queues) = self.declared_delay_queues.lock() {
            queues.insert(name.clone(), Instant::now());
        }
        Ok(name)
    }

    /// Closes the pooled connection so the broker sees a clean goodbye.
    pub async fn close(&self) {
        if let Some((connection, channel)) = self.channel.lock().await.take() {
            let _ = channel.close(200, "shutting down".into()).await;
            let _ = connection.close(200, "shutting down".into()).await;
        }
        self.pool.close();
    }
}
