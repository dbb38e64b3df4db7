//! The life of one message, as a straight line: ② decode → gate (not before its start
//! time, not past its maximum age: `timing.rs`) → ③ invoke (renewing the lease while the
//! call runs) → ④ decide → ⑤ settle (ack, delayed NAK, or dead-letter then terminate) →
//! ⑥ callback → ⑦ record.
//!
//! A call before its start time is handed straight back (NAK with the time left): it keeps
//! no slot, task or timer here while it waits, the server holds it.
//!
//! The slot (semaphore permit) is held from delivery until the message is settled and its
//! callback, if any, has a place in the callback budget; then the callback is delivered on
//! its own task. A slow callback receiver holds up invocations only once the budget is full
//! (back-pressure instead of unbounded memory).

use std::borrow::Cow;
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use bytes::Bytes;
use futures_util::future::{Abortable, Aborted};
use reqwest::header::HeaderMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::duration;
use crate::message::not_before;
use crate::nats::calls::{Record, State};
use crate::telemetry::metrics::{FunctionMetrics, Metrics, UNKNOWN_FUNCTION};
use crate::worker::callback::{Callback, Callbacks, Reservation};
use crate::worker::deadletter::{DeadLetters, Entry, Reason};
use crate::worker::invoke::Invoker;
use crate::worker::job::{Decoder, Invocation, Job, Settle};
use crate::worker::lease::with_lease;
use crate::worker::lifecycle::{Begin, Cancels, StatusWriter};
use crate::worker::limiter::Signal;
use crate::worker::retry::{decide, CallResult, Decision, GiveUpReason, RetryPolicy};
use crate::worker::slot::Slot;
use crate::worker::timing::{self, Gate};

/// How long a dead-letter store may go on after the drain deadline before the message is
/// handed back (within the 5 s the drain allows tasks after its deadline). A store that
/// JetStream confirms later than that has stored an entry for a message that is then run
/// again elsewhere: its second give-up is the same entry (the dedup id), but the call runs
/// twice. Only a store stalled at the very deadline meets this.
const DRAIN_STORE_GRACE: Duration = Duration::from_secs(2);

/// The annotation that caps how many of a function's calls one replica runs at once
/// (function mode).
pub const MAX_INFLIGHT_ANNOTATION: &str = "com.openfaas.queue.max_inflight";

/// The annotation that sets a function's maximum age (a Go duration; `0` for none),
/// overriding `max_call_age`.
pub const MAX_AGE_ANNOTATION: &str = "com.openfaas.queue.max_age";

/// The `X-Function-Status` of the callback of a call that expired: 410 Gone, the call was
/// not run (this time) and will not be. A function's own answers reach the callback with
/// their own status; a receiver that must tell an expiry from a function answering 410
/// finds the explanation in the body (`text/plain`, starting with `expired:`) and the
/// dead-letter entry.
pub const EXPIRED_STATUS: u16 = 410;

/// Shared by every job task.
pub struct Worker {
    pub invoker: Invoker,
    pub callbacks: Callbacks,
    pub metrics: Arc<Metrics>,
    /// The worker's policy; a message's `com.openfaas.retry.*` annotations override it.
    pub retry: RetryPolicy,
    /// `max_call_age` (`None`: no limit); a message's `com.openfaas.queue.max_age` overrides
    /// it.
    pub max_call_age: Option<Duration>,
    pub decoder: Decoder,
    pub dead_letters: DeadLetters,
    pub progress_interval: Duration,
    pub slots: Arc<Semaphore>,
    /// With `consumer_prefetch`, the pull loop's `slots` exceed `max_inflight`, and this
    /// (`max_inflight` permits) is what bounds the calls; `None` without prefetch.
    pub calls: Option<Arc<Semaphore>>,
    /// Cancelled when the drain starts: a prefetched message still waiting for a call slot
    /// is handed back at once, since it has not started.
    pub stopping: CancellationToken,
    /// Every job and callback task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the drain deadline passes: running calls are abandoned and their
    /// messages handed back for immediate redelivery.
    pub deadline: CancellationToken,
    /// Log request and response bodies.
    pub debug: bool,
    pub warned: WarnOnce,
    /// Messages received and not yet settled: what this replica's presence answer says it
    /// holds (`nats/presence.rs`).
    pub held: Arc<AtomicUsize>,
    /// The queue's cancels, watched from `OF_<queue>-calls`.
    pub cancels: Arc<Cancels>,
    /// Writes each call's record (`call_status`); `None` when off.
    pub status: Option<StatusWriter>,
}

