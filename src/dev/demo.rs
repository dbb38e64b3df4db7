//! `queue-worker demo`: everything on one machine. A nats-server child on a temp store, the
//! load simulator ([`crate::dev::platform`]) with a `sleep` function (random run time;
//! replicas with a hard `max_inflight` that answer 429 like OpenFaaS's watchdog, behind a
//! random balancer, scaled by in-flight load like OpenFaaS's capacity mode), the worker in
//! function mode with adaptive concurrency (or greedy, `--greedy`), the front door, then a
//! burst of jobs POSTed to the front door as `hey` would, live progress, a summary with the
//! 429s and calls per job, and a clean stop (also on Ctrl-C).

use std::io::IsTerminal as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Sources};
use crate::dev::natsd::NatsServer;
use crate::dev::platform::{
    self, FunctionSnapshot, FunctionSpec, PlatformOptions, RunTime, Scaling,
};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub jobs: usize,
    /// The worker's `max_inflight`.
    pub max_inflight: usize,
    /// Each replica's limit (429 above it).
    pub function_inflight: u64,
    /// Most replicas the autoscaler gives the function (it starts with one).
    pub replicas: u32,
    /// Adaptive concurrency off: pull as fast as slots allow, as before.
    pub greedy: bool,
    /// The front door's address; an ephemeral port is used when it is taken.
    pub listen: SocketAddr,
    /// Keep running after the burst until Ctrl-C.
    pub stay: bool,
}

/// Clients posting at once, as in OpenFaaS's `hey -c 4` example.
const CLIENTS: usize = 4;
/// The demo's function.
const FUNCTION: &str = "sleep";

/// Submission counters of the burst.
#[derive(Default)]
struct Burst {
    accepted: AtomicU64,
    refused: AtomicU64,
}

