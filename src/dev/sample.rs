//! A sample gateway for the demo: `/function/<name>` sleeps a random time and echoes the
//! body. Like OpenFaaS's watchdog with `max_inflight`, it answers 429 (with
//! `X-OpenFaaS-Internal`) when too many calls run at once; optionally the first try of every
//! `fail_every`-th call answers 503. `/system/function/<name>` answers for the functions it
//! knows, as the gateway's API does; `/callback` counts callbacks. Not a test double: the
//! tests have their own scripted fake.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{any, get, post};
use axum::Router;
use tokio_util::sync::CancellationToken;

/// How the sample function behaves.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// Fail the first try of one call in this many with 503; 0 never fails.
    pub fail_every: u64,
    /// Calls running at once before 429 (the watchdog's `max_inflight`); 0: no limit.
    pub max_inflight: u64,
    /// Functions `/system/function/<name>` knows; empty: every name exists.
    pub functions: Vec<String>,
}

/// What the sample gateway saw.
#[derive(Default)]
pub struct SampleStats {
    pub calls: AtomicU64,
    pub failures: AtomicU64,
    pub running: AtomicU64,
    pub callbacks: AtomicU64,
    /// Calls refused with 429 because `max_inflight` were running.
    pub limited: AtomicU64,
    failed_ids: Mutex<HashSet<String>>,
}

#[derive(Clone)]
struct Sample {
    opts: SampleOptions,
    stats: Arc<SampleStats>,
}

/// Serves on `addr` until `stop`.
pub async fn serve(
    addr: SocketAddr,
    opts: SampleOptions,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, Arc<SampleStats>)> {
    let stats = Arc::new(SampleStats::default());
    let app = Router::new()
        .route("/function/{*rest}", any(function))
        .route("/callback", post(callback))
        .route("/system/function/{name}", get(describe))
        .with_state(Sample {
            opts,
            stats: stats.clone(),
        });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Ok((bound, stats))
}

async fn function(
    State(s): State<Sample>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, String) {
    let n = s.stats.calls.fetch_add(1, Ordering::Relaxed) + 1;
    let running = s.stats.running.fetch_add(1, Ordering::Relaxed) + 1;
    if s.opts.max_inflight > 0 && running > s.opts.max_inflight {
        s.stats.running.fetch_sub(1, Ordering::Relaxed);
        s.stats.limited.fetch_add(1, Ordering::Relaxed);
        let mut h = HeaderMap::new();
        h.insert("x-openfaas-internal", "faas-middleware".parse().unwrap());
        return (
            StatusCode::TOO_MANY_REQUESTS,
            h,
            format!(
                "Concurrent request limit exceeded. Max concurrent requests: {}\n",
                s.opts.max_inflight
            ),
        );
    }
    let span = s.opts.max_delay.saturating_sub(s.opts.min_delay);
    let delay = s.opts.min_delay + span.mul_f64(fastrand::f64());
    tokio::time::sleep(delay).await;
    s.stats.running.fetch_sub(1, Ordering::Relaxed);
    let call_id = headers
        .get("x-call-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if s.opts.fail_every > 0 && n % s.opts.fail_every == 0 {
        let first = s.stats.failed_ids.lock().unwrap().insert(call_id);
        if first {
            s.stats.failures.fetch_add(1, Ordering::Relaxed);
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                HeaderMap::new(),
                "busy, try later\n".into(),
            );
        }
    }
    (
        StatusCode::OK,
        HeaderMap::new(),
        format!("slept {}ms, got {} bytes\n", delay.as_millis(), body.len()),
    )
}

/// The gateway API's function description (only the fields the front door reads).
async fn describe(State(s): State<Sample>, Path(name): Path<String>) -> (StatusCode, String) {
    if s.opts.functions.is_empty() || s.opts.functions.contains(&name) {
        let body = serde_json::json!({"name": name, "annotations": {}, "replicas": 1});
        (StatusCode::OK, body.to_string())
    } else {
        (
            StatusCode::NOT_FOUND,
            format!("function {name} not found\n"),
        )
    }
}

async fn callback(State(s): State<Sample>) -> StatusCode {
    s.stats.callbacks.fetch_add(1, Ordering::Relaxed);
    StatusCode::OK
}
