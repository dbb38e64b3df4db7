//! Test harness: a real nats-server (from `queue_worker::dev::natsd`), a real HTTP fake gateway on
//! port 0 with scripted answers per function, and helpers to start workers and read queue
//! state. Waiting is event-driven: every request and callback the fake records wakes
//! `wait_for`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use queue_worker::config::{Config, Sources};
use queue_worker::dev::natsd::NatsServer;
use queue_worker::worker::Running;
use tokio::sync::watch;

/// One scripted answer of the fake function.
#[derive(Clone, Debug)]
pub struct Step {
    pub status: u16,
    pub delay: Duration,
    pub headers: Vec<(&'static str, &'static str)>,
    pub body: &'static str,
}

impl Step {
    pub fn status(status: u16) -> Step {
        Step {
            status,
            delay: Duration::ZERO,
            headers: Vec::new(),
            body: "",
        }
    }
    pub fn delay(mut self, d: Duration) -> Step {
        self.delay = d;
        self
    }
    pub fn header(mut self, k: &'static str, v: &'static str) -> Step {
        self.headers.push((k, v));
        self
    }
    pub fn body(mut self, b: &'static str) -> Step {
        self.body = b;
        self
    }
}

/// A request the fake received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub started: Instant,
    /// When the answer was sent (None while the call runs).
    pub finished: Option<Instant>,
    /// The status answered (None while the call runs).
    pub status: Option<u16>,
}

impl Recorded {
    fn new(method: Method, uri: &Uri, headers: HeaderMap, body: Bytes) -> Recorded {
        Recorded {
            method,
            path: uri.path().to_string(),
            query: uri.query().map(str::to_string),
            headers,
            body,
            started: Instant::now(),
            finished: None,
            status: None,
        }
    }

