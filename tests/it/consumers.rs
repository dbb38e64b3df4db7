//! Function mode's consumers against a real nats-server: names the server accepts, racing
//! replicas, create-if-absent, idle deletion, the cut-over in both directions and the
//! per-subject discovery read.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures_util::StreamExt;
use queue_worker::nats::consumers::{
    self, claim_function_mode, claim_static_mode, consumer_name, delete_if_idle,
    ensure_function_consumer, list_consumers, marker_subject, ConsumerSummary, FunctionClaim,
    FunctionConsumer, Reaped, StaticClaim, MARKER,
};
use queue_worker::nats::stream::{self, Layout, LayoutError};

use crate::support::{publish_raw, Env};

const HOUR: Duration = Duration::from_secs(3600);

/// The default layout with its stream made.
async fn setup(env: &Env) -> (jetstream::Context, Layout) {
    let js = env.js().await;
    let layout = Layout::of(&env.config(&[]));
    stream::ensure_stream(&js, &layout).await.unwrap();
    (js, layout)
}

async fn consumer_info(
    js: &jetstream::Context,
    layout: &Layout,
    name: &str,
) -> Option<jetstream::consumer::Info> {
    let stream = js.get_stream(&layout.stream).await.unwrap();
    stream.consumer_info(name).await.ok()
}

/// Delivers one message of `consumer` and returns it unacknowledged.
async fn deliver_one(
    js: &jetstream::Context,
    layout: &Layout,
    consumer: &str,
) -> jetstream::Message {
    let c: PullConsumer = js
        .get_stream(&layout.stream)
        .await
        .unwrap()
        .get_consumer(consumer)
        .await
        .unwrap();
    let mut batch = c.fetch().max_messages(1).messages().await.unwrap();
    batch.next().await.expect("a message").unwrap()
}

fn names(list: &[ConsumerSummary]) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|c| c.name.clone()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn escaped_names_are_accepted_and_filter_their_subject() {
    let env = Env::start().await;
    let (js, layout) = setup(&env).await;
    let long = format!("faas-request.{}.openfaas-fn", "f".repeat(250));
    let subjects = [
        "faas-request.sleep-1.openfaas-fn".to_string(),
        "faas-request.my_fn.team_a".to_string(),
        "faas-request.café.ns".to_string(),
        "faas-request".to_string(),
        long.clone(),
    ];
    for s in &subjects {
        let fc = FunctionConsumer::of(&layout, s, HOUR);
        ensure_function_consumer(&js, &fc)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    let list = list_consumers(&js, &layout.stream).await.unwrap();
    assert_eq!(list.len(), subjects.len());
    for s in &subjects {
        let name = consumer_name(&layout.queue, s);
        let c = list
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("{name} in {list:?}"));
        assert_eq!(&c.filter_subject, s);
    }
    assert!(names(&list).contains(&"fn-my_ufn_dteam_ua".to_string()));
    assert!(names(&list).contains(&"legacy-subject".to_string()));

    // Each consumer sees its own subject only.
    publish_raw(&js, "faas-request.my_fn.team_a", b"mine".to_vec()).await;
    publish_raw(&js, "faas-request.sleep-1.openfaas-fn", b"other".to_vec()).await;
    let msg = deliver_one(&js, &layout, "fn-my_ufn_dteam_ua").await;
    assert_eq!(&msg.payload[..], b"mine");
    msg.double_ack().await.unwrap();
    let info = consumer_info(&js, &layout, &consumer_name(&layout.queue, &long))
        .await
        .unwrap();
    assert_eq!(info.num_pending, 0);
}

#[tokio::test]
async fn racing_replicas_make_one_consumer() {
    let env = Env::start().await;
    let (js, layout) = setup(&env).await;
    let other = env.js().await;
    // Each round: two replicas (two connections) find the consumer missing at once.
    for i in 0..5 {
        let fc = FunctionConsumer::of(&layout, &format!("faas-request.f{i}.openfaas-fn"), HOUR);
        let (a, b) = tokio::join!(
            ensure_function_consumer(&js, &fc),
            ensure_function_consumer(&other, &fc)
        );
        a.unwrap();
        b.unwrap();
        // And once more, now that it exists.
        ensure_function_consumer(&other, &fc).await.unwrap();
    }
    let list = list_consumers(&js, &layout.stream).await.unwrap();
    let expected: Vec<String> = (0..5).map(|i| format!("fn-f{i}_dopenfaas-fn")).collect();
    assert_eq!(names(&list), expected);
}