/// Counts a message as held while it lives.
struct Held(Arc<AtomicUsize>);

impl Held {
    fn new(count: &Arc<AtomicUsize>) -> Held {
        count.fetch_add(1, Ordering::Relaxed);
        Held(count.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Remembers what was already warned about, so a bad annotation is logged once per function
/// and value rather than for every message (the metric still counts every message).
#[derive(Default)]
pub struct WarnOnce(Mutex<HashSet<String>>);

impl WarnOnce {
    /// Most distinct warnings remembered; past it, everything is logged again.
    const CAP: usize = 1024;

    /// True the first time `key` is seen.
    pub fn first(&self, key: String) -> bool {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= Self::CAP {
            seen.clear();
        }
        seen.insert(key)
    }
}

/// What the last call produced, for the callback.
struct Outcome {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
    /// `X-Call-Status` of the callback, for a call that ended without a function result
    /// (`cancelled`).
    state: Option<&'static str>,
}

/// The status a callback reports for a cancelled call (nginx's "client closed request",
/// the usual code for a request its caller abandoned).
pub const CANCELLED_STATUS: u16 = 499;

/// How long a call runs before its `running` record is written (`call_status`).
const RUNNING_AFTER: Duration = Duration::from_millis(100);

/// How a call's wait ended.
enum Ended {
    Answered(crate::worker::invoke::Response),
    /// The drain deadline passed: hand the message back.
    Deadline,
    /// Cancelled by its id: settle it, do not retry.
    Cancelled,
}

impl Worker {
    /// Starts a task for a delivered message. Never blocks the pull loop.
    pub fn dispatch(self: &Arc<Self>, msg: jetstream::Message, slot: Option<Slot>) {
        let worker = self.clone();
        // Counted from here, so a presence answer never misses a message on its way to
        // its task.
        let held = Held::new(&self.held);
        self.tracker.spawn(async move {
            worker.handle(msg, slot).await;
            drop(held);
        });
    }

    async fn handle(&self, msg: jetstream::Message, slot: Option<Slot>) {
        let Some(mut job) = Job::new(msg) else {
            tracing::warn!("received a message without JetStream metadata; ignoring it");
            return;
        };
        // Held until the message is settled (released just before an ack, see below).
        let mut slot = Some(match slot {
            Some(slot) => slot,
            // Not asked for (should not happen): wait for a slot, keeping the lease; at a
            // drain it has not started, so it goes back at once.
            None => {
                let acquire = self.slots.clone().acquire_owned();
                let acquired = tokio::select! {
                    s = self.leased(&job, acquire) => s.ok(),
                    _ = self.stopping.cancelled() => None,
                };
                match acquired {
                    Some(s) => Slot::permit(s),
                    None => return job.settle(Settle::Nak(None)).await,
                }
            }
        });

        let mut inv = match self.decoder.decode(job.payload()) {
            Ok(inv) => inv,
            Err(e) => {
                let reason = Reason::from(&e);
                tracing::error!(seq = job.stream_sequence, subject = job.subject(), delivery = job.attempt, bytes = job.payload().len(), reason = reason.as_str(), error = %e, "Cannot decode message; moving it to the dead-letter stream");
                let error = e.to_string();
                let entry = Entry {
                    reason,
                    function: None,
                    function_label: None,
                    attempts: job.attempt,
                    last_status: None,
                    error: &error,
                    call_id: None,
                    original_subject: job.subject(),
                    original_sequence: job.stream_sequence,
                    payload: job.payload_bytes(),
                };
                let retry_in = self.retry.base_delay(job.attempt);
                // Boxed: the dead-letter path is rare and its future large (a JetStream
                // publish); inline it would make every job's task 11 KiB instead of 4, and
                // each spawn copy that much.
                Box::pin(self.dead_letter(&job, &entry, UNKNOWN_FUNCTION, retry_in)).await;
                return;
            }
        };
        let f = self.metrics.function(inv.function.qualified());
        let policy = self.policy_for(&inv, &f);
        if let Some(slot) = &slot {
            slot.learn_cap(self.cap_for(&inv, &f));
        }
        // Not before its start time, not past its maximum age (first delivery or a retry);
        // a cancel comes first: a cancelled call is settled whatever its time.
        let now = SystemTime::now();
        let start = self.not_before(&inv, &job, &f);
        let max_age = self.max_age_for(&inv, &f);
        job.attempt = timing::attempt(job.delivered, job.published, start, now);
        let (cancel, abort) = match self.cancels.begin(&inv.call_id, job.published) {
            Begin::Run(guard, abort) => (guard, abort),
            Begin::Cancelled => {
                // Boxed: rare path.
                Box::pin(self.settle_cancelled(&job, inv, &f, "queued", policy.max_attempts)).await;
                return;
            }
        };
        match timing::gate(now, job.published, start, max_age) {
            Gate::Run => {}
            Gate::Defer(wait) => {
                // Boxed: rare path (as are the status writes below, off by default).
                return Box::pin(self.defer(&job, &inv, &f, slot.take(), wait)).await;
            }
            Gate::Expire { age } => {
                let max_age = max_age.unwrap_or_default();
                // Boxed: rare path, large future (a dead-letter store).
                return Box::pin(self.expire(job, inv, &f, &policy, slot, age, max_age)).await;
            }
        }

        let call_slot = match &self.calls {
            None => None,
            Some(calls) => match calls.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => match self.wait_for_call(&job, calls).await {
                    Some(permit) => Some(permit),
                    None => {
                        tracing::debug!(callId = %inv.call_id, function = %inv.request.function, "Prefetched message handed back (draining)");
                        job.settle(Settle::Nak(None)).await;
                        return;
                    }
                },
            },
        };

        // Cancelled while it waited for a call slot (prefetch): not started, so not called.
        if cancel.is_cancelled() {
            drop(call_slot);
            Box::pin(self.settle_cancelled(&job, inv, &f, "queued", policy.max_attempts)).await;
            return;
        }

        tracing::info!(callId = %inv.call_id, function = %inv.request.function, delivery = job.attempt, bytes = inv.request.body.len(), url = %inv.url, "Invoke");
        if self.debug {
            tracing::debug!(callId = %inv.call_id, body = %String::from_utf8_lossy(&inv.request.body), "Request body");
        }

        // `running` is recorded once the call has run for RUNNING_AFTER: a call that ends
        // sooner writes only its outcome (one record instead of two, see BENCHMARKS.md).
        // The record is built only if it is written.
        let mut running = self.status.is_some().then(time::OffsetDateTime::now_utc);

        f.inflight.inc();
        // The body moves into the request (no copy); nothing after the call reads it.
        let body = bytes::Bytes::from(std::mem::take(&mut inv.request.body));
        let resp = {
            let call = self
                .invoker
                .call(&inv, body, inv.callback.is_some() || self.debug);
            // A cancel aborts the call: its future, and with it the HTTP request, is dropped.
            let call = Abortable::new(self.leased(&job, call), abort);
            tokio::pin!(call);
            loop {
                let announce = async {
                    match running {
                        Some(_) => tokio::time::sleep(RUNNING_AFTER).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    resp = &mut call => break match resp {
                        Ok(resp) => Ended::Answered(resp),
                        Err(Aborted) => Ended::Cancelled,
                    },
                    _ = self.deadline.cancelled() => break Ended::Deadline,
                    _ = announce => {
                        if let (Some(st), Some(started)) = (&self.status, running.take()) {
                            let mut r = self.record(st, &inv, &job, &f.label, State::Running);
                            r.max_attempts = Some(policy.max_attempts);
                            r.started_at = Some(started);
                            st.write(r);
                        }
                    }
                }
            }
        };
        f.inflight.dec();
        // The next prefetched message may start now; this one's pull slot is kept until
        // it is settled.
        drop(call_slot);
        let resp = match resp {
            Ended::Answered(resp) => resp,
            Ended::Deadline => {
                tracing::warn!(callId = %inv.call_id, function = %inv.request.function, delivery = job.attempt, "Drain deadline reached; call abandoned and message handed back");
                job.settle(Settle::Nak(None)).await;
                return;
            }
            Ended::Cancelled => {
                // The slot is kept until the callback has a place in the budget, as on
                // every other path (it goes when this returns).
                Box::pin(self.settle_cancelled(&job, inv, &f, "running", policy.max_attempts))
                    .await;
                return;
            }
        };
        drop(cancel);

        let status = resp.status_label();
        f.duration.observe(resp.duration.as_secs_f64());
        self.metrics.invocation(&f, &status);
        let result = resp.call_result();
        self.learn(&result, slot.as_ref(), &f);
        let decision = decide(&result, job.attempt, &policy, fastrand::f64());
        match &resp.error {
            None => {
                tracing::info!(callId = %inv.call_id, function = %inv.request.function, delivery = job.attempt, status = %status, duration = resp.duration.as_secs_f64(), "Invoked")
            }
            Some(err) => {
                tracing::info!(callId = %inv.call_id, function = %inv.request.function, delivery = job.attempt, status = %status, duration = resp.duration.as_secs_f64(), error = %err, "Invoked")
            }
        }
        if self.debug {
            tracing::debug!(callId = %inv.call_id, body = %String::from_utf8_lossy(&resp.body), "Response body");
        }

        // The callback's place in the budget, when taken before the ack.
        let mut place = None;
        let finished = match decision {
            Decision::Ack => {
                // The call is over: free its slot before queueing the ack, so the pull loop's
                // next request and this ack leave in one write (one syscall, not two, per
                // message at max_inflight 1). A callback needs its place in the budget first;
                // when none is free, the slot is kept until one is (in `send_callback`).
                if inv.callback.is_some() {
                    place = self.callbacks.try_reserve(resp.body.len());
                }
                if inv.callback.is_none() || place.is_some() {
                    drop(slot.take());
                }
                job.settle(Settle::Ack).await;
                self.metrics.processed.inc();
                if let Some(st) = &self.status {
                    let mut r = self.record(st, &inv, &job, &f.label, State::Succeeded);
                    self.ended(&mut r, &resp, policy.max_attempts);
                    st.write(r);
                }
                true
            }
            Decision::Retry { after } => {
                job.settle(Settle::Nak(Some(after))).await;
                f.retries.inc();
                if let Some(st) = &self.status {
                    let mut r = self.record(st, &inv, &job, &f.label, State::Waiting);
                    self.ended(&mut r, &resp, policy.max_attempts);
                    r.finished_at = None;
                    r.next_attempt_at = Some(r.updated_at + after);
                    st.write(r);
                }
                tracing::info!(callId = %inv.call_id, function = %inv.request.function, delivery = job.attempt, retry_in = after.as_secs_f64(), "Retry scheduled");
                false
            }
            Decision::GiveUp { reason } => {
                tracing::warn!(callId = %inv.call_id, function = %inv.request.function, delivery = job.attempt, status = %status, reason = reason.as_str(), "Giving up; moving the message to the dead-letter stream");
                // A delivery count past the attempts allowed means some deliveries never
                // reached the function (a hand-back at a reconnect or drain, a lease lost
                // with a replica, a dead-letter store that failed): the call still happened,
                // and this is its result.
                let error = match (&resp.error, reason) {
                    (Some(err), GiveUpReason::AttemptsExhausted) => format!(
                        "gave up after {} attempts (delivery {}); the last: {err}",
                        policy.max_attempts, job.attempt
                    ),
                    (None, GiveUpReason::AttemptsExhausted) => format!(
                        "gave up after {} attempts (delivery {}); the last answered {status}",
                        policy.max_attempts, job.attempt
                    ),
                };
                let entry = Entry {
                    reason: reason.into(),
                    function: Some(inv.function.as_written()),
                    function_label: Some(&inv.function),
                    attempts: job.attempt,
                    last_status: Some(&status),
                    error: &error,
                    call_id: Some(&inv.call_id),
                    original_subject: job.subject(),
                    original_sequence: job.stream_sequence,
                    payload: job.payload_bytes(),
                };
                // If the entry cannot be stored, the message comes back later, each time
                // later (the function's backoff, counted from the attempts allowed).
                let extra = job.attempt.saturating_sub(policy.max_attempts) + 1;
                // Boxed, as above: rare path, large future.
                let stored =
                    Box::pin(self.dead_letter(&job, &entry, &f.label, policy.base_delay(extra)))
                        .await;
                if let (true, Some(st)) = (stored, &self.status) {
                    let mut r = self.record(st, &inv, &job, &f.label, State::Failed);
                    self.ended(&mut r, &resp, policy.max_attempts);
                    r.reason = Some(entry.reason.as_str().to_string());
                    st.write(r);
                }
                stored
            }
        };
        if !finished {
            return;
        }
        let outcome = Outcome {
            status: resp.status.unwrap_or(503),
            headers: resp.headers,
            body: resp.body,
            state: None,
        };
        let Some(cb) = self.callback(inv, &job, outcome, policy.max_attempts) else {
            return;
        };
        let (cb, place) = match place {
            Some(place) => (cb, place),
            // Boxed: only a full budget waits here; inline, this state would grow every
            // job's task (and every spawn's copy) by a kilobyte.
            None => match Box::pin(self.wait_for_budget(cb)).await {
                Some(waited) => waited,
                None => return,
            },
        };
        // The callback has its place: the slot may go.
        drop(slot);
        self.send_callback(cb, place);
    }

    /// A call record of this job in `state`, with what every write knows.
    fn record(
        &self,
        st: &StatusWriter,
        inv: &Invocation,
        job: &Job,
        function: &str,
        state: State,
    ) -> Record {
        let mut r = st.record(&inv.call_id, state, function);
        r.seq = Some(job.stream_sequence);
        r.attempt = Some(job.attempt);
        r.queued_at = time::OffsetDateTime::from(job.published);
        r
    }

    /// Fills in how an attempt ended.
    fn ended(&self, r: &mut Record, resp: &crate::worker::invoke::Response, max_attempts: u32) {
        r.max_attempts = Some(max_attempts);
        r.status = Some(resp.status.unwrap_or(0));
        r.duration_seconds = Some(resp.duration.as_secs_f64());
        r.started_at = Some(r.updated_at - resp.duration);
        r.finished_at = Some(r.updated_at);
    }

    /// Settles a cancelled call (`stage`: `queued`, never called; `running`, its request
    /// dropped): acknowledged, so it is neither run nor retried, then recorded and its
    /// callback told (`X-Call-Status: cancelled`).
    async fn settle_cancelled(
        &self,
        job: &Job,
        inv: Invocation,
        f: &FunctionMetrics,
        stage: &'static str,
        max_attempts: u32,
    ) {
        job.settle(Settle::Ack).await;
        self.metrics.processed.inc();
        self.metrics.cancelled(f, stage);
        tracing::info!(callId = %inv.call_id, function = %inv.request.function, delivery = job.attempt, stage, "Cancelled");
        if let Some(st) = &self.status {
            let mut r = self.record(st, &inv, job, &f.label, State::Cancelled);
            r.reason = Some(stage.to_string());
            r.finished_at = Some(r.updated_at);
            st.write(r);
        }
        let outcome = Outcome {
            status: CANCELLED_STATUS,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            state: Some("cancelled"),
        };
        let Some(cb) = self.callback(inv, job, outcome, max_attempts) else {
            return;
        };
        if let Some((cb, place)) = self.wait_for_budget(cb).await {
            self.send_callback(cb, place);
        }
    }

    /// Runs `work` while renewing `job`'s lease every `progress_interval`; the renewal never
    /// holds up `work` or the caller's cancellation (see [`with_lease`]).
    fn leased<'a, T: 'a>(
        &self,
        job: &'a Job,
        work: impl Future<Output = T> + 'a,
    ) -> impl Future<Output = T> + 'a {
        with_lease(self.progress_interval, move || job.progress(), work)
    }

    /// Waits for a call slot for a prefetched message, keeping its lease; `None` when the
    /// drain starts first (or the worker is shutting down), and the message should go back.
    async fn wait_for_call(
        &self,
        job: &Job,
        calls: &Arc<Semaphore>,
    ) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            permit = self.leased(job, calls.clone().acquire_owned()) => permit.ok(),
            _ = self.stopping.cancelled() => None,
        }
    }

