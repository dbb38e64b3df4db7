//! Stale messages: a WorkQueue stream that still counts messages its consumer already ran
//! and acknowledged (nats-server 2.9 after a stream leader change). The state is made by hand
//! on a file store: the stream's message blocks, saved before the messages were run, are put
//! back after (checked: 2.9.10 and 2.15.1 both keep them at start-up; should a server repair
//! them, the tests check that nothing is reported instead).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use queue_worker::dev::natsd::free_port;
use queue_worker::nats::stream::{ensure_consumer, ensure_stream, Layout};
use tokio::io::AsyncReadExt;

use crate::support::{cli, scrape, submit, Env, Step};

const STALE_ALL: &str =
    r#"queue_worker_stale_messages{function_name="all-functions",queue_name="faas-request"}"#;
const STALE_WORK: &str =
    r#"queue_worker_stale_messages{function_name="work.openfaas-fn",queue_name="faas-request"}"#;
const PENDING_ALL: &str =
    r#"queue_worker_pending_messages{function_name="all-functions",queue_name="faas-request"}"#;
const PENDING_WORK: &str =
    r#"queue_worker_pending_messages{function_name="work.openfaas-fn",queue_name="faas-request"}"#;

/// The `msgs` directory of `stream` under a server's store.
fn msgs_dir(store: &Path, stream: &str) -> PathBuf {
    let mut found = Vec::new();
    let mut dirs = vec![store.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.ends_with(Path::new(stream).join("msgs")) {
                    found.push(p.clone());
                }
                dirs.push(p);
            }
        }
    }
    assert_eq!(
        found.len(),
        1,
        "msgs of {stream} under {store:?}: {found:?}"
    );
    found.pop().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Publishes `n` jobs for `work`, saves the stream's messages, lets a worker in `mode` run and