    pub fn call_id(&self) -> String {
        self.headers
            .get("x-call-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
}

#[derive(Default)]
struct Inner {
    scripts: HashMap<String, Vec<Step>>,
    calls_per_fn: HashMap<String, usize>,
    calls: Vec<Recorded>,
    callbacks: Vec<Recorded>,
    /// Statuses the callback receiver answers with, in order (the last repeats); empty: 200.
    callback_script: Vec<u16>,
    running: usize,
    max_running: usize,
    /// Functions `/system/function/<name>` knows, with their annotations.
    known: HashMap<String, Vec<(String, String)>>,
    /// Requests to `/system/function/...`.
    lookups: Vec<Recorded>,
    /// Names `/system/function/<name>` answers 500 for.
    broken: Vec<String>,
    /// A function's hard `max_inflight`: past it, 429 with `X-OpenFaaS-Internal` at once,
    /// as OpenFaaS's watchdog answers.
    limits: HashMap<String, usize>,
    running_per_fn: HashMap<String, usize>,
    rejected: HashMap<String, usize>,
}

/// The fake gateway: `/function/<name>...` answers from the script of `<name>` (the last step
/// repeats; no script means 200 at once) and `/callback...` records callbacks.
#[derive(Clone)]
pub struct FakeGateway {
    inner: Arc<Mutex<Inner>>,
    changed: watch::Sender<u64>,
    pub addr: SocketAddr,
}

impl FakeGateway {
    pub async fn start() -> FakeGateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (changed, _) = watch::channel(0);
        let fake = FakeGateway {
            inner: Arc::default(),
            changed,
            addr,
        };
        let app = Router::new()
            .route("/function/{*rest}", any(function))
            .route("/callback/{*rest}", any(callback))
            .route("/system/function/{name}", any(describe))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        fake
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn callback_url(&self, tag: &str) -> String {
        format!("http://{}/callback/{tag}", self.addr)
    }

    pub fn script(&self, function: &str, steps: Vec<Step>) {
        self.inner
            .lock()
            .unwrap()
            .scripts
            .insert(function.to_string(), steps);
    }

    /// Makes `/system/function/<name>` answer 200 with these annotations (unknown names: 404).
    pub fn know(&self, name: &str, annotations: &[(&str, &str)]) {
        self.inner.lock().unwrap().known.insert(
            name.to_string(),
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
    }

    /// Makes `/system/function/<name>` answer 500.
    pub fn break_lookup(&self, name: &str) {
        self.inner.lock().unwrap().broken.push(name.to_string());
    }

    /// Requests the gateway API received at `/system/function/...`.
    pub fn lookups(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().lookups.clone()
    }

    /// Gives `function` a hard limit of `max_inflight` calls at once (429 beyond it).
    pub fn limit(&self, function: &str, max_inflight: usize) {
        self.inner
            .lock()
            .unwrap()
            .limits
            .insert(function.to_string(), max_inflight);
    }

    /// Calls of `function` refused with 429 by its limit.
    pub fn rejected(&self, function: &str) -> usize {
        let inner = self.inner.lock().unwrap();
        inner.rejected.get(function).copied().unwrap_or(0)
    }

    /// Calls of `function` that ran (not refused by its limit), by call id.
    pub fn ran(&self, function: &str) -> HashMap<String, usize> {
        let inner = self.inner.lock().unwrap();
        let mut ran = HashMap::new();
        let prefix = format!("/function/{function}");
        for c in &inner.calls {
            if c.path.starts_with(&prefix) && c.header("x-test-rejected").is_empty() {
                *ran.entry(c.call_id()).or_default() += 1;
            }
        }
        ran
    }

    pub fn script_callbacks(&self, statuses: Vec<u16>) {
        self.inner.lock().unwrap().callback_script = statuses;
    }

    pub fn calls(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().calls.clone()
    }

    pub fn callbacks(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().callbacks.clone()
    }

    /// How many calls reached `/function/<name>`.
    pub fn calls_to(&self, name: &str) -> usize {
        let prefix = format!("/function/{name}");
        self.inner
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| c.path == prefix || c.path.starts_with(&format!("{prefix}/")))
            .count()
    }

    /// For each retry of `/function/<name>`: the time from the end of the previous call to
    /// the start of this one (the backoff as the function saw it).
    pub fn retry_gaps(&self, name: &str) -> Vec<Duration> {
        let path = format!("/function/{name}");
        let calls: Vec<Recorded> = self
            .calls()
            .into_iter()
            .filter(|c| c.path == path)
            .collect();
        calls
            .windows(2)
            .map(|w| w[1].started - w[0].finished.expect("the earlier call finished"))
            .collect()
    }

    /// The first callback posted to [`FakeGateway::callback_url`]`(tag)`.
    pub fn callback_for(&self, tag: &str) -> Recorded {
        let path = format!("/callback/{tag}");
        self.callbacks()
            .into_iter()
            .find(|c| c.path == path)
            .unwrap_or_else(|| panic!("no callback for {tag}"))
    }

    /// Waits until exactly `n` callbacks have arrived.
    pub async fn wait_callbacks(&self, n: usize) {
        self.wait_for(&format!("{n} callback(s)"), Duration::from_secs(10), |g| {
            g.callbacks().len() == n
        })
        .await;
    }

    pub fn running(&self) -> usize {
        self.inner.lock().unwrap().running
    }

    pub fn max_running(&self) -> usize {
        self.inner.lock().unwrap().max_running
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Waits until `pred` holds, re-checking on every request or callback and at least every
    /// 100ms (for conditions that also depend on NATS). Panics with `what` after `timeout`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&FakeGateway) -> bool,
    ) {
        let mut rx = self.changed.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            if pred(self) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "timed out after {timeout:?} waiting for {what} ({} calls, {} callbacks)",
                    self.calls().len(),
                    self.callbacks().len()
                );
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(100)), rx.changed()).await;
        }
    }
}

async fn function(
    State(fake): State<FakeGateway>,
    Path(rest): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let name = rest.split('/').next().unwrap_or_default().to_string();
    {
        let mut inner = fake.inner.lock().unwrap();
        let limit = inner.limits.get(&name).copied();
        let running = inner.running_per_fn.get(&name).copied().unwrap_or(0);
        if limit.is_some_and(|l| running >= l) {
            *inner.rejected.entry(name.clone()).or_default() += 1;
            let mut headers = headers;
            headers.insert("x-test-rejected", "1".parse().unwrap());
            let mut recorded = Recorded::new(method, &uri, headers, body);
            recorded.finished = Some(recorded.started);
            recorded.status = Some(429);
            inner.calls.push(recorded);
            drop(inner);
            fake.bump();
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("X-OpenFaaS-Internal", "true")],
                "Concurrent request limit exceeded",
            )
                .into_response();
        }
        *inner.running_per_fn.entry(name.clone()).or_default() += 1;
    }
    let (step, index) = {
        let mut inner = fake.inner.lock().unwrap();
        let n = inner.calls_per_fn.entry(name.clone()).or_default();
        let i = *n;
        *n += 1;
        let step = inner
            .scripts
            .get(&name)
            .map(|s| nth(s, i).clone())
            .unwrap_or_else(|| Step::status(200));
        inner.calls.push(Recorded::new(method, &uri, headers, body));
        inner.running += 1;
        inner.max_running = inner.max_running.max(inner.running);
        (step, inner.calls.len() - 1)
    };
    fake.bump();
    tokio::time::sleep(step.delay).await;
    {
        let mut inner = fake.inner.lock().unwrap();
        inner.running -= 1;
        if let Some(n) = inner.running_per_fn.get_mut(&name) {
            *n -= 1;
        }
        inner.calls[index].finished = Some(Instant::now());
        inner.calls[index].status = Some(step.status);
    }
    fake.bump();
    let mut resp = (StatusCode::from_u16(step.status).unwrap(), step.body).into_response();
    for (k, v) in step.headers {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}

