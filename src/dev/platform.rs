//! A fake function platform on loopback, to load-test the worker against something that
//! behaves like OpenFaaS on Kubernetes: each function has replicas with a hard
//! `max_inflight` (the watchdog answers 429 with `X-OpenFaaS-Internal` above it), calls are
//! spread by uniformly random load balancing over the ready replicas (as kube-proxy does: no
//! retry on another replica), and an autoscaler adds or removes replicas (fixed, capacity or
//! queue based, as OpenFaaS's autoscaler does). It counts what the worker made it do:
//! successes, 429s, 503s, the replica timeline and how much of the available capacity was
//! used while there was work to fill it.
//!
//! Serves `/function/<name>[/…][?…]`, `/system/function/<name>` (for the front door's check)
//! and `/callback` (counted). Unlike [`crate::dev::sample`], everything is per function and
//! the replica count moves; like it, never on the production path.
//!
//! Durations in a [`FunctionSpec`] are what the platform waits, already scaled: scenarios
//! state real-world times and pass them through [`scaled`] so that minutes run in seconds.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::routing::{any, get, post};
use axum::Router;
use tokio_util::sync::CancellationToken;

/// The namespace the worker's metric labels carry (`<fn>.openfaas-fn`).
const NAMESPACE: &str = "openfaas-fn";

/// `real` × `scale`: a real-world duration as the simulation runs it.
pub fn scaled(real: Duration, scale: f64) -> Duration {
    real.mul_f64(scale)
}

/// How long one call runs.
#[derive(Debug, Clone, Copy)]
pub enum RunTime {
    Fixed(Duration),
    /// Uniformly random in `[min, max]`.
    Uniform {
        min: Duration,
        max: Duration,
    },
}

impl RunTime {
    fn draw(&self) -> Duration {
        match *self {
            RunTime::Fixed(d) => d,
            RunTime::Uniform { min, max } => min + max.saturating_sub(min).mul_f64(fastrand::f64()),
        }
    }

    /// The mean run time.
    pub fn mean(&self) -> Duration {
        match *self {
            RunTime::Fixed(d) => d,
            RunTime::Uniform { min, max } => (min + max) / 2,
        }
    }
}

/// How a function's replica count is chosen.
#[derive(Debug, Clone)]
pub enum Scaling {
    /// Never changes.
    Fixed,
    /// OpenFaaS's capacity mode: replicas = ⌈in-flight ÷ (target × proportion)⌉, so a
    /// replica is added only when the calls running exceed `proportion` of what the
    /// replicas that exist are meant to take.
    Capacity { target: u32, proportion: f64 },
    /// OpenFaaS's queue-based mode: replicas = ⌈pending ÷ target⌉, pending read from the
    /// worker's `queue_worker_pending_messages` at [`PlatformOptions::metrics_url`].
    Queue { target: u32 },
}

/// One function of the platform.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    pub name: String,
    /// Calls one replica runs at once; above it, 429 (the watchdog's `max_inflight`).
    pub max_inflight: u32,
    pub run_time: RunTime,
    /// Replicas ready when the platform starts (clamped to `[min_replicas, max_replicas]`).
    pub replicas: u32,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub scaling: Scaling,
    /// How often the autoscaler decides.
    pub interval: Duration,
    /// From a scale-up decision until the new replicas take calls (pod start).
    pub ready_delay: Duration,
    /// How long the desired count must stay lower before replicas are removed.
    pub scale_down_delay: Duration,
    /// Jobs the caller will submit for this function (see [`Platform::set_jobs`]): the
    /// utilisation sampler counts only while enough remain to fill every slot. 0: unknown,
    /// nothing sampled.
    pub jobs: u64,
}

/// The platform.
#[derive(Debug, Clone)]
pub struct PlatformOptions {
    pub functions: Vec<FunctionSpec>,
    /// The worker's `/metrics` (e.g. `http://127.0.0.1:8081/metrics`), read by queue-based
    /// scaling; `None`: queue-based functions keep their replicas.
    pub metrics_url: Option<String>,
    /// How often utilisation is sampled.
    pub sample_every: Duration,
}

