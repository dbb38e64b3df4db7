//! Function mode's own churn: 1,000 functions appearing and disappearing while replicas
//! restart and a consumer is deleted by hand; and the switch static → function → static
//! under load.

use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use queue_worker::message::publish::Submission;

use super::ledger::{report, Extra, Ledger};
use super::{ack_pending_all, soak, wait_all_called, WorkerProc};
use crate::function_mode::{consumers, with};
use crate::support::{stop, submit, Env, Step};

/// One job for each of `f0` … `f<n-1>`, published pipelined; returns the call ids.
async fn one_job_each(js: &async_nats::jetstream::Context, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut acks = Vec::new();
    for i in 0..n {
        let id = queue_worker::message::publish::new_call_id();
        let sub = Submission {
            function: format!("f{i}"),
            ..Default::default()
        };
        let payload = serde_json::to_vec(&sub.to_request(&id)).unwrap();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        acks.push(
            js.publish_with_headers(
                format!("faas-request.f{i}.openfaas-fn"),
                headers,
                payload.into(),
            )
            .await
            .unwrap(),
        );
        ids.push(id);
    }
    for ack in acks {
        ack.await.unwrap();
    }
    ids
}

async fn wait_stream_empty(env: &Env, timeout: Duration) {
    let js = env.js().await;
    let deadline = Instant::now() + timeout;
    loop {
        let mut stream = js.get_stream("OF_faas-request").await.unwrap();
        let left = stream.info().await.unwrap().state.messages;
        if left == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{left} messages still in the stream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// 1,000 functions appear (one job each) and their consumers are reaped; they appear again.
/// Meanwhile one of two replicas (a process) is killed and started again, the other
/// (in-process) restarts gracefully, and a consumer with work is deleted by hand. Every job
/// runs; the only repeats are what the killed replica held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_functions_come_and_go_while_replicas_restart() {
    let functions = 1_000 * soak();
    let env = Env::start().await;
    // The stream exists before the first publish.
    let config = env.config(&[]);
    let warm_up = submit(&config, "warm-up", 1).await;
    // upstream_timeout 5s: the server-side backstop (upstream_timeout + ack_wait +
    // threshold = 8 s) removes the consumers only the killed replica knew (a function whose
    // one job it ran just before dying is never seen by the others).
    let settings = with(&[
        ("consumer_inactive_threshold", "1s"),
        ("ack_wait", "2s"),
        ("max_inflight", "16"),
        ("upstream_timeout", "5s"),
    ]);
    let mut process = WorkerProc::spawn(&env.pairs(&settings));
    let mut worker = env.worker(&settings).await;
    process.wait_ready().await;
    let js = env.js().await;
    let mut ledger = Ledger::new();
    ledger.published(warm_up);

    // Round 1: the process replica is killed half-way, and comes back.
    ledger.published(one_job_each(&js, functions).await);
    env.gateway
        .wait_for("half the first round", Duration::from_secs(60), |g| {
            g.calls().len() >= functions / 2
        })
        .await;
    process.kill9().await;
    let held = ack_pending_all(&js).await;
    let mut process = WorkerProc::spawn(&env.pairs(&settings));
    wait_all_called(&env.gateway, &ledger, Duration::from_secs(120)).await;
    // Let the consumers be reaped (by the replicas, or by the server's backstop) before the
    // functions come back.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<String> = consumers(&env)
            .await
            .into_iter()
            .filter(|c| c.starts_with("fn-f"))
            .collect();
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let stream = js.get_stream("OF_faas-request").await.unwrap();
            let info = stream.consumer_info(&left[0]).await.unwrap();
            panic!(
                "{} consumers not reaped: {:?}…; the first: {info:?}\n{}",
                left.len(),
                &left[..left.len().min(5)],
                process.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Round 2: the functions come back; a consumer with work is deleted by hand and the
    // in-process replica restarts (drain, then a new one).
    ledger.published(one_job_each(&js, functions).await);
    let stream = js.get_stream("OF_faas-request").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let victim = loop {
        let names: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
        if let Some(n) = names.into_iter().find(|n| n.starts_with("fn-f")) {
            break n;
        }
        assert!(Instant::now() < deadline, "no function consumer came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = stream.delete_consumer(&victim).await;
    stop(worker).await;
    worker = env.worker(&settings).await;
    wait_all_called(&env.gateway, &ledger, Duration::from_secs(120)).await;
    wait_stream_empty(&env, Duration::from_secs(60)).await;
    stop(worker).await;
    process.stop().await;

    let t = ledger.settle(&env.gateway, &config).await;
    report(
        "function mode: 1,000 functions churning, replicas restarting, a consumer deleted",
        &t,
        &Extra {
            in_flight_at_kill: Some(held),
            ..Extra::default()
        },
    );
    t.assert_nothing_lost();
    t.assert_duplicates_within(held);
}

/// A rolling update from static to function mode under load, then back: both modes run
/// side by side at each switch (the new replica waits, ready, until the old one has
/// drained), nothing is lost and nothing runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_static_to_function_and_back_under_load() {
    let env = Env::start().await;
    let config = env.config(&[]);
    let mut ledger = Ledger::new();
    for f in ["a", "b"] {
        env.gateway
            .script(f, vec![Step::status(200).delay(Duration::from_millis(10))]);
        ledger.published(submit(&config, f, 600 * soak()).await);
    }
    let total = ledger.count();
    let slots = [("max_inflight", "4")];
    let first = env.worker(&slots).await;
    env.gateway
        .wait_for("the static replica at work", Duration::from_secs(60), |g| {
            g.calls().len() >= 100
        })
        .await;
    // Static → function: the function-mode replica takes the stream once the static one
    // has gone.
    let second = env.worker(&with(&slots)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop(first).await;
    env.gateway
        .wait_for(
            "the function-mode replica at work",
            Duration::from_secs(90),
            |g| g.calls().len() >= total / 2,
        )
        .await;
    // Function → static.
    let third = env.worker(&slots).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = env.gateway.calls().len();
    stop(second).await;
    assert!(
        before < total,
        "the queue drained before the second switch: the test proves nothing"
    );
    wait_all_called(&env.gateway, &ledger, Duration::from_secs(120)).await;
    wait_stream_empty(&env, Duration::from_secs(60)).await;
    assert_eq!(consumers(&env).await, ["faas-workers"]);
    stop(third).await;

    let t = ledger.settle(&env.gateway, &config).await;
    report(
        "static → function → static under load",
        &t,
        &Extra::default(),
    );
    t.assert_nothing_lost();
    assert_eq!(
        t.duplicated, 0,
        "jobs ran twice: function mode took the stream while static calls ran"
    );
}
