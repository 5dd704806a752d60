//! Names of everything the service declares on the broker. A topology prefix
//! lets several environments (or parallel tests) share one broker.

/// The exchange the portal publishes its commands to (topic, routing key =
/// message type).
pub const COMMANDS_EXCHANGE: &str = "trusted_contact.commands";
/// The exchange the service publishes its outcomes to (topic, routing key =
/// message type).
pub const EVENTS_EXCHANGE: &str = "trusted_contact.events";
/// Service-internal traffic between workers (SMS requests, deadlines). Kept
/// apart so that the portal never sees it and cannot forge it.
pub const INTERNAL_EXCHANGE: &str = "trusted_contact.internal";

/// Where the commands exchange sends a command that no worker is bound to (an
/// unknown type): a fanout exchange into one dead-letter queue, so that no
/// command the broker could not route is dropped unseen.
pub const UNROUTED_EXCHANGE: &str = "trusted_contact.commands.unrouted";
/// The name that stands for a worker in the dead-letter queue of unrouted
/// commands (`trusted_contact.unrouted.dead`).
pub const UNROUTED: &str = "unrouted";

/// Every broker name, with the environment's prefix applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Topology { prefix: prefix.into() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn commands_exchange(&self) -> String {
        format!("{}{COMMANDS_EXCHANGE}", self.prefix)
    }

    pub fn events_exchange(&self) -> String {
        format!("{}{EVENTS_EXCHANGE}", self.prefix)
    }

    pub fn internal_exchange(&self) -> String {
        format!("{}{INTERNAL_EXCHANGE}", self.prefix)
    }

    pub fn unrouted_exchange(&self) -> String {
        format!("{}{UNROUTED_EXCHANGE}", self.prefix)
    }

    /// The queue a worker consumes from.
    pub fn worker_queue(&self, worker: &str) -> String {
        format!("{}trusted_contact.{worker}", self.prefix)
    }

    /// Where a worker's messages go when they failed for good.
    pub fn dead_letter_queue(&self, worker: &str) -> String {
        format!("{}trusted_contact.{worker}.dead", self.prefix)
    }

    /// A holding queue whose messages return to `worker`'s queue after
    /// `delay_ms`. One queue per delay keeps expiry in FIFO order, which
    /// per-message TTLs in a shared queue would not.
    pub fn delay_queue(&self, worker: &str, delay_ms: u64) -> String {
        format!("{}trusted_contact.{worker}.delay.{delay_ms}ms", self.prefix)
    }
}
