//! The pipeline benchmark: what the worker adds between the queue and the function, against
//! two baselines measured in the same run. Run it with `scripts/bench` (or
//! `cargo bench --bench pipeline -- [options]`); it prints a Markdown report and writes it
//! into `BENCHMARKS.md` between the generated-section markers.
//!
//! Each run (repeated `--runs` times; the report gives the median and min–max) measures, per
//! `max_inflight` level: (a) raw JetStream pull + ack with async-nats, (b) raw HTTP to the
//! fake function with the worker's client settings at that concurrency, and the worker end
//! to end on `--n` pre-queued jobs; then the same end to end over 1,000 function names, the
//! enqueue → invoke-start latency at a steady rate, and the worker's memory idle and with
//! 1,000 calls in flight. The worker is the release binary in its own process, so its CPU
//! time and RSS are its own.
//!
//! Function mode (`scaling_mode=function`, issue 15) gets the same end-to-end runs, one
//! function at each level and 1,000 functions at the top level, each next to static mode's
//! figure of the same run; then a new function's first job behind another function's
//! backlog (stored → invoke start, static mode for contrast), and one worker with 5,000
//! function consumers, first busy, then idle.
//!
//! Call status (issue 18, `call_status`): static mode's end-to-end run at each level with
//! the setting off and on, alternating in the same run, so the cost of recording each
//! call's state (two small KV writes per call) is read against its own baseline.
//!
//! Adaptive concurrency (issue 16, `benches/pipeline/adaptive.rs`) runs OpenFaaS's own load
//! tests against a simulated platform (`queue_worker::dev::platform`: replicas that answer
//! 429 above their `max_inflight`, an autoscaler), each with the limiter off and on.
//!
//! Options: `--n N` (jobs per throughput run, default 100000), `--runs R` (default 3),
//! `--levels 1,16,256`, `--functions 1000`, `--rate 1000` and `--latency-secs 10`,
//! `--in-flight 1000`, `--mode static|function|both` (which modes the throughput and
//! many-function runs measure, default both), `--backlog 10000` and `--new-functions 60`
//! (the backlog ahead of the new functions, and new functions per run), `--consumers 5000`
//! and `--consumer-secs 10` (function consumers, and each phase's window), `--scenarios
//! LIST` (any of throughput,status,many,latency,memory,new-function,consumers,adaptive;
//! default all),
//! `--adaptive-scenarios docs,blog,two` (default all), `--adaptive-runs R` (default 1) and
//! `--adaptive-scale F` (multiplies the scenarios' time scales; default 1),
//! `--adaptive-limiter-only` (skip the greedy baselines, for tuning; no targets then),
//! `--keep-logs`, `--worker PATH` (measure another build), `--worker-env key=value` (a
//! setting for every worker), `--quick` (N = 10000, one run, 20 new functions, 1,000
//! consumers for 3 s, a fifth of the adaptive scenarios' jobs at half their time scale, no
//! file written), `--no-write`, `--output PATH`.

mod adaptive;
mod function;
mod proc;
mod report;
mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use report::{count, mib, micros, millis, quantile, ratio, Samples, Table};
use scenarios::{Bench, ManyConsumers, Mode, DEFAULT_MAX_INFLIGHT};

/// The scenarios `--scenarios` can pick.
const SCENARIOS: [&str; 8] = [
    "throughput",
    "status",
    "many",
    "latency",
    "memory",
    "new-function",
    "consumers",
    "adaptive",
];
/// A new function's job is published this often behind the backlog.
const NEW_FUNCTION_SPACING: Duration = Duration::from_millis(100);

struct Options {
    n: usize,
    runs: usize,
    levels: Vec<usize>,
    functions: usize,
    rate: u32,
    latency_secs: u32,
    in_flight: usize,
    /// Modes of the throughput and many-function runs.
    modes: Vec<Mode>,
    scenarios: Vec<String>,
    backlog: usize,
    new_functions: usize,
    /// Longest a new function's job is waited for.
    new_function_cap: Duration,
    consumers: usize,
    consumer_secs: u64,
    output: Option<PathBuf>,
    keep_logs: bool,
    /// Another worker binary to measure (an older build, for before/after).
    worker: Option<PathBuf>,
    worker_env: Vec<(String, String)>,
    /// The adaptive-concurrency scenarios (`--adaptive-scenarios`), their repetitions
    /// (`--adaptive-runs`), and whether they run with fewer jobs (`--quick`).
    adaptive_scenarios: Vec<String>,
    adaptive_runs: usize,
    adaptive_scale: f64,
    /// Only the limiter's runs (`--adaptive-limiter-only`), for tuning: no greedy baseline.
    adaptive_limiter_only: bool,
    quick: bool,
}

