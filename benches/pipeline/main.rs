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
//! Options: `--n N` (jobs per throughput run, default 100000), `--runs R` (default 3),
//! `--levels 1,16,256`, `--functions 1000`, `--rate 1000` and `--latency-secs 10`,
//! `--in-flight 1000`, `--keep-logs`, `--worker PATH` (measure another build), `--worker-env key=value` (a setting for every worker), `--quick` (N = 10000, one run, no file written), `--no-write`,
//! `--output PATH`.

mod function;
mod proc;
mod report;
mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use report::{count, mib, micros, millis, quantile, ratio, Samples, Table};
use scenarios::{Bench, Mode};

struct Options {
    n: usize,
    runs: usize,
    levels: Vec<usize>,
    functions: usize,
    rate: u32,
    latency_secs: u32,
    in_flight: usize,
    output: Option<PathBuf>,
    keep_logs: bool,
    /// Another worker binary to measure (an older build, for before/after).
    worker: Option<PathBuf>,
    worker_env: Vec<(String, String)>,
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
            output: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md")),
            keep_logs: false,
            worker: None,
            worker_env: Vec::new(),
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
                "--quick" => {
                    o.n = 10_000;
                    o.runs = 1;
                    o.latency_secs = 3;
                    write.get_or_insert(false);
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
        Ok(Some(o))
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
    p50_ms: Samples,
    p99_ms: Samples,
    max_ms: Samples,
    idle_rss: Samples,
    busy_rss: Samples,
    busy_hwm: Samples,
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

    for run in 1..=o.runs {
        eprintln!("run {run}/{}", o.runs);
        let mut top_e2e = f64::NAN;
        for (level, res) in &mut r.levels {
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
            if *level == top {
                top_e2e = e2e.rate;
            }
        }
        if o.functions > 1 {
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
            r.many_vs_one.push(many.rate / top_e2e);
            r.many_cpu_us.push(micros_of(many.cpu_per_call));
            r.many_extra += many.extra_calls;
        }
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

    out.push_str("\n### Worker memory (RSS, MiB)\n\n");
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

    out.push_str("\n### Targets\n\n");
    let mut t = Table::new(&["target", "measured (median)", "met"]);
    let mut check = |name: &str, shown: String, ok: bool| {
        t.row(vec![
            name.into(),
            shown,
            if ok { "yes" } else { "**no**" }.into(),
        ]);
    };
    if let Some((level, l)) = r.levels.iter().max_by_key(|(l, _)| *l) {
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
    for (level, l) in &r.levels {
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
    let (p50, p99) = (r.p50_ms.median(), r.p99_ms.median());
    check("p50 enqueue → start ≤ 1 ms", millis(p50), p50 <= 1.0);
    check("p99 enqueue → start ≤ 5 ms", millis(p99), p99 <= 5.0);
    let (idle, busy) = (r.idle_rss.median(), r.busy_rss.median());
    check("RSS idle ≤ 20 MiB", mib(idle), idle <= 20.0 * 1048576.0);
    check(
        &format!("RSS with {} in flight ≤ 64 MiB", count(o.in_flight as f64)),
        mib(busy),
        busy <= 64.0 * 1048576.0,
    );
    out.push_str(&t.render());
    Ok(out)
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