    /// What the call's answer says about the function's room: counted, and fed to function
    /// mode's adaptive limit through the slot (which still counts as running).
    fn learn(&self, result: &CallResult, slot: Option<&Slot>, f: &FunctionMetrics) {
        let signal = result.signal();
        if signal == Signal::Rejected {
            f.rejections.inc();
        }
        let Some(seen) = slot.and_then(|s| s.report(signal)) else {
            return;
        };
        if seen.change.probe {
            f.probes.inc();
        }
        if f.limit_shown.swap(seen.allowed, Ordering::Relaxed) != seen.allowed {
            self.metrics.set_concurrency_limit(f, seen.allowed);
            tracing::debug!(function = %f.label, limit = seen.allowed, probe = seen.change.probe, "Concurrency limit");
        }
    }

    /// The retry policy for this message: the worker's, with the function's annotations
    /// applied. Invalid annotations are counted per message and logged once per value.
    fn policy_for(&self, inv: &Invocation, f: &FunctionMetrics) -> Cow<'_, RetryPolicy> {
        let (policy, invalid) = self.retry.with_annotations(&inv.request.annotations);
        for bad in invalid {
            self.metrics.invalid_annotation(f, bad.key);
            let key = format!("{}\0{}\0{}", inv.request.function, bad.key, bad.value);
            if self.warned.first(key) {
                tracing::warn!(function = %inv.request.function, annotation = bad.key, value = %bad.value, expected = bad.expected, "Invalid retry annotation; using the worker's setting instead");
            }
        }
        policy
    }

    /// The function's own concurrency cap (`com.openfaas.queue.max_inflight`), if it set a
    /// valid one; an invalid value is counted and logged once, and means no cap.
    fn cap_for(&self, inv: &Invocation, f: &FunctionMetrics) -> Option<usize> {
        let value = inv.request.annotations.get(MAX_INFLIGHT_ANNOTATION)?;
        match value.trim().parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                self.metrics.invalid_annotation(f, MAX_INFLIGHT_ANNOTATION);
                let key = format!(
                    "{}\0{MAX_INFLIGHT_ANNOTATION}\0{value}",
                    inv.request.function
                );
                if self.warned.first(key) {
                    tracing::warn!(function = %inv.request.function, annotation = MAX_INFLIGHT_ANNOTATION, value = %value, expected = "a whole number of at least 1", "Invalid annotation; the function gets no cap of its own");
                }
                None
            }
        }
    }

    /// The call's start time (`X-Not-Before`). A value that cannot be read (a producer other
    /// than ours) is counted, logged once per function, and ignored: the call starts at once,
    /// never dead-lettered for it.
    fn not_before(&self, inv: &Invocation, job: &Job, f: &FunctionMetrics) -> Option<SystemTime> {
        let value = inv
            .request
            .header_value(not_before::HEADER)
            .filter(|v| !v.trim().is_empty())?;
        match not_before::parse_stored(value, job.published) {
            Ok(at) => Some(at),
            Err(e) => {
                self.metrics.invalid_annotation(f, not_before::HEADER);
                let key = format!("{}\0{}", inv.request.function, not_before::HEADER);
                if self.warned.first(key) {
                    tracing::warn!(function = %inv.request.function, header = not_before::HEADER, error = %e, "Invalid start time in a message; the call starts at once (logged once per function)");
                }
                None
            }
        }
    }

    /// The maximum age of this call: the function's `com.openfaas.queue.max_age` when it set
    /// a valid one (`0`: none), else `max_call_age`. An invalid value is counted and logged
    /// once per value, and the setting applies.
    fn max_age_for(&self, inv: &Invocation, f: &FunctionMetrics) -> Option<Duration> {
        let Some(value) = inv
            .request
            .annotations
            .get(MAX_AGE_ANNOTATION)
            .filter(|v| !v.trim().is_empty())
        else {
            return self.max_call_age;
        };
        match duration::parse(value) {
            Some(d) => Some(d).filter(|d| !d.is_zero()),
            None => {
                self.metrics.invalid_annotation(f, MAX_AGE_ANNOTATION);
                let key = format!("{}\0{MAX_AGE_ANNOTATION}\0{value}", inv.request.function);
                if self.warned.first(key) {
                    tracing::warn!(function = %inv.request.function, annotation = MAX_AGE_ANNOTATION, value = %value, expected = "a duration like 30s, 10m or 1h (0: no limit)", "Invalid annotation; using max_call_age instead");
                }
                self.max_call_age
            }
        }
    }

    /// Before its start time: the slot goes back (with, in function mode, when to pull the
    /// function again) and JetStream redelivers the message when the time left is up. No
    /// slot, task or timer is held meanwhile.
    async fn defer(
        &self,
        job: &Job,
        inv: &Invocation,
        f: &FunctionMetrics,
        slot: Option<Slot>,
        wait: Duration,
    ) {
        f.deferred.inc();
        tracing::debug!(callId = %inv.call_id, function = %inv.request.function, delivery = job.delivered, start_in = wait.as_secs_f64(), "Not before its start time; handed back until then");
        // Released first, so the pull loop's next request and this NAK leave in one write;
        // the message cannot come back before the NAK's delay.
        if let Some(slot) = slot {
            slot.defer(wait);
        }
        job.settle(Settle::Nak(Some(wait))).await;
    }

    /// Past its maximum age: dead-lettered as `expired` without a call, then the failure
    /// callback ([`EXPIRED_STATUS`], `X-Retry` = the calls made before, the reason in the
    /// body). If the entry cannot be stored, the message stays queued and comes back.
    #[allow(clippy::too_many_arguments)]
    async fn expire(
        &self,
        job: Job,
        inv: Invocation,
        f: &FunctionMetrics,
        policy: &RetryPolicy,
        slot: Option<Slot>,
        age: Duration,
        max_age: Duration,
    ) {
        // This delivery makes no call: the calls made are the attempts before it.
        let made = job.attempt.saturating_sub(1);
        tracing::warn!(callId = %inv.call_id, function = %inv.request.function, delivery = job.attempt, age = age.as_secs_f64(), max_age = max_age.as_secs_f64(), "Expired: queued past its maximum age; moving it to the dead-letter stream without calling it");
        let error = format!(
            "expired: due {:.3}s ago, over its maximum age of {}; {made} call(s) made before",
            age.as_secs_f64(),
            duration::format(max_age)
        );
        let entry = Entry {
            reason: Reason::Expired,
            function: Some(inv.function.as_written()),
            function_label: Some(&inv.function),
            attempts: made,
            last_status: None,
            error: &error,
            call_id: Some(&inv.call_id),
            original_subject: job.subject(),
            original_sequence: job.stream_sequence,
            payload: job.payload_bytes(),
        };
        if !self
            .dead_letter(&job, &entry, &f.label, policy.base_delay(1))
            .await
        {
            return;
        }
        f.expired.inc();
        if let Some(st) = &self.status {
            let mut r = self.record(st, &inv, &job, &f.label, State::Expired);
            r.attempt = Some(made);
            r.max_attempts = Some(policy.max_attempts);
            r.reason = Some(Reason::Expired.as_str().to_string());
            r.finished_at = Some(r.updated_at);
            st.write(r);
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        let outcome = Outcome {
            status: EXPIRED_STATUS,
            headers,
            body: Bytes::from(error),
            state: Some("expired"),
        };
        let Some(mut cb) = self.callback(inv, &job, outcome, policy.max_attempts) else {
            return;
        };
        cb.attempt = made;
        let (cb, place) = match self.callbacks.try_reserve(cb.body.len()) {
            Some(place) => (cb, place),
            None => match self.wait_for_budget(cb).await {
                Some(waited) => waited,
                None => return,
            },
        };
        drop(slot);
        self.send_callback(cb, place);
    }

    /// Stores the message in the dead-letter stream, then terminates it. Returns whether it
    /// was stored. When it could not be (NATS trouble, a full stream), the message is handed
    /// back to be redelivered after `retry_in` (at least a second) and nothing is lost. The
    /// lease is renewed while the store is tried, so no other replica takes the message.
    async fn dead_letter(
        &self,
        job: &Job,
        entry: &Entry<'_>,
        label: &str,
        retry_in: Duration,
    ) -> bool {
        let store = self.leased(job, self.dead_letters.store(entry));
        tokio::pin!(store);
        let stored = tokio::select! {
            r = &mut store => r,
            _ = self.deadline.cancelled() => {
                // The entry may already be stored: handing the message back now would run
                // it again elsewhere. The store is bounded; give it a moment to say how it
                // went (still renewing the lease).
                match tokio::time::timeout(DRAIN_STORE_GRACE, &mut store).await {
                    Ok(r) => r,
                    Err(_) => {
                        job.settle(Settle::Nak(None)).await;
                        return false;
                    }
                }
            }
        };
        match stored {
            Ok(()) => {
                job.settle(Settle::Term).await;
                self.metrics.dead_lettered(label, entry.reason.as_str());
                self.metrics.processed.inc();
                true
            }
            Err(e) => {
                let retry_in = retry_in.max(Duration::from_secs(1));
                tracing::error!(seq = job.stream_sequence, reason = entry.reason.as_str(), error = %e, retry_in = retry_in.as_secs_f64(), "Cannot store the message in the dead-letter stream; keeping it queued");
                self.metrics.dead_letter_failures.inc();
                job.settle(Settle::Nak(Some(retry_in))).await;
                false
            }
        }
    }

    /// The callback of a finished job, if it asked for one.
    fn callback(
        &self,
        inv: Invocation,
        job: &Job,
        outcome: Outcome,
        max_attempts: u32,
    ) -> Option<Callback> {
        let url = inv.callback.clone()?;
        let start_times = inv
            .request
            .header
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("X-Start-Time"))
            .flat_map(|(_, v)| v.iter().cloned())
            .collect();
        let cb = Callback {
            url,
            call_id: inv.call_id,
            // As the function was called (the decoder trims what was submitted).
            function: inv.function.as_written().to_string(),
            status: outcome.status,
            duration: job.received.elapsed(),
            attempt: job.attempt,
            max_attempts,
            response_headers: outcome.headers,
            body: outcome.body,
            start_times,
            state: outcome.state,
        };
        Some(cb)
    }

    /// Waits for a place in the full callback budget while the job keeps its slot (the
    /// back-pressure); `None` when the drain deadline passes first and the callback is
    /// abandoned (its message is already settled).
    async fn wait_for_budget(&self, cb: Callback) -> Option<(Callback, Reservation)> {
        let waiting = tokio::time::Instant::now();
        tokio::select! {
            place = self.callbacks.reserve(cb.body.len()) => {
                self.metrics
                    .callback_budget_wait
                    .inc_by(waiting.elapsed().as_secs_f64());
                Some((cb, place))
            }
            _ = self.deadline.cancelled() => {
                tracing::warn!(callId = %cb.call_id, "Drain deadline reached; callback abandoned");
                self.metrics.callback("abandoned");
                None
            }
        }
    }

    /// Posts the final result to the caller's callback URL on its own task, which keeps the
    /// callback's `place` in the budget until it is delivered, fails, or is abandoned at the
    /// drain deadline.
    fn send_callback(&self, cb: Callback, place: Reservation) {
        let callbacks = self.callbacks.clone();
        let deadline = self.deadline.clone();
        let metrics = self.metrics.clone();
        self.tracker.spawn(async move {
            let call_id = cb.call_id.clone();
            tokio::select! {
                _ = callbacks.deliver(cb) => {}
                _ = deadline.cancelled() => {
                    tracing::warn!(callId = %call_id, "Drain deadline reached; callback abandoned");
                    metrics.callback("abandoned");
                }
            }
            drop(place);
        });
    }
}
