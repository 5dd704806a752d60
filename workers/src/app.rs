//! The workers this program can run, by name, and the process that runs a
//! chosen set of them until SIGTERM or SIGINT.

use std::str::FromStr;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    invitations::{INVITATIONS, InvitationSettings, Invitations},
    ledger,
    recovery::{self, RecoverySettings, RecoveryWorker},
    runtime::{Runtime, WorkerSpec, health},
    settings::Settings,
    sms::{self, SmsSettings, SmsWorker},
    sweeper::{self, SWEEPER, SweeperSettings},
};

/// Every worker of the service, in the order `all` starts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerName {
    Invitations,
    Sweeper,
    Recovery,
    Sms,
}

impl WorkerName {
    pub const ALL: &'static [WorkerName] =
        &[WorkerName::Invitations, WorkerName::Sweeper, WorkerName::Recovery, WorkerName::Sms];

    pub fn spec(self) -> WorkerSpec {
        match self {
            WorkerName::Invitations => INVITATIONS,
            WorkerName::Sweeper => SWEEPER,
            WorkerName::Recovery => recovery::SPEC,
            WorkerName::Sms => sms::worker::SPEC,
        }
    }
}

impl FromStr for WorkerName {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        WorkerName::ALL
            .iter()
            .copied()
            .find(|worker| worker.spec().name == name)
            .ok_or_else(|| anyhow::anyhow!("unknown worker `{name}`"))
    }
}

/// Each worker's own settings, read before anything starts, so that a bad
/// variable or a missing secret stops the process at once. Only the chosen
/// workers' are read: a sweeper alone needs no code secret.
enum Started {
    Invitations(InvitationSettings),
    Sweeper(SweeperSettings),
    Recovery(RecoverySettings),
    Sms(Box<SmsWorker<sms::worker::ProductionProvider>>),
}

impl Started {
    fn read(name: WorkerName, settings: &Settings) -> anyhow::Result<Self> {
        Ok(match name {
            WorkerName::Invitations => Started::Invitations(InvitationSettings::from_env()?),
            WorkerName::Sweeper => Started::Sweeper(SweeperSettings::from_env()?),
            WorkerName::Recovery => {
                Started::Recovery(RecoverySettings::from_env(&settings.environment)?)
            }
            WorkerName::Sms => Started::Sms(Box::new(SmsWorker::from_settings(
                &SmsSettings::from_env(&settings.environment)?,
            )?)),
        })
    }

    fn spawn(self, runtime: &Runtime) -> Vec<JoinHandle<anyhow::Result<()>>> {
        let topology = service_topology();
        match self {
            Started::Invitations(settings) => {
                vec![runtime.spawn_worker(Invitations { settings }, topology)]
            }
            Started::Sweeper(settings) => sweeper::spawn(runtime, settings, topology),
            Started::Recovery(settings) => {
                vec![runtime.spawn_worker(RecoveryWorker::new(settings), topology)]
            }
            Started::Sms(worker) => vec![runtime.spawn_worker(*worker, topology)],
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
    let mut handles: tokio::task::JoinSet<_> = start(&runtime)
        .into_iter()
        .map(|handle| async move { handle.await.map_err(anyhow::Error::from).and_then(|r| r) })
        .collect();
    let mut outcome = Ok(());
    while let Some(finished) = handles.join_next().await {
        if let Ok(Err(error)) | Err(error) = finished.map_err(anyhow::Error::from) {
            // One worker gave up on the broker: stop the others too, so the
            // process exits and its supervisor restarts it.
            shutdown.cancel();
            outcome = Err(error);
        }
    }
    relay_shutdown.cancel();
    // A broker that blocks publishers (a resource alarm) would hold the last
    // flush forever; what it leaves unsent stays in the outbox for the next
    // relay, so the process may go.
    if tokio::time::timeout(runtime.settings.shutdown_grace, relay).await.is_err() {
        tracing::warn!(
            "outbox not flushed within the shutdown grace; rows stay for the next relay"
        );
    }
    http_shutdown.cancel();
    runtime.publisher.close().await;
    pool.close().await;
    outcome
}
