//! The operators' dead-letter tool against a probe worker's dead-letter queue.

use std::time::Duration;

use serde_json::json;
use trusted_contact::dlq::{DeadLetters, Selection};
use trusted_contact_contracts::Envelope;

use crate::{
    message_runtime::{count, probe_env, start_probe},
    support::eventually,
};

#[tokio::test(flavor = "multi_thread")]
async fn replaying_one_type_at_a_pace_handles_each_once_and_leaves_the_others() {
    let env = probe_env().await;
    let service = start_probe(&env);
    // Ten touches fail while their gate is closed, ten messages always fail.
    for n in 0..10 {
        sqlx::query("INSERT INTO probe_gate (key) VALUES ($1)")
            .bind(format!("gated-{n}"))
            .execute(&env.pool)
            .await
            .unwrap();
        env.command("probe.touch", &json!({ "key": format!("gated-{n}") })).await;
        env.command("probe.broken", &json!({})).await;
    }
    let tool = DeadLetters::connect(&env.settings, vec!["probe".into()]).await.unwrap();
    eventually("20 dead letters", Duration::from_secs(20), || async {
        tool.counts().await.unwrap().values().sum::<u32>() == 20
    })
    .await;

    let listed = tool.list().await.unwrap();
    assert_eq!(listed.len(), 20);
    assert_eq!(
        listed.iter().filter(|l| l.message_type.as_deref() == Some("probe.touch")).count(),
        10
    );
    assert!(listed.iter().all(|l| l.worker.as_deref() == Some("probe") && l.error.is_some()));
    assert_eq!(tool.counts().await.unwrap().values().sum::<u32>(), 20, "listing removes nothing");

    sqlx::query("DELETE FROM probe_gate").execute(&env.pool).await.unwrap();
    let selection = Selection { message_type: Some("probe.touch".into()), ..Selection::default() };
    let started = std::time::Instant::now();
    let report = tool.replay(&selection, 20.0, false).await.unwrap();
    assert_eq!((report.replayed, report.skipped), (10, 10));
    // Ten messages at 20 a second: the first goes at once, the last after
    // nine pauses of 50 ms.
    assert!(started.elapsed() >= Duration::from_millis(450), "replay was not paced");
    eventually("ten touches handled", Duration::from_secs(10), || async {
        count(&env, "SELECT count(*) FROM probe_touches").await == 10
    })
    .await;
    let remaining = tool.list().await.unwrap();
    assert_eq!(remaining.len(), 10);
    assert!(remaining.iter().all(|l| l.message_type.as_deref() == Some("probe.broken")));

    // A copy of an already-handled message, dead-lettered and replayed,
    // changes nothing.
    let handled = Envelope::new_command("probe.touch", &json!({ "key": "handled" })).unwrap();
    env.publish_envelope(&handled).await;
    eventually("the message handled", Duration::from_secs(10), || async {
        count(&env, "SELECT count(*) FROM probe_touches").await == 11
    })
    .await;
    let dead_queue = env.topology().dead_letter_queue("probe");
    let mut table = lapin::types::FieldTable::default();
    let headers = trusted_contact::runtime::headers::ORIGINAL_EXCHANGE;
    trusted_contact::runtime::headers::set_str(
        &mut table,
        headers,
        env.topology().commands_exchange(),
    );
    trusted_contact::runtime::headers::set_str(
        &mut table,
        trusted_contact::runtime::headers::ORIGINAL_ROUTING_KEY,
        "probe.touch",
    );
    let properties = trusted_contact::runtime::message::properties_for(
        handled.message_id,
        "probe.touch",
        None,
        None,
        handled.occurred_at,
    )
    .with_headers(table);
    env.publish_raw("", &dead_queue, &serde_json::to_vec(&handled).unwrap(), properties).await;
    let by_id = Selection { ids: vec![handled.message_id.to_string()], ..Selection::default() };
    assert_eq!(tool.replay(&by_id, 50.0, false).await.unwrap().replayed, 1);
    env.wait_queue_drained("probe", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&env, "SELECT count(*) FROM probe_touches").await, 11);
    assert_eq!(tool.list().await.unwrap().len(), 10);
    tool.close().await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_no_worker_is_bound_to_lands_in_the_unrouted_queue_with_its_route() {
    let env = probe_env().await;
    let events = env.tap_events().await;
    let service = start_probe(&env);
    let unheard = Envelope::new_command("probe.unheard", &json!({ "key": "lost?" })).unwrap();
    env.publish_envelope(&unheard).await;
    let tool =
        DeadLetters::connect(&env.settings, vec!["probe".into(), "unrouted".into()]).await.unwrap();
    eventually("the unrouted command kept", Duration::from_secs(5), || async {
        tool.counts().await.unwrap().values().sum::<u32>() == 1
    })
    .await;

    let listed = tool.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    let letter = &listed[0];
    assert_eq!(letter.queue, env.topology().dead_letter_queue("unrouted"));
    assert_eq!(letter.message_id, Some(unheard.message_id.to_string()));
    assert_eq!(letter.worker.as_deref(), Some("unrouted"));
    assert!(letter.error.as_deref().is_some_and(|e| e.contains("probe.unheard")), "{letter:?}");
    let commands = env.topology().commands_exchange();
    assert_eq!(letter.original_exchange.as_deref(), Some(commands.as_str()));
    assert_eq!(letter.original_routing_key.as_deref(), Some("probe.unheard"));

    // A replay sends it the same way, and it comes back counted.
    let by_id = Selection { ids: vec![unheard.message_id.to_string()], ..Selection::default() };
    assert_eq!(tool.replay(&by_id, 50.0, false).await.unwrap().replayed, 1);
    eventually("the replayed command back", Duration::from_secs(5), || async {
        tool.list().await.unwrap().first().is_some_and(|letter| letter.replays == 1)
    })
    .await;
    let good = env.command("probe.touch", &json!({ "key": "after" })).await;
    events.outcome(&good, "probe.touched").await;
    assert_eq!(count(&env, "SELECT count(*) FROM probe_touches").await, 1);
    tool.close().await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_keeps_the_shape_of_a_body_that_is_not_json_without_its_numbers() {
    let env = probe_env().await;
    let service = start_probe(&env);
    let exchange = env.topology().commands_exchange();
    let body = b"hello from a broken client, call +79001234567".to_vec();
    let properties = lapin::BasicProperties::default().with_delivery_mode(2);
    env.publish_raw(&exchange, "probe.touch", &body, properties).await;
    let tool = DeadLetters::connect(&env.settings, vec!["probe".into()]).await.unwrap();
    eventually("the broken body dead-lettered", Duration::from_secs(5), || async {
        tool.counts().await.unwrap().values().sum::<u32>() == 1
    })
    .await;
    let mut exported = Vec::new();
    assert_eq!(tool.export(&mut exported).await.unwrap(), 1);
    let line: serde_json::Value = serde_json::from_slice(&exported).unwrap();
    let text = line["body"]["redacted_text"].as_str().unwrap();
    assert!(text.starts_with("hello from a broken client, call +"), "{text}");
    assert!(!String::from_utf8_lossy(&exported).contains("79001234567"));
    assert_eq!(line["body"]["not_json_bytes"], json!(body.len()));
    tool.close().await;
    service.stop().await;
}
