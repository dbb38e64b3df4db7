//! ⑦ Every metric the worker exports, in one place: OpenFaaS's names and labels first (its
//! autoscaler and dashboards read them), ours beside them.
//!
//! `function_name` is the only label whose values come from messages. It is capped at
//! [`MAX_FUNCTION_LABELS`] distinct values per process; the rest share the label `_other`,
//! so a flood of made-up function names cannot exhaust memory or the scraper.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, LazyLock, Mutex};

use prometheus::{
    Counter, CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec,
    IntCounter, Opts, Registry, TextEncoder,
};

/// Distinct `function_name` values before new names share `_other`.
pub const MAX_FUNCTION_LABELS: usize = 5_000;
const OVERFLOW_LABEL: &str = "_other";
/// The `function_name` of the pending gauge in static mode: the shared consumer serves every
/// function, as OpenFaaS's dashboard shows it.
pub const ALL_FUNCTIONS: &str = "all-functions";

/// The `function_name` of a message whose function could not be read.
pub const UNKNOWN_FUNCTION: &str = "_unknown";

/// Every metric name we export, for docs and for tests that check dashboards and README.
pub const NAMES: &[&str] = &[
    "queue_worker_pending_messages",
    "queue_worker_stale_messages",
    "queue_worker_messages_processed_total",
    "queue_worker_messages_submitted_total",
    "queue_worker_function_invocation_inflight",
    "queue_worker_nats_reconnect_total",
    "queue_worker_invocations_total",
    "queue_worker_invocation_duration_seconds",
    "queue_worker_retries_total",
    "queue_worker_rejections_total",
    "queue_worker_concurrency_limit",
    "queue_worker_concurrency_probes_total",
    "queue_worker_dead_lettered_total",
    "queue_worker_dead_letter_failures_total",
    "queue_worker_calls_deferred_total",
    "queue_worker_calls_expired_total",
    "queue_worker_invalid_annotations_total",
    "queue_worker_callbacks_total",
    "queue_worker_calls_cancelled_total",
    "queue_worker_call_status_writes_total",
    "queue_worker_callbacks_pending",
    "queue_worker_callbacks_pending_bytes",
    "queue_worker_callback_budget_wait_seconds_total",
    "queue_worker_max_inflight",
    "queue_worker_frontdoor_accepted_total",
    "queue_worker_frontdoor_duplicates_total",
    "queue_worker_frontdoor_rejected_total",
    "queue_worker_frontdoor_calls_total",
    "queue_worker_frontdoor_publish_seconds",
    "queue_worker_log_lines_dropped_total",
];

/// Log lines dropped because stderr did not take them (see `logging`): one per process,
/// exported by the worker and the front door alike.
pub fn log_lines_dropped() -> &'static IntCounter {
    static DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
        IntCounter::new(
            "queue_worker_log_lines_dropped_total",
            "Log lines dropped because stderr did not take them fast enough (the log queue was full); logging never holds up calls.",
        )
        .unwrap()
    });
    &DROPPED
}

/// Handles resolved once per function, so the hot path does not hash label sets.
pub struct FunctionMetrics {
    pub label: String,
    pub inflight: Gauge,
    pub duration: Histogram,
    pub retries: Counter,
    /// Calls the function (or its platform) refused for want of room: 429s, and 503s with
    /// `X-OpenFaaS-Internal` or `Retry-After`.
    pub rejections: Counter,
    pub probes: Counter,
    /// Deliveries handed back before their start time (`X-Not-Before`).
    pub deferred: Counter,
    /// Calls dead-lettered as `expired` (past their maximum age, never run this time).
    pub expired: Counter,
    /// The concurrency limit last exported, so the series is set only when it changes.
    pub limit_shown: AtomicUsize,
}

