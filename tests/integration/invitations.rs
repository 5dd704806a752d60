//! The invitation dispatch and expiry sweeping workers: eligibility, finding
//! the contact, replacing and limiting invitations, concurrent acceptances,
//! deadlines, disconnection, and commands delivered twice.

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use chrono::{Months, NaiveDate, Utc};
use serde_json::{Value, json};
use trusted_contact::{
    app,
    invitations::{InvitationSettings, Invitations},
    runtime::message::properties_of,
    sweeper::{self, SweeperSettings},
};
use trusted_contact_contracts::{Envelope, moscow_today};
use uuid::Uuid;

use crate::support::{EventTap, InProcess, TestEnv, eventually};

const WAIT: Duration = Duration::from_secs(15);

static PHONES: AtomicU32 = AtomicU32::new(1);

/// A phone no other person in this test binary has.
fn fresh_phone() -> String {
    format!("+79{:09}", PHONES.fetch_add(1, Ordering::Relaxed))
}

fn today() -> NaiveDate {
    moscow_today(Utc::now())
}

fn years_ago(years: u32) -> NaiveDate {
    today().checked_sub_months(Months::new(years * 12)).unwrap()
}

/// A profile that may take part on either side; tests break one rule at a time.
#[derive(Clone)]
struct Person {
    first: String,
    last: String,
    birth: NaiveDate,
    citizenship: String,
    verified: bool,
    passport: bool,
    phone: Option<String>,
}

fn adult(first: &str) -> Person {
    Person {
        first: first.to_owned(),
        last: "Петрова".to_owned(),
        birth: years_ago(30),
        citizenship: "RU".to_owned(),
        verified: true,
        passport: true,
        phone: Some(fresh_phone()),
    }
}

async fn seed(env: &TestEnv, person: &Person) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO accounts (account_id, first_name, last_name, birth_date, citizenship, \
                               verified, has_passport, phone, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())",
    )
    .bind(id)
    .bind(&person.first)
    .bind(&person.last)
    .bind(person.birth)
    .bind(&person.citizenship)
    .bind(person.verified)
    .bind(person.passport)
    .bind(&person.phone)
    .execute(&env.pool)
    .await
    .unwrap();
    id
}

/// A fresh world with the service's topology declared and its events tapped.
async fn world() -> (TestEnv, EventTap) {
    let env = TestEnv::new().await;
    env.declare(&app::service_topology()).await;
    let events = env.tap_events().await;
    (env, events)
}

fn start(env: &TestEnv, window: Duration, sweeper: bool) -> InProcess {
    env.serve(move |runtime| {
        let settings = InvitationSettings { window, ..InvitationSettings::default() };
        let mut handles =
            vec![runtime.spawn_worker(Invitations { settings }, app::service_topology())];
        if sweeper {
            handles.extend(sweeper::spawn(runtime, sweeper_settings(), app::service_topology()));
        }
        handles
    })
}

fn sweeper_settings() -> SweeperSettings {
    SweeperSettings { interval: Duration::from_millis(500), batch: 500 }
}

/// The one outcome of `cause` among `kinds`, waited for.
async fn outcome(events: &EventTap, cause: &Envelope, kinds: &[&str]) -> Envelope {
    let id = cause.message_id.to_string();
    let is_outcome = |e: &Envelope| {
        kinds.contains(&e.kind.as_str()) && e.causation_id.as_deref() == Some(id.as_str())
    };
    let what = format!("outcome of {}", cause.kind);
    let seen = events.wait_until(&what, WAIT, |seen| seen.iter().any(is_outcome)).await;
    seen.into_iter().find(is_outcome).unwrap()
}

async fn invite(
    env: &TestEnv,
    events: &EventTap,
    truster: Uuid,
    first_name: &str,
    phone: &str,
) -> Envelope {
    let payload =
        json!({ "truster_id": truster, "contact_first_name": first_name, "contact_phone": phone });
    let command = env.command("invitation.requested", &payload).await;
    outcome(events, &command, &["invitation.sent", "invitation.rejected"]).await
}

async fn answer(
    env: &TestEnv,
    events: &EventTap,
    kind: &str,
    invitation: Uuid,
    actor: Uuid,
) -> Envelope {
    let command =
        env.command(kind, &json!({ "invitation_id": invitation, "actor_id": actor })).await;
    let outcomes = ["invitation.accepted", "invitation.declined", "invitation.rejected"];
    outcome(events, &command, &outcomes).await
}

fn id_of(event: &Envelope, field: &str) -> Uuid {
    event.payload[field].as_str().unwrap().parse().unwrap()
}

fn assert_refused(event: &Envelope, reason: &str) {
    assert_eq!(event.kind, "invitation.rejected", "{:?}", event.payload);
    assert_eq!(event.payload["reason"], json!(reason));
}

