//! `queue-worker demo`: everything on one machine. A nats-server child on a temp store, the
//! sample gateway with a `sleep` function (random run time, a `max_inflight` that answers
//! 429 like OpenFaaS's watchdog), the worker, the front door, then a burst of jobs POSTed to
//! the front door as `hey` would, live progress, a summary, and a clean stop (also on
//! Ctrl-C).

use std::io::IsTerminal as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Sources};
use crate::dev::natsd::NatsServer;
use crate::dev::sample::{self, SampleOptions, SampleStats};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub jobs: usize,
    /// The worker's `max_inflight`.
    pub max_inflight: usize,
    /// The sample function's limit (429 above it).
    pub function_inflight: u64,
    /// The front door's address; an ephemeral port is used when it is taken.
    pub listen: SocketAddr,
    /// Keep running after the burst until Ctrl-C.
    pub stay: bool,
}

/// Clients posting at once, as in OpenFaaS's `hey -c 4` example.
const CLIENTS: usize = 4;

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
        "queue-worker demo: {} jobs, worker max_inflight {}, function max_inflight {}\n",
        opts.jobs,
        opts.max_inflight,
        opts.function_inflight
    );
    let nats = tokio::task::spawn_blocking(NatsServer::start).await??;
    crate::outln!(
        "  nats-server   {} (JetStream store in a temp dir)",
        nats.url()
    );

    let stop = CancellationToken::new();
    let (gateway, stats) = sample::serve(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        SampleOptions {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(800),
            fail_every: 0,
            max_inflight: opts.function_inflight,
            functions: vec!["sleep".into()],
        },
        stop.clone(),
    )
    .await?;
    crate::outln!(
        "  gateway       http://{gateway} (function sleep: 100-800ms; 429 above {} at once)",
        opts.function_inflight
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
    let retries = worker.metrics.function("sleep.openfaas-fn").retries.clone();
    let mut last_line = Instant::now() - Duration::from_secs(10);
    loop {
        let done = worker.metrics.processed.get() as u64;
        let accepted = burst.accepted.load(Ordering::Relaxed);
        let callbacks = stats.callbacks.load(Ordering::Relaxed);
        let finished = submit.is_finished() && callbacks >= accepted && done >= accepted;
        // On a terminal the line is redrawn in place; in a log, one line a second.
        if tty || finished || last_line.elapsed() >= Duration::from_secs(1) {
            let line = progress_line(opts.jobs, accepted, done, &stats, retries.get() as u64);
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
    crate::outln!(
        "\n{} after {:.1}s: {accepted} jobs accepted ({} refused), {} processed, {} calls to the function ({} answered 429 and were retried later), {} callbacks.",
        if interrupted { "Interrupted" } else { "Done" },
        elapsed.as_secs_f64(),
        burst.refused.load(Ordering::Relaxed),
        worker.metrics.processed.get(),
        stats.calls.load(Ordering::Relaxed),
        stats.limited.load(Ordering::Relaxed),
        stats.callbacks.load(Ordering::Relaxed),
    );
    if !interrupted && elapsed.as_secs_f64() > 0.0 {
        crate::outln!(
            "Throughput: {:.0} jobs/s with the function limited to {} at once.",
            accepted as f64 / elapsed.as_secs_f64(),
            opts.function_inflight
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

    crate::outln!("\nStopping: front door, worker (drain), sample gateway, nats-server.");
    door.shutdown();
    worker.shutdown();
    let (d, w) = tokio::join!(door.wait(), worker.wait());
    d?;
    w?;
    stop.cancel();
    drop(nats);
    Ok(())
}

/// `[#####-----] queued 12 | in flight 10 | done 150/200 | retried 31`
fn progress_line(
    jobs: usize,
    accepted: u64,
    done: u64,
    stats: &SampleStats,
    retried: u64,
) -> String {
    let running = stats.running.load(Ordering::Relaxed);
    let queued = accepted.saturating_sub(done + running);
    let width = 30;
    let filled = ((done as usize).min(jobs) * width) / jobs.max(1);
    format!(
        "[{}{}] queued {queued:>4} | in flight {running:>3} | done {done:>4}/{jobs} | retried {retried:>4}",
        "#".repeat(filled),
        "-".repeat(width - filled)
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
