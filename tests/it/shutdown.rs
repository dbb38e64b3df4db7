//! Graceful drain: in-flight calls finish and are acknowledged, nothing new is pulled, the
//! rest stays queued; at the drain deadline unfinished messages are handed back at once.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::support::{Env, Step};

#[tokio::test]
async fn shutdown_finishes_in_flight_calls_and_leaves_the_rest_queued() {
    let env = Env::start().await;
    env.gateway.script(
        "job",
        vec![Step::status(200).delay(Duration::from_millis(800))],
    );
    let config = env.config(&[("max_inflight", "4")]);
    let ids = crate::support::submit(&config, "job", 20).await;
    let worker = queue_worker::app::start(config.clone()).await.unwrap();
    env.gateway
        .wait_for("4 running calls", Duration::from_secs(10), |g| {
            g.running() == 4
        })
        .await;

    worker.shutdown();
    assert_eq!(worker.health.readiness(), Err("draining"));
    worker.wait().await.unwrap();
    let calls = env.gateway.calls();
    assert_eq!(calls.len(), 4, "no new work may start during the drain");
    assert!(
        calls.iter().all(|c| c.finished.is_some()),
        "in-flight calls must finish"
    );
    let c = env.consumer().await;
    assert_eq!(
        c.num_ack_pending, 0,
        "finished calls are acknowledged, nothing else is held"
    );
    assert_eq!(c.num_pending, 16, "the rest stays queued");

    // A new worker takes the rest: every message ends up invoked exactly once.
    let worker = queue_worker::app::start(config).await.unwrap();
    env.gateway
        .wait_for("20 calls", Duration::from_secs(20), |g| {
            g.calls().len() >= 20
        })
        .await;
    env.wait_drained(Duration::from_secs(5)).await;
    let seen: Vec<String> = env.gateway.calls().iter().map(|c| c.call_id()).collect();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), 20);
    assert!(ids.iter().all(|id| unique.contains(id)));
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn at_the_drain_deadline_unfinished_messages_are_handed_back_at_once() {
    let env = Env::start().await;
    env.gateway.script(
        "stuck",
        vec![
            Step::status(200).delay(Duration::from_secs(30)),
            Step::status(200),
        ],
    );
    let config = env.config(&[("drain_timeout", "500ms"), ("ack_wait", "30s")]);
    crate::support::submit(&config, "stuck", 1).await;
    let worker = queue_worker::app::start(config.clone()).await.unwrap();
    env.gateway
        .wait_for("the stuck call", Duration::from_secs(10), |g| {
            g.running() == 1
        })
        .await;
    let stopping = Instant::now();
    crate::support::stop(worker).await;
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "drain took {:?}",
        stopping.elapsed()
    );

    // Redelivered at once (well before ack_wait) to the next worker.
    let handed_back = Instant::now();
    let worker = queue_worker::app::start(config).await.unwrap();
    env.gateway
        .wait_for("the second delivery", Duration::from_secs(10), |g| {
            g.calls().len() == 2
        })
        .await;
    assert!(handed_back.elapsed() < Duration::from_secs(10));
    env.wait_drained(Duration::from_secs(5)).await;
    crate::support::stop(worker).await;
}
