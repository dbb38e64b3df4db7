//! A call's life by its id: cancel (`DELETE /async-function/<id>`, `queue-worker call
//! cancel`) and status (`GET /async-function/<id>`, `queue-worker call status`), on the real
//! stack: nats-server, worker replicas, front doors and the fake gateway.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{cli, scrape, wait_metric, Env, Step};

fn url(door: &queue_worker::frontdoor::Running, path: &str) -> String {
    format!("http://{}{path}", door.addr)
}

/// POSTs a call of `function` with a callback tagged `tag`; returns its call id.
async fn post(
    door: &queue_worker::frontdoor::Running,
    env: &Env,
    function: &str,
    tag: &str,
) -> String {
    let r = reqwest::Client::new()
        .post(url(door, &format!("/async-function/{function}")))
        .header("X-Callback-Url", env.gateway.callback_url(tag))
        .body("job")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    r.headers()["x-call-id"].to_str().unwrap().to_string()
}

async fn delete(door: &queue_worker::frontdoor::Running, id: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .delete(url(door, &format!("/async-function/{id}")))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (
        status,
        serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null),
    )
}

async fn get(door: &queue_worker::frontdoor::Running, id: &str) -> (u16, Value) {
    let r = reqwest::get(url(door, &format!("/async-function/{id}")))
        .await
        .unwrap();
    let status = r.status().as_u16();
    (
        status,
        serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null),
    )
}