pub struct Metrics {
    registry: Registry,
    queue: String,
    pub pending: GaugeVec,
    /// Messages the stream counts that their consumer already ran (see `worker::stale`).
    pub stale: GaugeVec,
    pub processed: Counter,
    pub submitted: Gauge,
    pub reconnects: Counter,
    inflight: GaugeVec,
    invocations: CounterVec,
    duration: HistogramVec,
    retries: CounterVec,
    rejections: CounterVec,
    concurrency_limit: GaugeVec,
    probes: CounterVec,
    deferred: CounterVec,
    expired: CounterVec,
    dead_lettered: CounterVec,
    pub dead_letter_failures: Counter,
    invalid_annotations: CounterVec,
    callbacks: CounterVec,
    /// Calls settled without running to their end because they were cancelled, by stage
    /// (`queued`: never called; `running`: the request was dropped).
    cancelled: CounterVec,
    status_writes: CounterVec,
    /// Callbacks holding a place in the callback budget (waiting to be tried again or in
    /// delivery), and the bytes of their bodies.
    pub callbacks_pending: Gauge,
    pub callbacks_pending_bytes: Gauge,
    /// Time finished jobs kept their slot waiting for a place in the callback budget.
    pub callback_budget_wait: Counter,
    functions: Mutex<HashMap<String, Arc<FunctionMetrics>>>,
    /// The per-function pending series exported now, so a drained function's is removed.
    pending_shown: Mutex<HashMap<String, f64>>,
    /// The same for the per-function stale series.
    stale_shown: Mutex<HashMap<String, f64>>,
}

