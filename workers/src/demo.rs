//! `trusted-contact demo`: walks a newcomer through the whole service against
//! the running system, the way the portal would drive it: two citizens, an
//! invitation, its acceptance, a password recovery approved with the code the
//! contact received by SMS. Every step waits for its event and fails the run
//! if it does not come.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use chrono::{Datelike, NaiveDate, Utc};
use rand::RngExt;
use serde::Deserialize;
use serde_json::json;
use trusted_contact_contracts::person::moscow_today;
use uuid::Uuid;

use crate::{
    ledger,
    portal::{PortalClient, Received},
    settings::Settings,
};

/// One delivered SMS as the stand-in gateway reports it.
#[derive(Debug, Deserialize)]
struct DeliveredSms {
    text: String,
}

pub struct DemoOptions {
    pub gateway_url: String,
    pub step_timeout: Duration,
}

fn say(text: &str) {
    println!("\n▶ {text}");
}

fn show(event: &Received) {
    let payload = &event.envelope.payload;
    match event.envelope.kind.as_str() {
        "cabinet.notification" => println!(
            "    ← cabinet.notification for {} ({}): «{}»",
            payload["account_id"].as_str().unwrap_or("?"),
            payload["kind"].as_str().unwrap_or("?"),
            payload["text"].as_str().unwrap_or("")
        ),
        kind => println!("    ← {kind} {payload}"),
    }
}

/// A date of birth that makes someone exactly `years` old today in Moscow.
fn born_years_ago(years: i32) -> NaiveDate {
    let today = moscow_today(Utc::now());
    NaiveDate::from_ymd_opt(today.year() - years, today.month(), today.day().min(28))
        .unwrap_or(today)
}

fn random_phone() -> String {
    let mut rng = rand::rng();
    format!("+7900{:07}", rng.random_range(0..10_000_000u32))
}

pub async fn run(settings: &Settings, options: &DemoOptions) -> anyhow::Result<()> {
    let timeout = options.step_timeout;
    let portal = PortalClient::connect(settings, "demo").await?;
    let pool = ledger::connect(settings).await?;
    let http = reqwest::Client::new();

    let truster = Uuid::new_v4();
    let contact = Uuid::new_v4();
    let contact_phone = random_phone();
    say("Two citizens update their profiles on the portal. The profile service reports both.");
    println!("    Anna Smirnova, 30, the truster:        {truster}");
    println!("    Ivan Petrov, 42, her trusted contact:  {contact} (phone {contact_phone})");
    for (id, first, last, age, phone) in [
        (truster, "Анна", "Смирнова", 30, random_phone()),
        (contact, "Иван", "Петров", 42, contact_phone.clone()),
    ] {
        let payload = json!({
            "account_id": id, "first_name": first, "last_name": last,
            "birth_date": born_years_ago(age), "citizenship": "RU", "verified": true,
            "has_passport": true, "phone": phone,
        });
        portal.send("account.updated", &payload).await?;
    }
    let seen = wait_for_accounts(&pool, &[truster, contact], timeout).await;
    pool.close().await;
    seen.context("the profiles did not reach the ledger")?;
    println!("    both profiles are in the service's ledger");

    say("Anna names Ivan as her trusted contact: his first name and his phone, typed her way.");
    let typed_phone = format!(
        "8 ({}) {}-{}-{}",
        &contact_phone[2..5],
        &contact_phone[5..8],
        &contact_phone[8..10],
        &contact_phone[10..12]
    );
    let (_, mut outcomes) = portal
        .send(
            "invitation.requested",
            &json!({ "truster_id": truster, "contact_first_name": " иван ", "contact_phone": typed_phone }),
        )
        .await?;
    let sent = expect(&mut outcomes, "invitation.sent", timeout).await?;
    let invitation_id = field(&sent, "invitation_id")?;
    println!("    The invitation waits in Ivan's personal account; he has 30 minutes to accept.");
    let notice = read_sms(&http, &options.gateway_url, &contact_phone, 1, timeout).await?;
    println!("    SMS to Ivan: «{notice}»");

    say("Ivan opens his personal account and accepts.");
    let (_, mut outcomes) = portal
        .send(
            "invitation.accepted",
            &json!({ "invitation_id": invitation_id, "actor_id": contact }),
        )
        .await?;
    expect(&mut outcomes, "invitation.accepted", timeout).await?;
    println!("    Ivan is now Anna's trusted contact.");

    say("Someone starts a password recovery of Anna's account. Ivan must approve it.");
    let (_, mut outcomes) =
        portal.send("recovery.requested", &json!({ "truster_id": truster })).await?;
    let awaiting = expect(&mut outcomes, "recovery.awaiting_contact", timeout).await?;
    let recovery_id = field(&awaiting, "recovery_id")?;
    println!("    Ivan is asked to call Anna and make sure it is really her.");

    say("Ivan has spoken to Anna and confirms in his cabinet. A code goes to his phone.");
    let (_, mut outcomes) = portal
        .send("recovery.confirmed", &json!({ "recovery_id": recovery_id, "actor_id": contact }))
        .await?;
    expect(&mut outcomes, "recovery.code_sent", timeout).await?;
    let code_sms = read_sms(&http, &options.gateway_url, &contact_phone, 3, timeout).await?;
    println!("    SMS to Ivan: «{code_sms}»");
    let code = six_digits(&code_sms).ok_or_else(|| anyhow!("no 6-digit code in the SMS"))?;

    say("Ivan types the code into his own cabinet.");
    let (_, mut outcomes) = portal
        .send(
            "recovery.code_submitted",
            &json!({ "recovery_id": recovery_id, "actor_id": contact, "code": code }),
        )
        .await?;
    expect(&mut outcomes, "recovery.approved", timeout).await?;
    println!("\n✔ The recovery is approved: the portal now gives Anna a temporary password.");
    println!("  A stranger who talked Anna into a reset would have had to get past Ivan.");
    portal.close().await;
    Ok(())
}

