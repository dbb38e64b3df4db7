//! Function mode's discovery: which functions have work, read from the stream's own
//! per-subject counts, never from a per-function poll or timer.
//!
//! Every [`TICK`] one cheap `STREAM.INFO` (no subject list) tells whether anything was
//! stored (`last_seq` moved) or removed (`messages` changed). Only then, or at least every
//! [`FRESH`] while anything is queued, one `STREAM.INFO` with a subjects filter returns every
//! subject's count at once (on a WorkQueue stream: queued + unacked, on every replica). An
//! idle stream costs one small request per tick; a busy one a subject map per tick, which
//! the read itself paces (the next full read waits at least ten times as long as the last
//! one took).
//!
//! Each read becomes a [`Snapshot`] for the function-mode pull loop (`functions.rs`), and
//! the same counts are the per-function `queue_worker_pending_messages` gauges: the stream's
//! whole count, so every replica reports the same value, as OpenFaaS's autoscaler rule
//! (an average across replicas) needs.
//!
//! **Stale messages** (`stale.rs`): a subject whose count has stood still for a while gets its
//! consumer read (`CONSUMER.INFO`), at most [`STALE_CHECKS`] per round and one round per
//! [`STALE_ROUND`], backing off from consumers found busy (long calls, delayed retries). One
//! that owes nothing while the stream still counts messages, twice with nothing moved, has
//! stale messages: they are left out of the pending gauges and counted in
//! `queue_worker_stale_messages`. The scheduler's depths keep them, so the function keeps
//! its consumer (a new one would deliver them again) at the cost of one empty pull per dry
//! backoff.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::nats::consumers::{self, consumer_name, function_label};
use crate::nats::stream::{ensure_stream, read_subjects, read_summary, Layout, StreamSummary};
use crate::telemetry::metrics::{Metrics, ALL_FUNCTIONS};
use crate::telemetry::server::Health;
use crate::worker::stale::{self, Subjects};

/// How often the stream's summary is read: a new function's first job waits at most this
/// long (plus one read) to be seen.
pub const TICK: Duration = Duration::from_millis(50);
/// How often a stream that cannot be read is looked at (and made again if it is gone).
const REPAIR_EVERY: Duration = Duration::from_secs(2);
/// Longest a per-function count may be stale while anything is queued.
pub const FRESH: Duration = Duration::from_secs(1);
/// Consumers read per round of stale-message checks, and rounds at most this often: at most
/// 16 `CONSUMER.INFO` per second per replica, however many functions stand still.
pub const STALE_CHECKS: usize = 16;
pub const STALE_ROUND: Duration = Duration::from_secs(1);

/// One read of the stream: every subject of the queue with messages, and its count.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Subject → queued + unacked messages; subjects with none are absent.
    pub depths: HashMap<String, u64>,
}

/// What the loop remembers between reads to decide whether a full read is due.
#[derive(Debug, Default)]
struct Pace {
    /// The summary read with the last full read.
    last: Option<StreamSummary>,
    last_full: Option<Instant>,
    /// How long the last full read took.
    cost: Duration,
}

impl Pace {
    /// Whether `now`'s summary calls for a full per-subject read.
    fn full_read_due(&self, summary: &StreamSummary, now: Instant) -> bool {
        let Some(last_full) = self.last_full else {
            return true;
        };
        let Some(last) = &self.last else {
            return true;
        };
        if now < last_full + self.cost * 10 {
            return false;
        }
        summary.last_seq != last.last_seq
            || (summary.messages != last.messages && summary.messages == 0)
            || (summary.messages > 0 && now >= last_full + FRESH)
            || (summary.messages != last.messages && now >= last_full + FRESH)
    }
}