impl Metrics {
    pub fn new(queue: &str, max_inflight: usize) -> Arc<Metrics> {
        let registry = Registry::new();
        let q = &["queue_name"];
        let qf = &["queue_name", "function_name"];
        let pending = GaugeVec::new(
            Opts::new(
                "queue_worker_pending_messages",
                "Messages of the queue not yet finished: waiting, in flight or waiting to be retried.",
            ),
            qf,
        )
        .unwrap();
        let stale = GaugeVec::new(
            Opts::new(
                "queue_worker_stale_messages",
                "Messages the stream still counts although their consumer already ran and acknowledged them (a nats-server fault); left out of queue_worker_pending_messages.",
            ),
            qf,
        )
        .unwrap();
        let processed = CounterVec::new(
            Opts::new(
                "queue_worker_messages_processed_total",
                "Messages this replica finished: acknowledged, or dead-lettered and terminated.",
            ),
            q,
        )
        .unwrap();
        let submitted = GaugeVec::new(
            Opts::new(
                "queue_worker_messages_submitted_total",
                "Messages ever published to the queue's stream (its last sequence). A gauge, as in OpenFaaS.",
            ),
            q,
        )
        .unwrap();
        let inflight = GaugeVec::new(
            Opts::new(
                "queue_worker_function_invocation_inflight",
                "Invocations running now in this replica.",
            ),
            qf,
        )
        .unwrap();
        let reconnects = Counter::new(
            "queue_worker_nats_reconnect_total",
            "Times the NATS connection was re-established.",
        )
        .unwrap();
        let invocations = CounterVec::new(
            Opts::new(
                "queue_worker_invocations_total",
                "Function calls by result: the HTTP status, or error / timeout when there was no response.",
            ),
            &["queue_name", "function_name", "status"],
        )
        .unwrap();
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "queue_worker_invocation_duration_seconds",
                "Duration of function calls.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            qf,
        )
        .unwrap();
        let retries = CounterVec::new(
            Opts::new(
                "queue_worker_retries_total",
                "Retries scheduled (messages handed back to JetStream with a delay).",
            ),
            qf,
        )
        .unwrap();
        let rejections = CounterVec::new(
            Opts::new(
                "queue_worker_rejections_total",
                "Calls refused for want of room: 429, or 503 with X-OpenFaaS-Internal or Retry-After (the adaptive limiter's signal).",
            ),
            qf,
        )
        .unwrap();
        let concurrency_limit = GaugeVec::new(
            Opts::new(
                "queue_worker_concurrency_limit",
                "Adaptive concurrency (function mode, limiter_enabled): calls of the function this replica runs at once at most, learned from its 2xx and 429 answers.",
            ),
            qf,
        )
        .unwrap();
        let probes = CounterVec::new(
            Opts::new(
                "queue_worker_concurrency_probes_total",
                "Adaptive concurrency: times a function was given one slot above its learned limit to look for room (more replicas).",
            ),
            qf,
        )
        .unwrap();
        let deferred = CounterVec::new(
            Opts::new(
                "queue_worker_calls_deferred_total",
                "Deliveries handed back to JetStream before their start time (X-Not-Before), to be redelivered then; no slot or timer is kept for them.",
            ),
            qf,
        )
        .unwrap();
        let expired = CounterVec::new(
            Opts::new(
                "queue_worker_calls_expired_total",
                "Calls not run because they were still queued past their maximum age (max_call_age, com.openfaas.queue.max_age): dead-lettered as expired.",
            ),
            qf,
        )
        .unwrap();
        let dead_lettered = CounterVec::new(
            Opts::new(
                "queue_worker_dead_lettered_total",
                "Messages stored in the dead-letter stream and removed from the queue, by reason (function_name _unknown: undecodable).",
            ),
            &["queue_name", "function_name", "reason"],
        )
        .unwrap();
        let dead_letter_failures = CounterVec::new(
            Opts::new(
                "queue_worker_dead_letter_failures_total",
                "Give-ups that could not be stored in the dead-letter stream; the message stays queued and is tried again.",
            ),
            q,
        )
        .unwrap();
        let invalid_annotations = CounterVec::new(
            Opts::new(
                "queue_worker_invalid_annotations_total",
                "Messages whose com.openfaas.retry.* or com.openfaas.queue.* annotation was invalid and replaced by the worker's setting, or whose X-Not-Before header was invalid and ignored (annotation=\"X-Not-Before\").",
            ),
            &["queue_name", "function_name", "annotation"],
        )
        .unwrap();
        let callbacks = CounterVec::new(
            Opts::new(
                "queue_worker_callbacks_total",
                "Callbacks by result: delivered, rejected (4xx), failed (no success after all tries), blocked (callback_allowed_networks) or abandoned (drain deadline).",
            ),
            &["queue_name", "result"],
        )
        .unwrap();
        let cancelled = CounterVec::new(
            Opts::new(
                "queue_worker_calls_cancelled_total",
                "Calls cancelled by their id, by stage: queued (never called) or running (the request was dropped); settled, not retried.",
            ),
            &["queue_name", "function_name", "stage"],
        )
        .unwrap();
        let status_writes = CounterVec::new(
            Opts::new(
                "queue_worker_call_status_writes_total",
                "Call records written to OF_<queue>-calls (call_status), by result: ok, error (not stored) or dropped (the writer's queue was full); the call is unaffected either way.",
            ),
            &["queue_name", "result"],
        )
        .unwrap();
        let callbacks_pending = GaugeVec::new(
            Opts::new(
                "queue_worker_callbacks_pending",
                "Callbacks waiting to be tried again or in delivery (at most callback_max_pending).",
            ),
            q,
        )
        .unwrap();
        let callbacks_pending_bytes = GaugeVec::new(
            Opts::new(
                "queue_worker_callbacks_pending_bytes",
                "Bytes of the bodies of pending callbacks (at most callback_max_pending_bytes, or one larger body).",
            ),
            q,
        )
        .unwrap();
        let callback_budget_wait = CounterVec::new(
            Opts::new(
                "queue_worker_callback_budget_wait_seconds_total",
                "Time finished jobs kept their slot waiting for a place in the callback budget (back-pressure from slow callback receivers).",
            ),
            q,
        )
        .unwrap();
        let max_inflight_g = GaugeVec::new(
            Opts::new(
                "queue_worker_max_inflight",
                "The configured max_inflight of this replica.",
            ),
            q,
        )
        .unwrap();
        for c in [
            Box::new(pending.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(stale.clone()),
            Box::new(processed.clone()),
            Box::new(submitted.clone()),
            Box::new(inflight.clone()),
            Box::new(reconnects.clone()),
            Box::new(invocations.clone()),
            Box::new(duration.clone()),
            Box::new(retries.clone()),
            Box::new(rejections.clone()),
            Box::new(concurrency_limit.clone()),
            Box::new(probes.clone()),
            Box::new(deferred.clone()),
            Box::new(expired.clone()),
            Box::new(dead_lettered.clone()),
            Box::new(dead_letter_failures.clone()),
            Box::new(invalid_annotations.clone()),
            Box::new(callbacks.clone()),
            Box::new(cancelled.clone()),
            Box::new(status_writes.clone()),
            Box::new(callbacks_pending.clone()),
            Box::new(callbacks_pending_bytes.clone()),
            Box::new(callback_budget_wait.clone()),
            Box::new(max_inflight_g.clone()),
            Box::new(log_lines_dropped().clone()),
        ] {
            registry.register(c).unwrap();
        }
        max_inflight_g
            .with_label_values(&[queue])
            .set(max_inflight as f64);
        // Export the OpenFaaS series from the start, so dashboards and the autoscaler see
        // zeros rather than gaps before the first message.
        pending.with_label_values(&[queue, ALL_FUNCTIONS]).set(0.0);
        stale.with_label_values(&[queue, ALL_FUNCTIONS]).set(0.0);
        let processed = processed.with_label_values(&[queue]);
        let submitted = submitted.with_label_values(&[queue]);
        let dead_letter_failures = dead_letter_failures.with_label_values(&[queue]);
        let callbacks_pending = callbacks_pending.with_label_values(&[queue]);
        let callbacks_pending_bytes = callbacks_pending_bytes.with_label_values(&[queue]);
        let callback_budget_wait = callback_budget_wait.with_label_values(&[queue]);
        Arc::new(Metrics {
            registry,
            queue: queue.to_string(),
            pending,
            stale,
            processed,
            submitted,
            reconnects,
            inflight,
            invocations,
            duration,
            retries,
            rejections,
            concurrency_limit,
            probes,
            deferred,
            expired,
            dead_lettered,
            dead_letter_failures,
            invalid_annotations,
            callbacks,
            cancelled,
            status_writes,
            callbacks_pending,
            callbacks_pending_bytes,
            callback_budget_wait,
            functions: Mutex::new(HashMap::new()),
            pending_shown: Mutex::new(HashMap::new()),
            stale_shown: Mutex::new(HashMap::new()),
        })
    }

