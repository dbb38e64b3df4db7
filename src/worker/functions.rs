//! ① Function mode's pull loop: one durable consumer per function with work, fair slots
//! across functions, and the reaper that deletes a function's consumer once it is idle.
//!
//! One task does it all, on events, with no per-function task, timer or inbox:
//!
//! - **Discovery** (`discovery.rs`) sends a [`Snapshot`] of every subject's count. A subject
//!   with messages becomes a bucket: its consumer (named by [`consumer_name`]) is created if
//!   absent, and the scheduler learns its depth.
//! - **Fair slots** (`schedule.rs`, pure) decide which function gets each free slot. For each
//!   grant the loop sends one `no_wait` pull request (`{"batch":n,"no_wait":true}`) to that
//!   function's consumer. The server answers at once: up to `n` messages, then (unless the
//!   batch was filled) a 404/408 status, so no slot is ever parked on a function that has
//!   nothing to deliver; what a request did not fill goes back to the pool at once.
//! - **One inbox**: every request's reply subject is `<inbox>.<request id>`, all under one
//!   wildcard subscription. Statuses arrive on their request's subject; messages carry their
//!   consumer's name in their ack subject. Each function has at most one request outstanding,
//!   so both map to exactly one request.
//! - **Slots** ([`Slot`]) are handed with each message and give themselves back on drop,
//!   waking this loop.
//! - **The reaper**: a function whose stream count has been zero for
//!   `consumer_inactive_threshold` (nothing queued, unacked or running on any replica) and
//!   that holds nothing here has its consumer deleted, after the server confirms it has no
//!   pending, unacked or waiting work ([`delete_if_idle`]; waiting requests seen on two
//!   looks a threshold apart are a dead replica's and no longer count). The server-side
//!   `inactive_threshold` is a backstop for replicas that die.
//! - **Keep-alives**: a function waiting for its turn longer than its consumer's server-side
//!   `inactive_threshold` gets an unfillable pull now and then, so the server keeps its
//!   consumer (`keep_alive`).
//! - **The mode marker**: [`keep_marker`] (its own task, stopped after the drain) keeps the
//!   [`MARKER`] consumer alive; while it lives, static-mode replicas do not take the stream
//!   back.
//!
//! A consumer that vanishes (the server's backstop, an operator) answers with a 409 or 503:
//! the bucket goes back to "absent" and is recreated while it has work. Its messages stay
//! in the stream (WorkQueue retention keeps them until acked), so nothing is lost; those
//! being run here are redelivered through the new consumer (at most the calls in flight).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::StatusCode;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::nats::consumers::{
    claim_function_mode, consumer_name, delete_if_idle, ensure_function_consumer, marker_exists,
    next_subject, ConsumerError, FunctionClaim, FunctionConsumer, Reaped, MARKER, MARKER_TOUCH,
};
use crate::nats::stream::Layout;
use crate::worker::discovery::Snapshot;
use crate::worker::schedule::{Delivery, FnId};
use crate::worker::slot::{Pool, Slot};

/// A `no_wait` request with no answer for this long is taken as lost: its consumer is gone
/// (see `expire_requests`), or a reconnect we did not see took it.
const REQUEST_LOST: Duration = Duration::from_secs(1);
/// Consumer creations and deletions in flight at once, so thousands of new functions do not
/// flood the JetStream API (its request queue holds 10,000).
const CONSUMER_OPS: usize = 16;
/// Wait before trying again to create a consumer the server refused.
const CREATE_RETRY: Duration = Duration::from_secs(2);
/// Housekeeping: lost requests, the reaper, the marker, refused creations, the claim.
const HOUSEKEEPING: Duration = Duration::from_millis(500);
/// While waiting for static replicas' calls to end: how often to say so.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(30);

