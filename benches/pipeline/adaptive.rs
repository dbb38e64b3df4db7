//! Adaptive concurrency (issue 16, items 4 and 5): the worker in function mode against a
//! simulated OpenFaaS ([`queue_worker::dev::platform`]: replicas with a hard `max_inflight`
//! answering 429, random load balancing, an autoscaler), on OpenFaaS's own load tests. Each
//! scenario runs twice in one invocation, `limiter_enabled=false` (greedy) and `true`, each
//! time with a fresh queue, a fresh platform and a fresh worker process; jobs are published
//! as the gateway does, by concurrent publishers that each wait for JetStream's ack (as
//! `hey -c N` waits for the gateway's 202).
//!
//! Times are stated in real-world seconds and run scaled (`time scale` in the notes): every
//! duration of the platform and the worker's retry waits are multiplied by it, so a
//! five-minute test runs in seconds. The report gives both.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use queue_worker::dev::natsd::free_port;
use queue_worker::dev::platform::{
    self, scaled, FunctionSnapshot, FunctionSpec, Platform, PlatformOptions, RunTime, Scaling,
};
use queue_worker::message::function::FunctionName;
use queue_worker::nats::stream::{ensure_stream, Layout};
use tokio_util::sync::CancellationToken;

use crate::proc::{WorkerProc, WorkerSpec};
use crate::report::{count, ratio, Samples, Table};
use crate::scenarios::{job, NAMESPACE};

/// The limiter's runs are stretched this much more than greedy's (closer to real-world
/// times): they are short anyway, and at greedy's scale (2 s jobs in 40 ms) the worker's
/// own fixed times (discovery's 50 ms tick, a pull's round trip, the 200 ms dry and cool-down
/// backoffs) weigh as if they were seconds. Greedy's figures are set by its retry waits,
/// which scale exactly; at the same scale as the limiter's its runs would take hours.
const LIMITER_STRETCH: f64 = 5.0;

/// The scenarios `--adaptive-scenarios` can pick.
pub const SCENARIOS: [&str; 3] = ["docs", "blog", "two"];
/// Longest one run may take before the bench gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(900);
/// What the worker logs once it consumes in function mode.
const READY_LOG: &str = "Function mode: one consumer per function";

pub struct Options {
    pub scenarios: Vec<String>,
    pub runs: usize,
    /// Fewer jobs per scenario (a fifth), at half the time scale.
    pub quick: bool,
    /// Multiplies every scenario's time scale (`--adaptive-scale`): above 1, simulated
    /// times are longer and closer to the real world, and the runs slower.
    pub scale: f64,
    /// Skip the greedy runs (tuning).
    pub limiter_only: bool,
    pub keep_logs: bool,
    /// `--worker-env`: settings given to every worker, after the scenario's own.
    pub worker_env: Vec<(String, String)>,
}

/// One scenario: functions on the platform, how their jobs are published, the worker's
/// settings derived from them.
struct Scenario {
    name: &'static str,
    /// Real-world seconds × `scale` = simulated seconds.
    scale: f64,
    /// Durations in real-world terms; scaled when the platform starts.
    functions: Vec<FunctionSpec>,
    publishers: usize,
    /// The worker's `stream_poll_interval` in real-world terms (how fresh its pending gauge
    /// is, which queue-based scaling reads).
    stream_poll: Duration,
    notes: String,
}

impl Scenario {
    /// Most calls the platform can run at once (every function at its max replicas).
    fn capacity(&self) -> u64 {
        self.functions
            .iter()
            .map(|f| f.max_replicas as u64 * f.max_inflight as u64)
            .sum()
    }

    /// `self` with every time `factor` times longer.
    fn stretched(&self, factor: f64) -> Scenario {
        Scenario {
            name: self.name,
            scale: self.scale * factor,
            functions: self.functions.clone(),
            publishers: self.publishers,
            stream_poll: self.stream_poll,
            notes: String::new(),
        }
    }

    /// `self` with only `function` (for "the healthy one alone").
    fn only(&self, function: &str) -> Scenario {
        Scenario {
            name: self.name,
            scale: self.scale,
            functions: self
                .functions
                .iter()
                .filter(|f| f.name == function)
                .cloned()
                .collect(),
            publishers: self.publishers,
            stream_poll: self.stream_poll,
            notes: String::new(),
        }
    }
}

