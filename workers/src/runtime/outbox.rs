//! The outbox relay: publishes what handlers committed to the outbox table,
//! with publisher confirms, and marks rows sent only after the broker
//! confirmed them. Several relays may run at once: each claims its rows with
//! `FOR UPDATE SKIP LOCKED`, so in the normal case no row goes out twice.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use chrono::Utc;
use sqlx::{PgPool, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    broker::{Publication, Publisher},
    message::properties_for,
    metrics::METRICS,
};

/// How often a relay deletes old confirmed rows, and how long they stay.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const SENT_ROWS_KEPT: Duration = Duration::from_secs(15 * 60);

/// Wakes the relay as soon as a handler committed outgoing messages, so that
/// outcomes leave within milliseconds rather than at the next poll.
#[derive(Debug, Clone, Default)]
pub struct OutboxSignal(Arc<Notify>);

impl OutboxSignal {
    pub fn wake(&self) {
        self.0.notify_one();
    }

    async fn woken(&self) {
        self.0.notified().await;
    }
}

pub struct OutboxRelay {
    pool: PgPool,
    publisher: Arc<Publisher>,
    signal: OutboxSignal,
    batch_size: i64,
    poll_interval: Duration,
}

impl OutboxRelay {
    pub fn new(
        pool: PgPool,
        publisher: Arc<Publisher>,
        signal: OutboxSignal,
        batch_size: i64,
        poll_interval: Duration,
    ) -> Self {
        OutboxRelay { pool, publisher, signal, batch_size, poll_interval }
    }

    /// Relays until `shutdown`, then drains what is left once more.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        let mut last_prune = tokio::time::Instant::now();
        loop {
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = tokio::time::Instant::now();
                if let Err(error) = self.prune().await {
                    tracing::warn!(error = format!("{error:#}"), "cannot prune the outbox");
                }
            }
            match self.drain().await {
                Ok(_) => failures = 0,
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let pause = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                    tracing::warn!(
                        error = format!("{error:#}"),
                        retry_in_ms = pause.as_millis() as u64,
                        "outbox relay failed, retrying"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(pause) => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            }
            tokio::select! {
                () = self.signal.woken() => {}
                () = tokio::time::sleep(self.poll_interval) => {}
                () = shutdown.cancelled() => break,
            }
        }
        match self.drain().await {
            Ok(count) => tracing::info!(published = count, "outbox flushed before shutdown"),
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                "outbox not flushed before shutdown; rows stay for the next relay"
            ),
        }
    }

    /// Deletes rows the broker confirmed a while ago. They carry names and
    /// phones (notification texts, SMS requests), which the ledger keeps no
    /// longer than it needs: the margin only serves an operator looking into
    /// a recent incident.
    pub async fn prune(&self) -> anyhow::Result<u64> {
        let pruned = sqlx::query(
            "DELETE FROM outbox WHERE sent_at IS NOT NULL \
             AND sent_at < now() - make_interval(secs => $1)",
        )
        .bind(SENT_ROWS_KEPT.as_secs_f64())
        .execute(&self.pool)
        .await
        .context("cannot prune the outbox")?
        .rows_affected();
        Ok(pruned)
    }

    /// Publishes batches until no unsent row is left. Returns how many
    /// messages it published.
    pub async fn drain(&self) -> anyhow::Result<usize> {
        let mut total = 0;
        loop {
            let published = self.relay_batch().await?;
            total += published;
            if published < self.batch_size as usize {
                return Ok(total);
            }
        }
    }

    /// Claims one batch of unsent rows, publishes them, waits for every
    /// confirm, marks them sent. A crash between the confirm and the commit
    /// leaves the rows unsent: they go out again with the same `message_id`
    /// and the consumers' inbox drops the repeat.
    async fn relay_batch(&self) -> anyhow::Result<usize> {
        let mut tx = self.pool.begin().await.context("cannot open an outbox transaction")?;
        let rows = sqlx::query(
            "SELECT id, message_id, message_type, exchange, routing_key, delay_ms, \
                    correlation_id, causation_id, body, created_at \
             FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1 \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(self.batch_size)
        .fetch_all(&mut *tx)
        .await
        .context("cannot read the outbox")?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut publications = Vec::with_capacity(rows.len());
        for row in &rows {
            ids.push(row.try_get::<i64, _>("id")?);
            let delay_ms: i64 = row.try_get("delay_ms")?;
            let created_at: chrono::DateTime<Utc> = row.try_get("created_at")?;
            publications.push(Publication {
                exchange: row.try_get("exchange")?,
                routing_key: row.try_get("routing_key")?,
                delay: Duration::from_millis(u64::try_from(delay_ms).unwrap_or(0)),
                body: row.try_get("body")?,
                properties: properties_for(
                    row.try_get("message_id")?,
                    row.try_get::<String, _>("message_type")?.as_str(),
                    row.try_get::<Option<String>, _>("correlation_id")?.as_deref(),
                    row.try_get::<Option<String>, _>("causation_id")?.as_deref(),
                    created_at,
                ),
            });
        }
        let batch_error = match self.publisher.publish_all(&publications).await {
            Ok(()) => None,
            Err(error) if publications.len() == 1 => return Err(error),
            Err(error) => Some(error),
        };
        let sent = match batch_error {
            None => ids,
            // One row the broker will never take (a delay queue declared
            // elsewhere with other arguments) must not hold back every row
            // behind it: one by one, and keep what was confirmed.
            Some(_) => self.publish_one_by_one(&ids, &publications).await,
        };
        METRICS.outbox_published.inc_by(sent.len() as u64);
        sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1)")
            .bind(&sent)
            .execute(&mut *tx)
            .await
            .context("cannot mark outbox rows sent")?;
        tx.commit().await.context("cannot commit the outbox marks")?;
        match batch_error {
            Some(error) if sent.len() < rows.len() => Err(error.context(format!(
                "{} of {} outbox rows not published; they stay for the next attempt",
                rows.len() - sent.len(),
                rows.len()
            ))),
            _ => Ok(rows.len()),
        }
    }

    /// The ids of the rows the broker confirmed, publishing each alone.
    async fn publish_one_by_one(&self, ids: &[i64], publications: &[Publication]) -> Vec<i64> {
        let mut sent = Vec::with_capacity(ids.len());
        for (id, publication) in ids.iter().zip(publications) {
            if self.publisher.publish_all(std::slice::from_ref(publication)).await.is_ok() {
                sent.push(*id);
            }
        }
        sent
    }
}
