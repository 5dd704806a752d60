//! The operators' dead-letter tool: list, show, export, replay and purge what
//! the workers dead-lettered. Messages are browsed by taking them without an
//! acknowledgement and letting the broker put back every one not acted on
//! when the channel closes, in its original order.

use std::{collections::BTreeMap, io::Write, time::Duration};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use lapin::{
    BasicProperties, Channel, Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions, QueuePurgeOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde::Serialize;
use serde_json::Value;
use trusted_contact_contracts::{
    Topology,
    names::UNROUTED,
    phone::{mask_phone, normalize_phone},
};

use crate::{
    runtime::{broker, headers},
    settings::Settings,
    telemetry::redact_for_log,
};

/// What an operator sees of one dead-lettered message.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub queue: String,
    pub message_id: Option<String>,
    pub message_type: Option<String>,
    pub worker: Option<String>,
    pub failure_kind: Option<String>,
    pub error: Option<String>,
    pub attempts: Option<u32>,
    pub replays: u32,
    pub first_failure_at: Option<String>,
    pub last_failure_at: Option<String>,
    pub original_exchange: Option<String>,
    pub original_routing_key: Option<String>,
}

impl DeadLetter {
    fn from_delivery(queue: &str, delivery: &Delivery) -> Self {
        let table = delivery.properties.headers().clone().unwrap_or_default();
        let text = |name| headers::get_str(&table, name);
        // Whatever the prefix, the unrouted queue's name ends the same way.
        if queue.ends_with(&Topology::default().dead_letter_queue(UNROUTED)) {
            return Self::unrouted(queue, delivery);
        }
        DeadLetter {
            queue: queue.to_owned(),
            message_id: delivery.properties.message_id().as_ref().map(|id| id.to_string()),
            message_type: delivery.properties.kind().as_ref().map(|kind| kind.to_string()),
            worker: text(headers::WORKER),
            failure_kind: text(headers::FAILURE_KIND),
            error: text(headers::ERROR),
            attempts: headers::get_u32(&table, headers::ATTEMPTS),
            replays: headers::get_u32(&table, headers::REPLAYS).unwrap_or(0),
            first_failure_at: text(headers::FIRST_FAILURE_AT),
            last_failure_at: text(headers::LAST_FAILURE_AT),
            original_exchange: text(headers::ORIGINAL_EXCHANGE),
            original_routing_key: text(headers::ORIGINAL_ROUTING_KEY),
        }
    }
}

impl DeadLetter {
    /// A command the broker put into the unrouted queue because no worker is
    /// bound to its routing key: no worker saw it, so the route it came by is
    /// all there is to say, and where a replay sends it.
    fn unrouted(queue: &str, delivery: &Delivery) -> Self {
        let table = delivery.properties.headers().clone().unwrap_or_default();
        let exchange = delivery.exchange.to_string();
        let routing_key = delivery.routing_key.to_string();
        DeadLetter {
            queue: queue.to_owned(),
            message_id: delivery.properties.message_id().as_ref().map(|id| id.to_string()),
            message_type: delivery.properties.kind().as_ref().map(|kind| kind.to_string()),
            worker: Some(UNROUTED.to_owned()),
            failure_kind: Some(UNROUTED.to_owned()),
            // The key is the sender's text: redacted like any error text.
            error: Some(format!(
                "no worker takes routing key \"{}\" on {exchange}",
                redact_for_log(&routing_key)
            )),
            attempts: None,
            replays: headers::get_u32(&table, headers::REPLAYS).unwrap_or(0),
            first_failure_at: None,
            last_failure_at: None,
            original_exchange: Some(exchange),
            original_routing_key: Some(routing_key),
        }
    }
}

/// Which dead letters a replay takes. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub ids: Vec<String>,
    pub message_type: Option<String>,
    pub worker: Option<String>,
    pub error_contains: Option<String>,
}