impl Options {
    /// `None` when not started by `cargo bench`.
    fn parse() -> anyhow::Result<Option<Options>> {
        let mut o = Options {
            n: 100_000,
            runs: 3,
            levels: vec![1, 16, 256],
            functions: 1000,
            rate: 1000,
            latency_secs: 10,
            in_flight: 1000,
            modes: vec![Mode::Static, Mode::Function],
            scenarios: SCENARIOS.iter().map(|s| s.to_string()).collect(),
            backlog: 10_000,
            new_functions: 60,
            new_function_cap: Duration::from_secs(20),
            consumers: 5000,
            consumer_secs: 10,
            output: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md")),
            keep_logs: false,
            worker: None,
            worker_env: Vec::new(),
            adaptive_scenarios: adaptive::SCENARIOS.iter().map(|s| s.to_string()).collect(),
            adaptive_runs: 1,
            adaptive_scale: 1.0,
            adaptive_limiter_only: false,
            quick: false,
        };
        let mut write = None;
        // `cargo test --benches` (or `--all-targets`) runs this target without `--bench`:
        // a benchmark that rewrites BENCHMARKS.md must not start from a test run.
        if !std::env::args().any(|a| a == "--bench") {
            return Ok(None);
        }
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value =
                |name: &str| args.next().with_context(|| format!("{name} needs a value"));
            match arg.as_str() {
                // cargo bench passes this to every bench target.
                "--bench" => {}
                "--n" => o.n = value("--n")?.parse().context("--n")?,
                "--runs" => o.runs = value("--runs")?.parse().context("--runs")?,
                "--levels" => {
                    o.levels = value("--levels")?
                        .split(',')
                        .map(|s| s.trim().parse::<usize>())
                        .collect::<Result<_, _>>()
                        .context("--levels: comma-separated numbers")?
                }
                "--functions" => {
                    o.functions = value("--functions")?.parse().context("--functions")?
                }
                "--rate" => o.rate = value("--rate")?.parse().context("--rate")?,
                "--latency-secs" => {
                    o.latency_secs = value("--latency-secs")?.parse().context("--latency-secs")?
                }
                "--in-flight" => {
                    o.in_flight = value("--in-flight")?.parse().context("--in-flight")?
                }
                "--mode" => {
                    o.modes = match value("--mode")?.as_str() {
                        "static" => vec![Mode::Static],
                        "function" => vec![Mode::Function],
                        "both" => vec![Mode::Static, Mode::Function],
                        other => anyhow::bail!("--mode static|function|both, not {other:?}"),
                    }
                }
                "--scenarios" => {
                    o.scenarios = value("--scenarios")?
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .collect();
                    if let Some(bad) = o
                        .scenarios
                        .iter()
                        .find(|s| !SCENARIOS.contains(&s.as_str()))
                    {
                        anyhow::bail!(
                            "--scenarios: unknown {bad:?}; any of {}",
                            SCENARIOS.join(",")
                        );
                    }
                }
                "--backlog" => o.backlog = value("--backlog")?.parse().context("--backlog")?,
                "--new-functions" => {
                    o.new_functions = value("--new-functions")?
                        .parse()
                        .context("--new-functions")?
                }
                "--consumers" => {
                    o.consumers = value("--consumers")?.parse().context("--consumers")?
                }
                "--consumer-secs" => {
                    o.consumer_secs = value("--consumer-secs")?
                        .parse()
                        .context("--consumer-secs")?
                }
                "--quick" => {
                    o.n = 10_000;
                    o.runs = 1;
                    o.latency_secs = 3;
                    o.new_functions = 20;
                    o.new_function_cap = Duration::from_secs(10);
                    o.consumers = 1000;
                    o.consumer_secs = 3;
                    o.quick = true;
                    write.get_or_insert(false);
                }
                "--adaptive-runs" => {
                    o.adaptive_runs = value("--adaptive-runs")?
                        .parse()
                        .context("--adaptive-runs")?
                }
                "--adaptive-limiter-only" => o.adaptive_limiter_only = true,
                "--adaptive-scale" => {
                    o.adaptive_scale = value("--adaptive-scale")?
                        .parse()
                        .context("--adaptive-scale")?
                }
                "--adaptive-scenarios" => {
                    o.adaptive_scenarios = value("--adaptive-scenarios")?
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .collect();
                    if let Some(bad) = o
                        .adaptive_scenarios
                        .iter()
                        .find(|s| !adaptive::SCENARIOS.contains(&s.as_str()))
                    {
                        anyhow::bail!(
                            "--adaptive-scenarios: unknown {bad:?}; any of {}",
                            adaptive::SCENARIOS.join(",")
                        );
                    }
                }
                "--no-write" => write = Some(false),
                "--keep-logs" => o.keep_logs = true,
                "--worker" => o.worker = Some(value("--worker")?.into()),
                "--worker-env" => {
                    let pair = value("--worker-env")?;
                    let (k, v) = pair
                        .split_once('=')
                        .context("--worker-env takes key=value")?;
                    o.worker_env.push((k.to_string(), v.to_string()));
                }
                "--output" => {
                    o.output = Some(value("--output")?.into());
                    write = Some(true);
                }
                other => anyhow::bail!("unknown option {other:?} (see benches/pipeline/main.rs)"),
            }
        }
        if write == Some(false) {
            o.output = None;
        }
        anyhow::ensure!(
            o.n > 0 && o.runs > 0 && o.rate > 0,
            "--n, --runs and --rate must be positive"
        );
        anyhow::ensure!(o.levels.iter().all(|&l| l > 0), "--levels must be positive");
        anyhow::ensure!(
            o.adaptive_runs > 0 && o.adaptive_scale > 0.0,
            "--adaptive-runs and --adaptive-scale must be positive"
        );
        anyhow::ensure!(
            o.backlog > 0 && o.new_functions > 0 && o.consumers > 1 && o.consumer_secs > 0,
            "--backlog, --new-functions and --consumer-secs must be positive, --consumers above 1"
        );
        Ok(Some(o))
    }

    fn runs(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }

    fn measures(&self, mode: Mode) -> bool {
        self.modes.contains(&mode)
    }
}

/// One `max_inflight` level, over all runs.
#[derive(Default)]
struct Level {
    jetstream: Samples,
    http: Samples,
    e2e: Samples,
    ratio: Samples,
    cpu_us: Samples,
    server_raw_us: Samples,
    server_e2e_us: Samples,
    /// Whole-machine CPU per message (all processes) and the share of both cores in use.
    machine_js_us: Samples,
    machine_http_us: Samples,
    machine_e2e_us: Samples,
    busy_js: Samples,
    busy_http: Samples,
    busy_e2e: Samples,
    /// The most end to end could do ÷ the lower baseline: every core busy with the two
    /// baselines' work per message and nothing added by the worker.
    ceiling: Samples,
    extra_calls: u64,
    /// Function mode, one function.
    fn_e2e: Samples,
    /// Function mode ÷ static mode, per run.
    fn_vs_static: Samples,
    fn_cpu_us: Samples,
    fn_server_us: Samples,
}

