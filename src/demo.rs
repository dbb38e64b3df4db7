//! `queue-worker demo`: everything on one machine. A nats-server child on a temp store, the
//! sample gateway, the worker, a burst of jobs with callbacks, live progress, a summary, and
//! a clean stop (also on Ctrl-C).

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Sources};
use crate::natsd::NatsServer;
use crate::publish::{publish, Submission};
use crate::sample::{self, SampleOptions};

/// Runs the demo with `jobs` jobs.
pub async fn run(jobs: usize, max_inflight: usize) -> anyhow::Result<()> {
    println!("queue-worker demo: {jobs} jobs, max_inflight {max_inflight}\n");
    let nats = tokio::task::spawn_blocking(NatsServer::start).await??;
    println!(
        "  nats-server     {} (JetStream store in a temp dir)",
        nats.url()
    );

    let stop = CancellationToken::new();
    let (gateway, stats) = sample::serve(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        SampleOptions {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(600),
            fail_every: 5,
        },
        stop.clone(),
    )
    .await?;
    println!("  sample gateway  http://{gateway} (sleeps 100-600ms; 1 call in 5 answers 503 once)");

    let config = Config::load(&Sources::from_pairs([
        ("nats_url", nats.url()),
        ("gateway_url", format!("http://{gateway}")),
        ("metrics_port", "0".into()),
        ("max_inflight", max_inflight.to_string()),
        ("initial_retry_wait", "1s".into()),
        ("max_retry_wait", "4s".into()),
        ("stream_poll_interval", "250ms".into()),
        ("drain_timeout", "5s".into()),
    ])?)?;
    let worker = crate::app::start(config.clone()).await?;
    println!(
        "  worker          metrics on http://127.0.0.1:{}/metrics\n",
        worker.metrics_addr.port()
    );

    let started = Instant::now();
    let submission = Submission {
        function: "sleep".into(),
        body: b"{\"hello\":\"world\"}".to_vec(),
        headers: vec![("Content-Type".into(), "application/json".into())],
        callback_url: Some(format!("http://{gateway}/callback")),
        ..Default::default()
    };
    publish(&config, &submission, jobs).await?;
    println!(
        "published {jobs} jobs to {} (subject {}.sleep.openfaas-fn)",
        config.stream_name(),
        config.queue
    );

    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut interrupted = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = worker.metrics.processed.get() as u64;
        let running = stats.running.load(Ordering::Relaxed);
        let retried = stats.failures.load(Ordering::Relaxed);
        let callbacks = stats.callbacks.load(Ordering::Relaxed);
        let queued = (jobs as u64).saturating_sub(done + running);
        let width = 30;
        let filled = (done as usize * width) / jobs.max(1);
        print!(
            "\r[{}{}] queued {queued:>3} | in flight {running:>2} | done {done:>3}/{jobs} | retried {retried:>2} | callbacks {callbacks:>3}",
            "#".repeat(filled),
            "-".repeat(width - filled)
        );
        std::io::stdout().flush().ok();
        if callbacks >= jobs as u64 || Instant::now() > deadline {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = &mut ctrl_c => { interrupted = true; break; }
        }
    }
    println!();
    worker.shutdown();
    let metrics = worker.metrics.clone();
    worker.wait().await?;
    stop.cancel();
    drop(nats);

    println!(
        "\n{} in {:.1}s: {} invocations ({} answered 503 and were retried), {} processed, {} callbacks received.",
        if interrupted { "Interrupted" } else { "Done" },
        started.elapsed().as_secs_f64(),
        stats.calls.load(Ordering::Relaxed),
        stats.failures.load(Ordering::Relaxed),
        metrics.processed.get(),
        stats.callbacks.load(Ordering::Relaxed),
    );
    println!("\nSome of the metrics the worker exported:");
    for line in metrics.render().lines() {
        if line.starts_with("queue_worker_") && !line.contains("_bucket") {
            println!("  {line}");
        }
    }
    Ok(())
}
