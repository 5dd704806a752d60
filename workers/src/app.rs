//! The workers this program can run, by name, and the process that runs a
//! chosen set of them until SIGTERM or SIGINT.

use std::str::FromStr;

use anyhow::bail;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    ledger,
    recovery::{self, RecoverySettings, RecoveryWorker},
    runtime::{Runtime, WorkerSpec},
    settings::Settings,
    sweeper::{self, SweeperSettings},
};

/// Every worker of the service, in the order `all` starts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerName {
    Recovery,
    Sweeper,
}

impl WorkerName {
    pub const ALL: &'static [WorkerName] = &[WorkerName::Recovery, WorkerName::Sweeper];

    pub fn spec(self) -> WorkerSpec {
        match self {
            WorkerName::Recovery => recovery::SPEC,
            WorkerName::Sweeper => sweeper::SPEC,
        }
    }
}

impl FromStr for WorkerName {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            recovery::NAME => Ok(WorkerName::Recovery),
            sweeper::NAME => Ok(WorkerName::Sweeper),
            _ => bail!("unknown worker `{name}`"),
        }
    }
}

/// Each worker's own settings, read before anything starts, so that a
/// missing secret stops the process at once. Only the chosen workers' are
/// read: a sweeper alone needs no code secret.
enum Started {
    Recovery(RecoverySettings),
    Sweeper(SweeperSettings),
}

impl Started {
    fn read(name: WorkerName, settings: &Settings) -> anyhow::Result<Self> {
        Ok(match name {
            WorkerName::Recovery => {
                Started::Recovery(RecoverySettings::from_env(&settings.environment)?)
            }
            WorkerName::Sweeper => Started::Sweeper(SweeperSettings::from_env()?),
        })
    }

    fn spawn(self, runtime: &Runtime) -> Vec<JoinHandle<anyhow::Result<()>>> {
        match self {
            Started::Recovery(settings) => {
                vec![runtime.spawn_worker(RecoveryWorker::new(settings), service_topology())]
            }
            Started::Sweeper(settings) => sweeper::spawn(runtime, settings, service_topology()),
        }
    }
}

/// The queues every process declares: all workers', so that a message for a
/// worker that is not running yet waits in its queue instead of being lost.
pub fn service_topology() -> Vec<WorkerSpec> {
    WorkerName::ALL.iter().map(|name| name.spec()).collect()
}

/// Runs `workers` in this process until `shutdown` fires, then stops them
/// cleanly and flushes the outbox.
pub async fn run(
    settings: Settings,
    workers: &[WorkerName],
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let started = workers
        .iter()
        .map(|name| Started::read(*name, &settings))
        .collect::<anyhow::Result<Vec<_>>>()?;
    serve(settings, shutdown, move |runtime| {
        started.into_iter().flat_map(|worker| worker.spawn(runtime)).collect()
    })
    .await
}

/// The life of a worker process: ledger, migrations, relay, the workers that
/// `start` spawns, and on shutdown the workers first, the relay last so that
/// what they committed still goes out.
pub async fn serve(
    settings: Settings,
    shutdown: CancellationToken,
    start: impl FnOnce(&Runtime) -> Vec<JoinHandle<anyhow::Result<()>>>,
) -> anyhow::Result<()> {
    let pool = ledger::connect(&settings).await?;
    ledger::migrate(&pool).await?;
    let runtime = Runtime::new(settings, pool.clone(), shutdown.clone())?;
    let relay_shutdown = CancellationToken::new();
    let relay = runtime.spawn_relay(relay_shutdown.clone());
    let handles = start(&runtime);
    let mut outcome = Ok(());
    for handle in handles {
        match handle.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                // One worker gave up on the broker: stop the others too, so
                // the process exits and its supervisor restarts it.
                shutdown.cancel();
                outcome = Err(error);
            }
            Err(join) => {
                shutdown.cancel();
                outcome = Err(join.into());
            }
        }
    }
    relay_shutdown.cancel();
    let _ = relay.await;
    runtime.publisher.close().await;
    pool.close().await;
    outcome
}