#[derive(Default)]
struct Results {
    levels: Vec<(usize, Level)>,
    many_jetstream: Samples,
    many_e2e: Samples,
    many_vs_one: Samples,
    many_cpu_us: Samples,
    many_server_raw_us: Samples,
    many_server_e2e_us: Samples,
    many_extra: u64,
    /// Function mode over the same names.
    many_fn_e2e: Samples,
    many_fn_vs_one: Samples,
    many_fn_cpu_us: Samples,
    many_fn_server_us: Samples,
    p50_ms: Samples,
    p99_ms: Samples,
    max_ms: Samples,
    idle_rss: Samples,
    busy_rss: Samples,
    busy_hwm: Samples,
    /// A new function behind a backlog, per mode: every run's samples pooled (`None`: not
    /// called within the cap), the backlog left at the last sample, the backlog's call time.
    new_fn: Vec<(Mode, NewFunctionRuns)>,
    consumers: Vec<ManyConsumers>,
    adaptive: Option<adaptive::Results>,
    /// Per level: static mode end to end with `call_status` off and on, same run.
    status: Vec<(usize, StatusRuns)>,
}

#[derive(Default)]
struct StatusRuns {
    off: Samples,
    on: Samples,
    on_vs_off: Samples,
    cpu_off: Samples,
    cpu_on: Samples,
    server_off: Samples,
    server_on: Samples,
}

#[derive(Default)]
struct NewFunctionRuns {
    samples: Vec<Option<Duration>>,
    backlog_left: Samples,
    delay: Option<Duration>,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("bench failed: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let Some(o) = Options::parse()? else {
        eprintln!("the pipeline benchmark runs under `cargo bench` or scripts/bench; skipped");
        return Ok(());
    };
    let mut bench = Bench::start(worker_binary(&o), o.keep_logs).await?;
    bench.worker_env = o.worker_env.clone();
    let top = *o.levels.iter().max().unwrap_or(&256);
    let mut r = Results {
        levels: o.levels.iter().map(|&l| (l, Level::default())).collect(),
        ..Results::default()
    };
    let (stat, func) = (o.measures(Mode::Static), o.measures(Mode::Function));