#[tokio::test]
async fn an_existing_consumer_is_left_as_it_is() {
    let env = Env::start().await;
    let (js, layout) = setup(&env).await;
    let subject = "faas-request.sleep.openfaas-fn";
    let first = FunctionConsumer::of(&layout, subject, HOUR);
    ensure_function_consumer(&js, &first).await.unwrap();
    let mut second = first.clone();
    second.inactive_threshold = 2 * HOUR;
    second.ack_wait = Duration::from_secs(7);
    ensure_function_consumer(&js, &second).await.unwrap();
    let info = consumer_info(&js, &layout, &first.name).await.unwrap();
    assert_eq!(info.config.inactive_threshold, HOUR);
    assert_eq!(info.config.ack_wait, layout.ack_wait);

    // A consumer with our name but another filter is someone else's: refused, untouched.
    let mut clash = first.clone();
    clash.subject = "faas-request.other.openfaas-fn".into();
    let err = ensure_function_consumer(&js, &clash).await.unwrap_err();
    assert!(
        matches!(err, consumers::ConsumerError::Refused(_)),
        "{err:?}"
    );
    let info = consumer_info(&js, &layout, &first.name).await.unwrap();
    assert_eq!(info.config.filter_subject, subject);
}

/// nats-server 2.10+ caps consumers' inactive threshold per stream (`consumer_limits`) and
/// refuses a higher one (10153): the consumer is made without one (the server then applies
/// its cap). 2.9 ignores the setting and takes ours.
#[tokio::test]
async fn a_refused_inactive_threshold_is_dropped() {
    let env = Env::start().await;
    let js = env.js().await;
    let layout = Layout::of(&env.config(&[]));
    let cap = Duration::from_secs(60);
    let resp: serde_json::Value = js
        .request(
            format!("STREAM.CREATE.{}", layout.stream),
            &serde_json::json!({
                "name": layout.stream,
                "subjects": layout.subjects(),
                "retention": "workqueue",
                "storage": "file",
                "consumer_limits": {"inactive_threshold": cap.as_nanos() as u64},
            }),
        )
        .await
        .unwrap();
    assert!(resp.get("error").is_none(), "{resp}");
    let fc = FunctionConsumer::of(&layout, "faas-request.sleep.openfaas-fn", HOUR);
    ensure_function_consumer(&js, &fc).await.unwrap();
    let info = consumer_info(&js, &layout, &fc.name).await.unwrap();
    let version = js_version(&env).await;
    if version.starts_with("2.9.") {
        assert_eq!(info.config.inactive_threshold, HOUR, "{version}");
    } else {
        assert_eq!(info.config.inactive_threshold, cap, "{version}");
    }
}

async fn js_version(env: &Env) -> String {
    let client = async_nats::connect(env.nats.url()).await.unwrap();
    client.server_info().version
}

