//! The sweeper: ends what ran out of time. It consumes the deadline messages
//! other workers schedule to its queue, and periodically sweeps the ledger
//! for deadlines whose message was lost or late. Both paths use the same
//! message ids, so a deadline takes effect once whichever comes first.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trusted_contact_contracts::{Envelope, Topology};

use crate::{
    recovery,
    runtime::{Context, HandlerError, Runtime, Source, Worker, WorkerSpec},
    settings::{parse_var, secs_var},
    telemetry::redact_for_log,
};

/// The worker's name, which also names its queue and its inbox rows.
pub const NAME: &str = "sweeper";

/// Deadlines arrive straight in the sweeper's queue, one binding per kind.
pub const SPEC: WorkerSpec = WorkerSpec {
    name: NAME,
    bindings: &[
        (Source::Direct, recovery::RECOVERY_DEADLINE),
        (Source::Direct, recovery::CODE_DEADLINE),
    ],
};

#[derive(Debug, Clone)]
pub struct SweeperSettings {
    /// Time between two ledger sweeps (`TC_SWEEP_INTERVAL_SECS`).
    pub interval: Duration,
    /// The most deadlines of each kind one sweep ends (`TC_SWEEP_BATCH`).
    pub batch: i64,
}

impl SweeperSettings {
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(SweeperSettings {
            interval: secs_var("TC_SWEEP_INTERVAL_SECS", 30)?,
            batch: parse_var("TC_SWEEP_BATCH", 500)?,
        })
    }
}

pub struct Sweeper;

impl Worker for Sweeper {
    fn spec(&self) -> WorkerSpec {
        SPEC
    }

    async fn handle(&self, context: &Context, message: &Envelope) -> Result<(), HandlerError> {
        match message.kind.as_str() {
            recovery::RECOVERY_DEADLINE | recovery::CODE_DEADLINE => {
                recovery::expire_recovery(context, message).await
            }
            other => Err(HandlerError::permanent(anyhow::anyhow!(
                "the sweeper does not handle {other:?}"
            ))),
        }
    }
}

/// One sweep of the ledger, every kind of deadline in turn.
pub async fn sweep_once(pool: &PgPool, topology: &Topology, batch: i64) -> anyhow::Result<()> {
    let recoveries = recovery::sweep_due_recoveries(pool, topology, Utc::now(), batch).await?;
    if recoveries != recovery::SweepReport::default() {
        tracing::info!(
            requests_expired = recoveries.requests_expired,
            codes_expired = recoveries.codes_expired,
            "swept recovery deadlines"
        );
    }
    Ok(())
}

/// Sweeps every `interval` until `shutdown`. A failed sweep is logged and
/// tried again on the next tick: the deadlines stay in the ledger.
pub async fn sweep_periodically(
    pool: PgPool,
    topology: Topology,
    settings: SweeperSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        if let Err(error) = sweep_once(&pool, &topology, settings.batch).await {
            tracing::warn!(error = redact_for_log(&format!("{error:#}")), "sweep failed");
        }
    }
}

/// Starts the sweeper: the consumer of its queue and the periodic sweep.
pub fn spawn(
    runtime: &Runtime,
    settings: SweeperSettings,
    topology: Vec<WorkerSpec>,
) -> Vec<JoinHandle<anyhow::Result<()>>> {
    let periodic = sweep_periodically(
        runtime.pool.clone(),
        runtime.settings.topology.clone(),
        settings,
        runtime.shutdown_token(),
    );
    vec![runtime.spawn_worker(Sweeper, topology), tokio::spawn(periodic)]
}
