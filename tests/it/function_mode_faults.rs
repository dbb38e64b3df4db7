//! Function mode under faults found in review: each of these failed before its fix (the
//! message in each assertion says how).

use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;

use crate::support::*;

use crate::function_mode::{consumers, stream_count, with, FUNCTION};

/// The reaper finds the consumer busy (here: someone else's waiting pull) and keeps it: the
/// function must still be served afterwards (it was not, before: never pulled again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_the_reaper_keeps_is_still_served() {
    let env = Env::start().await;
    env.gateway.script("f", vec![Step::status(200)]);
    let worker = env
        .worker(&with(&[("consumer_inactive_threshold", "1s")]))
        .await;
    let config = env.config(&[]);
    submit(&config, "f", 1).await;
    env.gateway
        .wait_for("first job", Duration::from_secs(10), |g| {
            g.calls_to("f") == 1
        })
        .await;
    while stream_count(&env).await != 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Someone (another replica's waiting pull, a CLI) has a request waiting for 4 s.
    let client = async_nats::connect(env.nats.url()).await.unwrap();
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(
            "$JS.API.CONSUMER.MSG.NEXT.OF_faas-request.fn-f_dopenfaas-fn",
            inbox,
            r#"{"batch":1,"expires":4000000000}"#.into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    // Its end (408) arrives after 4 s; the reaper ran meanwhile and kept the consumer.
    let status = tokio::time::timeout(Duration::from_secs(6), sub.next())
        .await
        .unwrap()
        .unwrap();
    eprintln!(
        "external pull ended: {:?} {:?}",
        status.status, status.description
    );
    eprintln!("consumers now: {:?}", consumers(&env).await);
    submit(&config, "f", 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.gateway.calls_to("f") < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "calls to f after 10 s: {} (2 expected); stream holds {}",
        env.gateway.calls_to("f"),
        stream_count(&env).await
    );
    assert_eq!(env.gateway.calls_to("f"), 2, "f's second job never ran");
    stop(worker).await;
}

/// The marker is gone while a function-mode replica runs (here: deleted; in production:
/// expired during a >15 s disconnect): the replica notices and claims the stream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_marker_is_recreated() {
    let env = Env::start().await;
    let worker = env.worker(FUNCTION).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !consumers(&env).await.contains(&"function-mode".to_string()) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let js = env.js().await;
    let stream = js.get_stream("OF_faas-request").await.unwrap();
    stream.delete_consumer("function-mode").await.unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let names = consumers(&env).await;
    eprintln!("consumers 12 s after the marker was lost: {names:?}");
    assert!(
        names.contains(&"function-mode".to_string()),
        "marker not recreated"
    );
    stop(worker).await;
}

/// Function -> static switch while a function-mode replica drains a long call: the
/// draining replica keeps the marker alive until its drain ends, so the static replica
/// does not take the stream (and run the call again) while the call runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_call_draining_during_a_switch_back_runs_once() {
    let env = Env::start().await;
    env.gateway.script(
        "slow",
        vec![Step::status(200).delay(Duration::from_secs(30))],
    );
    let old = env
        .worker(&with(&[
            ("drain_timeout", "60s"),
            ("upstream_timeout", "60s"),
        ]))
        .await;
    submit(&env.config(&[]), "slow", 1).await;
    env.gateway
        .wait_for("the call to start", Duration::from_secs(10), |g| {
            g.running() == 1
        })
        .await;
    let new = env.worker(&[("max_inflight", "4")]).await;
    // The old pod is told to stop (rolling update): it drains its 30 s call.
    old.shutdown();
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline && env.gateway.calls_to("slow") < 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "calls to slow: {} (1 expected), consumers {:?}",
        env.gateway.calls_to("slow"),
        consumers(&env).await
    );
    let calls = env.gateway.calls_to("slow");
    let _ = tokio::time::timeout(Duration::from_secs(40), old.wait()).await;
    stop(new).await;
    assert_eq!(
        calls, 1,
        "the draining replica's call ran again on the static one"
    );
}