/// The test server's (major, minor) version, read before starting it: some tests need a
/// configuration only newer servers accept.
fn server_version() -> (u32, u32) {
    let binary = queue_worker::dev::natsd::find_binary().expect("nats-server installed");
    let out = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .unwrap();
    // "nats-server: v2.15.1"
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.rsplit('v').next().unwrap_or_default();
    let mut parts = version.trim().split('.').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// nats-server 2.15 caps a stream that sets no `max_consumers` of its own at the server's
/// `default_max_consumers` (1,000 unless configured; 3 here) when the account has no
/// consumer limit. Function mode keeps a consumer per function with work plus the marker,
/// so every function past the cap would wait forever (the benchmark's 1,000 functions
/// stopped at 999). The work stream sets its own cap, both when the worker makes it and
/// when it finds one made without (as OpenFaaS's worker and earlier versions of this one
/// did). Older servers have no such default and refuse the setting: there the test only
/// shows the consumers are made.
#[tokio::test]
async fn the_servers_default_consumer_cap_does_not_cap_function_mode() {
    let conf = if server_version() >= (2, 15) {
        "jetstream { limits { default_max_consumers: 3 } }\n"
    } else {
        ""
    };
    let (env, _dir) = Env::with_server_config(conf).await;
    let js = env.js().await;
    let made = Layout::of(&env.config(&[("queue_name", "made")]));
    let found = Layout::of(&env.config(&[("queue_name", "found")]));
    let resp: serde_json::Value = js
        .request(
            format!("STREAM.CREATE.{}", found.stream),
            &serde_json::json!({
                "name": found.stream,
                "subjects": found.subjects(),
                "retention": "workqueue",
                "storage": "file",
                "max_consumers": -1,
            }),
        )
        .await
        .unwrap();
    assert!(resp.get("error").is_none(), "{resp}");
    for layout in [&made, &found] {
        stream::ensure_stream(&js, layout).await.unwrap();
        claim_function_mode(&js, layout, false).await.unwrap();
        for i in 0..4 {
            let subject = format!("{}.fn-{i}.openfaas-fn", layout.queue);
            let fc = FunctionConsumer::of(layout, &subject, HOUR);
            ensure_function_consumer(&js, &fc)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", layout.stream));
        }
        let list = list_consumers(&js, &layout.stream).await.unwrap();
        assert_eq!(list.len(), 5, "{}: the marker and four", layout.stream);
    }
}

/// A cap the operator set on the stream is theirs: left as it is, and the consumer it
/// refuses is reported with the settings that cap function mode.
#[tokio::test]
async fn an_operators_consumer_cap_is_kept_and_named_when_reached() {
    let env = Env::start().await;
    let js = env.js().await;
    let layout = Layout::of(&env.config(&[]));
    let resp: serde_json::Value = js
        .request(
            format!("STREAM.CREATE.{}", layout.stream),
            &serde_json::json!({
                "name": layout.stream,
                "subjects": layout.subjects(),
                "retention": "workqueue",
                "storage": "file",
                "max_consumers": 2,
            }),
        )
        .await
        .unwrap();
    assert!(resp.get("error").is_none(), "{resp}");
    let info = stream::ensure_stream(&js, &layout).await.unwrap();
    assert_eq!(info.config.max_consumers, 2);
    claim_function_mode(&js, &layout, false).await.unwrap();
    let first = FunctionConsumer::of(&layout, "faas-request.a.openfaas-fn", HOUR);
    ensure_function_consumer(&js, &first).await.unwrap();
    let second = FunctionConsumer::of(&layout, "faas-request.b.openfaas-fn", HOUR);
    let err = ensure_function_consumer(&js, &second).await.unwrap_err();
    assert!(
        matches!(&err, consumers::ConsumerError::Refused(m)
            if m.contains("10026") && m.contains("default_max_consumers")),
        "{err:?}"
    );
}

/// An account with its own consumer limit: that limit rules (the server's default does
/// not apply) and the server refuses a stream whose cap exceeds it, so the stream is made
/// without one, as before.
#[tokio::test]
async fn an_accounts_consumer_limit_is_left_to_rule() {
    let (env, _dir) = Env::with_server_config(
        "accounts { A { jetstream { max_consumers: 5 }, users [ {user: a, password: a} ] } }\n\
         no_auth_user: a\n",
    )
    .await;
    let js = env.js().await;
    let layout = Layout::of(&env.config(&[]));
    let info = stream::ensure_stream(&js, &layout).await.unwrap();
    assert_eq!(info.config.max_consumers, -1);
}

#[tokio::test]
async fn a_consumer_with_unacked_work_is_not_deleted() {
    let env = Env::start().await;
    let (js, layout) = setup(&env).await;
    let subject = "faas-request.sleep.openfaas-fn";
    let fc = FunctionConsumer::of(&layout, subject, HOUR);
    ensure_function_consumer(&js, &fc).await.unwrap();
    publish_raw(&js, subject, b"job".to_vec()).await;
    assert_eq!(
        delete_if_idle(&js, &layout.stream, &fc.name, true)
            .await
            .unwrap(),
        Reaped::Busy,
        "a pending message keeps it"
    );
    let msg = deliver_one(&js, &layout, &fc.name).await;
    assert_eq!(
        delete_if_idle(&js, &layout.stream, &fc.name, true)
            .await
            .unwrap(),
        Reaped::Busy,
        "an unacked delivery keeps it"
    );
    assert!(consumer_info(&js, &layout, &fc.name).await.is_some());
    msg.double_ack().await.unwrap();
    // A pull request waiting on it (a replica that died leaves one on nats-server 2.9)
    // keeps it on the first look only.
    let client = async_nats::connect(env.nats.url()).await.unwrap();
    let inbox = client.new_inbox();
    let _sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(
            format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", layout.stream, fc.name),
            inbox,
            r#"{"batch":1,"expires":60000000000}"#.into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while consumer_info(&js, &layout, &fc.name)
        .await
        .unwrap()
        .num_waiting
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the request never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        delete_if_idle(&js, &layout.stream, &fc.name, false)
            .await
            .unwrap(),
        Reaped::Waiting,
        "a waiting request keeps it on the first look"
    );
    assert_eq!(
        delete_if_idle(&js, &layout.stream, &fc.name, true)
            .await
            .unwrap(),
        Reaped::Gone,
        "the second look deletes it"
    );
    assert!(consumer_info(&js, &layout, &fc.name).await.is_none());
    // Already gone: still "gone".
    assert_eq!(
        delete_if_idle(&js, &layout.stream, &fc.name, false)
            .await
            .unwrap(),
        Reaped::Gone
    );
}

#[tokio::test]
async fn function_mode_takes_the_stream_from_a_static_consumer() {
    let env = Env::start().await;
    let (js, layout) = setup(&env).await;
    stream::ensure_consumer(&js, &layout).await.unwrap();
    let subject = "faas-request.sleep.openfaas-fn";
    publish_raw(&js, subject, b"in flight".to_vec()).await;
    publish_raw(&js, subject, b"queued".to_vec()).await;
    let in_flight = deliver_one(&js, &layout, &layout.durable).await;
    assert_eq!(&in_flight.payload[..], b"in flight");

    // A function-mode consumer cannot be made beside the static one...
    let fc = FunctionConsumer::of(&layout, subject, HOUR);
    let err = ensure_function_consumer(&js, &fc).await.unwrap_err();
    assert!(
        matches!(err, consumers::ConsumerError::Blocked(_)),
        "{err:?}"
    );

    // ...and while a static replica says it holds the message (it runs the call),
    // function mode waits rather than run it again...
    let (_replica, _held) = static_replica(&env, &layout, 1).await;
    assert_eq!(
        claim_function_mode(&js, &layout, false).await.unwrap(),
        FunctionClaim::Wait {
            consumer: layout.durable.clone(),
            unacked: 1
        }
    );
    let list = list_consumers(&js, &layout.stream).await.unwrap();
    assert_eq!(
        names(&list),
        vec![layout.durable.clone()],
        "nothing deleted"
    );

    // ...until it has waited longer than any call can run (the replica died): forced.
    assert_eq!(
        claim_function_mode(&js, &layout, true).await.unwrap(),
        FunctionClaim::Claimed
    );
    let list = list_consumers(&js, &layout.stream).await.unwrap();
    assert_eq!(names(&list), vec![MARKER.to_string()]);
    assert_eq!(list[0].filter_subject, marker_subject(&layout.queue));
    let mut s = js.get_stream(&layout.stream).await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 2, "nothing is lost");

    // The static replica cannot come back while the marker is there: Blocked, not a
    // start-up-stopping Incompatible.
    match stream::ensure_consumer(&js, &layout).await {
        Err(LayoutError::Blocked(_)) => {}
        other => panic!("expected Blocked, got {other:?}"),
    }

    // The function consumer now gets both messages, the one that was in flight too.
    ensure_function_consumer(&js, &fc).await.unwrap();
    let info = consumer_info(&js, &layout, &fc.name).await.unwrap();
    assert_eq!(info.num_pending, 2);
    // The old delivery's ack goes nowhere: the message stays for the new consumer.
    let _ = in_flight.double_ack().await;
    assert_eq!(s.info().await.unwrap().state.messages, 2);

    // Claiming again (another replica) is a no-op.
    claim_function_mode(&js, &layout, false).await.unwrap();
    assert_eq!(list_consumers(&js, &layout.stream).await.unwrap().len(), 2);
}

