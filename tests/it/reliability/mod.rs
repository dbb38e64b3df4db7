//! The reliability suite: the faults a Kubernetes cluster produces, each case ending in a
//! ledger check (`ledger.rs`). Workers that must die abruptly run as processes (the real
//! binary, `kill -9`, `SIGTERM`); the others in-process. Every case prints a `LEDGER` line
//! and appends it to `$QW_LEDGER_OUT` when set: `scripts/reliability` runs the suite against
//! each server version and builds RELIABILITY.md's table from those lines.
//!
//! `QW_SOAK=<n>` multiplies the job counts (`scripts/reliability --soak`); CI runs `1`.

pub mod ledger;

mod function_faults;
mod mode_faults;
mod nats_faults;
mod worker_faults;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use queue_worker::dev::natsd::free_port;

/// The soak multiplier (`QW_SOAK`, default 1).
pub fn soak() -> usize {
    std::env::var("QW_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// The worker binary as a process, configured through environment variables like a pod.
pub struct WorkerProc {
    child: tokio::process::Child,
    pub metrics_port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl WorkerProc {
    /// Starts the binary with exactly these settings (plus a free metrics port).
    pub fn spawn(pairs: &[(String, String)]) -> WorkerProc {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("worker.log");
        let out = std::fs::File::create(&log).unwrap();
        let metrics_port = free_port().unwrap();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info");
        for (k, v) in pairs {
            cmd.env(k, v);
        }
        cmd.env("metrics_port", metrics_port.to_string());
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        WorkerProc {
            child,
            metrics_port,
            log,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self) {
        let url = format!("http://127.0.0.1:{}/readyz", self.metrics_port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("worker exited with {status}:\n{}", self.log());
            }
            if let Ok(r) = reqwest::get(&url).await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "worker not ready:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill -9`: no drain, no goodbye.
    pub async fn kill9(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// `SIGTERM`, as Kubernetes sends at a pod's deletion.
    pub fn sigterm(&self) {
        let pid = self.child.id().expect("worker still running");
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {pid} failed");
    }

    /// `SIGTERM`, then a clean exit (code 0) within 30 s.
    pub async fn stop(&mut self) {
        self.sigterm();
        let code = self.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(
            code,
            Some(0),
            "the worker did not exit cleanly:\n{}",
            self.log()
        );
    }

    /// Waits for the process to end; its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.unwrap().code(),
            Err(_) => panic!("worker still running after {timeout:?}:\n{}", self.log()),
        }
    }
}

/// The consumer's ack-pending count (messages delivered and not yet acknowledged).
pub async fn ack_pending(js: &async_nats::jetstream::Context, consumer: &str) -> u64 {
    let stream = js.get_stream("OF_faas-request").await.unwrap();
    stream
        .consumer_info(consumer)
        .await
        .unwrap()
        .num_ack_pending as u64
}

/// Every consumer's ack-pending count, summed (function mode: one consumer per function).
pub async fn ack_pending_all(js: &async_nats::jetstream::Context) -> u64 {
    use futures_util::TryStreamExt;
    let stream = js.get_stream("OF_faas-request").await.unwrap();
    let infos: Vec<async_nats::jetstream::consumer::Info> =
        stream.consumers().try_collect().await.unwrap();
    infos.iter().map(|c| c.num_ack_pending as u64).sum()
}

/// Waits until every published job has been called at least once.
pub async fn wait_all_called(
    gateway: &crate::support::FakeGateway,
    ledger: &ledger::Ledger,
    timeout: Duration,
) {
    gateway
        .wait_for("every job called", timeout, |g| {
            let seen: std::collections::HashSet<String> =
                g.calls().iter().map(|c| c.call_id()).collect();
            ledger.ids().iter().all(|id| seen.contains(id))
        })
        .await;
}

/// The first call that started after `t`, measured from `t`.
pub fn first_call_after(gateway: &crate::support::FakeGateway, t: Instant) -> Option<Duration> {
    gateway
        .calls()
        .iter()
        .filter(|c| c.started > t)
        .map(|c| c.started - t)
        .min()
}