/// Product defaults of the worker's retries (`initial_retry_wait`, `max_retry_wait`,
/// `max_retry_attempts`), scaled but never below the worker's 100 ms floor.
const INITIAL_RETRY_WAIT: Duration = Duration::from_secs(10);
const MAX_RETRY_WAIT: Duration = Duration::from_secs(120);
const MAX_RETRY_ATTEMPTS: u32 = 100;
const RETRY_FLOOR: Duration = Duration::from_millis(100);

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// A function spec with the platform's shared defaults (real-world durations).
fn function(name: &str, jobs: u64, run_time: RunTime, scaling: Scaling) -> FunctionSpec {
    FunctionSpec {
        name: name.into(),
        max_inflight: 5,
        run_time,
        replicas: 1,
        min_replicas: 1,
        max_replicas: 1,
        scaling,
        interval: secs(5.0),
        ready_delay: secs(2.0),
        scale_down_delay: secs(30.0),
        jobs,
    }
}

fn docs(jobs: u64, scale: f64) -> Scenario {
    let f = FunctionSpec {
        max_replicas: 10,
        ..function(
            "sleep",
            jobs,
            RunTime::Uniform {
                min: secs(2.0),
                max: secs(2.2),
            },
            Scaling::Capacity {
                target: 5,
                proportion: 0.9,
            },
        )
    };
    Scenario {
        name: "docs",
        scale,
        notes: format!(
            "**docs**: OpenFaaS's documented example. {jobs} invocations of `sleep` (2 s, \
             drawn uniformly in 2.0–2.2 s for the process and HTTP overhead), `max_inflight` \
             5 per replica, 1–10 replicas starting at 1, capacity scaling with target 5 × \
             proportion 0.9 (replicas = ⌈in-flight ÷ 4.5⌉, in-flight read at each decision), \
             autoscaler every 5 s, new replicas ready 2 s after the decision, scale-down \
             after 30 s lower; published by 4 concurrent publishers (`hey -c 4`); time scale \
             {scale}."
        ),
        functions: vec![f],
        publishers: 4,
        stream_poll: secs(5.0),
    }
}

fn blog(jobs: u64, scale: f64) -> Scenario {
    let f = FunctionSpec {
        max_replicas: 10,
        ..function(
            "sleep",
            jobs,
            RunTime::Uniform {
                min: secs(10.0),
                max: secs(25.0),
            },
            Scaling::Queue { target: 5 },
        )
    };
    Scenario {
        name: "blog",
        scale,
        notes: format!(
            "**blog**: OpenFaaS's queue-based scaling blog post. {jobs} jobs of 10–25 s \
             (uniform), `max_inflight` 5 per replica, 1–10 replicas starting at 1, queue-based \
             scaling with target 5 pending per replica (replicas = ⌈pending ÷ 5⌉, pending = \
             the worker's `queue_worker_pending_messages` for the function, scraped from its \
             `/metrics` at each decision; the worker refreshes it every 5 s, \
             `stream_poll_interval`), autoscaler every 5 s, ready 2 s after the decision, \
             scale-down after 30 s lower; 4 publishers; time scale {scale}. Ideal drain = total \
             work ÷ (10 × 5) slots with the mean run time."
        ),
        functions: vec![f],
        publishers: 4,
        stream_poll: secs(5.0),
    }
}

fn two(slow_jobs: u64, fast_jobs: u64, scale: f64) -> Scenario {
    let one = RunTime::Fixed(secs(1.0));
    let slow = function("slow", slow_jobs, one, Scaling::Fixed);
    let fast = FunctionSpec {
        replicas: 5,
        min_replicas: 5,
        max_replicas: 5,
        ..function("fast", fast_jobs, one, Scaling::Fixed)
    };
    Scenario {
        name: "two",
        scale,
        notes: format!(
            "**two**: one overloaded function next to a healthy one. `slow`: 1 replica (fixed) \
             × 5 slots, {slow_jobs} jobs of 1 s (a backlog that outlasts `fast`'s); `fast`: 5 replicas (fixed) × 5 slots, \
             {fast_jobs} jobs of 1 s; both published at once, interleaved, by 4 publishers; \
             time scale {scale}. `fast` also runs alone with the same settings (same worker \
             `max_inflight`): \"the healthy one is not slowed\" compares its drain next to \
             `slow` with its drain alone."
        ),
        functions: vec![slow, fast],
        publishers: 4,
        stream_poll: secs(5.0),
    }
}

