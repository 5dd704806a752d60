//! The consume loop of one worker: supervises its broker connection, hands
//! each delivery to the worker in its own task, and routes the outcome:
//! ack, retry through a delay queue, or dead-letter with the reason.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    },
    types::FieldTable,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;
use trusted_contact_contracts::{Envelope, Topology};

use super::{
    Context, Worker,
    broker::{self, Publication, Publisher, Source, WorkerSpec},
    failure::HandlerError,
    headers,
    health::Health,
    metrics::{METRICS, WorkerLabels, failure_labels, message_labels},
};
use crate::{settings::Settings, telemetry::redact_for_log};

pub(super) struct Consumer<W> {
    pub health: Arc<Health>,
    pub worker: Arc<W>,
    pub context: Context,
    pub settings: Settings,
    pub publisher: Arc<Publisher>,
    pub topology: Vec<WorkerSpec>,
    pub tasks: TaskTracker,
}

/// No command of the catalogue comes near this; a larger body is hostile or
/// broken, and parsing it would only cost memory.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Why a consume session ended without an error.
enum SessionEnd {
    Shutdown,
}

impl<W: Worker> Consumer<W> {
    /// Consumes until shutdown, reconnecting whenever the broker goes away or
    /// cancels the consumer. Fails only when the broker stays unreachable for
    /// longer than the configured give-up time.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let name = self.worker.spec().name;
        loop {
            let connection = tokio::select! {
                connection = broker::connect(&self.settings, name) => connection?,
                () = shutdown.cancelled() => break,
            };
            let result = self.session(&connection, &shutdown).await;
            self.health.set_attached(name, false);
            match result {
                Ok(SessionEnd::Shutdown) => {
                    self.drain_in_flight().await;
                    let _ = connection.close(200, "worker stopping".into()).await;
                    break;
                }
                Err(error) => {
                    METRICS.reconnects.get_or_create(&WorkerLabels { worker: name.into() }).inc();
                    tracing::warn!(
                        worker = name,
                        error = format!("{error:#}"),
                        "lost the broker or the consumer, reconnecting"
                    );
                    let _ = connection.close(200, "reconnecting".into()).await;
                }
            }
        }
        tracing::info!(worker = name, "worker stopped");
        Ok(())
    }

    async fn session(
        &self,
        connection: &lapin::Connection,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<SessionEnd> {
        let spec = self.worker.spec();
        let channel = connection.create_channel().await?;
        channel.basic_qos(self.settings.prefetch, BasicQosOptions::default()).await?;
        broker::declare_topology(&channel, &self.settings, &self.topology).await?;
        let queue = self.settings.topology.worker_queue(spec.name);
        let tag = format!("{}-{}", spec.name, uuid::Uuid::new_v4());
        let mut deliveries = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("cannot consume from {queue}"))?;
        tracing::info!(worker = spec.name, queue = %queue, "consuming");
        self.health.set_attached(spec.name, true);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    // Stop the flow first; what was already delivered to us
                    // finishes below, the rest the broker keeps for others.
                    let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await;
                    return Ok(SessionEnd::Shutdown);
                }
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        let mut context = self.context.clone();
                        context.attempt = delivery.properties.headers().as_ref()
                            .and_then(|table| headers::get_u32(table, headers::ATTEMPTS))
                            .unwrap_or(0);
                        let step = Step {
                            worker: self.worker.clone(),
                            context,
                            settings: self.settings.clone(),
                            publisher: self.publisher.clone(),
                        };
                        self.tasks.spawn(step.run(delivery));
                    }
                    Some(Err(error)) => return Err(error.into()),
                    None => return Err(anyhow!("the broker cancelled the consumer")),
                },
            }
        }
    }

    async fn drain_in_flight(&self) {
        self.tasks.close();
        let grace = self.settings.shutdown_grace;
        if tokio::time::timeout(grace, self.tasks.wait()).await.is_err() {
            tracing::warn!(
                worker = self.worker.spec().name,
                in_flight = self.tasks.len(),
                "handlers still running after the shutdown grace; the broker will redeliver"
            );
        }
    }
}

/// The handling of one delivery, from parse to acknowledgement.
struct Step<W> {
    worker: Arc<W>,
    context: Context,
    settings: Settings,
    publisher: Arc<Publisher>,
}

/// How a message failed for good, as written in the dead-letter headers.
#[derive(Debug, Clone, Copy)]
enum FailureKind {
    Malformed,
    Permanent,
    RetriesExhausted,
    /// Its retry could not be scheduled, though the broker is there.
    RetryUnroutable,
}

impl FailureKind {
    fn as_str(self) -> &'static str {
        match self {
            FailureKind::Malformed => "malformed",
            FailureKind::Permanent => "permanent",
            FailureKind::RetriesExhausted => "retries_exhausted",
            FailureKind::RetryUnroutable => "retry_unroutable",
        }
    }
}

