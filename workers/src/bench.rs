//! `trusted-contact bench`: measures this machine's own limits, then the
//! system's sustained throughput on the same machine in the same run, and
//! prints the system's figures as a share of those limits. The limits are a
//! ledger-shaped PostgreSQL transaction (inbox insert, state change, outbox
//! insert) and RabbitMQ persistent publish-with-confirm and consume-with-ack.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::StreamExt;
use lapin::{
    BasicProperties,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use sqlx::{Executor, PgPool};
use uuid::Uuid;

use crate::{
    loadgen::{self, LoadOptions},
    runtime::broker,
    settings::{Secret, Settings},
};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Seconds for each of the machine's limits.
    #[arg(long, default_value_t = 10)]
    pub limit_secs: u64,
    /// Concurrent database sessions for the ledger-shaped transactions.
    #[arg(long, default_value_t = 8)]
    pub sessions: usize,
    /// Skip the system run (limits only).
    #[arg(long)]
    pub limits_only: bool,
    #[command(flatten)]
    pub load: LoadOptions,
}

pub async fn run(settings: &Settings, options: BenchOptions) -> anyhow::Result<()> {
    let window = Duration::from_secs(options.limit_secs);
    println!("Measuring this machine's limits, {} s each…", options.limit_secs);
    let ledger_tps = ledger_transactions(settings, window, options.sessions).await?;
    println!("  PostgreSQL, ledger-shaped transactions: {ledger_tps:>9.0} per second");
    let (publish_rate, consume_rate) = broker_rates(settings, window).await?;
    println!("  RabbitMQ, persistent publish with confirm: {publish_rate:>6.0} per second");
    println!("  RabbitMQ, consume with ack:                {consume_rate:>6.0} per second");
    if options.limits_only {
        return Ok(());
    }
    println!("\nRunning the system: {:?} at {} flows/s…", options.load.scenario, options.load.rate);
    let report = loadgen::run(settings, options.load.clone()).await?;
    println!("{}", report.summary());
    // Each invitation flow costs the system at least: one ledger transaction
    // in the invitation worker, two in the SMS worker, and the outbox marks;
    // on the broker, the command, the SMS request and the events.
    let flows = report.flows_per_sec;
    println!("System against the machine's limits:");
    println!(
        "  {flows:.0} flows/s = {:.1}% of the ledger's transaction rate (at ≥3 transactions \
         a flow: {:.1}%)",
        100.0 * flows / ledger_tps,
        300.0 * flows / ledger_tps
    );
    println!(
        "  {:.0} commands/s = {:.1}% of the broker's confirmed publish rate",
        report.commands_per_sec,
        100.0 * report.commands_per_sec / publish_rate
    );
    println!(
        "  p99 end-to-end latency {:.1} ms; {} lost",
        report.all_commands.p99_ms,
        report.lost.len()
    );
    Ok(())
}

/// Transactions shaped like a handler's: inbox insert, state upsert, outbox
/// insert, commit; in a scratch database that is dropped afterwards.
async fn ledger_transactions(
    settings: &Settings,
    window: Duration,
    sessions: usize,
) -> anyhow::Result<f64> {
    let scratch = format!("tc_bench_{}", Uuid::new_v4().simple());
    let url = settings.database_url.expose();
    let base = url.rsplit_once('/').map(|(base, _)| base).unwrap_or(url);
    let mut scratch_settings = settings.clone();
    scratch_settings.database_url = Secret::new(format!("{base}/{scratch}"));
    scratch_settings.database_pool_size = sessions as u32 + 1;
    let pool = crate::ledger::connect(&scratch_settings).await?;
    pool.execute(
        "CREATE TABLE inbox (consumer text, message_id uuid, PRIMARY KEY (consumer, message_id));
         CREATE TABLE state (id uuid PRIMARY KEY, status text, changed_at timestamptz);
         CREATE TABLE outbox (id bigserial PRIMARY KEY, message_id uuid UNIQUE, body bytea,
                              sent_at timestamptz);",
    )
    .await?;
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + window;
    let body = vec![b'x'; 400];
    let mut tasks = Vec::new();
    for _ in 0..sessions {
        let (pool, done, body) = (pool.clone(), done.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                if ledger_shaped(&pool, &body).await.is_ok() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let started = Instant::now();
    for task in tasks {
        let _ = task.await;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    pool.close().await;
    let admin = PgPool::connect(&format!("{base}/postgres")).await?;
    let drop = format!("DROP DATABASE IF EXISTS \"{scratch}\" WITH (FORCE)");
    sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&admin).await?;
    admin.close().await;
    Ok(rate)
}

async fn ledger_shaped(pool: &PgPool, body: &[u8]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO inbox VALUES ('bench', $1)")
        .bind(Uuid::new_v4())
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO state VALUES ($1, 'pending', now()) \
         ON CONFLICT (id) DO UPDATE SET status = 'sent', changed_at = now()",
    )
    .bind(Uuid::new_v4())
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO outbox (message_id, body) VALUES ($1, $2)")
        .bind(Uuid::new_v4())
        .bind(body)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Persistent messages of an event's size into a durable scratch queue with
/// confirms (a window of outstanding confirms, as the relay publishes), then
/// consumed back with one ack each.
async fn broker_rates(settings: &Settings, window: Duration) -> anyhow::Result<(f64, f64)> {
    let connection = broker::connect(settings, "bench").await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let queue = format!("{}trusted_contact.bench.{}", settings.topology.prefix(), Uuid::new_v4());
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(queue.as_str().into(), durable, FieldTable::default()).await?;
    let body = vec![b'x'; 500];
    let properties = BasicProperties::default().with_delivery_mode(2);
    let started = Instant::now();
    let mut published = 0u64;
    while started.elapsed() < window {
        let mut confirms = Vec::with_capacity(256);
        for _ in 0..256 {
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties.clone(),
                )
                .await?;
            confirms.push(confirm);
        }
        for confirm in confirms {
            confirm.await.context("no confirm")?;
            published += 1;
        }
    }
    let publish_rate = published as f64 / started.elapsed().as_secs_f64();

    let consumer_channel = connection.create_channel().await?;
    consumer_channel.basic_qos(256, BasicQosOptions::default()).await?;
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let mut consumed = 0u64;
    while consumed < published && started.elapsed() < window * 2 {
        let Some(delivery) = consumer.next().await else { break };
        delivery?.ack(BasicAckOptions::default()).await?;
        consumed += 1;
    }
    let consume_rate = consumed as f64 / started.elapsed().as_secs_f64();
    channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
    let _ = connection.close(200, "bench done".into()).await;
    Ok((publish_rate, consume_rate))
}
