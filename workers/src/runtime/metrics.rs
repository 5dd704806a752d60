//! Prometheus metrics of one process: what its workers handled, retried and
//! dead-lettered, how long handlers took, how the outbox and SMS sending are
//! doing, and how often the broker had to be reconnected.

use std::sync::LazyLock;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    pub worker: String,
    pub message_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub worker: String,
    pub message_type: String,
    /// `transient`, `permanent`, `malformed` or `retries_exhausted`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SmsLabels {
    pub template: String,
}

fn handler_buckets() -> Histogram {
    // 1 ms to about 4 s: ledger transactions are milliseconds, SMS calls with
    // a slow provider reach seconds.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 13))
}

pub struct Metrics {
    pub handled: Family<MessageLabels, Counter>,
    pub failed: Family<FailureLabels, Counter>,
    pub retried: Family<MessageLabels, Counter>,
    pub dead_lettered: Family<FailureLabels, Counter>,
    pub handler_seconds: Family<MessageLabels, Histogram, fn() -> Histogram>,
    pub reconnects: Family<WorkerLabels, Counter>,
    pub outbox_published: Counter,
    /// Set when /metrics is scraped, from the ledger.
    pub outbox_backlog: Gauge,
    pub outbox_oldest_age_seconds: Gauge,
    pub sms_sent: Family<SmsLabels, Counter>,
    pub sms_failed: Family<SmsLabels, Counter>,
    registry: Registry,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("trusted_contact");
        let handled = Family::<MessageLabels, Counter>::default();
        let failed = Family::<FailureLabels, Counter>::default();
        let retried = Family::<MessageLabels, Counter>::default();
        let dead_lettered = Family::<FailureLabels, Counter>::default();
        let handler_seconds =
            Family::<MessageLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                handler_buckets,
            );
        let reconnects = Family::<WorkerLabels, Counter>::default();
        let outbox_published = Counter::default();
        let outbox_backlog = Gauge::default();
        let outbox_oldest_age_seconds = Gauge::default();
        let sms_sent = Family::<SmsLabels, Counter>::default();
        let sms_failed = Family::<SmsLabels, Counter>::default();
        registry.register("messages_handled", "Messages handled", handled.clone());
        registry.register("messages_failed", "Handler failures by kind", failed.clone());
        registry.register("messages_retried", "Messages sent to a retry", retried.clone());
        registry.register(
            "messages_dead_lettered",
            "Messages moved to a dead-letter queue",
            dead_lettered.clone(),
        );
        registry.register(
            "handler_seconds",
            "Time from delivery to acknowledgement",
            handler_seconds.clone(),
        );
        registry.register(
            "broker_reconnects",
            "Consume sessions re-opened after losing the broker",
            reconnects.clone(),
        );
        registry.register(
            "outbox_published",
            "Outbox messages confirmed by the broker",
            outbox_published.clone(),
        );
        registry.register(
            "outbox_backlog",
            "Outbox rows not yet confirmed",
            outbox_backlog.clone(),
        );
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest unconfirmed outbox row",
            outbox_oldest_age_seconds.clone(),
        );
        registry.register("sms_sent", "SMS accepted by the provider", sms_sent.clone());
        registry.register("sms_failed", "SMS that failed for good", sms_failed.clone());
        Metrics {
            handled,
            failed,
            retried,
            dead_lettered,
            handler_seconds,
            reconnects,
            outbox_published,
            outbox_backlog,
            outbox_oldest_age_seconds,
            sms_sent,
            sms_failed,
            registry,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The process's metrics. One registry per process, as Prometheus scrapes
/// per process; a global keeps every worker and tool able to count without
/// threading a handle through each call.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn message_labels(worker: &str, message_type: &str) -> MessageLabels {
    MessageLabels { worker: worker.to_owned(), message_type: message_type.to_owned() }
}

pub fn failure_labels(worker: &str, message_type: &str, kind: &str) -> FailureLabels {
    FailureLabels {
        worker: worker.to_owned(),
        message_type: message_type.to_owned(),
        kind: kind.to_owned(),
    }
}
