//! Function mode against a real nats-server: a consumer per function with work, fair slots,
//! the reaper, shared consumers across replicas and the per-function pending gauge. (The
//! switch between modes and churn under restarts, with a ledger: `reliability/`.)

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::TryStreamExt;
use queue_worker::message::publish::Submission;
use tokio::time::Instant;

use crate::support::*;

pub(crate) const FUNCTION: &[(&str, &str)] = &[("scaling_mode", "function")];

pub(crate) fn with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all = FUNCTION.to_vec();
    all.extend_from_slice(extra);
    all
}

/// The stream's consumers, sorted.
pub(crate) async fn consumers(env: &Env) -> Vec<String> {
    let js = env.js().await;
    let stream = js.get_stream("OF_faas-request").await.unwrap();
    let mut names: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
    names.sort();
    names
}

/// Messages left in the work stream.
pub(crate) async fn stream_count(env: &Env) -> u64 {
    let js = env.js().await;
    let mut stream = js.get_stream("OF_faas-request").await.unwrap();
    stream.info().await.unwrap().state.messages
}

pub(crate) async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every id in `ids` was called and the stream is empty, then returns how many
/// calls were repeats.
async fn all_ran(env: &Env, ids: &[String], timeout: Duration) -> usize {
    env.gateway
        .wait_for("every job", timeout, |g| {
            let seen: HashSet<String> = g.calls().iter().map(|c| c.call_id()).collect();
            ids.iter().all(|id| seen.contains(id))
        })
        .await;
    wait_until("the stream to drain", Duration::from_secs(30), || async {
        stream_count(env).await == 0
    })
    .await;
    repeats(env, ids)
}

/// Every published id was called at least once; returns how many calls were repeats.
fn repeats(env: &Env, ids: &[String]) -> usize {
    let calls = env.gateway.calls();
    let seen: HashMap<String, usize> = calls.iter().fold(HashMap::new(), |mut m, c| {
        *m.entry(c.call_id()).or_default() += 1;
        m
    });
    let missing: Vec<&String> = ids.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(missing.is_empty(), "{} jobs never ran", missing.len());
    calls.len() - seen.len()
}

/// 3,000 jobs of `a` queued, then 10 of `b`, with 8 slots: every `b` job starts before `a`
/// has started 50 more (in static mode, `b` would wait for all of `a`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_function_is_served_behind_another_functions_backlog() {
    let env = Env::start().await;
    // 30 ms calls: 50 starts of `a` take about 190 ms with 8 slots, well past discovery's
    // 50 ms tick, so the bound measures the slots' fairness rather than discovery's speed
    // (the benchmark measures that on its own).
    env.gateway.script(
        "a",
        vec![Step::status(200).delay(Duration::from_millis(30))],
    );
    let config = env.config(&[]);
    submit(&config, "a", 3000).await;
    let worker = env.worker(&with(&[("max_inflight", "8")])).await;
    env.gateway
        .wait_for("a's backlog to start", Duration::from_secs(20), |g| {
            g.calls_to("a") >= 100
        })
        .await;
    let a_before = env.gateway.calls_to("a");
    submit(&config, "b", 10).await;
    env.gateway
        .wait_for("every b job", Duration::from_secs(20), |g| {
            g.calls_to("b") == 10
        })
        .await;
    let calls = env.gateway.calls();
    let last_b = calls
        .iter()
        .rposition(|c| c.path.starts_with("/function/b"))
        .unwrap();
    let a_until_last_b = calls[..last_b]
        .iter()
        .filter(|c| c.path.starts_with("/function/a"))
        .count();
    let a_started = a_until_last_b - a_before;
    eprintln!("fairness: a started {a_started} jobs while b's 10 were waiting to start");
    assert!(
        a_started < 50,
        "a started {a_started} more jobs before the last of b's 10 started"
    );
    assert!(
        env.gateway.calls_to("a") < 3000,
        "a's backlog was gone before b ran: the test proves nothing"
    );
    stop(worker).await;
}

