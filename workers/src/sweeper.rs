//! The expiry sweeping worker. Deadlines arrive as delayed messages on its
//! queue, one match arm per kind of deadline; a periodic sweep of the ledger
//! sends again, under the same message id, any deadline whose message was
//! lost, so the inbox lets each deadline act once however many sweepers run.

use std::{sync::Arc, time::Duration};

use anyhow::anyhow;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use trusted_contact_contracts::{Envelope, Topology};

use crate::{
    invitations::expiry::{self, INVITATION_DEADLINE},
    runtime::{
        Context, HandlerError, Publisher, Source, Worker, WorkerSpec, broker::Publication,
        message::properties_for,
    },
    settings::{millis_var, parse_var},
};

pub const SWEEPER: WorkerSpec =
    WorkerSpec { name: "sweeper", bindings: &[(Source::Direct, INVITATION_DEADLINE)] };

#[derive(Debug, Clone)]
pub struct SweeperSettings {
    /// Time between two sweeps of the ledger (`TC_SWEEP_INTERVAL_MS`).
    pub interval: Duration,
    /// Most deadlines one sweep sends per kind (`TC_SWEEP_BATCH`).
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
            other => Err(HandlerError::permanent(anyhow!("the sweeper cannot handle {other}"))),
        }
    }
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
        match sweep_once(&pool, &publisher, &topology, &settings).await {
            Ok(0) => {}
            Ok(sent) => tracing::info!(deadlines = sent, "sweep sent overdue deadlines"),
            Err(error) => tracing::warn!(error = format!("{error:#}"), "sweep failed"),
        }
    }
    tracing::info!("sweeps stopped");
    Ok(())
}

/// One sweep: every kind of deadline that is due, sent to this worker's
/// queue. Returns how many were sent.
pub async fn sweep_once(
    pool: &PgPool,
    publisher: &Publisher,
    topology: &Topology,
    settings: &SweeperSettings,
) -> anyhow::Result<usize> {
    let due = expiry::due_deadlines(pool, settings.batch).await?;
    send_to_self(publisher, topology, &due).await?;
    Ok(due.len())
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
    let queue = topology.worker_queue(SWEEPER.name);
    let publications = deadlines
        .iter()
        .map(|envelope| {
            Ok(Publication {
                exchange: String::new(),
                routing_key: queue.clone(),
                delay: Duration::ZERO,
                body: serde_json::to_vec(envelope)?,
                properties: properties_for(
                    envelope.message_id,
                    &envelope.kind,
                    envelope.correlation_id.as_deref(),
                    envelope.causation_id.as_deref(),
                    envelope.occurred_at,
                ),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    publisher.publish_all(&publications).await
}
