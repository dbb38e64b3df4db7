//! Faults: the NATS server crashes and comes back on the same store; the consumer is deleted
//! under a running worker. Nothing may be lost.

use std::collections::HashSet;
use std::time::Duration;

use queue_worker::publish::{publish, Submission};

use crate::support::{scrape, Env, Step};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_mid_run_loses_nothing() {
    let mut env = Env::start().await;
    env.gateway.script(
        "work",
        vec![Step::status(200).delay(Duration::from_millis(20))],
    );
    // A short ack_wait: nats-server 2.9.10 restarted after SIGKILL recovers its consumer
    // state with the ack floor reset (measured: ack floor at sequence 1, a few phantom
    // ack-pending entries that only clear after ack_wait). 2.15 recovers it exactly.
    let config = env.config(&[("max_inflight", "8"), ("ack_wait", "2s")]);
    let ids = crate::support::submit(&config, "work", 300).await;
    let worker = queue_worker::app::start(config).await.unwrap();
    env.gateway
        .wait_for("50 calls", Duration::from_secs(20), |g| {
            g.calls().len() >= 50
        })
        .await;

    // A crash: SIGKILL, a pause, then the same port and store again.
    tokio::task::block_in_place(|| {
        env.nats.kill();
        std::thread::sleep(Duration::from_millis(300));
        env.nats.restart().unwrap();
    });

    env.gateway
        .wait_for("every message", Duration::from_secs(60), |g| {
            let seen: HashSet<String> = g.calls().iter().map(|c| c.call_id()).collect();
            ids.iter().all(|id| seen.contains(id))
        })
        .await;
    env.wait_drained(Duration::from_secs(30)).await;
    let text = scrape(&worker).await;
    let reconnects = text
        .lines()
        .find(|l| l.starts_with("queue_worker_nats_reconnect_total "))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    assert!(reconnects >= 1.0, "reconnect not counted:\n{text}");
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn a_deleted_consumer_is_recreated() {
    let env = Env::start().await;
    let worker = env.worker(&[]).await;
    let config = env.config(&[]);
    let sub = Submission {
        function: "f".into(),
        ..Default::default()
    };
    publish(&config, &sub, 5).await.unwrap();
    env.gateway
        .wait_for("5 calls", Duration::from_secs(10), |g| g.calls().len() == 5)
        .await;
    env.wait_drained(Duration::from_secs(5)).await;

    let js = env.js().await;
    let stream = js.get_stream("OF_faas-request").await.unwrap();
    // nats-server 2.9 sometimes answers this delete with "directory not empty" although the
    // consumer is gone; the worker must recover either way.
    let _ = stream.delete_consumer("faas-workers").await;
    publish(&config, &sub, 5).await.unwrap();
    env.gateway
        .wait_for("5 more calls", Duration::from_secs(30), |g| {
            g.calls().len() == 10
        })
        .await;
    env.wait_drained(Duration::from_secs(5)).await;
    crate::support::stop(worker).await;
}

/// While the stream cannot be read, the pending gauge is withdrawn rather than left at its
/// last value: OpenFaaS's autoscaler (avg) and KEDA (max) would keep scaling on a stale count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_count_is_withdrawn_while_nats_is_down() {
    let mut env = Env::start().await;
    let config = env.config(&[("stream_poll_interval", "100ms")]);
    let worker = queue_worker::app::start(config).await.unwrap();
    let pending_line = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("queue_worker_pending_messages{"))
            .map(str::to_string)
    };
    let wait_for = |want: bool| {
        let worker = &worker;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let text = scrape(worker).await;
                if pending_line(&text).is_some() == want {
                    return text;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "pending series present={} never became {want}:\n{text}",
                    !want
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // Ready: the stream and consumer are set up and the poller reads them.
    let ready = format!("http://127.0.0.1:{}/readyz", worker.metrics_addr.port());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200) {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let up = wait_for(true).await;
    assert!(pending_line(&up)
        .unwrap()
        .contains("function_name=\"all-functions\""));

    tokio::task::block_in_place(|| env.nats.kill());
    wait_for(false).await;
    tokio::task::block_in_place(|| env.nats.restart().unwrap());
    wait_for(true).await;
    crate::support::stop(worker).await;
}

/// A pull request that gets neither messages nor heartbeats (here a plain subscriber
/// swallows it in place of the consumer) is given up after the heartbeat watchdog, about
/// five seconds, and the loop asks again on a new inbox; not earlier, and not never.
#[tokio::test]
async fn silent_pull_requests_are_replaced_after_the_heartbeat_watchdog() {
    use futures_util::StreamExt;
    let env = Env::start().await;
    let config = env.config(&[]);
    let layout = queue_worker::stream::Layout::of(&config);
    let js = env.js().await;
    queue_worker::stream::ensure_stream(&js, &layout)
        .await
        .unwrap();
    let client = async_nats::connect(env.nats.url()).await.unwrap();
    let mut requests = client
        .subscribe(format!(
            "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
            layout.stream, layout.durable
        ))
        .await
        .unwrap();
    client.flush().await.unwrap();

    let (_tx, generation) = tokio::sync::watch::channel(0u64);
    let puller = queue_worker::consumer::Puller {
        client: client.clone(),
        js: js.clone(),
        layout: layout.clone(),
        slots: std::sync::Arc::new(tokio::sync::Semaphore::new(4)),
        max_outstanding: 4,
        limits: Default::default(),
        generation,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(puller.run(stop.clone(), |_, _| {}));

    let limit = Duration::from_secs(20);
    let first = tokio::time::timeout(limit, requests.next())
        .await
        .expect("a pull request")
        .unwrap();
    let started = tokio::time::Instant::now();
    let second = tokio::time::timeout(limit, requests.next())
        .await
        .expect("a second pull request")
        .unwrap();
    let gap = started.elapsed();
    assert_ne!(first.reply, second.reply, "a new inbox after the watchdog");
    assert!(
        gap >= Duration::from_millis(4500) && gap < Duration::from_secs(12),
        "replaced after {gap:?}"
    );
    stop.cancel();
    run.await.unwrap();
}

/// The worker's NATS connection closed for good (here: its client drained by hand; the
/// worker itself reconnects forever): the pull loop can never pull again, so the worker turns unready,
/// drains and ends with an error (the process exits non-zero and is restarted) instead of
/// staying up doing nothing.
#[tokio::test]
async fn a_pull_loop_that_can_never_pull_again_ends_the_worker_with_an_error() {
    let env = Env::start().await;
    let worker = env.worker(&[]).await;
    let client = worker.health.nats.get().unwrap().clone();
    client.drain().await.unwrap();

    let health = worker.health.clone();
    let result = tokio::time::timeout(Duration::from_secs(10), worker.wait())
        .await
        .expect("the worker ends on its own once its pull loop has stopped");
    let err = result.expect_err("a worker whose pull loop stopped ends with an error");
    assert!(err.to_string().contains("pull loop"), "{err:#}");
    assert_eq!(health.readiness(), Err("a worker task stopped; exiting"));
}

/// A start-up error after NATS was reached (a gateway URL the HTTP client refuses, set here
/// past the config's own check) leaves nothing running: no state poller keeps reading the
/// stream for a worker that is gone.
#[tokio::test]
async fn a_start_up_error_leaves_no_task_running() {
    let env = Env::start().await;
    let mut config = env.config(&[]);
    config.gateway_url = "http://gw{x}:8080".parse().unwrap();
    let worker = queue_worker::app::start(config.clone()).await.unwrap();
    let metrics = worker.metrics.clone();
    let err = tokio::time::timeout(Duration::from_secs(10), worker.wait())
        .await
        .expect("the worker ends on the start-up error")
        .expect_err("a gateway URL the HTTP client refuses is a start-up error");
    assert!(err.to_string().contains("gateway_url"), "{err:#}");

    // A leaked poller would publish the queue's depth within a few of its 100ms polls.
    crate::support::submit(&config, "anything", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = queue_worker::metrics::render(metrics.registry());
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("queue_worker_pending_messages{") && l.ends_with(" 1")),
        "a task of the failed worker is still polling the stream:\n{text}"
    );
}
