//! A call's life by its id, on the worker's side: cancels (every replica watches the
//! queue's `c.>` keys, see `nats/calls.rs`) and, with `call_status`, the record of each
//! call's state.
//!
//! A cancel that arrives before the call's message is handled is kept in [`Cancels`]; the
//! message is then settled without a call. A cancel that finds the call running trips its
//! token, and the job drops the HTTP request at once. Both checks and both insertions happen
//! under one lock, so a cancel and a start that race cannot miss each other.
//!
//! Per job this costs one lock, a map insert and a remove (no I/O); status writes are
//! JetStream publishes whose acknowledgement is awaited on a tracked task, never by the job,
//! and are sent in order on the one connection, so a call's records land in the order they
//! were written.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures_util::future::{AbortHandle, AbortRegistration};
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::message::fingerprint::Fnv1a;
use crate::nats::calls::{self, Record, State};
use crate::telemetry::metrics::Metrics;

/// Cancelled ids and running calls.
#[derive(Default)]
struct Registry {
    cancelled: HashSet<String>,
    /// When each id was cancelled, oldest first: ids older than the bucket's TTL are gone
    /// from the bucket and are dropped here too, so memory stays bounded by the bucket.
    order: VecDeque<(Instant, String)>,
    /// Running calls by (FNV-1a 64 of the call id, a number of the job's own): no copy of
    /// the id per job. Ids are chosen by callers and may repeat, so a cancel stops every
    /// job with the id's hash (a scan of at most `max_inflight` entries, only on a cancel).
    running: HashMap<(u64, u64), AbortHandle>,
    next: u64,
}

fn hash(call_id: &str) -> u64 {
    Fnv1a::default().bytes(call_id.as_bytes()).finish()
}

/// What a job learns when it starts.
pub enum Begin {
    /// Cancelled before it started: settle it, do not call.
    Cancelled,
    /// Run it inside `Abortable::new(call, registration)`: a cancel arriving meanwhile
    /// aborts it (an atomic flag checked at each poll; no lock on the call's path).
    Run(Guard, AbortRegistration),
}

/// Registered as running until dropped.
pub struct Guard {
    cancels: Arc<Cancels>,
    key: (u64, u64),
    handle: AbortHandle,
}

impl Guard {
    /// A cancel arrived since the job began.
    pub fn is_cancelled(&self) -> bool {
        self.handle.is_aborted()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.cancels.lock().running.remove(&self.key);
    }
}

/// The replica's view of the queue's cancels.
pub struct Cancels {
    registry: Mutex<Registry>,
    ttl: Duration,
    /// Cancelled once the bucket's cancels at start-up are in `registry`.
    loaded: CancellationToken,
}