/// A scenario by name, its time scale × `scale`; `quick`: a fifth of the jobs, at half the
/// time scale (a smoke test: the shorter the simulated times, the more the worker's own
/// latencies weigh).
///
/// The scales are set by the greedy runs: where a replica's slots are far fewer than the
/// jobs, greedy retries move in lockstep waves at the longest retry wait (120 s) and each
/// wave gets a replica's worth of jobs through, so 500 `sleep` jobs take hours of
/// real-world time.
fn scenario(name: &str, quick: bool, scale: f64) -> Scenario {
    let n = |full: u64| if quick { full / 5 } else { full };
    let s = |full: f64| scale * if quick { full / 2.0 } else { full };
    match name {
        "docs" => docs(n(500), s(0.02)),
        "blog" => blog(n(1000), s(0.04)),
        _ => two(n(200), n(200), s(0.02)),
    }
}

/// One function in one run.
#[derive(Debug, Clone)]
pub struct FnRun {
    pub function: String,
    pub jobs: u64,
    /// First publish → the function's last success, simulated.
    pub drain: Duration,
    /// The same in real-world seconds (÷ the run's time scale): what runs at different
    /// scales are compared by.
    pub real_drain: f64,
    pub rejected: u64,
    pub unavailable: u64,
    pub calls: u64,
    pub utilisation: f64,
    /// `(real-world seconds since the first publish, ready replicas)` at every change.
    pub timeline: Vec<(f64, u32)>,
}

/// One run of one scenario (or of its healthy function alone).
pub struct Run {
    /// `docs`, `blog`, `two`, or `two, fast alone`.
    pub variant: String,
    pub limiter: bool,
    pub scale: f64,
    pub functions: Vec<FnRun>,
}

/// Everything the adaptive scenarios measured, for the report.
#[derive(Default)]
pub struct Results {
    pub runs: Vec<Run>,
    notes: Vec<String>,
    worker_notes: Vec<String>,
    /// Blog's ideal drain in real-world seconds.
    blog_ideal: Option<f64>,
}

/// Runs the chosen scenarios, `runs` times each, greedy then with the limiter.
pub async fn run(nats_url: &str, worker_bin: &Path, o: &Options) -> anyhow::Result<Results> {
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client);
    let dir = tempfile::Builder::new().prefix("qw-adaptive-").tempdir()?;
    let logs = dir.path().to_owned();
    let _dir = if o.keep_logs {
        eprintln!("adaptive: worker logs in {}", logs.display());
        let _ = dir.keep();
        None
    } else {
        Some(dir)
    };
    let ctx = Ctx {
        js,
        nats_url: nats_url.to_string(),
        worker_bin: worker_bin.to_owned(),
        logs,
        keep_logs: o.keep_logs,
        worker_env: o.worker_env.clone(),
        seq: AtomicUsize::new(0),
    };
    let mut r = Results::default();
    for name in SCENARIOS
        .iter()
        .filter(|s| o.scenarios.iter().any(|x| x == *s))
    {
        let sc = scenario(name, o.quick, o.scale);
        let capacity = sc.capacity();
        r.notes.push(sc.notes.clone());
        let (init, max) = retry_waits(sc.scale);
        let (on_init, on_max) = retry_waits(sc.scale * LIMITER_STRETCH);
        r.worker_notes.push(format!(
            "{}: `max_inflight` {}, `initial_retry_wait` {} and `max_retry_wait` {} (greedy), {} and {} (limiter)",
            sc.name,
            2 * capacity,
            show_ms(init),
            show_ms(max),
            show_ms(on_init),
            show_ms(on_max)
        ));
        if sc.name == "blog" {
            let f = &sc.functions[0];
            let work = f.jobs as f64 * f.run_time.mean().as_secs_f64();
            r.blog_ideal = Some(work / (f.max_replicas as f64 * f.max_inflight as f64));
        }
        let on = sc.stretched(LIMITER_STRETCH);
        for i in 1..=o.runs {
            for limiter in [false, true] {
                if o.limiter_only && !limiter {
                    continue;
                }
                let sc = if limiter { &on } else { &sc };
                let run = ctx.run(sc, sc.name, limiter, capacity).await?;
                eprintln!("  adaptive {i}/{}: {}", o.runs, line(&run));
                r.runs.push(run);
                if sc.name == "two" {
                    let alone = sc.only("fast");
                    let run = ctx
                        .run(&alone, "two, fast alone", limiter, capacity)
                        .await?;
                    eprintln!("  adaptive {i}/{}: {}", o.runs, line(&run));
                    r.runs.push(run);
                }
            }
        }
    }
    Ok(r)
}

