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
    let worker = queue_worker::worker::start(config.clone()).await.unwrap();
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
    let worker = queue_worker::worker::start(config).await.unwrap();
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
    let worker = queue_worker::worker::start(config.clone()).await.unwrap();
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
    let worker = queue_worker::worker::start(config).await.unwrap();
    env.gateway
        .wait_for("the second delivery", Duration::from_secs(10), |g| {
            g.calls().len() == 2
        })
        .await;
    assert!(handed_back.elapsed() < Duration::from_secs(10));
    env.wait_drained(Duration::from_secs(5)).await;
    crate::support::stop(worker).await;
}

/// `consumer_prefetch`: one message beyond `max_inflight` is pulled and waits in the worker
/// with its lease renewed: no redelivery although it waits 2.5 × `ack_wait`, and calls never
/// exceed `max_inflight`.
#[tokio::test]
async fn a_prefetched_message_keeps_its_lease_while_it_waits() {
    let env = Env::start().await;
    env.gateway.script(
        "slow",
        vec![Step::status(200).delay(Duration::from_millis(2500))],
    );
    let config = env.config(&[
        ("max_inflight", "1"),
        ("consumer_prefetch", "1"),
        ("ack_wait", "1s"),
    ]);
    crate::support::submit(&config, "slow", 2).await;
    let worker = queue_worker::worker::start(config).await.unwrap();
    env.gateway
        .wait_for("the first call", Duration::from_secs(10), |g| {
            g.running() == 1
        })
        .await;
    wait_ack_pending(&env, 2).await;
    env.gateway
        .wait_for("both calls", Duration::from_secs(15), |g| {
            g.calls().iter().filter(|c| c.finished.is_some()).count() == 2
        })
        .await;
    env.wait_drained(Duration::from_secs(5)).await;
    let c = env.consumer().await;
    assert_eq!(c.num_redelivered, 0, "a waiting message's lease ran out");
    assert_eq!(env.gateway.calls().len(), 2);
    assert_eq!(env.gateway.max_running(), 1, "calls beyond max_inflight");
    crate::support::stop(worker).await;
}

/// At a drain, a prefetched message that has not started goes back at once (another
/// replica runs it while this one's call is still running); the running call finishes.
#[tokio::test]
async fn a_prefetched_message_is_handed_back_at_a_drain() {
    let env = Env::start().await;
    env.gateway.script(
        "slow",
        vec![
            Step::status(200).delay(Duration::from_secs(3)),
            Step::status(200),
        ],
    );
    let config = env.config(&[("max_inflight", "1"), ("ack_wait", "30s")]);
    crate::support::submit(&config, "slow", 2).await;
    let prefetching = queue_worker::config::Config {
        prefetch: 1,
        ..config.clone()
    };
    let first = queue_worker::worker::start(prefetching).await.unwrap();
    env.gateway
        .wait_for("the first call", Duration::from_secs(10), |g| {
            g.running() == 1
        })
        .await;
    wait_ack_pending(&env, 2).await;

    first.shutdown();
    let second = queue_worker::worker::start(config).await.unwrap();
    env.gateway
        .wait_for("the handed-back message", Duration::from_secs(10), |g| {
            g.calls().len() == 2
        })
        .await;
    let calls = env.gateway.calls();
    assert!(
        calls[0].finished.is_none_or(|end| end > calls[1].started),
        "the waiting message went back only after the running call ended"
    );
    first.wait().await.unwrap();
    env.wait_drained(Duration::from_secs(5)).await;
    let calls = env.gateway.calls();
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|c| c.finished.is_some()));
    crate::support::stop(second).await;
}

/// Waits until `n` messages are delivered and unacknowledged.
async fn wait_ack_pending(env: &Env, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let c = env.consumer().await;
        if c.num_ack_pending as u64 == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} messages unacknowledged, not {n}",
            c.num_ack_pending
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A drain in the middle of a busy stream of deliveries: whatever the server was delivering
/// to the draining worker as it stopped pulling (buffered, or still on the wire) is handed
/// back at once, so a second worker runs every message long before `ack_wait` (30 s).
#[tokio::test]
async fn deliveries_that_race_the_drain_are_handed_back_at_once() {
    let env = Env::start().await;
    env.gateway.script(
        "race",
        vec![Step::status(200).delay(Duration::from_millis(5))],
    );
    let config = env.config(&[
        ("max_inflight", "64"),
        ("ack_wait", "30s"),
        ("drain_timeout", "2s"),
    ]);
    let ids = crate::support::submit(&config, "race", 3000).await;
    let first = queue_worker::worker::start(config.clone()).await.unwrap();
    env.gateway
        .wait_for("the first calls", Duration::from_secs(10), |g| {
            g.calls().len() >= 300
        })
        .await;
    first.shutdown();
    first.wait().await.unwrap();

    let second = queue_worker::worker::start(config).await.unwrap();
    env.gateway
        .wait_for("every message invoked", Duration::from_secs(10), |g| {
            let seen: HashSet<String> = g.calls().iter().map(|c| c.call_id()).collect();
            ids.iter().all(|id| seen.contains(id))
        })
        .await;
    env.wait_drained(Duration::from_secs(3)).await;
    crate::support::stop(second).await;
}

/// Messages the server is delivering to a worker's waiting pull requests at the moment its
/// drain starts must be handed back, never left to wait `ack_wait` (30 s here) on a worker
/// that is gone. Each round starts an idle worker (its pull requests wait on the server),
/// publishes a burst, and stops the worker while the burst is being delivered; a last worker
/// must then run every job within a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_during_a_burst_leaves_nothing_waiting_for_ack_wait() {
    let env = Env::start().await;
    env.gateway.script("burst", vec![Step::status(200)]);
    let config = env.config(&[("ack_wait", "30s")]);
    let overrides = [("max_inflight", "64"), ("ack_wait", "30s")];
    let mut ids = Vec::new();
    for _ in 0..6 {
        let worker = env.worker(&overrides).await;
        // Its pull requests are waiting on the server.
        let deadline = Instant::now() + Duration::from_secs(5);
        while env.consumer().await.num_waiting == 0 {
            assert!(
                Instant::now() < deadline,
                "no pull request reached the server"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = env.gateway.calls().len();
        let publisher = {
            let config = config.clone();
            tokio::spawn(async move { crate::support::submit(&config, "burst", 100).await })
        };
        env.gateway
            .wait_for("the burst's first call", Duration::from_secs(10), |g| {
                g.calls().len() > before
            })
            .await;
        worker.shutdown();
        worker.wait().await.unwrap();
        ids.extend(publisher.await.unwrap());
    }
    let last = env.worker(&overrides).await;
    env.gateway
        .wait_for(
            "every job, well within ack_wait",
            Duration::from_secs(8),
            |g| {
                let seen: HashSet<String> = g.calls().iter().map(|c| c.call_id()).collect();
                ids.iter().all(|id| seen.contains(id))
            },
        )
        .await;
    env.wait_drained(Duration::from_secs(3)).await;
    crate::support::stop(last).await;
}
