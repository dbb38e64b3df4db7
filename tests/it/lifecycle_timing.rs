//! Issue 18, call lifecycle by time: delayed start (`X-Not-Before` through the front door,
//! `publish --not-before`, a message's header) and the maximum age (`max_call_age`,
//! `com.openfaas.queue.max_age`), against a real nats-server.
//!
//! Start times are checked on the wall clock: the function receives the stored
//! `X-Not-Before` (RFC 3339) with the call, and the fake records when each call arrived.

use std::sync::LazyLock;
use std::time::{Duration, Instant, SystemTime};

use queue_worker::message::not_before;
use queue_worker::message::publish::{publish, Submission};

use crate::support::{cli, job, publish_raw, stream_messages, wait_metric, Env, Recorded, Step};

/// How late after its start time a delayed call may begin.
const ON_TIME: Duration = Duration::from_millis(100);

/// One reading of both clocks, to put the fake's monotonic call times on the wall clock.
static ANCHOR: LazyLock<(SystemTime, Instant)> =
    LazyLock::new(|| (SystemTime::now(), Instant::now()));

/// When `call` arrived, on the wall clock.
fn arrived(call: &Recorded) -> SystemTime {
    let (wall, mono) = *ANCHOR;
    match call.started.checked_duration_since(mono) {
        Some(after) => wall + after,
        None => wall - mono.duration_since(call.started),
    }
}

/// The start time the call carried (the stored header).
fn start_of(call: &Recorded) -> SystemTime {
    let v = call.header("x-not-before");
    not_before::parse_stored(&v, SystemTime::now())
        .unwrap_or_else(|e| panic!("the call carries its start time: {e}"))
}

/// The call began at its start time: not before, and within [`ON_TIME`] after.
fn assert_on_time(call: &Recorded, what: &str) {
    let start = start_of(call);
    let late = arrived(call)
        .duration_since(start)
        .unwrap_or_else(|e| panic!("{what}: called {:?} before its start time", e.duration()));
    eprintln!("{what}: started {late:?} after its start time");
    assert!(
        late < ON_TIME,
        "{what}: called {late:?} after its start time"
    );
}

fn calls_of(env: &Env, function: &str) -> Vec<Recorded> {
    let path = format!("/function/{function}");
    env.gateway
        .calls()
        .into_iter()
        .filter(|c| c.path == path)
        .collect()
}

/// A job for `function` that starts `delay` from now.
fn delayed(function: &str, env: &Env, delay: Duration) -> (Submission, SystemTime) {
    let start = SystemTime::now() + delay;
    let sub = Submission {
        headers: vec![(not_before::HEADER.into(), not_before::format(start))],
        ..job(function, env)
    };
    (sub, start)
}

fn door_url(door: &queue_worker::frontdoor::Running, function: &str) -> String {
    format!("http://{}/async-function/{function}", door.addr)
}

