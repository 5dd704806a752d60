//! The headers the runtime reads and writes on AMQP messages. RabbitMQ 4
//! ignores `x-*` headers set by clients, so the runtime keeps its own.

use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Failed attempts before this delivery; absent on the first delivery.
pub const ATTEMPTS: &str = "tc-attempts";
pub const FIRST_FAILURE_AT: &str = "tc-first-failure-at";
pub const LAST_FAILURE_AT: &str = "tc-last-failure-at";
pub const ERROR: &str = "tc-error";
/// `malformed`, `permanent` or `retries_exhausted`.
pub const FAILURE_KIND: &str = "tc-failure-kind";
pub const WORKER: &str = "tc-worker";
/// Where the message was first published, so a replay can send it back there
/// rather than to the delay queue it last came from.
pub const ORIGINAL_EXCHANGE: &str = "tc-original-exchange";
pub const ORIGINAL_ROUTING_KEY: &str = "tc-original-routing-key";
pub const CORRELATION_ID: &str = "correlation_id";
pub const CAUSATION_ID: &str = "causation_id";
/// How often an operator replayed this message out of a dead-letter queue.
pub const REPLAYS: &str = "tc-replays";

pub fn get_str(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(value) => Some(String::from_utf8_lossy(value.as_bytes()).into()),
        AMQPValue::ShortString(value) => Some(value.as_str().to_owned()),
        _ => None,
    }
}

pub fn get_u32(headers: &FieldTable, name: &str) -> Option<u32> {
    let value = match headers.inner().get(name)? {
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::LongString(v) => String::from_utf8_lossy(v.as_bytes()).parse().ok()?,
        _ => return None,
    };
    u32::try_from(value).ok()
}

pub fn set_str(headers: &mut FieldTable, name: &str, value: impl Into<String>) {
    let value: String = value.into();
    headers.insert(ShortString::from(name), AMQPValue::LongString(LongString::from(value)));
}

pub fn set_u32(headers: &mut FieldTable, name: &str, value: u32) {
    headers.insert(ShortString::from(name), AMQPValue::LongLongInt(i64::from(value)));
}

pub fn set_time(headers: &mut FieldTable, name: &str, at: DateTime<Utc>) {
    set_str(headers, name, at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
}
