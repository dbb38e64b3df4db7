//! The ledger every reliability case ends with, in the style of Jepsen's queue checker: every
//! job published (its call id), every call the function saw, what JetStream still holds and
//! what went to the dead-letter stream, classified once the run is over.
//!
//! Classes, per published job:
//! - **ok**: run to an answer that may have succeeded exactly once;
//! - **duplicated**: more than one call that may have succeeded (a 2xx answer, or a call whose
//!   caller went away before the answer, as a killed worker's calls do: the real function
//!   would have finished it). Calls answered with a failure status are retries by policy, not
//!   duplicates, and so are rejections (429 from the platform);
//! - **dead-lettered**: in the dead-letter stream (whatever its calls);
//! - **lost**: none of the above: never run to an answer that may have succeeded, and not
//!   dead-lettered;
//!
//! and, over the calls: **unexpected**: a call with a call id that was never published.
//!
//! `acked` counts published jobs no longer in the source stream (WorkQueue retention: a
//! message leaves the stream when it is acknowledged or terminated).

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::time::Duration;

use queue_worker::config::Config;

use crate::support::{FakeGateway, Recorded};

/// The classified outcome of one case.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub published: usize,
    /// Calls the function saw (rejections by the platform excluded).
    pub runs: usize,
    pub acked: usize,
    pub ok: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub unexpected: usize,
    pub dead_lettered: usize,
}

impl Tally {
    /// Nothing lost, nothing unexpected, nothing dead-lettered, every job acknowledged.
    #[track_caller]
    pub fn assert_nothing_lost(&self) {
        assert_eq!(
            (self.lost, self.unexpected, self.dead_lettered),
            (0, 0, 0),
            "{self:?}"
        );
        assert_eq!(self.acked, self.published, "{self:?}");
    }

    /// Duplicates only among the `held` calls in flight at a kill.
    #[track_caller]
    pub fn assert_duplicates_within(&self, held: u64) {
        assert!(
            self.duplicated as u64 <= held,
            "{} duplicates, but only {held} calls were in flight at the kill: {self:?}",
            self.duplicated
        );
    }
}

/// Collects what a case did.
pub struct Ledger {
    published: Vec<String>,
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger {
            published: Vec::new(),
        }
    }

    pub fn published(&mut self, ids: impl IntoIterator<Item = String>) {
        self.published.extend(ids);
    }

    pub fn count(&self) -> usize {
        self.published.len()
    }

    pub fn ids(&self) -> &[String] {
        &self.published
    }

    /// Classifies every published job from the function's calls, the call ids still in the
    /// source stream and the call ids dead-lettered.
    pub fn tally(
        &self,
        calls: &[Recorded],
        remaining: &HashSet<String>,
        dead: &HashSet<String>,
    ) -> Tally {
        let published: HashSet<&str> = self.published.iter().map(String::as_str).collect();
        let mut maybe_succeeded: HashMap<&str, usize> = HashMap::new();
        let mut t = Tally {
            published: self.published.len(),
            ..Tally::default()
        };
        let mut unexpected = HashSet::new();
        for call in calls {
            if call.headers.contains_key("x-test-rejected") {
                continue;
            }
            t.runs += 1;
            let id = call.headers.get("x-call-id").and_then(|v| v.to_str().ok());
            let Some(id) = id.filter(|id| published.contains(id)) else {
                unexpected.insert(call.call_id());
                continue;
            };
            let success = match call.status {
                None => true,
                Some(s) => (200..300).contains(&s),
            };
            if success {
                *maybe_succeeded.entry(id).or_default() += 1;
            }
        }
        t.unexpected = unexpected.len();
        for id in &self.published {
            if !remaining.contains(id) {
                t.acked += 1;
            }
            if dead.contains(id) {
                t.dead_lettered += 1;
                continue;
            }
            match maybe_succeeded.get(id.as_str()).copied().unwrap_or(0) {
                0 => t.lost += 1,
                1 => t.ok += 1,
                _ => t.duplicated += 1,
            }
        }
        t
    }

    /// The tally from a fake gateway's calls and what the stream and the dead-letter stream
    /// hold now.
    pub async fn settle(&self, gateway: &FakeGateway, config: &Config) -> Tally {
        let client = queue_worker::nats::connect_once(&config.nats)
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        let remaining = stream_call_ids(&js, &config.stream_name()).await;
        let dead = dead_letter_ids(js, config).await;
        self.tally(&gateway.calls(), &remaining, &dead)
    }
}

