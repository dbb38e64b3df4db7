//! The life of one message, as a straight line: decode → ⑤ invoke (renewing the lease while
//! the call runs) → ⑥ decide → settle → ⑦ callback → ⑧ record.
//!
//! The slot (semaphore permit) is held from delivery until the message is settled, and
//! released before the callback, so a slow callback receiver never holds up invocations.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::callback::{Callback, Callbacks};
use crate::invoke::Invoker;
use crate::job::{decode, Job, Settle};
use crate::metrics::Metrics;
use crate::retry::{decide, Decision, RetryPolicy};

/// Shared by every job task.
pub struct Worker {
    pub invoker: Invoker,
    pub callbacks: Callbacks,
    pub metrics: Arc<Metrics>,
    pub retry: RetryPolicy,
    /// Gateway base URL without a trailing `/`.
    pub gateway: String,
    pub default_namespace: String,
    pub progress_interval: Duration,
    pub slots: Arc<Semaphore>,
    /// Every job and callback task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the drain deadline passes: running calls are abandoned and their
    /// messages handed back for immediate redelivery.
    pub deadline: CancellationToken,
    /// Log request and response bodies.
    pub debug: bool,
}

impl Worker {
    /// Starts a task for a delivered message. Never blocks the pull loop.
    pub fn dispatch(self: &Arc<Self>, msg: jetstream::Message, slot: Option<OwnedSemaphorePermit>) {
        let worker = self.clone();
        self.tracker
            .spawn(async move { worker.handle(msg, slot).await });
    }

    async fn handle(&self, msg: jetstream::Message, slot: Option<OwnedSemaphorePermit>) {
        let Some(job) = Job::new(msg) else {
            tracing::warn!("received a message without JetStream metadata; ignoring it");
            return;
        };
        let slot = match slot {
            Some(slot) => slot,
            // Not asked for (should not happen): wait for a slot, keeping the lease.
            None => {
                let acquire = self.slots.clone().acquire_owned();
                tokio::pin!(acquire);
                let mut renew = tokio::time::interval(self.progress_interval);
                loop {
                    tokio::select! {
                        s = &mut acquire => match s {
                            Ok(s) => break s,
                            Err(_) => return job.settle(Settle::Nak(None)).await,
                        },
                        _ = renew.tick() => job.progress().await,
                        _ = self.deadline.cancelled() => return job.settle(Settle::Nak(None)).await,
                    }
                }
            }
        };

        let inv = match decode(job.payload(), &self.gateway, &self.default_namespace) {
            Ok(inv) => inv,
            Err(e) => {
                tracing::error!(seq = job.stream_sequence, delivery = job.attempt, bytes = job.payload().len(), reason = e.reason(), error = %e, "Discarding message that cannot be decoded");
                self.metrics.discarded("unknown", e.reason());
                self.metrics.processed.inc();
                job.settle(Settle::Term).await;
                return;
            }
        };
        let f = self.metrics.function(&inv.function_label);
        tracing::info!(callId = %inv.call_id, function = %inv.request.function, delivery = job.attempt, bytes = inv.request.body.len(), url = %inv.url, "Invoke");
        if self.debug {
            tracing::debug!(callId = %inv.call_id, body = %String::from_utf8_lossy(&inv.request.body), "Request body");
        }

        f.inflight.inc();
        let resp = {
            let call = self
                .invoker
                .call(&inv, inv.callback.is_some() || self.debug);
            tokio::pin!(call);
            let mut renew = tokio::time::interval_at(
                tokio::time::Instant::now() + self.progress_interval,
                self.progress_interval,
            );
            renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    resp = &mut call => break Some(resp),
                    _ = renew.tick() => job.progress().await,
                    _ = self.deadline.cancelled() => break None,
                }
            }
        };
        f.inflight.dec();
        let Some(resp) = resp else {
            tracing::warn!(callId = %inv.call_id, function = %inv.request.function, delivery = job.attempt, "Drain deadline reached; call abandoned and message handed back");
            job.settle(Settle::Nak(None)).await;
            return;
        };

        let status = resp.status_label();
        f.duration.observe(resp.duration.as_secs_f64());
        self.metrics.invocation(&f, &status);
        let decision = decide(
            &resp.call_result(),
            job.attempt,
            &self.retry,
            fastrand::f64(),
        );
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

        job.settle(Settle::from(decision)).await;
        match decision {
            Decision::Retry { after } => {
                f.retries.inc();
                tracing::info!(callId = %inv.call_id, function = %inv.request.function, delivery = job.attempt, retry_in = after.as_secs_f64(), "Retry scheduled");
            }
            Decision::GiveUp { reason } => {
                tracing::warn!(callId = %inv.call_id, function = %inv.request.function, delivery = job.attempt, status = %status, reason = reason.as_str(), "Giving up");
                self.metrics.discarded(&f.label, reason.as_str());
                self.metrics.processed.inc();
            }
            Decision::Ack => self.metrics.processed.inc(),
        }
        drop(slot);

        if matches!(decision, Decision::Retry { .. }) {
            return;
        }
        let Some(url) = inv.callback.clone() else {
            return;
        };
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
            function: inv.request.function,
            status: resp.status.unwrap_or(503),
            duration: job.received.elapsed(),
            attempt: job.attempt,
            max_attempts: self.retry.max_attempts,
            response_headers: resp.headers,
            body: resp.body,
            start_times,
        };
        let callbacks = self.callbacks.clone();
        let deadline = self.deadline.clone();
        self.tracker.spawn(async move {
            let call_id = cb.call_id.clone();
            tokio::select! {
                _ = callbacks.deliver(cb) => {}
                _ = deadline.cancelled() => {
                    tracing::warn!(callId = %call_id, "Drain deadline reached; callback abandoned");
                }
            }
        });
    }
}