/// Reads the stream until `stop`, publishing snapshots to `out` and the per-function
/// pending gauges to `metrics`; `health.stream_ok` says whether the last read worked.
pub async fn run(
    js: jetstream::Context,
    layout: Layout,
    out: watch::Sender<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pace = Pace::default();
    let mut next_repair = Instant::now();
    let mut stale = Subjects::default();
    // One round of consumer reads at a time, beside the stream reads.
    let mut checks: Option<std::pin::Pin<Box<dyn Future<Output = Checked> + Send>>> = None;
    let mut next_round = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            done = async { checks.as_mut().expect("guarded").await }, if checks.is_some() => {
                checks = None;
                let now = Instant::now();
                for (subject, stored, result) in done {
                    match result {
                        Ok(consumer) => {
                            let consumer = consumer.map(|c| stale::Consumer { owed: c.owed, delivered: c.delivered });
                            if let Some(change) = stale.checked(&subject, stored, consumer, now) {
                                log_change(&layout, &subject, &consumer_name(&layout.queue, &subject), change);
                            }
                        }
                        Err(e) => tracing::debug!(%subject, error = %e, "cannot read the consumer for stale messages"),
                    }
                }
                continue;
            }
            _ = stop.cancelled() => return,
        }
        let read = async {
            let summary = read_summary(&js, &layout.stream).await?;
            let now = Instant::now();
            if !pace.full_read_due(&summary, now) {
                return Ok((summary, None));
            }
            if summary.messages == 0 {
                return Ok((summary, Some((now, HashMap::new()))));
            }
            let counts = read_subjects(&js, &layout.stream, ">").await?;
            pace.cost = now.elapsed();
            Ok::<_, crate::nats::stream::LayoutError>((summary, Some((now, counts.subjects))))
        };
        let result = tokio::select! {
            r = read => r,
            _ = stop.cancelled() => return,
        };
        match result {
            Ok((summary, full)) => {
                metrics.submitted.set(summary.last_seq as f64);
                health.stream_ok.store(true, Ordering::Relaxed);
                if let Some((read_at, subjects)) = full {
                    // Compared with the next summaries: a store seen while a full read was
                    // not yet due still triggers one later.
                    pace.last = Some(summary);
                    pace.last_full = Some(Instant::now());
                    let depths = of_queue(&layout.queue, subjects);
                    let now = Instant::now();
                    for (subject, change) in stale.stored(&depths, now) {
                        log_change(
                            &layout,
                            &subject,
                            &consumer_name(&layout.queue, &subject),
                            change,
                        );
                    }
                    if checks.is_none() && now >= next_round {
                        let due = stale.due(read_at, now, STALE_CHECKS);
                        if !due.is_empty() {
                            next_round = now + STALE_ROUND;
                            checks =
                                Some(Box::pin(check_consumers(js.clone(), layout.clone(), due)));
                        }
                    }
                    publish_gauges(&metrics, &layout.queue, &depths, &stale);
                    out.send_if_modified(|current| {
                        if current.depths == depths {
                            return false;
                        }
                        *current = Arc::new(Snapshot { depths });
                        true
                    });
                }
                // Stale messages are not work: the autoscaler must not scale for them.
                metrics
                    .pending
                    .with_label_values(&[&layout.queue, ALL_FUNCTIONS])
                    .set(summary.messages.saturating_sub(stale.total()) as f64);
            }
            Err(e) => {
                // No count is better than a stale one: the autoscaler's avg() and KEDA's
                // max() across replicas would keep acting on it.
                let _ = metrics
                    .pending
                    .remove_label_values(&[&layout.queue, ALL_FUNCTIONS]);
                metrics.set_function_pending(std::iter::empty());
                metrics.set_stale(std::iter::empty(), 0);
                if health.stream_ok.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "cannot read stream state");
                }
                // An operator may have deleted the stream to reset the queue (OpenFaaS's
                // documented recipe): make it again, as static mode's pull loop does, so
                // publishers are not refused. Its consumers follow with the next work.
                if Instant::now() >= next_repair {
                    next_repair = Instant::now() + REPAIR_EVERY;
                    let repair = tokio::select! {
                        r = ensure_stream(&js, &layout) => r,
                        _ = stop.cancelled() => return,
                    };
                    if let Err(e) = repair {
                        tracing::debug!(error = %e, "cannot set up the stream yet");
                    }
                }
            }
        }
    }
}