/// The desired replica count of `scaling` for the load seen, clamped to `[min, max]`.
/// `inflight`: calls running on the function's replicas; `pending`: the worker's pending
/// count (`None`: not known, keep `current`).
pub fn desired_replicas(
    scaling: &Scaling,
    current: u32,
    inflight: u64,
    pending: Option<f64>,
    min: u32,
    max: u32,
) -> u32 {
    let wanted = match *scaling {
        Scaling::Fixed => current as f64,
        Scaling::Capacity { target, proportion } => {
            inflight as f64 / (target.max(1) as f64 * proportion.max(f64::MIN_POSITIVE))
        }
        Scaling::Queue { target } => match pending {
            Some(p) => p / target.max(1) as f64,
            None => current as f64,
        },
    };
    (wanted.ceil().max(0.0).min(u32::MAX as f64) as u32).clamp(min, max.max(min))
}

/// The scale-down delay: a lower desired count is applied only once it has lasted
/// `delay`; a higher one at once.
#[derive(Debug, Default, Clone)]
pub struct ScaleDown {
    lower_since: Option<Duration>,
}

impl ScaleDown {
    /// The replica count to apply at `now` (any clock) given the `current` and `desired`
    /// counts; `None` leaves it.
    pub fn decide(
        &mut self,
        now: Duration,
        current: u32,
        desired: u32,
        delay: Duration,
    ) -> Option<u32> {
        if desired >= current {
            self.lower_since = None;
            return (desired > current).then_some(desired);
        }
        let since = *self.lower_since.get_or_insert(now);
        if now.saturating_sub(since) >= delay {
            self.lower_since = None;
            return Some(desired);
        }
        None
    }
}

/// The sum of every sample of `metric` whose labels include `label="value"`, in Prometheus's
/// text exposition format; 0 when none (the worker removes a drained function's series).
pub fn sum_metric(text: &str, metric: &str, label: &str, value: &str) -> f64 {
    let needle = format!("{label}=\"{value}\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(metric)?;
            let (labels, sample) = match rest.strip_prefix('{') {
                Some(r) => r.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            let matches = labels.split(',').any(|l| l.trim() == needle);
            let v = sample.split_whitespace().next()?.parse::<f64>().ok()?;
            matches.then_some(v)
        })
        .sum()
}

/// Mean in-flight ÷ available slots over the samples taken while enough jobs remained to
/// fill every slot.
#[derive(Debug, Default, Clone, Copy)]
pub struct Utilisation {
    sum: f64,
    pub samples: u64,
}

impl Utilisation {
    /// One sample: `inflight` calls running on `ready` replicas of `slots` each, with
    /// `jobs` in all of which `done` have succeeded. Counted only when the jobs left could
    /// fill every available slot.
    pub fn observe(&mut self, inflight: u64, ready: u32, slots: u32, jobs: u64, done: u64) {
        let available = ready as u64 * slots as u64;
        if available == 0 || jobs == 0 || jobs.saturating_sub(done) < available {
            return;
        }
        self.sum += (inflight as f64 / available as f64).min(1.0);
        self.samples += 1;
    }

    /// `NaN` without samples.
    pub fn mean(&self) -> f64 {
        if self.samples == 0 {
            f64::NAN
        } else {
            self.sum / self.samples as f64
        }
    }
}

const STARTING: u8 = 0;
const READY: u8 = 1;
const REMOVED: u8 = 2;

struct Replica {
    inflight: AtomicU64,
    state: AtomicU8,
}

impl Replica {
    fn new(state: u8) -> Arc<Replica> {
        Arc::new(Replica {
            inflight: AtomicU64::new(0),
            state: AtomicU8::new(state),
        })
    }

    fn ready(&self) -> bool {
        self.state.load(Ordering::SeqCst) == READY
    }
}