    for run in 1..=o.runs {
        eprintln!("run {run}/{}", o.runs);
        let started = std::time::Instant::now();
        let (mut top_e2e, mut top_fn) = (f64::NAN, f64::NAN);
        for (level, res) in r.levels.iter_mut().filter(|_| o.runs("throughput")) {
            let mut static_rate = f64::NAN;
            if stat {
                let raw = bench.raw_jetstream(o.n, *level, 1).await?;
                let js = raw.rate;
                let raw_http = bench.raw_http(o.n, *level).await?;
                let http = raw_http.rate;
                let e2e = bench.end_to_end(Mode::Static, o.n, *level, 1).await?;
                eprintln!(
                    "  max_inflight {level:>4}: raw JetStream {:>8}/s  raw HTTP {:>8}/s  end to end {:>8}/s  {:.1} µs CPU/call (nats-server {:.1} raw, {:.1} end to end)",
                    count(js),
                    count(http),
                    count(e2e.rate),
                    micros_of(e2e.cpu_per_call),
                    micros_of(raw.server_per_msg),
                    micros_of(e2e.server_per_call),
                );
                res.server_raw_us.push(micros_of(raw.server_per_msg));
                res.server_e2e_us.push(micros_of(e2e.server_per_call));
                res.jetstream.push(js);
                res.http.push(http);
                res.e2e.push(e2e.rate);
                res.ratio.push(e2e.rate / js.min(http));
                let per_msg = |busy: Duration| micros_of(busy / o.n as u32);
                res.machine_js_us.push(per_msg(raw.machine.busy));
                res.machine_http_us.push(per_msg(raw_http.machine.busy));
                res.machine_e2e_us.push(per_msg(e2e.machine.busy));
                res.busy_js.push(raw.machine.utilization);
                res.busy_http.push(raw_http.machine.utilization);
                res.busy_e2e.push(e2e.machine.utilization);
                let both = (raw.machine.busy + raw_http.machine.busy).as_secs_f64() / o.n as f64;
                res.ceiling.push(proc::cores()? / both / js.min(http));
                res.cpu_us.push(micros_of(e2e.cpu_per_call));
                res.extra_calls += e2e.extra_calls;
                static_rate = e2e.rate;
            }
            if func {
                let e2e = bench.end_to_end(Mode::Function, o.n, *level, 1).await?;
                eprintln!(
                    "  max_inflight {level:>4}, function mode: end to end {:>8}/s ({:.2} × static)  {:.1} µs CPU/call (nats-server {:.1})",
                    count(e2e.rate),
                    e2e.rate / static_rate,
                    micros_of(e2e.cpu_per_call),
                    micros_of(e2e.server_per_call),
                );
                res.fn_e2e.push(e2e.rate);
                if stat {
                    res.fn_vs_static.push(e2e.rate / static_rate);
                }
                res.fn_cpu_us.push(micros_of(e2e.cpu_per_call));
                res.fn_server_us.push(micros_of(e2e.server_per_call));
                res.extra_calls += e2e.extra_calls;
                if *level == top {
                    top_fn = e2e.rate;
                }
            }
            if *level == top {
                top_e2e = static_rate;
            }
        }
        if o.runs("status") {
            for &level in &o.levels {
                let off = bench.end_to_end(Mode::Static, o.n, level, 1).await?;
                bench.worker_env.push(("call_status".into(), "true".into()));
                let on = bench.end_to_end(Mode::Static, o.n, level, 1).await;
                bench.worker_env.pop();
                let on = on?;
                eprintln!(
                    "  call_status at {level:>4}: off {:>8}/s  on {:>8}/s ({:.2} ×)  worker {:.1} / {:.1} µs CPU/call  nats-server {:.1} / {:.1}",
                    count(off.rate),
                    count(on.rate),
                    on.rate / off.rate,
                    micros_of(off.cpu_per_call),
                    micros_of(on.cpu_per_call),
                    micros_of(off.server_per_call),
                    micros_of(on.server_per_call),
                );
                let idx = match r.status.iter().position(|(l, _)| *l == level) {
                    Some(i) => i,
                    None => {
                        r.status.push((level, StatusRuns::default()));
                        r.status.len() - 1
                    }
                };
                let st = &mut r.status[idx].1;
                st.off.push(off.rate);
                st.on.push(on.rate);
                st.on_vs_off.push(on.rate / off.rate);
                st.cpu_off.push(micros_of(off.cpu_per_call));
                st.cpu_on.push(micros_of(on.cpu_per_call));
                st.server_off.push(micros_of(off.server_per_call));
                st.server_on.push(micros_of(on.server_per_call));
            }
        }
        if o.functions > 1 && o.runs("many") {
            if stat {
                let raw = bench.raw_jetstream(o.n, top, o.functions).await?;
                let many = bench
                    .end_to_end(Mode::Static, o.n, top, o.functions)
                    .await?;
                eprintln!(
                    "  {} functions at {top}: raw JetStream {:>8}/s  end to end {}/s  {:.1} µs CPU/call (nats-server {:.1} raw, {:.1} end to end)",
                    o.functions,
                    count(raw.rate),
                    count(many.rate),
                    micros_of(many.cpu_per_call),
                    micros_of(raw.server_per_msg),
                    micros_of(many.server_per_call),
                );
                r.many_server_raw_us.push(micros_of(raw.server_per_msg));
                r.many_server_e2e_us.push(micros_of(many.server_per_call));
                r.many_jetstream.push(raw.rate);
                r.many_e2e.push(many.rate);
                if o.runs("throughput") {
                    r.many_vs_one.push(many.rate / top_e2e);
                }
                r.many_cpu_us.push(micros_of(many.cpu_per_call));
                r.many_extra += many.extra_calls;
            }
            if func {
                let many = bench
                    .end_to_end(Mode::Function, o.n, top, o.functions)
                    .await?;
                eprintln!(
                    "  {} functions at {top}, function mode: end to end {}/s ({:.2} × one function)  {:.1} µs CPU/call (nats-server {:.1})",
                    o.functions,
                    count(many.rate),
                    many.rate / top_fn,
                    micros_of(many.cpu_per_call),
                    micros_of(many.server_per_call),
                );
                r.many_fn_e2e.push(many.rate);
                if o.runs("throughput") {
                    r.many_fn_vs_one.push(many.rate / top_fn);
                }
                r.many_fn_cpu_us.push(micros_of(many.cpu_per_call));
                r.many_fn_server_us.push(micros_of(many.server_per_call));
                r.many_extra += many.extra_calls;
            }
        }
        if o.runs("latency") {
            let mut lat = bench.latency(o.rate, o.latency_secs).await?;
            let (p50, p99, max) = (
                quantile(&mut lat.samples, 0.50) / 1e6,
                quantile(&mut lat.samples, 0.99) / 1e6,
                quantile(&mut lat.samples, 1.0) / 1e6,
            );
            eprintln!(
                "  latency at {}/s: p50 {p50:.2} ms  p99 {p99:.2} ms  max {max:.2} ms ({} samples)",
                o.rate,
                lat.samples.len()
            );
            r.p50_ms.push(p50);
            r.p99_ms.push(p99);
            r.max_ms.push(max);
        }
        if o.runs("memory") {
            let idle = bench.idle_memory(Duration::from_secs(2)).await?;
            let busy = bench.busy_memory(o.in_flight).await?;
            eprintln!(
                "  RSS idle {} MiB; with {} in flight {} MiB (peak {} MiB)",
                mib(idle.rss as f64),
                o.in_flight,
                mib(busy.rss as f64),
                mib(busy.hwm as f64)
            );
            r.idle_rss.push(idle.rss as f64);
            r.busy_rss.push(busy.rss as f64);
            r.busy_hwm.push(busy.hwm as f64);
        }
        if o.runs("new-function") {
            // Function mode is what is measured; static mode is the contrast.
            let modes = [Mode::Function, Mode::Static];
            for mode in modes.into_iter().filter(|&m| m == Mode::Function || stat) {
                let nf = bench
                    .new_function(
                        mode,
                        o.backlog,
                        o.new_functions,
                        NEW_FUNCTION_SPACING,
                        o.new_function_cap,
                    )
                    .await?;
                let mut ns = reached_nanos(&nf.samples);
                eprintln!(
                    "  new function behind {} jobs, {} mode: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms ({} of {} called within {:?}; calls of `a` {:?}, {} of its jobs left at the last sample)",
                    o.backlog,
                    mode.name(),
                    quantile(&mut ns, 0.50) / 1e6,
                    quantile(&mut ns, 0.99) / 1e6,
                    quantile(&mut ns, 1.0) / 1e6,
                    ns.len(),
                    nf.samples.len(),
                    o.new_function_cap,
                    nf.delay,
                    nf.backlog_left,
                );
                let i = match r.new_fn.iter().position(|(m, _)| *m == mode) {
                    Some(i) => i,
                    None => {
                        r.new_fn.push((mode, NewFunctionRuns::default()));
                        r.new_fn.len() - 1
                    }
                };
                let runs = &mut r.new_fn[i].1;
                runs.samples.extend(nf.samples);
                runs.backlog_left.push(nf.backlog_left as f64);
                runs.delay = Some(nf.delay);
            }
        }
        if o.runs("consumers") {
            // Calls slow enough that every function still has work through the busy window:
            // four jobs each, and fewer calls than functions in twice the window at the
            // default max_inflight (consumer creation comes before the window).
            let delay = Duration::from_secs(2 * o.consumer_secs) * DEFAULT_MAX_INFLIGHT as u32
                / o.consumers as u32;
            let c = bench
                .many_consumers(o.consumers, 4, delay, Duration::from_secs(o.consumer_secs))
                .await?;
            eprintln!(
                "  {} function consumers: created in {:.1} s (jobs published in {:.1} s); worker RSS / CPU, nats-server CPU: empty {} MiB / {} / {}, busy {} MiB / {} / {} ({:.0} calls/s, {} → {} functions with work), idle {} MiB / {} / {} ({} consumers)",
                c.functions,
                c.created_in.as_secs_f64(),
                c.published_in.as_secs_f64(),
                mib(c.empty.rss as f64),
                percent(c.empty.worker_cpu),
                percent(c.empty.server_cpu),
                mib(c.busy.rss as f64),
                percent(c.busy.worker_cpu),
                percent(c.busy.server_cpu),
                c.busy.calls_per_sec,
                c.busy.functions_with_work.0,
                c.busy.functions_with_work.1,
                mib(c.idle.rss as f64),
                percent(c.idle.worker_cpu),
                percent(c.idle.server_cpu),
                c.idle.consumers,
            );
            r.consumers.push(c);
        }
        eprintln!("  run took {:.0} s", started.elapsed().as_secs_f64());
    }
    if o.runs("adaptive") {
        eprintln!("adaptive concurrency ({} run(s))", o.adaptive_runs);
        let started = std::time::Instant::now();
        let opts = adaptive::Options {
            scenarios: o.adaptive_scenarios.clone(),
            runs: o.adaptive_runs,
            quick: o.quick,
            scale: o.adaptive_scale,
            limiter_only: o.adaptive_limiter_only,
            keep_logs: o.keep_logs,
            worker_env: o.worker_env.clone(),
        };
        r.adaptive = Some(adaptive::run(&bench.nats.url(), &worker_binary(&o), &opts).await?);
        eprintln!("  took {:.0} s", started.elapsed().as_secs_f64());
    }

