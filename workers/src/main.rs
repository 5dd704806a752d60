//! `trusted-contact`: one binary for every worker and every tool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use trusted_contact::{
    app,
    app::WorkerName,
    bench::{self, BenchOptions},
    demo::{self, DemoOptions},
    dlq::{DeadLetters, Selection},
    ledger,
    loadgen::{self, LoadOptions},
    runtime::broker,
    settings::Settings,
    sms::gateway::GatewayConfig,
    telemetry,
};
use trusted_contact_contracts::names::UNROUTED;

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
        /// Also serve the stand-in SMS gateway on this port, so that one
        /// command brings up the whole system on a developer's machine.
        #[arg(long, value_name = "PORT")]
        with_sms_gateway: Option<u16>,
    },
    /// Run the stand-in SMS gateway (for the demo, Compose and tests) until
    /// SIGTERM or SIGINT.
    SmsGateway(GatewayConfig),
    /// Walk through the service against the running system, step by step.
    Demo {
        /// Where the stand-in SMS gateway answers (to read the code).
        #[arg(long, env = "TC_SMS_GATEWAY_URL", default_value = "http://127.0.0.1:8090")]
        gateway_url: String,
        /// How long each step may wait for its event.
        #[arg(long, default_value_t = 10)]
        step_timeout_secs: u64,
    },
    /// Seed citizens, publish a realistic mix of portal commands at a rate,
    /// match each to its outcome and report throughput and latency.
    Loadgen(LoadOptions),
    /// Measure the machine's limits, then the system's throughput against
    /// them.
    Bench(BenchOptions),
    /// The message catalogue for the portal's clients in other languages.
    Contracts {
        #[command(subcommand)]
        action: ContractsAction,
    },
    /// Delete every queue and exchange of this TC_TOPOLOGY_PREFIX (scratch
    /// environments: load runs, smoke tests). Refuses without a prefix.
    Teardown,
    /// Inspect, export, replay and purge the dead-letter queues.
    Dlq {
        /// Whose dead-letter queues (repeatable): a worker, or `unrouted` for
        /// commands no worker is bound to; all of them by default.
        #[arg(long = "worker", global = true)]
        workers: Vec<String>,
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Subcommand)]
enum ContractsAction {
    /// Write a JSON Schema of every command and event envelope, keyed by
    /// exchange ("commands", "events") and message type.
    Schema {
        /// A file to write; stdout when absent.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Per queue, the count and a line per message.
    List {
        /// One JSON object per message instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// One message's headers and body, phones masked.
    Show { message_id: String },
    /// Every message as JSON lines (masked like `show`) to a file or stdout.
    Export {
        /// A file to write; stdout when absent or `-`.
        #[arg(long)]
        output: Option<std::path::PathBuf>,
    },
    /// Send messages back to where they were first published.
    Replay {
        /// Only these message ids (repeatable).
        #[arg(long = "id")]
        ids: Vec<String>,
        /// Only messages of this type.
        #[arg(long = "type")]
        message_type: Option<String>,
        /// Only messages whose error text contains this.
        #[arg(long)]
        error_contains: Option<String>,
        /// Messages per second.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
    },
    /// Delete every message of the selected queues.
    Purge {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
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
    // The stand-in needs neither the broker nor the ledger, so it does not
    // read their settings.
    if let Command::Contracts { action: ContractsAction::Schema { output } } = &command {
        let schema = serde_json::to_string_pretty(&trusted_contact_contracts::json_schemas())?;
        match output {
            Some(path) => std::fs::write(path, schema)?,
            None => println!("{schema}"),
        }
        return Ok(());
    }
    if let Command::SmsGateway(config) = command {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        return trusted_contact::sms::gateway::run(config, shutdown.cancelled_owned()).await;
    }
    let settings = Settings::from_env()?;
    match command {
        Command::Migrate => {
            let pool = ledger::connect(&settings).await?;
            ledger::migrate(&pool).await?;
            tracing::info!("ledger migrated");
            Ok(())
        }
        Command::Run { workers, with_sms_gateway } => {
            let workers = parse_workers(&workers)?;
            let shutdown = CancellationToken::new();
            tokio::spawn(stop_on_signal(shutdown.clone()));
            if let Some(port) = with_sms_gateway {
                // On loopback only: its /control endpoint has no credentials.
                let config = GatewayConfig {
                    port,
                    host: std::net::Ipv4Addr::LOCALHOST.into(),
                    ..GatewayConfig::default()
                };
                let stopped = shutdown.clone().cancelled_owned();
                tokio::spawn(async move {
                    if let Err(error) = trusted_contact::sms::gateway::run(config, stopped).await {
                        tracing::error!(error = format!("{error:#}"), "the SMS gateway stopped");
                    }
                });
            }
            app::run(settings, &workers, shutdown).await
        }
        Command::Demo { gateway_url, step_timeout_secs } => {
            let options = DemoOptions {
                gateway_url,
                step_timeout: std::time::Duration::from_secs(step_timeout_secs),
            };
            demo::run(&settings, &options).await
        }
        Command::Loadgen(options) => loadgen::run_and_judge(&settings, options).await,
        Command::Bench(options) => bench::run(&settings, options).await,
        Command::SmsGateway(_) | Command::Contracts { .. } => Ok(()),
        Command::Teardown => teardown(&settings).await,
        Command::Dlq { workers, action } => dead_letters(settings, workers, action).await,
    }
}

async fn dead_letters(
    settings: Settings,
    workers: Vec<String>,
    action: DlqAction,
) -> anyhow::Result<()> {
    let workers = if workers.is_empty() {
        let every = WorkerName::ALL.iter().map(|worker| worker.spec().name);
        every.chain([UNROUTED]).map(str::to_owned).collect()
    } else {
        // `unrouted` names the queue of commands no worker is bound to.
        let (unrouted, named): (Vec<_>, Vec<_>) =
            workers.into_iter().partition(|name| name == UNROUTED);
        // A typo would otherwise read as an empty dead-letter queue.
        let named = parse_workers(&named)?.into_iter().map(|worker| worker.spec().name);
        named.map(str::to_owned).chain(unrouted.into_iter().take(1)).collect()
    };
    let tool = DeadLetters::connect(&settings, workers).await?;
    let result = dead_letter_action(&tool, action).await;
    tool.close().await;
    result
}

async fn dead_letter_action(tool: &DeadLetters, action: DlqAction) -> anyhow::Result<()> {
    match action {
        DlqAction::List { json } => {
            let letters = tool.list().await?;
            if json {
                for letter in &letters {
                    println!("{}", serde_json::to_string(letter)?);
                }
                return Ok(());
            }
            for (queue, count) in tool.counts().await? {
                println!("{queue}: {count} message(s)");
                for letter in letters.iter().filter(|letter| letter.queue == queue) {
                    println!(
                        "  {}  {}  worker={}  attempts={}  first={}  last={}\n    error: {}",
                        letter.message_id.as_deref().unwrap_or("-"),
                        letter.message_type.as_deref().unwrap_or("-"),
                        letter.worker.as_deref().unwrap_or("-"),
                        letter.attempts.unwrap_or(0),
                        letter.first_failure_at.as_deref().unwrap_or("-"),
                        letter.last_failure_at.as_deref().unwrap_or("-"),
                        letter.error.as_deref().unwrap_or("-"),
                    );
                }
            }
            Ok(())
        }
        DlqAction::Show { message_id } => match tool.show(&message_id).await? {
            Some(view) => {
                println!("{}", serde_json::to_string_pretty(&view)?);
                Ok(())
            }
            None => anyhow::bail!("no dead letter with message id {message_id}"),
        },
        DlqAction::Export { output } => {
            let count = match output.filter(|path| path.as_os_str() != "-") {
                Some(path) => {
                    let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
                    tool.export(&mut file).await?
                }
                None => tool.export(&mut std::io::stdout().lock()).await?,
            };
            eprintln!("exported {count} dead letter(s)");
            Ok(())
        }
        DlqAction::Replay { ids, message_type, error_contains, rate } => {
            let selection = Selection { ids, message_type, worker: None, error_contains };
            let report = tool.replay(&selection, rate, true).await?;
            println!("replayed {}, left in place {}", report.replayed, report.skipped);
            Ok(())
        }
        DlqAction::Purge { yes } => {
            let counts = tool.counts().await?;
            let total: u32 = counts.values().sum();
            if !yes {
                eprint!("Delete {total} dead letter(s) from {} queue(s)? Type yes: ", counts.len());
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if answer.trim() != "yes" {
                    anyhow::bail!("purge cancelled");
                }
            }
            println!("purged {}", tool.purge().await?);
            Ok(())
        }
    }
}

async fn teardown(settings: &Settings) -> anyhow::Result<()> {
    if settings.topology.prefix().is_empty() {
        anyhow::bail!("teardown only deletes a prefixed topology; set TC_TOPOLOGY_PREFIX");
    }
    let connection = broker::connect(settings, "teardown").await?;
    let channel = connection.create_channel().await?;
    broker::delete_topology(&channel, &settings.topology, &app::service_topology()).await?;
    // Delay queues are named by their delay and expire on their own; where
    // rabbitmqctl is at hand, they go now too.
    if let Ok(listing) =
        std::process::Command::new("rabbitmqctl").args(["-q", "list_queues", "name"]).output()
    {
        let names = String::from_utf8_lossy(&listing.stdout);
        for name in names.lines().map(str::trim) {
            if name.starts_with(settings.topology.prefix()) {
                let options = lapin::options::QueueDeleteOptions::default();
                channel.queue_delete(name.into(), options).await?;
            }
        }
    }
    let _ = connection.close(200, "torn down".into()).await;
    println!("deleted the queues and exchanges of prefix {}", settings.topology.prefix());
    Ok(())
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