/// What the function-mode pull loop needs.
pub struct FunctionPuller {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub layout: Layout,
    pub pool: Arc<Pool>,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// `consumer_inactive_threshold`: idle time before the worker deletes a consumer.
    pub inactive_threshold: Duration,
    /// The consumers' server-side `inactive_threshold`, a backstop for dead replicas: long
    /// enough that no call can outlast it (nats-server before 2.11.7 did not count
    /// unacknowledged messages as activity).
    pub backstop: Duration,
    /// Changes on every NATS reconnect.
    pub generation: watch::Receiver<u64>,
    /// Whether the stream is in function mode (the marker made). False while static-mode
    /// replicas still run calls on their consumer: nothing is created or pulled until they
    /// have ended ([`claim_function_mode`]); shared with [`keep_marker`].
    pub claimed: Arc<AtomicBool>,
}

/// The loop's claim on the stream.
#[derive(Default)]
struct Claim {
    /// A claim is being made.
    running: bool,
    /// Waiting for static-mode replicas' calls to end, since then.
    waiting_since: Option<Instant>,
    /// When the wait was last logged.
    told: Option<Instant>,
}

/// Where a function's consumer stands, as far as this replica knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consumer {
    Absent,
    Creating,
    Ready,
    /// Refused or unreachable: try again at this instant.
    Failed(Instant),
    Deleting,
}

/// One function bucket: a subject of the queue with its consumer.
struct Bucket {
    subject: String,
    /// The bare `<queue>` subject: every function of older gateways shares it, so no one
    /// function's cap annotation applies to it.
    legacy: bool,
    consumer: String,
    state: Consumer,
    depth: u64,
    /// Since when the stream has held nothing for it (the reaper's clock).
    idle_since: Option<Instant>,
    /// The outstanding pull request, if any.
    request: Option<(u64, Instant)>,
    /// When a pull or keep-alive last reached its consumer (see `keep_alive`).
    last_pull: Instant,
    /// The reaper's last look found only pull requests waiting on the idle consumer: on the
    /// next look they are a dead replica's ([`delete_if_idle`]).
    waiting_seen: bool,
}

/// Results of consumer set-up tasks, back to the loop.
enum Done {
    Created(FnId, Result<(), ConsumerError>),
    Deleted(FnId, Result<Reaped, ConsumerError>),
    Claimed(Result<FunctionClaim, ConsumerError>),
}

/// The loop's state: buckets in a slab (ids are the scheduler's [`FnId`]s).
struct Buckets {
    slab: Vec<Option<Bucket>>,
    free_ids: Vec<FnId>,
    by_subject: HashMap<String, FnId>,
    by_consumer: HashMap<String, FnId>,
    /// Buckets with depth 0: the reaper looks only at these.
    idle: HashSet<FnId>,
    /// Outstanding requests by id.
    requests: HashMap<u64, FnId>,
}

impl Buckets {
    fn get(&self, f: FnId) -> Option<&Bucket> {
        self.slab.get(f).and_then(Option::as_ref)
    }

    fn get_mut(&mut self, f: FnId) -> Option<&mut Bucket> {
        self.slab.get_mut(f).and_then(Option::as_mut)
    }

    fn insert(&mut self, queue: &str, subject: &str) -> FnId {
        let consumer = consumer_name(queue, subject);
        let bucket = Bucket {
            legacy: subject == queue,
            subject: subject.to_string(),
            consumer: consumer.clone(),
            state: Consumer::Absent,
            depth: 0,
            idle_since: None,
            request: None,
            last_pull: Instant::now(),
            waiting_seen: false,
        };
        let f = match self.free_ids.pop() {
            Some(f) => {
                self.slab[f] = Some(bucket);
                f
            }
            None => {
                self.slab.push(Some(bucket));
                self.slab.len() - 1
            }
        };
        self.by_subject.insert(subject.to_string(), f);
        self.by_consumer.insert(consumer, f);
        f
    }