    let text = render(&o, &r, &bench)?;
    println!("{text}");
    if let Some(path) = &o.output {
        let existing = std::fs::read_to_string(path).ok();
        std::fs::write(path, report::splice(existing.as_deref(), &text))
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("written to {}", path.display());
    }
    Ok(())
}

/// The samples that were reached, in nanoseconds.
fn reached_nanos(samples: &[Option<Duration>]) -> Vec<u64> {
    samples
        .iter()
        .flatten()
        .map(|d| d.as_nanos() as u64)
        .collect()
}

fn render(o: &Options, r: &Results, bench: &Bench) -> anyhow::Result<String> {
    let mut out = String::new();
    let nats = std::process::Command::new(
        queue_worker::dev::natsd::find_binary().context("nats-server not found")?,
    )
    .arg("--version")
    .output()
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    .unwrap_or_default();
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let cmd = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect::<Vec<_>>()
        .join(" ");
    out.push_str(&format!(
        "Generated {date} by `scripts/bench{}{cmd}` ({}).\n\n",
        if cmd.is_empty() { "" } else { " " },
        match &o.worker {
            Some(p) => format!("worker binary {}", p.display()),
            None => format!("queue-worker {}", env!("CARGO_PKG_VERSION")),
        }
    ));
    out.push_str(&format!(
        "- Machine: {}\n- {nats}, JetStream file store, on 127.0.0.1 (port {})\n- {} jobs per throughput run; each figure is the median of {} run(s), with min–max in brackets.\n\n",
        machine(),
        bench.nats.port,
        count(o.n as f64),
        o.runs
    ));

    let static_levels = r.levels.iter().any(|(_, l)| !l.e2e.0.is_empty());
    if static_levels {
        out.push_str("### Throughput, static mode (invocations/s)\n\n");
        let mut t = Table::new(&[
            "max_inflight",
            "(a) raw JetStream",
            "(b) raw HTTP",
            "end to end",
            "÷ lower baseline",
            "worker CPU µs/call",
            "nats-server CPU µs/msg: (a) / end to end",
        ]);
        for (level, l) in &r.levels {
            t.row(vec![
                level.to_string(),
                l.jetstream.show(count),
                l.http.show(count),
                l.e2e.show(count),
                l.ratio.show(ratio),
                l.cpu_us.show(micros),
                medians(&l.server_raw_us, &l.server_e2e_us),
            ]);
        }
        out.push_str(&t.render());
        let extra: u64 = r.levels.iter().map(|(_, l)| l.extra_calls).sum::<u64>() + r.many_extra;
        out.push_str(&format!(
        "\nEvery job was acknowledged and the stream left empty after each run; calls beyond one per job: {extra}.\n\n"
    ));

        out.push_str("### Whole-machine CPU per message (µs, all processes on both cores)\n\n");
        out.push_str(
        "End to end does the work of both baselines for every job (the JetStream client's, the \
         HTTP client's, the server's and the function's), on the same two cores. \"added\" is \
         what it spends beyond (a) + (b): the worker's own work. With every core busy and \
         nothing added, end to end could reach at most cores ÷ ((a) + (b)) jobs/s; the last \
         column is that ceiling ÷ the lower baseline, the most the throughput ratio above \
         could be on this machine. It binds only where the baselines keep the machine busy: \
         at max_inflight 1 everything waits on round trips.\n\n",
    );
        let mut t = Table::new(&[
            "max_inflight",
            "(a) raw JetStream",
            "(b) raw HTTP",
            "end to end",
            "added",
            "machine busy: (a) / (b) / end to end",
            "ceiling ÷ lower baseline",
        ]);
        for (level, l) in &r.levels {
            let added =
                l.machine_e2e_us.median() - (l.machine_js_us.median() + l.machine_http_us.median());
            t.row(vec![
                level.to_string(),
                l.machine_js_us.show(micros),
                l.machine_http_us.show(micros),
                l.machine_e2e_us.show(micros),
                micros(added),
                format!(
                    "{} / {} / {}",
                    percent(l.busy_js.median()),
                    percent(l.busy_http.median()),
                    percent(l.busy_e2e.median())
                ),
                l.ceiling.show(ratio),
            ]);
        }
        out.push_str(&t.render());
        out.push('\n');
    }

    if r.levels.iter().any(|(_, l)| !l.fn_e2e.0.is_empty()) {
        render_function_throughput(&mut out, r);
    }

    if !r.many_e2e.0.is_empty() {
        let top = r.levels.iter().map(|(l, _)| *l).max().unwrap_or(0);
        out.push_str(&format!(
            "### Many functions, static mode ({} names, max_inflight {top})\n\n",
            count(o.functions as f64)
        ));
        let mut t = Table::new(&[
            "(a) raw JetStream, same subjects (/s)",
            "end to end (/s)",
            "÷ one function, same run",
            "worker CPU µs/call",
            "nats-server CPU µs/msg: (a) / end to end",
        ]);
        t.row(vec![
            r.many_jetstream.show(count),
            r.many_e2e.show(count),
            r.many_vs_one.show(ratio),
            r.many_cpu_us.show(micros),
            medians(&r.many_server_raw_us, &r.many_server_e2e_us),
        ]);
        out.push_str(&t.render());
        out.push('\n');
    }

    if !r.many_fn_e2e.0.is_empty() {
        render_many_functions(&mut out, o, r);
    }
    if !r.new_fn.is_empty() {
        render_new_function(&mut out, o, r);
    }
    if !r.consumers.is_empty() {
        render_consumers(&mut out, r);
    }

    if !r.p50_ms.0.is_empty() {
        out.push_str(&format!(
        "### Latency, enqueue → invoke start, at a steady {} jobs/s (ms, {} s per run, default settings)\n\n",
        count(o.rate as f64),
        o.latency_secs
    ));
        let mut t = Table::new(&["p50", "p99", "max"]);
        t.row(vec![
            r.p50_ms.show(millis),
            r.p99_ms.show(millis),
            r.max_ms.show(millis),
        ]);
        out.push_str(&t.render());
        out.push('\n');
    }

    if !r.idle_rss.0.is_empty() {
        out.push_str("### Worker memory (RSS, MiB)\n\n");
        let mut t = Table::new(&[
            "idle (default settings)",
            &format!("{} calls in flight", count(o.in_flight as f64)),
            "peak (VmHWM) of that run",
        ]);
        t.row(vec![
            r.idle_rss.show(mib),
            r.busy_rss.show(mib),
            r.busy_hwm.show(mib),
        ]);
        out.push_str(&t.render());
        out.push('\n');
    }

    if !r.status.is_empty() {
        render_status(&mut out, r);
    }
    if let Some(a) = &r.adaptive {
        out.push_str(&adaptive::render(a));
    }

    let mut t = Table::new(&["target", "measured (median)", "met"]);
    let mut check = |name: &str, shown: String, ok: bool| {
        t.row(vec![
            name.into(),
            shown,
            if ok { "yes" } else { "**no**" }.into(),
        ]);
    };
    if let Some((level, l)) = r
        .levels
        .iter()
        .filter(|(_, l)| !l.ratio.0.is_empty())
        .max_by_key(|(l, _)| *l)
    {
        let v = l.ratio.median();
        check(
            &format!("end to end at max_inflight {level} ≥ 0.6 × lower baseline"),
            format!(
                "{} (ceiling on this machine: {})",
                ratio(v),
                ratio(l.ceiling.median())
            ),
            v >= 0.6,
        );
    }
    for (level, l) in r.levels.iter().filter(|(_, l)| !l.cpu_us.0.is_empty()) {
        let v = l.cpu_us.median();
        check(
            &format!("≤ 30 µs worker CPU per call (max_inflight {level})"),
            micros(v),
            v <= 30.0,
        );
    }
    if !r.many_cpu_us.0.is_empty() {
        let v = r.many_cpu_us.median();
        check(
            &format!("≤ 30 µs worker CPU per call ({} functions)", o.functions),
            micros(v),
            v <= 30.0,
        );
    }
    if !r.p50_ms.0.is_empty() {
        let (p50, p99) = (r.p50_ms.median(), r.p99_ms.median());
        check("p50 enqueue → start ≤ 1 ms", millis(p50), p50 <= 1.0);
        check("p99 enqueue → start ≤ 5 ms", millis(p99), p99 <= 5.0);
    }
    if !r.idle_rss.0.is_empty() {
        let (idle, busy) = (r.idle_rss.median(), r.busy_rss.median());
        check("RSS idle ≤ 20 MiB", mib(idle), idle <= 20.0 * 1048576.0);
        check(
            &format!("RSS with {} in flight ≤ 64 MiB", count(o.in_flight as f64)),
            mib(busy),
            busy <= 64.0 * 1048576.0,
        );
    }
    // Function mode (issue 15).
    for (level, l) in r
        .levels
        .iter()
        .filter(|(_, l)| !l.fn_vs_static.0.is_empty())
    {
        let v = l.fn_vs_static.median();
        check(
            &format!("function mode ≥ 0.9 × static mode, one function, max_inflight {level}"),
            ratio(v),
            v >= 0.9,
        );
    }
    if !r.many_fn_vs_one.0.is_empty() {
        let v = r.many_fn_vs_one.median();
        check(
            &format!(
                "function mode: {} functions ≥ 0.5 × one function (max_inflight {})",
                count(o.functions as f64),
                r.levels.iter().map(|(l, _)| *l).max().unwrap_or(0)
            ),
            ratio(v),
            v >= 0.5,
        );
    }
    if let Some((_, runs)) = r.new_fn.iter().find(|(m, _)| *m == Mode::Function) {
        let (p99, missed) = pooled_quantile(&runs.samples, 0.99);
        check(
            &format!(
                "function mode: a new function's first job, stored → invoke start, behind {} queued jobs of another, p99 ≤ 100 ms",
                count(o.backlog as f64)
            ),
            if missed > 0 {
                format!("{} ({missed} not called within {} s)", millis(p99), o.new_function_cap.as_secs())
            } else {
                millis(p99)
            },
            p99 <= 100.0 && missed == 0,
        );
    }
    if !t.is_empty() {
        out.push_str("### Targets\n\n");
        out.push_str(&t.render());
    }
    Ok(out)
}