impl Selection {
    fn matches(&self, letter: &DeadLetter) -> bool {
        let id_ok = self.ids.is_empty()
            || letter.message_id.as_ref().is_some_and(|id| self.ids.contains(id));
        let type_ok = self.message_type.is_none() || letter.message_type == self.message_type;
        let worker_ok = self.worker.is_none() || letter.worker == self.worker;
        let error_ok = self.error_contains.as_ref().is_none_or(|needle| {
            letter.error.as_ref().is_some_and(|error| error.contains(needle.as_str()))
        });
        id_ok && type_ok && worker_ok && error_ok
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    pub replayed: usize,
    pub skipped: usize,
}

/// The dead-letter tool on one broker, for a set of workers' queues.
pub struct DeadLetters {
    connection: Connection,
    settings: Settings,
    workers: Vec<String>,
}

impl DeadLetters {
    pub async fn connect(settings: &Settings, workers: Vec<String>) -> anyhow::Result<Self> {
        let connection = broker::connect(settings, "dlq tool").await?;
        Ok(DeadLetters { connection, settings: settings.clone(), workers })
    }

    fn queues(&self) -> Vec<String> {
        self.workers.iter().map(|worker| self.settings.topology.dead_letter_queue(worker)).collect()
    }

    /// Per queue: how many messages it holds. A queue never declared holds
    /// nothing (its failed passive declare closes the channel, hence one
    /// channel per queue).
    pub async fn counts(&self) -> anyhow::Result<BTreeMap<String, u32>> {
        let mut counts = BTreeMap::new();
        for queue in self.queues() {
            let channel = self.connection.create_channel().await?;
            let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
            let declared =
                channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await;
            counts.insert(queue, declared.map(|q| q.message_count()).unwrap_or(0));
            let _ = channel.close(200, "counted".into()).await;
        }
        Ok(counts)
    }

    /// Every dead letter, without removing any.
    pub async fn list(&self) -> anyhow::Result<Vec<DeadLetter>> {
        let mut letters = Vec::new();
        for (queue, deliveries, channel) in self.browse().await? {
            letters.extend(deliveries.iter().map(|d| DeadLetter::from_delivery(&queue, d)));
            let _ = channel.close(200, "browsed".into()).await;
        }
        Ok(letters)
    }

    /// One dead letter with its headers and body, phones masked and codes
    /// hidden.
    pub async fn show(&self, message_id: &str) -> anyhow::Result<Option<Value>> {
        let mut found = None;
        for (queue, deliveries, channel) in self.browse().await? {
            if found.is_none() {
                found = deliveries
                    .iter()
                    .find(|d| {
                        d.properties
                            .message_id()
                            .as_ref()
                            .is_some_and(|id| id.as_str() == message_id)
                    })
                    .map(|d| masked_view(&queue, d));
            }
            let _ = channel.close(200, "browsed".into()).await;
        }
        Ok(found)
    }

    /// Writes every dead letter as one JSON line, masked like `show`.
    pub async fn export(&self, out: &mut impl Write) -> anyhow::Result<usize> {
        let mut count = 0;
        for (queue, deliveries, channel) in self.browse().await? {
            for delivery in &deliveries {
                serde_json::to_writer(&mut *out, &masked_view(&queue, delivery))?;
                out.write_all(b"\n")?;
                count += 1;
            }
            let _ = channel.close(200, "browsed".into()).await;
        }
        Ok(count)
    }