/// Waits for the command's outcome, shows what arrives, and fails on any
/// outcome other than `kind`.
async fn expect(
    outcomes: &mut crate::portal::Outcomes,
    kind: &str,
    within: Duration,
) -> anyhow::Result<Received> {
    let (outcome, notifications) =
        outcomes.outcome(within).await.with_context(|| format!("waiting for {kind}"))?;
    notifications.iter().for_each(show);
    show(&outcome);
    for late in outcomes.drain(Duration::from_millis(300)).await {
        show(&late);
    }
    if outcome.envelope.kind != kind {
        bail!("expected {kind}, got {} {}", outcome.envelope.kind, outcome.envelope.payload);
    }
    Ok(outcome)
}

fn field(event: &Received, name: &str) -> anyhow::Result<String> {
    event.envelope.payload[name]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{} carries no {name}", event.envelope.kind))
}

async fn wait_for_accounts(
    pool: &sqlx::PgPool,
    ids: &[Uuid],
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let seen: i64 =
            sqlx::query_scalar("SELECT count(*) FROM accounts WHERE account_id = ANY($1)")
                .bind(ids)
                .fetch_one(pool)
                .await?;
        if seen == ids.len() as i64 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("only {seen} of {} profiles arrived within {within:?}", ids.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of the `nth` SMS (1-based) the gateway delivered to `phone`.
async fn read_sms(
    http: &reqwest::Client,
    gateway: &str,
    phone: &str,
    nth: usize,
    within: Duration,
) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + within;
    let url =
        format!("{}/messages?phone={}", gateway.trim_end_matches('/'), phone.replace('+', "%2B"));
    loop {
        let delivered: Vec<DeliveredSms> = http
            .get(&url)
            .send()
            .await
            .context("cannot reach the SMS gateway")?
            .error_for_status()?
            .json()
            .await?;
        if delivered.len() >= nth {
            return Ok(delivered[nth - 1].text.clone());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("SMS number {nth} to the contact did not arrive within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn six_digits(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    chars.windows(6).enumerate().find_map(|(start, window)| {
        let before = start.checked_sub(1).and_then(|i| chars.get(i));
        let after = chars.get(start + 6);
        let isolated =
            !before.is_some_and(char::is_ascii_digit) && !after.is_some_and(char::is_ascii_digit);
        (isolated && window.iter().all(char::is_ascii_digit)).then(|| window.iter().collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_is_found_in_an_sms_text() {
        assert_eq!(six_digits("Код 042917. Никому не сообщайте."), Some("042917".into()));
        assert_eq!(six_digits("Телефон 89001234567"), None);
    }
}