async fn describe(
    State(fake): State<FakeGateway>,
    Path(name): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let mut inner = fake.inner.lock().unwrap();
    inner
        .lookups
        .push(Recorded::new(method, &uri, headers, Bytes::new()));
    if inner.broken.contains(&name) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "broken").into_response();
    }
    match inner.known.get(&name) {
        Some(annotations) => {
            let annotations: serde_json::Map<String, serde_json::Value> = annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into()))
                .collect();
            let body = serde_json::json!({"name": name, "replicas": 1, "annotations": annotations});
            (StatusCode::OK, body.to_string()).into_response()
        }
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}

/// Step `i` of a script whose last step repeats.
fn nth<T>(script: &[T], i: usize) -> &T {
    &script[i.min(script.len() - 1)]
}

async fn callback(
    State(fake): State<FakeGateway>,
    uri: Uri,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mut inner = fake.inner.lock().unwrap();
    let i = inner.callbacks.len();
    let status = match inner.callback_script.as_slice() {
        [] => 200,
        s => *nth(s, i),
    };
    let mut recorded = Recorded::new(method, &uri, headers, body);
    recorded.finished = Some(recorded.started);
    recorded.status = Some(status);
    inner.callbacks.push(recorded);
    drop(inner);
    fake.bump();
    StatusCode::from_u16(status).unwrap()
}

