//! The PostgreSQL ledger: connecting (creating the database on first use),
//! applying migrations, and the transaction every handler works in, which
//! records the message in the inbox and buffers outgoing messages for the
//! outbox so that state and messages commit together.

use std::{str::FromStr, time::Duration};

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{
    ConnectOptions, Connection, PgConnection, PgPool, Postgres, Transaction,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use trusted_contact_contracts::{Envelope, Topology};
use uuid::Uuid;

use crate::settings::Settings;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Opens a pool on the ledger, creating the database if it does not exist.
pub async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(settings.database_url.expose())
        .context("TC_DATABASE_URL is not a PostgreSQL URL")?;
    create_database_if_missing(&options).await?;
    PgPoolOptions::new()
        .max_connections(settings.database_pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .context("cannot connect to the ledger database")
}

/// The database clock at the start of the transaction `conn` is in:
/// deadlines and ages are judged by it, so that every worker replica agrees
/// whatever its own clock says.
pub async fn db_now(conn: &mut PgConnection) -> sqlx::Result<DateTime<Utc>> {
    sqlx::query_scalar("SELECT now()").fetch_one(conn).await
}

async fn create_database_if_missing(options: &PgConnectOptions) -> anyhow::Result<()> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let mut admin = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .context("cannot connect to PostgreSQL to check the ledger database exists")?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let statement = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        // Two processes starting at once may race to create it; the loser's
        // error is harmless as long as the database is there afterwards.
        if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut admin).await {
            let now_exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                    .bind(&name)
                    .fetch_one(&mut admin)
                    .await?;
            if !now_exists {
                return Err(error).context("cannot create the ledger database");
            }
        }
        tracing::info!(database = %name, "created the ledger database");
    }
    admin.close().await?;
    Ok(())
}

/// Applies every pending migration; safe to run on a migrated database and
/// from several processes at once (sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("cannot apply the ledger migrations")
}

/// One message the handler wants published once its transaction commits.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    pub envelope: Envelope,
    pub exchange: String,
    pub routing_key: String,
    pub delay: Duration,
}

/// The transaction a handler runs in for one message. It opens with the
/// inbox record, so a message already handled by this consumer yields no
/// transaction at all, and it commits the outgoing messages with the state.
pub struct LedgerTx {
    tx: Transaction<'static, Postgres>,
    cause: Envelope,
    topology: Topology,
    outgoing: Vec<OutgoingMessage>,
}

impl LedgerTx {
    /// Starts the transaction for `message` as seen by `consumer`. Returns
    /// `None` when this consumer has handled the message before.
    ///
    /// N.B. Two copies delivered at once both reach the insert; the second
    /// waits on the primary key until the first commits, then finds the row.
    pub async fn begin(
        pool: &PgPool,
        topology: &Topology,
        consumer: &str,
        message: &Envelope,
    ) -> Result<Option<Self>, sqlx::Error> {
        let mut tx = pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO inbox (consumer, message_id, message_type) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(consumer)
        .bind(message.message_id)
        .bind(&message.kind)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        Ok(Some(LedgerTx {
            tx,
            cause: message.clone(),
            topology: topology.clone(),
            outgoing: Vec::new(),
        }))
    }

