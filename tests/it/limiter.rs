//! Adaptive concurrency on the real stack: a function with a hard `max_inflight` gets about
//! as many calls as it can take, every job runs once, and a 429 is retried.

use std::time::Duration;

use crate::function_mode::with;
use crate::support::*;

/// OpenFaaS's watchdog with `max_inflight` 3, 100 jobs, a worker with 20 slots: greedy
/// dispatch would send 20 at once and have 17 refused, round after round (hundreds of
/// 429s); the limiter learns 3 and keeps the rest queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_limited_to_3_sees_few_429s_and_every_job_runs_once() {
    let env = Env::start().await;
    env.gateway.limit("capped", 3);
    env.gateway.script(
        "capped",
        vec![Step::status(200).delay(Duration::from_millis(50))],
    );
    let worker = env
        .worker(&with(&[
            ("max_inflight", "20"),
            ("initial_retry_wait", "100ms"),
            ("max_retry_wait", "200ms"),
        ]))
        .await;
    let ids = submit(&env.config(&[]), "capped", 100).await;
    env.gateway
        .wait_for("100 jobs to run", Duration::from_secs(60), |g| {
            g.ran("capped").len() == 100
        })
        .await;
    let ran = env.gateway.ran("capped");
    for id in &ids {
        assert_eq!(
            ran.get(id),
            Some(&1),
            "job {id} ran {:?} times",
            ran.get(id)
        );
    }
    let rejected = env.gateway.rejected("capped");
    eprintln!("429s: {rejected} for 100 jobs");
    assert!(rejected <= 25, "{rejected} 429s for 100 jobs");
    assert!(env.gateway.max_running() <= 3);
    let text = scrape(&worker).await;
    let series = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains(r#"function_name="capped.openfaas-fn""#))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(
        series("queue_worker_rejections_total"),
        Some(rejected as f64),
        "{text}"
    );
    let limit = series("queue_worker_concurrency_limit").expect("a learned limit is exported");
    assert!((1.0..=4.0).contains(&limit), "learned {limit}");
    stop(worker).await;
}

/// With the limiter on, a 429 is always retried, even when `retry_http_codes` leaves it
/// out: it is the limiter's signal that the function was full, not the job's failure.
#[tokio::test]
async fn with_the_limiter_a_429_is_retried_whatever_the_retry_codes() {
    let env = Env::start().await;
    env.gateway
        .script("busy", vec![Step::status(429), Step::status(200)]);
    let worker = env
        .worker(&with(&[
            ("retry_http_codes", "500"),
            ("initial_retry_wait", "100ms"),
        ]))
        .await;
    submit(&env.config(&[]), "busy", 1).await;
    env.gateway
        .wait_for("the retry", Duration::from_secs(10), |g| {
            g.calls_to("busy") == 2
        })
        .await;
    stop(worker).await;
}