/// Counters of one function. Times are since [`Platform::epoch`].
#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    successes: AtomicU64,
    rejected: AtomicU64,
    unavailable: AtomicU64,
    /// Successes of a call id that had succeeded before.
    duplicates: AtomicU64,
    inflight: AtomicU64,
    first_call_ns: AtomicU64,
    last_success_ns: AtomicU64,
}

struct Function {
    spec: FunctionSpec,
    jobs: AtomicU64,
    /// Replicas starting or ready; removed ones leave the list (their calls hold them).
    replicas: Mutex<Vec<Arc<Replica>>>,
    counters: Counters,
    succeeded: Mutex<HashSet<String>>,
    timeline: Mutex<Vec<(Duration, u32)>>,
    utilisation: Mutex<Utilisation>,
}

impl Function {
    fn ready(replicas: &[Arc<Replica>]) -> u32 {
        replicas.iter().filter(|r| r.ready()).count() as u32
    }

    /// Records the ready count at `at` if it changed.
    fn record(&self, at: Duration) {
        let ready = Self::ready(&self.replicas.lock().unwrap());
        let mut t = self.timeline.lock().unwrap();
        if t.last().map(|(_, n)| *n) != Some(ready) {
            t.push((at, ready));
        }
    }
}

/// What one function saw, at one moment.
#[derive(Debug, Clone)]
pub struct FunctionSnapshot {
    pub calls: u64,
    /// Answered 2xx.
    pub successes: u64,
    /// Answered 429: the chosen replica was full.
    pub rejected: u64,
    /// Answered 503: no replica ready.
    pub unavailable: u64,
    /// Successes of a call id that had already succeeded (0 when nothing ran twice).
    pub duplicates: u64,
    pub inflight: u64,
    pub ready: u32,
    /// `(since epoch, ready replicas)` at every change, starting with the initial count.
    pub timeline: Vec<(Duration, u32)>,
    pub utilisation: Utilisation,
    pub first_call: Option<Duration>,
    pub last_success: Option<Duration>,
}

/// The running platform; stops with the token given to [`start`].
pub struct Platform {
    pub addr: SocketAddr,
    /// When it started: the origin of every time it reports.
    pub epoch: Instant,
    functions: Arc<HashMap<String, Arc<Function>>>,
    callbacks: Arc<AtomicU64>,
}

#[derive(Clone)]
struct Shared {
    epoch: Instant,
    functions: Arc<HashMap<String, Arc<Function>>>,
    callbacks: Arc<AtomicU64>,
}

impl Shared {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }
}

/// Serves on `addr` (loopback) and runs each function's autoscaler and the utilisation
/// sampler, until `stop`.
pub async fn start(
    addr: SocketAddr,
    opts: PlatformOptions,
    stop: CancellationToken,
) -> std::io::Result<Platform> {
    let epoch = Instant::now();
    let mut functions = HashMap::new();
    for spec in opts.functions {
        let n = spec
            .replicas
            .clamp(spec.min_replicas, spec.max_replicas.max(spec.min_replicas));
        let replicas = (0..n).map(|_| Replica::new(READY)).collect();
        let f = Function {
            jobs: AtomicU64::new(spec.jobs),
            replicas: Mutex::new(replicas),
            counters: Counters {
                first_call_ns: AtomicU64::new(u64::MAX),
                ..Counters::default()
            },
            succeeded: Mutex::new(HashSet::new()),
            timeline: Mutex::new(vec![(Duration::ZERO, n)]),
            utilisation: Mutex::new(Utilisation::default()),
            spec,
        };
        functions.insert(f.spec.name.clone(), Arc::new(f));
    }
    let shared = Shared {
        epoch,
        functions: Arc::new(functions),
        callbacks: Arc::new(AtomicU64::new(0)),
    };
    let app = Router::new()
        .route("/function/{*rest}", any(function))
        .route("/callback", post(callback))
        .route("/system/function/{name}", get(describe))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let serve_stop = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { serve_stop.cancelled().await })
            .await;
    });
    for f in shared.functions.values() {
        if !matches!(f.spec.scaling, Scaling::Fixed) {
            tokio::spawn(autoscale(
                shared.clone(),
                f.clone(),
                opts.metrics_url.clone(),
                stop.clone(),
            ));
        }
    }
    tokio::spawn(sample(shared.clone(), opts.sample_every, stop));
    Ok(Platform {
        addr: bound,
        epoch,
        functions: shared.functions,
        callbacks: shared.callbacks,
    })
}

