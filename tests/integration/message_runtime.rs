//! The message runtime under a probe worker: dedupe, retries, dead-lettering,
//! the outbox, reconnection, shutdown and migrations.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use trusted_contact::runtime::{Context, HandlerError, Source, Worker, WorkerSpec, headers};
use trusted_contact_contracts::Envelope;

use crate::support::{TestEnv, eventually};

/// A worker that does nothing but what the runtime tests need: it records
/// what it handled in tables of its own and fails on request.
pub(crate) struct Probe;

pub(crate) const PROBE: WorkerSpec = WorkerSpec {
    name: "probe",
    bindings: &[
        (Source::Commands, "probe.touch"),
        (Source::Commands, "probe.flaky"),
        (Source::Commands, "probe.broken"),
        (Source::Commands, "probe.stubborn"),
        (Source::Internal, "probe.echo"),
    ],
};

#[derive(Serialize, Deserialize)]
struct Key {
    key: String,
}

#[derive(Serialize, Deserialize)]
struct Flaky {
    key: String,
    failures: u32,
}

impl Worker for Probe {
    fn spec(&self) -> WorkerSpec {
        PROBE
    }

    async fn handle(&self, context: &Context, message: &Envelope) -> Result<(), HandlerError> {
        match message.kind.as_str() {
            "probe.touch" => {
                let Key { key } = message.payload_as()?;
                let gated: bool =
                    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM probe_gate WHERE key = $1)")
                        .bind(&key)
                        .fetch_one(&context.pool)
                        .await?;
                if gated {
                    return Err(HandlerError::permanent(anyhow::anyhow!("probe gate is closed")));
                }
                let Some(mut tx) = context.begin(message).await? else { return Ok(()) };
                sqlx::query("INSERT INTO probe_touches (key, message_id) VALUES ($1, $2)")
                    .bind(&key)
                    .bind(message.message_id)
                    .execute(tx.conn())
                    .await?;
                tx.publish_event("probe.touched", &json!({ "key": key }))?;
                tx.send_internal("probe.echo", &json!({ "key": key }))?;
                context.commit(tx).await
            }
            "probe.echo" => {
                let Key { key } = message.payload_as()?;
                let Some(mut tx) = context.begin(message).await? else { return Ok(()) };
                sqlx::query("INSERT INTO probe_echoes (key, message_id) VALUES ($1, $2)")
                    .bind(&key)
                    .bind(message.message_id)
                    .execute(tx.conn())
                    .await?;
                context.commit(tx).await
            }
            "probe.flaky" | "probe.stubborn" => {
                let Flaky { key, failures } = message.payload_as()?;
                // Recorded outside the handler's transaction, which a
                // failure rolls back.
                sqlx::query("INSERT INTO probe_attempts (key, attempt) VALUES ($1, $2)")
                    .bind(&key)
                    .bind(context.attempt as i32)
                    .execute(&context.pool)
                    .await?;
                if message.kind == "probe.stubborn" || context.attempt < failures {
                    return Err(HandlerError::transient(anyhow::anyhow!("probe is flaky")));
                }
                let Some(mut tx) = context.begin(message).await? else { return Ok(()) };
                tx.publish_event("probe.recovered", &json!({ "key": key }))?;
                context.commit(tx).await
            }
            "probe.broken" => Err(HandlerError::permanent(anyhow::anyhow!("probe is broken"))),
            other => Err(HandlerError::permanent(anyhow::anyhow!("unexpected {other}"))),
        }
    }
}

pub(crate) async fn probe_env() -> TestEnv {
    let env = TestEnv::new().await;
    for statement in [
        "CREATE TABLE probe_touches (key text NOT NULL, message_id uuid NOT NULL)",
        "CREATE TABLE probe_gate (key text NOT NULL)",
        "CREATE TABLE probe_echoes (key text NOT NULL, message_id uuid NOT NULL)",
        "CREATE TABLE probe_attempts (key text NOT NULL, attempt int NOT NULL, \
         at timestamptz NOT NULL DEFAULT clock_timestamp())",
    ] {
        sqlx::query(statement).execute(&env.pool).await.unwrap();
    }
    env.declare(&[PROBE]).await;
    env
}