/// Worker logs show with a failing test's output; `RUST_LOG=debug` for more.
pub fn init_logs() {
    // reqwest is built without a default TLS provider; tests make their own clients.
    queue_worker::tls::install_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A nats-server and a fake gateway for one test.
pub struct Env {
    pub nats: NatsServer,
    pub gateway: FakeGateway,
}

impl Env {
    pub async fn start() -> Env {
        init_logs();
        let nats = tokio::task::spawn_blocking(NatsServer::start)
            .await
            .unwrap()
            .expect("nats-server starts (install it: apt-get install -y nats-server)");
        let gateway = FakeGateway::start().await;
        Env { nats, gateway }
    }

    /// [`Env::start`] with `conf` as the server's configuration file (limits, accounts); the
    /// directory holding it and the store lives as long as the returned guard.
    pub async fn with_server_config(conf: &str) -> (Env, tempfile::TempDir) {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nats.conf");
        std::fs::write(&file, conf).unwrap();
        let store = dir.path().join("js");
        let args = vec!["-c".to_string(), file.display().to_string()];
        let nats = tokio::task::spawn_blocking(move || NatsServer::start_with(&store, 0, args))
            .await
            .unwrap()
            .expect("nats-server starts with the test's configuration");
        let gateway = FakeGateway::start().await;
        (Env { nats, gateway }, dir)
    }

    /// A config for this environment: test-friendly defaults, then `overrides`.
    pub fn config(&self, overrides: &[(&str, &str)]) -> Config {
        Config::load(&Sources::from_pairs(self.pairs(overrides)).unwrap()).unwrap()
    }

    /// The settings of [`Env::config`] as key–value pairs (environment variables for a
    /// worker run as a process).
    pub fn pairs(&self, overrides: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = vec![
            ("nats_url".into(), self.nats.url()),
            ("gateway_url".into(), self.gateway.url()),
            ("metrics_port".into(), "0".into()),
            ("stream_poll_interval".into(), "100ms".into()),
            ("initial_retry_wait".into(), "1s".into()),
            ("max_retry_wait".into(), "2s".into()),
            ("callback_retry_wait".into(), "100ms".into()),
            ("drain_timeout".into(), "10s".into()),
        ];
        for (k, v) in overrides {
            pairs.push((k.to_string(), v.to_string()));
        }
        pairs
    }

    pub async fn worker(&self, overrides: &[(&str, &str)]) -> Running {
        let running = queue_worker::worker::start(self.config(overrides))
            .await
            .unwrap();
        wait_ready(&running).await;
        running
    }

    /// A front door on an ephemeral port for this environment, ready to take requests.
    pub async fn frontdoor(&self, overrides: &[(&str, &str)]) -> queue_worker::frontdoor::Running {
        let mut all = vec![("frontdoor_listen", "127.0.0.1:0")];
        all.extend_from_slice(overrides);
        let door = queue_worker::frontdoor::start(self.config(&all))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(why) = door.health.readiness() {
            assert!(Instant::now() < deadline, "front door not ready: {why}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        door
    }

    pub async fn js(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(self.nats.url()).await.unwrap();
        async_nats::jetstream::new(client)
    }

    /// The dead-letter stream of the default queue, read as the `dead` commands do.
    pub async fn dead_letters(&self) -> queue_worker::worker::deadletter::DeadLetters {
        let config = self.config(&[]);
        queue_worker::worker::deadletter::DeadLetters::new(
            self.js().await,
            queue_worker::nats::stream::DeadLetterLayout::of(&config),
            &config.queue,
            &config.stream_name(),
            &config.default_namespace,
        )
    }

    /// Waits until the dead-letter stream holds `n` entries, and returns them.
    pub async fn wait_dead_letters(
        &self,
        n: usize,
    ) -> Vec<queue_worker::worker::deadletter::Record> {
        let dl = self.dead_letters().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The stream may be missing for a moment (a test deletes it; a worker makes it).
            let records = match dl.list(&Default::default(), true).await {
                Ok(r) => r,
                Err(queue_worker::worker::deadletter::DeadLetterError::NoStream(_)) => Vec::new(),
                Err(e) => panic!("{e}"),
            };
            if records.len() == n {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} dead letters, found {}: {records:?}",
                records.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Consumer counters of the shared consumer (default names).
    pub async fn consumer(&self) -> async_nats::jetstream::consumer::Info {
        let js = self.js().await;
        let stream = js.get_stream("OF_faas-request").await.unwrap();
        stream.consumer_info("faas-workers").await.unwrap()
    }

    /// Waits until the consumer has nothing pending or unacknowledged.
    pub async fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.consumer().await;
            if c.num_pending == 0 && c.num_ack_pending == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "queue not drained: {} pending, {} unacknowledged",
                c.num_pending,
                c.num_ack_pending
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub async fn wait_ready(running: &Running) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while running.health.readiness().is_err() {
        assert!(
            Instant::now() < deadline,
            "worker not ready: {:?}",
            running.health.readiness()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes a raw payload on a subject of the default queue and waits for JetStream to store it.
pub async fn publish_raw(js: &async_nats::jetstream::Context, subject: &str, payload: Vec<u8>) {
    js.publish(subject.to_string(), payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Reads `/metrics` over HTTP.
pub async fn scrape(running: &Running) -> String {
    reqwest::get(format!(
        "http://127.0.0.1:{}/metrics",
        running.metrics_addr.port()
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap()
}

/// Drains a worker and checks that it stopped cleanly.
pub async fn stop(worker: Running) {
    worker.shutdown();
    tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("the worker stops within 30s")
        .expect("the worker stops without error");
}

/// Asserts `min_ms <= gap < below_ms`.
pub fn assert_gap(gap: Duration, min_ms: u64, below_ms: u64, what: &str) {
    assert!(
        gap >= Duration::from_millis(min_ms) && gap < Duration::from_millis(below_ms),
        "{what}: retried after {gap:?}, expected {min_ms}ms to {below_ms}ms"
    );
}

/// Waits until a line of `/metrics` ends with `needle`, a sample's tail with its value
/// (metrics from polled state lag a little).
pub async fn wait_metric(running: &Running, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(running).await;
        // Whole values only: "} 2" must not match a line ending in "} 20".
        if text.lines().any(|l| l.ends_with(needle)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle} not in /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gateway-format job for `function` whose callback goes to the fake, tagged with the
/// function's name.
pub fn job(function: &str, env: &Env) -> queue_worker::message::publish::Submission {
    queue_worker::message::publish::Submission {
        function: function.into(),
        callback_url: Some(env.gateway.callback_url(function)),
        ..Default::default()
    }
}

/// Publishes `n` gateway-format jobs for `function` (empty body, no callback); returns their
/// call ids.
pub async fn submit(config: &Config, function: &str, n: usize) -> Vec<String> {
    let sub = queue_worker::message::publish::Submission {
        function: function.into(),
        ..Default::default()
    };
    queue_worker::message::publish::publish(config, &sub, n)
        .await
        .unwrap()
}

/// Runs the binary with `args` against the NATS at `nats_url`, asynchronously (a worker
/// under test may run on the same runtime); returns (exit code, stdout, stderr).
pub async fn cli(nats_url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
        .env_clear()
        .env("nats_url", nats_url)
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The messages of a stream, read in sequence order with their subjects and headers.
pub async fn stream_messages(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let s = js.get_stream(stream).await.unwrap();
    let state = s.cached_info().state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await {
            out.push(m);
        }
    }
    out
}