impl Platform {
    /// The base URL (the worker's `gateway_url`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the jobs the caller will submit for `function` (for the utilisation sampler).
    pub fn set_jobs(&self, function: &str, n: u64) {
        if let Some(f) = self.functions.get(function) {
            f.jobs.store(n, Ordering::SeqCst);
        }
    }

    /// Callbacks received on `/callback`.
    pub fn callbacks(&self) -> u64 {
        self.callbacks.load(Ordering::SeqCst)
    }

    /// What `function` saw so far; `None` when the platform does not run it.
    pub fn snapshot(&self, function: &str) -> Option<FunctionSnapshot> {
        let f = self.functions.get(function)?;
        let c = &f.counters;
        let at = |ns: u64| (ns != u64::MAX && ns != 0).then(|| Duration::from_nanos(ns));
        Some(FunctionSnapshot {
            calls: c.calls.load(Ordering::SeqCst),
            successes: c.successes.load(Ordering::SeqCst),
            rejected: c.rejected.load(Ordering::SeqCst),
            unavailable: c.unavailable.load(Ordering::SeqCst),
            duplicates: c.duplicates.load(Ordering::SeqCst),
            inflight: c.inflight.load(Ordering::SeqCst),
            ready: Function::ready(&f.replicas.lock().unwrap()),
            timeline: f.timeline.lock().unwrap().clone(),
            utilisation: *f.utilisation.lock().unwrap(),
            first_call: at(c.first_call_ns.load(Ordering::SeqCst)),
            last_success: at(c.last_success_ns.load(Ordering::SeqCst)),
        })
    }
}

/// Takes a slot on a replica and gives it back however the call ends (the worker may drop
/// the connection at its timeout).
struct Slot<'a> {
    replica: Arc<Replica>,
    function: &'a Function,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.replica.inflight.fetch_sub(1, Ordering::SeqCst);
        self.function
            .counters
            .inflight
            .fetch_sub(1, Ordering::SeqCst);
    }
}

fn internal(status: StatusCode, body: String) -> (StatusCode, HeaderMap, Bytes) {
    let mut h = HeaderMap::new();
    h.insert("x-openfaas-internal", HeaderValue::from_static("true"));
    (status, h, Bytes::from(body))
}

/// The function's name in `/function/<name>[.<ns>][/…]`, as the platform knows it.
fn function_of<'a>(s: &'a Shared, rest: &str) -> Option<&'a Arc<Function>> {
    let name = rest.split('/').next().unwrap_or_default();
    s.functions.get(name).or_else(|| {
        let (short, ns) = name.rsplit_once('.')?;
        (ns == NAMESPACE).then(|| s.functions.get(short)).flatten()
    })
}