    /// The per-function handles for a `<fn>.<ns>` label, created on first use.
    pub fn function(&self, label: &str) -> Arc<FunctionMetrics> {
        let mut map = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = map.get(label) {
            return f.clone();
        }
        let label = if map.len() >= MAX_FUNCTION_LABELS {
            if let Some(f) = map.get(OVERFLOW_LABEL) {
                return f.clone();
            }
            OVERFLOW_LABEL
        } else {
            label
        };
        let values = [self.queue.as_str(), label];
        let f = Arc::new(FunctionMetrics {
            label: label.to_string(),
            inflight: self.inflight.with_label_values(&values),
            duration: self.duration.with_label_values(&values),
            retries: self.retries.with_label_values(&values),
            rejections: self.rejections.with_label_values(&values),
            probes: self.probes.with_label_values(&values),
            deferred: self.deferred.with_label_values(&values),
            expired: self.expired.with_label_values(&values),
            limit_shown: AtomicUsize::new(0),
        });
        map.insert(label.to_string(), f.clone());
        f
    }

    /// Function mode with `limiter_enabled`: `f`'s learned limit on this replica. The series
    /// exists only once a limit was learned (static mode shows none rather than zeros).
    pub fn set_concurrency_limit(&self, f: &FunctionMetrics, allowed: usize) {
        self.concurrency_limit
            .with_label_values(&[self.queue.as_str(), f.label.as_str()])
            .set(allowed as f64);
    }

    /// Sets the per-function `queue_worker_pending_messages` series from one read of the
    /// stream (`<fn>.<ns>` label, count) and removes those of functions no longer listed, so
    /// a drained function's series goes away. Labels share the function-label cap: past it,
    /// counts add up under `_other`.
    pub fn set_function_pending(&self, depths: impl Iterator<Item = (String, u64)>) {
        self.set_per_function(&self.pending, &self.pending_shown, depths);
    }

    /// Sets `queue_worker_stale_messages`: the per-function series as
    /// [`Metrics::set_function_pending`] does (functions with none have no series), and the
    /// `all-functions` one to `total` (which includes the legacy `<queue>` subject's).
    pub fn set_stale(&self, per_function: impl Iterator<Item = (String, u64)>, total: u64) {
        self.set_per_function(&self.stale, &self.stale_shown, per_function);
        self.stale
            .with_label_values(&[&self.queue, ALL_FUNCTIONS])
            .set(total as f64);
    }

    fn set_per_function(
        &self,
        gauge: &GaugeVec,
        shown: &Mutex<HashMap<String, f64>>,
        values: impl Iterator<Item = (String, u64)>,
    ) {
        let mut next: HashMap<String, f64> = HashMap::new();
        for (label, n) in values.filter(|(_, n)| *n > 0) {
            let label = self.function(&label).label.clone();
            *next.entry(label).or_default() += n as f64;
        }
        let mut shown = shown.lock().unwrap_or_else(|e| e.into_inner());
        for old in shown.keys() {
            if !next.contains_key(old) {
                let _ = gauge.remove_label_values(&[&self.queue, old]);
            }
        }
        for (label, n) in &next {
            if shown.get(label) != Some(n) {
                gauge.with_label_values(&[&self.queue, label]).set(*n);
            }
        }
        *shown = next;
    }