#[tokio::test]
async fn a_delayed_call_through_the_front_door_starts_on_time_once() {
    let env = Env::start().await;
    let door = env.frontdoor(&[]).await;
    let worker = env.worker(&[]).await;
    let client = reqwest::Client::new();

    // A delay in seconds, counted from the front door's receipt ...
    let sent = SystemTime::now();
    let r = client
        .post(door_url(&door, "in-seconds"))
        .header("X-Not-Before", "1.5")
        .body("a")
        .send()
        .await
        .unwrap();
    let answered = SystemTime::now();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    // ... and an RFC 3339 time with an offset.
    let plus_two = time::UtcOffset::from_hms(2, 0, 0).unwrap();
    let at = time::OffsetDateTime::now_utc().to_offset(plus_two) + Duration::from_millis(1500);
    let rfc = at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let r = client
        .post(door_url(&door, "at-time"))
        .header("X-Not-Before", &rfc)
        .body("b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);

    env.gateway
        .wait_for("both delayed calls", Duration::from_secs(10), |g| {
            g.calls().len() == 2
        })
        .await;
    let seconds = &calls_of(&env, "in-seconds")[0];
    let start = start_of(seconds);
    assert!(
        start >= sent + Duration::from_millis(1500)
            && start <= answered + Duration::from_millis(1500),
        "stored as receipt + 1.5 s"
    );
    assert_on_time(seconds, "X-Not-Before: 1.5");
    let timed = &calls_of(&env, "at-time")[0];
    assert_eq!(
        start_of(timed),
        SystemTime::from(at),
        "stored as the same instant"
    );
    assert!(
        timed.header("x-not-before").ends_with('Z'),
        "stored in UTC: {}",
        timed.header("x-not-before")
    );
    assert_on_time(timed, "X-Not-Before: RFC 3339");

    // Each ran exactly once, and was handed back once before its time.
    env.wait_drained(Duration::from_secs(5)).await;
    assert_eq!(env.gateway.calls().len(), 2);
    for f in ["in-seconds", "at-time"] {
        wait_metric(
            &worker,
            &format!(r#"queue_worker_calls_deferred_total{{function_name="{f}.openfaas-fn",queue_name="faas-request"}} 1"#),
        )
        .await;
    }
    door.shutdown();
    door.wait().await.unwrap();
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn a_delayed_call_is_retried_and_its_attempts_count_from_its_start() {
    let env = Env::start().await;
    env.gateway.script(
        "flaky",
        vec![Step::status(503), Step::status(200).body("ok")],
    );
    env.gateway
        .script("down", vec![Step::status(503).body("down")]);
    let worker = env
        .worker(&[
            ("initial_retry_wait", "100ms"),
            ("max_retry_wait", "200ms"),
            ("max_retry_attempts", "2"),
        ])
        .await;
    let config = env.config(&[]);
    for f in ["flaky", "down"] {
        let (sub, _) = delayed(f, &env, Duration::from_millis(1200));
        publish(&config, &sub, 1).await.unwrap();
    }
    env.gateway.wait_callbacks(2).await;
    env.wait_drained(Duration::from_secs(5)).await;

    // 503 then 200: two calls, the first on time, the second after the backoff.
    let flaky = calls_of(&env, "flaky");
    assert_eq!(flaky.len(), 2);
    assert_on_time(&flaky[0], "flaky's first call");
    let cb = env.gateway.callback_for("flaky");
    assert_eq!(cb.header("x-function-status"), "200");
    assert_eq!(cb.header("x-retry"), "2", "the deferral is not an attempt");
    assert_eq!(&cb.body[..], b"ok");

    // Max attempts 2, failing every time: exactly 2 calls, then the dead-letter stream.
    let down = calls_of(&env, "down");
    assert_eq!(down.len(), 2, "both allowed attempts were calls");
    assert_on_time(&down[0], "down's first call");
    let cb = env.gateway.callback_for("down");
    assert_eq!(cb.header("x-function-status"), "503");
    assert_eq!(cb.header("x-retry"), "2");
    assert_eq!(cb.header("x-retry-max"), "2");
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].reason, "attempts_exhausted");
    assert_eq!(dead[0].attempts, 2);
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn publish_not_before_delays_the_call() {
    let env = Env::start().await;
    let worker = env.worker(&[]).await;
    let url = env.nats.url();
    let (code, out, err) = cli(&url, &["publish", "later", "--not-before", "1.5"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    // The header form is stored the same way (RFC 3339).
    let (code, out, err) = cli(&url, &["publish", "header", "-H", "X-Not-Before: 1"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    env.gateway
        .wait_for("the delayed calls", Duration::from_secs(10), |g| {
            g.calls().len() == 2
        })
        .await;
    assert_on_time(&calls_of(&env, "later")[0], "publish --not-before 1.5");
    assert_on_time(&calls_of(&env, "header")[0], "publish -H 'X-Not-Before: 1'");

    // Refused before anything is published: usage errors name the option and the forms.
    for args in [
        &["publish", "x", "--not-before", "soon"][..],
        &["publish", "x", "--not-before=-3"][..],
        &["publish", "x", "--not-before", "9999999"][..],
    ] {
        let (code, _, err) = cli(&url, args).await;
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains("X-Not-Before") && err.contains("RFC 3339"),
            "{err}"
        );
    }
    let (code, _, err) = cli(
        &url,
        &["publish", "x", "--not-before", "1", "-H", "X-Not-Before: 2"],
    )
    .await;
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("once"), "{err}");
    env.wait_drained(Duration::from_secs(5)).await;
    assert_eq!(env.gateway.calls().len(), 2, "nothing else was published");
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn a_bad_x_not_before_is_refused_naming_the_header_and_nothing_is_queued() {
    let env = Env::start().await;
    let door = env.frontdoor(&[]).await;
    let client = reqwest::Client::new();
    let week_and_a_day = (SystemTime::now() + Duration::from_secs(8 * 24 * 3600))
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    let far = not_before::format(SystemTime::UNIX_EPOCH + week_and_a_day);
    for bad in [
        "tomorrow",
        "-1",
        "1e3",
        "NaN",
        "700000",
        "30s",
        far.as_str(),
    ] {
        let r = client
            .post(door_url(&door, "f"))
            .header("X-Not-Before", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let text = r.text().await.unwrap();
        assert!(
            text.contains("X-Not-Before") && text.contains("RFC 3339") && text.contains("7 days"),
            "{bad}: {text}"
        );
    }
    let r = client
        .post(door_url(&door, "f"))
        .header("X-Not-Before", "1")
        .header("X-Not-Before", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("more than once"));
    let js = env.js().await;
    assert!(stream_messages(&js, "OF_faas-request").await.is_empty());
    door.shutdown();
    door.wait().await.unwrap();
}

#[tokio::test]
async fn a_malformed_start_time_in_a_message_is_ignored_not_dead_lettered() {
    let env = Env::start().await;
    let worker = env.worker(&[]).await;
    let js = env.js().await;
    publish_raw(
        &js,
        "faas-request.odd.openfaas-fn",
        br#"{"Function":"odd","Header":{"X-Not-Before":["whenever"]}}"#.to_vec(),
    )
    .await;
    // The seconds form in a message counts from its publication (what the OpenFaaS gateway
    // stores for a client that sent a delay).
    publish_raw(
        &js,
        "faas-request.relative.openfaas-fn",
        br#"{"Function":"relative","Header":{"X-Not-Before":["1"]}}"#.to_vec(),
    )
    .await;
    let published = SystemTime::now();
    env.gateway
        .wait_for("both calls", Duration::from_secs(10), |g| {
            g.calls().len() == 2
        })
        .await;
    let relative = &calls_of(&env, "relative")[0];
    let waited = arrived(relative)
        .duration_since(published)
        .unwrap_or_default();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(1) + ON_TIME,
        "started {waited:?} after its publication"
    );
    wait_metric(&worker, r#"queue_worker_invalid_annotations_total{annotation="X-Not-Before",function_name="odd.openfaas-fn",queue_name="faas-request"} 1"#).await;
    env.wait_drained(Duration::from_secs(5)).await;
    assert!(env
        .dead_letters()
        .await
        .list(&Default::default(), false)
        .await
        .map(|d| d.is_empty())
        .unwrap_or(true));
    crate::support::stop(worker).await;
}

/// Publishes `subs`, waits until they are older than `age`, then starts a worker.
async fn publish_and_let_age(
    env: &Env,
    subs: &[Submission],
    age: Duration,
    settings: &[(&str, &str)],
) -> queue_worker::worker::Running {
    for sub in subs {
        publish(&env.config(&[]), sub, 1).await.unwrap();
    }
    // Nothing to wait on but time: no worker runs yet.
    tokio::time::sleep(age).await;
    env.worker(settings).await
}

/// The failure callback of an expired call: 410 (not run), the usual headers, the reason.
fn assert_expired_callback(cb: &Recorded, function: &str, retry: &str, retry_max: &str) {
    assert_eq!(cb.header("x-function-status"), "410");
    assert_eq!(cb.header("x-function-name"), function);
    assert_eq!(cb.header("x-retry"), retry, "calls made before it expired");
    assert_eq!(cb.header("x-retry-max"), retry_max);
    assert!(!cb.header("x-call-id").is_empty());
    assert!(!cb.header("x-start-time").is_empty());
    assert!(cb.header("content-type").starts_with("text/plain"));
    let body = String::from_utf8_lossy(&cb.body);
    assert!(body.starts_with("expired:"), "{body}");
}

#[tokio::test]
async fn a_call_queued_past_max_call_age_is_dead_lettered_as_expired_not_run() {
    let env = Env::start().await;
    let worker = publish_and_let_age(
        &env,
        &[job("stale", &env)],
        Duration::from_millis(1200),
        &[("max_call_age", "1s")],
    )
    .await;
    env.gateway.wait_callbacks(1).await;
    assert_eq!(
        env.gateway.calls_to("stale"),
        0,
        "an expired call is not run"
    );
    assert_expired_callback(&env.gateway.callback_for("stale"), "stale", "0", "100");
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].reason, "expired");
    assert_eq!(dead[0].function, "stale");
    assert_eq!(dead[0].attempts, 0);
    assert_eq!(dead[0].last_status, "", "never called");
    assert!(
        dead[0].error.contains("maximum age of 1s"),
        "{}",
        dead[0].error
    );
    wait_metric(&worker, r#"queue_worker_calls_expired_total{function_name="stale.openfaas-fn",queue_name="faas-request"} 1"#).await;
    wait_metric(&worker, r#"queue_worker_dead_lettered_total{function_name="stale.openfaas-fn",queue_name="faas-request",reason="expired"} 1"#).await;

    // A fresh call runs; a delayed one's age counts from its start time, so a start 1.5 s
    // ahead is not expired by a 1 s maximum age.
    publish(&env.config(&[]), &job("fresh", &env), 1)
        .await
        .unwrap();
    let (sub, _) = delayed("patient", &env, Duration::from_millis(1500));
    publish(&env.config(&[]), &sub, 1).await.unwrap();
    env.gateway.wait_callbacks(3).await;
    assert_eq!(env.gateway.calls_to("fresh"), 1);
    assert_eq!(env.gateway.calls_to("patient"), 1);
    assert_eq!(
        env.gateway
            .callback_for("patient")
            .header("x-function-status"),
        "200"
    );
    env.wait_drained(Duration::from_secs(5)).await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn the_max_age_annotation_overrides_the_setting() {
    let env = Env::start().await;
    let annotated = |function: &str, age: &str| Submission {
        annotations: vec![("com.openfaas.queue.max_age".into(), age.into())],
        ..job(function, &env)
    };
    let worker = publish_and_let_age(
        &env,
        &[
            annotated("short", "500ms"),
            annotated("bad", "soon"),
            job("plain", &env),
        ],
        Duration::from_millis(800),
        &[("max_call_age", "1h")],
    )
    .await;
    env.gateway.wait_callbacks(3).await;
    assert_eq!(env.gateway.calls_to("short"), 0, "its own 500ms applies");
    assert_expired_callback(&env.gateway.callback_for("short"), "short", "0", "100");
    assert_eq!(env.gateway.calls_to("plain"), 1, "the setting's 1h applies");
    assert_eq!(
        env.gateway.calls_to("bad"),
        1,
        "an invalid annotation: the setting"
    );
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(
        (dead[0].function.as_str(), dead[0].reason.as_str()),
        ("short", "expired")
    );
    wait_metric(&worker, r#"queue_worker_invalid_annotations_total{annotation="com.openfaas.queue.max_age",function_name="bad.openfaas-fn",queue_name="faas-request"} 1"#).await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn a_retry_that_waits_past_the_max_age_expires_instead_of_running() {
    let env = Env::start().await;
    env.gateway.script("slow-retry", vec![Step::status(503)]);
    let worker = env
        .worker(&[
            ("max_call_age", "1500ms"),
            ("initial_retry_wait", "2s"),
            ("max_retry_wait", "2s"),
            ("max_retry_attempts", "5"),
        ])
        .await;
    publish(&env.config(&[]), &job("slow-retry", &env), 1)
        .await
        .unwrap();
    env.gateway.wait_callbacks(1).await;
    assert_eq!(
        env.gateway.calls_to("slow-retry"),
        1,
        "the retry was not called"
    );
    assert_expired_callback(
        &env.gateway.callback_for("slow-retry"),
        "slow-retry",
        "1",
        "5",
    );
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].reason, "expired");
    assert_eq!(dead[0].attempts, 1);
    env.wait_drained(Duration::from_secs(5)).await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn function_mode_starts_a_delayed_call_on_time() {
    let env = Env::start().await;
    let worker = env.worker(&crate::function_mode::with(&[])).await;
    // Long enough for the empty pulls' backoff to reach 1.6 s while the call waits.
    let (sub, _) = delayed("later", &env, Duration::from_millis(2500));
    publish(&env.config(&[]), &sub, 1).await.unwrap();
    env.gateway.wait_callbacks(1).await;
    let calls = calls_of(&env, "later");
    assert_eq!(calls.len(), 1);
    assert_on_time(&calls[0], "function mode");
    crate::support::stop(worker).await;
}
