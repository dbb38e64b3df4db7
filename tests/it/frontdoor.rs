//! The async front door: what it queues, what it answers, and that a 202 always means stored.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use queue_worker::message::request::QueueRequest;

use crate::support::{stream_messages, wait_ready, Env};

fn url(door: &queue_worker::frontdoor::Running, path: &str) -> String {
    format!("http://{}{path}", door.addr)
}

async fn scrape_door(door: &queue_worker::frontdoor::Running) -> String {
    reqwest::get(format!(
        "http://127.0.0.1:{}/metrics",
        door.metrics_addr.port()
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap()
}

fn call_id(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-call-id")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_hey_style_burst_runs_every_call_once() {
    let env = Env::start().await;
    let door = env.frontdoor(&[]).await;
    let worker = env.worker(&[("max_inflight", "64")]).await;
    let client = reqwest::Client::new();
    let ids = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (client, ids, target) = (
            client.clone(),
            ids.clone(),
            url(&door, "/async-function/sleep"),
        );
        clients.push(tokio::spawn(async move {
            for i in 0..125 {
                let r = client
                    .post(&target)
                    .body(format!("job {c}-{i}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202, "{:?}", r.text().await);
                ids.lock().unwrap().push(call_id(&r));
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let ids: Vec<String> = ids.lock().unwrap().clone();
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 500, "every 202 carries its own X-Call-Id");

    env.gateway
        .wait_for("500 calls", Duration::from_secs(30), |g| {
            g.calls().len() >= 500
        })
        .await;
    env.wait_drained(Duration::from_secs(10)).await;
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for call in env.gateway.calls() {
        *per_id.entry(call.call_id()).or_default() += 1;
    }
    assert_eq!(env.gateway.calls().len(), 500);
    assert!(per_id.values().all(|n| *n == 1), "a call ran twice");
    let called: HashSet<&String> = per_id.keys().collect();
    assert_eq!(called, distinct, "the calls are the accepted requests");

    let text = scrape_door(&door).await;
    assert!(
        text.contains(r#"queue_worker_frontdoor_accepted_total{function_name="sleep.openfaas-fn",queue_name="faas-request"} 500"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"queue_worker_frontdoor_publish_seconds_count{queue_name="faas-request"} 500"#
        ),
        "{text}"
    );
    assert!(
        !text.contains("queue_worker_pending_messages"),
        "a front door must not export the worker's pending gauge"
    );
    door.shutdown();
    door.wait().await.unwrap();
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn requests_are_queued_as_the_gateway_writes_them() {
    let env = Env::start().await;
    let door = env.frontdoor(&[]).await;
    let callback = env.gateway.callback_url("echo");
    let r = reqwest::Client::new()
        .put(url(&door, "/async-function/echo.team-a/a/b%20c?x=1&y=two"))
        .header("Content-Type", "text/plain")
        .header("X-Foo", "bar")
        .header("X-Callback-Url", &callback)
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = call_id(&r);
    assert_eq!(id.len(), 36, "a generated UUID: {id}");

    let js = env.js().await;
    let msgs = stream_messages(&js, "OF_faas-request").await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.subject.as_str(), "faas-request.echo.team-a");
    // The call id, plus a fingerprint of the request (deduplication is per request).
    let msg_id = m.headers.get("Nats-Msg-Id").unwrap().as_str().to_string();
    assert!(msg_id.starts_with(&format!("{id}:")), "{msg_id}");
    let raw: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(raw["Method"], "PUT");
    assert_eq!(raw["Function"], "echo.team-a");
    assert_eq!(raw["Path"], "/a/b%20c");
    assert_eq!(raw["QueryString"], "x=1&y=two");
    assert_eq!(
        raw["Body"],
        base64::engine::general_purpose::STANDARD.encode("hello")
    );
    assert_eq!(raw["Header"]["X-Foo"], serde_json::json!(["bar"]));
    assert_eq!(
        raw["Header"]["Content-Type"],
        serde_json::json!(["text/plain"])
    );
    assert_eq!(raw["Header"]["X-Call-Id"], serde_json::json!([id]));
    assert!(raw["Header"]["X-Start-Time"][0].as_str().unwrap().len() >= 19);
    assert_eq!(raw["CallbackUrl"]["Scheme"], "http");
    assert_eq!(raw["CallbackUrl"]["Path"], "/callback/echo");
    assert!(raw["Host"].as_str().unwrap().starts_with("127.0.0.1:"));
    let decoded: QueueRequest = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(decoded.callback_url.as_deref(), Some(callback.as_str()));

    // And the worker runs it as queued.
    let worker = env.worker(&[]).await;
    env.gateway.wait_callbacks(1).await;
    let call = &env.gateway.calls()[0];
    assert_eq!(call.method, "PUT");
    assert_eq!(call.path, "/function/echo.team-a/a/b%20c");
    assert_eq!(call.query.as_deref(), Some("x=1&y=two"));
    assert_eq!(call.body, "hello");
    assert_eq!(call.header("x-foo"), "bar");
    assert_eq!(call.call_id(), id);
    assert_eq!(env.gateway.callback_for("echo").header("x-call-id"), id);
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn the_same_call_id_twice_is_one_job() {
    let env = Env::start().await;
    let door = env.frontdoor(&[]).await;
    let client = reqwest::Client::new();
    for _ in 0..2 {
        let r = client
            .post(url(&door, "/async-function/once"))
            .header("X-Call-Id", "retry-me-1")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        assert_eq!(call_id(&r), "retry-me-1");
    }
    let js = env.js().await;
    assert_eq!(stream_messages(&js, "OF_faas-request").await.len(), 1);
    let text = scrape_door(&door).await;
    assert!(
        text.contains(r#"queue_worker_frontdoor_duplicates_total{queue_name="faas-request"} 1"#),
        "{text}"
    );
    let worker = env.worker(&[]).await;
    env.wait_drained(Duration::from_secs(10)).await;
    assert_eq!(env.gateway.calls_to("once"), 1);
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn a_call_id_reused_for_another_request_is_not_dropped() {
    let env = Env::start().await;
    let door = env.frontdoor(&[]).await;
    let client = reqwest::Client::new();
    let post = |path: &'static str, body: &'static str| {
        client
            .post(url(&door, path))
            .header("X-Call-Id", "forwarded-1")
            .body(body)
            .send()
    };
    // A function forwarding its own call id to two other async calls, and a retry of one.
    assert_eq!(post("/async-function/f1", "x").await.unwrap().status(), 202);
    assert_eq!(post("/async-function/f2", "x").await.unwrap().status(), 202);
    assert_eq!(post("/async-function/f1", "y").await.unwrap().status(), 202);
    assert_eq!(post("/async-function/f1", "x").await.unwrap().status(), 202);
    let js = env.js().await;
    let msgs = stream_messages(&js, "OF_faas-request").await;
    let stored: Vec<(String, String)> = msgs
        .iter()
        .map(|m| {
            let r: QueueRequest = serde_json::from_slice(&m.payload).unwrap();
            (r.function, String::from_utf8(r.body).unwrap())
        })
        .collect();
    assert_eq!(
        stored,
        [
            ("f1".into(), "x".into()),
            ("f2".into(), "x".into()),
            ("f1".into(), "y".into())
        ]
    );
}

#[tokio::test]
async fn an_empty_call_id_is_replaced_everywhere() {
    let env = Env::start().await;
    let door = env.frontdoor(&[]).await;
    let r = reqwest::Client::new()
        .post(url(&door, "/async-function/blank"))
        .header("X-Call-Id", "")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = call_id(&r);
    assert_eq!(id.len(), 36, "{id}");
    let js = env.js().await;
    let msgs = stream_messages(&js, "OF_faas-request").await;
    let req: QueueRequest = serde_json::from_slice(&msgs[0].payload).unwrap();
    assert_eq!(req.header["X-Call-Id"], std::slice::from_ref(&id));
    let worker = env.worker(&[]).await;
    env.gateway
        .wait_for("the call", Duration::from_secs(10), |g| {
            g.calls().len() == 1
        })
        .await;
    assert_eq!(env.gateway.calls()[0].call_id(), id);
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn a_slow_client_does_not_hold_up_shutdown() {
    let env = Env::start().await;
    let door = env.frontdoor(&[("drain_timeout", "40s")]).await;
    // Half a request's headers, then nothing.
    let mut slow = tokio::net::TcpStream::connect(door.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, b"POST /async-function/x HTTP/1.1\r\nHost: a")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    door.shutdown();
    door.wait().await.unwrap();
    // Bounded by the header timeout (10s), well below drain_timeout.
    assert!(
        started.elapsed() <= queue_worker::frontdoor::HEADER_TIMEOUT + Duration::from_secs(2),
        "shutdown took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let env = Env::start().await;
    let door = env.frontdoor(&[("frontdoor_max_body", "1KiB")]).await;
    let client = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        client
            .post(url(&door, "/async-function/big"))
            .body(body)
            .send()
    };
    assert_eq!(post(vec![b'a'; 1024]).await.unwrap().status(), 202);
    let r = post(vec![b'a'; 1025]).await.unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.text().await.unwrap().contains("1024 bytes"));
    // Without Content-Length (chunked), the limit holds while reading.
    assert_eq!(post_chunked(door.addr, 4, 400).await, 413);
    assert_eq!(post_chunked(door.addr, 2, 400).await, 202);
    let js = env.js().await;
    assert_eq!(stream_messages(&js, "OF_faas-request").await.len(), 2);
    let text = scrape_door(&door).await;
    assert!(
        text.contains(r#"queue_worker_frontdoor_rejected_total{reason="too_large"} 2"#),
        "{text}"
    );
}

/// POSTs `chunks` chunks of `size` bytes with `Transfer-Encoding: chunked` (no
/// Content-Length) over a raw connection; returns the status code.
async fn post_chunked(addr: std::net::SocketAddr, chunks: usize, size: usize) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "POST /async-function/big HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..chunks {
        req.extend(format!("{size:x}\r\n").bytes());
        req.extend(std::iter::repeat_n(b'b', size));
        req.extend(b"\r\n");
    }
    req.extend(b"0\r\n\r\n");
    // The server may answer 413 and close before reading everything.
    let _ = s.write_all(&req).await;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

#[tokio::test]
async fn the_limit_never_exceeds_the_servers_max_payload() {
    crate::support::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 8192\n").unwrap();
    let store = dir.path().join("js");
    let args = vec!["-c".to_string(), conf.display().to_string()];
    let nats = tokio::task::spawn_blocking(move || {
        queue_worker::dev::natsd::NatsServer::start_with(&store, 0, args)
    })
    .await
    .unwrap()
    .unwrap();
    let gateway = crate::support::FakeGateway::start().await;
    let env = Env { nats, gateway };
    // 1 MiB is allowed by the setting, but a message must fit 8 KiB once encoded.
    let door = env.frontdoor(&[]).await;
    let client = reqwest::Client::new();
    let post = |n: usize| {
        client
            .post(url(&door, "/async-function/big"))
            .body(vec![b'a'; n])
            .send()
    };
    assert_eq!(post(3000).await.unwrap().status(), 202);
    let r = post(6000).await.unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.text().await.unwrap().contains("max_payload"));
    // Headers count too: a body that fits alone but not with 5 KiB of headers.
    let r = client
        .post(url(&door, "/async-function/big"))
        .header("X-Padding", "p".repeat(5000))
        .body(vec![b'a'; 3000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let js = env.js().await;
    assert_eq!(stream_messages(&js, "OF_faas-request").await.len(), 1);
}

#[tokio::test]
async fn bad_names_and_callback_urls_get_400() {
    let env = Env::start().await;
    let door = env.frontdoor(&[]).await;
    let client = reqwest::Client::new();
    for path in [
        "/async-function/",
        "/async-function",
        "/async-function/a.b.c",
        "/async-function/a%20b",
        "/async-function/a..b",
    ] {
        let r = client.post(url(&door, path)).send().await.unwrap();
        assert_eq!(r.status(), 400, "{path}");
    }
    let r = client
        .post(url(&door, "/async-function/fine"))
        .header("X-Callback-Url", "not a url")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("X-Callback-Url"));
    let js = env.js().await;
    assert!(stream_messages(&js, "OF_faas-request").await.is_empty());
    let text = scrape_door(&door).await;
    assert!(
        text.contains(r#"queue_worker_frontdoor_rejected_total{reason="bad_request"} 6"#),
        "{text}"
    );
}

/// Four clients post without pause while NATS is killed and restarted: requests during the
/// outage get 503, and every request that got 202 is run after the restart.
#[tokio::test]
async fn nats_down_gives_503_and_every_202_was_stored() {
    let mut env = Env::start().await;
    let door = env.frontdoor(&[]).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for c in 0..4 {
        let (client, accepted, refused, stop) = (
            client.clone(),
            accepted.clone(),
            refused.clone(),
            stop.clone(),
        );
        let target = url(&door, "/async-function/steady");
        clients.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                i += 1;
                let Ok(r) = client
                    .post(&target)
                    .header("X-Call-Id", format!("c{c}-{i}"))
                    .send()
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                match r.status().as_u16() {
                    202 => accepted.lock().unwrap().push(call_id(&r)),
                    503 => {
                        let id = call_id(&r);
                        let why = r.text().await.unwrap_or_default();
                        refused.lock().unwrap().push((id, why));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("unexpected {other}"),
                }
            }
        }));
    }
    let count = |v: &Arc<Mutex<Vec<String>>>| v.lock().unwrap().len();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while count(&accepted) < 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "200 requests not accepted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    env.nats.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while refused.lock().unwrap().len() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "no 503 while NATS is down"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before_restart = count(&accepted);
    env.nats.restart().unwrap();
    // Accepting again after the reconnect.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while count(&accepted) < before_restart + 100 {
        assert!(std::time::Instant::now() < deadline, "no 202 after restart");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    for c in clients {
        c.await.unwrap();
    }
    let accepted: Vec<String> = accepted.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    assert!(
        refused
            .iter()
            .all(|(id, why)| !id.is_empty() && !why.is_empty()),
        "a 503 names its call id and why: {refused:?}"
    );

    let worker = env.worker(&[("max_inflight", "64")]).await;
    env.gateway
        .wait_for("every accepted call", Duration::from_secs(30), |g| {
            let called: HashSet<String> = g.calls().iter().map(|c| c.call_id()).collect();
            accepted.iter().all(|id| called.contains(id))
        })
        .await;
    wait_ready(&worker).await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn unknown_functions_get_404_and_annotations_choose_the_queue() {
    let env = Env::start().await;
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("basic-auth-user"), "admin\n").unwrap();
    std::fs::write(secrets.path().join("basic-auth-password"), "s3cret\n").unwrap();
    env.gateway.know(
        "known",
        &[
            ("com.openfaas.queue", "slow-fns"),
            ("com.openfaas.retry.attempts", "2"),
            ("com.openfaas.queue.max_age", "10m"),
            ("com.openfaas.queue.max_inflight", "3"),
            ("com.openfaas.scale.max", "5"),
        ],
    );
    env.gateway.know("plain", &[]);
    env.gateway.know("burst", &[]);
    let door = env
        .frontdoor(&[
            ("frontdoor_check_function", "true"),
            ("secret_mount_path", secrets.path().to_str().unwrap()),
        ])
        .await;
    let client = reqwest::Client::new();
    let r = client
        .post(url(&door, "/async-function/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client
        .post(url(&door, "/async-function/known.openfaas-fn"))
        .body("k")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = client
        .post(url(&door, "/async-function/plain"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    // A burst of calls to a function not cached yet costs one lookup.
    let burst: Vec<_> = (0..20)
        .map(|_| client.post(url(&door, "/async-function/burst")).send())
        .collect();
    for r in futures_util::future::join_all(burst).await {
        assert_eq!(r.unwrap().status(), 202);
    }
    let lookups = env.gateway.lookups();
    assert_eq!(
        lookups
            .iter()
            .filter(|l| l.path == "/system/function/burst")
            .count(),
        1
    );
    assert!(
        lookups.iter().any(|l| l.path == "/system/function/known"
            && l.query.as_deref() == Some("namespace=openfaas-fn")),
        "{lookups:?}"
    );
    assert!(lookups
        .iter()
        .all(|l| l.header("authorization") == "Basic YWRtaW46czNjcmV0"));

    let js = env.js().await;
    let slow = stream_messages(&js, "OF_slow-fns").await;
    assert_eq!(slow.len(), 1);
    assert_eq!(slow[0].subject.as_str(), "slow-fns.known.openfaas-fn");
    let req: QueueRequest = serde_json::from_slice(&slow[0].payload).unwrap();
    assert_eq!(req.queue_name, "slow-fns");
    assert_eq!(
        req.annotations
            .get("com.openfaas.retry.attempts")
            .map(String::as_str),
        Some("2")
    );
    // The worker also reads these two from the message.
    for (k, v) in [
        ("com.openfaas.queue.max_age", "10m"),
        ("com.openfaas.queue.max_inflight", "3"),
    ] {
        assert_eq!(req.annotations.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(!req.annotations.contains_key("com.openfaas.scale.max"));
    let default = stream_messages(&js, "OF_faas-request").await;
    assert_eq!(default.len(), 21);
    assert_eq!(
        default[0].subject.as_str(),
        "faas-request.plain.openfaas-fn"
    );

    // A gateway failing for a name: the requests waiting for its lookup share the failure.
    env.gateway.break_lookup("flaky");
    let burst: Vec<_> = (0..20)
        .map(|_| client.post(url(&door, "/async-function/flaky")).send())
        .collect();
    for r in futures_util::future::join_all(burst).await {
        assert_eq!(r.unwrap().status(), 503);
    }
    let flaky = env
        .gateway
        .lookups()
        .iter()
        .filter(|l| l.path == "/system/function/flaky")
        .count();
    assert!(flaky <= 2, "{flaky} lookups for one burst");

    // A gateway that cannot answer: 503, not a silent 202 nor a false 404.
    let dead_gateway = env
        .frontdoor(&[
            ("frontdoor_check_function", "true"),
            ("gateway_url", "http://127.0.0.1:1"),
        ])
        .await;
    let r = client
        .post(url(&dead_gateway, "/async-function/plain"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        !call_id(&r).is_empty(),
        "a 503 names the call id to retry with"
    );
    let text = scrape_door(&dead_gateway).await;
    assert!(
        text.contains(r#"queue_worker_frontdoor_rejected_total{reason="lookup_failed"} 1"#),
        "{text}"
    );
    let text = scrape_door(&door).await;
    assert!(
        text.contains(r#"queue_worker_frontdoor_rejected_total{reason="unknown_function"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn queues_are_chosen_per_function_from_configuration() {
    let env = Env::start().await;
    let door = env
        .frontdoor(&[("frontdoor_queues", "sleep=slow, env.team=fast")])
        .await;
    let client = reqwest::Client::new();
    for path in ["sleep", "sleep.openfaas-fn", "env.team", "env", "other"] {
        let r = client
            .post(url(&door, &format!("/async-function/{path}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{path}");
    }
    let js = env.js().await;
    let subjects = |msgs: Vec<async_nats::jetstream::message::StreamMessage>| {
        msgs.iter()
            .map(|m| m.subject.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        subjects(stream_messages(&js, "OF_slow").await),
        ["slow.sleep.openfaas-fn", "slow.sleep.openfaas-fn"]
    );
    assert_eq!(
        subjects(stream_messages(&js, "OF_fast").await),
        ["fast.env.team"]
    );
    assert_eq!(
        subjects(stream_messages(&js, "OF_faas-request").await),
        [
            "faas-request.env.openfaas-fn",
            "faas-request.other.openfaas-fn"
        ]
    );
    // A worker of the slow queue runs its jobs.
    let worker = env.worker(&[("queue_name", "slow")]).await;
    env.gateway
        .wait_for("the slow queue's calls", Duration::from_secs(10), |g| {
            g.calls().len() == 2
        })
        .await;
    let paths: HashSet<String> = env.gateway.calls().iter().map(|c| c.path.clone()).collect();
    assert_eq!(
        paths,
        HashSet::from([
            "/function/sleep".to_string(),
            "/function/sleep.openfaas-fn".to_string()
        ])
    );
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn a_deleted_stream_is_set_up_again_on_the_next_request() {
    let env = Env::start().await;
    let door = env.frontdoor(&[]).await;
    let js = env.js().await;
    js.delete_stream("OF_faas-request").await.unwrap();
    let r = reqwest::Client::new()
        .post(url(&door, "/async-function/again"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(stream_messages(&js, "OF_faas-request").await.len(), 1);
}

/// `secret_mount_path` holds the gateway's basic auth for the front door's function lookups.
/// The worker never uses it: a worker sharing the front door's settings starts without the
/// files, and so does a front door that looks nothing up; one that looks functions up
/// refuses to start without them, naming the key (exit 2).
#[tokio::test]
async fn only_the_front_door_needs_the_secret_files() {
    let env = Env::start().await;
    let missing = "/nonexistent/queue-worker-secrets";
    let sources = queue_worker::config::Sources::from_pairs([
        ("nats_url", env.nats.url().as_str()),
        ("gateway_url", env.gateway.url().as_str()),
        ("metrics_port", "0"),
        ("frontdoor_listen", "127.0.0.1:0"),
        ("secret_mount_path", missing),
        ("frontdoor_check_function", "true"),
    ])
    .unwrap();
    let config = queue_worker::config::Config::load(&sources);
    assert!(config.is_ok(), "the worker's settings: {:?}", config.err());
    let worker = queue_worker::worker::start(config.unwrap()).await.unwrap();
    wait_ready(&worker).await;
    crate::support::stop(worker).await;

    let mut config = queue_worker::config::Config::load(&sources).unwrap();
    config.frontdoor.check_function = false;
    let door = queue_worker::frontdoor::start(config)
        .await
        .expect("without lookups the files are not needed");
    door.shutdown();
    door.wait().await.unwrap();

    let config = queue_worker::config::Config::load(&sources).unwrap();
    let err = match queue_worker::frontdoor::start(config).await {
        Ok(_) => panic!("the front door started without its secret files"),
        Err(e) => e,
    };
    assert!(
        err.is::<queue_worker::config::ConfigError>(),
        "a configuration error: {err:#}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("secret_mount_path") && msg.contains(missing),
        "{msg}"
    );

    // Through the binary: check-config (the worker's view) passes, the front door exits 2.
    let run = |args: &'static [&'static str]| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
            .env_clear()
            .env("nats_url", env.nats.url())
            .env("metrics_port", "0")
            .env("frontdoor_listen", "127.0.0.1:0")
            .env("secret_mount_path", missing)
            .env("frontdoor_check_function", "true")
            .args(args)
            .output()
    };
    let out = run(&["check-config"]).await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokio::time::timeout(Duration::from_secs(10), run(&["frontdoor"]))
        .await
        .expect("the front door refuses at once")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("secret_mount_path"), "{stderr}");
}

/// Started before NATS is up, the front door binds at once (a port conflict still fails at
/// start) but accepts only once its stream is set up: a client that calls right away waits
/// in the listen backlog and gets its 202, not a 503. `/readyz` agrees; a stop before it is
/// ready ends promptly.
#[tokio::test]
async fn a_request_sent_before_nats_is_up_waits_and_is_queued() {
    let mut env = Env::start().await;
    env.nats.kill();
    let door = queue_worker::frontdoor::start(env.config(&[("frontdoor_listen", "127.0.0.1:0")]))
        .await
        .expect("starts without NATS");
    assert!(door.health.readiness().is_err(), "not ready without NATS");
    // The port is bound already: a second front door on it fails at start, not later.
    let taken = door.addr.to_string();
    let err = queue_worker::frontdoor::start(env.config(&[("frontdoor_listen", &taken)]))
        .await
        .err()
        .expect("the port is taken");
    assert!(err.to_string().contains("frontdoor_listen"), "{err:#}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let early = tokio::spawn({
        let (client, target) = (client.clone(), url(&door, "/async-function/early"));
        async move { client.post(&target).body("hi").send().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    env = tokio::task::spawn_blocking(move || {
        env.nats.restart().unwrap();
        env
    })
    .await
    .unwrap();
    let r = early.await.unwrap().expect("an answer");
    let status = r.status();
    assert_eq!(status, 202, "{:?}", r.text().await);
    assert!(door.health.readiness().is_ok());
    let stream = env.js().await.get_stream("OF_faas-request").await.unwrap();
    assert_eq!(stream.cached_info().state.messages, 1);
    door.shutdown();
    door.wait().await.unwrap();

    // Stopped before it was ever ready (no NATS): it exits at once, cleanly.
    env.nats.kill();
    let door = queue_worker::frontdoor::start(env.config(&[("frontdoor_listen", "127.0.0.1:0")]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    door.shutdown();
    tokio::time::timeout(Duration::from_secs(3), door.wait())
        .await
        .expect("a prompt stop before ready")
        .unwrap();
}