/// The call id (`Nats-Msg-Id`, which the publisher sets to it) of every message still in
/// `stream`.
pub async fn stream_call_ids(js: &async_nats::jetstream::Context, stream: &str) -> HashSet<String> {
    let Ok(s) = js.get_stream(stream).await else {
        return HashSet::new();
    };
    let state = s.cached_info().state.clone();
    let mut out = HashSet::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await {
            if let Some(id) = m.headers.get("Nats-Msg-Id") {
                out.insert(id.to_string());
            }
        }
    }
    out
}

/// The call ids in the dead-letter stream, read as the `dead` commands do.
pub async fn dead_letter_ids(
    js: async_nats::jetstream::Context,
    config: &Config,
) -> HashSet<String> {
    let dl = queue_worker::worker::deadletter::DeadLetters::new(
        js,
        queue_worker::nats::stream::DeadLetterLayout::of(config),
        &config.queue,
        &config.stream_name(),
        &config.default_namespace,
    );
    match dl.list(&Default::default(), false).await {
        Ok(records) => records.into_iter().map(|r| r.call_id).collect(),
        Err(_) => HashSet::new(),
    }
}

/// What a case reports besides its tally.
#[derive(Debug, Default, Clone)]
pub struct Extra {
    /// From the fault's end (NATS back, a new leader elected) to the first call after it.
    pub resume: Option<Duration>,
    /// Calls in flight at a kill (the consumer's ack-pending right after it).
    pub in_flight_at_kill: Option<u64>,
    /// Messages run and acknowledged that the stream still counts (a server fault), as the
    /// worker reported them (`queue_worker_stale_messages`).
    pub stale: Option<usize>,
}

/// Prints the case's line, and appends it as JSON to `$QW_LEDGER_OUT` when set (the
/// reliability script builds RELIABILITY.md's table from those lines).
pub fn report(case: &str, t: &Tally, extra: &Extra) {
    let server = server_version();
    let line = serde_json::json!({
        "case": case,
        "server": server,
        "published": t.published,
        "runs": t.runs,
        "acked": t.acked,
        "ok": t.ok,
        "lost": t.lost,
        "duplicated": t.duplicated,
        "unexpected": t.unexpected,
        "dead_lettered": t.dead_lettered,
        "resume_ms": extra.resume.map(|d| d.as_millis() as u64),
        "in_flight_at_kill": extra.in_flight_at_kill,
        "stale": extra.stale,
    });
    eprintln!("LEDGER {line}");
    if let Some(path) = std::env::var_os("QW_LEDGER_OUT") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// The nats-server version the harness runs (`nats-server --version`).
pub fn server_version() -> String {
    let Some(bin) = queue_worker::dev::natsd::find_binary() else {
        return "unknown".into();
    };
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().last().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(id: &str, status: Option<u16>, rejected: bool) -> Recorded {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("x-call-id", id.parse().unwrap());
        if rejected {
            headers.insert("x-test-rejected", "1".parse().unwrap());
        }
        Recorded {
            method: axum::http::Method::POST,
            path: "/function/f".into(),
            query: None,
            headers,
            body: Default::default(),
            started: std::time::Instant::now(),
            finished: status.map(|_| std::time::Instant::now()),
            status,
        }
    }

    #[test]
    fn classifies_every_job() {
        let mut ledger = Ledger::new();
        ledger.published(
            ["ok", "retried", "dup", "cut", "lost", "dead", "waiting"].map(String::from),
        );
        let calls = vec![
            call("ok", Some(200), false),
            // Failures and rejections are retries by policy.
            call("retried", Some(500), false),
            call("retried", Some(429), true),
            call("retried", Some(202), false),
            call("dup", Some(200), false),
            call("dup", Some(200), false),
            // A call its caller abandoned may have succeeded: run again, it is a duplicate.
            call("cut", None, false),
            call("cut", Some(200), false),
            call("dead", Some(500), false),
            call("stranger", Some(200), false),
        ];
        let remaining: HashSet<String> = ["waiting".to_string()].into();
        let dead: HashSet<String> = ["dead".to_string()].into();
        let t = ledger.tally(&calls, &remaining, &dead);
        assert_eq!(
            t,
            Tally {
                published: 7,
                runs: 9,
                acked: 6,
                ok: 2,
                lost: 2,
                duplicated: 2,
                unexpected: 1,
                dead_lettered: 1,
            }
        );
    }
}
