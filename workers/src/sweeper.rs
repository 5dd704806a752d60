//! The expiry sweeping worker: ends what ran out of time. Deadlines arrive
//! as delayed messages on its queue, one match arm per kind; a periodic sweep
//! of the ledger catches any deadline whose message was lost or late. Both
//! paths use the same message id for a deadline, so the inbox lets each act
//! once, however many sweepers run.

use std::{sync::Arc, time::Duration};

use anyhow::anyhow;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trusted_contact_contracts::{Envelope, Topology};

use crate::{
    invitations::expiry::{self, INVITATION_DEADLINE},
    recovery,
    runtime::{
        Context, HandlerError, Publisher, Runtime, Source, Worker, WorkerSpec, broker::Publication,
        message::properties_of,
    },
    settings::{millis_var, parse_var},
    telemetry::redact_for_log,
};

/// The worker's name, which also names its queue and its inbox rows.
pub const NAME: &str = "sweeper";

/// A delayed deadline message arrives this long after its deadline, so that
/// it finds the deadline passed by the clock that judges it too.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(1);

/// The answer to a deadline message that arrived before its deadline (clock
/// skew between broker, workers and database): retried after the time left,
/// and never recorded as handled, so that its id stays free for the real
/// expiry and for the periodic sweep.
pub fn arrived_early(due: DateTime<Utc>, now: DateTime<Utc>) -> HandlerError {
    let left = (due - now).to_std().unwrap_or_default();
    HandlerError::Transient {
        source: anyhow!("deadline message arrived before the deadline"),
        retry_after: Some(left.max(Duration::from_millis(200))),
    }
}

pub const SWEEPER: WorkerSpec = WorkerSpec {
    name: NAME,
    bindings: &[
        (Source::Direct, INVITATION_DEADLINE),
        (Source::Direct, recovery::RECOVERY_DEADLINE),
        (Source::Direct, recovery::CODE_DEADLINE),
    ],
};

#[derive(Debug, Clone)]
pub struct SweeperSettings {
    /// Time between two sweeps of the ledger (`TC_SWEEP_INTERVAL_MS`).
    pub interval: Duration,
    /// Most deadlines one sweep handles per kind (`TC_SWEEP_BATCH`).
    pub batch: i64,
}

impl SweeperSettings {
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(SweeperSettings {
            interval: millis_var("TC_SWEEP_INTERVAL_MS", 30_000)?,
            batch: parse_var("TC_SWEEP_BATCH", 500)?,
        })
    }
}

pub struct Sweeper;

impl Worker for Sweeper {
    fn spec(&self) -> WorkerSpec {
        SWEEPER
    }

    async fn handle(&self, context: &Context, message: &Envelope) -> Result<(), HandlerError> {
        match message.kind.as_str() {
            INVITATION_DEADLINE => expiry::handle_deadline(context, message).await,
            recovery::RECOVERY_DEADLINE | recovery::CODE_DEADLINE => {
                recovery::expire_recovery(context, message).await
            }
            other => Err(HandlerError::permanent(anyhow!("the sweeper cannot handle {other}"))),
        }
    }
}

/// Starts the sweeper: the consumer of its queue and the periodic sweep.
pub fn spawn(
    runtime: &Runtime,
    settings: SweeperSettings,
    topology: Vec<WorkerSpec>,
) -> Vec<JoinHandle<anyhow::Result<()>>> {
    let sweeps = run_sweeps(
        runtime.pool.clone(),
        runtime.publisher.clone(),
        runtime.settings.topology.clone(),
        settings,
        runtime.shutdown_token(),
    );
    vec![runtime.spawn_worker(Sweeper, topology), tokio::spawn(sweeps)]
}

/// Sweeps the ledger every `interval` until `shutdown`. A failed sweep is
/// logged and tried again at the next tick: the deadlines stay in the ledger.
pub async fn run_sweeps(
    pool: PgPool,
    publisher: Arc<Publisher>,
    topology: Topology,
    settings: SweeperSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut ticks = tokio::time::interval(settings.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        if let Err(error) = sweep_once(&pool, &publisher, &topology, &settings).await {
            tracing::warn!(error = redact_for_log(&format!("{error:#}")), "sweep failed");
        }
    }
    tracing::info!("sweeps stopped");
    Ok(())
}

/// One sweep over every kind of deadline.
pub async fn sweep_once(
    pool: &PgPool,
    publisher: &Publisher,
    topology: &Topology,
    settings: &SweeperSettings,
) -> anyhow::Result<()> {
    let due = expiry::due_deadlines(pool, settings.batch).await?;
    send_to_self(publisher, topology, &due).await?;
    if !due.is_empty() {
        tracing::info!(deadlines = due.len(), "sweep sent overdue invitation deadlines");
    }
    let recoveries =
        recovery::sweep_due_recoveries(pool, topology, Utc::now(), settings.batch).await?;
    if recoveries != recovery::SweepReport::default() {
        tracing::info!(
            requests_expired = recoveries.requests_expired,
            codes_expired = recoveries.codes_expired,
            "swept recovery deadlines"
        );
    }
    Ok(())
}

/// Publishes straight to the sweeper's queue, bypassing the outbox: the
/// ledger already holds what these messages say, and a lost one is sent
/// again by the next sweep.
async fn send_to_self(
    publisher: &Publisher,
    topology: &Topology,
    deadlines: &[Envelope],
) -> anyhow::Result<()> {
    if deadlines.is_empty() {
        return Ok(());
    }
    let queue = topology.worker_queue(NAME);
    let publications = deadlines
        .iter()
        .map(|envelope| {
            Ok(Publication {
                exchange: String::new(),
                routing_key: queue.clone(),
                delay: Duration::ZERO,
                body: serde_json::to_vec(envelope)?,
                properties: properties_of(envelope),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    publisher.publish_all(&publications).await
}