/// Function mode ÷ static mode, one function, per level.
fn render_function_throughput(out: &mut String, r: &Results) {
    out.push_str("### Throughput, function mode ÷ static mode, one function (invocations/s)\n\n");
    out.push_str(
        "The same end-to-end run as above (same jobs, same fake function) with \
         `scaling_mode=function`: the worker creates the function's consumer when discovery \
         sees its jobs and hands out slots by `no_wait` pulls. \"÷ static\" is computed per \
         run against that run's static figure, then the median taken.\n\n",
    );
    let mut t = Table::new(&[
        "max_inflight",
        "static mode",
        "function mode",
        "function ÷ static",
        "worker CPU µs/call: static / function",
        "nats-server CPU µs/msg: static / function",
    ]);
    for (level, l) in &r.levels {
        t.row(vec![
            level.to_string(),
            l.e2e.show(count),
            l.fn_e2e.show(count),
            l.fn_vs_static.show(ratio),
            medians(&l.cpu_us, &l.fn_cpu_us),
            medians(&l.server_e2e_us, &l.fn_server_us),
        ]);
    }
    out.push_str(&t.render());
    out.push('\n');
}

/// Static mode with `call_status` off and on, per level.
fn render_status(out: &mut String, r: &Results) {
    out.push_str("### Call status: throughput with `call_status` off and on (invocations/s)\n\n");
    out.push_str(
        "Static mode end to end, one function, the same jobs; the worker runs once with \
         `call_status=false` and once with `call_status=true` at each level, in the same run. \
         With it on, each of these no-op calls writes one record, its outcome, to the KV \
         bucket `OF_<queue>-calls` (a call running over 100 ms also writes `running`): a \
         JetStream publish from one writer task, its acknowledgement awaited off the job's \
         path. \"on ÷ off\" is per run, then the median taken.\n\n",
    );
    let mut t = Table::new(&[
        "max_inflight",
        "off",
        "on",
        "on ÷ off",
        "worker CPU µs/call: off / on",
        "nats-server CPU µs/call: off / on",
    ]);
    for (level, st) in &r.status {
        t.row(vec![
            level.to_string(),
            st.off.show(count),
            st.on.show(count),
            st.on_vs_off.show(ratio),
            medians(&st.cpu_off, &st.cpu_on),
            medians(&st.server_off, &st.server_on),
        ]);
    }
    out.push_str(&t.render());
    out.push('\n');
}