impl<W: Worker> Step<W> {
    async fn run(self, delivery: Delivery) {
        let spec = self.worker.spec();
        let message_id = delivery.properties.message_id().as_ref().map(|id| id.to_string());
        let span = tracing::info_span!("message", worker = spec.name,
            message.id = tracing::field::Empty, message.type = tracing::field::Empty,
            correlation_id = tracing::field::Empty, amqp.message_id = message_id);
        self.handle(delivery, spec).instrument(span).await;
    }

    async fn handle(&self, delivery: Delivery, spec: WorkerSpec) {
        if delivery.data.len() > MAX_BODY_BYTES {
            let error =
                anyhow!("body of {} bytes is over the {MAX_BODY_BYTES} limit", delivery.data.len());
            return self.dead_letter(delivery, FailureKind::Malformed, &error).await;
        }
        let envelope = match Envelope::parse(&delivery.data) {
            Ok(envelope) => envelope,
            Err(error) => {
                return self.dead_letter(delivery, FailureKind::Malformed, &error.into()).await;
            }
        };
        let span = tracing::Span::current();
        span.record("message.id", tracing::field::display(envelope.message_id));
        span.record("correlation_id", envelope.flow_id().as_str());
        if let Err(error) = check_route(&spec, &self.context.topology, &delivery, &envelope.kind) {
            return self.dead_letter(delivery, FailureKind::Malformed, &error).await;
        }
        span.record("message.type", envelope.kind.as_str());
        let started = std::time::Instant::now();
        let labels = message_labels(spec.name, &envelope.kind);
        let outcome = self.worker.handle(&self.context, &envelope).await;
        METRICS.handler_seconds.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => {
                tracing::debug!("handled");
                METRICS.handled.get_or_create(&labels).inc();
                self.ack(&delivery).await;
            }
            Err(HandlerError::Permanent(error)) => {
                self.dead_letter(delivery, FailureKind::Permanent, &error).await;
            }
            Err(HandlerError::Transient { source, retry_after }) => {
                let failure = failure_labels(spec.name, &envelope.kind, "transient");
                METRICS.failed.get_or_create(&failure).inc();
                self.retry(delivery, &source, retry_after).await;
            }
        }
    }

    /// The message type as a metric label: one the worker handles, else
    /// `other`, so that a sender cannot grow the metrics without bound.
    fn type_label(&self, delivery: &Delivery) -> &'static str {
        let sent_as = delivery.properties.kind().as_ref().map(|kind| kind.as_str());
        self.worker
            .spec()
            .bindings
            .iter()
            .map(|(_, kind)| *kind)
            .find(|kind| Some(*kind) == sent_as)
            .unwrap_or("other")
    }

    async fn ack(&self, delivery: &Delivery) {
        if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
            // The work is committed; the redelivery will find it in the inbox.
            tracing::warn!(error = %error, "ack failed, the message will be redelivered");
        }
    }

    /// The broker could not take our retry or dead-letter copy. Give the
    /// message back for redelivery, after a pause so that a broker in trouble
    /// is not hammered.
    async fn give_back(&self, delivery: &Delivery, error: anyhow::Error) {
        tracing::warn!(
            error = format!("{error:#}"),
            "cannot route a failed message, giving it back"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let requeue = BasicNackOptions { requeue: true, ..BasicNackOptions::default() };
        if let Err(error) = delivery.nack(requeue).await {
            tracing::warn!(error = %error, "nack failed, the broker will redeliver on reconnect");
        }
    }

    async fn retry(
        &self,
        delivery: Delivery,
        error: &anyhow::Error,
        retry_after: Option<Duration>,
    ) {
        let table = delivery.properties.headers().clone().unwrap_or_default();
        let failed = headers::get_u32(&table, headers::ATTEMPTS).unwrap_or(0).saturating_add(1);
        if failed >= self.settings.retry_limit {
            return self.dead_letter(delivery, FailureKind::RetriesExhausted, error).await;
        }
        let delay = retry_delay(&self.settings, failed).max(retry_after.unwrap_or_default());
        let error = redact_for_log(&format!("{error:#}"));
        tracing::warn!(
            error = %error,
            attempt = failed,
            retry_in_ms = delay.as_millis() as u64,
            "transient failure, retrying later"
        );
        let mut table = failure_headers(&delivery, table, failed, &error);
        headers::set_str(&mut table, headers::WORKER, self.worker.spec().name);
        let labels = message_labels(self.worker.spec().name, self.type_label(&delivery));
        METRICS.retried.get_or_create(&labels).inc();
        let publication = Publication {
            exchange: String::new(),
            routing_key: self.context.topology.worker_queue(self.worker.spec().name),
            delay,
            body: delivery.data.clone(),
            properties: delivery.properties.clone().with_headers(table),
        };
        let publication = std::slice::from_ref(&publication);
        // The second try has a fresh channel: a publisher connection that died
        // since the last message heals there.
        let mut scheduled = self.publisher.publish_all(publication).await;
        if scheduled.is_err() {
            scheduled = self.publisher.publish_all(publication).await;
        }
        match scheduled {
            Ok(()) => self.ack(&delivery).await,
            // A delay queue the broker will not take would send the message
            // round for ever; parked, it waits for the operator with the
            // reason. If the broker is gone, this fails too and the message
            // is given back.
            Err(publish_error) => {
                let error = anyhow!("{error}; its retry could not be scheduled: {publish_error:#}");
                self.dead_letter(delivery, FailureKind::RetryUnroutable, &error).await;
            }
        }
    }

    async fn dead_letter(&self, delivery: Delivery, kind: FailureKind, error: &anyhow::Error) {
        let spec = self.worker.spec();
        let table = delivery.properties.headers().clone().unwrap_or_default();
        let attempts = headers::get_u32(&table, headers::ATTEMPTS).unwrap_or(0).saturating_add(1);
        let labels = failure_labels(spec.name, self.type_label(&delivery), kind.as_str());
        METRICS.dead_lettered.get_or_create(&labels).inc();
        if !matches!(kind, FailureKind::RetriesExhausted) {
            METRICS.failed.get_or_create(&labels).inc();
        }
        let error = redact_for_log(&format!("{error:#}"));
        tracing::error!(
            error = %error,
            failure = kind.as_str(),
            attempts,
            "message failed for good, dead-lettering"
        );
        let mut table = failure_headers(&delivery, table, attempts, &error);
        headers::set_str(&mut table, headers::WORKER, spec.name);
        headers::set_str(&mut table, headers::FAILURE_KIND, kind.as_str());
        let publication = Publication {
            exchange: String::new(),
            routing_key: self.context.topology.dead_letter_queue(spec.name),
            delay: Duration::ZERO,
            body: delivery.data.clone(),
            properties: delivery.properties.clone().with_headers(table),
        };
        match self.publisher.publish_all(&[publication]).await {
            Ok(()) => self.ack(&delivery).await,
            Err(publish_error) => self.give_back(&delivery, publish_error).await,
        }
    }
}

