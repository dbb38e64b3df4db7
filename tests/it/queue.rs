//! `queue-worker queue status|purge` against a real server, through the binary.

use std::time::Duration;

use queue_worker::nats::stream::{self, Layout};

use crate::support::{cli, publish_raw, submit, Env, Step};

async fn status_json(env: &Env) -> serde_json::Value {
    let (code, out, err) = cli(&env.nats.url(), &["queue", "status", "--json"]).await;
    assert_eq!(code, Some(0), "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn depth(status: &serde_json::Value, subject: &str) -> u64 {
    status["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["subject"] == subject)
        .map(|f| f["messages"].as_u64().unwrap())
        .unwrap_or(0)
}

#[tokio::test]
async fn status_numbers_match_what_was_published() {
    let env = Env::start().await;
    let config = env.config(&[]);
    submit(&config, "a", 3).await;
    submit(&config, "b.team-b", 2).await;
    publish_raw(
        &env.js().await,
        "faas-request",
        br#"{"Function":"legacy"}"#.to_vec(),
    )
    .await;
    // The consumer a worker would make, with nothing delivered yet.
    stream::ensure_consumer(&env.js().await, &Layout::of(&config))
        .await
        .unwrap();

    let s = status_json(&env).await;
    assert_eq!(s["stream"], "OF_faas-request");
    assert_eq!(s["messages"], 6);
    assert!(s["bytes"].as_u64().unwrap() > 0);
    assert_eq!(depth(&s, "faas-request.a.openfaas-fn"), 3);
    assert_eq!(depth(&s, "faas-request.b.team-b"), 2);
    assert_eq!(depth(&s, "faas-request"), 1);
    let functions = s["functions"].as_array().unwrap();
    assert_eq!(functions[0]["function"], "a.openfaas-fn", "deepest first");
    assert!(functions
        .iter()
        .any(|f| f["subject"] == "faas-request" && f["function"].is_null()));
    let consumers = s["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 1);
    assert_eq!(consumers[0]["name"], "faas-workers");
    assert_eq!(consumers[0]["pending"], 6);
    assert_eq!(consumers[0]["ack_pending"], 0);
    let age = s["oldest_age_seconds"].as_f64().unwrap();
    assert!((0.0..60.0).contains(&age), "{age}");
    assert!(s["dead_letters"].is_null(), "no worker made it yet");

    let (code, out, err) = cli(&env.nats.url(), &["queue", "status"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("OF_faas-request: 6 messages"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("a.openfaas-fn"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains(" 3 "), "{row}");
    let row = out.lines().find(|l| l.starts_with("faas-workers")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1..3], ["6", "0"], "{row}");

    // With a worker holding one call in flight, that call shows as ack-pending.
    env.gateway
        .script("a", vec![Step::status(200).delay(Duration::from_secs(3))]);
    let worker = env.worker(&[("max_inflight", "1")]).await;
    env.gateway
        .wait_for("a call", Duration::from_secs(10), |g| g.running() == 1)
        .await;
    let s = status_json(&env).await;
    assert_eq!(s["messages"], 6, "the running message stays until acked");
    assert_eq!(s["consumers"][0]["ack_pending"], 1);
    assert_eq!(s["consumers"][0]["pending"], 5);
    assert!(!s["dead_letters"].is_null());
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn purge_empties_only_the_named_function_while_a_worker_runs() {
    let env = Env::start().await;
    let config = env.config(&[]);
    // a's first call holds the only slot for far longer than the purge takes.
    env.gateway
        .script("a", vec![Step::status(200).delay(Duration::from_secs(60))]);
    submit(&config, "a", 5).await;
    submit(&config, "b.team-b", 3).await;
    let worker = env
        .worker(&[("max_inflight", "1"), ("drain_timeout", "200ms")])
        .await;
    env.gateway
        .wait_for("the first call of a", Duration::from_secs(10), |g| {
            g.calls_to("a") == 1
        })
        .await;

    let (code, out, err) = cli(&env.nats.url(), &["queue", "purge", "--function", "a"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("purged 5 messages of a.openfaas-fn"), "{out}");
    let s = status_json(&env).await;
    assert_eq!(s["messages"], 3);
    assert_eq!(depth(&s, "faas-request.b.team-b"), 3);

    // The running call is abandoned at the drain deadline; its message is gone, so no other
    // worker gets it. b's jobs run, and nothing is left: the consumer was not moved past them.
    crate::support::stop(worker).await;
    let worker = env.worker(&[]).await;
    env.gateway
        .wait_for("b's three calls", Duration::from_secs(15), |g| {
            g.calls_to("b.team-b") == 3
        })
        .await;
    env.wait_drained(Duration::from_secs(10)).await;
    assert_eq!(env.gateway.calls_to("a"), 1);
    let s = status_json(&env).await;
    assert_eq!(s["messages"], 0);

    // Everything needs --yes.
    submit(&config, "c", 2).await;
    let (code, _, err) = cli(&env.nats.url(), &["queue", "purge"]).await;
    assert_eq!(code, Some(2));
    assert!(err.contains("--yes"), "{err}");
    crate::support::stop(worker).await;
    let (code, out, err) = cli(&env.nats.url(), &["queue", "purge", "--yes", "--json"]).await;
    assert_eq!(code, Some(0), "{err}");
    let purged: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(purged["purged"].as_u64().unwrap() <= 2, "{out}");
    assert_eq!(status_json(&env).await["messages"], 0);
}

/// Calls finish (and are acked) while the purge walks the stream: those messages are gone
/// when it tries to delete them, which is not a failure.
#[tokio::test]
async fn purge_while_calls_finish_under_it() {
    let env = Env::start().await;
    let config = env.config(&[]);
    env.gateway.script(
        "quick",
        vec![Step::status(200).delay(Duration::from_millis(5))],
    );
    submit(&config, "quick", 400).await;
    let worker = env.worker(&[("max_inflight", "8")]).await;
    env.gateway
        .wait_for("some calls", Duration::from_secs(10), |g| {
            g.calls_to("quick") >= 20
        })
        .await;
    let (code, out, err) = cli(
        &env.nats.url(),
        &["queue", "purge", "--function", "quick", "--json"],
    )
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    let purged: serde_json::Value = serde_json::from_str(&out).unwrap();
    let purged = purged["purged"].as_u64().unwrap();
    env.wait_drained(Duration::from_secs(10)).await;
    let called = env.gateway.calls_to("quick") as u64;
    let distinct: std::collections::HashSet<String> =
        env.gateway.calls().iter().map(|c| c.call_id()).collect();
    // Every job was either run or purged. Both is possible for calls finishing while the
    // purge ran (a fire-and-forget ack not yet applied when the delete came), never a call
    // twice.
    assert!(purged + called >= 400, "purged {purged}, called {called}");
    assert_eq!(distinct.len() as u64, called, "a job ran twice");
    assert!(purged > 0, "the purge ran while jobs were queued");
    crate::support::stop(worker).await;
}

/// `queue purge --yes` removes what was queued when it started, nothing published after:
/// those messages stay, and a running worker still gets them (on nats-server 2.9 too, where
/// a *filtered* purge would move the consumer past them).
#[tokio::test]
async fn purge_all_keeps_what_came_after_its_start() {
    let env = Env::start().await;
    let config = env.config(&[]);
    // The only slot is held while the purge runs, so nothing queued is taken meanwhile.
    env.gateway.script(
        "busy",
        vec![Step::status(200).delay(Duration::from_secs(2))],
    );
    let worker = env.worker(&[("max_inflight", "1")]).await;
    submit(&config, "busy", 1).await;
    env.gateway
        .wait_for("the busy call", Duration::from_secs(10), |g| {
            g.calls_to("busy") == 1
        })
        .await;
    submit(&config, "early", 3).await;
    // The command's start: what it has seen. Then more arrives before the purge request.
    let js = env.js().await;
    let mut stream = js.get_stream("OF_faas-request").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    submit(&config, "late", 2).await;
    let purged = queue_worker::cli::queue::purge_through(&stream, last)
        .await
        .unwrap();
    assert_eq!(purged, 4, "the running call's message and the three queued");
    let s = status_json(&env).await;
    assert_eq!(s["messages"], 2, "{s}");
    assert_eq!(depth(&s, "faas-request.late.openfaas-fn"), 2);
    env.gateway
        .wait_for("the late calls", Duration::from_secs(10), |g| {
            g.calls_to("late") == 2
        })
        .await;
    env.wait_drained(Duration::from_secs(5)).await;
    assert_eq!(env.gateway.calls_to("early"), 0);
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn purge_removes_a_function_at_the_end_of_the_stream() {
    let env = Env::start().await;
    let config = env.config(&[]);
    submit(&config, "b", 2).await;
    submit(&config, "a", 3).await;
    let (code, out, err) = cli(&env.nats.url(), &["queue", "purge", "--function", "a"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("purged 3 messages of a.openfaas-fn"), "{out}");
    let s = status_json(&env).await;
    assert_eq!(s["messages"], 2);
    assert_eq!(depth(&s, "faas-request.a.openfaas-fn"), 0);
    // A queue of one function: everything goes.
    let (code, out, err) = cli(&env.nats.url(), &["queue", "purge", "--function", "b"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("purged 2 messages of b.openfaas-fn"), "{out}");
    assert_eq!(status_json(&env).await["messages"], 0);
}

#[tokio::test]
async fn missing_streams_and_unreachable_nats_have_their_own_exit_codes() {
    let env = Env::start().await;
    let (code, _, err) = cli(&env.nats.url(), &["queue", "status"]).await;
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("OF_faas-request does not exist"), "{err}");

    let port = queue_worker::dev::natsd::free_port().unwrap();
    let nowhere = format!("nats://127.0.0.1:{port}");
    for args in [
        &["queue", "status"][..],
        &["queue", "purge", "--yes"],
        &["dead", "list"],
        &["publish", "sleep"],
    ] {
        let (code, _, err) = cli(&nowhere, args).await;
        assert_eq!(code, Some(3), "{args:?}: {err}");
        assert!(err.contains("cannot reach NATS"), "{args:?}: {err}");
    }
    let (code, _, err) = cli(&env.nats.url(), &["queue", "purge", "--function", "a.*"]).await;
    assert_eq!(code, Some(2), "{err}");
}

/// Every command takes the names the front door and the worker take, and no others: `a.b.c`
/// was published (and purged, and filtered) as `fn=a, ns=b.c` while the front door refused it.
#[tokio::test]
async fn commands_refuse_names_the_worker_refuses() {
    let env = Env::start().await;
    for args in [
        &["publish", "a.b.c"][..],
        &["publish", "x."],
        &["queue", "purge", "--function", "a.b.c"],
        &["dead", "list", "--function", "a.b.c"],
        &["dead", "purge", "--function", ".x"],
    ] {
        let (code, _, err) = cli(&env.nats.url(), args).await;
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains("expected a function name"), "{args:?}: {err}");
    }
    let js = env.js().await;
    assert!(
        js.get_stream("OF_faas-request").await.is_err(),
        "nothing was published"
    );
}