pub(crate) fn start_probe(env: &TestEnv) -> crate::support::InProcess {
    env.serve(|runtime| vec![runtime.spawn_worker(Probe, vec![PROBE])])
}

pub(crate) async fn count(env: &TestEnv, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&env.pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_message_delivered_twice_changes_the_ledger_once() {
    let env = probe_env().await;
    let events = env.tap_events().await;
    let service = start_probe(&env);
    let message = Envelope::new_command("probe.touch", &json!({ "key": "once" })).unwrap();
    env.publish_envelope(&message).await;
    env.publish_envelope(&message).await;
    events.outcome(&message, "probe.touched").await;
    env.wait_queue_drained("probe", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&env, "SELECT count(*) FROM probe_touches").await, 1);
    assert_eq!(events.caused_by(&message).len(), 1);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_delivered_at_once_to_two_consumers_are_handled_once() {
    let env = probe_env().await;
    let first = start_probe(&env);
    let second = start_probe(&env);
    let mut messages = Vec::new();
    for n in 0..200 {
        let message = Envelope::new_command("probe.touch", &json!({ "key": n.to_string() }));
        messages.push(message.unwrap());
    }
    // Each copy right behind its twin, so the two consumers get them at once.
    for message in &messages {
        env.publish_envelope(message).await;
        env.publish_envelope(message).await;
    }
    eventually("200 touches", Duration::from_secs(30), || async {
        count(&env, "SELECT count(*) FROM probe_echoes").await == 200
    })
    .await;
    env.wait_queue_drained("probe", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&env, "SELECT count(*) FROM probe_touches").await, 200);
    assert_eq!(count(&env, "SELECT count(DISTINCT key) FROM probe_touches").await, 200);
    assert_eq!(count(&env, "SELECT count(*) FROM outbox").await, 400);
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_failing_three_times_succeeds_on_the_fourth_delivery_with_growing_delays() {
    let env = probe_env().await;
    let events = env.tap_events().await;
    let service = start_probe(&env);
    let message = env.command("probe.flaky", &json!({ "key": "f", "failures": 3 })).await;
    events.outcome(&message, "probe.recovered").await;
    let rows: Vec<(i32, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT attempt, at FROM probe_attempts ORDER BY at")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let attempts: Vec<i32> = rows.iter().map(|(attempt, _)| *attempt).collect();
    assert_eq!(attempts, vec![0, 1, 2, 3], "the attempt header counts 1, 2, 3 on redeliveries");
    let gaps: Vec<i64> =
        rows.windows(2).map(|pair| (pair[1].1 - pair[0].1).num_milliseconds()).collect();
    assert!(gaps[0] >= 200 && gaps[1] > gaps[0] && gaps[2] > gaps[1], "gaps {gaps:?}");
    assert!(env.dead_letters("probe").await.is_empty());
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_always_fails_transiently_is_dead_lettered_after_the_limit() {
    let env = probe_env().await;
    let service = start_probe(&env);
    let message = env.command("probe.stubborn", &json!({ "key": "s", "failures": 0 })).await;
    let dead = env.wait_dead_letters("probe", 1, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 1);
    let table = dead[0].properties.headers().clone().unwrap();
    assert_eq!(headers::get_u32(&table, headers::ATTEMPTS), Some(5));
    assert_eq!(
        headers::get_str(&table, headers::FAILURE_KIND).as_deref(),
        Some("retries_exhausted")
    );
    assert_eq!(count(&env, "SELECT count(*) FROM probe_attempts").await, 5);
    let id = dead[0].properties.message_id().as_ref().map(|id| id.to_string());
    assert_eq!(id, Some(message.message_id.to_string()));
    service.stop().await;
}

/// Declares the probe's first delay queue with other arguments than the
/// runtime gives it, as an older release or another queue type would have
/// left it: the broker then refuses the runtime's declaration for good.
async fn block_first_delay_queue(env: &TestEnv) {
    let delay_ms = env.settings.retry_base_delay.as_millis() as u64;
    let queue = env.topology().delay_queue("probe", delay_ms);
    env.channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions { durable: true, ..Default::default() },
            Default::default(),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_the_broker_will_not_schedule_is_dead_lettered_not_sent_round_for_ever() {
    let env = probe_env().await;
    block_first_delay_queue(&env).await;
    let events = env.tap_events().await;
    let service = start_probe(&env);
    let flaky = env.command("probe.flaky", &json!({ "key": "f", "failures": 1 })).await;
    let dead = env.wait_dead_letters("probe", 1, Duration::from_secs(10)).await;
    assert_eq!(dead.len(), 1, "parked with its reason");
    let table = dead[0].properties.headers().clone().unwrap();
    let kind = headers::get_str(&table, headers::FAILURE_KIND);
    assert_eq!(kind.as_deref(), Some("retry_unroutable"));
    let text = headers::get_str(&table, headers::ERROR).unwrap();
    assert!(text.contains("probe is flaky") && text.contains("could not be scheduled"), "{text}");
    let id = dead[0].properties.message_id().as_ref().map(|id| id.to_string());
    assert_eq!(id, Some(flaky.message_id.to_string()));
    assert_eq!(count(&env, "SELECT count(*) FROM probe_attempts").await, 1, "not sent round");
    let good = env.command("probe.touch", &json!({ "key": "after" })).await;
    events.outcome(&good, "probe.touched").await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outbox_row_the_broker_will_not_take_does_not_hold_back_the_rows_behind_it() {
    let env = probe_env().await;
    block_first_delay_queue(&env).await;
    let stuck = Envelope::new_command("probe.echo", &json!({ "key": "stuck" })).unwrap();
    sqlx::query(
        "INSERT INTO outbox (message_id, message_type, exchange, routing_key, delay_ms, body) \
         VALUES ($1, 'probe.echo', '', $2, $3, $4)",
    )
    .bind(stuck.message_id)
    .bind(env.topology().worker_queue("probe"))
    .bind(env.settings.retry_base_delay.as_millis() as i64)
    .bind(serde_json::to_vec(&stuck).unwrap())
    .execute(&env.pool)
    .await
    .unwrap();
    let events = env.tap_events().await;
    let service = start_probe(&env);
    for n in 0..3 {
        let touch = env.command("probe.touch", &json!({ "key": format!("behind-{n}") })).await;
        events.outcome(&touch, "probe.touched").await;
    }
    eventually("the echoes behind the stuck row", Duration::from_secs(10), || async {
        count(&env, "SELECT count(*) FROM probe_echoes").await == 3
    })
    .await;
    // The marks commit after the rows' messages went out, so a moment later.
    let unsent = "SELECT count(*) FROM outbox WHERE sent_at IS NULL";
    eventually("every row but the stuck one marked sent", Duration::from_secs(10), || async {
        count(&env, unsent).await == 1
    })
    .await;
    let stuck_row = "SELECT count(*) FROM outbox WHERE sent_at IS NULL AND message_type = 'probe.echo' \
                     AND delay_ms > 0";
    assert_eq!(count(&env, stuck_row).await, 1, "the one waiting is the stuck row");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_messages_are_dead_lettered_with_their_reason_and_the_next_flows() {
    let env = probe_env().await;
    let events = env.tap_events().await;
    let service = start_probe(&env);
    let exchange = env.topology().commands_exchange();
    let unknown = Envelope::new_command("probe.nonsense", &json!({})).unwrap();
    let bad_inputs: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"{ this is not json".to_vec(), "malformed", "not a JSON envelope"),
        (serde_json::to_vec(&unknown).unwrap(), "malformed", "does not handle message type"),
        (
            serde_json::to_vec(&Envelope::new_command("probe.broken", &json!({})).unwrap())
                .unwrap(),
            "permanent",
            "probe is broken",
        ),
    ];
    for (n, (body, kind, error)) in bad_inputs.into_iter().enumerate() {
        let routing_key = if kind == "permanent" { "probe.broken" } else { "probe.touch" };
        let properties = lapin::BasicProperties::default().with_delivery_mode(2);
        let sent_at = chrono::Utc::now();
        env.publish_raw(&exchange, routing_key, &body, properties).await;
        let dead = env.wait_dead_letters("probe", 1, Duration::from_secs(1)).await;
        assert_eq!(dead.len(), 1, "input {n} was not dead-lettered within one second");
        let table = dead[0].properties.headers().clone().unwrap();
        assert_eq!(dead[0].data, body, "the body is kept as it came");
        assert_eq!(headers::get_str(&table, headers::WORKER).as_deref(), Some("probe"));
        assert_eq!(headers::get_str(&table, headers::FAILURE_KIND).as_deref(), Some(kind));
        assert!(headers::get_str(&table, headers::ERROR).unwrap().contains(error));
        assert_eq!(headers::get_u32(&table, headers::ATTEMPTS), Some(1));
        assert_eq!(headers::get_str(&table, headers::ORIGINAL_EXCHANGE), Some(exchange.clone()));
        assert_eq!(
            headers::get_str(&table, headers::ORIGINAL_ROUTING_KEY).as_deref(),
            Some(routing_key)
        );
        for header in [headers::FIRST_FAILURE_AT, headers::LAST_FAILURE_AT] {
            let at = headers::get_str(&table, header).unwrap();
            let at = chrono::DateTime::parse_from_rfc3339(&at).unwrap();
            assert!(at >= sent_at - chrono::Duration::seconds(1));
        }
        let good = env.command("probe.touch", &json!({ "key": format!("after-{n}") })).await;
        events.outcome(&good, "probe.touched").await;
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_whose_route_does_not_fit_its_type_is_dead_lettered_unhandled() {
    let env = probe_env().await;
    let events = env.tap_events().await;
    let service = start_probe(&env);
    let exchange = env.topology().commands_exchange();
    // An internal message sent as a command, and a command under another
    // command's routing key: both bound to the probe's queue, neither fits.
    let internal = Envelope::new_command("probe.echo", &json!({ "key": "forged" })).unwrap();
    let misrouted = Envelope::new_command("probe.touch", &json!({ "key": "misrouted" })).unwrap();
    for (envelope, routing_key, error) in [
        (&internal, "probe.touch", "does not handle message type"),
        (&misrouted, "probe.flaky", "does not match message type"),
    ] {
        let body = serde_json::to_vec(envelope).unwrap();
        let properties = lapin::BasicProperties::default().with_delivery_mode(2);
        env.publish_raw(&exchange, routing_key, &body, properties).await;
        let dead = env.wait_dead_letters("probe", 1, Duration::from_secs(5)).await;
        assert_eq!(dead.len(), 1, "{} under {routing_key} was not dead-lettered", envelope.kind);
        let table = dead[0].properties.headers().clone().unwrap();
        assert_eq!(headers::get_str(&table, headers::FAILURE_KIND).as_deref(), Some("malformed"));
        let text = headers::get_str(&table, headers::ERROR).unwrap();
        assert!(text.contains(error), "{text}");
    }
    let good = env.command("probe.touch", &json!({ "key": "after" })).await;
    events.outcome(&good, "probe.touched").await;
    assert_eq!(count(&env, "SELECT count(*) FROM probe_echoes WHERE key = 'forged'").await, 0);
    let misrouted_touches = "SELECT count(*) FROM probe_touches WHERE key = 'misrouted'";
    assert_eq!(count(&env, misrouted_touches).await, 0);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_type_the_worker_does_not_handle_is_counted_as_other_not_as_a_new_metric() {
    let env = probe_env().await;
    let service = start_probe(&env);
    let invented = format!("probe.invented-{}", uuid::Uuid::new_v4().simple());
    let properties = lapin::BasicProperties::default().with_type(invented.as_str().into());
    let exchange = env.topology().commands_exchange();
    env.publish_raw(&exchange, "probe.touch", b"not json", properties).await;
    assert_eq!(env.wait_dead_letters("probe", 1, Duration::from_secs(5)).await.len(), 1);
    service.stop().await;
    let metrics = trusted_contact::runtime::metrics::METRICS.encode();
    assert!(!metrics.contains(&invented), "a sender's type became a label");
    let other = r#"worker="probe",message_type="other",kind="malformed""#;
    assert!(metrics.contains(other), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_header_names_the_bad_field_without_quoting_its_value() {
    let env = probe_env().await;
    let service = start_probe(&env);
    // A phone where the probe expects a string key: serde's error quotes it.
    env.command("probe.touch", &json!({ "key": 79001234567_u64 })).await;
    let dead = env.wait_dead_letters("probe", 1, Duration::from_secs(5)).await;
    assert_eq!(dead.len(), 1);
    let table = dead[0].properties.headers().clone().unwrap();
    let text = headers::get_str(&table, headers::ERROR).unwrap();
    assert!(text.contains("payload of probe.touch is invalid"), "{text}");
    assert!(text.contains("expected a string"), "{text}");
    assert!(!text.contains("79001234567") && !text.contains("1234567"), "{text}");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_confirmed_row_whose_sent_mark_was_lost_goes_out_again_and_is_ignored() {
    let env = probe_env().await;
    let echoes = env.tap_internal("probe.echo").await;
    let service = start_probe(&env);
    env.command("probe.touch", &json!({ "key": "outbox" })).await;
    eventually("the echo handled", Duration::from_secs(10), || async {
        count(&env, "SELECT count(*) FROM probe_echoes").await == 1
    })
    .await;
    // The crash between the broker's confirm and the commit of the mark.
    sqlx::query("UPDATE outbox SET sent_at = NULL WHERE message_type = 'probe.echo'")
        .execute(&env.pool)
        .await
        .unwrap();
    let seen = echoes
        .wait_until("the echo published twice", Duration::from_secs(10), |seen| seen.len() == 2)
        .await;
    assert_eq!(seen[0].message_id, seen[1].message_id, "the repeat keeps its message_id");
    eventually("the row marked sent again", Duration::from_secs(10), || async {
        count(&env, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await == 0
    })
    .await;
    env.wait_queue_drained("probe", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&env, "SELECT count(*) FROM probe_echoes").await, 1);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn closing_the_broker_connections_mid_stream_loses_nothing_and_doubles_nothing() {
    let env = probe_env().await;
    let service = start_probe(&env);
    let publisher = async {
        for n in 0..1000 {
            env.command("probe.touch", &json!({ "key": n.to_string() })).await;
        }
    };
    let breaker = async {
        eventually("300 handled", Duration::from_secs(60), || async {
            count(&env, "SELECT count(*) FROM probe_touches").await >= 300
        })
        .await;
        let closed = env.close_service_connections().await;
        assert!(closed >= 1, "no service connection found to close");
    };
    tokio::join!(publisher, breaker);
    eventually("1000 echoes", Duration::from_secs(90), || async {
        count(&env, "SELECT count(*) FROM probe_echoes").await >= 1000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&env, "SELECT count(*) FROM probe_touches").await, 1000);
    assert_eq!(count(&env, "SELECT count(DISTINCT key) FROM probe_touches").await, 1000);
    assert_eq!(count(&env, "SELECT count(*) FROM probe_echoes").await, 1000);
    assert!(!service.handle.is_finished(), "the worker keeps going without a restart");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_works_on_an_empty_database_and_again_on_a_migrated_one() {
    let env = TestEnv::new().await;
    let database = format!("{}_fresh", env.database);
    let url = format!("{}/{database}", crate::support::PG_SERVER);
    for run in 0..2 {
        let output =
            env.binary_command(&["migrate"]).env("TC_DATABASE_URL", &url).output().await.unwrap();
        assert!(output.status.success(), "migrate run {run} failed: {:?}", output);
    }
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE \"{database}\" WITH (FORCE)")))
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(applied, std::fs::read_dir("../migrations").unwrap().count() as i64);
}
