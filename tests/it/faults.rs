//! Faults: the consumer is deleted under a running worker, NATS is down, callbacks go
//! nowhere. Nothing may be lost. (Crashes and restarts, with a ledger: `reliability/`.)

use std::collections::HashSet;
use std::time::Duration;

use queue_worker::message::publish::{publish, Submission};

use crate::support::{scrape, Env, Step};

#[tokio::test]
async fn a_deleted_consumer_is_recreated() {
    let env = Env::start().await;
    let worker = env.worker(&[]).await;
    let config = env.config(&[]);
    let sub = Submission {
        function: "f".into(),
        ..Default::default()
    };
    publish(&config, &sub, 5).await.unwrap();
    env.gateway
        .wait_for("5 calls", Duration::from_secs(10), |g| g.calls().len() == 5)
        .await;
    env.wait_drained(Duration::from_secs(5)).await;

    let js = env.js().await;
    let stream = js.get_stream("OF_faas-request").await.unwrap();
    // nats-server 2.9 sometimes answers this delete with "directory not empty" although the
    // consumer is gone; the worker must recover either way.
    let _ = stream.delete_consumer("faas-workers").await;
    publish(&config, &sub, 5).await.unwrap();
    env.gateway
        .wait_for("5 more calls", Duration::from_secs(30), |g| {
            g.calls().len() == 10
        })
        .await;
    env.wait_drained(Duration::from_secs(5)).await;
    crate::support::stop(worker).await;
}

/// While the stream cannot be read, the pending gauge is withdrawn rather than left at its
/// last value: OpenFaaS's autoscaler (avg) and KEDA (max) would keep scaling on a stale count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_count_is_withdrawn_while_nats_is_down() {
    pending_withdrawn_while_nats_is_down(&[]).await;
}

/// The same in function mode, where discovery reads the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_mode_withdraws_the_pending_count_while_nats_is_down() {
    pending_withdrawn_while_nats_is_down(&[("scaling_mode", "function")]).await;
}