/// Polls the call's status until `pred` holds; returns the record.
async fn wait_state(
    door: &queue_worker::frontdoor::Running,
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get(door, id).await;
        if status == 200 && pred(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last answer {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn state(v: &Value) -> &str {
    v["state"].as_str().unwrap_or_default()
}

/// Cancelled while queued (no worker yet, `call_status` off): once a worker starts, the call
/// is settled without a call, its callback says so, and the queue is empty.
#[tokio::test]
async fn a_call_cancelled_before_it_starts_is_never_called() {
    let env = Env::start().await;
    let door = env.frontdoor(&[]).await;
    let cancelled = post(&door, &env, "sleep", "cancelled").await;
    let kept = post(&door, &env, "sleep", "kept").await;
    let (status, body) = delete(&door, &cancelled).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["result"], "accepted");

    let worker = env.worker(&[]).await;
    env.gateway.wait_callbacks(2).await;
    let calls: Vec<String> = env.gateway.calls().iter().map(|c| c.call_id()).collect();
    assert_eq!(
        calls,
        vec![kept.clone()],
        "only the call not cancelled runs"
    );
    let cb = env.gateway.callback_for("cancelled");
    assert_eq!(cb.header("x-call-status"), "cancelled");
    assert_eq!(cb.header("x-function-status"), "499");
    assert_eq!(cb.header("x-call-id"), cancelled);
    let ok = env.gateway.callback_for("kept");
    assert_eq!(ok.header("x-function-status"), "200");
    assert_eq!(ok.header("x-call-status"), "");
    env.wait_drained(Duration::from_secs(10)).await;
    wait_metric(
        &worker,
        r#"queue_worker_calls_cancelled_total{function_name="sleep.openfaas-fn",queue_name="faas-request",stage="queued"} 1"#,
    )
    .await;
    crate::support::stop(worker).await;
}

/// Cancelled during a 10 s call: the request is dropped within about a second, the message
/// is settled and not retried, the callback says cancelled, and the status says so too.
#[tokio::test]
async fn a_running_call_is_dropped_within_a_second_and_not_retried() {
    let env = Env::start().await;
    env.gateway.script(
        "slow",
        vec![Step::status(200).delay(Duration::from_secs(10))],
    );
    let on = [("call_status", "true")];
    let door = env.frontdoor(&on).await;
    let worker = env.worker(&on).await;
    let id = post(&door, &env, "slow", "slow").await;
    env.gateway
        .wait_for("the call to start", Duration::from_secs(10), |g| {
            g.running() == 1
        })
        .await;
    wait_state(&door, &id, "running", |v| state(v) == "running").await;

    let asked = Instant::now();
    let (status, body) = delete(&door, &id).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["state"], "running");
    env.gateway.wait_callbacks(1).await;
    let took = asked.elapsed();
    assert!(took < Duration::from_millis(1500), "dropped after {took:?}");
    let cb = env.gateway.callback_for("slow");
    assert_eq!(cb.header("x-call-status"), "cancelled");
    // The worker no longer counts it as running.
    wait_metric(
        &worker,
        r#"queue_worker_function_invocation_inflight{function_name="slow.openfaas-fn",queue_name="faas-request"} 0"#,
    )
    .await;
    let record = wait_state(&door, &id, "cancelled", |v| state(v) == "cancelled").await;
    assert_eq!(record["reason"], "running", "{record}");
    // Settled, not retried: the queue empties and no second call comes (initial_retry_wait
    // is 1 s in these tests).
    env.wait_drained(Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(env.gateway.calls_to("slow"), 1);
    assert!(scrape(&worker).await.contains(
        r#"queue_worker_calls_cancelled_total{function_name="slow.openfaas-fn",queue_name="faas-request",stage="running"} 1"#
    ));
    // A second cancel of a cancelled call is accepted again (idempotent).
    assert_eq!(delete(&door, &id).await.0, 202);
    crate::support::stop(worker).await;
}

/// Two worker replicas and two front doors: a call queued through one door and running on
/// either replica is cancelled through the other door; another through the CLI.
#[tokio::test]
async fn a_cancel_reaches_the_replica_that_runs_the_call() {
    let env = Env::start().await;
    env.gateway.script(
        "slow",
        vec![Step::status(200).delay(Duration::from_secs(10))],
    );
    let on = [("call_status", "true"), ("max_inflight", "1")];
    let door_a = env.frontdoor(&on).await;
    let door_b = env.frontdoor(&on).await;
    let one = env.worker(&on).await;
    let two = env.worker(&on).await;
    let first = post(&door_a, &env, "slow", "first").await;
    let second = post(&door_a, &env, "slow", "second").await;
    // One call per replica (max_inflight 1 each).
    env.gateway
        .wait_for("both calls to start", Duration::from_secs(10), |g| {
            g.running() == 2
        })
        .await;

    let asked = Instant::now();
    let (status, body) = delete(&door_b, &first).await;
    assert_eq!(status, 202, "{body}");
    env.gateway.wait_callbacks(1).await;
    assert!(asked.elapsed() < Duration::from_millis(1500));
    assert_eq!(
        env.gateway.callback_for("first").header("x-call-status"),
        "cancelled"
    );

    // `running` is recorded once a call has run 100 ms.
    wait_state(&door_b, &second, "running", |v| state(v) == "running").await;
    let asked = Instant::now();
    let (code, out, err) = cli(&env.nats.url(), &["call", "cancel", &second]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    // The CLI runs without call_status of its own; the workers' record tells it the state.
    assert!(out.contains("(last recorded running"), "{out}");
    env.gateway.wait_callbacks(2).await;
    assert!(asked.elapsed() < Duration::from_secs(3));
    assert_eq!(
        env.gateway.callback_for("second").header("x-call-status"),
        "cancelled"
    );
    assert_eq!(env.gateway.calls_to("slow"), 2);
    env.wait_drained(Duration::from_secs(5)).await;
    let cancelled_on = |text: String| text.contains("stage=\"running\"} 1");
    assert!(
        cancelled_on(scrape(&one).await) && cancelled_on(scrape(&two).await),
        "each replica dropped the call it ran"
    );
    crate::support::stop(one).await;
    crate::support::stop(two).await;
}

/// 404 for an unknown id, 409 once the call ended; the CLI's exit codes say the same.
#[tokio::test]
async fn unknown_ids_are_404_and_finished_calls_409() {
    let env = Env::start().await;
    let on = [("call_status", "true")];
    let door = env.frontdoor(&on).await;
    let worker = env.worker(&on).await;
    let (status, body) = delete(&door, "no-such-call").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(get(&door, "no-such-call").await.0, 404);

    let id = post(&door, &env, "quick", "quick").await;
    env.gateway.wait_callbacks(1).await;
    let done = wait_state(&door, &id, "succeeded", |v| state(v) == "succeeded").await;
    assert_eq!(done["status"], 200, "{done}");
    let (status, body) = delete(&door, &id).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["state"], "succeeded");

    let nats = env.nats.url();
    let (code, out) = call_cli(&nats, &["call", "cancel", &id]).await;
    assert_eq!(code, Some(6), "{out}");
    assert!(out.contains("already ended: succeeded"), "{out}");
    let (code, out) = call_cli(&nats, &["call", "cancel", "no-such-call"]).await;
    assert_eq!(code, Some(5), "{out}");
    let (code, out) = call_cli(&nats, &["call", "status", &id]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("succeeded") && out.contains("quick.openfaas-fn"),
        "{out}"
    );
    let (code, out) = call_cli(&nats, &["call", "status", &id, "--json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["state"], "succeeded");
    let (code, _) = call_cli(&nats, &["call", "status", "no-such-call"]).await;
    assert_eq!(code, Some(5));
    // Without call_status the front door says status is off.
    let off = env.frontdoor(&[]).await;
    assert_eq!(get(&off, &id).await.0, 501);
    crate::support::stop(worker).await;
}

/// The binary with `call_status` on; (exit code, stdout then stderr).
async fn call_cli(nats: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
        .env_clear()
        .env("nats_url", nats)
        .env("call_status", "true")
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The status through each state: queued, running, waiting (attempt, next attempt),
/// running again, succeeded (status, duration); and failed with its reason.
#[tokio::test]
async fn status_follows_a_call_through_each_state() {
    let env = Env::start().await;
    env.gateway.script(
        "flaky",
        vec![
            Step::status(503).delay(Duration::from_millis(600)),
            Step::status(200).delay(Duration::from_millis(600)),
        ],
    );
    env.gateway.script("broken", vec![Step::status(500)]);
    let on = [("call_status", "true"), ("max_retry_attempts", "2")];
    let door = env.frontdoor(&on).await;
    let id = post(&door, &env, "flaky", "flaky").await;
    let failing = post(&door, &env, "broken", "broken").await;
    let queued = wait_state(&door, &id, "queued", |v| state(v) == "queued").await;
    assert_eq!(queued["function"], "flaky.openfaas-fn");
    assert!(queued["seq"].as_u64().is_some(), "{queued}");

    let worker = env.worker(&on).await;
    let running = wait_state(&door, &id, "running", |v| state(v) == "running").await;
    assert_eq!(running["attempt"], 1, "{running}");
    assert!(running["started_at"].is_string(), "{running}");
    let waiting = wait_state(&door, &id, "waiting", |v| state(v) == "waiting").await;
    assert_eq!(waiting["attempt"], 1, "{waiting}");
    assert_eq!(waiting["status"], 503, "{waiting}");
    let next = time::OffsetDateTime::parse(
        waiting["next_attempt_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let updated = time::OffsetDateTime::parse(
        waiting["updated_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let wait = next - updated;
    assert!(
        wait >= time::Duration::milliseconds(400) && wait <= time::Duration::seconds(2),
        "next attempt {wait} after the failure"
    );
    let again = wait_state(&door, &id, "running again", |v| {
        state(v) == "running" && v["attempt"] == 2
    })
    .await;
    // The front door's queued_at is its own clock at the publish; the worker's is the
    // stream's timestamp of the message: the same moment within milliseconds.
    let at = |v: &Value| {
        time::OffsetDateTime::parse(
            v["queued_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert!((at(&again) - at(&queued)).abs() < time::Duration::milliseconds(500));
    let done = wait_state(&door, &id, "succeeded", |v| state(v) == "succeeded").await;
    assert_eq!(done["status"], 200, "{done}");
    assert_eq!(done["attempt"], 2, "{done}");
    let took = done["duration_seconds"].as_f64().unwrap();
    assert!((0.5..3.0).contains(&took), "{done}");
    assert!(done["finished_at"].is_string(), "{done}");

    let failed = wait_state(&door, &failing, "failed", |v| state(v) == "failed").await;
    assert_eq!(failed["reason"], "attempts_exhausted", "{failed}");
    assert_eq!(failed["status"], 500, "{failed}");
    // flaky (600 ms calls): running, waiting, running, succeeded; broken (answers at once,
    // before the 100 ms after which `running` is written): waiting, failed.
    wait_metric(
        &worker,
        r#"queue_worker_call_status_writes_total{queue_name="faas-request",result="ok"} 6"#,
    )
    .await;
    crate::support::stop(worker).await;
}

/// A DELETE or GET invocation is sent as a POST with X-HTTP-Method-Override; the function
/// sees the method asked for.
#[tokio::test]
async fn a_method_override_queues_a_delete_invocation() {
    let env = Env::start().await;
    let door = env.frontdoor(&[]).await;
    let worker = env.worker(&[]).await;
    let r = reqwest::Client::new()
        .post(url(&door, "/async-function/things/item/7"))
        .header("X-HTTP-Method-Override", "delete")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    env.gateway
        .wait_for("the call", Duration::from_secs(10), |g| {
            g.calls_to("things") == 1
        })
        .await;
    let call = env.gateway.calls().pop().unwrap();
    assert_eq!(call.method, reqwest::Method::DELETE);
    assert_eq!(call.path, "/function/things/item/7");
    assert_eq!(call.header("x-http-method-override"), "");
    let bad = reqwest::Client::new()
        .post(url(&door, "/async-function/things"))
        .header("X-HTTP-Method-Override", "NOT A METHOD")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    // The command line's way.
    let (code, out, err) = cli(&env.nats.url(), &["publish", "things", "--method", "get"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    env.gateway
        .wait_for("the second call", Duration::from_secs(10), |g| {
            g.calls_to("things") == 2
        })
        .await;
    assert_eq!(
        env.gateway.calls().pop().unwrap().method,
        reqwest::Method::GET
    );
    crate::support::stop(worker).await;
}

/// A delayed call shows its start time while queued, and can be cancelled before it: it is
/// never called, whatever its time. A call queued past its maximum age shows `expired`, and
/// its callback says so.
#[tokio::test]
async fn delayed_and_expired_calls_in_status_and_cancel() {
    let env = Env::start().await;
    let on = [("call_status", "true"), ("max_call_age", "1s")];
    let door = env.frontdoor(&on).await;
    let r = reqwest::Client::new()
        .post(url(&door, "/async-function/later"))
        .header("X-Not-Before", "30")
        .header("X-Callback-Url", env.gateway.callback_url("later"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let later = r.headers()["x-call-id"].to_str().unwrap().to_string();
    let queued = wait_state(&door, &later, "queued", |v| state(v) == "queued").await;
    let at = |v: &Value, field: &str| {
        time::OffsetDateTime::parse(
            v[field].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    let ahead = at(&queued, "not_before") - at(&queued, "queued_at");
    assert!(
        ahead > time::Duration::seconds(29) && ahead < time::Duration::seconds(31),
        "{queued}"
    );
    let old = post(&door, &env, "stale", "stale").await;
    // Older than max_call_age by the time a worker sees it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, body) = delete(&door, &later).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["state"], "queued", "{body}");
    let worker = env.worker(&on).await;
    env.gateway.wait_callbacks(2).await;
    assert_eq!(env.gateway.calls().len(), 0, "neither call runs");
    assert_eq!(
        env.gateway.callback_for("later").header("x-call-status"),
        "cancelled"
    );
    let expired = env.gateway.callback_for("stale");
    assert_eq!(expired.header("x-call-status"), "expired");
    let record = wait_state(&door, &old, "expired", |v| state(v) == "expired").await;
    assert_eq!(record["reason"], "expired", "{record}");
    assert_eq!(delete(&door, &old).await.0, 409);
    let record = wait_state(&door, &later, "cancelled", |v| state(v) == "cancelled").await;
    assert_eq!(record["reason"], "queued", "{record}");
    crate::support::stop(worker).await;
}

/// With `call_status` on, a call put on the queue without a record (by `publish`, as the
/// OpenFaaS gateway does) is unknown to a cancel (404), but the cancel is kept: the call
/// never runs.
#[tokio::test]
async fn a_call_queued_without_a_record_is_cancelled_all_the_same() {
    let env = Env::start().await;
    let on = [("call_status", "true")];
    let door = env.frontdoor(&on).await;
    let mut sub = crate::support::job("plain", &env);
    sub.body = b"x".to_vec();
    let ids = queue_worker::message::publish::publish(&env.config(&[]), &sub, 1)
        .await
        .unwrap();
    let (status, body) = delete(&door, &ids[0]).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(get(&door, &ids[0]).await.0, 404);
    let worker = env.worker(&on).await;
    env.gateway.wait_callbacks(1).await;
    assert_eq!(env.gateway.calls_to("plain"), 0);
    assert_eq!(
        env.gateway.callback_for("plain").header("x-call-status"),
        "cancelled"
    );
    let record = wait_state(&door, &ids[0], "cancelled", |v| state(v) == "cancelled").await;
    assert_eq!(record["reason"], "queued", "{record}");
    crate::support::stop(worker).await;
}

/// A cancel applies to the calls stored before it: a caller that reuses the call id of a
/// cancelled call gets its new call run.
#[tokio::test]
async fn a_call_id_reused_after_its_cancel_runs() {
    let env = Env::start().await;
    let door = env.frontdoor(&[]).await;
    let send = |body: &'static str| {
        reqwest::Client::new()
            .post(url(&door, "/async-function/again"))
            .header("X-Call-Id", "reused-id-1")
            .header("X-Callback-Url", env.gateway.callback_url(body))
            .body(body)
            .send()
    };
    assert_eq!(send("first").await.unwrap().status(), 202);
    assert_eq!(delete(&door, "reused-id-1").await.0, 202);
    let worker = env.worker(&[]).await;
    env.gateway.wait_callbacks(1).await;
    assert_eq!(
        env.gateway.callback_for("first").header("x-call-status"),
        "cancelled"
    );
    assert_eq!(send("second").await.unwrap().status(), 202);
    env.gateway.wait_callbacks(2).await;
    assert_eq!(env.gateway.calls_to("again"), 1, "the new call runs");
    assert_eq!(
        env.gateway
            .callback_for("second")
            .header("x-function-status"),
        "200"
    );
    crate::support::stop(worker).await;
}