    fn remove(&mut self, f: FnId) {
        if let Some(b) = self.slab.get_mut(f).and_then(Option::take) {
            self.by_subject.remove(&b.subject);
            self.by_consumer.remove(&b.consumer);
            if let Some((id, _)) = b.request {
                self.requests.remove(&id);
            }
            self.idle.remove(&f);
            self.free_ids.push(f);
        }
    }
}

impl FunctionPuller {
    /// Pulls until `stop` (the stream was claimed for function mode at start-up, and
    /// [`keep_marker`] keeps it so), handing each message and its slot to `dispatch`.
    /// Returns early only if the NATS connection is closed for good.
    pub async fn run<F>(mut self, stop: CancellationToken, mut dispatch: F)
    where
        F: FnMut(jetstream::Message, Option<Slot>),
    {
        tracing::info!(stream = %self.layout.stream, inactive_threshold = ?self.inactive_threshold, "Function mode: one consumer per function with work");

        let inbox = self.client.new_inbox();
        let mut sub = loop {
            match self.client.subscribe(format!("{inbox}.*")).await {
                Ok(sub) => break sub,
                Err(e) => {
                    if self.generation.has_changed().is_err() {
                        tracing::error!("the NATS connection is closed for good; pulls stop");
                        return;
                    }
                    tracing::warn!(error = %e, "cannot subscribe to the pull inbox; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        };
        self.generation.borrow_and_update();

        let queue = self.layout.queue.clone();
        let stream = self.layout.stream.clone();
        let mut b = Buckets {
            slab: Vec::new(),
            free_ids: Vec::new(),
            by_subject: HashMap::new(),
            by_consumer: HashMap::new(),
            idle: HashSet::new(),
            requests: HashMap::new(),
        };
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let ops = Arc::new(Semaphore::new(CONSUMER_OPS));
        let mut next_id: u64 = 1;
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut claim = Claim {
            waiting_since: (!self.claimed.load(Ordering::Relaxed)).then(Instant::now),
            ..Claim::default()
        };
        // A snapshot is applied as soon as the loop starts.
        self.snapshots.mark_changed();

        loop {
            // Hand out what is free, and ask for it. Not while disconnected: async-nats would
            // queue the requests and send them after the reconnect, when their ids are void.
            let connected =
                self.client.connection_state() == async_nats::connection::State::Connected;
            if connected && !stop.is_cancelled() {
                let grants = self.pool.lock().assign(Instant::now());
                for (f, n) in grants {
                    let id = next_id;
                    let Some(bucket) = b.get_mut(f) else {
                        // Should not happen: the scheduler knows only live buckets.
                        self.pool.lock().request_ended(f, Instant::now());
                        continue;
                    };
                    next_id += 1;
                    bucket.request = Some((id, Instant::now()));
                    bucket.last_pull = Instant::now();
                    let to = next_subject(&stream, &bucket.consumer);
                    b.requests.insert(id, f);
                    let payload = format!(r#"{{"batch":{n},"no_wait":true}}"#);
                    if let Err(e) = self
                        .client
                        .publish_with_reply(to, format!("{inbox}.{id}"), payload.into())
                        .await
                    {
                        tracing::warn!(error = %e, "pull request not sent");
                        b.requests.remove(&id);
                        if let Some(bucket) = b.get_mut(f) {
                            bucket.request = None;
                        }
                        self.pool.lock().request_ended(f, Instant::now());
                    }
                }
            }
            // While stopping or disconnected nothing is assigned, so a dry function's wake-up
            // (then in the past) would fire on every turn.
            let next_wake = if stop.is_cancelled() || !connected {
                None
            } else {
                self.pool.lock().next_wake()
            };

            tokio::select! {
                biased;
                _ = stop.cancelled(), if b.requests.is_empty() => break,
                changed = self.generation.changed() => {
                    if changed.is_err() {
                        tracing::error!("the NATS connection is closed for good; pulls stop");
                        return;
                    }
                    // Outstanding requests died with the old connection.
                    tracing::info!("resuming pulls after reconnect");
                    self.pool.lock().reset_requests();
                    for (_, f) in b.requests.drain() {
                        if let Some(bucket) = b.slab.get_mut(f).and_then(Option::as_mut) {
                            bucket.request = None;
                        }
                    }
                }
                _ = housekeeping.tick() => {
                    let now = Instant::now();
                    self.expire_requests(&mut b, now, &ops, &done_tx);
                    if stop.is_cancelled() || !connected {
                        continue;
                    }
                    if claim.waiting_since.is_some() {
                        self.claim(&mut claim, &done_tx);
                    }
                    self.keep_alive(&mut b, now, &inbox).await;
                    self.retry_failed(&mut b, now, &ops, &done_tx);
                    self.reap(&mut b, now, &ops, &done_tx);
                }
                msg = sub.next() => {
                    let Some(msg) = msg else {
                        tracing::error!("the pull inbox closed; pulls stop");
                        return;
                    };
                    self.on_message(msg, &inbox, &mut b, &stop, &mut dispatch);
                }
                Some(done) = done_rx.recv() => self.on_done(done, &mut b, &mut claim, &ops, &done_tx),
                changed = self.snapshots.changed(), if !stop.is_cancelled() => {
                    if changed.is_err() {
                        // Discovery ended; the worker's supervision notices.
                        tracing::error!("discovery stopped; pulls stop");
                        return;
                    }
                    let snapshot = self.snapshots.borrow_and_update().clone();
                    self.apply(&snapshot, &queue, &mut b, &ops, &done_tx);
                }
                _ = self.pool.wake.notified() => {}
                _ = sleep_until(next_wake) => {}
            }
        }
        // Stopping: no request is outstanding any more; whatever still arrives goes back.
        crate::worker::pull::hand_back(&mut sub, &self.js).await;
    }

    /// A message or status on the inbox.
    fn on_message<F>(
        &self,
        msg: async_nats::Message,
        inbox: &str,
        b: &mut Buckets,
        stop: &CancellationToken,
        dispatch: &mut F,
    ) where
        F: FnMut(jetstream::Message, Option<Slot>),
    {
        let now = Instant::now();
        let Some(status) = msg.status else {
            let msg = jetstream::Message {
                message: msg,
                context: self.js.clone(),
            };
            let f = msg
                .info()
                .ok()
                .and_then(|info| b.by_consumer.get(info.consumer).copied());
            let Some(f) = f else {
                nak_now(msg);
                return;
            };
            // Counted even while stopping, so a filled request still ends by its count.
            let delivery = self.pool.lock().delivered(f);
            match delivery {
                Delivery::Slot { request_done } => {
                    if request_done {
                        if let Some(bucket) = b.get_mut(f) {
                            if let Some((id, _)) = bucket.request.take() {
                                b.requests.remove(&id);
                            }
                        }
                    }
                    let slot =
                        Slot::function(self.pool.clone(), f, b.get(f).is_some_and(|b| !b.legacy));
                    if stop.is_cancelled() {
                        // Asked for before the stop: it goes back, and so does its slot.
                        drop(slot);
                        nak_now(msg);
                    } else {
                        dispatch(msg, Some(slot));
                    }
                }
                Delivery::Unexpected => nak_now(msg),
            }
            return;
        };
        let id: Option<u64> = msg
            .subject
            .as_str()
            .strip_prefix(inbox)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|id| id.parse().ok());
        let Some(f) = id.and_then(|id| b.requests.remove(&id)) else {
            return; // a request already given up on
        };
        if let Some(bucket) = b.get_mut(f) {
            bucket.request = None;
        }
        match status {
            StatusCode::IDLE_HEARTBEAT => {}
            StatusCode::TIMEOUT | StatusCode::NOT_FOUND => {
                self.pool.lock().request_ended(f, now);
            }
            _ if status == StatusCode::NO_RESPONDERS || describes_missing_consumer(&msg) => {
                // The consumer is gone (the server's backstop, an operator): recreate it
                // while the function has work.
                let mut sched = self.pool.lock();
                sched.request_ended(f, now);
                sched.set_ready(f, false);
                drop(sched);
                if let Some(bucket) = b.get_mut(f) {
                    tracing::warn!(consumer = %bucket.consumer, subject = %bucket.subject, "function consumer vanished; recreating it while it has work");
                    // Made again on the next housekeeping turn (discovery may see no change).
                    bucket.state = Consumer::Failed(now);
                }
            }
            _ => {
                let what = msg.description.clone().unwrap_or_default();
                tracing::debug!(%status, %what, "pull request ended");
                self.pool.lock().request_ended(f, now);
            }
        }
    }

    /// Applies a discovery snapshot: depths to the scheduler, consumers for new work.
    fn apply(
        &self,
        snapshot: &Snapshot,
        queue: &str,
        b: &mut Buckets,
        ops: &Arc<Semaphore>,
        done: &mpsc::UnboundedSender<Done>,
    ) {
        let now = Instant::now();
        let mut sched = self.pool.lock();
        for (subject, &depth) in &snapshot.depths {
            let f = match b.by_subject.get(subject) {
                Some(&f) => f,
                None => {
                    let f = b.insert(queue, subject);
                    if subject == queue {
                        // The legacy subject mixes functions: no message's cap is its cap.
                        sched.exempt(f);
                        sched.set_cap(f, None);
                    }
                    f
                }
            };
            sched.set_depth(f, depth);
            b.idle.remove(&f);
            let bucket = b.get_mut(f).expect("just looked up");
            bucket.depth = depth;
            bucket.idle_since = None;
            bucket.waiting_seen = false;
            if bucket.state == Consumer::Absent {
                bucket.state = Consumer::Creating;
                self.create(f, bucket, ops, done);
            }
        }
        let gone: Vec<FnId> = b
            .by_subject
            .iter()
            .filter(|(s, _)| !snapshot.depths.contains_key(*s))
            .map(|(_, &f)| f)
            .collect();
        for f in gone {
            let Some(bucket) = b.get_mut(f) else { continue };
            if bucket.depth != 0 || bucket.idle_since.is_none() {
                bucket.depth = 0;
                bucket.idle_since = Some(now);
                // A new idle period: the reaper's looks start again.
                bucket.waiting_seen = false;
                sched.set_depth(f, 0);
                b.idle.insert(f);
            }
        }
    }

    fn create(
        &self,
        f: FnId,
        bucket: &Bucket,
        ops: &Arc<Semaphore>,
        done: &mpsc::UnboundedSender<Done>,
    ) {
        if !self.claimed.load(Ordering::Relaxed) {
            // The server would refuse it (the static consumer still holds the stream).
            let why = "the stream is not in function mode yet".to_string();
            let _ = done.send(Done::Created(f, Err(ConsumerError::Blocked(why))));
            return;
        }
        let spec = FunctionConsumer {
            stream: self.layout.stream.clone(),
            name: bucket.consumer.clone(),
            subject: bucket.subject.clone(),
            ack_wait: self.layout.ack_wait,
            inactive_threshold: self.backstop,
        };
        let js = self.js.clone();
        let ops = ops.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let _op = ops.acquire_owned().await;
            let r = ensure_function_consumer(&js, &spec).await;
            let _ = done.send(Done::Created(f, r));
        });
    }

    /// Claims the stream (one claim at a time). Forced once the wait for static replicas has
    /// outlasted the backstop, which no call outlives: what is still unacknowledged then
    /// belongs to replicas that died.
    fn claim(&self, claim: &mut Claim, done: &mpsc::UnboundedSender<Done>) {
        if std::mem::replace(&mut claim.running, true) {
            return;
        }
        let force = claim
            .waiting_since
            .is_some_and(|since| since.elapsed() >= self.backstop);
        let js = self.js.clone();
        let layout = self.layout.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let r = claim_function_mode(&js, &layout, force).await;
            let _ = done.send(Done::Claimed(r));
        });
    }