/// Function mode over many function names, against one function in function mode.
fn render_many_functions(out: &mut String, o: &Options, r: &Results) {
    let top = r.levels.iter().map(|(l, _)| *l).max().unwrap_or(0);
    out.push_str(&format!(
        "### Many functions, function mode ({} names, max_inflight {top})\n\n",
        count(o.functions as f64)
    ));
    out.push_str(&format!(
        "The same {} jobs round-robin over {} names: one consumer per function, created as \
         discovery sees them. \"÷ one function\" divides by the one-function function-mode \
         figure of the same run (above).\n\n",
        count(o.n as f64),
        count(o.functions as f64),
    ));
    let mut t = Table::new(&[
        "end to end (/s)",
        "÷ one function (function mode), same run",
        "static mode, same names (/s)",
        "worker CPU µs/call: static / function",
        "nats-server CPU µs/msg: static / function",
    ]);
    t.row(vec![
        r.many_fn_e2e.show(count),
        r.many_fn_vs_one.show(ratio),
        r.many_e2e.show(count),
        medians(&r.many_cpu_us, &r.many_fn_cpu_us),
        medians(&r.many_server_e2e_us, &r.many_fn_server_us),
    ]);
    out.push_str(&t.render());
    out.push('\n');
}

/// The `q` quantile of pooled samples in ms, those not reached counting as longest; and how
/// many were not reached.
fn pooled_quantile(samples: &[Option<Duration>], q: f64) -> (f64, usize) {
    let mut ns: Vec<u64> = samples
        .iter()
        .map(|d| d.map_or(u64::MAX, |d| d.as_nanos() as u64))
        .collect();
    let missed = samples.iter().filter(|d| d.is_none()).count();
    (quantile(&mut ns, q) / 1e6, missed)
}

