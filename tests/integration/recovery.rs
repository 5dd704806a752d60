//! The recovery worker with the sweeper: a request approved by the truster's
//! contact with an SMS code, the limits on codes and attempts, who may act,
//! expiry, duplicates, and what never reaches a log.

use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use trusted_contact::{
    app,
    recovery::{self, RecoverySettings, RecoveryWorker},
    settings::Environment,
    sms::{SmsRequested, SmsTemplate},
    sweeper::{self, SweeperSettings},
};
use trusted_contact_contracts::{Envelope, command_type as cmd, event_type as ev};
use uuid::Uuid;

use crate::support::{EventTap, InProcess, TestEnv};

struct Parties {
    truster: Uuid,
    contact: Uuid,
    contact_phone: String,
}

fn recovery_settings() -> RecoverySettings {
    RecoverySettings::from_env(&Environment::Development).expect("recovery settings")
}

/// A sweep interval long enough that only the delayed messages (or a test
/// calling the sweep itself) end anything.
fn quiet_sweeper() -> SweeperSettings {
    SweeperSettings { interval: Duration::from_secs(3_600), batch: 100 }
}

async fn add_account(env: &TestEnv, first: &str, last: &str, phone: Option<&str>) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO accounts (account_id, first_name, last_name, birth_date, citizenship, \
         verified, has_passport, phone, updated_at) \
         VALUES ($1, $2, $3, '1980-04-02', 'RU', true, true, $4, now())",
    )
    .bind(id)
    .bind(first)
    .bind(last)
    .bind(phone)
    .execute(&env.pool)
    .await
    .unwrap();
    id
}

/// A truster with an active trusted contact, written straight into the
/// ledger as the invitation flow would leave it.
async fn connected(env: &TestEnv) -> Parties {
    let contact_phone = format!("+7916{:07}", rand_digits());
    let truster = add_account(env, "Иван", "Петров", Some("+79001112233")).await;
    let contact = add_account(env, "Анна", "Сидорова", Some(&contact_phone)).await;
    link(env, truster, contact).await;
    Parties { truster, contact, contact_phone }
}

fn rand_digits() -> u32 {
    (Uuid::new_v4().as_u128() % 10_000_000) as u32
}

async fn link(env: &TestEnv, truster: Uuid, contact: Uuid) {
    let invitation = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO invitations (invitation_id, truster_id, contact_id, status, expires_at, \
         decided_at, correlation_id) \
         VALUES ($1, $2, $3, 'accepted', now() + interval '30 minutes', now(), 'seed')",
    )
    .bind(invitation)
    .bind(truster)
    .bind(contact)
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO trust_links (link_id, truster_id, contact_id, invitation_id, status) \
         VALUES ($1, $2, $3, $4, 'active')",
    )
    .bind(Uuid::now_v7())
    .bind(truster)
    .bind(contact)
    .bind(invitation)
    .execute(&env.pool)
    .await
    .unwrap();
}

async fn start(env: &TestEnv, settings: RecoverySettings, sweep: SweeperSettings) -> InProcess {
    env.declare(&app::service_topology()).await;
    env.serve(move |runtime| {
        let mut handles =
            vec![runtime.spawn_worker(RecoveryWorker::new(settings), app::service_topology())];
        handles.extend(sweeper::spawn(runtime, sweep, app::service_topology()));
        handles
    })
}

struct World {
    env: TestEnv,
    events: EventTap,
    sms: EventTap,
    parties: Parties,
    service: InProcess,
}

async fn world_with(settings: RecoverySettings, sweep: SweeperSettings) -> World {
    let env = TestEnv::new().await;
    let parties = connected(&env).await;
    let service = start(&env, settings, sweep).await;
    let events = env.tap_events().await;
    let sms = env.tap_internal("sms.requested").await;
    World { env, events, sms, parties, service }
}

async fn world() -> World {
    world_with(recovery_settings(), quiet_sweeper()).await
}

impl World {
    async fn request(&self) -> Uuid {
        let command = self.env.command(cmd::RECOVERY_REQUESTED, &self.truster_json()).await;
        let opened = self.events.outcome(&command, ev::RECOVERY_AWAITING_CONTACT).await;
        assert_eq!(opened.payload["existing"], json!(false));
        opened.payload["recovery_id"].as_str().unwrap().parse().unwrap()
    }

    fn truster_json(&self) -> Value {
        json!({ "truster_id": self.parties.truster })
    }

    async fn confirm(&self, recovery_id: Uuid, actor: Uuid) -> Envelope {
        let payload = json!({ "recovery_id": recovery_id, "actor_id": actor });
        self.env.command(cmd::RECOVERY_CONFIRMED, &payload).await
    }

    async fn submit(&self, recovery_id: Uuid, actor: Uuid, code: &str) -> Envelope {
        let payload = json!({ "recovery_id": recovery_id, "actor_id": actor, "code": code });
        self.env.command(cmd::RECOVERY_CODE_SUBMITTED, &payload).await
    }

    /// Confirms as the contact and returns the code the SMS carries.
    async fn code(&self, recovery_id: Uuid) -> String {
        let confirm = self.confirm(recovery_id, self.parties.contact).await;
        self.events.outcome(&confirm, ev::RECOVERY_CODE_SENT).await;
        sent_code(&self.sms, &confirm, &self.parties.contact_phone).await
    }