    /// Sends the selected dead letters back where they were first published,
    /// at most `per_second` a second. Each is removed from its dead-letter
    /// queue only after the broker confirmed the replayed copy. The copy
    /// keeps its `message_id`, so a message that had in fact been handled is
    /// dropped by the worker's inbox; its failure history stays in the
    /// headers, with the attempt count reset so that it gets a full set of
    /// retries, and one more replay counted.
    pub async fn replay(
        &self,
        selection: &Selection,
        per_second: f64,
        progress: bool,
    ) -> anyhow::Result<ReplayReport> {
        if per_second <= 0.0 {
            bail!("the replay rate must be above zero");
        }
        let pause = Duration::from_secs_f64(1.0 / per_second);
        let publisher = self.connection.create_channel().await?;
        publisher.confirm_select(ConfirmSelectOptions::default()).await?;
        let mut report = ReplayReport::default();
        let batches = self.browse().await?;
        let selected: usize = batches
            .iter()
            .map(|(queue, deliveries, _)| {
                deliveries
                    .iter()
                    .filter(|d| selection.matches(&DeadLetter::from_delivery(queue, d)))
                    .count()
            })
            .sum();
        let bar = if progress { ProgressBar::new(selected as u64) } else { ProgressBar::hidden() };
        if let Ok(style) =
            ProgressStyle::with_template("{bar:40} {pos}/{len} replayed, {per_sec}, eta {eta}")
        {
            bar.set_style(style);
        }
        let mut ticker = tokio::time::interval(pause);
        for (queue, deliveries, channel) in batches {
            for delivery in deliveries {
                let letter = DeadLetter::from_delivery(&queue, &delivery);
                if !selection.matches(&letter) {
                    report.skipped += 1;
                    continue;
                }
                ticker.tick().await;
                let (Some(exchange), Some(routing_key)) =
                    (letter.original_exchange.as_deref(), letter.original_routing_key.as_deref())
                else {
                    report.skipped += 1;
                    continue;
                };
                let properties = replay_properties(&delivery.properties);
                let confirm = publisher
                    .basic_publish(
                        exchange.into(),
                        routing_key.into(),
                        BasicPublishOptions::default(),
                        &delivery.data,
                        properties,
                    )
                    .await?
                    .await
                    .context("no confirm for a replayed message")?;
                if confirm.is_nack() {
                    bail!("the broker refused a replayed message; it stays in {queue}");
                }
                delivery.ack(BasicAckOptions::default()).await?;
                report.replayed += 1;
                bar.inc(1);
            }
            // Closing puts back every message this replay did not take.
            let _ = channel.close(200, "replayed".into()).await;
        }
        bar.finish();
        Ok(report)
    }

    /// Empties every selected dead-letter queue; returns how many messages
    /// went.
    pub async fn purge(&self) -> anyhow::Result<u32> {
        let channel = self.connection.create_channel().await?;
        let mut purged = 0;
        for (queue, count) in self.counts().await? {
            if count > 0 {
                purged += channel
                    .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
                    .await?;
            }
        }
        let _ = channel.close(200, "purged".into()).await;
        Ok(purged)
    }

