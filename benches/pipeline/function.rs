//! The fake function: a bare hyper HTTP/1 server on 127.0.0.1:0 that answers 200 with an empty
//! body and counts what it saw. It is the gateway too: the worker calls
//! `<gateway>/function/<name>`, and any path is served.
//!
//! It records when the first call started and the last one ended (the throughput window),
//! how many run at once, and, for the latency scenario, how long each request took from the
//! `X-Start-Time` its publisher stamped (Unix nanoseconds, as the gateway writes it) to its
//! arrival here. In `hold` mode every call waits for [`FakeFunction::release`], so the bench
//! can keep a known number of calls in flight while it reads the worker's memory.
//!
//! For the function-mode scenarios it can also take a set time per call ([`FakeFunction::set_delay`],
//! so a backlog lasts) and record when the first call of each function named with a given
//! prefix arrived ([`FakeFunction::track`], for "time from stored to called").

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::{watch, Notify};

/// What the fake function counts. Reset before each measurement.
pub struct Stats {
    epoch: Instant,
    /// Calls answered.
    count: AtomicU64,
    /// `count` at which `done` fires.
    target: AtomicU64,
    done: Notify,
    /// Nanoseconds since `epoch`: start of the first call and end of the last.
    first_start: AtomicU64,
    last_end: AtomicU64,
    inflight: AtomicU64,
    peak: AtomicU64,
    /// `inflight` at which `reached` fires.
    inflight_target: AtomicU64,
    reached: Notify,
    /// Record `X-Start-Time` → arrival for each call.
    record_latency: AtomicBool,
    latencies: Mutex<Vec<u64>>,
    hold: AtomicBool,
    gate: watch::Sender<bool>,
    /// Nanoseconds each call takes before it is answered.
    delay: AtomicU64,
    /// Record the first arrival of each function whose name starts with this prefix.
    tracking: AtomicBool,
    track_prefix: Mutex<String>,
    arrivals: Mutex<HashMap<String, Instant>>,
    arrived: Notify,
}

/// What one measurement saw.
pub struct Window {
    pub count: u64,
    /// First call's start to last call's end.
    pub elapsed: Duration,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            epoch: Instant::now(),
            count: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            done: Notify::new(),
            first_start: AtomicU64::new(u64::MAX),
            last_end: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            inflight_target: AtomicU64::new(u64::MAX),
            reached: Notify::new(),
            record_latency: AtomicBool::new(false),
            latencies: Mutex::new(Vec::new()),
            hold: AtomicBool::new(false),
            gate: watch::channel(false).0,
            delay: AtomicU64::new(0),
            tracking: AtomicBool::new(false),
            track_prefix: Mutex::new(String::new()),
            arrivals: Mutex::new(HashMap::new()),
            arrived: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// The running fake function.
pub struct FakeFunction {
    pub addr: SocketAddr,
    stats: Arc<Stats>,
}

impl FakeFunction {
    pub async fn start() -> anyhow::Result<FakeFunction> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::new());
        let shared = stats.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let stats = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| serve(req, stats.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Ok(FakeFunction { addr, stats })
    }

    /// The base URL (the worker's `gateway_url`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts a new measurement: `done()` returns once `target` calls were answered.
    pub fn reset(&self, target: u64) {
        let s = &self.stats;
        s.count.store(0, Ordering::SeqCst);
        s.first_start.store(u64::MAX, Ordering::SeqCst);
        s.last_end.store(0, Ordering::SeqCst);
        s.peak.store(0, Ordering::SeqCst);
        s.inflight_target.store(u64::MAX, Ordering::SeqCst);
        s.record_latency.store(false, Ordering::SeqCst);
        s.latencies.lock().unwrap().clear();
        s.hold.store(false, Ordering::SeqCst);
        s.gate.send_replace(false);
        s.delay.store(0, Ordering::SeqCst);
        s.tracking.store(false, Ordering::SeqCst);
        s.arrivals.lock().unwrap().clear();
        s.target.store(target, Ordering::SeqCst);
    }

    /// Every call from now on takes `delay` before it is answered (until the next `reset`).
    pub fn set_delay(&self, delay: Duration) {
        self.stats
            .delay
            .store(delay.as_nanos() as u64, Ordering::SeqCst);
    }

    /// Records, from now on, when the first call of each function whose name starts with
    /// `prefix` arrives (see [`FakeFunction::arrival`]).
    pub fn track(&self, prefix: &str) {
        *self.stats.track_prefix.lock().unwrap() = prefix.to_string();
        self.stats.tracking.store(true, Ordering::SeqCst);
    }

    /// When the first call of `function` arrived, waiting up to `until` for it.
    pub async fn arrival(&self, function: &str, until: Instant) -> Option<Instant> {
        let s = &self.stats;
        let seen = || s.arrivals.lock().unwrap().get(function).copied();
        let deadline = tokio::time::Instant::from_std(until);
        loop {
            let notified = s.arrived.notified();
            if let Some(at) = seen() {
                return Some(at);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return seen();
            }
        }
    }