    fn on_done(
        &self,
        done: Done,
        b: &mut Buckets,
        claim: &mut Claim,
        ops: &Arc<Semaphore>,
        done_tx: &mpsc::UnboundedSender<Done>,
    ) {
        let now = Instant::now();
        match done {
            Done::Created(f, result) => {
                let Some(bucket) = b.get_mut(f) else { return };
                if bucket.state != Consumer::Creating {
                    return;
                }
                match result {
                    Ok(()) => {
                        tracing::debug!(consumer = %bucket.consumer, subject = %bucket.subject, "function consumer ready");
                        bucket.state = Consumer::Ready;
                        self.pool.lock().set_ready(f, true);
                    }
                    Err(e) => {
                        bucket.state = Consumer::Failed(now + CREATE_RETRY);
                        match &e {
                            // Not ours yet: the housekeeping claims it.
                            ConsumerError::Blocked(_) if claim.waiting_since.is_some() => {}
                            ConsumerError::Blocked(_) => {
                                tracing::warn!(consumer = %bucket.consumer, error = %e, "function consumer blocked; taking the stream into function mode again");
                                self.claim(claim, done_tx);
                            }
                            _ => {
                                tracing::warn!(consumer = %bucket.consumer, error = %e, retry_in = ?CREATE_RETRY, "cannot create function consumer")
                            }
                        }
                    }
                }
            }
            Done::Deleted(f, result) => {
                let Some(bucket) = b.get_mut(f) else { return };
                match result {
                    Ok(Reaped::Gone) if bucket.depth > 0 => {
                        // Work came back while it was being deleted: make it again.
                        bucket.state = Consumer::Creating;
                        let bucket = b.get(f).expect("just seen");
                        self.create(f, bucket, ops, done_tx);
                    }
                    Ok(Reaped::Gone) => {
                        tracing::debug!(consumer = %bucket.consumer, "idle function consumer deleted");
                        if self.pool.lock().forget(f) {
                            b.remove(f);
                        } else {
                            bucket.state = Consumer::Absent;
                            bucket.idle_since = Some(now);
                            b.idle.insert(f);
                        }
                    }
                    kept => {
                        // Someone has work on it after all (a new message, another
                        // replica's pull), or the server did not answer: keep serving it.
                        if let Err(e) = &kept {
                            tracing::debug!(consumer = %bucket.consumer, error = %e, "could not delete idle consumer; trying later");
                        }
                        bucket.state = Consumer::Ready;
                        let idle = bucket.depth == 0;
                        // Only a look within one idle period counts as the first of two.
                        bucket.waiting_seen = idle && matches!(kept, Ok(Reaped::Waiting));
                        if idle {
                            bucket.idle_since = Some(now);
                            b.idle.insert(f);
                        }
                        self.pool.lock().set_ready(f, true);
                    }
                }
            }
            Done::Claimed(result) => {
                claim.running = false;
                match result {
                    Ok(FunctionClaim::Claimed) => {
                        self.claimed.store(true, Ordering::Relaxed);
                        if let Some(since) = claim.waiting_since.take() {
                            tracing::info!(stream = %self.layout.stream, waited = ?since.elapsed(), "Function mode: the static-mode replicas' calls have ended; the stream is ours");
                            claim.told = None;
                            // Consumers refused meanwhile: make them now.
                            for bucket in b.slab.iter_mut().flatten() {
                                if let Consumer::Failed(_) = bucket.state {
                                    bucket.state = Consumer::Failed(now);
                                }
                            }
                            self.retry_failed(b, now, ops, done_tx);
                        }
                    }
                    Ok(FunctionClaim::Wait { consumer, unacked }) => {
                        self.claimed.store(false, Ordering::Relaxed);
                        claim.waiting_since.get_or_insert(now);
                        if claim.told.is_none_or(|t| now >= t + WAIT_LOG_EVERY) {
                            claim.told = Some(now);
                            tracing::info!(stream = %self.layout.stream, consumer = %consumer, unacked, "Function mode: waiting for static-mode replicas to finish their calls before taking the stream over");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot take the stream into function mode; trying again");
                    }
                }
            }
        }
    }

    /// Requests with no answer after [`REQUEST_LOST`] are given up; their slots go back.
    /// A `no_wait` pull is answered at once, unless its consumer is gone: the server's
    /// JetStream API takes requests for a missing consumer and says nothing. So the
    /// consumer is checked (and made again if absent) before the function pulls again.
    fn expire_requests(
        &self,
        b: &mut Buckets,
        now: Instant,
        ops: &Arc<Semaphore>,
        done: &mpsc::UnboundedSender<Done>,
    ) {
        let lost: Vec<(u64, FnId)> = b
            .requests
            .iter()
            .filter(|(_, &f)| {
                b.get(f)
                    .and_then(|bucket| bucket.request)
                    .is_none_or(|(_, sent)| now >= sent + REQUEST_LOST)
            })
            .map(|(&id, &f)| (id, f))
            .collect();
        for (id, f) in lost {
            b.requests.remove(&id);
            {
                let mut sched = self.pool.lock();
                sched.request_ended(f, now);
                sched.set_ready(f, false);
            }
            let Some(bucket) = b.get_mut(f) else { continue };
            tracing::debug!(consumer = %bucket.consumer, "pull request unanswered; checking the consumer");
            bucket.request = None;
            if bucket.state == Consumer::Ready {
                bucket.state = Consumer::Creating;
                let bucket = b.get(f).expect("just seen");
                self.create(f, bucket, ops, done);
            }
        }
    }

    /// Keeps the consumers of functions waiting for their turn alive on the server: a
    /// consumer counts as active only when pulled, and with many functions queued a turn can
    /// come later than the server-side `inactive_threshold`. The keep-alive is a `no_wait`
    /// pull that cannot be filled (`max_bytes` 1: the server answers 409 and delivers
    /// nothing, checked on 2.9 and 2.15), sent once per third of the backstop to each
    /// consumer not pulled for that long. Its answer goes to request id 0, which no request
    /// has.
    async fn keep_alive(&self, b: &mut Buckets, now: Instant, inbox: &str) {
        let every = (self.backstop / 3).max(Duration::from_secs(1));
        for bucket in b.slab.iter_mut().flatten() {
            if bucket.state != Consumer::Ready
                || bucket.depth == 0
                || bucket.request.is_some()
                || now < bucket.last_pull + every
            {
                continue;
            }
            bucket.last_pull = now;
            let _ = self
                .client
                .publish_with_reply(
                    next_subject(&self.layout.stream, &bucket.consumer),
                    format!("{inbox}.0"),
                    r#"{"batch":1,"no_wait":true,"max_bytes":1}"#.into(),
                )
                .await;
        }
    }

    fn retry_failed(
        &self,
        b: &mut Buckets,
        now: Instant,
        ops: &Arc<Semaphore>,
        done: &mpsc::UnboundedSender<Done>,
    ) {
        let due: Vec<FnId> = b
            .slab
            .iter()
            .enumerate()
            .filter_map(|(f, bucket)| match bucket {
                Some(Bucket {
                    state: Consumer::Failed(at),
                    ..
                }) if now >= *at => Some(f),
                _ => None,
            })
            .collect();
        for f in due {
            let Some(bucket) = b.get_mut(f) else { continue };
            if bucket.depth == 0 {
                bucket.state = Consumer::Absent;
                continue;
            }
            bucket.state = Consumer::Creating;
            let bucket = b.get(f).expect("just seen");
            self.create(f, bucket, ops, done);
        }
    }

    /// Deletes consumers idle for `inactive_threshold`; forgets buckets that never got one.
    fn reap(
        &self,
        b: &mut Buckets,
        now: Instant,
        ops: &Arc<Semaphore>,
        done: &mpsc::UnboundedSender<Done>,
    ) {
        let candidates: Vec<FnId> = b.idle.iter().copied().collect();
        for f in candidates {
            let Some(bucket) = b.get(f) else {
                b.idle.remove(&f);
                continue;
            };
            let Some(since) = bucket.idle_since else {
                continue;
            };
            if bucket.depth > 0 || now < since + self.inactive_threshold {
                continue;
            }
            if !self.pool.lock().is_idle(f) {
                continue;
            }
            match bucket.state {
                Consumer::Ready => {}
                Consumer::Absent | Consumer::Failed(_) => {
                    if self.pool.lock().forget(f) {
                        b.remove(f);
                    }
                    continue;
                }
                Consumer::Creating | Consumer::Deleting => continue,
            }
            self.pool.lock().set_ready(f, false);
            b.idle.remove(&f);
            let bucket = b.get_mut(f).expect("just seen");
            bucket.state = Consumer::Deleting;
            let (js, stream, name, past_waiting) = (
                self.js.clone(),
                self.layout.stream.clone(),
                bucket.consumer.clone(),
                bucket.waiting_seen,
            );
            let (ops, done) = (ops.clone(), done.clone());
            tokio::spawn(async move {
                let _op = ops.acquire_owned().await;
                let r = delete_if_idle(&js, &stream, &name, past_waiting).await;
                let _ = done.send(Done::Deleted(f, r));
            });
        }
    }
}

/// Keeps the [`MARKER`] consumer alive while this replica runs, draining included: a
/// `no_wait` pull every [`MARKER_TOUCH`] (the marker matches no message, so nothing is ever
/// delivered), and a look at it; if it is gone (an operator, a long disconnection), the
/// stream is claimed again. Stopped only once the drain has finished, so static replicas
/// waiting to take the stream back never delete the consumers of calls still running here.
pub async fn keep_marker(
    client: async_nats::Client,
    js: jetstream::Context,
    layout: Layout,
    claimed: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(MARKER_TOUCH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let touch = next_subject(&layout.stream, MARKER);
    let reply = client.new_inbox();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        // Before the stream is ours there is no marker to keep (the pull loop claims it).
        if client.connection_state() != async_nats::connection::State::Connected
            || !claimed.load(Ordering::Relaxed)
        {
            continue;
        }
        let _ = client
            .publish_with_reply(
                touch.clone(),
                reply.clone(),
                r#"{"batch":1,"no_wait":true}"#.into(),
            )
            .await;
        let check = async {
            match marker_exists(&js, &layout).await {
                Ok(false) => {
                    tracing::warn!(stream = %layout.stream, "the function-mode marker is gone; claiming the stream again");
                    match claim_function_mode(&js, &layout, false).await {
                        Ok(FunctionClaim::Claimed) => {}
                        // Static replicas took the stream back and are running calls: the
                        // pull loop waits for them (its consumers are refused meanwhile).
                        Ok(FunctionClaim::Wait { .. }) => claimed.store(false, Ordering::Relaxed),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot claim the stream for function mode; trying again")
                        }
                    }
                }
                Ok(true) => {}
                Err(e) => tracing::debug!(error = %e, "cannot look at the function-mode marker"),
            }
        };
        tokio::select! {
            _ = check => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Whether a status says the consumer does not exist.
fn describes_missing_consumer(msg: &async_nats::Message) -> bool {
    let what = msg
        .description
        .as_deref()
        .unwrap_or_default()
        .to_ascii_lowercase();
    what.contains("consumer deleted") || what.contains("consumer not found")
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// NAKs a message nobody asked for (late, or after the stop) so it is redelivered at once.
fn nak_now(msg: jetstream::Message) {
    tokio::spawn(async move {
        let _ = msg.ack_with(jetstream::AckKind::Nak(None)).await;
    });
}
