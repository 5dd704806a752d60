//! Typed settings, read once from the environment at start-up. Every value
//! has a default that works on a developer's machine with local RabbitMQ and
//! PostgreSQL; secrets are wrapped so that they never print.

use std::{fmt, str::FromStr, time::Duration};

use anyhow::{Context, bail};
use trusted_contact_contracts::Topology;

/// A value that must never reach a log line or a panic message.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Lets `clap` read a secret straight from a flag or variable.
impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// How queues are declared: classic for a single broker, quorum for a
/// replicated cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
}

impl FromStr for QueueType {
    type Err = anyhow::Error;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => bail!("queue type must be `classic` or `quorum`, not `{other}`"),
        }
    }
}

/// Where the process runs. Development allows conveniences (a fixed code
/// secret) that any other environment refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Environment {
    Development,
    /// Any other name (`staging`, `production`, ...): secrets are required.
    Other(String),
}

impl Environment {
    pub fn is_development(&self) -> bool {
        *self == Environment::Development
    }
}

impl FromStr for Environment {
    type Err = anyhow::Error;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim() {
            "" => bail!("the environment name is empty"),
            "development" => Ok(Environment::Development),
            other => Ok(Environment::Other(other.to_owned())),
        }
    }
}

/// Settings of the message runtime that every worker shares.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `TC_ENVIRONMENT`, `development` by default.
    pub environment: Environment,
    /// Both URLs may carry passwords.
    pub amqp_url: Secret,
    pub database_url: Secret,
    pub topology: Topology,
    pub queue_type: QueueType,
    /// Unacknowledged deliveries a worker holds at once; also the number of
    /// messages it handles concurrently.
    pub prefetch: u16,
    pub database_pool_size: u32,
    /// Total deliveries a message gets before a transient failure is final.
    pub retry_limit: u32,
    pub retry_base_delay: Duration,
    pub retry_max_delay: Duration,
    /// A worker that cannot reach the broker for this long gives up and exits
    /// non-zero, so that its supervisor notices.
    pub reconnect_give_up: Duration,
    /// How long in-flight handlers may run after SIGTERM before the process
    /// leaves them to redelivery.
    pub shutdown_grace: Duration,
    /// How often the outbox relay looks for rows that no in-process signal
    /// announced (rows written by other processes, rows left by a crash).
    pub outbox_poll_interval: Duration,
    pub outbox_batch_size: i64,
    /// Port of the health, readiness and metrics endpoint; 0 picks a free one.
    pub http_port: u16,
}

impl Settings {
    /// Reads every `TC_*` variable, falling back to local defaults.
    pub fn from_env() -> anyhow::Result<Self> {
        Ok(Settings {
            environment: parse_var("TC_ENVIRONMENT", Environment::Development)?,
            amqp_url: Secret::new(var_or("TC_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")),
            database_url: Secret::new(var_or(
                "TC_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/trusted_contact",
            )),
            topology: Topology::new(var_or("TC_TOPOLOGY_PREFIX", "")),
            queue_type: parse_var("TC_QUEUE_TYPE", QueueType::Classic)?,
            prefetch: parse_var("TC_PREFETCH", 64)?,
            database_pool_size: parse_var("TC_DATABASE_POOL_SIZE", 10)?,
            retry_limit: parse_var("TC_RETRY_LIMIT", 10)?,
            retry_base_delay: millis_var("TC_RETRY_BASE_MS", 1_000)?,
            retry_max_delay: millis_var("TC_RETRY_MAX_MS", 300_000)?,
            reconnect_give_up: secs_var("TC_RECONNECT_GIVE_UP_SECS", 300)?,
            shutdown_grace: secs_var("TC_SHUTDOWN_GRACE_SECS", 20)?,
            outbox_poll_interval: millis_var("TC_OUTBOX_POLL_MS", 500)?,
            outbox_batch_size: parse_var("TC_OUTBOX_BATCH", 256)?,
            http_port: parse_var("TC_HTTP_PORT", 9090)?,
        })
    }
}

pub(crate) fn var_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub(crate) fn parse_var<T>(name: &str, default: T) -> anyhow::Result<T>
where
    T: FromStr,
    T::Err: Into<anyhow::Error>,
{
    match std::env::var(name) {
        Ok(raw) => raw.trim().parse().map_err(Into::into).with_context(|| name.to_owned()),
        Err(_) => Ok(default),
    }
}

pub(crate) fn millis_var(name: &str, default: u64) -> anyhow::Result<Duration> {
    parse_var(name, default).map(Duration::from_millis)
}

pub(crate) fn secs_var(name: &str, default: u64) -> anyhow::Result<Duration> {
    parse_var(name, default).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("amqp://user:hunter2@host");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(secret.expose(), "amqp://user:hunter2@host");
        assert!(!format!("{:?}", Secret::from("token".to_owned())).contains("token"));
    }

    #[test]
    fn an_unknown_queue_type_is_refused() {
        assert!("stream".parse::<QueueType>().is_err());
        assert_eq!("quorum".parse::<QueueType>().unwrap(), QueueType::Quorum);
    }
}