    /// Takes every message of every selected queue without acknowledging it,
    /// each queue on its own channel so that closing the channel puts that
    /// queue's untaken messages back.
    async fn browse(&self) -> anyhow::Result<Vec<(String, Vec<Delivery>, Channel)>> {
        let counts = self.counts().await?;
        let mut out = Vec::new();
        for (queue, count) in counts {
            let channel = self.connection.create_channel().await?;
            let mut deliveries = Vec::new();
            // Only what was there at the start: messages dead-lettered while
            // we browse wait for the next look.
            while deliveries.len() < count as usize {
                let message = channel
                    .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                    .await?;
                let Some(message) = message else { break };
                deliveries.push(message.delivery);
            }
            out.push((queue, deliveries, channel));
        }
        Ok(out)
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

fn replay_properties(properties: &BasicProperties) -> BasicProperties {
    let mut table = properties.headers().clone().unwrap_or_default();
    let replays = headers::get_u32(&table, headers::REPLAYS).unwrap_or(0).saturating_add(1);
    headers::set_u32(&mut table, headers::REPLAYS, replays);
    headers::set_u32(&mut table, headers::ATTEMPTS, 0);
    properties.clone().with_headers(table)
}

/// Headers and body of a dead letter, safe to show on an operator's screen:
/// phones masked wherever they appear in the body, codes hidden.
fn masked_view(queue: &str, delivery: &Delivery) -> Value {
    let mut header_map = serde_json::Map::new();
    if let Some(table) = delivery.properties.headers() {
        for (name, value) in table.inner() {
            header_map.insert(name.to_string(), header_value(value));
        }
    }
    let body = match serde_json::from_slice::<Value>(&delivery.data) {
        Ok(mut json) => {
            mask_body(&mut json);
            json
        }
        // What the portal team needs of a broken body is its shape; the
        // values in it cannot be told apart to mask, so they are blanked.
        Err(_) => {
            let mut text = redact_for_log(&String::from_utf8_lossy(&delivery.data));
            text.truncate(text.floor_char_boundary(4_000));
            serde_json::json!({ "not_json_bytes": delivery.data.len(), "redacted_text": text })
        }
    };
    serde_json::json!({
        "queue": queue,
        "summary": DeadLetter::from_delivery(queue, delivery),
        "headers": header_map,
        "body": body,
    })
}

fn header_value(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(text) => {
            Value::String(String::from_utf8_lossy(text.as_bytes()).into_owned())
        }
        AMQPValue::ShortString(text) => Value::String(text.as_str().to_owned()),
        AMQPValue::LongLongInt(number) => Value::from(*number),
        AMQPValue::LongInt(number) => Value::from(*number),
        AMQPValue::Boolean(flag) => Value::from(*flag),
        other => Value::String(format!("{other:?}")),
    }
}

/// Fields that hold personal data wherever they appear in a body: phones
/// are masked (or blanked when they do not parse), the rest hidden.
const PERSONAL_KEYS: &[&str] = &[
    "phone",
    "contact_phone",
    "first_name",
    "last_name",
    "middle_name",
    "contact_first_name",
    "truster_short_name",
    "birth_date",
    "text",
];

/// The envelope's own fields that say what and when, never who: shown as
/// they are, where the same text in a payload would be masked.
const ENVELOPE_FIELDS_SHOWN: &[&str] = &["message_id", "type", "version", "occurred_at"];

/// Masks a body: the envelope's own fields stay, everything else goes
/// through [`mask_value`].
fn mask_body(body: &mut Value) {
    match body {
        Value::Object(map) => {
            for (key, inner) in map.iter_mut() {
                if !ENVELOPE_FIELDS_SHOWN.contains(&key.as_str()) {
                    mask_field(key, inner);
                }
            }
        }
        other => mask_value(other),
    }
}

/// Known personal fields are hidden whatever they hold; elsewhere, since a
/// body that breaks the contract may carry anything anywhere, phones are
/// masked, numbers of four digits or more hidden (codes, phones, dates) and
/// text redacted as a log line would be.
fn mask_value(value: &mut Value) {
    let long_number = matches!(value, Value::Number(number)
        if number.to_string().chars().filter(char::is_ascii_digit).count() >= 4);
    if long_number {
        *value = Value::String("***".into());
        return;
    }
    match value {
        Value::Object(map) => map.iter_mut().for_each(|(key, inner)| mask_field(key, inner)),
        Value::Array(items) => items.iter_mut().for_each(mask_value),
        Value::String(text) if normalize_phone(text).is_ok() => *text = mask_phone(text),
        Value::String(text) => *text = redact_for_log(text),
        _ => {}
    }
}

fn mask_field(key: &str, inner: &mut Value) {
    if key == "code" || key == "sealed_code" || PERSONAL_KEYS.contains(&key) {
        *inner = match inner {
            Value::String(text) if key.contains("phone") => Value::String(mask_phone(text)),
            Value::Null => Value::Null,
            _ => Value::String("***".into()),
        };
    } else {
        mask_value(inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_and_codes_are_masked_in_a_body() {
        let mut body = serde_json::json!({
            "payload": { "contact_phone": "8 (900) 123-45-67", "code": "123456", "n": 5 }
        });
        mask_value(&mut body);
        let text = body.to_string();
        assert!(!text.contains("123-45-67") && !text.contains("123456"), "{text}");
        assert!(text.contains("+7900***4567"));
    }

    #[test]
    fn a_body_that_breaks_the_contract_shows_no_number_a_person_typed() {
        let mut body = serde_json::json!({
            "message_id": "0b9e6a52-3f49-4c1a-9b0e-2a7f4d0c9e11",
            "type": "account.updated",
            "occurred_at": "2026-12-03T10:15:00Z",
            "payload": {
                "Code": 482913, "sms_code": "482913", "mobile": 79161234567_u64,
                "note": "звоните +7 916 123-45-67", "codes": ["482913", 482913],
                "attempt": 2, "account_id": "40696939-93dc-40f0-8b36-28824bc18241"
            }
        });
        mask_body(&mut body);
        let text = body.to_string();
        for part in ["482913", "79161234567", "916", "45-67"] {
            assert!(!text.contains(part), "{part} in {text}");
        }
        assert!(text.contains("2026-12-03T10:15:00Z"), "the envelope's own time stays");
        assert!(text.contains("40696939-93dc-40f0-8b36-28824bc18241"), "ids stay");
        assert_eq!(body["payload"]["attempt"], 2);

        let mut bare = serde_json::json!(79161234567_u64);
        mask_body(&mut bare);
        assert_eq!(bare, serde_json::json!("***"));
    }
}
