//! The workers this program can run, by name, and the process that runs a
//! chosen set of them until SIGTERM or SIGINT.

use std::str::FromStr;

use anyhow::bail;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    invitations::{INVITATIONS, InvitationSettings, Invitations},
    ledger,
    runtime::{Runtime, WorkerSpec, health},
    settings::Settings,
    sms::{SmsSettings, SmsWorker},
    sweeper::{self, SWEEPER, Sweeper, SweeperSettings},
};

/// Every worker of the service, in the order `all` starts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerName {
    Invitations,
    Sweeper,
    Sms,
}

impl WorkerName {
    pub const ALL: &'static [WorkerName] =
        &[WorkerName::Invitations, WorkerName::Sweeper, WorkerName::Sms];

    pub fn spec(self) -> WorkerSpec {
        match self {
            WorkerName::Invitations => INVITATIONS,
            WorkerName::Sweeper => SWEEPER,
            WorkerName::Sms => crate::sms::worker::SPEC,
        }
    }
}

impl FromStr for WorkerName {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "invitations" => Ok(WorkerName::Invitations),
            "sweeper" => Ok(WorkerName::Sweeper),
            crate::sms::SMS_WORKER => Ok(WorkerName::Sms),
            _ => bail!("unknown worker `{name}`"),
        }
    }
}

/// The sweeper is a consumer of its deadline queue plus the periodic sweep
/// of the ledger; both stop with the runtime.
pub fn spawn_sweeper(
    runtime: &Runtime,
    settings: SweeperSettings,
) -> Vec<JoinHandle<anyhow::Result<()>>> {
    let sweeps = tokio::spawn(sweeper::run_sweeps(
        runtime.pool.clone(),
        runtime.publisher.clone(),
        runtime.settings.topology.clone(),
        settings,
        runtime.shutdown_token(),
    ));
    vec![runtime.spawn_worker(Sweeper, service_topology()), sweeps]
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
    // Each worker's own settings are read before anything starts, so a bad
    // variable stops the process at once instead of after it connected.
    let mut sms = None;
    if workers.contains(&WorkerName::Sms) {
        let sms_settings = SmsSettings::from_env()?;
        sms = Some(SmsWorker::from_settings(&sms_settings, settings.retry_limit)?);
    }
    let workers = workers.to_vec();
    let invitation_settings = InvitationSettings::from_env()?;
    let sweeper_settings = SweeperSettings::from_env()?;
    serve(settings, shutdown, move |runtime| {
        let topology = service_topology();
        let mut handles = Vec::new();
        for name in workers {
            match name {
                WorkerName::Invitations => handles.push(runtime.spawn_worker(
                    Invitations { settings: invitation_settings.clone() },
                    topology.clone(),
                )),
                WorkerName::Sweeper => {
                    handles.extend(spawn_sweeper(runtime, sweeper_settings.clone()))
                }
                WorkerName::Sms => {
                    if let Some(worker) = sms.take() {
                        handles.push(runtime.spawn_worker(worker, topology.clone()));
                    }
                }
            }
        }
        handles
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