    /// The connection to run the handler's own statements on.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    pub fn cause(&self) -> &Envelope {
        &self.cause
    }

    /// Publishes an event to the portal once the transaction commits.
    pub fn publish_event<P: Serialize>(&mut self, kind: &str, payload: &P) -> anyhow::Result<Uuid> {
        let exchange = self.topology.events_exchange();
        self.push(exchange, kind.to_owned(), kind, payload, Duration::ZERO)
    }

    /// Publishes an event of another flow than this transaction's message:
    /// the end of a recovery request that a disconnection or a new request
    /// caused. It still names this message as its cause, but carries the
    /// flow it ends, so the portal matches it to the command that opened
    /// that flow and each command keeps exactly one outcome in its own flow.
    pub fn publish_event_in_flow<P: Serialize>(
        &mut self,
        correlation_id: &str,
        kind: &str,
        payload: &P,
    ) -> anyhow::Result<Uuid> {
        let mut envelope = self.caused(kind, payload)?;
        envelope.correlation_id = Some(correlation_id.to_owned());
        let id = envelope.message_id;
        self.outgoing.push(OutgoingMessage {
            envelope,
            exchange: self.topology.events_exchange(),
            routing_key: kind.to_owned(),
            delay: Duration::ZERO,
        });
        Ok(id)
    }

    /// Sends a message to another worker through the internal exchange.
    pub fn send_internal<P: Serialize>(&mut self, kind: &str, payload: &P) -> anyhow::Result<Uuid> {
        let exchange = self.topology.internal_exchange();
        self.push(exchange, kind.to_owned(), kind, payload, Duration::ZERO)
    }

    /// Sends a message straight to `worker`'s queue (a reply to a request
    /// that worker made).
    pub fn send_to_worker<P: Serialize>(
        &mut self,
        worker: &str,
        kind: &str,
        payload: &P,
    ) -> anyhow::Result<Uuid> {
        self.schedule(worker, Duration::ZERO, kind, payload)
    }

    /// Delivers a message to `worker`'s queue after `delay`, through a
    /// broker-side delay queue (deadlines, reminders).
    pub fn schedule<P: Serialize>(
        &mut self,
        worker: &str,
        delay: Duration,
        kind: &str,
        payload: &P,
    ) -> anyhow::Result<Uuid> {
        let queue = self.topology.worker_queue(worker);
        self.push(String::new(), queue, kind, payload, delay)
    }

    /// Delivers a ready-made envelope to `worker`'s queue after `delay`. For
    /// messages whose id must be derivable elsewhere (a deadline that a
    /// periodic sweep may send again under the same id, so the inbox keeps
    /// only one).
    pub fn schedule_envelope(&mut self, worker: &str, delay: Duration, envelope: Envelope) {
        let queue = self.topology.worker_queue(worker);
        self.outgoing.push(OutgoingMessage {
            envelope,
            exchange: String::new(),
            routing_key: queue,
            delay,
        });
    }

    /// Like [`Self::schedule`], under a message id the caller derives from
    /// what the deadline is about, so that the delayed message and a periodic
    /// sweep that finds the same deadline meet on one inbox row.
    pub fn schedule_with_id<P: Serialize>(
        &mut self,
        worker: &str,
        delay: Duration,
        kind: &str,
        message_id: Uuid,
        payload: &P,
    ) -> anyhow::Result<Uuid> {
        let mut envelope = self.caused(kind, payload)?;
        envelope.message_id = message_id;
        self.schedule_envelope(worker, delay, envelope);
        Ok(message_id)
    }

    fn push<P: Serialize>(
        &mut self,
        exchange: String,
        routing_key: String,
        kind: &str,
        payload: &P,
        delay: Duration,
    ) -> anyhow::Result<Uuid> {
        let envelope = self.caused(kind, payload)?;
        let id = envelope.message_id;
        self.outgoing.push(OutgoingMessage { envelope, exchange, routing_key, delay });
        Ok(id)
    }

    /// A message caused by this transaction's message, in its flow.
    fn caused<P: Serialize>(&self, kind: &str, payload: &P) -> anyhow::Result<Envelope> {
        self.cause
            .caused(kind, payload)
            .with_context(|| format!("cannot serialise a {kind} payload"))
    }

    /// Appends one row to the audit trail, naming this transaction's message
    /// and flow. `detail` must hold no personal data: ids, statuses, reason
    /// codes and counts only.
    pub async fn audit(
        &mut self,
        actor_id: Option<Uuid>,
        subject: &str,
        subject_id: Option<Uuid>,
        action: &str,
        detail: &serde_json::Value,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO audit_log \
             (actor_id, subject, subject_id, action, detail, message_id, correlation_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(actor_id)
        .bind(subject)
        .bind(subject_id)
        .bind(action)
        .bind(detail)
        .bind(self.cause.message_id)
        .bind(self.cause.flow_id())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Writes the outgoing messages to the outbox and commits everything.
    /// Returns how many messages wait in the outbox for the relay.
    pub async fn commit(mut self) -> anyhow::Result<usize> {
        let count = self.outgoing.len();
        if count > 0 {
            insert_outbox(&mut self.tx, &self.outgoing).await?;
        }
        self.tx.commit().await.context("cannot commit the ledger transaction")?;
        Ok(count)
    }
}

/// One statement for all of a transaction's outgoing messages: one round trip
/// whatever the number of events and notifications.
async fn insert_outbox(
    conn: &mut PgConnection,
    messages: &[OutgoingMessage],
) -> anyhow::Result<()> {
    let mut ids = Vec::with_capacity(messages.len());
    let mut kinds = Vec::with_capacity(messages.len());
    let mut exchanges = Vec::with_capacity(messages.len());
    let mut keys = Vec::with_capacity(messages.len());
    let mut delays = Vec::with_capacity(messages.len());
    let mut correlations = Vec::with_capacity(messages.len());
    let mut causations = Vec::with_capacity(messages.len());
    let mut bodies = Vec::with_capacity(messages.len());
    for message in messages {
        ids.push(message.envelope.message_id);
        kinds.push(message.envelope.kind.clone());
        exchanges.push(message.exchange.clone());
        keys.push(message.routing_key.clone());
        delays.push(i64::try_from(message.delay.as_millis()).unwrap_or(i64::MAX));
        correlations.push(message.envelope.correlation_id.clone());
        causations.push(message.envelope.causation_id.clone());
        bodies.push(serde_json::to_vec(&message.envelope)?);
    }
    sqlx::query(
        "INSERT INTO outbox \
         (message_id, message_type, exchange, routing_key, delay_ms, correlation_id, \
          causation_id, body) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int8[], \
                              $6::text[], $7::text[], $8::bytea[])",
    )
    .bind(&ids)
    .bind(&kinds)
    .bind(&exchanges)
    .bind(&keys)
    .bind(&delays)
    .bind(&correlations)
    .bind(&causations)
    .bind(&bodies)
    .execute(conn)
    .await
    .context("cannot write the outbox")?;
    Ok(())
}