    pub fn invocation(&self, f: &FunctionMetrics, status: &str) {
        self.invocations
            .with_label_values(&[&self.queue, &f.label, status])
            .inc();
    }

    /// `function_label` is a capped label from [`Metrics::function`], or [`UNKNOWN_FUNCTION`].
    pub fn dead_lettered(&self, function_label: &str, reason: &str) {
        self.dead_lettered
            .with_label_values(&[&self.queue, function_label, reason])
            .inc();
    }

    pub fn invalid_annotation(&self, f: &FunctionMetrics, annotation: &str) {
        self.invalid_annotations
            .with_label_values(&[&self.queue, &f.label, annotation])
            .inc();
    }

    /// A call settled because it was cancelled; `stage` is `queued` or `running`.
    pub fn cancelled(&self, f: &FunctionMetrics, stage: &str) {
        self.cancelled
            .with_label_values(&[&self.queue, &f.label, stage])
            .inc();
    }

    /// A call record's write: `ok` or `error`.
    pub fn status_write(&self, result: &str) {
        self.status_writes
            .with_label_values(&[&self.queue, result])
            .inc();
    }

    pub fn callback(&self, result: &str) {
        self.callbacks
            .with_label_values(&[&self.queue, result])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        render(&self.registry)
    }

    /// The registry `/metrics` serves.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// The Prometheus text exposition of a registry.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .expect("text encoding to a Vec cannot fail");
    String::from_utf8(buf).unwrap_or_default()
}

/// The front door's metrics (`queue-worker frontdoor`), in a registry of their own: a front
/// door must not export the worker's series (the autoscaler would average a zero
/// `queue_worker_pending_messages` from it into the real one).
pub struct FrontDoorMetrics {
    registry: Registry,
    accepted: CounterVec,
    duplicates: CounterVec,
    rejected: CounterVec,
    calls: CounterVec,
    publish_seconds: HistogramVec,
    pub reconnects: Counter,
    functions: Mutex<std::collections::HashSet<String>>,
}