async fn function(
    State(s): State<Shared>,
    Path(rest): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, Bytes) {
    let Some(f) = function_of(&s, &rest) else {
        return (
            StatusCode::NOT_FOUND,
            HeaderMap::new(),
            Bytes::from(format!("function {rest} not found\n")),
        );
    };
    let c = &f.counters;
    c.calls.fetch_add(1, Ordering::SeqCst);
    c.first_call_ns
        .fetch_min(s.now().as_nanos() as u64, Ordering::SeqCst);
    // Random load balancing over the ready replicas; the chosen one takes the call or
    // refuses it, there is no second choice.
    let chosen = {
        let replicas = f.replicas.lock().unwrap();
        let ready: Vec<&Arc<Replica>> = replicas.iter().filter(|r| r.ready()).collect();
        if ready.is_empty() {
            None
        } else {
            let r = ready[fastrand::usize(..ready.len())];
            if r.inflight.load(Ordering::SeqCst) >= f.spec.max_inflight as u64 {
                Some(None)
            } else {
                r.inflight.fetch_add(1, Ordering::SeqCst);
                c.inflight.fetch_add(1, Ordering::SeqCst);
                Some(Some(r.clone()))
            }
        }
    };
    let replica = match chosen {
        None => {
            c.unavailable.fetch_add(1, Ordering::SeqCst);
            return internal(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("No endpoints available for: {}.\n", f.spec.name),
            );
        }
        Some(None) => {
            c.rejected.fetch_add(1, Ordering::SeqCst);
            return internal(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "Concurrent request limit exceeded. Max concurrent requests: {}\n",
                    f.spec.max_inflight
                ),
            );
        }
        Some(Some(r)) => r,
    };
    let slot = Slot {
        replica,
        function: f,
    };
    tokio::time::sleep(f.spec.run_time.draw()).await;
    drop(slot);
    c.last_success_ns
        .fetch_max(s.now().as_nanos() as u64, Ordering::SeqCst);
    let call_id = headers
        .get("x-call-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !call_id.is_empty() && !f.succeeded.lock().unwrap().insert(call_id.to_string()) {
        c.duplicates.fetch_add(1, Ordering::SeqCst);
    }
    c.successes.fetch_add(1, Ordering::SeqCst);
    (StatusCode::OK, HeaderMap::new(), body)
}

/// The gateway API's function description (the fields the front door reads, and replicas).
async fn describe(State(s): State<Shared>, Path(name): Path<String>) -> (StatusCode, String) {
    match s.functions.get(&name) {
        Some(f) => {
            let ready = Function::ready(&f.replicas.lock().unwrap());
            let body = serde_json::json!({
                "name": name,
                "namespace": NAMESPACE,
                "annotations": {},
                "replicas": ready,
                "availableReplicas": ready,
            });
            (StatusCode::OK, body.to_string())
        }
        None => (
            StatusCode::NOT_FOUND,
            format!("function {name} not found\n"),
        ),
    }
}

async fn callback(State(s): State<Shared>) -> StatusCode {
    s.callbacks.fetch_add(1, Ordering::SeqCst);
    StatusCode::OK
}

/// One function's autoscaler: every `interval`, the desired count; more replicas start and
/// are ready after `ready_delay`; fewer (after `scale_down_delay`) stop taking calls at
/// once, newest first, starting ones before ready ones, and finish what they run.
async fn autoscale(
    s: Shared,
    f: Arc<Function>,
    metrics_url: Option<String>,
    stop: CancellationToken,
) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let label = format!("{}.{NAMESPACE}", f.spec.name);
    let mut down = ScaleDown::default();
    let mut tick = tokio::time::interval(f.spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let pending = match (&f.spec.scaling, &metrics_url) {
            (Scaling::Queue { .. }, Some(url)) => scrape(&client, url).await.map(|text| {
                sum_metric(
                    &text,
                    "queue_worker_pending_messages",
                    "function_name",
                    &label,
                )
            }),
            _ => None,
        };
        let current = f.replicas.lock().unwrap().len() as u32;
        let inflight = f.counters.inflight.load(Ordering::SeqCst);
        let spec = &f.spec;
        let desired = desired_replicas(
            &spec.scaling,
            current,
            inflight,
            pending,
            spec.min_replicas,
            spec.max_replicas,
        );
        let Some(next) = down.decide(s.now(), current, desired, spec.scale_down_delay) else {
            continue;
        };
        if next > current {
            let new: Vec<Arc<Replica>> = (current..next).map(|_| Replica::new(STARTING)).collect();
            f.replicas.lock().unwrap().extend(new.iter().cloned());
            let (s, f, delay) = (s.clone(), f.clone(), spec.ready_delay);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                for r in new {
                    let _ = r.state.compare_exchange(
                        STARTING,
                        READY,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                }
                f.record(s.now());
            });
        } else {
            {
                let mut replicas = f.replicas.lock().unwrap();
                for _ in next..current {
                    let i = replicas
                        .iter()
                        .rposition(|r| !r.ready())
                        .unwrap_or(replicas.len() - 1);
                    replicas.remove(i).state.store(REMOVED, Ordering::SeqCst);
                }
            }
            f.record(s.now());
        }
    }
}