/// Whether the way a delivery arrived fits its type: a command only from the
/// commands exchange, an internal request only from the internal exchange,
/// each under its own type as routing key. Retries, deadlines and replies
/// come through the default exchange, which only the service publishes to.
/// So nobody who may publish commands reaches a handler meant for replies.
fn check_route(
    spec: &WorkerSpec,
    topology: &Topology,
    delivery: &Delivery,
    kind: &str,
) -> anyhow::Result<()> {
    let exchange = delivery.exchange.as_str();
    let source = if exchange.is_empty() {
        None
    } else if exchange == topology.commands_exchange() {
        Some(Source::Commands)
    } else if exchange == topology.internal_exchange() {
        Some(Source::Internal)
    } else {
        bail!("arrived through exchange {exchange:?}, which {} does not read", spec.name);
    };
    let bound = spec.bindings.iter().any(|(bound_from, bound_kind)| {
        *bound_kind == kind && source.is_none_or(|s| s == *bound_from)
    });
    if !bound {
        bail!("{} does not handle message type {kind:?} from exchange {exchange:?}", spec.name);
    }
    let routing_key = delivery.routing_key.as_str();
    if source.is_some() && routing_key != kind {
        bail!("routing key {routing_key:?} does not match message type {kind:?}");
    }
    Ok(())
}

/// The delay before the next attempt after `failed` failures: exponential
/// from the base delay, capped. Without jitter, so that each delay maps to one
/// delay queue; the spread of arrival times gives enough spread in practice.
fn retry_delay(settings: &Settings, failed: u32) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(settings.retry_base_delay)
        .with_max_delay(settings.retry_max_delay)
        .with_factor(2.0)
        .without_max_times()
        .build()
        .nth(failed.saturating_sub(1) as usize)
        .unwrap_or(settings.retry_max_delay)
}

/// The failure history a retried or dead-lettered copy carries. `error` is
/// the redacted text: the body still holds the values for whoever needs them,
/// while the header, which `dlq list` prints and broker UIs show, keeps only
/// the shape of what went wrong.
fn failure_headers(
    delivery: &Delivery,
    mut table: FieldTable,
    attempts: u32,
    error: &str,
) -> FieldTable {
    let now = Utc::now();
    headers::set_u32(&mut table, headers::ATTEMPTS, attempts);
    if headers::get_str(&table, headers::FIRST_FAILURE_AT).is_none() {
        headers::set_time(&mut table, headers::FIRST_FAILURE_AT, now);
    }
    headers::set_time(&mut table, headers::LAST_FAILURE_AT, now);
    let mut text = error.to_owned();
    text.truncate(text.floor_char_boundary(2_000));
    headers::set_str(&mut table, headers::ERROR, text);
    if headers::get_str(&table, headers::ORIGINAL_EXCHANGE).is_none() {
        headers::set_str(&mut table, headers::ORIGINAL_EXCHANGE, delivery.exchange.as_str());
        headers::set_str(&mut table, headers::ORIGINAL_ROUTING_KEY, delivery.routing_key.as_str());
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_grow_and_stop_at_the_cap() {
        let mut settings = crate::settings::Settings::from_env().unwrap();
        settings.retry_base_delay = Duration::from_millis(100);
        settings.retry_max_delay = Duration::from_millis(350);
        let delays: Vec<_> = (1..=4).map(|n| retry_delay(&settings, n).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 350, 350]);
    }
}
