//! The message runtime every worker stands on: broker connections and
//! topology, the consume loop with manual acks, the ledger transaction per
//! message, the outbox relay, retries through delay queues, dead-lettering,
//! reconnection and graceful shutdown.

pub mod broker;
mod consumer;
pub mod failure;
pub mod headers;
pub mod health;
pub mod message;
pub mod metrics;
pub mod outbox;

use std::{future::Future, sync::Arc};

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use trusted_contact_contracts::{Envelope, Topology};

pub use broker::{Publisher, Source, WorkerSpec};
pub use failure::HandlerError;
pub use outbox::{OutboxRelay, OutboxSignal};

use crate::{ledger::LedgerTx, settings::Settings};

/// A consumer of one queue. The runtime owns the loop; the worker owns one
/// step: handling one parsed message inside the ledger.
pub trait Worker: Send + Sync + 'static {
    fn spec(&self) -> WorkerSpec;

    /// Handles one message. Returning `Ok` acknowledges it; an error is
    /// routed by its class (see [`HandlerError`]). A handler must be safe to
    /// run again on the same message: [`Context::begin`] makes that so for
    /// everything it does inside the ledger transaction.
    fn handle(
        &self,
        context: &Context,
        message: &Envelope,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// What a handler may use: the ledger, the topology, the relay's wake-up.
#[derive(Clone)]
pub struct Context {
    pub pool: PgPool,
    pub topology: Topology,
    pub consumer: &'static str,
    /// Failed attempts before this delivery (0 on the first), from the
    /// runtime's own header.
    pub attempt: u32,
    /// Deliveries a message gets before a transient failure dead-letters it.
    retry_limit: u32,
    outbox: OutboxSignal,
}

impl Context {
    /// Whether a transient failure of this delivery would still be retried.
    /// A handler that must not leave its flow without an outcome refuses or
    /// fails on the last delivery instead of letting it be dead-lettered.
    pub fn may_retry(&self) -> bool {
        self.attempt.saturating_add(1) < self.retry_limit
    }

    /// Opens the ledger transaction for `message`, or `None` if this worker
    /// has already handled it.
    pub async fn begin(&self, message: &Envelope) -> Result<Option<LedgerTx>, sqlx::Error> {
        LedgerTx::begin(&self.pool, &self.topology, self.consumer, message).await
    }

    /// Runs `step` in the ledger transaction for `message` and commits it, or
    /// does nothing if this worker has already handled the message.
    pub async fn once(
        &self,
        message: &Envelope,
        step: impl AsyncFnOnce(&mut LedgerTx) -> Result<(), HandlerError>,
    ) -> Result<(), HandlerError> {
        let Some(mut tx) = self.begin(message).await? else { return Ok(()) };
        step(&mut tx).await?;
        self.commit(tx).await
    }

    /// Commits and wakes the relay if anything waits in the outbox.
    pub async fn commit(&self, tx: LedgerTx) -> Result<(), HandlerError> {
        if tx.commit().await? > 0 {
            self.outbox.wake();
        }
        Ok(())
    }
}

/// The resources one process shares among its workers.
pub struct Runtime {
    pub settings: Settings,
    pub pool: PgPool,
    pub publisher: Arc<Publisher>,
    pub health: Arc<health::Health>,
    outbox: OutboxSignal,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Runtime {
    pub fn new(
        settings: Settings,
        pool: PgPool,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let publisher = Arc::new(Publisher::new(&settings, "runtime")?);
        Ok(Runtime {
            settings,
            pool,
            publisher,
            health: Arc::default(),
            outbox: OutboxSignal::default(),
            shutdown,
            tasks: TaskTracker::new(),
        })
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Starts the outbox relay of this process. It stops after the workers,
    /// so that what they committed last still goes out.
    pub fn spawn_relay(&self, relay_shutdown: CancellationToken) -> JoinHandle<()> {
        let relay = OutboxRelay::new(
            self.pool.clone(),
            self.publisher.clone(),
            self.outbox.clone(),
            self.settings.outbox_batch_size,
            self.settings.outbox_poll_interval,
        );
        tokio::spawn(relay.run(relay_shutdown))
    }

    /// Starts consuming for `worker`; `topology` lists every worker whose
    /// queue this process declares. The task ends when the runtime shuts down
    /// (with `Ok`) or when the broker stayed unreachable too long (with the
    /// error).
    pub fn spawn_worker<W: Worker>(
        &self,
        worker: W,
        topology: Vec<WorkerSpec>,
    ) -> JoinHandle<anyhow::Result<()>> {
        let context = Context {
            pool: self.pool.clone(),
            topology: self.settings.topology.clone(),
            consumer: worker.spec().name,
            attempt: 0,
            retry_limit: self.settings.retry_limit,
            outbox: self.outbox.clone(),
        };
        self.health.register(worker.spec().name);
        let consumer = consumer::Consumer {
            health: self.health.clone(),
            worker: Arc::new(worker),
            context,
            settings: self.settings.clone(),
            publisher: self.publisher.clone(),
            topology,
            tasks: self.tasks.clone(),
        };
        tokio::spawn(consumer.run(self.shutdown.clone()))
    }
}