/// acknowledge them all, then restores the saved messages under the consumer's state (the
/// server stopped in between). Returns what the stream counts afterwards: `n` if the server
/// kept the stale messages, 0 if it repaired the stream at start-up.
async fn manufacture(env: &mut Env, mode: &str, n: usize) -> u64 {
    let config = env.config(&[("scaling_mode", mode)]);
    let layout = Layout::of(&config);
    let js = env.js().await;
    ensure_stream(&js, &layout).await.unwrap();
    if mode == "static" {
        ensure_consumer(&js, &layout).await.unwrap();
    }
    submit(&config, "work", n).await;
    let saved = tempfile::tempdir().unwrap();
    let store = env.nats.store.clone();
    let stream = layout.stream.clone();
    tokio::task::block_in_place(|| {
        env.nats.stop();
        copy_dir(&msgs_dir(&store, &stream), saved.path());
        env.nats.restart().unwrap();
    });
    let worker = env.worker(&[("scaling_mode", mode)]).await;
    env.gateway
        .wait_for("every job run", Duration::from_secs(20), |g| {
            g.calls_to("work") == n
        })
        .await;
    let js = env.js().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while stored(&js).await != 0 {
        assert!(Instant::now() < deadline, "the jobs were not acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    crate::support::stop(worker).await;
    tokio::task::block_in_place(|| {
        env.nats.stop();
        let msgs = msgs_dir(&store, &stream);
        std::fs::remove_dir_all(&msgs).unwrap();
        copy_dir(saved.path(), &msgs);
        env.nats.restart().unwrap();
    });
    stored(&env.js().await).await
}

async fn stored(js: &async_nats::jetstream::Context) -> u64 {
    let mut s = js.get_stream("OF_faas-request").await.unwrap();
    s.info().await.unwrap().state.messages
}

/// The worker binary as a child process, so its log lines can be read.
struct WorkerProcess {
    child: tokio::process::Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl WorkerProcess {
    fn start(env: &Env, mode: &str) -> WorkerProcess {
        let port = free_port().unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
            .env_clear()
            .env("nats_url", env.nats.url())
            .env("gateway_url", env.gateway.url())
            .env("metrics_port", port.to_string())
            .env("scaling_mode", mode)
            .env("stream_poll_interval", "200ms")
            .env("log_flush_interval", "0s")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let into = log.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 8192];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                into.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        WorkerProcess { child, port, log }
    }

    async fn metrics(&self) -> String {
        match reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The value of the sample `series` (absent: `None`).
    async fn value(&self, series: &str) -> Option<f64> {
        sample(&self.metrics().await, series)
    }

    async fn wait_value(&self, series: &str, want: Option<f64>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.metrics().await;
            if !text.is_empty() && sample(&text, series) == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} is not {want:?} after {timeout:?}:\n{text}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

async fn stale_messages_are_reported_not_run_and_left_out_of_pending(mode: &str) {
    let mut env = Env::start().await;
    const N: usize = 20;
    let kept = manufacture(&mut env, mode, N).await;
    let mut worker = WorkerProcess::start(&env, mode);
    if kept == 0 {
        // A server that repairs the stream at start-up: nothing to report, ever.
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!(worker.value(STALE_ALL).await, Some(0.0), "{}", worker.log());
        assert_eq!(worker.value(STALE_WORK).await, None);
        assert!(!worker.log().contains("stale messages"), "{}", worker.log());
        worker.child.kill().await.unwrap();
        return;
    }
    assert_eq!(
        kept, N as u64,
        "the restored stream counts every saved message"
    );
    // Two quiet checks CONFIRM (5 s) apart; function mode first waits for the count to
    // stand still as long.
    worker
        .wait_value(STALE_WORK, Some(N as f64), Duration::from_secs(30))
        .await;
    assert_eq!(worker.value(STALE_ALL).await, Some(N as f64));
    assert_eq!(
        worker.value(PENDING_ALL).await,
        Some(0.0),
        "{}",
        worker.metrics().await
    );
    assert_eq!(
        worker.value(PENDING_WORK).await,
        None,
        "{}",
        worker.metrics().await
    );
    let log = worker.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("stale messages"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning:\n{log}");
    assert!(
        warnings[0].contains("WARN")
            && warnings[0].contains("faas-request.work.openfaas-fn")
            && warnings[0].contains("queue purge --function work.openfaas-fn"),
        "{}",
        warnings[0]
    );
    assert_eq!(
        env.gateway.calls_to("work"),
        N,
        "the stale messages are not run again"
    );

    // New work is run, and only it is pending; the stale ones stay stale.
    env.gateway.script(
        "work",
        vec![Step::status(200).delay(Duration::from_secs(2))],
    );
    submit(&env.config(&[]), "work", 2).await;
    worker
        .wait_value(PENDING_WORK, Some(2.0), Duration::from_secs(10))
        .await;
    assert_eq!(worker.value(STALE_WORK).await, Some(N as f64));
    env.gateway
        .wait_for("the new jobs", Duration::from_secs(20), |g| {
            g.calls_to("work") == N + 2
        })
        .await;

    // The advice works: once purged, the figure clears, with a line saying so.
    worker
        .wait_value(PENDING_WORK, None, Duration::from_secs(10))
        .await;
    let (code, out, err) = cli(
        &env.nats.url(),
        &["queue", "purge", "--function", "work.openfaas-fn"],
    )
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    worker
        .wait_value(STALE_WORK, None, Duration::from_secs(10))
        .await;
    worker
        .wait_value(STALE_ALL, Some(0.0), Duration::from_secs(10))
        .await;
    assert!(
        worker.log().contains("stale messages gone"),
        "{}",
        worker.log()
    );
    assert_eq!(env.gateway.calls_to("work"), N + 2);
    worker.child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_messages_static_mode() {
    stale_messages_are_reported_not_run_and_left_out_of_pending("static").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_messages_function_mode() {
    stale_messages_are_reported_not_run_and_left_out_of_pending("function").await;
}

/// Publishing and acknowledging all the time, with pauses, long calls and delayed retries
/// (counts that stand still while the consumer owes them): never a stale message.
async fn no_stale_messages_under_load(mode: &str) {
    let env = Env::start().await;
    env.gateway.script(
        "work",
        vec![Step::status(200).delay(Duration::from_millis(30))],
    );
    env.gateway.script(
        "slow",
        vec![Step::status(200).delay(Duration::from_secs(12))],
    );
    env.gateway
        .script("flaky", vec![Step::status(503), Step::status(200)]);
    let overrides = [
        ("scaling_mode", mode),
        ("max_inflight", "8"),
        ("initial_retry_wait", "8s"),
        ("max_retry_wait", "8s"),
    ];
    let worker = env.worker(&overrides).await;
    let config = env.config(&overrides);
    submit(&config, "slow", 1).await;
    submit(&config, "flaky", 1).await;
    let publisher = {
        let config = config.clone();
        tokio::spawn(async move {
            // Bursts, and a pause longer than the confirmation time.
            for round in 0..30 {
                if round == 12 {
                    tokio::time::sleep(Duration::from_secs(6)).await;
                }
                submit(&config, "work", 10).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut scrapes = 0;
    while Instant::now() < deadline {
        let text = scrape(&worker).await;
        assert_eq!(
            sample(&text, STALE_ALL),
            Some(0.0),
            "a false stale report under load:\n{text}"
        );
        assert!(!text.contains("queue_worker_stale_messages{function_name=\"work"));
        scrapes += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(scrapes > 50);
    publisher.await.unwrap();
    env.gateway
        .wait_for("every job", Duration::from_secs(20), |g| {
            g.calls_to("work") == 300 && g.calls_to("slow") == 1 && g.calls_to("flaky") == 2
        })
        .await;
    crate::support::stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_messages_under_load_static_mode() {
    no_stale_messages_under_load("static").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_messages_under_load_function_mode() {
    no_stale_messages_under_load("function").await;
}