/// A 409 "Consumer Deleted" (what the server sends a waiting request when its consumer
/// is deleted; a cluster without a consumer leader answers 503) makes the worker recreate
/// the consumer, even though the stream's counts no longer change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_reported_deleted_is_recreated_while_counts_stand_still() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let env = Env::start().await;
    env.gateway
        .script("f", vec![Step::status(200).delay(Duration::from_secs(2))]);
    let worker = env.worker(&with(&[("max_inflight", "1")])).await;
    let config = env.config(&[]);
    submit(&config, "f", 5).await;
    env.gateway
        .wait_for("the first call", Duration::from_secs(10), |g| {
            g.running() == 1
        })
        .await;
    // The consumer goes (an operator, the backstop); the running call's ack will be lost,
    // so the stream's count for f stays 5 from now on.
    let js = env.js().await;
    let stream = js.get_stream("OF_faas-request").await.unwrap();
    stream.delete_consumer("fn-f_dopenfaas-fn").await.unwrap();
    // Raw client: answers the next pull with the status the server gives a waiting request
    // of a deleted consumer.
    let url = env.nats.url();
    let addr = url.trim_start_matches("nats://").to_string();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = tcp.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap(); // INFO
    w.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}\r\nSUB $JS.API.CONSUMER.MSG.NEXT.OF_faas-request.fn-f_dopenfaas-fn 1\r\nPING\r\n").await.unwrap();
    let reply = loop {
        line.clear();
        r.read_line(&mut line).await.unwrap();
        if let Some(rest) = line.strip_prefix("MSG ") {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            let len: usize = parts[parts.len() - 1].parse().unwrap();
            let mut body = vec![0; len + 2];
            r.read_exact(&mut body).await.unwrap();
            break parts[2].to_string();
        }
    };
    let hdr = "NATS/1.0 409 Consumer Deleted\r\n\r\n";
    w.write_all(format!("HPUB {reply} {} {}\r\n{hdr}\r\n", hdr.len(), hdr.len()).as_bytes())
        .await
        .unwrap();
    w.flush().await.unwrap();
    eprintln!("answered pull {reply} with 409 Consumer Deleted");
    tokio::time::sleep(Duration::from_secs(15)).await;
    eprintln!(
        "15 s later: calls to f {} (5 queued), consumers {:?}, stream {}",
        env.gateway.calls_to("f"),
        consumers(&env).await,
        stream_count(&env).await
    );
    assert!(
        consumers(&env)
            .await
            .contains(&"fn-f_dopenfaas-fn".to_string()),
        "f's consumer was never recreated: f is stuck"
    );
    stop(worker).await;
}

/// A saturated replica: a function waiting for its round-robin turn longer than its
/// consumer's server-side inactive_threshold keeps its consumer (keep-alive pulls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_turn_longer_than_the_backstop_keeps_the_consumer() {
    let env = Env::start().await;
    let config = env.config(&[]);
    for i in 0..6 {
        let f = format!("f{i}");
        env.gateway.script(
            &f,
            vec![Step::status(200).delay(Duration::from_millis(900))],
        );
        submit(&config, &f, 4).await;
    }
    let worker = env
        .worker(&with(&[
            ("max_inflight", "1"),
            ("consumer_inactive_threshold", "1s"),
            ("ack_wait", "1s"),
            ("upstream_timeout", "1s"),
        ]))
        .await;
    let mut vanished = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && env.gateway.calls().len() < 24 {
        let names = consumers(&env).await;
        for i in 0..6 {
            let f = format!("f{i}");
            let name = format!("fn-{f}_dopenfaas-fn");
            if env.gateway.calls_to(&f) < 4
                && env.gateway.calls_to(&f) > 0
                && !names.contains(&name)
            {
                vanished.insert(f);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "functions whose consumer vanished while they had work: {vanished:?}; calls {}",
        env.gateway.calls().len()
    );
    stop(worker).await;
    assert!(vanished.is_empty());
}

/// An operator resets the queue by deleting the stream (OpenFaaS's documented recipe): the
/// function-mode worker makes it again (so the gateway's publishes are stored) and serves
/// what comes next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_stream_is_made_again_and_served() {
    let env = Env::start().await;
    let worker = env.worker(FUNCTION).await;
    submit(&env.config(&[]), "f", 1).await;
    env.gateway
        .wait_for("the first job", Duration::from_secs(10), |g| {
            g.calls_to("f") == 1
        })
        .await;
    let js = env.js().await;
    js.delete_stream("OF_faas-request").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while js.get_stream("OF_faas-request").await.is_err() {
        assert!(Instant::now() < deadline, "the stream was not made again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // As the gateway publishes: straight to the subject, no stream set-up.
    let body = br#"{"Function":"f","Method":"POST","Header":{"X-Call-Id":["after-reset"]}}"#;
    publish_raw(&js, "faas-request.f.openfaas-fn", body.to_vec()).await;
    env.gateway
        .wait_for("the job after the reset", Duration::from_secs(10), |g| {
            g.calls_to("f") == 2
        })
        .await;
    stop(worker).await;
}