/// A new function's first job behind another function's backlog.
fn render_new_function(out: &mut String, o: &Options, r: &Results) {
    let delay = r
        .new_fn
        .iter()
        .find_map(|(_, runs)| runs.delay)
        .unwrap_or_default();
    out.push_str(&format!(
        "### A new function behind another's backlog: stored → invoke start (ms)\n\n\
         {} jobs of function `a` queued, then a worker with default settings (max_inflight \
         {DEFAULT_MAX_INFLIGHT}); each call of `a` takes {} ms, so its backlog outlasts the \
         measurement. Once `a` is being called, one job of a new function (`n0`, `n1`, …: a \
         function never seen before, every time) is published every {} ms, {} per run. Each \
         sample runs from the job's publish acknowledgement (stored) to its call's arrival at \
         the fake function, waiting at most {} s; samples of all runs pooled. Static mode is \
         the contrast: there the new job waits its turn behind the backlog.\n\n",
        count(o.backlog as f64),
        delay.as_millis(),
        NEW_FUNCTION_SPACING.as_millis(),
        o.new_functions,
        o.new_function_cap.as_secs(),
    ));
    let mut t = Table::new(&[
        "mode",
        "samples",
        "p50",
        "p99",
        "max",
        "jobs of `a` left at the last sample",
    ]);
    for (mode, runs) in &r.new_fn {
        let (p50, _) = pooled_quantile(&runs.samples, 0.50);
        let (p99, missed) = pooled_quantile(&runs.samples, 0.99);
        let (max, _) = pooled_quantile(&runs.samples, 1.0);
        let cap = format!("> {} s", o.new_function_cap.as_secs());
        let show = |v: f64| {
            if v.is_finite() && v < 1e12 {
                millis(v)
            } else {
                cap.clone()
            }
        };
        t.row(vec![
            format!("{} mode", mode.name()),
            if missed > 0 {
                format!(
                    "{} ({missed} not called within the cap)",
                    runs.samples.len()
                )
            } else {
                runs.samples.len().to_string()
            },
            show(p50),
            show(p99),
            show(max),
            runs.backlog_left.show(count),
        ]);
    }
    out.push_str(&t.render());
    out.push('\n');
}

/// Thousands of function consumers: what they cost busy and idle.
fn render_consumers(out: &mut String, r: &Results) {
    let c0 = &r.consumers[0];
    out.push_str(&format!(
        "### {} function consumers, busy and idle (function mode, max_inflight {DEFAULT_MAX_INFLIGHT})\n\n\
         One worker with `consumer_inactive_threshold=10m` (no consumer is deleted while \
         measured), three windows of {:.0} s each: started on an empty stream; then with {} \
         jobs ({} per function) published and every function's consumer created, calls \
         taking {} ms so that work stays queued; then after every job was called and acked, \
         the consumers still there. CPU is user + system time over the window ÷ wall time \
         (100% = one core); RSS at the end of the window. Consumers counted from the \
         stream's info include the function-mode marker.\n\n",
        count(c0.functions as f64),
        c0.busy.window.as_secs_f64(),
        count(c0.jobs as f64),
        c0.jobs / c0.functions,
        c0.delay.as_millis(),
    ));
    let show = |f: &dyn Fn(&ManyConsumers) -> f64, fmt: &dyn Fn(f64) -> String| {
        Samples(r.consumers.iter().map(f).collect()).show(fmt)
    };
    let pct = |v: f64| format!("{:.1}%", v * 100.0);
    let mut t = Table::new(&[
        "phase",
        "consumers",
        "functions with work (start → end)",
        "calls/s",
        "worker RSS (MiB)",
        "worker CPU",
        "nats-server CPU",
    ]);
    type Pick = fn(&ManyConsumers) -> &scenarios::Phase;
    let phases: [(&str, Pick); 3] = [
        ("no work yet (same worker, before)", |c| &c.empty),
        ("busy: work queued for the functions", |c| &c.busy),
        ("idle: drained, consumers kept", |c| &c.idle),
    ];
    for (name, pick) in phases {
        t.row(vec![
            name.into(),
            show(&|c| pick(c).consumers as f64, &count),
            format!(
                "{} → {}",
                show(&|c| pick(c).functions_with_work.0 as f64, &count),
                show(&|c| pick(c).functions_with_work.1 as f64, &count)
            ),
            show(&|c| pick(c).calls_per_sec, &count),
            show(&|c| pick(c).rss as f64, &mib),
            show(&|c| pick(c).worker_cpu, &pct),
            show(&|c| pick(c).server_cpu, &pct),
        ]);
    }
    out.push_str(&t.render());
    out.push_str(&format!(
        "\nConsumer creation: every function's consumer existed {} s after the first job was \
         published (publishing all {} took {} s).\n\n",
        show(&|c| c.created_in.as_secs_f64(), &|v| format!("{v:.1}")),
        count(c0.jobs as f64),
        show(&|c| c.published_in.as_secs_f64(), &|v| format!("{v:.2}")),
    ));
}

/// Two medians in µs: `a / b`.
fn medians(a: &Samples, b: &Samples) -> String {
    format!("{} / {}", micros(a.median()), micros(b.median()))
}

fn percent(v: f64) -> String {
    format!("{:.0}%", v * 100.0)
}

fn micros_of(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The worker measured: `--worker`, or the release build of this checkout.
fn worker_binary(o: &Options) -> PathBuf {
    o.worker
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_queue-worker")))
}

/// CPU model, core count, memory and kernel, from `/proc`.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<f64>().ok())
        })
        .map_or("?".into(), |kib| format!("{:.0} GiB", kib / 1048576.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cores} cores, {mem} RAM, Linux {}", kernel.trim())
}
