//! The function's faults: 5xx bursts, 429 storms, hangs past `upstream_timeout`, refused
//! connections and calls lasting many `ack_wait` periods. Each job is retried per policy and
//! then dead-lettered, never lost; long calls run once.

use std::collections::HashMap;
use std::time::Duration;

use super::ledger::{dead_letter_ids, report, Extra, Ledger, Tally};
use super::soak;
use crate::support::{submit, Env, Recorded, Step};

const ATTEMPTS: usize = 3;

/// Per job: its calls' statuses in order (rejections by the platform included).
fn statuses(calls: &[Recorded]) -> HashMap<String, Vec<Option<u16>>> {
    let mut out: HashMap<String, Vec<Option<u16>>> = HashMap::new();
    for c in calls {
        out.entry(c.call_id()).or_default().push(c.status);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_faults_are_retried_then_dead_lettered_never_lost() {
    let env = Env::start().await;
    let n = 10 * soak();
    // A burst of 5xx, then health: the first jobs fail up to their last attempt.
    let mut burst = vec![Step::status(500); 2 * n];
    burst.push(Step::status(200));
    env.gateway.script("burst", burst);
    // A storm of 429s from the function itself (no X-OpenFaaS-Internal): retried like 5xx.
    let mut storm = vec![Step::status(429); 2 * n];
    storm.push(Step::status(200));
    env.gateway.script("storm", storm);
    // Hangs past upstream_timeout, every time.
    env.gateway.script(
        "hang",
        vec![Step::status(500).delay(Duration::from_millis(5_000))],
    );
    // Calls lasting 3.2 ack_wait periods: the lease is renewed, so each runs once.
    env.gateway.script(
        "long",
        vec![Step::status(200).delay(Duration::from_millis(3_200))],
    );
    let settings = [
        ("max_retry_attempts", "3"),
        ("initial_retry_wait", "200ms"),
        ("max_retry_wait", "400ms"),
        ("upstream_timeout", "4s"),
        ("ack_wait", "1s"),
        ("max_inflight", "20"),
    ];
    let config = env.config(&settings);
    let mut ledger = Ledger::new();
    for f in ["burst", "storm", "hang", "long"] {
        ledger.published(submit(&config, f, n).await);
    }
    // Refused connections: the same queue's jobs for a gateway nobody listens on, on a
    // queue of their own.
    let closed = queue_worker::dev::natsd::free_port().unwrap();
    let closed_url = format!("http://127.0.0.1:{closed}");
    let refused_settings: Vec<(&str, &str)> = settings
        .iter()
        .copied()
        .chain([
            ("nats_stream", "refused"),
            ("gateway_url", closed_url.as_str()),
        ])
        .collect();
    let refused_config = env.config(&refused_settings);
    let refused_ids = submit(&refused_config, "nowhere", n).await;

    let worker = env.worker(&settings).await;
    let refused = env.worker(&refused_settings).await;
    // Every job ends: acknowledged, or terminated after it was dead-lettered.
    {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let js = env.js().await;
            let left = super::ledger::stream_call_ids(&js, "OF_faas-request").await;
            let left_refused = super::ledger::stream_call_ids(&js, "OF_refused").await;
            if left.is_empty() && left_refused.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "jobs still queued: {} + {} refused",
                left.len(),
                left_refused.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    crate::support::stop(worker).await;
    crate::support::stop(refused).await;

    let calls = env.gateway.calls();
    let t = ledger.settle(&env.gateway, &config).await;
    let per_job = statuses(&calls);
    // Policy, per job: never more than ATTEMPTS calls; a success ends the job; a job whose
    // every attempt failed is dead-lettered, and only such a job.
    let dead = dead_letter_ids(env.js().await, &config).await;
    for id in ledger.ids() {
        let s = per_job.get(id).cloned().unwrap_or_default();
        assert!(!s.is_empty(), "{id} never called");
        assert!(s.len() <= ATTEMPTS, "{id}: {} calls: {s:?}", s.len());
        let succeeded = s.iter().any(|st| st.is_some_and(|st| st < 300));
        if succeeded {
            assert_eq!(
                s.last().unwrap().map(|st| st < 300),
                Some(true),
                "{id}: {s:?}"
            );
            assert!(
                !dead.contains(id),
                "{id} succeeded and was dead-lettered: {s:?}"
            );
        } else {
            assert_eq!(s.len(), ATTEMPTS, "{id} gave up early: {s:?}");
            assert!(
                dead.contains(id),
                "{id} failed {ATTEMPTS} times, not dead-lettered"
            );
        }
    }
    // The refused jobs: never reached the fake; each dead-lettered after its attempts.
    let refused_dead = dead_letter_ids(env.js().await, &refused_config).await;
    let refused_lost = refused_ids
        .iter()
        .filter(|id| !refused_dead.contains(*id))
        .count();
    let long_calls: Vec<usize> = ledger.ids()[3 * n..]
        .iter()
        .map(|id| per_job.get(id).map_or(0, Vec::len))
        .collect();

    let all = Tally {
        published: t.published + refused_ids.len(),
        dead_lettered: t.dead_lettered + refused_dead.len(),
        acked: t.acked + refused_ids.len(),
        lost: t.lost + refused_lost,
        ..t.clone()
    };
    report(
        "function faults (5xx, 429, hangs, refused, long calls)",
        &all,
        &Extra::default(),
    );
    assert_eq!((t.lost, t.duplicated, t.unexpected), (0, 0, 0), "{t:?}");
    assert_eq!(t.acked, t.published, "{t:?}");
    assert_eq!(refused_lost, 0, "refused jobs not dead-lettered");
    assert_eq!(long_calls, vec![1; n], "long calls run once each");
    // The hangs all failed; some of the burst and storm jobs did too.
    assert!(t.dead_lettered >= n, "{t:?}");
}