/// Once the static replicas' calls have ended (acked), function mode takes the stream
/// without forcing: nothing runs twice.
#[tokio::test]
async fn function_mode_takes_the_stream_once_static_calls_have_ended() {
    let env = Env::start().await;
    let (js, layout) = setup(&env).await;
    stream::ensure_consumer(&js, &layout).await.unwrap();
    let subject = "faas-request.sleep.openfaas-fn";
    publish_raw(&js, subject, b"done".to_vec()).await;
    publish_raw(&js, subject, b"queued".to_vec()).await;
    let done = deliver_one(&js, &layout, &layout.durable).await;
    let (_replica, held) = static_replica(&env, &layout, 1).await;
    assert!(matches!(
        claim_function_mode(&js, &layout, false).await.unwrap(),
        FunctionClaim::Wait { .. }
    ));
    done.double_ack().await.unwrap();
    held.store(0, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        claim_function_mode(&js, &layout, false).await.unwrap(),
        FunctionClaim::Claimed
    );
    let fc = FunctionConsumer::of(&layout, subject, HOUR);
    ensure_function_consumer(&js, &fc).await.unwrap();
    let info = consumer_info(&js, &layout, &fc.name).await.unwrap();
    assert_eq!(info.num_pending, 1, "only the queued message is left");
}