async fn status(env: &TestEnv, invitation: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM invitations WHERE invitation_id = $1")
        .bind(invitation)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn scalar(env: &TestEnv, sql: &'static str, id: Uuid) -> i64 {
    sqlx::query_scalar(sql).bind(id).fetch_one(&env.pool).await.unwrap()
}

async fn active_links_of_contact(env: &TestEnv, contact: Uuid) -> i64 {
    let sql = "SELECT count(*) FROM trust_links WHERE contact_id = $1 AND status = 'active'";
    scalar(env, sql, contact).await
}

/// Connects a fresh truster to `contact`; returns (truster, invitation).
async fn connect(env: &TestEnv, events: &EventTap, contact: Uuid, person: &Person) -> (Uuid, Uuid) {
    let truster = seed(env, &adult("Иван")).await;
    let sent = invite(env, events, truster, &person.first, person.phone.as_deref().unwrap()).await;
    assert_eq!(sent.kind, "invitation.sent", "{:?}", sent.payload);
    let invitation = id_of(&sent, "invitation_id");
    let accepted = answer(env, events, "invitation.accepted", invitation, contact).await;
    assert_eq!(accepted.kind, "invitation.accepted", "{:?}", accepted.payload);
    (truster, invitation)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truster_the_ledger_never_heard_of_is_refused_after_a_few_retries_whatever_the_limit() {
    // With the default limit the handler gives up on its own; with a limit
    // lower than its own count, on the last delivery the runtime allows,
    // instead of letting the command be dead-lettered without an outcome.
    for retry_limit in [5, 2] {
        let (mut env, events) = world().await;
        env.settings.retry_limit = retry_limit;
        let service = start(&env, Duration::from_secs(600), false);
        let contact = adult("Мария");
        seed(&env, &contact).await;
        let stranger = Uuid::now_v7();
        let refused =
            invite(&env, &events, stranger, &contact.first, contact.phone.as_deref().unwrap())
                .await;
        assert_eq!(refused.kind, "invitation.rejected", "limit {retry_limit}");
        assert_eq!(refused.payload["reason"], "truster_unknown", "limit {retry_limit}");
        assert!(env.dead_letters("invitations").await.is_empty(), "limit {retry_limit}");
        service.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_eligibility_rule_refuses_with_its_own_reason_on_either_side() {
    let (env, events) = world().await;
    let service = start(&env, Duration::from_secs(600), false);

    // How to break one rule, and the reasons expected for the truster and for
    // the contact. Ages are one day short of the minimum.
    type Break = fn(&mut Person, bool);
    let cases: [(&str, Break, &str, &str); 5] = [
        (
            "too young",
            |p, truster| {
                let minimum = if truster { 14 } else { 18 };
                p.birth = years_ago(minimum).succ_opt().unwrap();
            },
            "truster_too_young",
            "contact_too_young",
        ),
        (
            "not a citizen",
            |p, _| p.citizenship = "BY".to_owned(),
            "truster_not_citizen",
            "contact_not_citizen",
        ),
        ("unverified", |p, _| p.verified = false, "truster_not_verified", "contact_not_verified"),
        ("no passport", |p, _| p.passport = false, "truster_no_passport", "contact_no_passport"),
        ("no phone", |p, _| p.phone = None, "truster_no_phone", "contact_no_phone"),
    ];
    for (what, break_rule, as_truster, as_contact) in cases {
        let mut truster = adult("Иван");
        break_rule(&mut truster, true);
        let truster_id = seed(&env, &truster).await;
        let contact = adult("Анна");
        seed(&env, &contact).await;
        let phone = contact.phone.clone().unwrap();
        let refused = invite(&env, &events, truster_id, "Анна", &phone).await;
        assert_refused(&refused, as_truster);
        assert_eq!(refused.payload["invitation_id"], Value::Null, "{what}");

        let truster_id = seed(&env, &adult("Иван")).await;
        let mut contact = adult("Анна");
        break_rule(&mut contact, false);
        let phone = contact.phone.clone().unwrap_or_else(fresh_phone);
        seed(&env, &contact).await;
        let refused = invite(&env, &events, truster_id, "Анна", &phone).await;
        // Without a phone the contact cannot be found by one at all; their
        // missing phone is refused by name at acceptance, below.
        let expected = if contact.phone.is_none() { "contact_not_found" } else { as_contact };
        assert_refused(&refused, expected);
    }
    let opened: i64 =
        sqlx::query_scalar("SELECT count(*) FROM invitations").fetch_one(&env.pool).await.unwrap();
    assert_eq!(opened, 0, "no refused request opens an invitation");
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'invitation_requested_refused'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(audited, 10);

    // One day older, both are accepted: 14 for the truster, 18 for the contact.
    let mut truster = adult("Иван");
    truster.birth = years_ago(14);
    let truster_id = seed(&env, &truster).await;
    let mut contact = adult("Анна");
    contact.birth = years_ago(18);
    let contact_id = seed(&env, &contact).await;
    let sent = invite(&env, &events, truster_id, "Анна", contact.phone.as_deref().unwrap()).await;
    assert_eq!(sent.kind, "invitation.sent", "{:?}", sent.payload);
    assert_eq!(id_of(&sent, "contact_id"), contact_id);

    // Eligibility is checked again at acceptance: the contact's phone is gone.
    sqlx::query("UPDATE accounts SET phone = NULL WHERE account_id = $1")
        .bind(contact_id)
        .execute(&env.pool)
        .await
        .unwrap();
    let invitation = id_of(&sent, "invitation_id");
    let refused = answer(&env, &events, "invitation.accepted", invitation, contact_id).await;
    assert_refused(&refused, "contact_no_phone");
    assert_eq!(status(&env, invitation).await, "refused");
    assert_eq!(active_links_of_contact(&env, contact_id).await, 0);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn any_common_notation_finds_the_contact_and_a_wrong_name_looks_like_an_unknown_phone() {
    let (env, events) = world().await;
    let sms = env.tap_internal("sms.requested").await;
    let service = start(&env, Duration::from_secs(600), false);
    let mut contact = adult("Елкина");
    contact.phone = Some("+79001234567".to_owned());
    let contact_id = seed(&env, &contact).await;
    let truster = seed(&env, &adult("Иван")).await;

    for (typed_name, typed_phone) in [
        ("Елкина", "8 (900) 123-45-67"),
        ("ЁЛКИНА", "+7 900 123 45 67"),
        (" елкина ", "79001234567"),
    ] {
        let sent = invite(&env, &events, truster, typed_name, typed_phone).await;
        assert_eq!(sent.kind, "invitation.sent", "{typed_name} {typed_phone}");
        assert_eq!(id_of(&sent, "contact_id"), contact_id);
    }
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM invitations WHERE contact_id = $1 AND status = 'pending'",
    )
    .bind(contact_id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(pending, 1, "each new invitation replaced the pending one");

    // The contact was told in the cabinet and by SMS, with the truster's
    // short name only.
    let notices = events.all();
    let received: Vec<_> = notices
        .iter()
        .filter(|e| e.kind == "cabinet.notification" && e.payload["kind"] == "invitation_received")
        .collect();
    assert_eq!(received.len(), 3);
    let text = received[0].payload["text"].as_str().unwrap();
    assert!(text.contains("Иван П.") && !text.contains("Петрова"), "{text}");
    sms.wait_until("three SMS requests", WAIT, |seen| seen.len() == 3).await;

    let other = seed(&env, &adult("Олег")).await;
    let wrong_name = invite(&env, &events, other, "Ольга", "+79001234567").await;
    let unknown_phone = invite(&env, &events, other, "Елкина", "+79009999999").await;
    assert_refused(&wrong_name, "contact_not_found");
    assert_refused(&unknown_phone, "contact_not_found");
    assert_eq!(wrong_name.payload, unknown_phone.payload, "the two answers are the same");
    let garbage = invite(&env, &events, other, "Елкина", "call me").await;
    assert_refused(&garbage, "contact_phone_invalid");

    // Nobody is their own contact.
    let own = sqlx::query_scalar::<_, String>("SELECT phone FROM accounts WHERE account_id = $1")
        .bind(other)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_refused(&invite(&env, &events, other, "Олег", &own).await, "self_invitation");

    // Five invitations an hour: the truster above sent three, two more pass.
    for _ in 0..2 {
        let sent = invite(&env, &events, truster, "Елкина", "+79001234567").await;
        assert_eq!(sent.kind, "invitation.sent");
    }
    let sixth = invite(&env, &events, truster, "Елкина", "+79001234567").await;
    assert_refused(&sixth, "invitation_rate_limited");
    let opened = scalar(&env, "SELECT count(*) FROM invitations WHERE truster_id = $1", truster);
    assert_eq!(opened.await, 5);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn five_invitations_naming_nobody_in_an_hour_stop_the_truster_guessing_names() {
    let (env, events) = world().await;
    let service = start(&env, Duration::from_secs(600), false);
    let contact = adult("Светлана");
    seed(&env, &contact).await;
    let phone = contact.phone.clone().unwrap();
    let truster = seed(&env, &adult("Игорь")).await;
    for guess in ["Анна", "Мария", "Елена", "Ольга", "Наталья"] {
        assert_refused(&invite(&env, &events, truster, guess, &phone).await, "contact_not_found");
    }
    // The sixth guess is right, and still gets no answer about the account.
    let right = invite(&env, &events, truster, "Светлана", &phone).await;
    assert_refused(&right, "contact_lookups_exhausted");
    let opened = scalar(&env, "SELECT count(*) FROM invitations WHERE truster_id = $1", truster);
    assert_eq!(opened.await, 0);
    // Another truster is not held back by this one's guesses.
    let other = seed(&env, &adult("Олег")).await;
    assert_eq!(invite(&env, &events, other, "Светлана", &phone).await.kind, "invitation.sent");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_invitation_replaces_a_pending_one_and_is_refused_while_a_contact_is_active() {
    let (env, events) = world().await;
    let service = start(&env, Duration::from_secs(600), false);
    let first = adult("Анна");
    let first_id = seed(&env, &first).await;
    let second = adult("Мария");
    let second_id = seed(&env, &second).await;
    let truster = seed(&env, &adult("Иван")).await;

    let sent = invite(&env, &events, truster, "Анна", first.phone.as_deref().unwrap()).await;
    let replaced = id_of(&sent, "invitation_id");
    let sent = invite(&env, &events, truster, "Мария", second.phone.as_deref().unwrap()).await;
    let current = id_of(&sent, "invitation_id");
    assert_eq!(id_of(&sent, "replaced_invitation_id"), replaced);
    assert_eq!(status(&env, replaced).await, "replaced");

    let refused = answer(&env, &events, "invitation.accepted", replaced, first_id).await;
    assert_refused(&refused, "invitation_replaced");
    let accepted = answer(&env, &events, "invitation.accepted", current, second_id).await;
    assert_eq!(accepted.kind, "invitation.accepted");
    assert_eq!(status(&env, current).await, "accepted");
    let links: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT contact_id, status FROM trust_links WHERE truster_id = $1")
            .bind(truster)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(links, vec![(second_id, "active".to_owned())]);
    // The notifications leave in the outcome's batch but may reach the tap
    // just after it.
    let cause = accepted_cause(&events, &accepted).message_id.to_string();
    let notice_of_acceptance =
        |e: &&Envelope| e.kind == "cabinet.notification" && e.causation_id == Some(cause.clone());
    let seen = events
        .wait_until("both notifications of the acceptance", WAIT, |seen| {
            seen.iter().filter(notice_of_acceptance).count() >= 2
        })
        .await;
    let kinds: Vec<(Uuid, String)> = seen
        .iter()
        .filter(notice_of_acceptance)
        .map(|e| (id_of(e, "account_id"), e.payload["kind"].as_str().unwrap().to_owned()))
        .collect();
    assert!(kinds.contains(&(truster, "invitation_accepted".to_owned())), "{kinds:?}");
    assert!(kinds.contains(&(second_id, "contact_connected".to_owned())), "{kinds:?}");

    let again = invite(&env, &events, truster, "Анна", first.phone.as_deref().unwrap()).await;
    assert_refused(&again, "contact_already_active");
    assert_eq!(
        scalar(&env, "SELECT count(*) FROM invitations WHERE truster_id = $1", truster).await,
        2
    );
    service.stop().await;
}

/// The command an outcome answers (by its causation id), rebuilt enough for
/// `caused_by`.
fn accepted_cause(_events: &EventTap, outcome: &Envelope) -> Envelope {
    let mut cause = outcome.clone();
    cause.message_id = outcome.causation_id.as_deref().unwrap().parse().unwrap();
    cause
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invitation_racing_the_acceptance_of_the_pending_one_is_refused_not_sent() {
    let (env, events) = world().await;
    let service = start(&env, Duration::from_secs(1800), false);
    let truster = seed(&env, &adult("Ольга")).await;
    let first = adult("Анна");
    let first_id = seed(&env, &first).await;
    let second = adult("Мария");
    seed(&env, &second).await;
    let sent = invite(&env, &events, truster, "Анна", first.phone.as_deref().unwrap()).await;
    assert_eq!(sent.kind, "invitation.sent");
    let pending = id_of(&sent, "invitation_id");

    // The acceptance of the pending invitation, half-way: its row is locked
    // and the link written, not yet committed.
    let mut acceptance = env.pool.begin().await.unwrap();
    sqlx::query("UPDATE invitations SET status = 'accepted' WHERE invitation_id = $1")
        .bind(pending)
        .execute(&mut *acceptance)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO trust_links (link_id, truster_id, contact_id, invitation_id, status) \
         VALUES ($1, $2, $3, $4, 'active')",
    )
    .bind(Uuid::now_v7())
    .bind(truster)
    .bind(first_id)
    .bind(pending)
    .execute(&mut *acceptance)
    .await
    .unwrap();
    let payload = json!({ "truster_id": truster, "contact_first_name": "Мария",
                          "contact_phone": second.phone });
    let second_invitation = env.command("invitation.requested", &payload).await;
    // The new invitation's step has read the link rules and now waits for the
    // pending invitation's row.
    let database = env.database.clone();
    eventually("the new invitation waits on the pending row", WAIT, || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = $1 AND wait_event_type = 'Lock'",
        )
        .bind(&database)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        waiting == 1
    })
    .await;
    acceptance.commit().await.unwrap();

    let refused =
        outcome(&events, &second_invitation, &["invitation.sent", "invitation.rejected"]).await;
    assert_eq!(refused.kind, "invitation.rejected");
    assert_eq!(refused.payload["reason"], json!("contact_already_active"));
    let pending_now: i64 = scalar(
        &env,
        "SELECT count(*) FROM invitations WHERE truster_id = $1 AND status = 'pending'",
        truster,
    )
    .await;
    assert_eq!(pending_now, 0);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn six_concurrent_acceptances_for_one_contact_link_exactly_five_trusters() {
    let (env, events) = world().await;
    let service = start(&env, Duration::from_secs(600), false);
    let contact = adult("Анна");
    let contact_id = seed(&env, &contact).await;
    let mut invitations = Vec::new();
    for _ in 0..6 {
        let truster = seed(&env, &adult("Иван")).await;
        let sent = invite(&env, &events, truster, "Анна", contact.phone.as_deref().unwrap()).await;
        assert_eq!(sent.kind, "invitation.sent");
        invitations.push(id_of(&sent, "invitation_id"));
    }
    let commands = invitations.iter().map(|invitation| {
        Envelope::new_command(
            "invitation.accepted",
            &json!({ "invitation_id": invitation, "actor_id": contact_id }),
        )
        .unwrap()
    });
    let commands: Vec<_> = commands.collect();
    futures::future::join_all(commands.iter().map(|c| env.publish_envelope(c))).await;
    let mut outcomes = Vec::new();
    for command in &commands {
        let kinds = ["invitation.accepted", "invitation.rejected"];
        outcomes.push(outcome(&events, command, &kinds).await);
    }
    let accepted = outcomes.iter().filter(|e| e.kind == "invitation.accepted").count();
    let refused: Vec<_> = outcomes.iter().filter(|e| e.kind == "invitation.rejected").collect();
    assert_eq!(accepted, 5);
    assert_eq!(refused.len(), 1);
    assert_refused(refused[0], "contact_limit_reached");
    assert_eq!(active_links_of_contact(&env, contact_id).await, 5);
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM invitations GROUP BY status ORDER BY status")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(statuses, vec![("accepted".to_owned(), 5), ("refused".to_owned(), 1)]);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_acceptance_begun_before_the_deadline_and_kept_waiting_past_it_still_links() {
    let (env, events) = world().await;
    let window = Duration::from_secs(2);
    let service = start(&env, window, true);
    let contact = adult("Анна");
    let contact_id = seed(&env, &contact).await;
    let truster = seed(&env, &adult("Иван")).await;
    let sent = invite(&env, &events, truster, "Анна", contact.phone.as_deref().unwrap()).await;
    let invitation = id_of(&sent, "invitation_id");

    // Another truster's acceptance holds the contact's row, as it would
    // while counting the contact's links; ours begins and waits behind it.
    let mut busy = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE")
        .bind(contact_id)
        .execute(&mut *busy)
        .await
        .unwrap();
    let payload = json!({ "invitation_id": invitation, "actor_id": contact_id });
    let accept = env.command("invitation.accepted", &payload).await;
    // The deadline passes and its message reaches the sweeper meanwhile.
    tokio::time::sleep(window + Duration::from_secs(2)).await;
    busy.rollback().await.unwrap();

    let answered = outcome(&events, &accept, &["invitation.accepted", "invitation.rejected"]);
    let answered = answered.await;
    assert_eq!(answered.kind, "invitation.accepted", "{:?}", answered.payload);
    assert_eq!(status(&env, invitation).await, "accepted");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(events.all().iter().all(|e| e.kind != "invitation.expired"), "not expired as well");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_invited_person_may_accept_and_only_before_the_deadline() {
    let (env, events) = world().await;
    // No sweeper at first: the overdue invitation stays pending, and its
    // deadline waits in the sweeper's durable queue.
    let window = Duration::from_secs(2);
    let service = start(&env, window, false);
    let contact = adult("Анна");
    let contact_id = seed(&env, &contact).await;
    let truster = seed(&env, &adult("Иван")).await;
    let stranger = seed(&env, &adult("Олег")).await;
    let request = Envelope::new_command(
        "invitation.requested",
        &json!({ "truster_id": truster, "contact_first_name": "Анна",
                 "contact_phone": contact.phone.as_deref().unwrap() }),
    )
    .unwrap();
    env.publish_envelope(&request).await;
    let sent = outcome(&events, &request, &["invitation.sent"]).await;
    let invitation = id_of(&sent, "invitation_id");

    for actor in [stranger, truster] {
        for kind in ["invitation.accepted", "invitation.declined"] {
            let refused = answer(&env, &events, kind, invitation, actor).await;
            assert_refused(&refused, "not_invited_contact");
            // Nobody learns from a refusal whose invitation it was.
            assert_eq!(refused.payload["truster_id"], Value::Null, "{kind}");
        }
    }
    assert_eq!(status(&env, invitation).await, "pending");
    assert_eq!(
        scalar(&env, "SELECT count(*) FROM trust_links WHERE truster_id = $1", truster).await,
        0
    );

    eventually("the deadline passed by the database clock", WAIT, || async {
        scalar(
            &env,
            "SELECT count(*) FROM invitations WHERE invitation_id = $1 \
                      AND expires_at <= now()",
            invitation,
        )
        .await
            == 1
    })
    .await;
    let late = answer(&env, &events, "invitation.accepted", invitation, contact_id).await;
    assert_refused(&late, "invitation_expired");
    assert_eq!(status(&env, invitation).await, "pending", "only the sweeper expires");

    let sweeper =
        env.serve(|runtime| sweeper::spawn(runtime, sweeper_settings(), app::service_topology()));
    let correlation = request.message_id.to_string();
    let seen = events
        .wait_until("the expiry and the truster's notice", WAIT, |seen| {
            seen.iter().any(|e| e.kind == "invitation.expired")
                && seen.iter().any(|e| e.payload["kind"] == "invitation_expired")
        })
        .await;
    let expired = seen.iter().find(|e| e.kind == "invitation.expired").unwrap();
    assert_eq!(id_of(expired, "invitation_id"), invitation);
    assert_eq!(expired.correlation_id.as_deref(), Some(correlation.as_str()));
    let notice = seen.iter().find(|e| e.payload["kind"] == "invitation_expired").unwrap();
    assert_eq!(id_of(notice, "account_id"), truster);
    assert!(notice.payload["text"].as_str().unwrap().contains("новое"));
    assert_eq!(status(&env, invitation).await, "expired");

    // The truster may invite again.
    let again = invite(&env, &events, truster, "Анна", contact.phone.as_deref().unwrap()).await;
    assert_eq!(again.kind, "invitation.sent");
    sweeper.stop().await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sweepers_expire_each_of_a_thousand_invitations_once_and_no_accepted_one() {
    let (env, events) = world().await;
    // Long enough that acceptances sent right after `invitation.sent` land in
    // time even on a slow machine; short enough to keep the test quick.
    let service = start(&env, Duration::from_secs(8), true);
    let second_sweeper =
        env.serve(|runtime| sweeper::spawn(runtime, sweeper_settings(), app::service_topology()));
    // 1,000 trusters and 200 contacts, five trusters each, in two statements.
    sqlx::query(
        "INSERT INTO accounts (account_id, first_name, last_name, birth_date, citizenship, \
                               verified, has_passport, phone, updated_at) \
         SELECT md5('flood-' || kind || n)::uuid, 'Анна', 'Петрова', DATE '1990-01-01', 'RU', \
                true, true, '+7950' || lpad(n::text, 7, '0') || '', now() \
         FROM (SELECT 'truster' AS kind, n FROM generate_series(1, 1000) n \
               UNION ALL SELECT 'contact', n + 1000 FROM generate_series(1, 200) n) people",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let trusters: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT md5('flood-truster' || n)::uuid, \
                '+7950' || lpad((1000 + 1 + n % 200)::text, 7, '0') \
         FROM generate_series(1, 1000) n ORDER BY n",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let invite = async |(truster, contact_phone): &(Uuid, String)| {
        let payload = json!({ "truster_id": truster, "contact_first_name": "Анна",
                              "contact_phone": contact_phone });
        env.command("invitation.requested", &payload).await;
    };
    // The first 100 trusters invite 100 different contacts, and each contact
    // accepts as soon as the invitation is out. The acceptances are queued
    // before the other 900 invitations, so that they do not wait behind the
    // flood and reach the ledger well inside the window, while the sweepers
    // work through the rest.
    let (first, rest) = trusters.split_at(100);
    for truster in first {
        invite(truster).await;
    }
    let mut accepted_by_us = std::collections::HashMap::new();
    eventually("the first 100 invitations sent", Duration::from_secs(30), || async {
        events.all().iter().filter(|e| e.kind == "invitation.sent").count() == 100
    })
    .await;
    for sent in events.all().iter().filter(|e| e.kind == "invitation.sent") {
        accepted_by_us.insert(id_of(sent, "contact_id"), id_of(sent, "invitation_id"));
    }
    assert_eq!(accepted_by_us.len(), 100, "the first 100 invitations go to 100 contacts");
    for (contact, invitation) in &accepted_by_us {
        let payload = json!({ "invitation_id": invitation, "actor_id": contact });
        env.command("invitation.accepted", &payload).await;
    }
    for truster in rest {
        invite(truster).await;
    }
    eventually("every invitation sent", Duration::from_secs(60), || async {
        events.all().iter().filter(|e| e.kind == "invitation.sent").count() == 1000
    })
    .await;
    eventually("no invitation left pending", Duration::from_secs(90), || async {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM invitations WHERE status = 'pending'")
                .fetch_one(&env.pool)
                .await
                .unwrap();
        pending == 0
    })
    .await;
    // Let the copies still in the sweeper's queue be consumed.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM invitations GROUP BY status ORDER BY status")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let accepted: i64 = statuses.iter().filter(|(s, _)| s == "accepted").map(|(_, n)| n).sum();
    let expired: i64 = statuses.iter().filter(|(s, _)| s == "expired").map(|(_, n)| n).sum();
    assert_eq!(accepted + expired, 1000, "{statuses:?}");
    assert_eq!(accepted, 100, "every acceptance was in time: {statuses:?}");
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT subject_id FROM audit_log \
                              WHERE action = 'invitation_expired' \
         GROUP BY subject_id HAVING count(*) > 1) t",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(twice, 0, "an invitation was expired twice");
    let accepted_then_expired: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM invitations i JOIN audit_log a ON a.subject_id = i.invitation_id \
         WHERE i.status = 'accepted' AND a.action = 'invitation_expired'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(accepted_then_expired, 0);
    let expired_events: Vec<Uuid> = events
        .all()
        .iter()
        .filter(|e| e.kind == "invitation.expired")
        .map(|e| id_of(e, "invitation_id"))
        .collect();
    let distinct: std::collections::HashSet<_> = expired_events.iter().collect();
    assert_eq!(expired_events.len() as i64, expired);
    assert_eq!(distinct.len(), expired_events.len());
    for invitation in accepted_by_us.values() {
        let state = status(&env, *invitation).await;
        assert!(state == "accepted" || state == "expired", "{state}");
    }
    second_sweeper.stop().await;
    service.stop().await;
}

async fn disconnect(env: &TestEnv, events: &EventTap, actor: Uuid, truster: Uuid) -> Envelope {
    let payload = json!({ "actor_id": actor, "truster_id": truster });
    let command = env.command("contact.disconnect_requested", &payload).await;
    let kinds = ["contact.disconnected", "contact.disconnect_rejected"];
    outcome(events, &command, &kinds).await
}

async fn link_status(env: &TestEnv, invitation: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM trust_links WHERE invitation_id = $1")
        .bind(invitation)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_contact_may_not_leave_while_a_recovery_of_the_truster_is_active() {
    let (env, events) = world().await;
    let service = start(&env, Duration::from_secs(600), false);
    let contact = adult("Анна");
    let contact_id = seed(&env, &contact).await;
    let (truster, invitation) = connect(&env, &events, contact_id, &contact).await;
    let recovery = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO recovery_requests (recovery_id, truster_id, contact_id, link_id, status, \
                                        expires_at, correlation_id) \
         SELECT $1, truster_id, contact_id, link_id, 'awaiting_contact', \
                now() + interval '1 hour', \
                'test' FROM trust_links WHERE invitation_id = $2",
    )
    .bind(recovery)
    .bind(invitation)
    .execute(&env.pool)
    .await
    .unwrap();

    let refused = disconnect(&env, &events, contact_id, truster).await;
    assert_eq!(refused.kind, "contact.disconnect_rejected");
    assert_eq!(refused.payload["reason"], json!("recovery_active"));
    assert_eq!(id_of(&refused, "contact_id"), contact_id);
    assert_eq!(link_status(&env, invitation).await, "active");
    let stranger = seed(&env, &adult("Олег")).await;
    let refused = disconnect(&env, &events, stranger, truster).await;
    assert_eq!(refused.payload["reason"], json!("not_a_party"));
    assert_eq!(refused.payload["contact_id"], Value::Null, "an outsider learns no contact");

    sqlx::query("UPDATE recovery_requests SET status = 'cancelled' WHERE recovery_id = $1")
        .bind(recovery)
        .execute(&env.pool)
        .await
        .unwrap();
    let done = disconnect(&env, &events, contact_id, truster).await;
    assert_eq!(done.kind, "contact.disconnected");
    assert_eq!(id_of(&done, "actor_id"), contact_id);
    assert_eq!(link_status(&env, invitation).await, "disconnected");
    let told: Vec<Uuid> = events
        .all()
        .iter()
        .filter(|e| e.payload["kind"] == "contact_disconnected")
        .filter(|e| e.causation_id == done.causation_id)
        .map(|e| id_of(e, "account_id"))
        .collect();
    assert_eq!(told.len(), 2);
    assert!(told.contains(&truster) && told.contains(&contact_id));

    // The truster may disconnect at any time, an active recovery or not.
    let (truster, invitation) = connect(&env, &events, contact_id, &contact).await;
    sqlx::query(
        "INSERT INTO recovery_requests (recovery_id, truster_id, contact_id, link_id, status, \
                                        expires_at, correlation_id) \
         SELECT $1, truster_id, contact_id, link_id, 'code_sent', now() + interval '1 hour', \
                'test' FROM trust_links WHERE invitation_id = $2",
    )
    .bind(Uuid::now_v7())
    .bind(invitation)
    .execute(&env.pool)
    .await
    .unwrap();
    let done = disconnect(&env, &events, truster, truster).await;
    assert_eq!(done.kind, "contact.disconnected");
    assert_eq!(link_status(&env, invitation).await, "disconnected");
    let again = disconnect(&env, &events, truster, truster).await;
    assert_eq!(again.payload["reason"], json!("no_active_contact"));
    service.stop().await;
}

async fn queue_drained(env: &TestEnv) {
    env.wait_queue_drained("invitations", WAIT).await;
    // A copy taken off the queue may still be in its handler.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

async fn twice(env: &TestEnv, kind: &str, payload: Value) -> Envelope {
    let command = Envelope::new_command(kind, &payload).unwrap();
    env.publish_envelope(&command).await;
    env.publish_envelope(&command).await;
    command
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_delivered_twice_has_its_effect_once() {
    let (env, events) = world().await;
    let service = start(&env, Duration::from_secs(600), false);
    let truster = Uuid::now_v7();
    let contact = Uuid::now_v7();
    let other = Uuid::now_v7();
    let mut updates = Vec::new();
    for (id, name, phone) in [
        (truster, "Иван", "+79101112233"),
        (contact, "Анна", "8 910 111 22 44"),
        (other, "Мария", "+79101112255"),
    ] {
        let payload = json!({ "account_id": id, "first_name": name, "last_name": "Петрова",
            "birth_date": "1990-01-01", "citizenship": "RU", "verified": true,
            "has_passport": true, "phone": phone });
        updates.push(twice(&env, "account.updated", payload).await);
    }
    eventually("three accounts projected", WAIT, || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM accounts").fetch_one(&env.pool).await.unwrap();
        n == 3
    })
    .await;
    let phone: String = sqlx::query_scalar("SELECT phone FROM accounts WHERE account_id = $1")
        .bind(contact)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(phone, "+79101112244");

    let request = json!({ "truster_id": truster, "contact_first_name": "Анна",
                          "contact_phone": "+79101112244" });
    let requested = twice(&env, "invitation.requested", request).await;
    let sent = outcome(&events, &requested, &["invitation.sent"]).await;
    let invitation = id_of(&sent, "invitation_id");
    let accepted = twice(
        &env,
        "invitation.accepted",
        json!({ "invitation_id": invitation, "actor_id": contact }),
    )
    .await;
    outcome(&events, &accepted, &["invitation.accepted"]).await;

    let request = json!({ "truster_id": other, "contact_first_name": "Анна",
                          "contact_phone": "+79101112244" });
    let second = twice(&env, "invitation.requested", request).await;
    let sent = outcome(&events, &second, &["invitation.sent"]).await;
    let declined = twice(
        &env,
        "invitation.declined",
        json!({ "invitation_id": id_of(&sent, "invitation_id"), "actor_id": contact }),
    )
    .await;
    outcome(&events, &declined, &["invitation.declined"]).await;

    let disconnected = twice(
        &env,
        "contact.disconnect_requested",
        json!({ "actor_id": truster, "truster_id": truster }),
    )
    .await;
    outcome(&events, &disconnected, &["contact.disconnected"]).await;
    queue_drained(&env).await;

    // One outcome each (plus notifications), one ledger change each.
    for (command, kind, notifications) in [
        (&requested, "invitation.sent", 1),
        (&accepted, "invitation.accepted", 2),
        (&second, "invitation.sent", 1),
        (&declined, "invitation.declined", 1),
        (&disconnected, "contact.disconnected", 2),
    ] {
        let caused = events.caused_by(command);
        let outcomes = caused.iter().filter(|e| e.kind == kind).count();
        let notices = caused.iter().filter(|e| e.kind == "cabinet.notification").count();
        assert_eq!((outcomes, notices), (1, notifications), "{}", command.kind);
    }
    let pool = &env.pool;
    let count = |sql: &'static str| async move {
        sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await.unwrap()
    };
    assert_eq!(count("SELECT count(*) FROM invitations").await, 2);
    assert_eq!(count("SELECT count(*) FROM trust_links").await, 1);
    assert_eq!(count("SELECT count(*) FROM audit_log WHERE action = 'account_projected'").await, 3);
    assert_eq!(count("SELECT count(*) FROM audit_log WHERE action = 'invitation_sent'").await, 2);
    assert_eq!(count("SELECT count(*) FROM audit_log WHERE action = 'link_created'").await, 1);
    assert_eq!(
        count("SELECT count(*) FROM audit_log WHERE action = 'invitation_declined'").await,
        1
    );
    assert_eq!(count("SELECT count(*) FROM audit_log WHERE action = 'link_disconnected'").await, 1);
    assert_eq!(count("SELECT count(*) FROM outbox WHERE message_type = 'sms.requested'").await, 2);
    service.stop().await;
}

fn account_update(
    id: Uuid,
    first_name: &str,
    phone: &str,
    occurred_at: chrono::DateTime<Utc>,
) -> Envelope {
    let payload = json!({ "account_id": id, "first_name": first_name, "last_name": "Петрова",
        "birth_date": "1990-01-01", "citizenship": "RU", "verified": true,
        "has_passport": true, "phone": phone });
    let mut envelope = Envelope::new_command("account.updated", &payload).unwrap();
    envelope.occurred_at = occurred_at;
    envelope
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_account_update_never_overwrites_a_newer_one_and_a_bad_phone_dead_letters_but_clears_the_old_one()
 {
    let (env, _events) = world().await;
    let service = start(&env, Duration::from_secs(600), false);
    let id = Uuid::now_v7();
    let now = Utc::now();
    let newer = account_update(id, "Новая", "+79201234567", now);
    let older = account_update(id, "Старая", "+79207654321", now - chrono::Duration::hours(1));
    env.publish_envelope(&newer).await;
    env.publish_envelope(&older).await;
    eventually("both updates handled", WAIT, || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM inbox WHERE consumer = 'invitations' AND message_id = ANY($1)",
        )
        .bind(vec![newer.message_id, older.message_id])
        .fetch_one(&env.pool)
        .await
        .unwrap();
        n == 2
    })
    .await;
    let row: (String, String) =
        sqlx::query_as("SELECT first_name, phone FROM accounts WHERE account_id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(row, ("Новая".to_owned(), "+79201234567".to_owned()));

    // The profile's phone changed to one the service cannot use: the update
    // is dead-lettered with its reason, and the old phone no longer counts.
    let bad = account_update(id, "Новая", "+380 50 123 45 67", Utc::now());
    env.publish_envelope(&bad).await;
    let dead = env.wait_dead_letters("invitations", 1, WAIT).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(Envelope::parse(&dead[0].data).unwrap().message_id, bad.message_id);
    let phone: Option<String> =
        sqlx::query_scalar("SELECT phone FROM accounts WHERE account_id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(phone, None);
    service.stop().await;
}

async fn first_name_of(env: &TestEnv, id: Uuid) -> String {
    sqlx::query_scalar("SELECT first_name FROM accounts WHERE account_id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn of_two_updates_with_one_timestamp_the_later_stands_and_a_future_one_is_refused() {
    let (env, _events) = world().await;
    let service = start(&env, Duration::from_secs(600), false);
    let id = Uuid::now_v7();
    // Whole seconds, as a portal's timestamps often are.
    let second = chrono::DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
    let first = account_update(id, "Первая", "+79201234567", second);
    env.publish_envelope(&first).await;
    eventually("the first update stored", WAIT, || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM accounts WHERE account_id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    let same_second = account_update(id, "Вторая", "+79201234567", second);
    env.publish_envelope(&same_second).await;
    eventually("the second update of the same second stands", WAIT, || async {
        first_name_of(&env, id).await == "Вторая"
    })
    .await;

    // Dated a day ahead, it would shut out every real update until then.
    let future =
        account_update(id, "Будущая", "+79201234567", Utc::now() + chrono::Duration::days(1));
    env.publish_envelope(&future).await;
    let dead = env.wait_dead_letters("invitations", 1, WAIT).await;
    assert_eq!(Envelope::parse(&dead[0].data).unwrap().message_id, future.message_id);
    assert_eq!(first_name_of(&env, id).await, "Вторая");
    let now = account_update(id, "Текущая", "+79201234567", Utc::now());
    env.publish_envelope(&now).await;
    eventually("a current update still applies", WAIT, || async {
        first_name_of(&env, id).await == "Текущая"
    })
    .await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invitation_that_overtakes_its_trusters_first_profile_update_is_still_sent() {
    let (env, events) = world().await;
    let service = start(&env, Duration::from_secs(600), false);
    let contact = adult("Анна");
    seed(&env, &contact).await;
    let truster = Uuid::now_v7();
    let payload = json!({ "truster_id": truster, "contact_first_name": "Анна",
                          "contact_phone": contact.phone });
    let request = env.command("invitation.requested", &payload).await;
    // The profile arrives after the invitation, as when its first delivery
    // failed and waits out a retry delay.
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.publish_envelope(&account_update(truster, "Игорь", &fresh_phone(), Utc::now())).await;
    let outcome = outcome(&events, &request, &["invitation.sent", "invitation.rejected"]).await;
    assert_eq!(outcome.kind, "invitation.sent", "{:?}", outcome.payload);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_invitation_sms_tells_the_truster_and_keeps_the_invitation() {
    let (env, events) = world().await;
    let sms = env.tap_internal("sms.requested").await;
    let service = start(&env, Duration::from_secs(600), false);
    let contact = adult("Анна");
    seed(&env, &contact).await;
    let truster = seed(&env, &adult("Иван")).await;
    let sent = invite(&env, &events, truster, "Анна", contact.phone.as_deref().unwrap()).await;
    let invitation = id_of(&sent, "invitation_id");
    let requested = sms.wait_until("the SMS request", WAIT, |seen| seen.len() == 1).await;
    assert_eq!(requested[0].payload["requested_by"], json!("invitations"));
    let key = requested[0].payload["idempotency_key"].clone();

    let failed = requested[0]
        .caused(
            "sms.failed",
            &json!({ "idempotency_key": key, "reason": "sms_rejected",
            "recipient_id": requested[0].payload["recipient_id"],
            "template": "invitation_notice" }),
        )
        .unwrap();
    let queue = env.topology().worker_queue("invitations");
    let properties = properties_of(&failed);
    env.publish_raw("", &queue, &serde_json::to_vec(&failed).unwrap(), properties).await;
    let notice = events
        .wait_until("the truster told", WAIT, |seen| {
            seen.iter().any(|e| e.payload["kind"] == "invitation_sms_failed")
        })
        .await;
    let notice = notice.iter().find(|e| e.payload["kind"] == "invitation_sms_failed").unwrap();
    assert_eq!(id_of(notice, "account_id"), truster);
    assert_eq!(status(&env, invitation).await, "pending");
    let audited = scalar(
        &env,
        "SELECT count(*) FROM audit_log WHERE subject_id = $1 AND action = 'invitation_sms_failed'",
        invitation,
    )
    .await;
    assert_eq!(audited, 1);
    service.stop().await;
}