/// Consumers exist only for functions with work, and the worker deletes each after
/// `consumer_inactive_threshold` with nothing left.
#[tokio::test]
async fn consumers_come_with_work_and_go_after_the_threshold() {
    let env = Env::start().await;
    env.gateway.script(
        "slow",
        vec![Step::status(200).delay(Duration::from_millis(500))],
    );
    let worker = env
        .worker(&with(&[("consumer_inactive_threshold", "1s")]))
        .await;
    wait_until("the mode marker", Duration::from_secs(10), || async {
        consumers(&env).await == ["function-mode"]
    })
    .await;
    let config = env.config(&[]);
    submit(&config, "slow", 3).await;
    wait_until("slow's consumer", Duration::from_secs(10), || async {
        consumers(&env).await == ["fn-slow_dopenfaas-fn", "function-mode"]
    })
    .await;
    env.gateway
        .wait_for("slow's jobs", Duration::from_secs(10), |g| {
            g.calls_to("slow") == 3
        })
        .await;
    // Still there while its last call runs and for the threshold after.
    assert!(consumers(&env)
        .await
        .contains(&"fn-slow_dopenfaas-fn".to_string()));
    let drained = Instant::now();
    wait_until(
        "the idle consumer to go",
        Duration::from_secs(10),
        || async { consumers(&env).await == ["function-mode"] },
    )
    .await;
    let after = drained.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "deleted {after:?} after its work, before the 1 s threshold"
    );
    assert_eq!(stream_count(&env).await, 0);
    assert_eq!(env.gateway.calls().len(), 3);
    stop(worker).await;
}

/// An operator deletes a function's consumer mid-run: the worker recreates it and every job
/// still runs (the deleted consumer's in-flight jobs may run again: at most the slots).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_deleted_mid_run_is_recreated_and_nothing_is_lost() {
    let env = Env::start().await;
    env.gateway.script(
        "f",
        vec![Step::status(200).delay(Duration::from_millis(20))],
    );
    let config = env.config(&[]);
    let ids = submit(&config, "f", 300).await;
    let worker = env.worker(&with(&[("max_inflight", "4")])).await;
    env.gateway
        .wait_for("a third of the jobs", Duration::from_secs(20), |g| {
            g.calls_to("f") >= 100
        })
        .await;
    let js = env.js().await;
    let stream = js.get_stream("OF_faas-request").await.unwrap();
    stream.delete_consumer("fn-f_dopenfaas-fn").await.unwrap();
    let again = all_ran(&env, &ids, Duration::from_secs(30)).await;
    assert!(
        again <= 4,
        "{again} jobs ran twice; at most the 4 in flight may"
    );
    stop(worker).await;
}

/// Two replicas share the per-function consumers; every job runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_function_consumers_and_each_job_runs_once() {
    let env = Env::start().await;
    let config = env.config(&[]);
    let mut ids = Vec::new();
    for f in ["a", "b", "c"] {
        env.gateway
            .script(f, vec![Step::status(200).delay(Duration::from_millis(5))]);
        ids.extend(submit(&config, f, 200).await);
    }
    let one = env.worker(&with(&[("max_inflight", "4")])).await;
    let two = env.worker(&with(&[("max_inflight", "4")])).await;
    assert_eq!(
        all_ran(&env, &ids, Duration::from_secs(30)).await,
        0,
        "a job ran twice"
    );
    assert_eq!(env.gateway.calls().len(), 600);
    let names = consumers(&env).await;
    for f in ["a", "b", "c"] {
        assert!(names.contains(&format!("fn-{f}_dopenfaas-fn")), "{names:?}");
    }
    assert_eq!(
        names.len(),
        4,
        "one consumer per function, shared: {names:?}"
    );
    stop(one).await;
    stop(two).await;
}

/// Older gateways publish every function on the bare `<queue>` subject: served too.
#[tokio::test]
async fn the_legacy_subject_is_served_in_function_mode() {
    let env = Env::start().await;
    let worker = env.worker(FUNCTION).await;
    let js = env.js().await;
    for i in 0..3 {
        let body = format!(
            r#"{{"Function":"legacy","Method":"POST","Header":{{"X-Call-Id":["legacy-{i}"]}}}}"#
        );
        publish_raw(&js, "faas-request", body.into_bytes()).await;
    }
    env.gateway
        .wait_for("the legacy jobs", Duration::from_secs(10), |g| {
            g.calls_to("legacy") == 3
        })
        .await;
    wait_until("the stream to drain", Duration::from_secs(10), || async {
        stream_count(&env).await == 0
    })
    .await;
    assert!(consumers(&env)
        .await
        .contains(&"legacy-subject".to_string()));
    stop(worker).await;
}

