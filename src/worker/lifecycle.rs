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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures_util::future::{AbortHandle, AbortRegistration};
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::message::fingerprint::Fnv1a;
use crate::nats::calls::{self, Record, State};
use crate::telemetry::metrics::Metrics;

/// Most cancels one replica remembers; past it the oldest are forgotten first. The bucket
/// bounds them too, but a flood of cancels of unknown ids must not grow a worker's memory
/// with it (about 100 bytes each).
const MAX_CANCELS: usize = 250_000;

/// Cancelled calls and running calls.
#[derive(Default)]
struct Registry {
    /// By key (`nats/calls.rs` `key_of`: the id itself for usual ids): when the cancel was
    /// stored (the server's clock), and when this replica saw it.
    cancelled: HashMap<String, (SystemTime, Instant)>,
    /// Keys in the order they were seen, for forgetting the oldest (an entry whose key was
    /// seen again later is skipped).
    order: VecDeque<(Instant, String)>,
    /// Running calls by (FNV-1a 64 of the key, a number of the job's own), with when their
    /// message was stored: no copy of the id per job. Ids are chosen by callers and may
    /// repeat, so a cancel stops every job with that hash stored before it (a scan of at
    /// most `max_inflight` entries, only on a cancel).
    running: HashMap<(u64, u64), (AbortHandle, SystemTime)>,
    next: u64,
}

fn hash(key: &str) -> u64 {
    Fnv1a::default().bytes(key.as_bytes()).finish()
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

    /// A job with `call_id`, whose message was stored at `stored`, starts. A cancel applies
    /// to the calls stored before it only: a caller that reuses an id after cancelling it
    /// gets its new call run.
    pub fn begin(self: &Arc<Self>, call_id: &str, stored: SystemTime) -> Begin {
        let key = calls::key_of(call_id);
        let h = hash(&key);
        let (handle, registration) = AbortHandle::new_pair();
        let mut r = self.lock();
        if !r.cancelled.is_empty()
            && r.cancelled
                .get(key.as_ref())
                .is_some_and(|(at, _)| stored <= *at)
        {
            return Begin::Cancelled;
        }
        let n = r.next;
        r.next = n.wrapping_add(1);
        r.running.insert((h, n), (handle.clone(), stored));
        drop(r);
        Begin::Run(
            Guard {
                cancels: self.clone(),
                key: (h, n),
                handle,
            },
            registration,
        )
    }

    /// A cancel of the call with key `key`, stored at `at`, was seen (written now, or found
    /// at start-up); true when it stopped a running call.
    pub fn cancel(&self, key: &str, at: SystemTime) -> bool {
        let now = Instant::now();
        let h = hash(key);
        let mut r = self.lock();
        while let Some((seen, _)) = r.order.front() {
            if now.duration_since(*seen) < self.ttl && r.cancelled.len() < MAX_CANCELS {
                break;
            }
            if let Some((seen, old)) = r.order.pop_front() {
                if r.cancelled.get(&old).is_some_and(|(_, s)| *s == seen) {
                    r.cancelled.remove(&old);
                }
            }
        }
        r.cancelled.insert(key.to_string(), (at, now));
        r.order.push_back((now, key.to_string()));
        let mut stopped = false;
        for ((of, _), (handle, stored)) in &r.running {
            if *of == h && *stored <= at {
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
            let removed = message
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
            let key = message.subject.as_str().rsplit_once(".c.").map(|(_, k)| k);
            if let (false, Some(key)) = (removed, key) {
                // When JetStream stored the cancel: it applies to calls stored before.
                let at = message
                    .info()
                    .map(|i| SystemTime::from(i.published))
                    .unwrap_or_else(|_| SystemTime::now());
                let shown = calls::id_of(key).unwrap_or_else(|| key.to_string());
                if self.cancel(key, at) {
                    tracing::info!(callId = %shown, "Cancel received; dropping the running call");
                } else {
                    tracing::debug!(callId = %shown, "Cancel received");
                }
            }
            // Only once this one is in: nothing is pulled before every stored cancel is.
            if initial > 0 {
                initial -= 1;
                if initial == 0 {
                    self.loaded.cancel();
                }
            }
        }
        anyhow::bail!("the watch ended")
    }
}

/// Records waiting to be written; past it a record is dropped and counted, never waited for.
const STATUS_QUEUE: usize = 10_000;

/// Writes call records (`call_status`): jobs hand records to one writer task through a
/// bounded queue and never wait, so a slow or stalled server costs records, not calls. The
/// task publishes them in order on the one connection (a call's records land in the order
/// they were made) and awaits each acknowledgement on its own task.
pub struct StatusWriter {
    tx: tokio::sync::mpsc::Sender<Record>,
    queue: String,
    metrics: Arc<Metrics>,
}

impl StatusWriter {
    pub fn new(js: jetstream::Context, queue: &str, metrics: Arc<Metrics>) -> StatusWriter {
        let (tx, rx) = tokio::sync::mpsc::channel(STATUS_QUEUE);
        let prefix = format!("$KV.{}.s.", calls::bucket_name(queue));
        tokio::spawn(write_records(js, prefix, rx, metrics.clone()));
        StatusWriter {
            tx,
            queue: queue.to_string(),
            metrics,
        }
    }

    /// A record of this queue in `state`.
    pub fn record(&self, call_id: &str, state: State, function: &str) -> Record {
        Record::new(call_id, state, function, &self.queue)
    }

    /// Queues `record` for writing, after this job's earlier records; dropped and counted
    /// (`result="dropped"`) when the queue is full. A status is information; the work queue
    /// is the truth.
    pub fn write(&self, record: Record) {
        if self.tx.try_send(record).is_err() {
            self.metrics.status_write("dropped");
        }
    }
}

async fn write_records(
    js: jetstream::Context,
    prefix: String,
    mut rx: tokio::sync::mpsc::Receiver<Record>,
    metrics: Arc<Metrics>,
) {
    while let Some(record) = rx.recv().await {
        let Ok(payload) = serde_json::to_vec(&record) else {
            continue;
        };
        let subject = format!("{prefix}{}", calls::key_of(&record.call_id));
        match js.publish(subject, Bytes::from(payload)).await {
            Ok(ack) => {
                let metrics = metrics.clone();
                let call_id = record.call_id;
                tokio::spawn(async move {
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
        match c.begin(id, SystemTime::UNIX_EPOCH) {
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
        let t = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert!(!c.cancel("a", t(10)));
        assert!(matches!(c.begin("a", t(5)), Begin::Cancelled));
        // A call stored after the cancel (the caller reused the id) runs.
        assert!(matches!(c.begin("a", t(11)), Begin::Run(..)));
        // Started first: the cancel aborts it, and every message sharing the id.
        let (one, call_one) = run(&c, "b");
        let (two, call_two) = run(&c, "b");
        assert!(!one.is_cancelled());
        assert!(c.cancel("b", t(10)));
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
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        c.cancel("old", t);
        tokio::time::advance(Duration::from_secs(11)).await;
        c.cancel("new", t);
        assert_eq!(c.len(), 1);
        assert!(matches!(
            c.begin("old", SystemTime::UNIX_EPOCH),
            Begin::Run(..)
        ));
        assert!(matches!(
            c.begin("new", SystemTime::UNIX_EPOCH),
            Begin::Cancelled
        ));
    }
}
