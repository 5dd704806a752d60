//! `trusted-contact loadgen`: the load publisher. It seeds citizens through
//! the portal's own `account.updated` messages, then starts flows at a target
//! rate, each a sequence of portal commands that waits for the outcome of the
//! previous one, exactly as people using the portal would. It measures the
//! end-to-end latency of every command (publish to outcome event), counts
//! commands that got no outcome, and writes a JSON report and an HTML page.

mod people;
mod report;

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::RngExt;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

pub use report::LoadReport;

use crate::{ledger, portal::PortalClient, settings::Settings};
use people::{Citizen, CitizenFactory};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Only invitation requests, each to a contact of its own: the
    /// throughput of the busiest path.
    Invitations,
    /// Whole lives: invitation, acceptance or decline, recovery with a code
    /// read back from the SMS gateway, disconnection; with duplicates and
    /// refused commands mixed in.
    Mixed,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LoadOptions {
    #[arg(long, value_enum, default_value = "mixed")]
    pub scenario: Scenario,
    /// Flows started per second.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// How long to start flows for.
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Stop after this many flows, whatever the duration.
    #[arg(long)]
    pub count: Option<usize>,
    /// Publishing channels used concurrently.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Share of commands published twice (the copy must change nothing).
    #[arg(long, default_value_t = 0.05)]
    pub duplicate_share: f64,
    /// Share of flows that send a command the service must refuse.
    #[arg(long, default_value_t = 0.1)]
    pub refused_share: f64,
    /// Share of seeded citizens who break an eligibility rule.
    #[arg(long, default_value_t = 0.05)]
    pub ineligible_share: f64,
    /// How long a command may wait for its outcome before it counts as lost.
    #[arg(long, default_value_t = 30)]
    pub outcome_timeout_secs: u64,
    #[arg(long, env = "TC_SMS_GATEWAY_URL", default_value = "http://127.0.0.1:8090")]
    pub gateway_url: String,
    /// Where report.json and report.html go.
    #[arg(long, default_value = "loadgen-report")]
    pub report_dir: std::path::PathBuf,
    /// Hide the progress bar (CI logs).
    #[arg(long)]
    pub quiet: bool,
}

/// What every command's outcome told, shared by the flows.
#[derive(Default)]
struct Stats {
    latency: BTreeMap<String, Histogram<u64>>,
    /// Per second since the start: latencies of the outcomes that arrived.
    timeline: Vec<Histogram<u64>>,
    outcomes: BTreeMap<String, u64>,
    sent: u64,
    lost: Vec<(String, String)>,
    /// Commands the broker did not confirm: (type, message id).
    not_published: Vec<(String, String)>,
    duplicates_sent: u64,
    duplicate_outcomes: u64,
    flows_completed: u64,
    contacts_invited: HashSet<String>,
}