struct Ctx {
    js: jetstream::Context,
    nats_url: String,
    worker_bin: PathBuf,
    logs: PathBuf,
    keep_logs: bool,
    worker_env: Vec<(String, String)>,
    seq: AtomicUsize,
}

/// The worker's retry waits at `scale`: the product defaults, at least 100 ms.
fn retry_waits(scale: f64) -> (Duration, Duration) {
    (
        scaled(INITIAL_RETRY_WAIT, scale).max(RETRY_FLOOR),
        scaled(MAX_RETRY_WAIT, scale).max(RETRY_FLOOR),
    )
}

/// A duration as the worker's settings take it, in whole milliseconds.
fn show_ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl Ctx {
    /// One run: fresh queue, platform and worker; publish every job; wait until each job
    /// succeeded exactly once and the stream is empty.
    async fn run(
        &self,
        sc: &Scenario,
        variant: &str,
        limiter: bool,
        capacity: u64,
    ) -> anyhow::Result<Run> {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        let queue = format!("adaptive-{}-{n}", sc.name);
        let layout = Layout {
            stream: format!("OF_{queue}"),
            queue: queue.clone(),
            durable: "faas-workers".into(),
            replicas: 1,
            ack_wait: Duration::from_secs(60),
        };
        ensure_stream(&self.js, &layout)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;

        let port = free_port()?;
        let specs: Vec<FunctionSpec> = sc
            .functions
            .iter()
            .map(|f| FunctionSpec {
                run_time: match f.run_time {
                    RunTime::Fixed(d) => RunTime::Fixed(scaled(d, sc.scale)),
                    RunTime::Uniform { min, max } => RunTime::Uniform {
                        min: scaled(min, sc.scale),
                        max: scaled(max, sc.scale),
                    },
                },
                interval: scaled(f.interval, sc.scale),
                ready_delay: scaled(f.ready_delay, sc.scale),
                scale_down_delay: scaled(f.scale_down_delay, sc.scale),
                ..f.clone()
            })
            .collect();
        let shortest = specs
            .iter()
            .map(|f| f.run_time.mean())
            .min()
            .unwrap_or(Duration::from_millis(100));
        let stop = CancellationToken::new();
        let _stop_platform = stop.clone().drop_guard();
        let platform = platform::start(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            PlatformOptions {
                functions: specs.clone(),
                metrics_url: Some(format!("http://127.0.0.1:{port}/metrics")),
                sample_every: (shortest / 20).max(Duration::from_millis(2)),
            },
            stop.clone(),
        )
        .await?;

        let (init, max) = retry_waits(sc.scale);
        let settings = [
            ("scaling_mode", "function".to_string()),
            ("limiter_enabled", limiter.to_string()),
            ("initial_retry_wait", show_ms(init)),
            ("max_retry_wait", show_ms(max)),
            ("max_retry_attempts", MAX_RETRY_ATTEMPTS.to_string()),
            ("backoff", "exponential".into()),
            ("metrics_port", port.to_string()),
            (
                "stream_poll_interval",
                show_ms(scaled(sc.stream_poll, sc.scale).max(Duration::from_millis(100))),
            ),
        ];
        let gateway = platform.url();
        let spec = WorkerSpec {
            nats_url: &self.nats_url,
            queue: &queue,
            gateway_url: &gateway,
            max_inflight: Some(2 * capacity as usize),
            extra: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .chain(self.worker_env.iter().cloned())
                .collect(),
        };
        let log = self.logs.join(format!("{queue}.log"));
        let mut worker = WorkerProc::spawn(&self.worker_bin, &spec, log.clone())?;
        worker
            .wait_for_log(READY_LOG, Duration::from_secs(30))
            .await?;

        let names: Vec<(String, String)> = interleave(&specs)
            .into_iter()
            .map(|f| {
                let subject = FunctionName::parse(&f, NAMESPACE)?.subject(&queue);
                Ok((f, subject))
            })
            .collect::<anyhow::Result<_>>()?;
        let started = Instant::now();
        let work = async {
            self.publish(names, sc.publishers).await?;
            self.wait_done(&platform, &specs, started).await
        };
        tokio::select! {
            r = work => r?,
            e = watch(&mut worker) => return Err(e),
        }
        let out = self.check(&platform, &specs, &layout).await;
        worker.kill().await;
        stop.cancel();
        let _ = self.js.delete_stream(&layout.stream).await;
        let _ = self
            .js
            .delete_stream(format!("{}-dead", layout.stream))
            .await;
        if out.is_ok() && !self.keep_logs {
            let _ = std::fs::remove_file(&log);
        }
        out.with_context(|| {
            format!(
                "{variant}, limiter {}: worker log {}",
                on_off(limiter),
                log.display()
            )
        })?;

        let offset = started.saturating_duration_since(platform.epoch);
        let functions = specs
            .iter()
            .map(|f| {
                let s = platform
                    .snapshot(&f.name)
                    .expect("a function of the platform");
                fn_run(f, &s, offset, sc.scale)
            })
            .collect();
        Ok(Run {
            variant: variant.to_string(),
            limiter,
            scale: sc.scale,
            functions,
        })
    }

    /// Publishes every job: `publishers` tasks take the next one in turn, each waiting for
    /// JetStream to store its job before the next (as `hey -c N` waits for each 202).
    async fn publish(&self, jobs: Vec<(String, String)>, publishers: usize) -> anyhow::Result<()> {
        let jobs = Arc::new(jobs);
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..publishers.max(1) {
            let (jobs, next, js) = (jobs.clone(), next.clone(), self.js.clone());
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((function, subject)) = jobs.get(i) else {
                        return anyhow::Ok(());
                    };
                    let (subject, headers, payload) = job(function, subject)?;
                    js.publish_with_headers(subject, headers, payload)
                        .await?
                        .await
                        .context("JetStream did not store a job")?;
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(())
    }

    /// Until every function has as many successes as jobs.
    async fn wait_done(
        &self,
        platform: &Platform,
        specs: &[FunctionSpec],
        started: Instant,
    ) -> anyhow::Result<()> {
        loop {
            let snaps: Vec<FunctionSnapshot> = specs
                .iter()
                .filter_map(|f| platform.snapshot(&f.name))
                .collect();
            if specs.iter().zip(&snaps).all(|(f, s)| s.successes >= f.jobs) {
                return Ok(());
            }
            if started.elapsed() > RUN_LIMIT {
                let left: Vec<String> = specs
                    .iter()
                    .zip(&snaps)
                    .map(|(f, s)| format!("{}: {} of {}", f.name, s.successes, f.jobs))
                    .collect();
                anyhow::bail!(
                    "not every job succeeded within {RUN_LIMIT:?}: {}",
                    left.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every job completed exactly once: the stream is empty (every job acked), and after a
    /// moment for stragglers no function has more successes than jobs or a call id twice.
    async fn check(
        &self,
        platform: &Platform,
        specs: &[FunctionSpec],
        layout: &Layout,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut stream = self.js.get_stream(&layout.stream).await?;
        loop {
            let messages = stream.info().await?.state.messages;
            if messages == 0 {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "jobs lost or left behind: {messages} still in the stream 30 s after the last success"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for f in specs {
            let s = platform.snapshot(&f.name).context("no such function")?;
            anyhow::ensure!(
                s.successes == f.jobs && s.duplicates == 0,
                "{}: {} successes for {} jobs ({} of them a call id seen before): not exactly once",
                f.name,
                s.successes,
                f.jobs,
                s.duplicates
            );
        }
        Ok(())
    }
}

/// The jobs' functions, round-robin while each has jobs left.
fn interleave(specs: &[FunctionSpec]) -> Vec<String> {
    let total: u64 = specs.iter().map(|f| f.jobs).sum();
    let mut left: Vec<u64> = specs.iter().map(|f| f.jobs).collect();
    let mut out = Vec::with_capacity(total as usize);
    while out.len() < total as usize {
        for (f, n) in specs.iter().zip(left.iter_mut()) {
            if *n > 0 {
                *n -= 1;
                out.push(f.name.clone());
            }
        }
    }
    out
}

fn fn_run(f: &FunctionSpec, s: &FunctionSnapshot, offset: Duration, scale: f64) -> FnRun {
    let since_publish = |t: Duration| t.saturating_sub(offset).as_secs_f64() / scale;
    FnRun {
        function: f.name.clone(),
        jobs: f.jobs,
        drain: s.last_success.unwrap_or_default().saturating_sub(offset),
        real_drain: since_publish(s.last_success.unwrap_or_default()),
        rejected: s.rejected,
        unavailable: s.unavailable,
        calls: s.calls,
        utilisation: s.utilisation.mean(),
        timeline: s
            .timeline
            .iter()
            .map(|&(t, n)| (since_publish(t), n))
            .collect(),
    }
}

/// Returns (with an error) only when the worker has exited.
async fn watch(worker: &mut WorkerProc) -> anyhow::Error {
    loop {
        if let Err(e) = worker.check_alive() {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn on_off(limiter: bool) -> &'static str {
    if limiter {
        "on"
    } else {
        "off"
    }
}

/// `1@0s 2@3s 4@6s …`, real-world seconds; long ones cut after 16 changes.
fn timeline(t: &[(f64, u32)]) -> String {
    const SHOWN: usize = 16;
    let mut parts: Vec<String> = t
        .iter()
        .take(SHOWN)
        .map(|(s, n)| format!("{n}@{s:.0}s"))
        .collect();
    if t.len() > SHOWN {
        parts.push(format!("… ({} changes)", t.len() - 1));
    }
    parts.join(" ")
}

/// The progress line of one run.
fn line(run: &Run) -> String {
    let fns: Vec<String> = run
        .functions
        .iter()
        .map(|f| {
            format!(
                "{} drain {:.2} s ({:.0} s real), {} 429s, {:.2} calls/job, utilisation {}, replicas {}",
                f.function,
                f.drain.as_secs_f64(),
                f.drain.as_secs_f64() / run.scale,
                f.rejected,
                f.calls as f64 / f.jobs as f64,
                pct(f.utilisation),
                timeline(&f.timeline)
            )
        })
        .collect();
    format!(
        "{}, limiter {}: {}",
        run.variant,
        on_off(run.limiter),
        fns.join("; ")
    )
}

fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.0}%", v * 100.0)
    } else {
        "–".into()
    }
}

/// Medians over runs of one figure of one function of one variant, limiter off and on.
fn medians(r: &Results, variant: &str, function: &str, f: impl Fn(&FnRun) -> f64) -> [f64; 2] {
    [false, true].map(|limiter| {
        Samples(
            r.runs
                .iter()
                .filter(|run| run.variant == variant && run.limiter == limiter)
                .flat_map(|run| run.functions.iter().filter(|x| x.function == function))
                .map(&f)
                .collect(),
        )
        .median()
    })
}

/// The sum over a variant's functions of one figure, median over runs, limiter off and on.
fn summed(r: &Results, variant: &str, f: impl Fn(&FnRun) -> f64) -> [f64; 2] {
    [false, true].map(|limiter| {
        Samples(
            r.runs
                .iter()
                .filter(|run| run.variant == variant && run.limiter == limiter)
                .map(|run| run.functions.iter().map(&f).sum())
                .collect(),
        )
        .median()
    })
}

/// The Markdown section: notes, one row per run and function, then the targets.
pub fn render(r: &Results) -> String {
    let mut out = String::from(
        "### Adaptive concurrency (issue 16): a simulated OpenFaaS platform\n\n\
         The worker in function mode against `queue_worker::dev::platform` on 127.0.0.1: each \
         replica runs at most `max_inflight` calls and answers 429 (`X-OpenFaaS-Internal: \
         true`) above it; calls go to a uniformly random ready replica with no second \
         choice (kube-proxy); an autoscaler adds replicas, ready after a delay. Each run \
         has its own queue, platform and worker process: `limiter_enabled=false` (greedy) \
         then `true`. The worker's `max_inflight` is twice what every function's replicas \
         can run at their maximum, so the worker is never the bottleneck; retries are the \
         product's defaults (`initial_retry_wait` 10s, `max_retry_wait` 120s, \
         `max_retry_attempts` 100, exponential backoff) scaled by the scenario's time \
         scale, at least 100 ms. Drain runs from the first publish to the function's last \
         success. Utilisation is the mean of in-flight ÷ available slots (ready replicas × \
         5), sampled every 1/20 of the mean run time while the jobs not yet done could fill \
         every available slot. Replicas: ready count at each change, in real-world seconds \
         from the first publish. Every run checked that each job succeeded exactly once \
         and the stream was left empty.\n\n",
    );
    out.push_str(&format!(
        "The time scales below are greedy's; the limiter's runs use {LIMITER_STRETCH}× \
         longer times (scale × {LIMITER_STRETCH}, retry waits with them): at greedy's scale \
         the worker's own fixed times (discovery's 50 ms tick, a pull's round trip, 200 ms \
         backoffs) weigh as if they were seconds, and at the limiter's scale a greedy run, \
         set by its retry waits, would take hours. Drains are compared in real-world \
         seconds.\n\n"
    ));
    for n in &r.notes {
        out.push_str(&format!("- {n}\n"));
    }
    out.push_str(&format!(
        "- Worker settings ({}).\n\n",
        r.worker_notes.join("; ")
    ));
    let mut t = Table::new(&[
        "scenario",
        "function",
        "limiter",
        "drain (s, simulated)",
        "drain (s, real-world)",
        "429s",
        "503s",
        "calls per job",
        "in-flight ÷ slots while jobs remain",
        "replicas (ready @ real-world s)",
    ]);
    for run in &r.runs {
        for f in &run.functions {
            t.row(vec![
                run.variant.clone(),
                format!("`{}`", f.function),
                on_off(run.limiter).into(),
                format!("{:.2}", f.drain.as_secs_f64()),
                format!("{:.0}", f.real_drain),
                count(f.rejected as f64),
                count(f.unavailable as f64),
                format!("{:.2}", f.calls as f64 / f.jobs as f64),
                pct(f.utilisation),
                timeline(&f.timeline),
            ]);
        }
    }
    out.push_str(&t.render());
    out.push('\n');

    out.push_str("#### Adaptive concurrency: targets (issue 16)\n\n");
    let mut t = Table::new(&["scenario", "target", "off", "on", "measured", "met"]);
    let mut check = |sc: &str, name: &str, off: String, on: String, v: f64, ok: bool| {
        t.row(vec![
            sc.into(),
            name.into(),
            off,
            on,
            ratio(v),
            if !v.is_finite() {
                "–"
            } else if ok {
                "yes"
            } else {
                "**no**"
            }
            .into(),
        ]);
    };
    let secs = |v: f64| format!("{v:.2} s");
    for sc in ["docs", "blog", "two"] {
        if !r.runs.iter().any(|run| run.variant == sc) {
            continue;
        }
        let [off, on] = summed(r, sc, |f| f.rejected as f64);
        let v = on / off;
        check(
            sc,
            "429s on ÷ off ≤ 0.25",
            count(off),
            count(on),
            v,
            v <= 0.25,
        );
        if sc != "two" {
            let [off, on] = medians(r, sc, "sleep", |f| f.real_drain);
            let v = on / off;
            check(
                sc,
                "drain (real-world) on ÷ off ≤ 0.6",
                secs(off),
                secs(on),
                v,
                v <= 0.6,
            );
        }
        let functions: &[&str] = if sc == "two" {
            &["slow", "fast"]
        } else {
            &["sleep"]
        };
        for f in functions {
            let [off, on] = medians(r, sc, f, |x| x.utilisation);
            check(
                sc,
                &format!("`{f}` in-flight ÷ slots while jobs remain ≥ 0.85 (limiter on)"),
                pct(off),
                pct(on),
                on,
                on >= 0.85,
            );
        }
        if sc == "blog" {
            if let Some(ideal) = r.blog_ideal {
                let [off, on] = medians(r, sc, "sleep", |f| f.real_drain);
                let v = on / ideal;
                check(
                    sc,
                    &format!("drain ÷ ideal ({ideal:.0} s real-world) ≤ 1.5 (limiter on)"),
                    ratio(off / ideal),
                    ratio(v),
                    v,
                    v <= 1.5,
                );
            }
        }
        if sc == "two" {
            for limiter in [false, true] {
                let i = limiter as usize;
                let next_to = medians(r, "two", "fast", |f| f.real_drain)[i];
                let alone = medians(r, "two, fast alone", "fast", |f| f.real_drain)[i];
                let v = next_to / alone;
                check(
                    sc,
                    &format!(
                        "`fast` drain next to `slow` ÷ alone ≤ 1.1, limiter {} (\"not slowed\"; 1.1 is ours)",
                        on_off(limiter)
                    ),
                    secs(next_to),
                    secs(alone),
                    v,
                    v <= 1.1,
                );
            }
        }
    }
    out.push_str(&t.render());
    out.push_str(
        "\nFor the last rows, \"off\" and \"on\" read \"next to `slow`\" and \"alone\".\n\n",
    );
    out
}