/// GET `url`'s body as text; `None` on any failure (the autoscaler keeps its count).
async fn scrape(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<Bytes>,
    >,
    url: &str,
) -> Option<String> {
    use http_body_util::BodyExt as _;
    let uri: hyper::Uri = url.parse().ok()?;
    let read = async {
        let resp = client.get(uri).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        String::from_utf8(body.to_vec()).ok()
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()
        .flatten()
}

/// Every `every`, each function's in-flight ÷ available slots while jobs remain.
async fn sample(s: Shared, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        for f in s.functions.values() {
            let (inflight, ready) = {
                let replicas = f.replicas.lock().unwrap();
                let ready: Vec<_> = replicas.iter().filter(|r| r.ready()).collect();
                let inflight = ready
                    .iter()
                    .map(|r| r.inflight.load(Ordering::SeqCst))
                    .sum::<u64>();
                (inflight, ready.len() as u32)
            };
            f.utilisation.lock().unwrap().observe(
                inflight,
                ready,
                f.spec.max_inflight,
                f.jobs.load(Ordering::SeqCst),
                f.counters.successes.load(Ordering::SeqCst),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_replicas_by_mode() {
        let cap = Scaling::Capacity {
            target: 5,
            proportion: 0.9,
        };
        // (scaling, current, inflight, pending, min, max, desired)
        type Case<'a> = (&'a Scaling, u32, u64, Option<f64>, u32, u32, u32);
        let cases: &[Case] = &[
            (&Scaling::Fixed, 3, 100, Some(100.0), 1, 10, 3),
            (&Scaling::Fixed, 0, 0, None, 1, 10, 1),
            // One full replica of 5: 5 ÷ 4.5 → 2.
            (&cap, 1, 5, None, 1, 10, 2),
            (&cap, 1, 4, None, 1, 10, 1),
            (&cap, 4, 20, None, 1, 10, 5),
            (&cap, 9, 45, None, 1, 10, 10),
            (&cap, 10, 50, None, 1, 10, 10),
            (&cap, 3, 0, None, 1, 10, 1),
            (&Scaling::Queue { target: 5 }, 1, 0, Some(1000.0), 1, 10, 10),
            (&Scaling::Queue { target: 5 }, 1, 0, Some(11.0), 1, 10, 3),
            (&Scaling::Queue { target: 5 }, 4, 0, Some(0.0), 1, 10, 1),
            // Not known: keep what there is.
            (&Scaling::Queue { target: 5 }, 4, 0, None, 1, 10, 4),
        ];
        for &(scaling, current, inflight, pending, min, max, want) in cases {
            assert_eq!(
                desired_replicas(scaling, current, inflight, pending, min, max),
                want,
                "{scaling:?} current {current} inflight {inflight} pending {pending:?}"
            );
        }
    }

    #[test]
    fn scale_down_waits_for_the_delay_and_scale_up_does_not() {
        let s = Duration::from_secs;
        let mut d = ScaleDown::default();
        assert_eq!(d.decide(s(0), 2, 5, s(10)), Some(5));
        assert_eq!(d.decide(s(1), 5, 5, s(10)), None);
        assert_eq!(d.decide(s(2), 5, 1, s(10)), None);
        assert_eq!(d.decide(s(11), 5, 2, s(10)), None);
        assert_eq!(d.decide(s(12), 5, 2, s(10)), Some(2));
        // A higher count in between starts the wait again.
        assert_eq!(d.decide(s(20), 5, 1, s(10)), None);
        assert_eq!(d.decide(s(25), 5, 5, s(10)), None);
        assert_eq!(d.decide(s(31), 5, 1, s(10)), None);
        assert_eq!(d.decide(s(41), 5, 1, s(10)), Some(1));
    }

    #[test]
    fn metric_sums_the_matching_series() {
        let text = "\
# HELP queue_worker_pending_messages Messages of the queue not yet finished.
# TYPE queue_worker_pending_messages gauge
queue_worker_pending_messages{function_name=\"all-functions\",queue_name=\"q\"} 0
queue_worker_pending_messages{function_name=\"sleep.openfaas-fn\",queue_name=\"q\"} 37
queue_worker_pending_messages{function_name=\"sleep.openfaas-fn\",queue_name=\"r\"} 3
queue_worker_pending_messages{function_name=\"sleepy.openfaas-fn\",queue_name=\"q\"} 100
queue_worker_pending_messages_other{function_name=\"sleep.openfaas-fn\"} 9
queue_worker_pending_messages 5
";
        let sum = |label: &str| {
            sum_metric(
                text,
                "queue_worker_pending_messages",
                "function_name",
                label,
            )
        };
        assert_eq!(sum("sleep.openfaas-fn"), 40.0);
        assert_eq!(sum("sleepy.openfaas-fn"), 100.0);
        assert_eq!(sum("gone.openfaas-fn"), 0.0);
        assert_eq!(sum_metric("", "m", "l", "v"), 0.0);
    }

    #[test]
    fn utilisation_counts_only_while_jobs_can_fill_the_slots() {
        let mut u = Utilisation::default();
        assert!(u.mean().is_nan());
        // 2 replicas × 5 slots, 100 jobs, 20 done: 80 left ≥ 10 slots.
        u.observe(10, 2, 5, 100, 20);
        u.observe(5, 2, 5, 100, 20);
        assert_eq!(u.samples, 2);
        assert!((u.mean() - 0.75).abs() < 1e-9);
        // 9 left < 10 slots: the tail is not counted.
        u.observe(0, 2, 5, 100, 91);
        // No replica ready, or no jobs known.
        u.observe(0, 0, 5, 100, 0);
        u.observe(0, 2, 5, 0, 0);
        assert_eq!(u.samples, 2);
        // Exactly enough left counts.
        u.observe(10, 2, 5, 100, 90);
        assert_eq!(u.samples, 3);
        assert!((u.mean() - 2.5 / 3.0).abs() < 1e-9);
    }

    #[tokio::test]
    async fn full_replica_answers_429_and_a_free_one_echoes() {
        let stop = CancellationToken::new();
        let p = start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            PlatformOptions {
                functions: vec![FunctionSpec {
                    name: "f".into(),
                    max_inflight: 1,
                    run_time: RunTime::Fixed(Duration::from_millis(300)),
                    replicas: 1,
                    min_replicas: 1,
                    max_replicas: 1,
                    scaling: Scaling::Fixed,
                    interval: Duration::from_secs(1),
                    ready_delay: Duration::ZERO,
                    scale_down_delay: Duration::ZERO,
                    jobs: 2,
                }],
                metrics_url: None,
                sample_every: Duration::from_millis(10),
            },
            stop.clone(),
        )
        .await
        .unwrap();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<Bytes>>();
        let call = |path: &str| {
            let req = hyper::Request::post(format!("{}{path}", p.url()))
                .body(http_body_util::Full::new(Bytes::from_static(b"hi")))
                .unwrap();
            client.request(req)
        };
        let first = tokio::spawn(call("/function/f/sub?x=1"));
        // Until the first call holds the only slot.
        while p.snapshot("f").unwrap().inflight == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second = call("/function/f.openfaas-fn").await.unwrap();
        assert_eq!(second.status(), 429);
        assert_eq!(second.headers()["x-openfaas-internal"], "true");
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.status(), 200);
        use http_body_util::BodyExt as _;
        assert_eq!(
            &first.into_body().collect().await.unwrap().to_bytes()[..],
            b"hi"
        );
        assert_eq!(call("/function/nope").await.unwrap().status(), 404);
        let snap = p.snapshot("f").unwrap();
        assert_eq!((snap.calls, snap.successes, snap.rejected), (2, 1, 1));
        assert_eq!(snap.timeline, vec![(Duration::ZERO, 1)]);
        assert!(snap.first_call.is_some() && snap.last_success.is_some());
        stop.cancel();
    }
}
