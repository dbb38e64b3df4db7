//! Settling: retryable answers come back after the backoff (a server-side delayed NAK), final
//! answers are acknowledged once, and exhausted attempts give up with a callback that says so.

use std::time::Duration;

use queue_worker::publish::{publish, Submission};

use crate::support::{wait_metric, Env, Step};

fn job(function: &str, env: &Env) -> Submission {
    Submission {
        function: function.into(),
        callback_url: Some(env.gateway.callback_url(function)),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_503_is_retried_after_the_backoff_then_succeeds() {
    let env = Env::start().await;
    env.gateway.script(
        "flaky",
        vec![Step::status(503), Step::status(200).body("ok")],
    );
    let worker = env
        .worker(&[("initial_retry_wait", "1s"), ("max_retry_attempts", "5")])
        .await;
    publish(&env.config(&[]), &job("flaky", &env), 1)
        .await
        .unwrap();

    env.gateway.wait_callbacks(1).await;
    let calls = env.gateway.calls();
    assert_eq!(calls.len(), 2);
    let gap = calls[1].started - calls[0].finished.unwrap();
    assert!(
        gap >= Duration::from_millis(1000),
        "retried after {gap:?}, before the 1s backoff"
    );
    assert!(gap < Duration::from_secs(5), "retry took {gap:?}");
    assert_eq!(calls[0].call_id(), calls[1].call_id());
    let cb = &env.gateway.callbacks()[0];
    assert_eq!(cb.header("x-function-status"), "200");
    assert_eq!(cb.header("x-retry"), "2");
    assert_eq!(cb.header("x-retry-max"), "5");
    env.wait_drained(Duration::from_secs(5)).await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn a_400_is_final_and_called_once() {
    let env = Env::start().await;
    env.gateway
        .script("bad", vec![Step::status(400).body("no")]);
    let worker = env.worker(&[]).await;
    publish(&env.config(&[]), &job("bad", &env), 1)
        .await
        .unwrap();
    env.gateway.wait_callbacks(1).await;
    env.wait_drained(Duration::from_secs(5)).await;
    assert_eq!(env.gateway.calls().len(), 1);
    let cb = &env.gateway.callbacks()[0];
    assert_eq!(cb.header("x-function-status"), "400");
    assert_eq!(&cb.body[..], b"no");
    assert_eq!(env.consumer().await.num_redelivered, 0);
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn exhausted_attempts_give_up_with_a_final_callback() {
    let env = Env::start().await;
    env.gateway.script("down", vec![Step::status(502)]);
    let worker = env
        .worker(&[
            ("initial_retry_wait", "100ms"),
            ("max_retry_wait", "200ms"),
            ("max_retry_attempts", "3"),
        ])
        .await;
    publish(&env.config(&[]), &job("down", &env), 1)
        .await
        .unwrap();
    env.gateway.wait_callbacks(1).await;
    env.wait_drained(Duration::from_secs(5)).await;
    assert_eq!(
        env.gateway.calls().len(),
        3,
        "max_retry_attempts counts calls"
    );
    let cb = &env.gateway.callbacks()[0];
    assert_eq!(cb.header("x-function-status"), "502");
    assert_eq!(cb.header("x-retry"), "3");
    assert_eq!(cb.header("x-retry-max"), "3");
    wait_metric(&worker, r#"queue_worker_messages_discarded_total{function_name="down.openfaas-fn",queue_name="faas-request",reason="attempts_exhausted"} 1"#).await;
    wait_metric(&worker, r#"queue_worker_retries_total{function_name="down.openfaas-fn",queue_name="faas-request"} 2"#).await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn an_unreachable_function_is_retried() {
    let env = Env::start().await;
    // A gateway URL nobody listens on: connection refused.
    let port = queue_worker::natsd::free_port().unwrap();
    let dead_gateway = format!("http://127.0.0.1:{port}");
    let worker = env
        .worker(&[
            ("gateway_url", &dead_gateway),
            ("initial_retry_wait", "100ms"),
            ("max_retry_wait", "100ms"),
            ("max_retry_attempts", "2"),
        ])
        .await;
    publish(&env.config(&[]), &job("gone", &env), 1)
        .await
        .unwrap();
    env.gateway.wait_callbacks(1).await;
    let cb = &env.gateway.callbacks()[0];
    assert_eq!(cb.header("x-function-status"), "503");
    assert_eq!(cb.header("x-retry"), "2");
    wait_metric(&worker, r#"queue_worker_invocations_total{function_name="gone.openfaas-fn",queue_name="faas-request",status="error"} 2"#).await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn an_undecodable_message_is_discarded_and_work_goes_on() {
    let env = Env::start().await;
    let worker = env.worker(&[]).await;
    let js = env.js().await;
    crate::support::publish_raw(&js, "faas-request", b"this is not json".to_vec()).await;
    crate::support::publish_raw(&js, "faas-request", br#"{"Function":"../../etc"}"#.to_vec()).await;
    publish(&env.config(&[]), &job("fine", &env), 1)
        .await
        .unwrap();
    env.gateway.wait_callbacks(1).await;
    env.wait_drained(Duration::from_secs(5)).await;
    assert_eq!(env.gateway.calls().len(), 1);
    wait_metric(&worker, r#"reason="malformed"} 1"#).await;
    wait_metric(&worker, r#"reason="bad_function"} 1"#).await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn a_failing_callback_is_retried_but_never_reruns_the_function() {
    let env = Env::start().await;
    env.gateway.script_callbacks(vec![500, 503, 200]);
    let worker = env
        .worker(&[
            ("callback_max_attempts", "3"),
            ("callback_retry_wait", "50ms"),
        ])
        .await;
    publish(&env.config(&[]), &job("once", &env), 1)
        .await
        .unwrap();
    env.gateway.wait_callbacks(3).await;
    env.wait_drained(Duration::from_secs(5)).await;
    assert_eq!(env.gateway.calls().len(), 1);
    let ids: Vec<String> = env
        .gateway
        .callbacks()
        .iter()
        .map(|c| c.header("x-call-id"))
        .collect();
    assert!(ids.iter().all(|id| *id == env.gateway.calls()[0].call_id()));
    wait_metric(
        &worker,
        r#"queue_worker_callbacks_total{queue_name="faas-request",result="delivered"} 1"#,
    )
    .await;

    // A receiver that keeps failing: tries stop at callback_max_attempts, counted as failed.
    env.gateway.script_callbacks(vec![500]);
    publish(&env.config(&[]), &job("twice", &env), 1)
        .await
        .unwrap();
    env.gateway.wait_callbacks(6).await;
    wait_metric(
        &worker,
        r#"queue_worker_callbacks_total{queue_name="faas-request",result="failed"} 1"#,
    )
    .await;
    assert_eq!(env.gateway.callbacks().len(), 6);
    assert_eq!(env.gateway.calls().len(), 2);
    crate::support::stop(worker).await;
}