/// The pending gauge is the stream's count for the function (queued + unacked), the same
/// on both replicas, and goes away once the function has drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_function_pending_gauge_is_the_streams_count_on_every_replica() {
    let env = Env::start().await;
    env.gateway.script(
        "slow",
        vec![Step::status(200).delay(Duration::from_secs(3))],
    );
    // Greedy: both slots of each replica at once (the limiter would start at 1 per replica).
    let greedy = [("max_inflight", "2"), ("limiter_enabled", "false")];
    let one = env.worker(&with(&greedy)).await;
    let two = env.worker(&with(&greedy)).await;
    let config = env.config(&[]);
    submit(&config, "slow", 6).await;
    // 4 running (2 per replica), 2 queued: the count stays 6 while the calls run.
    env.gateway
        .wait_for("four running", Duration::from_secs(10), |g| {
            g.running() == 4
        })
        .await;
    let series = r#"queue_worker_pending_messages{function_name="slow.openfaas-fn",queue_name="faas-request"} 6"#;
    wait_metric(&one, series).await;
    wait_metric(&two, series).await;
    let js = env.js().await;
    let counts = queue_worker::nats::stream::read_subjects(&js, "OF_faas-request", ">")
        .await
        .unwrap();
    assert_eq!(
        counts.subjects.get("faas-request.slow.openfaas-fn"),
        Some(&6)
    );
    for w in [&one, &two] {
        assert!(scrape(w).await.contains(
            r#"queue_worker_function_invocation_inflight{function_name="slow.openfaas-fn",queue_name="faas-request"} 2"#
        ));
    }
    env.gateway
        .wait_for("every job", Duration::from_secs(20), |g| {
            g.calls_to("slow") == 6 && g.running() == 0
        })
        .await;
    for w in [&one, &two] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while scrape(w).await.lines().any(|l| {
            l.starts_with(r#"queue_worker_pending_messages{function_name="slow.openfaas-fn""#)
        }) {
            assert!(
                Instant::now() < deadline,
                "the drained function's pending series stayed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stop(one).await;
    stop(two).await;
}

/// Static mode exports each function's depth too, beside `all-functions`.
#[tokio::test]
async fn static_mode_exports_per_function_depth_beside_all_functions() {
    let env = Env::start().await;
    env.gateway.script(
        "slow",
        vec![Step::status(200).delay(Duration::from_secs(3))],
    );
    let worker = env.worker(&[("max_inflight", "1")]).await;
    submit(&env.config(&[]), "slow", 3).await;
    wait_metric(
        &worker,
        r#"queue_worker_pending_messages{function_name="slow.openfaas-fn",queue_name="faas-request"} 3"#,
    )
    .await;
    wait_metric(
        &worker,
        r#"queue_worker_pending_messages{function_name="all-functions",queue_name="faas-request"} 3"#,
    )
    .await;
    stop(worker).await;
}

/// `com.openfaas.queue.max_inflight` caps how many of a function's calls one replica runs,
/// whatever `max_inflight` leaves free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_functions_max_inflight_annotation_caps_its_calls() {
    let env = Env::start().await;
    env.gateway.script(
        "capped",
        vec![Step::status(200).delay(Duration::from_millis(100))],
    );
    let sub = Submission {
        function: "capped".into(),
        annotations: vec![("com.openfaas.queue.max_inflight".into(), "2".into())],
        ..Default::default()
    };
    queue_worker::message::publish::publish(&env.config(&[]), &sub, 12)
        .await
        .unwrap();
    let worker = env.worker(&with(&[("max_inflight", "8")])).await;
    env.gateway
        .wait_for("every job", Duration::from_secs(20), |g| {
            g.calls_to("capped") == 12 && g.running() == 0
        })
        .await;
    assert_eq!(
        env.gateway.max_running(),
        2,
        "the annotation allows 2 at once (8 slots were free)"
    );
    stop(worker).await;
}
