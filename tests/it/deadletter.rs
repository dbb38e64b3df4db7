//! The dead-letter stream: give-ups and undecodable messages land there with their reason
//! before the original is terminated, the worker carries on, and `dead list / replay / purge`
//! work on what is there.

use std::time::Duration;

use queue_worker::message::function::FunctionName;
use queue_worker::message::publish::{publish, Submission};
use queue_worker::worker::deadletter::{Filter, Reason};

use crate::support::{job, publish_raw, wait_metric, Env, Step};

fn name(f: &str) -> FunctionName {
    FunctionName::parse(f, "openfaas-fn").unwrap()
}

const FAST_GIVE_UP: &[(&str, &str)] = &[
    ("initial_retry_wait", "100ms"),
    ("max_retry_wait", "200ms"),
    ("max_retry_attempts", "3"),
];

#[tokio::test]
async fn exhausted_attempts_give_up_with_a_final_callback_and_a_dead_letter() {
    let env = Env::start().await;
    env.gateway
        .script("down", vec![Step::status(502).body("bad gateway")]);
    let worker = env.worker(FAST_GIVE_UP).await;
    let sub = Submission {
        body: b"payload".to_vec(),
        ..job("down", &env)
    };
    publish(&env.config(&[]), &sub, 1).await.unwrap();
    env.gateway.wait_callbacks(1).await;
    env.wait_drained(Duration::from_secs(5)).await;
    let calls = env.gateway.calls();
    assert_eq!(calls.len(), 3, "max_retry_attempts counts calls");
    let cb = &env.gateway.callbacks()[0];
    assert_eq!(cb.header("x-function-status"), "502");
    assert_eq!(cb.header("x-retry"), "3");
    assert_eq!(cb.header("x-retry-max"), "3");
    assert_eq!(&cb.body[..], b"bad gateway");

    let dead = env.wait_dead_letters(1).await;
    let d = &dead[0];
    assert_eq!(d.function, "down");
    assert_eq!(d.reason, "attempts_exhausted");
    assert_eq!(d.attempts, 3);
    assert_eq!(d.last_status, "502");
    assert_eq!(d.call_id, calls[0].call_id());
    assert_eq!(d.original_subject, "faas-request.down.openfaas-fn");
    assert!(d.age() < Duration::from_secs(30));
    // The payload is the original message: it decodes to the same invocation.
    let original: queue_worker::message::request::QueueRequest =
        serde_json::from_slice(&d.payload).unwrap();
    assert_eq!(original.function, "down");
    assert_eq!(original.body, b"payload");

    // The original is gone from the work queue (terminated, not left to be redelivered).
    let stream = env.js().await.get_stream("OF_faas-request").await.unwrap();
    assert_eq!(stream.cached_info().state.messages, 0);
    wait_metric(&worker, r#"queue_worker_dead_lettered_total{function_name="down.openfaas-fn",queue_name="faas-request",reason="attempts_exhausted"} 1"#).await;
    wait_metric(&worker, r#"queue_worker_retries_total{function_name="down.openfaas-fn",queue_name="faas-request"} 2"#).await;
    wait_metric(
        &worker,
        r#"queue_worker_messages_processed_total{queue_name="faas-request"} 1"#,
    )
    .await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn undecodable_and_oversized_messages_are_dead_lettered_and_work_goes_on() {
    let env = Env::start().await;
    let worker = env.worker(&[("max_message_bytes", "2KiB")]).await;
    let js = env.js().await;
    let huge = format!(r#"{{"Function":"big","Body":"{}"}}"#, "QUFB".repeat(1024));
    let inputs: Vec<(&str, Vec<u8>, &str)> = vec![
        ("faas-request", b"this is not json".to_vec(), "malformed"),
        (
            "faas-request.x.y",
            vec![0xff, 0x00, 0x13, 0x37],
            "malformed",
        ),
        (
            "faas-request",
            br#"{"Function":"../../etc"}"#.to_vec(),
            "bad_function",
        ),
        (
            "faas-request",
            br#"{"Method":"POST"}"#.to_vec(),
            "missing_function",
        ),
        (
            "faas-request",
            br#"{"Function":"f","Path":"no-slash"}"#.to_vec(),
            "bad_url",
        ),
        ("faas-request", huge.clone().into_bytes(), "too_large"),
    ];
    for (subject, payload, _) in &inputs {
        publish_raw(&js, subject, payload.clone()).await;
    }
    publish(&env.config(&[]), &job("fine", &env), 1)
        .await
        .unwrap();
    env.gateway.wait_callbacks(1).await;
    env.wait_drained(Duration::from_secs(5)).await;
    assert_eq!(env.gateway.calls().len(), 1, "only the good message is run");

    let dead = env.wait_dead_letters(inputs.len()).await;
    for (subject, payload, reason) in &inputs {
        // Stored concurrently: find each input's entry by its payload, kept byte for byte.
        let d = dead
            .iter()
            .find(|d| d.payload[..] == payload[..])
            .unwrap_or_else(|| panic!("no dead letter for {reason} input"));
        assert_eq!(d.reason, *reason);
        assert_eq!(d.original_subject, *subject);
        assert_eq!(d.attempts, 1);
        assert_eq!(d.last_status, "", "never called");
        assert!(!d.error.is_empty());
        if *reason == "too_large" {
            assert!(d.error.contains("max_message_bytes"), "{}", d.error);
        }
    }
    wait_metric(&worker, r#"queue_worker_dead_lettered_total{function_name="_unknown",queue_name="faas-request",reason="malformed"} 2"#).await;
    wait_metric(
        &worker,
        r#"function_name="_unknown",queue_name="faas-request",reason="too_large"} 1"#,
    )
    .await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn replay_brings_a_job_back_and_it_runs() {
    let env = Env::start().await;
    env.gateway.script(
        "recovering",
        vec![
            Step::status(503),
            Step::status(503),
            Step::status(200).body("done"),
        ],
    );
    env.gateway.script("broken", vec![Step::status(503)]);
    let worker = env
        .worker(&[
            ("initial_retry_wait", "100ms"),
            ("max_retry_wait", "100ms"),
            ("max_retry_attempts", "2"),
        ])
        .await;
    publish(&env.config(&[]), &job("recovering", &env), 1)
        .await
        .unwrap();
    publish(&env.config(&[]), &job("broken", &env), 1)
        .await
        .unwrap();
    env.gateway.wait_callbacks(2).await;
    env.wait_dead_letters(2).await;

    let dl = env.dead_letters().await;
    let report = dl
        .replay(&Filter {
            function: Some(name("recovering")),
            ..Default::default()
        })
        .await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.replayed, 1);
    assert!(report.not_removed.is_empty() && report.skipped.is_empty());
    env.gateway.wait_callbacks(3).await;
    let cb = &env.gateway.callbacks()[2];
    assert_eq!(cb.header("x-function-status"), "200");
    assert_eq!(
        cb.header("x-retry"),
        "1",
        "a replay starts a fresh set of attempts"
    );
    assert_eq!(&cb.body[..], b"done");
    assert_eq!(env.gateway.calls().len(), 5);
    let ids: Vec<String> = env
        .gateway
        .calls()
        .iter()
        .filter(|c| c.path == "/function/recovering")
        .map(|c| c.call_id())
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "the same call, replayed"
    );
    let left = env.wait_dead_letters(1).await;
    assert_eq!(left[0].function, "broken");
    env.wait_drained(Duration::from_secs(5)).await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn a_replay_stops_at_the_entries_that_were_there() {
    let env = Env::start().await;
    env.gateway.script("broken", vec![Step::status(503)]);
    let worker = env.worker(&[("max_retry_attempts", "1")]).await;
    crate::support::submit(&env.config(&[]), "broken", 5).await;
    env.wait_dead_letters(5).await;
    // Each replayed message fails again and comes back as a new entry while the replay
    // runs; the replay must not chase them.
    let dl = env.dead_letters().await;
    let report = tokio::time::timeout(Duration::from_secs(20), dl.replay(&Filter::default()))
        .await
        .expect("the replay ends");
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.replayed, 5);
    env.wait_dead_letters(5).await;
    env.wait_drained(Duration::from_secs(5)).await;
    assert_eq!(env.gateway.calls_to("broken"), 10);
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn list_filters_and_purge_by_function() {
    let env = Env::start().await;
    env.gateway.script("a", vec![Step::status(500)]);
    env.gateway.script("b.team-b", vec![Step::status(500)]);
    let worker = env.worker(&[("max_retry_attempts", "1")]).await;
    let config = env.config(&[]);
    crate::support::submit(&config, "a", 3).await;
    crate::support::submit(&config, "b.team-b", 2).await;
    publish_raw(&env.js().await, "faas-request", b"garbage".to_vec()).await;
    env.wait_dead_letters(6).await;

    let dl = env.dead_letters().await;
    let list = |function: Option<&str>, reason: Option<Reason>, limit: Option<usize>| {
        let dl = dl.clone();
        let filter = Filter {
            function: function.map(name),
            reason,
            limit,
        };
        async move { dl.list(&filter, false).await.unwrap() }
    };
    assert_eq!(list(Some("a"), None, None).await.len(), 3);
    assert_eq!(list(Some("a.openfaas-fn"), None, None).await.len(), 3);
    assert_eq!(list(Some("b.team-b"), None, None).await.len(), 2);
    assert_eq!(
        list(Some("b"), None, None).await.len(),
        0,
        "b lives in team-b"
    );
    assert_eq!(list(None, Some(Reason::Malformed), None).await.len(), 1);
    assert_eq!(
        list(None, Some(Reason::AttemptsExhausted), Some(4))
            .await
            .len(),
        4
    );

    assert_eq!(dl.purge(Some(&name("a"))).await.unwrap(), 3);
    // Entries are stored as calls finish, in no fixed order across functions.
    let mut left: Vec<String> = list(None, None, None)
        .await
        .into_iter()
        .map(|d| d.function)
        .collect();
    left.sort();
    assert_eq!(left, ["", "b.team-b", "b.team-b"]);
    assert_eq!(dl.purge(None).await.unwrap(), 3);
    assert!(list(None, None, None).await.is_empty());
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn a_dead_letter_that_cannot_be_stored_stays_queued() {
    let env = Env::start().await;
    env.gateway.script("down", vec![Step::status(503)]);
    // A dead-letter stream made by someone else that refuses new entries once it holds one.
    let js = env.js().await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "OF_faas-request-dead".into(),
        subjects: vec!["faas-request-dead.>".into()],
        max_messages: 1,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .unwrap();
    publish_raw(&js, "faas-request-dead.filler", b"x".to_vec()).await;
    let worker = env
        .worker(&[("max_retry_attempts", "1"), ("initial_retry_wait", "100ms")])
        .await;
    publish(&env.config(&[]), &job("down", &env), 1)
        .await
        .unwrap();
    wait_metric(
        &worker,
        r#"queue_worker_dead_letter_failures_total{queue_name="faas-request"} 1"#,
    )
    .await;
    assert_eq!(env.gateway.callbacks().len(), 0, "no final callback yet");
    let stream = js.get_stream("OF_faas-request").await.unwrap();
    assert_eq!(stream.cached_info().state.messages, 1, "still queued");

    // Room again. The redelivery is still past the attempts allowed: it gets its call (the
    // delivery count cannot tell a failed store from a delivery that never reached the
    // function), fails again, and this time the give-up is stored.
    js.get_stream("OF_faas-request-dead")
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    env.gateway.wait_callbacks(1).await;
    assert_eq!(env.gateway.calls().len(), 2);
    let cb = &env.gateway.callbacks()[0];
    assert_eq!(cb.header("x-function-status"), "503");
    assert_eq!(cb.header("x-retry"), "1");
    assert_eq!(cb.header("x-retry-max"), "1");
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].reason, "attempts_exhausted");
    assert_eq!(dead[0].function, "down");
    assert_eq!(dead[0].attempts, 2, "deliveries");
    env.wait_drained(Duration::from_secs(5)).await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn a_deleted_dead_letter_stream_is_made_again() {
    let env = Env::start().await;
    env.gateway.script("down", vec![Step::status(503)]);
    let worker = env.worker(&[("max_retry_attempts", "1")]).await;
    let js = env.js().await;
    js.delete_stream("OF_faas-request-dead").await.unwrap();
    publish(&env.config(&[]), &job("down", &env), 1)
        .await
        .unwrap();
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].function, "down");
    let info = js
        .get_stream("OF_faas-request-dead")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(
        info.config.retention,
        async_nats::jetstream::stream::RetentionPolicy::Limits
    );
    assert_eq!(info.config.max_age, Duration::from_secs(7 * 24 * 3600));
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn the_dead_letter_stream_follows_its_settings() {
    let env = Env::start().await;
    let worker = env
        .worker(&[
            ("dead_letter_max_age", "1h"),
            ("dead_letter_max_bytes", "64MiB"),
        ])
        .await;
    let js = env.js().await;
    let info = js
        .get_stream("OF_faas-request-dead")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.config.subjects, ["faas-request-dead.>"]);
    assert_eq!(info.config.max_age, Duration::from_secs(3600));
    assert_eq!(info.config.max_bytes, 64 << 20);
    crate::support::stop(worker).await;

    // A restart with other limits updates the existing stream.
    let worker = env.worker(&[("dead_letter_max_age", "2h")]).await;
    let info = js
        .get_stream("OF_faas-request-dead")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.config.max_age, Duration::from_secs(7200));
    assert_eq!(info.config.max_bytes, 1 << 30);
    crate::support::stop(worker).await;
}

/// Runs the binary's `dead` subcommand against this environment's NATS.
async fn dead_cli(env: &Env, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["dead"];
    all.extend_from_slice(args);
    crate::support::cli(&env.nats.url(), &all).await
}

#[tokio::test]
async fn the_dead_commands_of_the_binary() {
    let env = Env::start().await;

    // Before any worker ran there is no dead-letter stream: a clear error, exit 4.
    let (code, _, err) = dead_cli(&env, &["list"]).await;
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("OF_faas-request-dead does not exist"), "{err}");

    env.gateway.script("down", vec![Step::status(502)]);
    env.gateway.script("other", vec![Step::status(502)]);
    let worker = env.worker(&[("max_retry_attempts", "1")]).await;
    let config = env.config(&[]);
    crate::support::submit(&config, "down", 2).await;
    crate::support::submit(&config, "other", 1).await;
    env.wait_dead_letters(3).await;

    let (code, out, err) = dead_cli(&env, &["list"]).await;
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("OF_faas-request-dead: 3 entries"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("SEQ") && lines[1].contains("REASON"),
        "{out}"
    );
    assert_eq!(lines.len(), 5, "{out}");
    for line in &lines[2..] {
        assert!(
            line.contains("attempts_exhausted") && line.contains("502"),
            "{out}"
        );
    }

    let (code, out, _) = dead_cli(&env, &["list", "--json", "--function", "down"]).await;
    assert_eq!(code, Some(0));
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["function"], "down");
    assert_eq!(rows[0]["reason"], "attempts_exhausted");
    assert_eq!(rows[0]["attempts"], 1);

    let (code, _, err) = dead_cli(&env, &["list", "--reason", "nope"]).await;
    assert_eq!(code, Some(2));
    assert!(err.contains("attempts_exhausted"), "{err}");

    env.gateway.script("other", vec![Step::status(200)]);
    let (code, out, err) = dead_cli(&env, &["replay", "--function", "other"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("replayed 1 message from"), "{out}");
    env.gateway
        .wait_for("the replayed call", Duration::from_secs(10), |g| {
            g.calls().len() == 4
        })
        .await;

    let (code, _, err) = dead_cli(&env, &["list", "--function", "down.*"]).await;
    assert_eq!(code, Some(2), "wildcards are refused: {err}");

    // A plain replay takes the give-ups only: an undecodable message would come straight back.
    publish_raw(&env.js().await, "faas-request", b"garbage".to_vec()).await;
    env.wait_dead_letters(3).await;
    let (code, out, err) = dead_cli(&env, &["replay", "--limit", "1"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("replayed 1 message from"), "{out}");
    env.gateway
        .wait_for("the second replayed call", Duration::from_secs(10), |g| {
            g.calls().len() == 5
        })
        .await;
    let left = env.wait_dead_letters(3).await;
    assert_eq!(
        left.iter().filter(|d| d.reason == "malformed").count(),
        1,
        "{left:?}"
    );

    let (code, _, err) = dead_cli(&env, &["purge"]).await;
    assert_eq!(code, Some(2), "purging everything needs --yes");
    assert!(err.contains("--yes"), "{err}");
    let (code, out, err) = dead_cli(&env, &["purge", "--function", "down"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("purged 2 messages"), "{out}");
    let (code, out, err) = dead_cli(&env, &["purge", "--yes"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("purged 1 message from"), "{out}");
    env.wait_dead_letters(0).await;
    env.wait_drained(Duration::from_secs(5)).await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn a_small_jetstream_still_gets_a_dead_letter_stream() {
    crate::support::init_logs();
    // JetStream may hold 64 MiB here, far below dead_letter_max_bytes' 1 GiB default.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "jetstream { max_file_store: 64MB }\n").unwrap();
    let store = dir.path().join("js");
    let args = vec!["-c".to_string(), conf.display().to_string()];
    let nats = tokio::task::spawn_blocking(move || {
        queue_worker::dev::natsd::NatsServer::start_with(
            &store,
            queue_worker::dev::natsd::free_port().unwrap(),
            args,
        )
    })
    .await
    .unwrap()
    .unwrap();
    let env = Env {
        nats,
        gateway: crate::support::FakeGateway::start().await,
    };
    env.gateway.script("down", vec![Step::status(503)]);
    let worker = env.worker(&[("max_retry_attempts", "1")]).await;
    let info = env
        .js()
        .await
        .get_stream("OF_faas-request-dead")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.config.max_bytes, -1, "bounded by age only");
    assert_eq!(info.config.max_age, Duration::from_secs(7 * 24 * 3600));
    crate::support::submit(&env.config(&[]), "down", 1).await;
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].function, "down");
    crate::support::stop(worker).await;
}

/// A message without `X-Call-Id` gets a call id made up at each decode. A give-up stored
/// twice for one delivery (the term was lost, the message came back and gave up again) must
/// still be one entry: the dedup id comes from the stream, the sequence and the payload,
/// never from that made-up id.
#[tokio::test]
async fn a_give_up_stored_twice_without_a_call_id_is_one_entry() {
    let env = Env::start().await;
    let worker = env.worker(&[]).await;
    crate::support::stop(worker).await;
    let payload = br#"{"Function":"down","Body":"aGk="}"#;
    let decoder =
        queue_worker::worker::job::Decoder::new(&env.gateway.url(), "openfaas-fn", 1 << 20)
            .expect("decoder");
    let dl = env.dead_letters().await;
    for _ in 0..2 {
        let inv = decoder.decode(payload).expect("decodes");
        let entry = queue_worker::worker::deadletter::Entry {
            reason: Reason::AttemptsExhausted,
            function: Some(&inv.request.function),
            function_label: Some(&inv.function),
            attempts: 3,
            last_status: Some("503"),
            error: "gave up",
            call_id: Some(&inv.call_id),
            original_subject: "faas-request.down.openfaas-fn",
            original_sequence: 7,
            payload: bytes::Bytes::from_static(payload),
        };
        dl.store(&entry).await.expect("stored");
    }
    let (entries, _) = dl.totals().await.unwrap();
    assert_eq!(entries, 1, "one give-up, one dead-letter entry");
}