    async fn row(&self, recovery_id: Uuid) -> (String, i32, i32) {
        sqlx::query_as(
            "SELECT status, codes_sent, wrong_attempts FROM recovery_requests \
             WHERE recovery_id = $1",
        )
        .bind(recovery_id)
        .fetch_one(&self.env.pool)
        .await
        .unwrap()
    }

    async fn audit_actions(&self, recovery_id: Uuid) -> Vec<String> {
        sqlx::query_scalar("SELECT action FROM audit_log WHERE subject_id = $1 ORDER BY id")
            .bind(recovery_id)
            .fetch_all(&self.env.pool)
            .await
            .unwrap()
    }

    /// Waits until the recovery queue is drained. The runtime acks only after
    /// handling, so a drained queue plus a short grace means duplicates were
    /// seen and dropped.
    async fn settle(&self) {
        self.env.wait_queue_drained(recovery::NAME, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The code of the SMS the `confirm` command asked for, read off the
/// internal exchange as the SMS worker would.
async fn sent_code(sms: &EventTap, confirm: &Envelope, phone: &str) -> String {
    let id = confirm.message_id.to_string();
    let seen = sms
        .wait_until("the code SMS", Duration::from_secs(10), |all| {
            all.iter().any(|e| e.causation_id.as_deref() == Some(&id))
        })
        .await;
    let envelope = seen.into_iter().find(|e| e.causation_id.as_deref() == Some(&id)).unwrap();
    let request: SmsRequested = envelope.payload_as().unwrap();
    assert_eq!(request.phone, phone);
    assert_eq!(request.requested_by, "recovery");
    match request.template {
        SmsTemplate::RecoveryCode { sealed_code, valid_minutes, .. } => {
            assert_eq!(valid_minutes, 5);
            assert!(sealed_code.len() > 40, "the code travels sealed");
            let secret = recovery::settings::code_secret(&Environment::Development).unwrap();
            recovery::seal::CodeSeal::new(&secret).unwrap().open(&sealed_code).unwrap()
        }
        other => panic!("expected the code SMS, got {other:?}"),
    }
}

fn wrong(code: &str) -> String {
    let last = code.as_bytes()[5] - b'0';
    format!("{}{}", &code[..5], (last + 1) % 10)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recovery_goes_from_request_to_approval_with_the_code_from_the_sms() {
    let w = world().await;
    let (truster, contact) = (w.parties.truster, w.parties.contact);
    let command = w.env.command(cmd::RECOVERY_REQUESTED, &w.truster_json()).await;
    let opened = w.events.outcome(&command, ev::RECOVERY_AWAITING_CONTACT).await;
    let recovery_id: Uuid = opened.payload["recovery_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(opened.payload["contact_id"], json!(contact));
    assert_eq!(opened.correlation_id, Some(command.message_id.to_string()));
    let seen = w
        .events
        .wait_until("both notified", Duration::from_secs(10), |all| {
            all.iter().filter(|e| e.kind == ev::CABINET_NOTIFICATION).count() == 2
        })
        .await;
    let notified: Vec<_> = seen
        .iter()
        .filter(|e| e.kind == ev::CABINET_NOTIFICATION)
        .map(|e| e.payload["account_id"].clone())
        .collect();
    assert!(notified.contains(&json!(truster)) && notified.contains(&json!(contact)));
    let to_contact = seen.iter().find(|e| e.payload["account_id"] == json!(contact)).unwrap();
    let text = to_contact.payload["text"].as_str().unwrap();
    assert!(text.contains("Иван П.") && !text.contains("Петров"), "{text}");
    let notice = w.sms.wait_until("notice SMS", Duration::from_secs(10), |s| !s.is_empty()).await;
    let notice: SmsRequested = notice[0].payload_as().unwrap();
    assert_eq!(notice.template.kind(), "recovery_request_notice");
    assert_eq!(notice.phone, w.parties.contact_phone);

    let confirm = w.confirm(recovery_id, contact).await;
    let sent = w.events.outcome(&confirm, ev::RECOVERY_CODE_SENT).await;
    assert_eq!(sent.payload["codes_left"], json!(2));
    let code = sent_code(&w.sms, &confirm, &w.parties.contact_phone).await;
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT code_hmac FROM recovery_requests WHERE recovery_id = $1")
            .bind(recovery_id)
            .fetch_one(&w.env.pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), 32, "only an HMAC-SHA256 is kept");
    assert!(
        !hex::encode(&stored).contains(&code) && !stored.windows(6).any(|b| b == code.as_bytes())
    );

    let submit = w.submit(recovery_id, contact, &code).await;
    let approved = w.events.outcome(&submit, ev::RECOVERY_APPROVED).await;
    assert_eq!(approved.payload["truster_id"], json!(truster));
    let told = w
        .events
        .wait_until("both told of the approval", Duration::from_secs(10), |all| {
            all.iter()
                .filter(|e| {
                    e.kind == ev::CABINET_NOTIFICATION
                        && e.causation_id == Some(submit.message_id.to_string())
                })
                .count()
                == 2
        })
        .await;
    assert!(told.iter().all(|e| !e.payload.to_string().contains(&code)));
    assert_eq!(w.row(recovery_id).await, ("approved".to_owned(), 1, 0));
    assert_eq!(w.audit_actions(recovery_id).await, ["opened", "code_sent", "approved"]);
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_codes_leave_two_then_one_attempt_then_lock_and_the_right_code_is_refused_after() {
    let w = world().await;
    let contact = w.parties.contact;
    let recovery_id = w.request().await;
    let code = w.code(recovery_id).await;
    for left in [2, 1] {
        let submit = w.submit(recovery_id, contact, &wrong(&code)).await;
        let rejected = w.events.outcome(&submit, ev::RECOVERY_CODE_REJECTED).await;
        assert_eq!(rejected.payload["attempts_left"], json!(left));
        assert_eq!(rejected.payload["reason"], json!("code_incorrect"));
    }
    let third = w.submit(recovery_id, contact, &wrong(&code)).await;
    let locked = w.events.outcome(&third, ev::RECOVERY_REJECTED).await;
    assert_eq!(locked.payload["reason"], json!("recovery_locked"));
    let told = w.events.outcome(&third, ev::CABINET_NOTIFICATION).await;
    assert_eq!(told.payload["account_id"], json!(w.parties.truster));
    assert_eq!(w.row(recovery_id).await, ("locked".to_owned(), 1, 3));

    let right = w.submit(recovery_id, contact, &code).await;
    let refused = w.events.outcome(&right, ev::RECOVERY_REJECTED).await;
    assert_eq!(refused.payload["reason"], json!("recovery_locked"));
    assert_eq!(w.row(recovery_id).await, ("locked".to_owned(), 1, 3));
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_code_is_refused_without_costing_an_attempt() {
    let w = world().await;
    let recovery_id = w.request().await;
    let code = w.code(recovery_id).await;
    // Stale state by editing the row: the code's five minutes are over.
    sqlx::query(
        "UPDATE recovery_requests SET code_expires_at = now() - interval '1 second' \
         WHERE recovery_id = $1",
    )
    .bind(recovery_id)
    .execute(&w.env.pool)
    .await
    .unwrap();
    let submit = w.submit(recovery_id, w.parties.contact, &code).await;
    let rejected = w.events.outcome(&submit, ev::RECOVERY_CODE_REJECTED).await;
    assert_eq!(rejected.payload["reason"], json!("code_expired"));
    assert_eq!(rejected.payload["attempts_left"], json!(3));
    assert_eq!(w.row(recovery_id).await, ("code_sent".to_owned(), 1, 0));
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_code_sweep_kills_an_expired_code_and_tells_the_contact() {
    let w = world().await;
    let recovery_id = w.request().await;
    let code = w.code(recovery_id).await;
    sqlx::query(
        "UPDATE recovery_requests SET code_expires_at = now() - interval '1 second' \
         WHERE recovery_id = $1",
    )
    .bind(recovery_id)
    .execute(&w.env.pool)
    .await
    .unwrap();
    let topology = w.env.topology().clone();
    let report =
        recovery::sweep_due_recoveries(&w.env.pool, &topology, Utc::now(), 100).await.unwrap();
    assert_eq!(report.codes_expired, 1);
    let again =
        recovery::sweep_due_recoveries(&w.env.pool, &topology, Utc::now(), 100).await.unwrap();
    assert_eq!(again, recovery::SweepReport::default());
    let submit = w.submit(recovery_id, w.parties.contact, &code).await;
    let rejected = w.events.outcome(&submit, ev::RECOVERY_CODE_REJECTED).await;
    assert_eq!(rejected.payload["reason"], json!("code_expired"));
    let actions = w.audit_actions(recovery_id).await;
    assert_eq!(actions.iter().filter(|a| *a == "code_expired").count(), 1);
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_confirmation_within_the_minimum_interval_is_refused() {
    let w = world().await;
    let recovery_id = w.request().await;
    w.code(recovery_id).await;
    let again = w.confirm(recovery_id, w.parties.contact).await;
    let refused = w.events.outcome(&again, ev::RECOVERY_REJECTED).await;
    assert_eq!(refused.payload["reason"], json!("code_too_soon"));
    assert_eq!(w.row(recovery_id).await, ("code_sent".to_owned(), 1, 0));
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_code_kills_the_previous_one_and_a_fourth_code_is_refused() {
    let w = world().await;
    let recovery_id = w.request().await;
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(w.code(recovery_id).await);
        // The last code is a minute old, as if the contact had waited.
        sqlx::query(
            "UPDATE recovery_requests SET last_code_at = now() - interval '61 seconds' \
             WHERE recovery_id = $1",
        )
        .bind(recovery_id)
        .execute(&w.env.pool)
        .await
        .unwrap();
    }
    let fourth = w.confirm(recovery_id, w.parties.contact).await;
    let refused = w.events.outcome(&fourth, ev::RECOVERY_REJECTED).await;
    assert_eq!(refused.payload["reason"], json!("code_limit_reached"));
    assert_eq!(w.row(recovery_id).await, ("code_sent".to_owned(), 3, 0));
    if codes[0] != codes[2] {
        let old = w.submit(recovery_id, w.parties.contact, &codes[0]).await;
        let rejected = w.events.outcome(&old, ev::RECOVERY_CODE_REJECTED).await;
        assert_eq!(rejected.payload["reason"], json!("code_incorrect"));
    }
    let current = w.submit(recovery_id, w.parties.contact, &codes[2]).await;
    w.events.outcome(&current, ev::RECOVERY_APPROVED).await;
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nobody_but_the_contact_may_confirm_submit_or_decline_nor_anyone_but_the_truster_cancel() {
    let w = world().await;
    let (truster, contact) = (w.parties.truster, w.parties.contact);
    let stranger = add_account(&w.env, "Олег", "Кузнецов", Some("+79035556677")).await;
    let recovery_id = w.request().await;
    let code = w.code(recovery_id).await;
    let before = w.row(recovery_id).await;

    let by_id = |actor: Uuid| json!({ "recovery_id": recovery_id, "actor_id": actor });
    let decline = |actor: Uuid| {
        let reason = "suspected_fraud";
        json!({ "recovery_id": recovery_id, "actor_id": actor, "reason": reason })
    };
    let attempts = [
        (w.confirm(recovery_id, stranger).await, "not_trusters_contact"),
        (w.confirm(recovery_id, truster).await, "not_trusters_contact"),
        (w.submit(recovery_id, stranger, &code).await, "not_trusters_contact"),
        (w.submit(recovery_id, truster, &code).await, "not_trusters_contact"),
        (w.env.command(cmd::RECOVERY_DECLINED, &decline(stranger)).await, "not_trusters_contact"),
        (w.env.command(cmd::RECOVERY_CANCELLED, &by_id(stranger)).await, "not_the_truster"),
        (w.env.command(cmd::RECOVERY_CANCELLED, &by_id(contact)).await, "not_the_truster"),
    ];
    for (command, reason) in &attempts {
        let refused = w.events.outcome(command, ev::RECOVERY_REJECTED).await;
        assert_eq!(refused.payload["reason"], json!(reason), "{}", command.kind);
        assert_eq!(refused.payload["recovery_id"], json!(recovery_id));
        assert_eq!(refused.payload["truster_id"], Value::Null, "whose request stays unsaid");
        assert_eq!(w.events.caused_by(command).len(), 1, "one outcome, no notification");
    }
    assert_eq!(w.row(recovery_id).await, before);
    let frauds: i64 = sqlx::query_scalar("SELECT count(*) FROM fraud_reports")
        .fetch_one(&w.env.pool)
        .await
        .unwrap();
    assert_eq!(frauds, 0);
    let refusals = w.audit_actions(recovery_id).await.iter().filter(|a| *a == "refused").count();
    assert_eq!(refusals, attempts.len());

    // The real contact's code still works: nothing the others did counted.
    let submit = w.submit(recovery_id, contact, &code).await;
    w.events.outcome(&submit, ev::RECOVERY_APPROVED).await;
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_decline_by_the_contact_ends_the_request_tells_the_truster_and_reports_fraud() {
    let w = world().await;
    let recovery_id = w.request().await;
    let payload = json!({
        "recovery_id": recovery_id, "actor_id": w.parties.contact, "reason": "suspected_fraud"
    });
    let command = w.env.command(cmd::RECOVERY_DECLINED, &payload).await;
    let declined = w.events.outcome(&command, ev::RECOVERY_DECLINED).await;
    assert_eq!(declined.payload["reason"], json!("suspected_fraud"));
    let told = w.events.outcome(&command, ev::CABINET_NOTIFICATION).await;
    assert_eq!(told.payload["account_id"], json!(w.parties.truster));
    assert_eq!(w.row(recovery_id).await.0, "declined");
    let report: (Uuid, Uuid, String) = sqlx::query_as(
        "SELECT truster_id, contact_id, reason FROM fraud_reports WHERE recovery_id = $1",
    )
    .bind(recovery_id)
    .fetch_one(&w.env.pool)
    .await
    .unwrap();
    assert_eq!(report, (w.parties.truster, w.parties.contact, "suspected_fraud".to_owned()));
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_truster_cancels_and_the_contact_is_told() {
    let w = world().await;
    let recovery_id = w.request().await;
    let payload = json!({ "recovery_id": recovery_id, "actor_id": w.parties.truster });
    let command = w.env.command(cmd::RECOVERY_CANCELLED, &payload).await;
    w.events.outcome(&command, ev::RECOVERY_CANCELLED).await;
    let told = w.events.outcome(&command, ev::CABINET_NOTIFICATION).await;
    assert_eq!(told.payload["account_id"], json!(w.parties.contact));
    assert_eq!(w.row(recovery_id).await.0, "cancelled");
    let late = w.confirm(recovery_id, w.parties.contact).await;
    let refused = w.events.outcome(&late, ev::RECOVERY_REJECTED).await;
    assert_eq!(refused.payload["reason"], json!("recovery_not_active"));
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_without_an_active_contact_is_refused() {
    let w = world().await;
    let alone = add_account(&w.env, "Пётр", "Орлов", Some("+79037778899")).await;
    let command = w.env.command(cmd::RECOVERY_REQUESTED, &json!({ "truster_id": alone })).await;
    let refused = w.events.outcome(&command, ev::RECOVERY_REJECTED).await;
    assert_eq!(refused.payload["reason"], json!("no_active_contact"));
    assert_eq!(refused.payload["recovery_id"], json!(null));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM recovery_requests")
        .fetch_one(&w.env.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_while_one_is_active_returns_the_active_one_and_a_fourth_in_a_day_is_refused() {
    let w = world().await;
    let first = w.request().await;
    let again = w.env.command(cmd::RECOVERY_REQUESTED, &w.truster_json()).await;
    let existing = w.events.outcome(&again, ev::RECOVERY_AWAITING_CONTACT).await;
    assert_eq!(existing.payload["existing"], json!(true));
    assert_eq!(existing.payload["recovery_id"], json!(first));
    for _ in 0..2 {
        sqlx::query(
            "UPDATE recovery_requests SET status = 'cancelled' WHERE status = 'awaiting_contact'",
        )
        .execute(&w.env.pool)
        .await
        .unwrap();
        w.request().await;
    }
    sqlx::query(
        "UPDATE recovery_requests SET status = 'cancelled' WHERE status = 'awaiting_contact'",
    )
    .execute(&w.env.pool)
    .await
    .unwrap();
    let fourth = w.env.command(cmd::RECOVERY_REQUESTED, &w.truster_json()).await;
    let refused = w.events.outcome(&fourth, ev::RECOVERY_REJECTED).await;
    assert_eq!(refused.payload["reason"], json!("recovery_rate_limited"));
    // A day later the truster may ask again.
    sqlx::query("UPDATE recovery_requests SET created_at = created_at - interval '25 hours'")
        .execute(&w.env.pool)
        .await
        .unwrap();
    w.request().await;
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_expires_after_its_window_through_the_deadline_message() {
    let mut settings = recovery_settings();
    settings.window = Duration::from_secs(2);
    let w = world_with(settings, quiet_sweeper()).await;
    let command = w.env.command(cmd::RECOVERY_REQUESTED, &w.truster_json()).await;
    let opened = w.events.outcome(&command, ev::RECOVERY_AWAITING_CONTACT).await;
    let recovery_id: Uuid = opened.payload["recovery_id"].as_str().unwrap().parse().unwrap();
    let seen = w
        .events
        .wait_until("recovery.expired", Duration::from_secs(15), |all| {
            all.iter().any(|e| e.kind == ev::RECOVERY_EXPIRED)
        })
        .await;
    let expired = seen.iter().find(|e| e.kind == ev::RECOVERY_EXPIRED).unwrap();
    assert_eq!(expired.payload["recovery_id"], json!(recovery_id));
    assert_eq!(expired.correlation_id, Some(command.message_id.to_string()));
    let deadline = recovery::deadline_id(recovery::RECOVERY_DEADLINE, recovery_id, None);
    assert_eq!(expired.causation_id, Some(deadline.to_string()));
    let told = w
        .events
        .wait_until("both told", Duration::from_secs(10), |all| {
            all.iter()
                .filter(|e| {
                    e.kind == ev::CABINET_NOTIFICATION
                        && e.causation_id == Some(deadline.to_string())
                })
                .count()
                == 2
        })
        .await;
    assert!(!told.is_empty());
    assert_eq!(w.row(recovery_id).await.0, "expired");
    let active: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM recovery_requests \
         WHERE status IN ('awaiting_contact', 'code_sent')",
    )
    .fetch_one(&w.env.pool)
    .await
    .unwrap();
    assert_eq!(active, 0);
    // The periodic sweep now finds nothing left to do for this request.
    let topology = w.env.topology().clone();
    let report =
        recovery::sweep_due_recoveries(&w.env.pool, &topology, Utc::now(), 100).await.unwrap();
    assert_eq!(report, recovery::SweepReport::default());
    let late = w.confirm(recovery_id, w.parties.contact).await;
    let refused = w.events.outcome(&late, ev::RECOVERY_REJECTED).await;
    assert_eq!(refused.payload["reason"], json!("recovery_expired"));
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deadline_that_arrives_early_is_sent_back_and_the_request_still_expires_once() {
    let mut settings = recovery_settings();
    settings.window = Duration::from_secs(3);
    let w = world_with(settings, quiet_sweeper()).await;
    let recovery_id = w.request().await;
    // The request's own deadline message, delivered at once, as a broker or a
    // worker whose clock runs ahead would deliver it.
    let mut early =
        Envelope::new_command(recovery::RECOVERY_DEADLINE, &json!({ "recovery_id": recovery_id }))
            .unwrap();
    early.message_id = recovery::deadline_id(recovery::RECOVERY_DEADLINE, recovery_id, None);
    w.env.publish_to_worker(sweeper::NAME, &early).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(w.row(recovery_id).await.0, "awaiting_contact", "not expired before its time");
    let seen = w
        .events
        .wait_until("recovery.expired", Duration::from_secs(15), |all| {
            all.iter().any(|e| e.kind == ev::RECOVERY_EXPIRED)
        })
        .await;
    assert_eq!(seen.iter().filter(|e| e.kind == ev::RECOVERY_EXPIRED).count(), 1);
    assert_eq!(w.row(recovery_id).await.0, "expired");
    // The scheduled copy of the same deadline arrives a second later and is
    // dropped by the inbox.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(w.audit_actions(recovery_id).await, ["opened", "expired"]);
    let expired_events = w.events.all().iter().filter(|e| e.kind == ev::RECOVERY_EXPIRED).count();
    assert_eq!(expired_events, 1);
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ledger_sweep_expires_a_due_request_once_however_often_it_runs() {
    let w = world().await;
    let recovery_id = w.request().await;
    sqlx::query(
        "UPDATE recovery_requests SET expires_at = now() - interval '1 second' \
         WHERE recovery_id = $1",
    )
    .bind(recovery_id)
    .execute(&w.env.pool)
    .await
    .unwrap();
    let topology = w.env.topology().clone();
    let (a, b) = tokio::join!(
        recovery::sweep_due_recoveries(&w.env.pool, &topology, Utc::now(), 100),
        recovery::sweep_due_recoveries(&w.env.pool, &topology, Utc::now(), 100),
    );
    assert_eq!(a.unwrap().requests_expired + b.unwrap().requests_expired, 1);
    w.events
        .wait_until("recovery.expired", Duration::from_secs(10), |all| {
            all.iter().any(|e| e.kind == ev::RECOVERY_EXPIRED)
        })
        .await;
    assert_eq!(w.row(recovery_id).await.0, "expired");
    assert_eq!(w.audit_actions(recovery_id).await, ["opened", "expired"]);
    // A new request may open now the old one left the active set.
    w.request().await;
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_delivered_twice_takes_effect_once() {
    let w = world().await;
    let contact = w.parties.contact;
    let request = Envelope::new_command(cmd::RECOVERY_REQUESTED, &w.truster_json()).unwrap();
    w.env.publish_envelope(&request).await;
    w.env.publish_envelope(&request).await;
    let opened = w.events.outcome(&request, ev::RECOVERY_AWAITING_CONTACT).await;
    let recovery_id: Uuid = opened.payload["recovery_id"].as_str().unwrap().parse().unwrap();

    let confirm = Envelope::new_command(
        cmd::RECOVERY_CONFIRMED,
        &json!({ "recovery_id": recovery_id, "actor_id": contact }),
    )
    .unwrap();
    w.env.publish_envelope(&confirm).await;
    w.env.publish_envelope(&confirm).await;
    w.events.outcome(&confirm, ev::RECOVERY_CODE_SENT).await;
    let code = sent_code(&w.sms, &confirm, &w.parties.contact_phone).await;

    let wrong_submit = Envelope::new_command(
        cmd::RECOVERY_CODE_SUBMITTED,
        &json!({ "recovery_id": recovery_id, "actor_id": contact, "code": wrong(&code) }),
    )
    .unwrap();
    w.env.publish_envelope(&wrong_submit).await;
    w.env.publish_envelope(&wrong_submit).await;
    let rejected = w.events.outcome(&wrong_submit, ev::RECOVERY_CODE_REJECTED).await;
    assert_eq!(rejected.payload["attempts_left"], json!(2));
    w.settle().await;

    assert_eq!(w.events.caused_by(&request).len(), 3, "outcome and two notifications");
    assert_eq!(w.events.caused_by(&confirm).len(), 1);
    assert_eq!(w.events.caused_by(&wrong_submit).len(), 1);
    let sms_for_confirm = w
        .sms
        .all()
        .iter()
        .filter(|e| e.causation_id == Some(confirm.message_id.to_string()))
        .count();
    assert_eq!(sms_for_confirm, 1);
    assert_eq!(w.row(recovery_id).await, ("code_sent".to_owned(), 1, 1));
    let opened_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM recovery_requests")
        .fetch_one(&w.env.pool)
        .await
        .unwrap();
    assert_eq!(opened_rows, 1);
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_code_replayed_after_approval_neither_approves_again_nor_counts_as_wrong() {
    let w = world().await;
    let contact = w.parties.contact;
    let recovery_id = w.request().await;
    let code = w.code(recovery_id).await;
    let submit = w.submit(recovery_id, contact, &code).await;
    w.events.outcome(&submit, ev::RECOVERY_APPROVED).await;

    // The same message again (a broker redelivery or an operator's replay).
    w.env.publish_envelope(&submit).await;
    // The same code again as a new message (the portal resubmitting).
    let resubmit = w.submit(recovery_id, contact, &code).await;
    let refused = w.events.outcome(&resubmit, ev::RECOVERY_REJECTED).await;
    assert_eq!(refused.payload["reason"], json!("recovery_not_active"));
    w.settle().await;

    let approvals = w.events.all().iter().filter(|e| e.kind == ev::RECOVERY_APPROVED).count();
    assert_eq!(approvals, 1);
    assert_eq!(w.row(recovery_id).await, ("approved".to_owned(), 1, 0));
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_log_line_of_the_real_binary_contains_the_code_or_the_contacts_phone() {
    use tokio::io::AsyncReadExt;

    let env = TestEnv::new().await;
    let parties = connected(&env).await;
    env.declare(&app::service_topology()).await;
    let events = env.tap_events().await;
    let sms = env.tap_internal("sms.requested").await;
    let mut child = env
        .binary_command(&["run", "--worker", "recovery", "sweeper"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env("TC_LOG", "trace")
        .spawn()
        .expect("spawn trusted-contact");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    // Read while the child runs, so a full pipe never blocks its logging.
    let out = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = stdout.read_to_end(&mut text).await;
        text
    });
    let err = tokio::spawn(async move {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text).await;
        text
    });

    let request =
        env.command(cmd::RECOVERY_REQUESTED, &json!({ "truster_id": parties.truster })).await;
    let opened = events.outcome(&request, ev::RECOVERY_AWAITING_CONTACT).await;
    let recovery_id = opened.payload["recovery_id"].clone();
    let confirm = env
        .command(
            cmd::RECOVERY_CONFIRMED,
            &json!({ "recovery_id": recovery_id, "actor_id": parties.contact }),
        )
        .await;
    events.outcome(&confirm, ev::RECOVERY_CODE_SENT).await;
    let code = sent_code(&sms, &confirm, &parties.contact_phone).await;
    let wrong_submit = env
        .command(
            cmd::RECOVERY_CODE_SUBMITTED,
            &json!({ "recovery_id": recovery_id, "actor_id": parties.contact,
                     "code": wrong(&code) }),
        )
        .await;
    events.outcome(&wrong_submit, ev::RECOVERY_CODE_REJECTED).await;
    let submit = env
        .command(
            cmd::RECOVERY_CODE_SUBMITTED,
            &json!({ "recovery_id": recovery_id, "actor_id": parties.contact, "code": code }),
        )
        .await;
    events.outcome(&submit, ev::RECOVERY_APPROVED).await;

    let pid = child.id().unwrap().to_string();
    let status = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await;
    assert!(status.unwrap().success());
    tokio::time::timeout(Duration::from_secs(30), child.wait()).await.unwrap().unwrap();
    let logs = [out.await.unwrap(), err.await.unwrap()].concat();
    let logs = String::from_utf8_lossy(&logs);
    assert!(logs.lines().count() > 20, "trace logging produced too little: {logs}");
    let national = &parties.contact_phone[2..];
    for (line_no, line) in logs.lines().enumerate() {
        assert!(!line.contains(&code), "line {line_no} holds the code: {line}");
        assert!(!line.contains(&wrong(&code)), "line {line_no} holds a submitted code");
        assert!(!line.contains(national), "line {line_no} holds the phone: {line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_sent_over_a_link_that_ended_leaves_the_active_set() {
    let w = world().await;
    let old_request = w.request().await;
    // The truster disconnects the contact and connects another, written
    // straight into the ledger as the invitations worker would.
    sqlx::query(
        "UPDATE trust_links SET status = 'disconnected', disconnected_at = now(), \
         disconnected_by = truster_id WHERE truster_id = $1",
    )
    .bind(w.parties.truster)
    .execute(&w.env.pool)
    .await
    .unwrap();
    let refused = w.confirm(old_request, w.parties.contact).await;
    let refusal = w.events.outcome(&refused, ev::RECOVERY_REJECTED).await;
    assert_eq!(refusal.payload["reason"], json!("not_trusters_contact"));
    let new_contact = add_account(&w.env, "Мария", "Волкова", Some("+79045554433")).await;
    link(&w.env, w.parties.truster, new_contact).await;

    let command = w.env.command(cmd::RECOVERY_REQUESTED, &w.truster_json()).await;
    let opened = w.events.outcome(&command, ev::RECOVERY_AWAITING_CONTACT).await;
    assert_eq!(opened.payload["existing"], json!(false));
    assert_eq!(opened.payload["contact_id"], json!(new_contact));
    let ended = w.events.outcome(&command, ev::RECOVERY_CANCELLED).await;
    assert_eq!(ended.payload["recovery_id"], json!(old_request));
    assert_eq!(w.row(old_request).await.0, "cancelled");
    // The old request's end is told in the old request's flow.
    let old_flow: String =
        sqlx::query_scalar("SELECT correlation_id FROM recovery_requests WHERE recovery_id = $1")
            .bind(old_request)
            .fetch_one(&w.env.pool)
            .await
            .unwrap();
    assert_ne!(old_flow, command.message_id.to_string());
    assert_eq!(ended.correlation_id, Some(old_flow));
    w.service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_contact_may_leave_only_once_the_request_has_expired() {
    let env = TestEnv::new().await;
    let parties = connected(&env).await;
    env.declare(&app::service_topology()).await;
    let events = env.tap_events().await;
    let mut settings = recovery_settings();
    settings.window = Duration::from_secs(3);
    let invitations = trusted_contact::invitations::InvitationSettings::from_env().unwrap();
    let service = env.serve(move |runtime| {
        let topology = app::service_topology();
        let mut handles = vec![
            runtime.spawn_worker(RecoveryWorker::new(settings), topology.clone()),
            runtime.spawn_worker(
                trusted_contact::invitations::Invitations { settings: invitations },
                topology.clone(),
            ),
        ];
        handles.extend(sweeper::spawn(runtime, quiet_sweeper(), topology));
        handles
    });
    let truster = json!({ "truster_id": parties.truster });
    let opened = env.command(cmd::RECOVERY_REQUESTED, &truster).await;
    events.outcome(&opened, ev::RECOVERY_AWAITING_CONTACT).await;

    let leave = json!({ "actor_id": parties.contact, "truster_id": parties.truster });
    let too_early = env.command(cmd::CONTACT_DISCONNECT_REQUESTED, &leave).await;
    let refused = events.outcome(&too_early, ev::CONTACT_DISCONNECT_REJECTED).await;
    assert_eq!(refused.payload["reason"], json!("recovery_active"));

    events
        .wait_until("recovery.expired", Duration::from_secs(15), |all| {
            all.iter().any(|e| e.kind == ev::RECOVERY_EXPIRED)
        })
        .await;
    let after = env.command(cmd::CONTACT_DISCONNECT_REQUESTED, &leave).await;
    let left = events.outcome(&after, ev::CONTACT_DISCONNECTED).await;
    assert_eq!(left.payload["contact_id"], json!(parties.contact));
    let status: String = sqlx::query_scalar("SELECT status FROM trust_links WHERE truster_id = $1")
        .bind(parties.truster)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(status, "disconnected");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_contact_may_leave_once_the_request_ran_out_even_before_any_sweeper_ended_it() {
    let env = TestEnv::new().await;
    let parties = connected(&env).await;
    env.declare(&app::service_topology()).await;
    let events = env.tap_events().await;
    let mut settings = recovery_settings();
    settings.window = Duration::from_secs(2);
    let invitations = trusted_contact::invitations::InvitationSettings::from_env().unwrap();
    // No sweeper: the deadline message waits in its queue.
    let service = env.serve(move |runtime| {
        let topology = app::service_topology();
        vec![
            runtime.spawn_worker(RecoveryWorker::new(settings), topology.clone()),
            runtime.spawn_worker(
                trusted_contact::invitations::Invitations { settings: invitations },
                topology,
            ),
        ]
    });
    let opened =
        env.command(cmd::RECOVERY_REQUESTED, &json!({ "truster_id": parties.truster })).await;
    let awaiting = events.outcome(&opened, ev::RECOVERY_AWAITING_CONTACT).await;
    let leave = json!({ "actor_id": parties.contact, "truster_id": parties.truster });
    let too_early = env.command(cmd::CONTACT_DISCONNECT_REQUESTED, &leave).await;
    let refused = events.outcome(&too_early, ev::CONTACT_DISCONNECT_REJECTED).await;
    assert_eq!(refused.payload["reason"], json!("recovery_active"));

    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let after = env.command(cmd::CONTACT_DISCONNECT_REQUESTED, &leave).await;
    events.outcome(&after, ev::CONTACT_DISCONNECTED).await;
    let expired = events.outcome(&after, ev::RECOVERY_EXPIRED).await;
    assert_eq!(expired.payload["recovery_id"], awaiting.payload["recovery_id"]);
    assert_eq!(expired.correlation_id, Some(opened.message_id.to_string()));
    let status: String =
        sqlx::query_scalar("SELECT status FROM recovery_requests WHERE truster_id = $1")
            .bind(parties.truster)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(status, "expired");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truster_who_disconnects_the_contact_ends_the_open_request() {
    let env = TestEnv::new().await;
    let parties = connected(&env).await;
    env.declare(&app::service_topology()).await;
    let events = env.tap_events().await;
    let invitations = trusted_contact::invitations::InvitationSettings::from_env().unwrap();
    let service = env.serve(move |runtime| {
        let topology = app::service_topology();
        vec![
            runtime.spawn_worker(RecoveryWorker::new(recovery_settings()), topology.clone()),
            runtime.spawn_worker(
                trusted_contact::invitations::Invitations { settings: invitations },
                topology,
            ),
        ]
    });
    let opened =
        env.command(cmd::RECOVERY_REQUESTED, &json!({ "truster_id": parties.truster })).await;
    let awaiting = events.outcome(&opened, ev::RECOVERY_AWAITING_CONTACT).await;
    let recovery_id = awaiting.payload["recovery_id"].clone();

    let leave = json!({ "actor_id": parties.truster, "truster_id": parties.truster });
    let disconnect = env.command(cmd::CONTACT_DISCONNECT_REQUESTED, &leave).await;
    events.outcome(&disconnect, ev::CONTACT_DISCONNECTED).await;
    let cancelled = events.outcome(&disconnect, ev::RECOVERY_CANCELLED).await;
    assert_eq!(cancelled.payload["recovery_id"], recovery_id);
    // The end of the request belongs to the recovery's flow, so that the
    // disconnection keeps exactly one outcome in its own.
    assert_eq!(cancelled.correlation_id, Some(opened.message_id.to_string()));
    let flow = disconnect.message_id.to_string();
    let outcomes: Vec<String> = events
        .all()
        .into_iter()
        .filter(|e| e.correlation_id.as_deref() == Some(&flow))
        .filter(|e| e.kind != ev::CABINET_NOTIFICATION)
        .map(|e| e.kind)
        .collect();
    assert_eq!(outcomes, [ev::CONTACT_DISCONNECTED]);
    let status: String =
        sqlx::query_scalar("SELECT status FROM recovery_requests WHERE truster_id = $1")
            .bind(parties.truster)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(status, "cancelled");
    service.stop().await;
}
