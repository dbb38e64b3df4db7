//! The main path: a gateway-format message reaches the function intact, the callback carries
//! the contract headers, concurrency stays within max_inflight, long calls are not redelivered.

use std::collections::HashMap;
use std::time::Duration;

use queue_worker::message::publish::{publish, Submission};

use crate::support::{publish_raw, scrape, wait_metric, Env, Step};

#[tokio::test]
async fn gateway_format_message_reaches_function_and_callback() {
    let env = Env::start().await;
    env.gateway.script(
        "echo",
        vec![Step::status(200)
            .body("pong")
            .header("X-From-Function", "yes")
            .header("Content-Type", "text/plain")],
    );
    let worker = env.worker(&[("max_retry_attempts", "7")]).await;
    let callback = env.gateway.callback_url("flow");
    let (scheme_host, cb_path) = callback.split_at(callback.find("/callback").unwrap());
    let host = scheme_host.trim_start_matches("http://");
    // Byte for byte what the Go gateway writes: base64 Body, Header lists, CallbackUrl as a
    // url.URL struct, no namespace in Function.
    let json = format!(
        r#"{{"Header":{{"Content-Type":["application/json"],"X-Call-Id":["call-123"],"X-Custom":["one","two"],"X-Start-Time":["1741610445838000000"],"X-Callback-Url":["{callback}"]}},"Host":"gateway.openfaas:8080","Body":"eyJoZWxsbyI6IndvcmxkIn0=","Method":"POST","Path":"/sub/path","QueryString":"a=1&b=two","Function":"echo","QueueName":"","CallbackUrl":{{"Scheme":"http","Opaque":"","User":null,"Host":"{host}","Path":"{cb_path}","RawPath":"","OmitHost":false,"ForceQuery":false,"RawQuery":"","Fragment":"","RawFragment":""}}}}"#
    );
    let js = env.js().await;
    publish_raw(&js, "faas-request.echo.openfaas-fn", json.into_bytes()).await;

    env.gateway
        .wait_for("the callback", Duration::from_secs(10), |g| {
            g.callbacks().len() == 1
        })
        .await;
    let calls = env.gateway.calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.method, "POST");
    assert_eq!(call.path, "/function/echo/sub/path");
    assert_eq!(call.query.as_deref(), Some("a=1&b=two"));
    assert_eq!(&call.body[..], br#"{"hello":"world"}"#);
    assert_eq!(call.header("content-type"), "application/json");
    assert_eq!(call.header("x-call-id"), "call-123");
    let custom: Vec<_> = call
        .headers
        .get_all("x-custom")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(custom, vec!["one", "two"]);

    let cb = &env.gateway.callbacks()[0];
    assert_eq!(cb.method, "POST");
    assert_eq!(cb.path, "/callback/flow");
    assert_eq!(&cb.body[..], b"pong");
    assert_eq!(cb.header("x-call-id"), "call-123");
    assert_eq!(cb.header("x-function-status"), "200");
    assert_eq!(cb.header("x-function-name"), "echo");
    assert_eq!(cb.header("x-retry"), "1");
    assert_eq!(cb.header("x-retry-max"), "7");
    assert_eq!(cb.header("x-from-function"), "yes");
    assert_eq!(cb.header("content-type"), "text/plain");
    assert!(
        cb.header("user-agent").starts_with("queue-worker/"),
        "{}",
        cb.header("user-agent")
    );
    let secs: f64 = cb.header("x-duration-seconds").parse().unwrap();
    assert!(secs > 0.0 && secs < 10.0, "{secs}");

    env.wait_drained(Duration::from_secs(5)).await;
    wait_metric(&worker, r#"queue_worker_invocations_total{function_name="echo.openfaas-fn",queue_name="faas-request",status="200"} 1"#).await;
    wait_metric(
        &worker,
        r#"queue_worker_callbacks_total{queue_name="faas-request",result="delivered"} 1"#,
    )
    .await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn thousand_messages_each_once_within_max_inflight() {
    let env = Env::start().await;
    env.gateway.script(
        "work",
        vec![Step::status(200).delay(Duration::from_millis(3))],
    );
    let config = env.config(&[("max_inflight", "16")]);
    let sub = Submission {
        function: "work".into(),
        body: b"x".to_vec(),
        ..Default::default()
    };
    let ids = publish(&config, &sub, 1000).await.unwrap();
    let worker = queue_worker::worker::start(config).await.unwrap();

    env.gateway
        .wait_for("1000 calls", Duration::from_secs(60), |g| {
            g.calls().len() >= 1000
        })
        .await;
    env.wait_drained(Duration::from_secs(10)).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for c in env.gateway.calls() {
        *seen.entry(c.call_id()).or_default() += 1;
    }
    assert_eq!(seen.len(), 1000);
    assert!(
        ids.iter().all(|id| seen.get(id) == Some(&1)),
        "a message was invoked twice or never"
    );
    let max = env.gateway.max_running();
    assert!(max <= 16, "max_inflight exceeded: {max} at once");
    assert!(
        max >= 8,
        "the worker did not use its slots: only {max} at once"
    );
    assert_eq!(env.consumer().await.num_redelivered, 0);
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn a_call_three_times_ack_wait_is_invoked_once() {
    let env = Env::start().await;
    env.gateway.script(
        "slow",
        vec![Step::status(200).delay(Duration::from_secs(3))],
    );
    let worker = env
        .worker(&[("ack_wait", "1s"), ("max_inflight", "4")])
        .await;
    let config = env.config(&[]);
    let sub = Submission {
        function: "slow".into(),
        ..Default::default()
    };
    publish(&config, &sub, 1).await.unwrap();
    env.gateway
        .wait_for("the slow call to finish", Duration::from_secs(15), |g| {
            g.calls().iter().any(|c| c.finished.is_some())
        })
        .await;
    env.wait_drained(Duration::from_secs(5)).await;
    assert_eq!(env.gateway.calls().len(), 1);
    let c = env.consumer().await;
    assert_eq!(
        c.num_redelivered, 0,
        "the message was redelivered while its call ran"
    );
    assert_eq!(c.delivered.stream_sequence, 1);
    crate::support::stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_jobs_on_two_replicas_run_exactly_once() {
    let env = Env::start().await;
    // Each call lasts three and a half ack_wait periods; two replicas share the consumer.
    env.gateway.script(
        "slow",
        vec![Step::status(200).delay(Duration::from_millis(7000))],
    );
    let settings = [("ack_wait", "2s"), ("max_inflight", "3")];
    let a = env.worker(&settings).await;
    let b = env.worker(&settings).await;
    let ids = crate::support::submit(&env.config(&[]), "slow", 6).await;
    env.gateway
        .wait_for("6 slow calls to finish", Duration::from_secs(30), |g| {
            g.calls().iter().filter(|c| c.finished.is_some()).count() == 6
        })
        .await;
    env.wait_drained(Duration::from_secs(5)).await;
    let calls = env.gateway.calls();
    let mut called: Vec<String> = calls.iter().map(|c| c.call_id()).collect();
    called.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(called, want, "every job exactly once");
    assert_eq!(env.gateway.max_running(), 6, "both replicas worked at once");
    let c = env.consumer().await;
    assert_eq!(c.num_redelivered, 0, "a lease ran out while a call ran");
    assert_eq!(c.delivered.stream_sequence, 6);
    let invoked = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("queue_worker_invocations_total{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let (ta, tb) = (
        crate::support::scrape(&a).await,
        crate::support::scrape(&b).await,
    );
    assert_eq!(invoked(&ta) + invoked(&tb), 6);
    assert!(invoked(&ta) > 0 && invoked(&tb) > 0, "{ta}\n{tb}");
    crate::support::stop(a).await;
    crate::support::stop(b).await;
}

#[tokio::test]
async fn metrics_and_health_endpoints() {
    let env = Env::start().await;
    let worker = env.worker(&[]).await;
    let base = format!("http://127.0.0.1:{}", worker.metrics_addr.port());
    assert_eq!(
        reqwest::get(format!("{base}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(format!("{base}/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );
    let text = scrape(&worker).await;
    for name in [
        "queue_worker_pending_messages",
        "queue_worker_messages_processed_total",
        "queue_worker_messages_submitted_total",
        "queue_worker_nats_reconnect_total",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    // The in-flight gauge appears once a function has been called.
    let config = env.config(&[]);
    crate::support::submit(&config, "f", 3).await;
    env.gateway
        .wait_for("3 calls", Duration::from_secs(10), |g| g.calls().len() == 3)
        .await;
    env.wait_drained(Duration::from_secs(5)).await;
    for needle in [
        r#"queue_worker_messages_submitted_total{queue_name="faas-request"} 3"#,
        r#"queue_worker_pending_messages{function_name="all-functions",queue_name="faas-request"} 0"#,
        r#"queue_worker_function_invocation_inflight{function_name="f.openfaas-fn",queue_name="faas-request"} 0"#,
        r#"queue_worker_messages_processed_total{queue_name="faas-request"} 3"#,
    ] {
        wait_metric(&worker, needle).await;
    }
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn gateway_credentials_become_basic_auth_unless_the_caller_sent_its_own() {
    let env = Env::start().await;
    let gateway = env.gateway.url().replace("http://", "http://admin:s3cret@");
    let worker = env.worker(&[("gateway_url", &gateway)]).await;
    crate::support::submit(&env.config(&[]), "private", 1).await;
    env.gateway
        .wait_for("the call", Duration::from_secs(10), |g| {
            g.calls().len() == 1
        })
        .await;
    let call = &env.gateway.calls()[0];
    // base64("admin:s3cret")
    assert_eq!(call.header("authorization"), "Basic YWRtaW46czNjcmV0");
    assert_eq!(call.path, "/function/private");

    // A caller's own Authorization is the function's to check: it is passed on, and the
    // gateway's credentials are not.
    let sub = queue_worker::message::publish::Submission {
        function: "private".into(),
        headers: vec![("Authorization".into(), "Bearer caller-token".into())],
        ..Default::default()
    };
    queue_worker::message::publish::publish(&env.config(&[]), &sub, 1)
        .await
        .unwrap();
    env.gateway
        .wait_for("the second call", Duration::from_secs(10), |g| {
            g.calls().len() == 2
        })
        .await;
    let call = &env.gateway.calls()[1];
    let sent: Vec<_> = call.headers.get_all("authorization").iter().collect();
    assert_eq!(sent, ["Bearer caller-token"]);
    crate::support::stop(worker).await;
}

/// Go's `http.CanonicalHeaderKey`: the first letter and every letter after a `-` upper case,
/// the rest lower case (`x-openfaas-internal` → `X-Openfaas-Internal`).
pub(crate) fn go_canonical(name: &str) -> String {
    let mut upper = true;
    name.chars()
        .map(|c| {
            let c = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            c
        })
        .collect()
}

/// A receiver that records each request's head as it came off the wire (hyper's and
/// axum's servers lower-case header names before a test could see them), and answers every
/// request with 200, two headers and `pong`. Sends each head to the returned channel.
async fn raw_receiver() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One request: the head up to the blank line, then Content-Length bytes.
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let length: usize = head
                        .lines()
                        .filter_map(|l| l.split_once(':'))
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                        .map_or(0, |(_, v)| v.trim().parse().unwrap());
                    while buf.len() < end + length {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..end + length);
                    let _ = tx.send(head);
                    let answer = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\
                                  X-From-Function: yes\r\nContent-Length: 4\r\n\r\npong";
                    if conn.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// Header names of a raw request head, as written.
fn header_names(head: &str) -> Vec<&str> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':').map(|(k, _)| k))
        .collect()
}

/// Functions and callback receivers see header names as OpenFaaS's Go worker writes them
/// (`X-Call-Id`, not `x-call-id`): code that compares them case-sensitively keeps working.
#[tokio::test]
async fn header_names_reach_function_and_callback_in_go_canonical_case() {
    let env = Env::start().await;
    let (addr, mut heads) = raw_receiver().await;
    let worker = env
        .worker(&[("gateway_url", &format!("http://{addr}"))])
        .await;
    let callback = format!("http://{addr}/callback/wire");
    let json = format!(
        r#"{{"Header":{{"Content-Type":["application/json"],"X-Call-Id":["call-123"],"X-Custom-Header":["one"],"X-Start-Time":["1741610445838000000"],"X-Callback-Url":["{callback}"]}},"Host":"gateway.openfaas:8080","Body":"e30=","Method":"POST","Path":"/","QueryString":"","Function":"echo","QueueName":""}}"#
    );
    publish_raw(
        &env.js().await,
        "faas-request.echo.openfaas-fn",
        json.into_bytes(),
    )
    .await;

    let mut received = Vec::new();
    while received.len() < 2 {
        let head = tokio::time::timeout(Duration::from_secs(10), heads.recv())
            .await
            .expect("the call and its callback within 10s");
        received.push(head.unwrap());
    }
    let (call, cb) = (&received[0], &received[1]);
    assert!(call.starts_with("POST /function/echo/ "), "{call}");
    assert!(cb.starts_with("POST /callback/wire "), "{cb}");
    for (what, head, expected) in [
        (
            "function call",
            call,
            &[
                "Host",
                "Content-Type",
                "X-Call-Id",
                "X-Custom-Header",
                "X-Start-Time",
                "Content-Length",
            ][..],
        ),
        (
            "callback",
            cb,
            &[
                "Host",
                "Content-Type",
                "X-From-Function",
                "X-Call-Id",
                "X-Function-Status",
                "X-Function-Name",
                "X-Duration-Seconds",
                "X-Retry",
                "X-Retry-Max",
                "X-Start-Time",
                "User-Agent",
                "Content-Length",
            ][..],
        ),
    ] {
        let names = header_names(head);
        for name in &names {
            assert_eq!(*name, go_canonical(name), "{what}: {head}");
        }
        for name in expected {
            assert!(names.contains(name), "{what}: no {name}: {head}");
        }
    }
    crate::support::stop(worker).await;
}