impl FrontDoorMetrics {
    pub fn new() -> Arc<FrontDoorMetrics> {
        let registry = Registry::new();
        let accepted = CounterVec::new(
            Opts::new(
                "queue_worker_frontdoor_accepted_total",
                "Requests the front door queued and answered 202 (JetStream stored them).",
            ),
            &["queue_name", "function_name"],
        )
        .unwrap();
        let duplicates = CounterVec::new(
            Opts::new(
                "queue_worker_frontdoor_duplicates_total",
                "Accepted requests whose X-Call-Id was already queued within the duplicate window (stored once).",
            ),
            &["queue_name"],
        )
        .unwrap();
        let rejected = CounterVec::new(
            Opts::new(
                "queue_worker_frontdoor_rejected_total",
                "Requests the front door refused, by reason: bad_request, too_large, unknown_function, lookup_failed, unavailable.",
            ),
            &["reason"],
        )
        .unwrap();
        let calls = CounterVec::new(
            Opts::new(
                "queue_worker_frontdoor_calls_total",
                "Requests about a call by its id: op cancel (DELETE) or status (GET), by result: accepted, unknown, finished, found, off (call_status is off) or error.",
            ),
            &["op", "result"],
        )
        .unwrap();
        let publish_seconds = HistogramVec::new(
            HistogramOpts::new(
                "queue_worker_frontdoor_publish_seconds",
                "Time from publishing a request to JetStream's acknowledgement.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["queue_name"],
        )
        .unwrap();
        let reconnects = Counter::new(
            "queue_worker_nats_reconnect_total",
            "Times the NATS connection was re-established.",
        )
        .unwrap();
        for c in [
            Box::new(accepted.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duplicates.clone()),
            Box::new(rejected.clone()),
            Box::new(calls.clone()),
            Box::new(publish_seconds.clone()),
            Box::new(reconnects.clone()),
            Box::new(log_lines_dropped().clone()),
        ] {
            registry.register(c).unwrap();
        }
        for reason in FRONTDOOR_REJECTIONS {
            rejected.with_label_values(&[reason]);
        }
        Arc::new(FrontDoorMetrics {
            registry,
            accepted,
            duplicates,
            rejected,
            calls,
            publish_seconds,
            reconnects,
            functions: Mutex::default(),
        })
    }

    /// A request stored by JetStream; `duplicate` when it was already there.
    pub fn accepted(&self, queue: &str, function: &str, duplicate: bool, publish: f64) {
        let label = {
            let mut seen = self.functions.lock().unwrap_or_else(|e| e.into_inner());
            if seen.contains(function) || seen.len() < MAX_FUNCTION_LABELS {
                seen.insert(function.to_string());
                function
            } else {
                OVERFLOW_LABEL
            }
        };
        self.accepted.with_label_values(&[queue, label]).inc();
        if duplicate {
            self.duplicates.with_label_values(&[queue]).inc();
        }
        self.publish_seconds
            .with_label_values(&[queue])
            .observe(publish);
    }

    /// A refused request; `reason` is one of [`FRONTDOOR_REJECTIONS`].
    pub fn rejected(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }

    /// A cancel or status request and how it was answered.
    pub fn call_request(&self, op: &str, result: &str) {
        self.calls.with_label_values(&[op, result]).inc();
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// The `reason` values of `queue_worker_frontdoor_rejected_total`.
pub const FRONTDOOR_REJECTIONS: &[&str] = &[
    "bad_request",
    "too_large",
    "unknown_function",
    "lookup_failed",
    "unavailable",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_the_openfaas_names() {
        let m = Metrics::new("faas-request", 4);
        let f = m.function("sleep.openfaas-fn");
        f.inflight.inc();
        m.invocation(&f, "200");
        f.retries.inc();
        f.rejections.inc();
        f.probes.inc();
        f.deferred.inc();
        f.expired.inc();
        m.set_concurrency_limit(&f, 3);
        f.duration.observe(0.1);
        m.dead_lettered("sleep.openfaas-fn", "attempts_exhausted");
        m.dead_letter_failures.inc();
        m.invalid_annotation(&f, "com.openfaas.retry.attempts");
        m.callback("delivered");
        m.cancelled(&f, "queued");
        m.status_write("ok");
        m.reconnects.inc();
        let door = FrontDoorMetrics::new();
        door.accepted("faas-request", "sleep.openfaas-fn", true, 0.001);
        door.call_request("cancel", "accepted");
        let text = m.render() + &door.render();
        for name in NAMES {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
        assert!(text.contains(
            r#"queue_worker_pending_messages{function_name="all-functions",queue_name="faas-request"} 0"#
        ));
        assert!(text.contains("# TYPE queue_worker_messages_submitted_total gauge"));
    }

    #[test]
    fn readme_documents_every_metric() {
        let readme = include_str!("../../README.md");
        for name in NAMES {
            assert!(
                readme.contains(&format!("| `{name}` |")),
                "README.md lacks {name}"
            );
        }
    }

    #[test]
    fn per_function_pending_follows_each_read_and_drained_functions_go() {
        let m = Metrics::new("q", 1);
        let text = |m: &Metrics| {
            let mut lines: Vec<String> = m
                .render()
                .lines()
                .filter(|l| l.starts_with("queue_worker_pending_messages{"))
                .map(str::to_string)
                .collect();
            lines.sort();
            lines
        };
        m.set_function_pending([("a.ns".to_string(), 3), ("b.ns".to_string(), 1)].into_iter());
        assert_eq!(
            text(&m),
            [
                r#"queue_worker_pending_messages{function_name="a.ns",queue_name="q"} 3"#,
                r#"queue_worker_pending_messages{function_name="all-functions",queue_name="q"} 0"#,
                r#"queue_worker_pending_messages{function_name="b.ns",queue_name="q"} 1"#,
            ]
        );
        m.set_function_pending([("a.ns".to_string(), 2)].into_iter());
        assert_eq!(
            text(&m),
            [
                r#"queue_worker_pending_messages{function_name="a.ns",queue_name="q"} 2"#,
                r#"queue_worker_pending_messages{function_name="all-functions",queue_name="q"} 0"#,
            ],
            "b drained: its series is gone"
        );
    }

    #[test]
    fn function_labels_are_capped() {
        let m = Metrics::new("q", 1);
        for i in 0..MAX_FUNCTION_LABELS + 10 {
            m.function(&format!("f{i}.ns"));
        }
        assert_eq!(m.function("new.ns").label, OVERFLOW_LABEL);
        assert_eq!(m.function("f1.ns").label, "f1.ns");
    }
}