/// A message a stopped static replica handed back (NAK: still unacknowledged, held by
/// nobody) does not hold up the claim; it goes to the function consumer.
#[tokio::test]
async fn messages_nobody_holds_do_not_hold_up_function_mode() {
    let env = Env::start().await;
    let (js, layout) = setup(&env).await;
    stream::ensure_consumer(&js, &layout).await.unwrap();
    let subject = "faas-request.sleep.openfaas-fn";
    publish_raw(&js, subject, b"handed back".to_vec()).await;
    let msg = deliver_one(&js, &layout, &layout.durable).await;
    msg.ack_with(jetstream::AckKind::Nak(None)).await.unwrap();
    let (_replica, _held) = static_replica(&env, &layout, 0).await;
    assert_eq!(
        claim_function_mode(&js, &layout, false).await.unwrap(),
        FunctionClaim::Claimed
    );
    let fc = FunctionConsumer::of(&layout, subject, HOUR);
    ensure_function_consumer(&js, &fc).await.unwrap();
    let info = consumer_info(&js, &layout, &fc.name).await.unwrap();
    assert_eq!(info.num_pending, 1);
}

/// A static replica's presence answer (`nats/presence.rs`) saying it holds `held`
/// messages; stops when the returned token drops.
async fn static_replica(
    env: &Env,
    layout: &Layout,
    held: usize,
) -> (
    tokio_util::sync::DropGuard,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let client = async_nats::connect(env.nats.url()).await.unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(held));
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(queue_worker::nats::presence::answer(
        client.clone(),
        layout.stream.clone(),
        count.clone(),
        stop.clone(),
    ));
    // Subscribed before anyone asks.
    let asker = async_nats::connect(env.nats.url()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while queue_worker::nats::presence::ask(&asker, &layout.stream, Duration::from_millis(100))
        .await
        .unwrap()
        .replicas
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "no presence answer");
    }
    (stop.drop_guard(), count)
}

#[tokio::test]
async fn static_mode_waits_for_the_marker_then_removes_leftovers() {
    let env = Env::start().await;
    let (js, layout) = setup(&env).await;
    claim_function_mode(&js, &layout, false).await.unwrap();
    let a = FunctionConsumer::of(&layout, "faas-request.a.openfaas-fn", HOUR);
    let legacy = FunctionConsumer::of(&layout, "faas-request", HOUR);
    ensure_function_consumer(&js, &a).await.unwrap();
    ensure_function_consumer(&js, &legacy).await.unwrap();
    publish_raw(&js, "faas-request.a.openfaas-fn", b"unacked".to_vec()).await;
    publish_raw(&js, "faas-request", b"legacy".to_vec()).await;
    let _unacked = deliver_one(&js, &layout, &a.name).await;

    match stream::ensure_consumer(&js, &layout).await {
        Err(LayoutError::Blocked(_)) => {}
        other => panic!("expected Blocked, got {other:?}"),
    }
    assert_eq!(
        claim_static_mode(&js, &layout).await.unwrap(),
        StaticClaim::Wait {
            holders: vec![MARKER.to_string()]
        }
    );
    assert_eq!(
        list_consumers(&js, &layout.stream).await.unwrap().len(),
        3,
        "waiting deletes nothing"
    );

    // The function-mode replicas are gone: their marker expires (deleted here).
    let s = js.get_stream(&layout.stream).await.unwrap();
    s.delete_consumer(MARKER).await.unwrap();
    assert_eq!(
        claim_static_mode(&js, &layout).await.unwrap(),
        StaticClaim::Ready
    );
    assert!(list_consumers(&js, &layout.stream)
        .await
        .unwrap()
        .is_empty());
    let info = stream::ensure_consumer(&js, &layout).await.unwrap();
    assert_eq!(
        info.num_pending, 2,
        "the unacked message comes back to static mode"
    );
}