async fn pending_withdrawn_while_nats_is_down(mode: &[(&str, &str)]) {
    let mut env = Env::start().await;
    let mut settings = vec![("stream_poll_interval", "100ms")];
    settings.extend_from_slice(mode);
    let config = env.config(&settings);
    let worker = queue_worker::worker::start(config).await.unwrap();
    let pending_line = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("queue_worker_pending_messages{"))
            .map(str::to_string)
    };
    let wait_for = |want: bool| {
        let worker = &worker;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let text = scrape(worker).await;
                if pending_line(&text).is_some() == want {
                    return text;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "pending series present={} never became {want}:\n{text}",
                    !want
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // Ready: the stream and consumer are set up and the poller reads them.
    let ready = format!("http://127.0.0.1:{}/readyz", worker.metrics_addr.port());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200) {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let up = wait_for(true).await;
    assert!(pending_line(&up)
        .unwrap()
        .contains("function_name=\"all-functions\""));

    tokio::task::block_in_place(|| env.nats.kill());
    wait_for(false).await;
    tokio::task::block_in_place(|| env.nats.restart().unwrap());
    wait_for(true).await;
    crate::support::stop(worker).await;
}

/// A pull request that gets neither messages nor heartbeats (here a plain subscriber
/// swallows it in place of the consumer) is given up after the heartbeat watchdog, about
/// five seconds, and the loop asks again on a new inbox; not earlier, and not never.
#[tokio::test]
async fn silent_pull_requests_are_replaced_after_the_heartbeat_watchdog() {
    use futures_util::StreamExt;
    let env = Env::start().await;
    let config = env.config(&[]);
    let layout = queue_worker::nats::stream::Layout::of(&config);
    let js = env.js().await;
    queue_worker::nats::stream::ensure_stream(&js, &layout)
        .await
        .unwrap();
    let client = async_nats::connect(env.nats.url()).await.unwrap();
    let mut requests = client
        .subscribe(format!(
            "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
            layout.stream, layout.durable
        ))
        .await
        .unwrap();
    client.flush().await.unwrap();

    let (_tx, generation) = tokio::sync::watch::channel(0u64);
    let puller = queue_worker::worker::pull::Puller {
        client: client.clone(),
        js: js.clone(),
        layout: layout.clone(),
        slots: std::sync::Arc::new(tokio::sync::Semaphore::new(4)),
        max_outstanding: 4,
        limits: Default::default(),
        generation,
        consumer_ready: true,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(puller.run(stop.clone(), |_, _| {}));

    let limit = Duration::from_secs(20);
    let first = tokio::time::timeout(limit, requests.next())
        .await
        .expect("a pull request")
        .unwrap();
    let started = tokio::time::Instant::now();
    let second = tokio::time::timeout(limit, requests.next())
        .await
        .expect("a second pull request")
        .unwrap();
    let gap = started.elapsed();
    assert_ne!(first.reply, second.reply, "a new inbox after the watchdog");
    assert!(
        gap >= Duration::from_millis(4500) && gap < Duration::from_secs(12),
        "replaced after {gap:?}"
    );
    stop.cancel();
    run.await.unwrap();
}

/// A callback receiver that accepts connections and reads requests but answers none until
/// `open` (a black hole, as a hung receiver is), counting requests awaiting an answer. Each
/// such request holds its own connection (HTTP/1), so this is also the connections held.
#[derive(Clone)]
struct BlackHole {
    state: std::sync::Arc<std::sync::Mutex<HoleState>>,
    open: tokio::sync::watch::Sender<bool>,
    url: String,
}

#[derive(Default)]
struct HoleState {
    waiting: usize,
    max_waiting: usize,
    /// The `X-Call-Id` of every callback received.
    received: Vec<String>,
}

impl BlackHole {
    async fn start() -> BlackHole {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hole", listener.local_addr().unwrap());
        let hole = BlackHole {
            state: Default::default(),
            open: tokio::sync::watch::channel(false).0,
            url,
        };
        let app = axum::Router::new()
            .route("/hole", axum::routing::post(hole_callback))
            .with_state(hole.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        hole
    }

    fn waiting(&self) -> usize {
        self.state.lock().unwrap().waiting
    }

    fn max_waiting(&self) -> usize {
        self.state.lock().unwrap().max_waiting
    }

    fn received(&self) -> Vec<String> {
        self.state.lock().unwrap().received.clone()
    }

    /// Answers every request held and every later one.
    fn open(&self) {
        self.open.send_replace(true);
    }

    async fn wait_for(&self, what: &str, mut pred: impl FnMut(&BlackHole) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !pred(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {} waiting, {} received",
                self.waiting(),
                self.received().len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn hole_callback(
    axum::extract::State(hole): axum::extract::State<BlackHole>,
    headers: axum::http::HeaderMap,
    _body: axum::body::Bytes,
) -> axum::http::StatusCode {
    {
        let mut s = hole.state.lock().unwrap();
        s.waiting += 1;
        s.max_waiting = s.max_waiting.max(s.waiting);
        let id = headers
            .get("x-call-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        s.received.push(id.to_string());
    }
    let mut open = hole.open.subscribe();
    let _ = open.wait_for(|open| *open).await;
    hole.state.lock().unwrap().waiting -= 1;
    axum::http::StatusCode::OK
}

/// The value of a sample of `/metrics` (0 when absent).
async fn sample(worker: &queue_worker::worker::Running, series: &str) -> f64 {
    let text = scrape(worker).await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A callback receiver that never answers, a fast function with 64 KiB answers: callbacks
/// held stay within `callback_max_pending` (memory stays bounded), finished jobs keep their
/// slots meanwhile (the intake stops), and once the receiver answers every callback is
/// delivered exactly once: nothing was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_callback_receiver_holds_up_the_intake_and_loses_nothing() {
    const JOBS: usize = 200;
    const BUDGET: usize = 8;
    const INFLIGHT: usize = 4;
    let env = Env::start().await;
    let hole = BlackHole::start().await;
    let body: &'static str = Box::leak("x".repeat(64 << 10).into_boxed_str());
    env.gateway
        .script("big", vec![Step::status(200).body(body)]);
    let budget = BUDGET.to_string();
    let inflight = INFLIGHT.to_string();
    let config = env.config(&[
        ("max_inflight", &inflight),
        ("callback_max_pending", &budget),
        ("callback_timeout", "60s"),
    ]);
    let sub = Submission {
        function: "big".into(),
        callback_url: Some(hole.url.clone()),
        ..Default::default()
    };
    let ids = publish(&config, &sub, JOBS).await.unwrap();
    let worker = queue_worker::worker::start(config).await.unwrap();

    // The budget fills; then each slot's job finishes and waits for a place.
    hole.wait_for("a full callback budget", |h| h.waiting() >= BUDGET)
        .await;
    env.gateway
        .wait_for("the slots' jobs", Duration::from_secs(10), |g| {
            g.calls().len() >= BUDGET + INFLIGHT
        })
        .await;
    // Nothing more may start while the receiver holds everything: give it the time the old
    // code took to run every job.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        hole.max_waiting() <= BUDGET,
        "{} callbacks held at once; the budget is {BUDGET}",
        hole.max_waiting()
    );
    assert_eq!(
        env.gateway.calls().len(),
        BUDGET + INFLIGHT,
        "finished jobs keep their slots while the budget is full"
    );
    let pending = r#"queue_worker_callbacks_pending{queue_name="faas-request"}"#;
    let bytes = r#"queue_worker_callbacks_pending_bytes{queue_name="faas-request"}"#;
    assert_eq!(sample(&worker, pending).await, BUDGET as f64);
    assert_eq!(sample(&worker, bytes).await, (BUDGET * (64 << 10)) as f64);

    // The receiver recovers: everything is delivered, each once, the budget never exceeded.
    hole.open();
    hole.wait_for("every callback", |h| h.received().len() >= JOBS)
        .await;
    crate::support::wait_metric(
        &worker,
        &format!(
            r#"queue_worker_callbacks_total{{queue_name="faas-request",result="delivered"}} {JOBS}"#
        ),
    )
    .await;
    crate::support::wait_metric(&worker, &format!("{pending} 0")).await;
    crate::support::wait_metric(&worker, &format!("{bytes} 0")).await;
    let received = hole.received();
    let unique: HashSet<&String> = received.iter().collect();
    assert_eq!(received.len(), JOBS, "each callback once");
    assert!(
        ids.iter().all(|id| unique.contains(id)),
        "every job's callback"
    );
    assert!(hole.max_waiting() <= BUDGET, "{} held", hole.max_waiting());
    assert_eq!(env.gateway.calls().len(), JOBS, "each job ran once");
    let waited = sample(
        &worker,
        r#"queue_worker_callback_budget_wait_seconds_total{queue_name="faas-request"}"#,
    )
    .await;
    assert!(waited > 0.0, "slots waited for the budget");
    env.wait_drained(Duration::from_secs(5)).await;
    crate::support::stop(worker).await;
}

/// Jobs waiting for a place in a full callback budget do not hold up the drain: at the
/// deadline their callbacks are abandoned and the worker stops; their messages were
/// acknowledged before (settle first), and the unstarted ones stay queued.
#[tokio::test]
async fn the_drain_deadline_abandons_callbacks_waiting_for_budget() {
    let env = Env::start().await;
    let hole = BlackHole::start().await;
    let config = env.config(&[
        ("max_inflight", "2"),
        ("callback_max_pending", "1"),
        ("callback_timeout", "60s"),
        ("drain_timeout", "300ms"),
    ]);
    let sub = Submission {
        function: "f".into(),
        callback_url: Some(hole.url.clone()),
        ..Default::default()
    };
    publish(&config, &sub, 5).await.unwrap();
    let worker = queue_worker::worker::start(config).await.unwrap();
    hole.wait_for("the one callback", |h| h.waiting() == 1)
        .await;
    env.gateway
        .wait_for(
            "two jobs waiting for budget",
            Duration::from_secs(10),
            |g| g.calls().len() == 3,
        )
        .await;
    let stopping = std::time::Instant::now();
    let metrics = worker.metrics.clone();
    crate::support::stop(worker).await;
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "drain took {:?}",
        stopping.elapsed()
    );
    // The one in delivery and the two waiting for a place: lost, and counted as such.
    let text = queue_worker::telemetry::metrics::render(metrics.registry());
    assert!(
        text.lines().any(|l| l
            == r#"queue_worker_callbacks_total{queue_name="faas-request",result="abandoned"} 3"#),
        "{text}"
    );
    let c = env.consumer().await;
    assert_eq!(c.num_ack_pending, 0, "finished jobs were acknowledged");
    assert_eq!(c.num_pending, 2, "the rest stays queued");
    assert_eq!(hole.received().len(), 1);
}

/// The resident memory of a process, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// The same black hole against the worker binary, so its memory can be measured: with 1,000
/// finished jobs of 64 KiB answers (62.5 MiB of bodies), the process stays small, and every
/// callback arrives once the receiver answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_callback_receiver_leaves_the_worker_process_small() {
    const JOBS: usize = 1000;
    let env = Env::start().await;
    let hole = BlackHole::start().await;
    let body: &'static str = Box::leak("x".repeat(64 << 10).into_boxed_str());
    env.gateway
        .script("big", vec![Step::status(200).body(body)]);
    let sub = Submission {
        function: "big".into(),
        callback_url: Some(hole.url.clone()),
        ..Default::default()
    };
    let ids = publish(&env.config(&[]), &sub, JOBS).await.unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
        .env_clear()
        .env("nats_url", env.nats.url())
        .env("gateway_url", env.gateway.url())
        .env("metrics_port", "0")
        .env("max_inflight", "4")
        .env("callback_max_pending", "8")
        .env("callback_timeout", "60s")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    hole.wait_for("a full callback budget", |h| h.waiting() >= 8)
        .await;
    env.gateway
        .wait_for("the slots' jobs", Duration::from_secs(10), |g| {
            g.calls().len() >= 12
        })
        .await;
    // The time the unbounded worker took to run and hold every job.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Measured: 24 MiB bounded (a debug build, mostly code and runtime); 128 MiB with 656
    // callbacks held one second in, before the budget.
    let rss = rss_bytes(pid);
    assert!(
        rss < 48 << 20,
        "worker RSS {} MiB with {} callbacks held and {} calls",
        rss >> 20,
        hole.max_waiting(),
        env.gateway.calls().len()
    );
    assert!(hole.max_waiting() <= 8, "{} held", hole.max_waiting());
    hole.open();
    hole.wait_for("every callback", |h| h.received().len() >= JOBS)
        .await;
    let received: HashSet<String> = hole.received().into_iter().collect();
    assert!(ids.iter().all(|id| received.contains(id)));
    child.kill().await.unwrap();
}

/// The worker's NATS connection closed for good (here: its client drained by hand; the
/// worker itself reconnects forever): the pull loop can never pull again, so the worker turns unready,
/// drains and ends with an error (the process exits non-zero and is restarted) instead of
/// staying up doing nothing.
#[tokio::test]
async fn a_pull_loop_that_can_never_pull_again_ends_the_worker_with_an_error() {
    let env = Env::start().await;
    let worker = env.worker(&[]).await;
    let client = worker.health.nats.get().unwrap().clone();
    client.drain().await.unwrap();

    let health = worker.health.clone();
    let result = tokio::time::timeout(Duration::from_secs(10), worker.wait())
        .await
        .expect("the worker ends on its own once its pull loop has stopped");
    let err = result.expect_err("a worker whose pull loop stopped ends with an error");
    assert!(err.to_string().contains("pull loop"), "{err:#}");
    assert_eq!(health.readiness(), Err("a worker task stopped; exiting"));
}

/// A start-up error after NATS was reached (a gateway URL the HTTP client refuses, set here
/// past the config's own check) leaves nothing running: no state poller keeps reading the
/// stream for a worker that is gone.
#[tokio::test]
async fn a_start_up_error_leaves_no_task_running() {
    let env = Env::start().await;
    let mut config = env.config(&[]);
    config.gateway_url = queue_worker::config::Redacted("http://gw{x}:8080".parse().unwrap());
    let worker = queue_worker::worker::start(config.clone()).await.unwrap();
    let metrics = worker.metrics.clone();
    let err = tokio::time::timeout(Duration::from_secs(10), worker.wait())
        .await
        .expect("the worker ends on the start-up error")
        .expect_err("a gateway URL the HTTP client refuses is a start-up error");
    assert!(err.to_string().contains("gateway_url"), "{err:#}");

    // A leaked poller would publish the queue's depth within a few of its 100ms polls.
    crate::support::submit(&config, "anything", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = queue_worker::telemetry::metrics::render(metrics.registry());
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("queue_worker_pending_messages{") && l.ends_with(" 1")),
        "a task of the failed worker is still polling the stream:\n{text}"
    );
}
