//! The HTTP face of a worker process for its supervisor and Prometheus:
//! `/healthz` (the process answers), `/readyz` (database reachable and every
//! consumer attached to the broker) and `/metrics`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::metrics::METRICS;

/// Which consumers of this process are attached to the broker right now.
#[derive(Debug, Default)]
pub struct Health {
    consumers: Mutex<BTreeMap<&'static str, bool>>,
}

impl Health {
    /// Records that `worker` runs in this process and is not attached yet.
    pub fn register(&self, worker: &'static str) {
        if let Ok(mut consumers) = self.consumers.lock() {
            consumers.entry(worker).or_insert(false);
        }
    }

    pub fn set_attached(&self, worker: &'static str, attached: bool) {
        if let Ok(mut consumers) = self.consumers.lock() {
            consumers.insert(worker, attached);
        }
    }

    fn snapshot(&self) -> BTreeMap<&'static str, bool> {
        self.consumers.lock().map(|consumers| consumers.clone()).unwrap_or_default()
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    pool: PgPool,
}

/// Binds `port` (0 picks a free one) and serves until `shutdown`. Returns the
/// bound address so that the caller can log it.
pub async fn serve(
    port: u16,
    health: Arc<Health>,
    pool: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("cannot listen on port {port} for health and metrics"))?;
    let address = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(AppState { health, pool });
    tokio::spawn(async move {
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(error) = server.await {
            tracing::warn!(error = %error, "health and metrics server stopped");
        }
    });
    Ok(address)
}

async fn database_answers(pool: &PgPool) -> bool {
    let probe = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool);
    matches!(tokio::time::timeout(Duration::from_secs(2), probe).await, Ok(Ok(1)))
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let database = database_answers(&state.pool).await;
    let consumers = state.health.snapshot();
    let attached = !consumers.is_empty() && consumers.values().all(|attached| *attached);
    let status =
        if database && attached { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body =
        json!({ "database": database, "consumers": consumers, "ready": database && attached });
    (status, Json(body))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let backlog = sqlx::query_as::<_, (i64, Option<f64>)>(
        "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8 \
         FROM outbox WHERE sent_at IS NULL",
    )
    .fetch_one(&state.pool);
    if let Ok(Ok((count, age))) = tokio::time::timeout(Duration::from_secs(2), backlog).await {
        METRICS.outbox_backlog.set(count);
        METRICS.outbox_oldest_age_seconds.set(age.unwrap_or(0.0) as i64);
    }
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        METRICS.encode(),
    )
}
