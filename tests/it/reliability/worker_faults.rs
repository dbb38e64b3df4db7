//! The worker's own faults: a crash (`kill -9`) and a restart, a rolling update (`SIGTERM`
//! with a new replica up), and one of two replicas lost.

use std::time::Duration;

use super::ledger::{report, Extra, Ledger};
use super::{ack_pending, soak, wait_all_called, WorkerProc};
use crate::support::{submit, Env, Step};

/// `kill -9` during 10,000 jobs, then a restart: nothing lost; the only duplicates are calls
/// the dead worker held (delivered, not acknowledged) at the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_10000_jobs_then_restart() {
    let env = Env::start().await;
    env.gateway.script(
        "work",
        vec![Step::status(200).delay(Duration::from_millis(5))],
    );
    // A short lease, so the dead worker's messages come back within the test.
    let settings = [("max_inflight", "50"), ("ack_wait", "2s")];
    let config = env.config(&settings);
    let mut ledger = Ledger::new();
    ledger.published(submit(&config, "work", 10_000 * soak()).await);

    let mut first = WorkerProc::spawn(&env.pairs(&settings));
    first.wait_ready().await;
    env.gateway
        .wait_for("3,000 calls", Duration::from_secs(60), |g| {
            g.calls().len() >= 3_000
        })
        .await;
    first.kill9().await;
    let js = env.js().await;
    let held = ack_pending(&js, "faas-workers").await;

    let mut second = WorkerProc::spawn(&env.pairs(&settings));
    second.wait_ready().await;
    wait_all_called(&env.gateway, &ledger, Duration::from_secs(120)).await;
    env.wait_drained(Duration::from_secs(30)).await;
    second.stop().await;

    let t = ledger.settle(&env.gateway, &config).await;
    report(
        "worker kill -9 and restart",
        &t,
        &Extra {
            in_flight_at_kill: Some(held),
            ..Extra::default()
        },
    );
    t.assert_nothing_lost();
    t.assert_duplicates_within(held);
}

/// A rolling update: a new replica starts, the old one gets `SIGTERM` mid-load and drains.
/// Nothing is lost and nothing runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_loses_and_repeats_nothing() {
    let env = Env::start().await;
    env.gateway.script(
        "work",
        vec![Step::status(200).delay(Duration::from_millis(20))],
    );
    let settings = [("max_inflight", "20")];
    let config = env.config(&settings);
    let mut ledger = Ledger::new();
    ledger.published(submit(&config, "work", 3_000 * soak()).await);

    let mut old = WorkerProc::spawn(&env.pairs(&settings));
    old.wait_ready().await;
    env.gateway
        .wait_for("500 calls", Duration::from_secs(60), |g| {
            g.calls().len() >= 500
        })
        .await;
    let mut new = WorkerProc::spawn(&env.pairs(&settings));
    new.wait_ready().await;
    let running = env.gateway.running();
    old.sigterm();
    assert_eq!(
        old.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "the old replica drains and exits cleanly:\n{}",
        old.log()
    );
    wait_all_called(&env.gateway, &ledger, Duration::from_secs(120)).await;
    env.wait_drained(Duration::from_secs(30)).await;
    new.stop().await;

    let t = ledger.settle(&env.gateway, &config).await;
    report("rolling update (SIGTERM)", &t, &Extra::default());
    assert!(running > 0, "the old replica was busy at SIGTERM");
    assert_eq!(
        (t.lost, t.duplicated, t.unexpected, t.dead_lettered),
        (0, 0, 0, 0),
        "{t:?}"
    );
    assert_eq!((t.ok, t.acked), (t.published, t.published), "{t:?}");
}

/// Two replicas share the queue; one is killed mid-run and the other finishes everything,
/// including what the dead one held once its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_replicas_one_killed_the_other_finishes() {
    let env = Env::start().await;
    env.gateway.script(
        "work",
        vec![Step::status(200).delay(Duration::from_millis(10))],
    );
    let settings = [("max_inflight", "20"), ("ack_wait", "2s")];
    let config = env.config(&settings);
    let mut ledger = Ledger::new();
    ledger.published(submit(&config, "work", 3_000 * soak()).await);

    let mut a = WorkerProc::spawn(&env.pairs(&settings));
    let mut b = WorkerProc::spawn(&env.pairs(&settings));
    a.wait_ready().await;
    b.wait_ready().await;
    env.gateway
        .wait_for("1,000 calls", Duration::from_secs(60), |g| {
            g.calls().len() >= 1_000
        })
        .await;
    // Right after the kill: what both replicas hold unacknowledged, an upper bound on the
    // dead one's share.
    let js = env.js().await;
    a.kill9().await;
    let held = ack_pending(&js, "faas-workers").await;
    wait_all_called(&env.gateway, &ledger, Duration::from_secs(120)).await;
    env.wait_drained(Duration::from_secs(30)).await;
    b.stop().await;

    let t = ledger.settle(&env.gateway, &config).await;
    report(
        "two replicas, one killed",
        &t,
        &Extra {
            in_flight_at_kill: Some(held),
            ..Extra::default()
        },
    );
    t.assert_nothing_lost();
    t.assert_duplicates_within(held);
}