/// Runs the demo.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    // Ctrl-C is ours from the first moment: without a handler it would kill the process
    // and leave the nats-server child and its temporary store behind.
    let interrupt = CancellationToken::new();
    let on_signal = interrupt.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    crate::outln!(
        "queue-worker demo: {} jobs, worker max_inflight {}, function max_inflight {} per replica, 1-{} replicas, {}\n",
        opts.jobs,
        opts.max_inflight,
        opts.function_inflight,
        opts.replicas.max(1),
        if opts.greedy {
            "greedy (adaptive concurrency off)"
        } else {
            "adaptive concurrency on (--greedy turns it off)"
        }
    );
    let nats = tokio::task::spawn_blocking(NatsServer::start).await??;
    crate::outln!(
        "  nats-server   {} (JetStream store in a temp dir)",
        nats.url()
    );

    let stop = CancellationToken::new();
    let per_replica = u32::try_from(opts.function_inflight.max(1)).unwrap_or(u32::MAX);
    let replicas = opts.replicas.max(1);
    let platform = platform::start(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        PlatformOptions {
            functions: vec![FunctionSpec {
                name: FUNCTION.into(),
                max_inflight: per_replica,
                run_time: RunTime::Uniform {
                    min: Duration::from_millis(100),
                    max: Duration::from_millis(800),
                },
                replicas: 1,
                min_replicas: 1,
                max_replicas: replicas,
                // OpenFaaS's docs example: target = max_inflight, proportion 0.9.
                scaling: Scaling::Capacity {
                    target: per_replica,
                    proportion: 0.9,
                },
                interval: Duration::from_secs(1),
                ready_delay: Duration::from_millis(500),
                scale_down_delay: Duration::from_secs(10),
                jobs: opts.jobs as u64,
            }],
            metrics_url: None,
            sample_every: Duration::from_millis(20),
        },
        stop.clone(),
    )
    .await?;
    let gateway = platform.addr;
    crate::outln!(
        "  gateway       http://{gateway} (function sleep: 100-800ms; each replica answers 429 above {} at once; 1-{replicas} replicas behind a random balancer, scaled on in-flight)",
        per_replica
    );

    let listen = match std::net::TcpListener::bind(opts.listen) {
        Ok(l) => {
            drop(l);
            opts.listen
        }
        Err(_) => SocketAddr::from((opts.listen.ip(), 0)),
    };
    let config = Config::load(&Sources::from_pairs([
        ("nats_url", nats.url()),
        ("gateway_url", format!("http://{gateway}")),
        ("metrics_port", "0".into()),
        ("scaling_mode", "function".into()),
        ("limiter_enabled", (!opts.greedy).to_string()),
        ("max_inflight", opts.max_inflight.to_string()),
        ("initial_retry_wait", "500ms".into()),
        ("max_retry_wait", "4s".into()),
        ("backoff", "full".into()),
        ("stream_poll_interval", "250ms".into()),
        ("drain_timeout", "5s".into()),
        ("frontdoor_listen", listen.to_string()),
        ("frontdoor_check_function", "true".into()),
    ])?)?;
    let worker = crate::worker::start(config.clone()).await?;
    let door = crate::frontdoor::start(config.clone()).await?;
    crate::outln!(
        "  worker        metrics on http://127.0.0.1:{}/metrics",
        worker.metrics_addr.port()
    );
    crate::outln!(
        "  front door    http://{}/async-function/<name> (metrics on http://127.0.0.1:{}/metrics)\n",
        door.addr,
        door.metrics_addr.port()
    );
    let ready = async {
        while door.health.readiness().is_err() || worker.health.readiness().is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(30), ready) => {
            if r.is_err() {
                door.shutdown();
                worker.shutdown();
                anyhow::bail!(
                    "the worker or the front door did not become ready within 30s: {:?} / {:?}",
                    worker.health.readiness(),
                    door.health.readiness()
                );
            }
        }
        _ = interrupt.cancelled() => {}
    }

    let started = Instant::now();
    let burst = Arc::new(Burst::default());
    let submit = tokio::spawn(submit(
        format!("http://{}/async-function/sleep", door.addr),
        format!("http://{gateway}/callback"),
        opts.jobs,
        burst.clone(),
    ));
    crate::outln!(
        "POSTing {} jobs to http://{}/async-function/sleep from {CLIENTS} clients\n",
        opts.jobs,
        door.addr
    );

    let mut interrupted = interrupt.is_cancelled();
    let tty = std::io::stdout().is_terminal();
    let mut last_line = Instant::now() - Duration::from_secs(10);
    let snapshot = || {
        platform
            .snapshot(FUNCTION)
            .expect("the platform runs sleep")
    };
    loop {
        let done = worker.metrics.processed.get() as u64;
        let accepted = burst.accepted.load(Ordering::Relaxed);
        let callbacks = platform.callbacks();
        let finished = submit.is_finished() && callbacks >= accepted && done >= accepted;
        // On a terminal the line is redrawn in place; in a log, one line a second.
        if tty || finished || last_line.elapsed() >= Duration::from_secs(1) {
            let line = progress_line(opts.jobs, accepted, done, &snapshot());
            if tty {
                crate::out!("\r{line}");
            } else {
                crate::outln!("{line}");
            }

            last_line = Instant::now();
        }
        if finished || interrupted {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = interrupt.cancelled() => { interrupted = true; break; }
        }
    }
    if tty {
        crate::outln!();
    }
    submit.abort();
    let elapsed = started.elapsed();

    let accepted = burst.accepted.load(Ordering::Relaxed);
    let seen = snapshot();
    crate::outln!(
        "\n{} after {:.1}s: {accepted} jobs accepted ({} refused), {} processed, {} callbacks.",
        if interrupted { "Interrupted" } else { "Done" },
        elapsed.as_secs_f64(),
        burst.refused.load(Ordering::Relaxed),
        worker.metrics.processed.get(),
        platform.callbacks(),
    );
    crate::outln!(
        "{} calls to the function: {:.2} calls per job, {} answered 429 ({}).",
        seen.calls,
        seen.calls as f64 / accepted.max(1) as f64,
        seen.rejected,
        if opts.greedy {
            "greedy: each one a wasted call and a retry delay"
        } else {
            "adaptive concurrency; scripts/demo --greedy shows the old way"
        }
    );
    let timeline: Vec<String> = seen
        .timeline
        .iter()
        .map(|(t, n)| format!("{n}@{:.1}s", t.as_secs_f64()))
        .collect();
    crate::outln!("Replicas: {}.", timeline.join(" "));
    if !interrupted && elapsed.as_secs_f64() > 0.0 {
        crate::outln!(
            "Throughput: {:.0} jobs/s; the replicas' slots were {:.0}% busy while the jobs left could fill them.",
            accepted as f64 / elapsed.as_secs_f64(),
            100.0 * seen.utilisation.mean()
        );
    }
    crate::outln!("\nSome of the worker's metrics:");
    for line in worker.metrics.render().lines() {
        if line.starts_with("queue_worker_") && !line.contains("_bucket") {
            crate::outln!("  {line}");
        }
    }

    if opts.stay && !interrupted {
        crate::outln!(
            "\nStill running. Try:\n  hey -m POST -n 500 -c 4 http://{}/async-function/sleep\n  curl -i -X POST -d hi http://{}/async-function/sleep\n  queue-worker --nats-url {} queue status\nCtrl-C stops everything.",
            door.addr,
            door.addr,
            nats.url()
        );
        interrupt.cancelled().await;
    }

    crate::outln!("\nStopping: front door, worker (drain), function platform, nats-server.");
    door.shutdown();
    worker.shutdown();
    let (d, w) = tokio::join!(door.wait(), worker.wait());
    d?;
    w?;
    stop.cancel();
    drop(nats);
    Ok(())
}

/// `[#####-----] queued 12 | in flight 10 on 2 replicas | done 150/200 | 429s 31`
fn progress_line(jobs: usize, accepted: u64, done: u64, seen: &FunctionSnapshot) -> String {
    let running = seen.inflight;
    let queued = accepted.saturating_sub(done + running);
    let width = 30;
    let filled = ((done as usize).min(jobs) * width) / jobs.max(1);
    format!(
        "[{}{}] queued {queued:>4} | in flight {running:>3} on {:>2} replicas | done {done:>4}/{jobs} | 429s {:>4}",
        "#".repeat(filled),
        "-".repeat(width - filled),
        seen.ready,
        seen.rejected
    )
}

/// POSTs `jobs` requests from [`CLIENTS`] concurrent clients, each with a callback URL.
async fn submit(url: String, callback: String, jobs: usize, burst: Arc<Burst>) {
    crate::tls::install_provider();
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, url, callback, next, burst) = (
            client.clone(),
            url.clone(),
            callback.clone(),
            next.clone(),
            burst.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < jobs as u64 {
                let sent = client
                    .post(&url)
                    .header("X-Callback-Url", &callback)
                    .header("Content-Type", "application/json")
                    .body(r#"{"hello":"world"}"#)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().as_u16() == 202 => &burst.accepted,
                    _ => &burst.refused,
                }
                .fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}
