//! queue-worker: runs OpenFaaS asynchronous invocations out of NATS JetStream.
//!
//! A message's path through the crate, one folder per stage:
//!
//! ```text
//! producers: message/ (QueueRequest, publish) ← frontdoor/ (POST /async-function/<name>), cli/ (publish)
//!     │
//! OF_<queue>  (nats/: connection, stream and consumer set-up)
//!     │
//! worker/: ① pull (only what can start) ─② job (decode) ─③ invoke (HTTP to
//!     <gateway>/function/<name>, lease renewed) ─④ retry::decide (pure) ─⑤ settle (ack /
//!     nak+delay / dead-letter, then term) ─⑥ callback ─⑦ telemetry/ (metrics)
//! ```
//!
//! # Layout
//! - [`config`]: keys, sources (flag > env > file > default), validation, durations.
//! - [`message`]: the `QueueRequest` wire format, what a function name is (`fn` or `fn.ns`),
//!   and publishing; shared by every producer
//!   and the worker.
//! - [`nats`]: the connection, and the stream and consumer layout.
//! - [`worker`]: the daemon: wiring and drain, the pull loop, one message's flow, and each
//!   stage of it (job, invoke, retry, callback, dead letter).
//! - [`frontdoor`]: `POST /async-function/<name>` publishes to the queue as the gateway does.
//! - [`cli`]: operator commands (`queue status/purge`, `dead list/replay/purge`).
//! - [`telemetry`]: logging, Prometheus metrics, the health and metrics endpoints.
//! - [`dev`]: development helpers, never on the production path: a local nats-server, a
//!   sample gateway, the demo.
//! - [`tls`]: the process-wide rustls provider.

pub mod cli;
pub mod config;
pub mod dev;
pub mod frontdoor;
pub mod message;
pub mod nats;
pub mod telemetry;
pub mod tls;
pub mod worker;

/// The layout's rules, checked on the source text (`use` lines and paths): what
/// ARCHITECTURE.md states as invariants about which module may know which.
#[cfg(test)]
mod layout_rules {
    use std::path::{Path, PathBuf};

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        if dir.is_file() {
            out.push(dir.to_path_buf());
            return;
        }
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// Files under `src/<under>` that name `crate::<what>`.
    fn naming(under: &str, what: &str) -> Vec<String> {
        mentioning(under, &format!("crate::{what}"))
    }

    /// Files under `src/<under>` whose code (not comments) contains `needle`.
    fn mentioning(under: &str, needle: &str) -> Vec<String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&root.join(under), &mut files);
        files
            .into_iter()
            .filter(|f| {
                let text = std::fs::read_to_string(f).unwrap();
                text.lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .any(|l| l.contains(needle))
            })
            .map(|f| f.strip_prefix(&root).unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn development_helpers_stay_off_the_production_path() {
        for stage in [
            "worker",
            "frontdoor",
            "nats",
            "message",
            "config",
            "telemetry",
        ] {
            assert_eq!(
                naming(stage, "dev"),
                Vec::<String>::new(),
                "{stage}/ uses dev/"
            );
        }
    }

    #[test]
    fn dependencies_run_one_way() {
        // The job knows its give-up reasons; the dead-letter store knows nothing of decoding.
        assert_eq!(
            naming("worker/deadletter.rs", "worker::job"),
            Vec::<String>::new()
        );
        // What producers write knows nothing of how it is run, served or operated.
        for later in ["worker", "frontdoor", "cli"] {
            assert_eq!(
                naming("message", later),
                Vec::<String>::new(),
                "message/ uses {later}"
            );
        }
        for stage in ["worker", "nats", "message", "config", "telemetry"] {
            for entry in ["frontdoor", "cli"] {
                assert_eq!(
                    naming(stage, entry),
                    Vec::<String>::new(),
                    "{stage}/ uses {entry}/"
                );
            }
        }
    }

    #[test]
    fn the_scheduler_and_limiter_stay_pure() {
        // Function mode's scheduler decides; the engine around it does the I/O. Keeping NATS
        // and HTTP out of it keeps it a table-tested value with no runtime to set up.
        for file in ["worker/schedule.rs", "worker/limiter.rs"] {
            for io in [
                "async_nats",
                "crate::nats",
                "hyper",
                "reqwest",
                "tokio::time::sleep",
            ] {
                assert_eq!(
                    mentioning(file, io),
                    Vec::<String>::new(),
                    "{file} uses {io}"
                );
            }
        }
        // The limiter counts events: no clock at all.
        assert_eq!(
            mentioning("worker/limiter.rs", "Instant"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn the_timing_gate_is_pure() {
        // When a call may run is a function of plain values: `now` is passed in, never read.
        for io in [
            "async_nats",
            "crate::nats",
            "hyper",
            "reqwest",
            "tokio",
            "async fn",
            "::now()",
            "Instant",
        ] {
            assert_eq!(
                mentioning("worker/timing.rs", io),
                Vec::<String>::new(),
                "worker/timing.rs uses {io}"
            );
        }
    }
}
