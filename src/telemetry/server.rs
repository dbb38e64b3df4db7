//! The HTTP side of the worker on `metrics_port` (8081, where OpenFaaS's chart scrapes):
//! `/metrics`, `/healthz` (the process is alive) and `/readyz` (it can do work now).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

/// What readiness depends on. Written by the app and the stream poller, read by `/readyz`.
#[derive(Default)]
pub struct Health {
    /// Stream and consumer were set up.
    pub layout_ready: AtomicBool,
    /// The last read of the stream's state succeeded.
    pub stream_ok: AtomicBool,
    /// Shutdown has begun: take this replica out of rotation.
    pub draining: AtomicBool,
    /// The pull loop or the state poller stopped on its own: the process is on its way out
    /// (to be restarted), whatever NATS says.
    pub failed: AtomicBool,
    pub nats: OnceLock<async_nats::Client>,
}

impl Health {
    /// `Ok` when ready, otherwise the first reason it is not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.failed.load(Ordering::Relaxed) {
            return Err("a worker task stopped; exiting");
        }
        if self.draining.load(Ordering::Relaxed) {
            return Err("draining");
        }
        match self.nats.get() {
            Some(c) if c.connection_state() == async_nats::connection::State::Connected => {}
            _ => return Err("NATS not connected"),
        }
        if !self.layout_ready.load(Ordering::Relaxed) {
            return Err("stream and consumer not set up yet");
        }
        if !self.stream_ok.load(Ordering::Relaxed) {
            return Err("stream not reachable");
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    registry: prometheus::Registry,
    health: Arc<Health>,
}

/// Binds `addr` and serves the metrics of `registry` and `health` until `stop`; returns the
/// bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    registry: prometheus::Registry,
    health: Arc<Health>,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { registry, health });
    let handle = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok((bound, handle))
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics::render(&s.registry),
    )
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    match s.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