    /// Calls being served right now.
    pub fn in_flight_now(&self) -> u64 {
        self.stats.inflight.load(Ordering::SeqCst)
    }

    /// Waits (up to `limit`) until no call is being served: after a worker is killed, its
    /// calls still sleeping out a delay end before the next measurement counts.
    pub async fn quiet(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.in_flight_now() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Records the enqueue → arrival latency of each call from now on.
    pub fn record_latency(&self) {
        self.stats.record_latency.store(true, Ordering::SeqCst);
    }

    /// Holds every call from now on until [`FakeFunction::release`]; `in_flight()` returns
    /// once `n` calls are held at once.
    pub fn hold(&self, n: u64) {
        self.stats.inflight_target.store(n, Ordering::SeqCst);
        self.stats.hold.store(true, Ordering::SeqCst);
    }

    pub fn release(&self) {
        self.stats.hold.store(false, Ordering::SeqCst);
        self.stats.gate.send_replace(true);
    }

    /// Waits until the target set by `reset` is reached, or `limit` passes.
    pub async fn done(&self, limit: Duration) -> anyhow::Result<Window> {
        let s = &self.stats;
        let reached = || s.count.load(Ordering::SeqCst) >= s.target.load(Ordering::SeqCst);
        if tokio::time::timeout(limit, until(&s.done, reached))
            .await
            .is_err()
        {
            anyhow::bail!(
                "the function saw {} of {} calls within {limit:?}",
                s.count.load(Ordering::SeqCst),
                s.target.load(Ordering::SeqCst)
            );
        }
        Ok(self.window())
    }

    /// Waits until the number set by `hold` is in flight at once.
    pub async fn in_flight(&self, limit: Duration) -> anyhow::Result<()> {
        let s = &self.stats;
        let reached =
            || s.inflight.load(Ordering::SeqCst) >= s.inflight_target.load(Ordering::SeqCst);
        tokio::time::timeout(limit, until(&s.reached, reached))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "only {} calls in flight at once within {limit:?}",
                    s.peak.load(Ordering::SeqCst)
                )
            })
    }

    pub fn window(&self) -> Window {
        let s = &self.stats;
        let first = s.first_start.load(Ordering::SeqCst);
        let last = s.last_end.load(Ordering::SeqCst);
        Window {
            count: s.count.load(Ordering::SeqCst),
            elapsed: Duration::from_nanos(last.saturating_sub(first)),
        }
    }

    /// The latencies recorded, in nanoseconds.
    pub fn latencies(&self) -> Vec<u64> {
        std::mem::take(&mut *self.stats.latencies.lock().unwrap())
    }
}

/// Returns once `cond` holds, re-checking whenever `notify` fires (a `Notified` created
/// before the check sees any `notify_waiters` after it, so no wake-up is missed).
async fn until(notify: &Notify, cond: impl Fn() -> bool) {
    loop {
        let notified = notify.notified();
        if cond() {
            return;
        }
        notified.await;
    }
}

async fn serve(
    req: Request<Incoming>,
    s: Arc<Stats>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    let start = s.now();
    s.first_start.fetch_min(start, Ordering::SeqCst);
    if s.tracking.load(Ordering::Relaxed) {
        track(&s, req.uri().path());
    }
    let inflight = s.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    // Counted down however the call ends: hyper drops it if the worker goes away.
    let _guard = InFlight(&s);
    s.peak.fetch_max(inflight, Ordering::SeqCst);
    if inflight >= s.inflight_target.load(Ordering::SeqCst) {
        s.reached.notify_waiters();
    }
    if s.record_latency.load(Ordering::Relaxed) {
        let sent = req
            .headers()
            .get("x-start-time")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u128>().ok());
        if let Some(sent) = sent {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            s.latencies
                .lock()
                .unwrap()
                .push(now.saturating_sub(sent) as u64);
        }
    }
    let _ = req.into_body().collect().await;
    let delay = s.delay.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_nanos(delay)).await;
    }
    if s.hold.load(Ordering::SeqCst) {
        let mut gate = s.gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
    }
    s.last_end.fetch_max(s.now(), Ordering::SeqCst);
    let count = s.count.fetch_add(1, Ordering::SeqCst) + 1;
    if count >= s.target.load(Ordering::SeqCst) {
        s.done.notify_waiters();
    }
    Ok(Response::new(Empty::new()))
}

/// Decrements the calls in flight when a call ends or is dropped.
struct InFlight<'a>(&'a Stats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Records the first arrival of a tracked function (`/function/<name>[/…]`).
fn track(s: &Stats, path: &str) {
    let Some(name) = path.strip_prefix("/function/") else {
        return;
    };
    let name = name.split('/').next().unwrap_or_default();
    if !name.starts_with(s.track_prefix.lock().unwrap().as_str()) {
        return;
    }
    let now = Instant::now();
    s.arrivals
        .lock()
        .unwrap()
        .entry(name.to_string())
        .or_insert(now);
    s.arrived.notify_waiters();
}