fn histogram() -> Histogram<u64> {
    // Microseconds from 1 µs to 10 minutes, 3 significant digits.
    // Constant, valid bounds: this cannot fail.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

struct Load {
    portal: PortalClient,
    stats: Mutex<Stats>,
    started: Instant,
    options: LoadOptions,
    http: reqwest::Client,
}

pub async fn run(settings: &Settings, options: LoadOptions) -> anyhow::Result<LoadReport> {
    if options.rate <= 0.0 {
        bail!("--rate must be above zero");
    }
    let flows = options
        .count
        .unwrap_or((options.rate * options.duration_secs as f64).ceil() as usize)
        .max(1);
    let portal = PortalClient::with_publishers(settings, "loadgen", options.publishers).await?;
    let mut rng = rand::rng();
    let mut factory = CitizenFactory::new(&mut rng);
    let pairs: Vec<(Citizen, Citizen)> = (0..flows)
        .map(|_| {
            let truster = factory.citizen(&mut rng, 14, options.ineligible_share);
            let contact = factory.citizen(&mut rng, 18, options.ineligible_share);
            (truster, contact)
        })
        .collect();
    let load = Arc::new(Load {
        portal,
        stats: Mutex::new(Stats::default()),
        started: Instant::now(),
        options: options.clone(),
        http: reqwest::Client::new(),
    });
    seed(settings, &load, &pairs).await?;

    let bar = progress(&options, flows);
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / options.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let deadline = started + Duration::from_secs(options.duration_secs);
    let mut tasks = tokio::task::JoinSet::new();
    let mut started_flows = 0usize;
    for (truster, contact) in pairs {
        if options.count.is_none() && Instant::now() >= deadline {
            break;
        }
        ticker.tick().await;
        let flow = load.clone();
        let refused = rand::rng().random_bool(options.refused_share.clamp(0.0, 1.0));
        tasks.spawn(async move {
            match flow.options.scenario {
                Scenario::Invitations => flow.invitation_flow(&truster, &contact, refused).await,
                Scenario::Mixed => flow.life_flow(&truster, &contact, refused).await,
            }
        });
        started_flows += 1;
        load.show_progress(&bar, started_flows);
    }
    let publishing = started.elapsed();
    while tasks.join_next().await.is_some() {
        load.show_progress(&bar, started_flows);
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    let delivered = load.sms_delivered().await;
    let stats = std::mem::take(&mut *load.stats.lock().map_err(|_| anyhow::anyhow!("stats"))?);
    let listener_lost = !load.portal.still_listening();
    let mut report =
        LoadReport::build(&options, started_flows, publishing, elapsed, stats, delivered);
    report.listener_lost = listener_lost;
    report.write(&options.report_dir)?;
    if let Ok(load) = Arc::try_unwrap(load) {
        load.portal.close().await;
    }
    Ok(report)
}

fn progress(options: &LoadOptions, flows: usize) -> ProgressBar {
    let bar = if options.quiet { ProgressBar::hidden() } else { ProgressBar::new(flows as u64) };
    if let Ok(style) = ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] {pos}/{len} flows started  {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Publishes every citizen's profile, then waits until the ledger holds them
/// all, so that no invitation races its contact's profile.
async fn seed(
    settings: &Settings,
    load: &Arc<Load>,
    pairs: &[(Citizen, Citizen)],
) -> anyhow::Result<()> {
    let citizens: Vec<&Citizen> = pairs.iter().flat_map(|(a, b)| [a, b]).collect();
    let concurrency = load.options.publishers * 32;
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(citizens.iter())
        .map(|citizen| async move {
            let envelope = trusted_contact_contracts::Envelope::new_command(
                "account.updated",
                &citizen.account_updated(),
            )?;
            load.portal.publish(&envelope).await
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let ids: Vec<Uuid> = citizens.iter().map(|c| c.account_id).collect();
    let pool = ledger::connect(settings).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let seen: i64 =
            sqlx::query_scalar("SELECT count(*) FROM accounts WHERE account_id = ANY($1)")
                .bind(&ids)
                .fetch_one(&pool)
                .await?;
        if seen as usize == ids.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {seen} of {} seeded profiles reached the ledger in 120 s", ids.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pool.close().await;
    Ok(())
}

#[derive(Deserialize)]
struct DeliveredSms {
    phone: String,
    text: String,
}

impl Load {
    fn show_progress(&self, bar: &ProgressBar, started_flows: usize) {
        bar.set_position(started_flows as u64);
        if let Ok(stats) = self.stats.lock() {
            bar.set_message(format!(
                "{} commands, {} outcomes, {} lost",
                stats.sent,
                stats.outcomes.values().sum::<u64>(),
                stats.lost.len()
            ));
        }
    }

    /// Sends one command and waits for its outcome; records the latency, or
    /// the loss. Returns the outcome event's type and payload.
    async fn command(&self, kind: &str, payload: Value) -> Option<(String, Value)> {
        let envelope = trusted_contact_contracts::Envelope::new_command(kind, &payload).ok()?;
        let mut outcomes = self.portal.listen_for(&envelope);
        let sent_at = Instant::now();
        if let Err(error) = self.portal.publish(&envelope).await {
            // Never reached the service: not a loss of the system's.
            tracing::warn!(error = format!("{error:#}"), "publish failed");
            let id = envelope.message_id.to_string();
            self.with_stats(|stats| stats.not_published.push((kind.to_owned(), id)));
            return None;
        }
        let duplicate = rand::rng().random_bool(self.options.duplicate_share.clamp(0.0, 1.0));
        if duplicate && self.portal.publish(&envelope).await.is_ok() {
            self.with_stats(|stats| stats.duplicates_sent += 1);
        }
        self.with_stats(|stats| stats.sent += 1);
        let timeout = Duration::from_secs(self.options.outcome_timeout_secs);
        let Ok((outcome, _)) = outcomes.outcome(timeout).await else {
            self.record_lost(kind, &envelope);
            return None;
        };
        let micros = outcome.at.saturating_duration_since(sent_at).as_micros() as u64;
        let second = outcome.at.saturating_duration_since(self.started).as_secs() as usize;
        let event = outcome.envelope.kind.clone();
        self.with_stats(|stats| {
            stats
                .latency
                .entry(kind.to_owned())
                .or_insert_with(histogram)
                .saturating_record(micros);
            while stats.timeline.len() <= second {
                stats.timeline.push(histogram());
            }
            stats.timeline[second].saturating_record(micros);
            *stats.outcomes.entry(event.clone()).or_default() += 1;
        });
        if duplicate {
            // A second outcome for the same message would be a bug: listen a
            // little longer for one. The same event delivered again (the
            // outbox publishes at least once) is not a second outcome: the
            // portal drops it by its message_id.
            let extra = outcomes.drain(Duration::from_millis(500)).await;
            let first = outcome.envelope.message_id;
            let doubled = extra
                .iter()
                .filter(|e| outcomes.is_outcome(e) && e.envelope.message_id != first)
                .count();
            self.with_stats(|stats| stats.duplicate_outcomes += doubled as u64);
        }
        Some((event, outcome.envelope.payload))
    }

    fn record_lost(&self, kind: &str, envelope: &trusted_contact_contracts::Envelope) {
        let id = envelope.message_id.to_string();
        self.with_stats(|stats| stats.lost.push((kind.to_owned(), id)));
    }

    fn with_stats(&self, change: impl FnOnce(&mut Stats)) {
        if let Ok(mut stats) = self.stats.lock() {
            change(&mut stats);
        }
    }

    fn invite_payload(truster: &Citizen, contact: &Citizen, refused: bool) -> Value {
        // A refused flow types a first name that does not match.
        let name = if refused {
            "Несовпадающее".to_owned()
        } else {
            contact.first_name.to_uppercase()
        };
        json!({
            "truster_id": truster.account_id,
            "contact_first_name": name,
            "contact_phone": contact.phone_as_typed,
        })
    }

    async fn invitation_flow(&self, truster: &Citizen, contact: &Citizen, refused: bool) {
        let payload = Self::invite_payload(truster, contact, refused);
        if let Some((event, _)) = self.command("invitation.requested", payload).await {
            if event == "invitation.sent"
                && let Some(phone) = &contact.phone
            {
                self.with_stats(|stats| {
                    stats.contacts_invited.insert(phone.clone());
                });
            }
            self.with_stats(|stats| stats.flows_completed += 1);
        }
    }

    /// A whole life of a trust link, stopping where the service refuses.
    async fn life_flow(&self, truster: &Citizen, contact: &Citizen, refused: bool) {
        let (t, c) = (truster.account_id, contact.account_id);
        let payload = Self::invite_payload(truster, contact, refused);
        let Some((event, sent)) = self.command("invitation.requested", payload).await else {
            return;
        };
        if event != "invitation.sent" {
            return self.with_stats(|stats| stats.flows_completed += 1);
        }
        let invitation = sent["invitation_id"].clone();
        if let Some(phone) = &contact.phone {
            self.with_stats(|stats| {
                stats.contacts_invited.insert(phone.clone());
            });
        }
        if rand::rng().random_bool(0.15) {
            let decline = json!({ "invitation_id": invitation, "actor_id": c });
            self.command("invitation.declined", decline).await;
            return self.with_stats(|stats| stats.flows_completed += 1);
        }
        if rand::rng().random_bool(0.1) {
            // Someone else tries to accept: refused, and changes nothing.
            let stranger = json!({ "invitation_id": invitation, "actor_id": Uuid::new_v4() });
            self.command("invitation.accepted", stranger).await;
        }
        let accept = json!({ "invitation_id": invitation, "actor_id": c });
        let Some((event, _)) = self.command("invitation.accepted", accept).await else { return };
        if event != "invitation.accepted" {
            return self.with_stats(|stats| stats.flows_completed += 1);
        }
        let Some((event, awaiting)) =
            self.command("recovery.requested", json!({ "truster_id": t })).await
        else {
            return;
        };
        if event == "recovery.awaiting_contact" {
            self.recovery(contact, &awaiting["recovery_id"]).await;
        }
        let disconnect = json!({ "actor_id": t, "truster_id": t });
        if self.command("contact.disconnect_requested", disconnect).await.is_some() {
            self.with_stats(|stats| stats.flows_completed += 1);
        }
    }

    async fn recovery(&self, contact: &Citizen, recovery: &Value) {
        let c = contact.account_id;
        let Some(phone) = contact.phone.as_deref() else { return };
        let before = self.codes_for(phone).await.len();
        let confirm = json!({ "recovery_id": recovery, "actor_id": c });
        let Some((event, _)) = self.command("recovery.confirmed", confirm).await else { return };
        if event != "recovery.code_sent" {
            return;
        }
        let Some(code) = self.wait_for_code(phone, before).await else {
            return self.with_stats(|stats| stats.lost.push(("sms.code".into(), phone.into())));
        };
        if rand::rng().random_bool(0.1) {
            let wrong = if code == "000000" { "111111" } else { "000000" };
            let submit = json!({ "recovery_id": recovery, "actor_id": c, "code": wrong });
            self.command("recovery.code_submitted", submit).await;
        }
        let submit = json!({ "recovery_id": recovery, "actor_id": c, "code": code });
        self.command("recovery.code_submitted", submit).await;
    }

    async fn codes_for(&self, phone: &str) -> Vec<String> {
        let url = format!(
            "{}/messages?phone={}",
            self.options.gateway_url.trim_end_matches('/'),
            phone.replace('+', "%2B")
        );
        let Ok(response) = self.http.get(url).send().await else { return Vec::new() };
        let delivered: Vec<DeliveredSms> = response.json().await.unwrap_or_default();
        delivered.into_iter().filter_map(|sms| crate::demo::six_digits(&sms.text)).collect()
    }

    async fn wait_for_code(&self, phone: &str, seen_before: usize) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(self.options.outcome_timeout_secs);
        while Instant::now() < deadline {
            let codes = self.codes_for(phone).await;
            if codes.len() > seen_before {
                return codes.last().cloned();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// SMS the gateway delivered to the contacts this run invited.
    async fn sms_delivered(&self) -> Option<(usize, usize)> {
        let url = format!("{}/messages", self.options.gateway_url.trim_end_matches('/'));
        let invited = self.stats.lock().ok()?.contacts_invited.clone();
        let deadline = Instant::now() + Duration::from_secs(self.options.outcome_timeout_secs);
        loop {
            let delivered: Vec<DeliveredSms> =
                self.http.get(&url).send().await.ok()?.json().await.ok()?;
            let reached: HashSet<&str> = delivered
                .iter()
                .filter(|sms| invited.contains(&sms.phone))
                .map(|sms| sms.phone.as_str())
                .collect();
            if reached.len() >= invited.len() || Instant::now() > deadline {
                return Some((reached.len(), invited.len()));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Runs the load and fails if any command got no outcome or any duplicate
/// got a second one.
pub async fn run_and_judge(settings: &Settings, options: LoadOptions) -> anyhow::Result<()> {
    let report = run(settings, options.clone()).await.context("load run failed")?;
    println!("{}", report.summary());
    println!("report: {}", options.report_dir.join("report.html").display());
    // Either makes the run say nothing about the system: the load publisher
    // does not reconnect, so a broker restart ends what it can measure.
    if report.listener_lost {
        bail!("the event listener lost the broker; commands without an outcome are unknown");
    }
    if !report.not_published.is_empty() {
        bail!("{} command(s) could not be published", report.not_published.len());
    }
    if !report.lost.is_empty() {
        bail!("{} command(s) got no outcome", report.lost.len());
    }
    if report.duplicate_outcomes > 0 {
        bail!("{} duplicate command(s) got a second outcome", report.duplicate_outcomes);
    }
    if let Some((reached, invited)) = report.sms_delivered
        && reached < invited
    {
        bail!("only {reached} of {invited} invited contacts got their SMS");
    }
    Ok(())
}
