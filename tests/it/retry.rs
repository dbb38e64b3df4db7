//! The retry policy, row by row, against a real server: retryable answers come back after the
//! backoff (a server-side delayed NAK) or the function's Retry-After, final answers are
//! acknowledged once, internal errors are retried whatever the codes, and a function's
//! annotations override the worker's attempts and codes.

use std::time::Duration;

use queue_worker::message::publish::{publish, Submission};

use crate::support::{assert_gap, job, wait_metric, Env, Step};

#[tokio::test]
async fn a_503_503_200_sequence_waits_the_backoff_between_calls() {
    let env = Env::start().await;
    env.gateway.script(
        "flaky",
        vec![
            Step::status(503),
            Step::status(503),
            Step::status(200).body("ok"),
        ],
    );
    let worker = env
        .worker(&[
            ("initial_retry_wait", "400ms"),
            ("max_retry_wait", "5s"),
            ("max_retry_attempts", "5"),
        ])
        .await;
    publish(&env.config(&[]), &job("flaky", &env), 1)
        .await
        .unwrap();

    env.gateway.wait_callbacks(1).await;
    let calls = env.gateway.calls();
    assert_eq!(calls.len(), 3);
    // Exponential: 400ms after the first 503, 800ms after the second.
    let gaps = env.gateway.retry_gaps("flaky");
    assert_gap(gaps[0], 400, 1900, "first retry");
    assert_gap(gaps[1], 800, 2300, "second retry");
    assert!(calls.iter().all(|c| c.call_id() == calls[0].call_id()));
    let cb = &env.gateway.callbacks()[0];
    assert_eq!(cb.header("x-function-status"), "200");
    assert_eq!(cb.header("x-retry"), "3");
    assert_eq!(cb.header("x-retry-max"), "5");
    assert_eq!(&cb.body[..], b"ok");
    env.wait_drained(Duration::from_secs(5)).await;
    wait_metric(&worker, r#"queue_worker_retries_total{function_name="flaky.openfaas-fn",queue_name="faas-request"} 2"#).await;
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
async fn internal_errors_are_retried_whatever_the_codes() {
    let env = Env::start().await;
    env.gateway.script(
        "behind-proxy",
        vec![
            Step::status(500).header("X-OpenFaaS-Internal", "proxy"),
            Step::status(200),
        ],
    );
    env.gateway.script(
        "limited",
        vec![
            Step::status(400).header("X-OpenFaaS-Internal", "faas-middleware"),
            Step::status(200),
        ],
    );
    env.gateway
        .script("plain", vec![Step::status(500), Step::status(200)]);
    // Neither 500 nor 400 is a retried code here: only the header makes a call retried.
    let worker = env
        .worker(&[("retry_http_codes", "429"), ("initial_retry_wait", "100ms")])
        .await;
    for function in ["behind-proxy", "limited", "plain"] {
        publish(&env.config(&[]), &job(function, &env), 1)
            .await
            .unwrap();
    }
    env.gateway.wait_callbacks(3).await;
    env.wait_drained(Duration::from_secs(5)).await;
    assert_eq!(env.gateway.calls_to("behind-proxy"), 2);
    assert_eq!(env.gateway.calls_to("limited"), 2);
    assert_eq!(env.gateway.calls_to("plain"), 1);
    let status = |tag| env.gateway.callback_for(tag).header("x-function-status");
    assert_eq!(status("behind-proxy"), "200");
    assert_eq!(status("limited"), "200");
    assert_eq!(status("plain"), "500");
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn a_timed_out_call_is_retried() {
    let env = Env::start().await;
    env.gateway.script(
        "stuck",
        vec![
            Step::status(200).delay(Duration::from_secs(2)),
            Step::status(200).body("fast now"),
        ],
    );
    let worker = env
        .worker(&[
            ("upstream_timeout", "300ms"),
            ("initial_retry_wait", "100ms"),
        ])
        .await;
    publish(&env.config(&[]), &job("stuck", &env), 1)
        .await
        .unwrap();
    env.gateway.wait_callbacks(1).await;
    assert_eq!(env.gateway.calls_to("stuck"), 2);
    let cb = env.gateway.callback_for("stuck");
    assert_eq!(cb.header("x-function-status"), "200");
    assert_eq!(cb.header("x-retry"), "2");
    assert_eq!(&cb.body[..], b"fast now");
    wait_metric(&worker, r#"queue_worker_invocations_total{function_name="stuck.openfaas-fn",queue_name="faas-request",status="timeout"} 1"#).await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn retry_after_is_capped_at_the_maximum_wait() {
    let env = Env::start().await;
    env.gateway.script(
        "patient",
        vec![
            Step::status(503).header("Retry-After", "3600"),
            Step::status(200),
        ],
    );
    let worker = env
        .worker(&[("initial_retry_wait", "100ms"), ("max_retry_wait", "1s")])
        .await;
    publish(&env.config(&[]), &job("patient", &env), 1)
        .await
        .unwrap();
    env.gateway.wait_callbacks(1).await;
    let gaps = env.gateway.retry_gaps("patient");
    assert_eq!(gaps.len(), 1);
    assert_gap(gaps[0], 1000, 3000, "an hour's Retry-After capped at 1s");
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn retry_after_replaces_the_backoff() {
    let env = Env::start().await;
    // Delta-seconds, and an HTTP date five seconds ahead (whole seconds, so 4s to 5s from
    // now; the first call happens well within the first second).
    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(5));
    let date: &'static str = Box::leak(date.into_boxed_str());
    env.gateway.script(
        "limited",
        vec![
            Step::status(429).header("Retry-After", "2"),
            Step::status(200),
        ],
    );
    env.gateway.script(
        "busy",
        vec![
            Step::status(503).header("Retry-After", date),
            Step::status(200),
        ],
    );
    let worker = env
        .worker(&[("initial_retry_wait", "100ms"), ("max_retry_wait", "10s")])
        .await;
    publish(&env.config(&[]), &job("limited", &env), 1)
        .await
        .unwrap();
    publish(&env.config(&[]), &job("busy", &env), 1)
        .await
        .unwrap();
    env.gateway.wait_callbacks(2).await;
    for (function, at_least, below) in [("limited", 1900, 4500), ("busy", 2000, 6000)] {
        let gaps = env.gateway.retry_gaps(function);
        assert_eq!(gaps.len(), 1, "{function}");
        assert_gap(gaps[0], at_least, below, function);
    }
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn annotations_override_attempts_and_codes() {
    let env = Env::start().await;
    env.gateway.script("teapot", vec![Step::status(418)]);
    env.gateway.script("unavailable", vec![Step::status(503)]);
    // The worker would wait 3s before a retry; the function's annotations say 100ms.
    let worker = env
        .worker(&[
            ("max_retry_attempts", "5"),
            ("initial_retry_wait", "3s"),
            ("max_retry_wait", "3s"),
        ])
        .await;
    let annotated = |function: &str| Submission {
        annotations: vec![
            ("com.openfaas.retry.attempts".into(), "2".into()),
            ("com.openfaas.retry.codes".into(), "418".into()),
            ("com.openfaas.retry.min_wait".into(), "100ms".into()),
            ("com.openfaas.retry.max_wait".into(), "100ms".into()),
        ],
        ..job(function, &env)
    };
    // 418 is not a worker code, but the function's: retried, twice in all.
    publish(&env.config(&[]), &annotated("teapot"), 1)
        .await
        .unwrap();
    // 503 is a worker code, but not the function's: final at once.
    publish(&env.config(&[]), &annotated("unavailable"), 1)
        .await
        .unwrap();
    env.gateway.wait_callbacks(2).await;
    env.wait_drained(Duration::from_secs(5)).await;
    assert_eq!(env.gateway.calls_to("teapot"), 2);
    // 100ms from the annotations, not the worker's 3s.
    assert_gap(env.gateway.retry_gaps("teapot")[0], 100, 2500, "teapot");
    assert_eq!(env.gateway.calls_to("unavailable"), 1);
    let teapot = env.gateway.callback_for("teapot");
    assert_eq!(teapot.header("x-retry"), "2");
    assert_eq!(teapot.header("x-retry-max"), "2");
    let unavailable = env.gateway.callback_for("unavailable");
    assert_eq!(unavailable.header("x-function-status"), "503");
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].function, "teapot");
    assert_eq!(dead[0].attempts, 2);
    assert_eq!(dead[0].last_status, "418");
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn an_invalid_annotation_falls_back_to_the_worker_setting() {
    let env = Env::start().await;
    env.gateway.script("down", vec![Step::status(503)]);
    let worker = env
        .worker(&[
            ("max_retry_attempts", "2"),
            ("initial_retry_wait", "100ms"),
            ("max_retry_wait", "100ms"),
        ])
        .await;
    let sub = Submission {
        annotations: vec![
            ("com.openfaas.retry.attempts".into(), "lots".into()),
            ("com.openfaas.retry.codes".into(), "503".into()),
        ],
        ..job("down", &env)
    };
    publish(&env.config(&[]), &sub, 1).await.unwrap();
    env.gateway.wait_callbacks(1).await;
    assert_eq!(env.gateway.calls().len(), 2, "max_retry_attempts applies");
    assert_eq!(env.gateway.callbacks()[0].header("x-retry-max"), "2");
    wait_metric(&worker, r#"queue_worker_invalid_annotations_total{annotation="com.openfaas.retry.attempts",function_name="down.openfaas-fn",queue_name="faas-request"} 2"#).await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn an_unreachable_function_is_retried() {
    let env = Env::start().await;
    // A gateway URL nobody listens on: connection refused.
    let port = queue_worker::dev::natsd::free_port().unwrap();
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
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].last_status, "error");
    assert!(
        dead[0].error.contains("gave up after 2 attempts"),
        "{}",
        dead[0].error
    );
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

#[tokio::test]
async fn a_delivery_that_never_reached_the_function_still_gets_its_call() {
    let env = Env::start().await;
    let config = env.config(&[("max_retry_attempts", "1")]);
    publish(&config, &job("once", &env), 1).await.unwrap();
    // Someone takes the message from the shared consumer and hands it back unrun (as a
    // worker does at a reconnect or a drain): its delivery count is now 1 with no call.
    let js = env.js().await;
    queue_worker::nats::stream::ensure_consumer(
        &js,
        &queue_worker::nats::stream::Layout::of(&config),
    )
    .await
    .unwrap();
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream("OF_faas-request")
        .await
        .unwrap()
        .get_consumer("faas-workers")
        .await
        .unwrap();
    let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
    let msg = futures_util::StreamExt::next(&mut batch)
        .await
        .unwrap()
        .unwrap();
    msg.ack_with(async_nats::jetstream::AckKind::Nak(None))
        .await
        .unwrap();

    let worker = env.worker(&[("max_retry_attempts", "1")]).await;
    let cb = {
        env.gateway.wait_callbacks(1).await;
        env.gateway.callbacks()[0].clone()
    };
    assert_eq!(env.gateway.calls().len(), 1, "the one allowed call happens");
    assert_eq!(cb.header("x-function-status"), "200");
    assert_eq!(cb.header("x-retry"), "1");
    assert_eq!(cb.header("x-retry-max"), "1");
    env.wait_drained(Duration::from_secs(5)).await;
    env.wait_dead_letters(0).await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn an_invalid_annotation_is_logged_once_naming_function_and_annotation() {
    let env = Env::start().await;
    let port = queue_worker::dev::natsd::free_port().unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
        .env_clear()
        .env("nats_url", env.nats.url())
        .env("gateway_url", env.gateway.url())
        .env("metrics_port", port.to_string())
        .env("log_encoding", "json")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ready = format!("http://127.0.0.1:{port}/readyz");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !reqwest::get(&ready)
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(std::time::Instant::now() < deadline, "worker not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sub = Submission {
        annotations: vec![("com.openfaas.retry.attempts".into(), "lots".into())],
        ..job("tagged", &env)
    };
    publish(&env.config(&[]), &sub, 3).await.unwrap();
    env.gateway.wait_callbacks(3).await;

    let pid = child.id().unwrap().to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    let warnings: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("Invalid retry annotation"))
        })
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "once per value, not per message: {warnings:?}"
    );
    let w = &warnings[0];
    assert_eq!(w["level"], "WARN");
    assert_eq!(w["function"], "tagged");
    assert_eq!(w["annotation"], "com.openfaas.retry.attempts");
    assert_eq!(w["value"], "lots");
}