/// The queue's own subjects (`<queue>` and `<queue>.…`) with messages; an existing stream
/// may carry others, which are not ours to serve.
pub fn of_queue(queue: &str, subjects: HashMap<String, u64>) -> HashMap<String, u64> {
    subjects
        .into_iter()
        .filter(|(s, n)| {
            *n > 0
                && s.strip_prefix(queue)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
        .collect()
}

/// The per-function pending and stale gauges of one read (the legacy subject has no
/// function; its stale messages count only in the `all-functions` series). Pending leaves
/// the stale messages out.
pub fn publish_gauges(
    metrics: &Metrics,
    queue: &str,
    depths: &HashMap<String, u64>,
    stale: &Subjects,
) {
    metrics.set_function_pending(depths.iter().filter_map(|(subject, n)| {
        Some((
            function_label(queue, subject)?,
            n.saturating_sub(stale.stale(subject)),
        ))
    }));
    metrics.set_stale(
        stale
            .all_stale()
            .filter_map(|(subject, n)| Some((function_label(queue, subject)?, n))),
        stale.total(),
    );
}

/// One round's consumer reads: (subject, its count paired with the read, the consumer).
type Checked = Vec<(
    String,
    u64,
    Result<Option<crate::nats::stream::ConsumerProgress>, consumers::ConsumerError>,
)>;

/// Reads the consumers of `due` subjects one after the other (a round is at most
/// [`STALE_CHECKS`] small requests).
async fn check_consumers(
    js: async_nats::jetstream::Context,
    layout: Layout,
    due: Vec<(String, u64)>,
) -> Checked {
    let mut out = Vec::with_capacity(due.len());
    for (subject, stored) in due {
        let name = consumer_name(&layout.queue, &subject);
        let r = consumers::progress(&js, &layout.stream, &name).await;
        out.push((subject, stored, r));
    }
    out
}

/// The log lines of a change in a subject's stale messages: a warning when they appear
/// (what they are, what the worker does about them, how to remove them), a line when they
/// are gone. `consumer` is the consumer that owes nothing.
pub fn log_change(layout: &Layout, subject: &str, consumer: &str, change: stale::Change) {
    let function = function_label(&layout.queue, subject);
    match change {
        stale::Change::Appeared(n) => {
            let remove = match &function {
                Some(f) => format!(
                    "remove them while the function has no other work (queue-worker queue status: nothing pending or ack-pending on {consumer}) with `queue-worker queue purge --function {f}`"
                ),
                None => "they are on the shared subject, which a per-function purge cannot reach: remove them with `queue-worker queue purge --yes` while the queue is otherwise empty".to_string(),
            };
            tracing::warn!(
                stream = %layout.stream,
                %subject,
                function = function.as_deref().unwrap_or("-"),
                %consumer,
                stale = n,
                "stale messages: the stream counts {n} message(s) on {subject} that consumer {consumer} already ran and acknowledged \
                 (a nats-server fault, seen on 2.9 after a stream leader restart). They are not run again while {consumer} exists, \
                 and queue_worker_pending_messages leaves them out (queue_worker_stale_messages counts them); a new consumer for the \
                 subject would run them again. {remove}."
            );
        }
        stale::Change::Changed(n) => {
            tracing::debug!(stream = %layout.stream, %subject, stale = n, "stale messages changed")
        }
        stale::Change::Cleared => {
            tracing::info!(stream = %layout.stream, %subject, %consumer, "stale messages gone from {subject}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(messages: u64, last_seq: u64) -> StreamSummary {
        StreamSummary {
            messages,
            last_seq,
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_read_follows_a_store_and_at_least_every_second_while_work_exists() {
        let mut pace = Pace::default();
        let t0 = Instant::now();
        assert!(
            pace.full_read_due(&summary(0, 0), t0),
            "the first read is full"
        );
        pace.last = Some(summary(5, 10));
        pace.last_full = Some(t0);
        pace.cost = Duration::from_millis(1);
        let at = |ms| t0 + Duration::from_millis(ms);
        // (what the summary says, when, full read due?)
        let cases = [
            (summary(5, 10), 50, false),  // nothing changed
            (summary(6, 11), 50, true),   // something was stored
            (summary(4, 10), 50, false),  // something acked: wait for FRESH
            (summary(4, 10), 1000, true), // ... and then read
            (summary(5, 10), 1000, true), // still queued: refresh the counts
            (summary(0, 10), 50, true),   // drained: say so at once
            (summary(6, 11), 5, false),   // paced: within 10× the last read's cost
        ];
        for (i, (s, ms, due)) in cases.into_iter().enumerate() {
            assert_eq!(
                pace.full_read_due(&s, at(ms)),
                due,
                "case {i}: {s:?} at {ms} ms"
            );
        }
        let idle = Pace {
            last: Some(summary(0, 10)),
            last_full: Some(t0),
            cost: Duration::from_millis(1),
        };
        assert!(
            !idle.full_read_due(&summary(0, 10), at(60_000)),
            "an empty, unchanged stream needs no subject read"
        );
    }

    #[test]
    fn only_the_queues_subjects_with_messages_count() {
        let subjects = HashMap::from([
            ("q".to_string(), 2),
            ("q.a.ns".to_string(), 3),
            ("q.b.ns".to_string(), 0),
            ("qq.a.ns".to_string(), 4),
            ("other".to_string(), 1),
        ]);
        let mut got: Vec<_> = of_queue("q", subjects).into_iter().collect();
        got.sort();
        assert_eq!(got, vec![("q".into(), 2), ("q.a.ns".into(), 3)]);
    }
}