impl Cancels {
    pub fn new(ttl: Duration) -> Arc<Cancels> {
        Arc::new(Cancels {
            registry: Mutex::new(Registry::default()),
            ttl,
            loaded: CancellationToken::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A job with `call_id` starts.
    pub fn begin(self: &Arc<Self>, call_id: &str) -> Begin {
        let h = hash(call_id);
        let (handle, registration) = AbortHandle::new_pair();
        let mut r = self.lock();
        if !r.cancelled.is_empty() && r.cancelled.contains(call_id) {
            return Begin::Cancelled;
        }
        let key = (h, r.next);
        r.next = r.next.wrapping_add(1);
        r.running.insert(key, handle.clone());
        drop(r);
        Begin::Run(
            Guard {
                cancels: self.clone(),
                key,
                handle,
            },
            registration,
        )
    }

    /// A cancel of `call_id` was seen (written now, or found at start-up); true when it
    /// stopped a running call.
    pub fn cancel(&self, call_id: &str) -> bool {
        let now = Instant::now();
        let h = hash(call_id);
        let mut r = self.lock();
        while let Some((at, _)) = r.order.front() {
            if now.duration_since(*at) < self.ttl {
                break;
            }
            if let Some((_, id)) = r.order.pop_front() {
                r.cancelled.remove(&id);
            }
        }
        if r.cancelled.insert(call_id.to_string()) {
            r.order.push_back((now, call_id.to_string()));
        }
        let mut stopped = false;
        for ((of, _), handle) in &r.running {
            if *of == h {
                handle.abort();
                stopped = true;
            }
        }
        stopped
    }

    /// How many cancelled ids are remembered.
    pub fn len(&self) -> usize {
        self.lock().cancelled.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves once the cancels already in the bucket are loaded: the worker pulls nothing
    /// before, so a call cancelled while no worker ran is never called.
    pub async fn loaded(&self) {
        self.loaded.cancelled().await
    }

    /// Watches the bucket's cancels (`c.>`) until `stop`: those already there first (then
    /// [`Cancels::loaded`] resolves), then each new one. An ordered consumer, made again
    /// when it fails or ends (NATS restarted, bucket re-created); cancels seen twice are
    /// harmless.
    pub async fn watch(
        self: Arc<Self>,
        js: jetstream::Context,
        layout: calls::CallsLayout,
        stop: CancellationToken,
    ) {
        let bucket = layout.bucket.clone();
        let mut wait = Duration::from_millis(100);
        let mut first = true;
        loop {
            // After a failure the bucket may be gone (deleted by an operator): made again,
            // as the dead-letter stream is.
            let watched = tokio::select! {
                r = async {
                    if !first {
                        calls::ensure_bucket(&js, &layout).await?;
                    }
                    self.watch_once(&js, &bucket, &mut wait).await
                } => r,
                _ = stop.cancelled() => return,
            };
            first = false;
            if let Err(e) = watched {
                tracing::warn!(bucket, error = %e, retry_in = ?wait, "cannot watch cancels; trying again");
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    async fn watch_once(
        &self,
        js: &jetstream::Context,
        bucket: &str,
        wait: &mut Duration,
    ) -> anyhow::Result<()> {
        let stream = js.get_stream(format!("KV_{bucket}")).await?;
        let consumer = stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: js.client().new_inbox(),
                filter_subject: format!("$KV.{bucket}.c.>"),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await?;
        let mut initial = consumer.cached_info().num_pending;
        if initial == 0 {
            self.loaded.cancel();
        }
        let mut messages = consumer.messages().await?;
        while let Some(message) = messages.next().await {
            let message = message?;
            *wait = Duration::from_millis(100);
            if initial > 0 {
                initial -= 1;
                if initial == 0 {
                    self.loaded.cancel();
                }
            }
            let removed = message
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
            if removed {
                continue;
            }
            let Some(id) = message
                .subject
                .as_str()
                .rsplit_once(".c.")
                .and_then(|(_, key)| calls::id_of(key))
            else {
                continue;
            };
            if self.cancel(&id) {
                tracing::info!(callId = %id, "Cancel received; dropping the running call");
            } else {
                tracing::debug!(callId = %id, "Cancel received");
            }
        }
        anyhow::bail!("the watch ended")
    }
}

/// Writes call records (`call_status`).
pub struct StatusWriter {
    js: jetstream::Context,
    /// `$KV.<bucket>.s.`
    prefix: String,
    queue: String,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
}

impl StatusWriter {
    pub fn new(
        js: jetstream::Context,
        queue: &str,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
    ) -> StatusWriter {
        StatusWriter {
            js,
            prefix: format!("$KV.{}.s.", calls::bucket_name(queue)),
            queue: queue.to_string(),
            metrics,
            tracker,
        }
    }

    /// A record of this queue in `state`.
    pub fn record(&self, call_id: &str, state: State, function: &str) -> Record {
        Record::new(call_id, state, function, &self.queue)
    }

    /// Sends `record` now (in order with this job's earlier writes); its acknowledgement is
    /// awaited on a tracked task, and a failure is counted and logged, never retried: a
    /// status is information, the queue is the truth.
    ///
    /// Takes the record by value, so a caller that boxes this future (the job's task does,
    /// to keep its own future small when status is off) keeps nothing of it in its frame.
    pub async fn write(&self, record: Record) {
        let payload = match serde_json::to_vec(&record) {
            Ok(p) => Bytes::from(p),
            Err(_) => return,
        };
        let subject = format!("{}{}", self.prefix, calls::key_of(&record.call_id));
        let metrics = self.metrics.clone();
        match self.js.publish(subject, payload).await {
            Ok(ack) => {
                let call_id = record.call_id.clone();
                self.tracker.spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), ack).await {
                        Ok(Ok(_)) => metrics.status_write("ok"),
                        Ok(Err(e)) => {
                            tracing::debug!(callId = %call_id, error = %e, "call status not stored");
                            metrics.status_write("error");
                        }
                        Err(_) => metrics.status_write("error"),
                    }
                });
            }
            Err(e) => {
                tracing::debug!(callId = %record.call_id, error = %e, "call status not sent");
                metrics.status_write("error");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        c: &Arc<Cancels>,
        id: &str,
    ) -> (
        Guard,
        futures_util::future::Abortable<std::future::Pending<()>>,
    ) {
        match c.begin(id) {
            Begin::Run(guard, reg) => (
                guard,
                futures_util::future::Abortable::new(std::future::pending(), reg),
            ),
            Begin::Cancelled => panic!("{id} was cancelled"),
        }
    }

    #[tokio::test]
    async fn a_cancel_reaches_a_call_whichever_comes_first() {
        let c = Cancels::new(Duration::from_secs(60));
        // Cancelled before it starts: never runs.
        assert!(!c.cancel("a"));
        assert!(matches!(c.begin("a"), Begin::Cancelled));
        // Started first: the cancel aborts it, and every message sharing the id.
        let (one, call_one) = run(&c, "b");
        let (two, call_two) = run(&c, "b");
        assert!(!one.is_cancelled());
        assert!(c.cancel("b"));
        assert!(one.is_cancelled() && two.is_cancelled());
        assert!(call_one.await.is_err(), "the call is aborted");
        assert!(call_two.await.is_err());
        // Once both are gone nothing is registered as running.
        drop((one, two));
        assert!(c.lock().running.is_empty());
        // Another id is untouched.
        let (other, _) = run(&c, "c");
        assert!(!other.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn cancels_older_than_the_bucket_ttl_are_forgotten() {
        let c = Cancels::new(Duration::from_secs(10));
        c.cancel("old");
        tokio::time::advance(Duration::from_secs(11)).await;
        c.cancel("new");
        assert_eq!(c.len(), 1);
        assert!(matches!(c.begin("old"), Begin::Run(..)));
        assert!(matches!(c.begin("new"), Begin::Cancelled));
    }
}
