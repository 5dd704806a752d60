//! The workers this program can run, by name, and the process that runs a
//! chosen set of them until SIGTERM or SIGINT.

use std::str::FromStr;

use anyhow::bail;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    ledger,
    runtime::{Runtime, WorkerSpec, health},
    settings::Settings,
};

/// Every worker of the service, in the order `all` starts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerName {}

impl WorkerName {
    pub const ALL: &'static [WorkerName] = &[];

    pub fn spec(self) -> WorkerSpec {
        match self {}
    }
}

impl FromStr for WorkerName {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        bail!("unknown worker `{name}`")
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
    let workers = workers.to_vec();
    serve(settings, shutdown, move |_runtime| workers.iter().map(|name| match *name {}).collect())
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
    let http_shutdown = CancellationToken::new();
    let address = health::serve(
        runtime.settings.http_port,
        runtime.health.clone(),
        pool.clone(),
        http_shutdown.clone(),
    )
    .await?;
    tracing::info!(http.port = address.port(), "serving /healthz, /readyz and /metrics");
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
    http_shutdown.cancel();
    runtime.publisher.close().await;
    pool.close().await;
    outcome
}