#[tokio::test]
async fn static_mode_never_deletes_someone_elses_consumer() {
    let env = Env::start().await;
    let (js, layout) = setup(&env).await;
    let fn_a = FunctionConsumer::of(&layout, "faas-request.a.openfaas-fn", HOUR);
    ensure_function_consumer(&js, &fn_a).await.unwrap();
    let mut foreign = FunctionConsumer::of(&layout, "faas-request.b.openfaas-fn", HOUR);
    foreign.name = "audit".into();
    ensure_function_consumer(&js, &foreign).await.unwrap();
    assert_eq!(
        claim_static_mode(&js, &layout).await.unwrap(),
        StaticClaim::Wait {
            holders: vec!["audit".to_string()]
        }
    );
    assert_eq!(
        names(&list_consumers(&js, &layout.stream).await.unwrap()),
        vec!["audit".to_string(), fn_a.name.clone()]
    );
}

#[tokio::test]
async fn subjects_are_counted_with_unacked_messages() {
    let env = Env::start().await;
    let (js, layout) = setup(&env).await;
    for i in 1..=5u64 {
        for _ in 0..i {
            publish_raw(
                &js,
                &format!("faas-request.f{i}.openfaas-fn"),
                b"x".to_vec(),
            )
            .await;
        }
    }
    publish_raw(&js, "faas-request", b"legacy".to_vec()).await;
    // One delivered and not acked: still in the stream, still counted.
    let fc = FunctionConsumer::of(&layout, "faas-request.f3.openfaas-fn", HOUR);
    ensure_function_consumer(&js, &fc).await.unwrap();
    let _unacked = deliver_one(&js, &layout, &fc.name).await;

    let all = stream::read_subjects(&js, &layout.stream, ">")
        .await
        .unwrap();
    assert_eq!(all.subjects.len(), 6, "{:?}", all.subjects);
    for i in 1..=5u64 {
        assert_eq!(all.subjects[&format!("faas-request.f{i}.openfaas-fn")], i);
    }
    assert_eq!(all.subjects["faas-request"], 1);
    assert_eq!(all.summary.messages, 16);
    assert_eq!(all.summary.last_seq, 16);
    assert_eq!(all.summary.num_subjects, 6);

    let functions = stream::read_subjects(&js, &layout.stream, "faas-request.*.*")
        .await
        .unwrap();
    assert_eq!(functions.subjects.len(), 5);
    assert!(!functions.subjects.contains_key("faas-request"));
    let none = stream::read_subjects(&js, &layout.stream, "faas-request.nothing.>")
        .await
        .unwrap();
    assert!(none.subjects.is_empty());

    assert_eq!(
        stream::read_summary(&js, &layout.stream).await.unwrap(),
        all.summary
    );
    match stream::read_summary(&js, "OF_missing").await {
        Err(LayoutError::Unavailable(e)) => assert!(e.contains("not found"), "{e}"),
        other => panic!("{other:?}"),
    }
}

/// What keeps the marker (and any function consumer) alive on both servers: a `no_wait`
/// pull now and then; without one the server deletes it after its inactive threshold.
#[tokio::test]
async fn touched_consumers_outlive_their_threshold_and_untouched_ones_expire() {
    let env = Env::start().await;
    let (js, layout) = setup(&env).await;
    let client = async_nats::connect(env.nats.url()).await.unwrap();
    let threshold = Duration::from_secs(1);
    let touched = FunctionConsumer::of(&layout, "faas-request.touched.ns", threshold);
    let idle = FunctionConsumer::of(&layout, "faas-request.idle.ns", threshold);
    ensure_function_consumer(&js, &touched).await.unwrap();
    ensure_function_consumer(&js, &idle).await.unwrap();
    let next = consumers::next_subject(&layout.stream, &touched.name);
    let start = Instant::now();
    while start.elapsed() < threshold * 3 {
        // The answer (404 No Messages) does not matter.
        let _ = client
            .request(next.clone(), r#"{"batch":1,"no_wait":true}"#.into())
            .await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(consumer_info(&js, &layout, &touched.name).await.is_some());
    assert!(
        consumer_info(&js, &layout, &idle.name).await.is_none(),
        "the untouched consumer expired"
    );
    let deadline = Instant::now() + threshold * 5;
    while consumer_info(&js, &layout, &touched.name).await.is_some() {
        assert!(Instant::now() < deadline, "untouched, it expires too");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
