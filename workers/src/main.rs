//! `trusted-contact`: one binary for every worker and every tool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use trusted_contact::{
    app, app::WorkerName, ledger, settings::Settings, sms::gateway::GatewayConfig, telemetry,
};

#[derive(Parser)]
#[command(name = "trusted-contact", version, about = "Trusted Contact back end")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the ledger database if needed and apply every migration.
    Migrate,
    /// Run workers until SIGTERM or SIGINT.
    Run {
        /// Worker names, or `all` for every worker in this process.
        #[arg(long = "worker", required = true, num_args = 1..)]
        workers: Vec<String>,
    },
    /// Run the stand-in SMS gateway (for the demo, Compose and tests) until
    /// SIGTERM or SIGINT.
    SmsGateway(GatewayConfig),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "stopped with an error");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            let settings = Settings::from_env()?;
            let pool = ledger::connect(&settings).await?;
            ledger::migrate(&pool).await?;
            tracing::info!("ledger migrated");
            Ok(())
        }
        Command::Run { workers } => {
            let settings = Settings::from_env()?;
            let workers = parse_workers(&workers)?;
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            app::run(settings, &workers, shutdown).await
        }
        // The stand-in needs neither the broker nor the ledger, so it does
        // not read their settings.
        Command::SmsGateway(config) => {
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            trusted_contact::sms::gateway::run(config, shutdown.cancelled_owned()).await
        }
    }
}

fn parse_workers(names: &[String]) -> anyhow::Result<Vec<WorkerName>> {
    if names.iter().any(|name| name == "all") {
        return Ok(WorkerName::ALL.to_vec());
    }
    let mut workers = Vec::new();
    for name in names {
        let worker: WorkerName = name.parse()?;
        if !workers.contains(&worker) {
            workers.push(worker);
        }
    }
    Ok(workers)
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut interrupt)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot listen for SIGTERM and SIGINT; stop the process with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, stopping"),
        _ = interrupt.recv() => tracing::info!("SIGINT received, stopping"),
    }
    shutdown.cancel();
}
