//! Wiring: metrics and health first (so probes answer during start-up), then NATS, the stream
//! and consumer, the state poller and the pull loop; and the drain on shutdown.
//!
//! The pull loop and the state poller are supervised: if either ends on its own (a panic, a
//! return nobody asked for), the worker turns unready, drains as at a shutdown and ends with
//! an error, so the process exits non-zero and is restarted rather than stay "ready" doing
//! nothing. Both are aborted if `work` is left early, so no start-up error leaks them.
//!
//! Shutdown order: not ready → stop pulling (messages that arrived after that are handed
//! back) → running calls finish within `drain_timeout` and are settled → at the deadline the
//! rest are NAKed without delay, so another replica takes them at once → flush acks → exit.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use crate::config::{Config, ScalingMode};
use crate::nats::calls::{self, CallsLayout};
use crate::nats::consumers::{claim_function_mode, FunctionClaim};
use crate::nats::presence;
use crate::nats::stream::{self, DeadLetterLayout, Layout, LayoutError};
use crate::telemetry::metrics::{Metrics, ALL_FUNCTIONS};
use crate::telemetry::server::{self, Health};
use crate::worker::callback::Callbacks;
use crate::worker::deadletter::DeadLetters;
use crate::worker::discovery::{self, Snapshot};
use crate::worker::flow::Worker;
use crate::worker::functions::{keep_marker, FunctionPuller};
use crate::worker::invoke::Invoker;
use crate::worker::job::Decoder;
use crate::worker::lifecycle::{Cancels, StatusWriter};
use crate::worker::pull::{PullLimits, Puller};
use crate::worker::schedule::Scheduler;
use crate::worker::slot::{Pool, Slot};
use crate::worker::stale::{Consumer as StaleConsumer, Subjects};

/// A worker started by [`start`].
pub struct Running {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Begins the graceful drain; readiness turns false at once.
    pub fn shutdown(&self) {
        self.health.draining.store(true, Ordering::Relaxed);
        self.shutdown.cancel();
    }

    /// True once the worker task has ended (after a drain, or on a fatal error).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until the worker has stopped: after a shutdown and drain, or on a fatal error
    /// (`Err`), which includes the pull loop or the state poller ending on its own
    /// ([`TaskEnded`], after a drain).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("worker task panicked")?
    }
}

/// Starts the worker. Binding the metrics port is the only step that fails here; the rest
/// (connecting, setting up the stream) happens in the background with retries, and a fatal
/// problem there (an incompatible stream) ends the task with an error.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let metrics = Metrics::new(&config.queue, config.max_inflight);
    let health = Arc::new(Health::default());
    let shutdown = CancellationToken::new();
    let server_stop = CancellationToken::new();
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, config.metrics_port));
    let (metrics_addr, server) = server::serve(
        addr,
        metrics.registry().clone(),
        health.clone(),
        server_stop.clone(),
    )
    .await
    .with_context(|| format!("cannot listen on metrics_port {}", config.metrics_port))?;
    tracing::info!(port = metrics_addr.port(), "Starting metrics server");

    let task = tokio::spawn(run(
        config,
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
        server_stop,
        server,
    ));
    Ok(Running {
        metrics_addr,
        metrics,
        health,
        shutdown,
        task,
    })
}

async fn run(
    config: Config,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    server_stop: CancellationToken,
    server: JoinHandle<()>,
) -> anyhow::Result<()> {
    let result = work(&config, metrics, &health, &shutdown).await;
    server_stop.cancel();
    let _ = server.await;
    result
}

async fn work(
    config: &Config,
    metrics: Arc<Metrics>,
    health: &Arc<Health>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        maxInflight = config.max_inflight,
        stream = %config.stream_name(),
        durable = %config.durable,
        gateway = %crate::config::redact_url(config.gateway_url.as_str()),
        ackWait = ?config.ack_wait,
        "Starting queue-worker"
    );
    // Everything that can refuse the configuration, before anything connects or is spawned.
    let (gateway, gateway_auth) = crate::worker::invoke::split_gateway(&config.gateway_url);
    let invoker = Invoker::new(
        &hyper::Uri::try_from(gateway.as_str())
            .with_context(|| format!("gateway_url {gateway:?}"))?,
        config.upstream_timeout,
        config.max_inflight,
        gateway_auth,
    )?;
    let callbacks = Callbacks::new(config.callback.clone(), metrics.clone())?;
    let decoder = Decoder::new(
        &gateway,
        &config.default_namespace,
        config.max_message_bytes,
    )
    .with_context(|| format!("gateway_url {gateway:?} is not a base URL"))?;

    let conn = crate::nats::connect(&config.nats, metrics.reconnects.clone()).await?;
    let client = conn.client.clone();
    let _ = health.nats.set(client.clone());
    let js = async_nats::jetstream::new(client.clone());
    let layout = Layout::of(config);
    let dead_layout = DeadLetterLayout::of(config);
    let calls_layout = CallsLayout::of(config, &config.queue);

    // Function mode: whether the stream is ours yet (static replicas may still be running
    // calls on their consumer; the pull loop takes it over once they have ended).
    let claimed = Arc::new(AtomicBool::new(false));
    // Set up the streams and the consumer, waiting out an unavailable server.
    let mut wait = Duration::from_millis(200);
    let consumer_info = loop {
        let attempt = async {
            stream::ensure_stream(&js, &layout).await?;
            stream::ensure_dead_letter_stream(&js, &dead_layout).await?;
            calls::ensure_bucket(&js, &calls_layout).await?;
            let info = match config.mode {
                // Function mode's consumers come and go with the work (`functions.rs`); the
                // stream is claimed first (static mode's durable goes, the marker comes).
                ScalingMode::Function => match claim_function_mode(&js, &layout, false).await {
                    Ok(FunctionClaim::Claimed) => {
                        claimed.store(true, Ordering::Relaxed);
                        Ok(None)
                    }
                    // Ready all the same: a rolling update stops the old static replicas
                    // only once this one is ready.
                    Ok(FunctionClaim::Wait { consumer, unacked }) => {
                        tracing::info!(stream = %layout.stream, consumer = %consumer, unacked, "Function mode: static-mode replicas are running calls; taking the stream over once they have ended (nothing is pulled meanwhile)");
                        Ok(None)
                    }
                    Err(e) => Err(LayoutError::Unavailable(format!(
                        "cannot take the stream into function mode: {e}"
                    ))),
                },
                ScalingMode::Static => match stream::ensure_consumer(&js, &layout).await {
                    Ok(info) => Ok(Some(info)),
                    // Function-mode consumers hold the stream: the pull loop waits for them.
                    Err(LayoutError::Blocked(_)) => Ok(None),
                    Err(e) => Err(e),
                },
            }?;
            Ok::<_, LayoutError>(info)
        };
        let result = tokio::select! {
            r = attempt => r,
            _ = shutdown.cancelled() => return Ok(()),
        };
        match result {
            Ok(info) => break info,
            Err(LayoutError::Incompatible(msg)) => anyhow::bail!(msg),
            Err(LayoutError::Unavailable(msg) | LayoutError::Blocked(msg)) => {
                tracing::warn!(error = %msg, retry_in = ?wait, "waiting for JetStream");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    };
    // Cancels are watched until the drain has ended (a cancel must reach calls still
    // running); nothing is pulled before those already stored are loaded.
    let poller_stop = CancellationToken::new();
    let cancels = Cancels::new(config.calls.ttl);
    tokio::spawn(
        cancels
            .clone()
            .watch(js.clone(), calls_layout.clone(), poller_stop.clone()),
    );
    tokio::select! {
        _ = cancels.loaded() => {}
        _ = shutdown.cancelled() => {
            poller_stop.cancel();
            return Ok(());
        }
    }
    health.layout_ready.store(true, Ordering::Relaxed);
    let max_payload = client.server_info().max_payload as u64;
    if max_payload > config.dead_letter.max_bytes {
        tracing::warn!(
            dead_letter_max_bytes = config.dead_letter.max_bytes,
            max_payload,
            "dead_letter_max_bytes is below the server's max_payload: one large dead letter could evict all the others"
        );
    }
    let (poller, snapshots) = match config.mode {
        ScalingMode::Static => {
            tracing::info!(stream = %layout.stream, durable = %layout.durable, "Subscribed");
            let poller = Essential::spawn(
                "state poller",
                poll_state(
                    js.clone(),
                    layout.clone(),
                    config.stream_poll_interval,
                    metrics.clone(),
                    health.clone(),
                    poller_stop.clone(),
                ),
            );
            (poller, None)
        }
        ScalingMode::Function => {
            let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
            // Both stop only after the drain: the gauges stay fresh and the marker alive
            // while calls finish.
            let read = discovery::run(
                js.clone(),
                layout.clone(),
                tx,
                metrics.clone(),
                health.clone(),
                poller_stop.clone(),
            );
            let marker = keep_marker(
                client.clone(),
                js.clone(),
                layout.clone(),
                claimed.clone(),
                poller_stop.clone(),
            );
            let poller = Essential::spawn("discovery", async move {
                tokio::join!(read, marker);
            });
            (poller, Some(rx))
        }
    };

    // Pull slots: one per call, plus the prefetch (messages that may wait for a call slot).
    let slots = Arc::new(Semaphore::new(config.max_inflight + config.prefetch));
    let calls = (config.prefetch > 0).then(|| Arc::new(Semaphore::new(config.max_inflight)));
    let intake = CancellationToken::new();
    let tracker = TaskTracker::new();
    let deadline = CancellationToken::new();
    let held = Arc::new(AtomicUsize::new(0));
    let status = config
        .calls
        .status
        .then(|| StatusWriter::new(js.clone(), &config.queue, metrics.clone()));
    let worker = Arc::new(Worker {
        invoker,
        callbacks,
        metrics: metrics.clone(),
        retry: config.retry.clone(),
        max_call_age: config.max_call_age,
        decoder,
        dead_letters: DeadLetters::new(
            js.clone(),
            dead_layout,
            &config.queue,
            &layout.stream,
            &config.default_namespace,
        ),
        progress_interval: config.progress_interval(),
        slots: slots.clone(),
        calls,
        stopping: intake.clone(),
        tracker: tracker.clone(),
        deadline: deadline.clone(),
        debug: config.debug,
        warned: Default::default(),
        held: held.clone(),
        cancels,
        status,
    });
    // Static mode: tell a function-mode replica taking the stream over what this replica
    // holds, until the drain has ended (`nats/presence.rs`).
    let presence_stop = CancellationToken::new();
    if snapshots.is_none() {
        tokio::spawn(presence::answer(
            client.clone(),
            layout.stream.clone(),
            held.clone(),
            presence_stop.clone(),
        ));
    }

    let pull_worker = worker.clone();
    let pull_stop = intake.clone();
    let pull_task = match snapshots {
        None => {
            let puller = Puller {
                client: client.clone(),
                js: js.clone(),
                layout: layout.clone(),
                slots,
                max_outstanding: config.pull_max_messages.min(config.max_inflight)
                    + config.prefetch,
                limits: consumer_info
                    .as_ref()
                    .map(PullLimits::of)
                    .unwrap_or_default(),
                generation: conn.generation,
                consumer_ready: consumer_info.is_some(),
            };
            Essential::spawn("pull loop", async move {
                puller
                    .run(pull_stop, move |msg, slot| {
                        pull_worker.dispatch(msg, slot.map(Slot::permit))
                    })
                    .await
            })
        }
        Some(snapshots) => {
            let scheduler = Scheduler::new(config.max_inflight)
                .with_max_batch(config.pull_max_messages.min(config.max_inflight))
                .with_limiter(config.limiter);
            let puller = FunctionPuller {
                client: client.clone(),
                js: js.clone(),
                layout: layout.clone(),
                pool: Pool::new(scheduler),
                snapshots,
                inactive_threshold: config.inactive_threshold,
                backstop: backstop(config),
                generation: conn.generation,
                claimed: claimed.clone(),
            };
            Essential::spawn("pull loop", async move {
                puller
                    .run(pull_stop, move |msg, slot| pull_worker.dispatch(msg, slot))
                    .await
            })
        }
    };

    let mut essential = [pull_task, poller];
    let fault = supervise(shutdown, &mut essential).await.err();
    let [pull_task, poller] = essential;
    // The drain deadline counts from the signal (or the fault), whatever stopping the intake
    // takes.
    let drain_deadline = tokio::time::Instant::now() + config.drain_timeout;
    health.draining.store(true, Ordering::Relaxed);
    let running = tracker.len();
    if let Some(fault) = &fault {
        health.failed.store(true, Ordering::Relaxed);
        tracing::error!(task = fault.task, how = %fault.how, drain_timeout = ?config.drain_timeout, running, "A worker task stopped unexpectedly; draining, then exiting with an error");
    } else {
        tracing::info!(drain_timeout = ?config.drain_timeout, running, "Draining: no new work is pulled");
    }
    intake.cancel();
    pull_task.join().await;
    tracker.close();
    if tokio::time::timeout_at(drain_deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("Drain deadline reached; handing back unfinished messages");
        deadline.cancel();
        if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .is_err()
        {
            tracing::error!(
                "some tasks did not stop; their messages are redelivered after ack_wait"
            );
        }
    }
    poller_stop.cancel();
    presence_stop.cancel();
    poller.join().await;
    // Acks are fire-and-forget publishes: make sure they left before the process ends.
    if let Err(e) = tokio::time::timeout(Duration::from_secs(5), client.flush()).await {
        tracing::warn!(error = %e, "could not flush NATS before exit");
    }
    match fault {
        Some(fault) => Err(fault.into()),
        None => {
            tracing::info!("Stopped");
            Ok(())
        }
    }
}

/// The function consumers' server-side `inactive_threshold`: a backstop that deletes the
/// consumers of replicas that died. Servers before 2.11.7 do not count unacknowledged
/// messages as activity, so it must outlast the longest call (`upstream_timeout`) and a
/// lease period, or a long call's consumer would be deleted under it.
fn backstop(config: &Config) -> Duration {
    (config.inactive_threshold * 2)
        .max(config.upstream_timeout + config.ack_wait + config.inactive_threshold)
}

/// A task the worker cannot do without ended before it was asked to stop.
#[derive(Debug, thiserror::Error)]
#[error("the {task} stopped unexpectedly ({how})")]
pub struct TaskEnded {
    pub task: &'static str,
    /// "returned", or the panic's message.
    pub how: String,
}

/// A task the worker cannot do without (the pull loop, the state poller). It is aborted if
/// dropped, so leaving `work` early (a start-up error, a panic) never leaves it running.
struct Essential {
    name: &'static str,
    /// `None` once the task's end was seen.
    handle: Option<AbortOnDropHandle<()>>,
}

impl Essential {
    fn spawn(name: &'static str, task: impl Future<Output = ()> + Send + 'static) -> Essential {
        Essential {
            name,
            handle: Some(AbortOnDropHandle::new(tokio::spawn(task))),
        }
    }

    /// Resolves when the task ends, saying how; never, once that was seen. Cancel-safe.
    async fn ended(&mut self) -> TaskEnded {
        let Some(handle) = self.handle.as_mut() else {
            return std::future::pending().await;
        };
        let result = handle.await;
        self.handle = None;
        let how = match result {
            Ok(()) => "returned".to_string(),
            Err(e) if e.is_panic() => {
                let panic = e.into_panic();
                let msg = panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("no message");
                format!("panicked: {msg}")
            }
            Err(e) => e.to_string(),
        };
        TaskEnded {
            task: self.name,
            how,
        }
    }

    /// Waits for the task to end, once it was asked to.
    async fn join(mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }
}

/// Waits for `shutdown`, or for one of `tasks` to end first: then `Err` says which and how.
async fn supervise(shutdown: &CancellationToken, tasks: &mut [Essential]) -> Result<(), TaskEnded> {
    let ended = futures_util::future::select_all(tasks.iter_mut().map(|t| Box::pin(t.ended())));
    tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        (fault, _, _) = ended => Err(fault),
    }
}

/// Reads stream and consumer state every `interval`: the pending gauge (what OpenFaaS's
/// autoscaler averages across replicas, so every replica reports the whole queue), the
/// submitted gauge, and the stream part of readiness.
///
/// Stale messages (`stale.rs`): each poll's consumer read checks every subject, paired with
/// the per-subject counts of the previous poll (read after the previous consumer read, as
/// the decision needs). The `all-functions` pending series is what the consumer owes, so it
/// never counted stale messages; the per-function ones (stream counts) leave them out.
async fn poll_state(
    js: async_nats::jetstream::Context,
    layout: Layout,
    interval: Duration,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let labels = [layout.queue.as_str(), ALL_FUNCTIONS];
    let mut stale = Subjects::default();
    // Whether the per-subject counts were read after the consumer read last compared with
    // them: the stale check needs each stream read between two consumer reads, so after a
    // failed per-subject read the next consumer read is not compared.
    let mut subjects_fresh = true;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        // A read in progress (two JetStream requests, each up to its timeout while NATS is
        // away) must not hold up the end of a drain.
        let state = tokio::select! {
            state = stream::read_state(&js, &layout) => state,
            _ = stop.cancelled() => return,
        };
        match state {
            Ok(state) => {
                metrics
                    .pending
                    .with_label_values(&labels)
                    .set(state.pending as f64);
                metrics.submitted.set(state.submitted as f64);
                health.stream_ok.store(true, Ordering::Relaxed);
                let now = tokio::time::Instant::now();
                let fresh = std::mem::replace(&mut subjects_fresh, false);
                let changes = match state.consumer {
                    Some(c) if fresh => stale.checked_all(
                        StaleConsumer {
                            owed: c.owed,
                            delivered: c.delivered,
                        },
                        now,
                    ),
                    // No shared consumer (a switch from function mode), or no fresh
                    // per-subject counts: nothing to compare.
                    _ => Vec::new(),
                };
                for (subject, change) in changes {
                    discovery::log_change(&layout, &subject, &layout.durable, change);
                }
                // Per-function depth too, where the subjects say it (`<queue>.<fn>.<ns>`):
                // the shared consumer serves them all, but dashboards and the autoscaler
                // still see each function's queue.
                let subjects = tokio::select! {
                    r = stream::read_subjects(&js, &layout.stream, ">") => r,
                    _ = stop.cancelled() => return,
                };
                match subjects {
                    Ok(counts) => {
                        let depths = discovery::of_queue(&layout.queue, counts.subjects);
                        let now = tokio::time::Instant::now();
                        subjects_fresh = true;
                        for (subject, change) in stale.stored(&depths, now) {
                            discovery::log_change(&layout, &subject, &layout.durable, change);
                        }
                        discovery::publish_gauges(&metrics, &layout.queue, &depths, &stale);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read per-subject counts");
                        metrics.set_function_pending(std::iter::empty());
                        metrics.set_stale(std::iter::empty(), 0);
                    }
                }
            }
            Err(e) => {
                // No count is better than a stale one: the autoscaler's avg() and KEDA's
                // max() across replicas would keep acting on it.
                let _ = metrics.pending.remove_label_values(&labels);
                metrics.set_function_pending(std::iter::empty());
                metrics.set_stale(std::iter::empty(), 0);
                if health.stream_ok.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "cannot read stream state");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// Sets its flag when dropped: a task holding one has stopped.
    struct Dropped(Arc<AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn forever(flag: &Arc<AtomicBool>) -> impl Future<Output = ()> + Send + 'static {
        let guard = Dropped(flag.clone());
        async move {
            let _guard = guard;
            std::future::pending::<()>().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ends_on_its_own_ends_the_supervision() {
        type Case = (&'static str, fn() -> Essential, &'static str);
        let cases: [Case; 2] = [
            (
                "panic",
                || {
                    Essential::spawn("pull loop", async {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        panic!("boom");
                    })
                },
                "panicked: boom",
            ),
            (
                "return",
                || {
                    Essential::spawn("pull loop", async {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    })
                },
                "returned",
            ),
        ];
        for (what, faulty, how) in cases {
            let shutdown = CancellationToken::new();
            let other = Arc::new(AtomicBool::new(false));
            let mut tasks = [faulty(), Essential::spawn("state poller", forever(&other))];
            let result =
                tokio::time::timeout(Duration::from_secs(60), supervise(&shutdown, &mut tasks))
                    .await
                    .unwrap_or_else(|_| {
                        panic!("{what}: the supervision went on after the task ended")
                    });
            let fault = result.expect_err(what);
            assert_eq!(
                (fault.task, fault.how.as_str()),
                ("pull loop", how),
                "{what}"
            );
            assert!(
                !other.load(Ordering::SeqCst),
                "{what}: the other task was stopped early"
            );
            drop(tasks);
            tokio::task::yield_now().await;
            assert!(
                other.load(Ordering::SeqCst),
                "{what}: the other task outlived its owner"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_ends_the_supervision_without_error() {
        let shutdown = CancellationToken::new();
        let flag = Arc::new(AtomicBool::new(false));
        let mut tasks = [Essential::spawn("pull loop", forever(&flag))];
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            stop.cancel();
        });
        assert!(supervise(&shutdown, &mut tasks).await.is_ok());
        assert!(!flag.load(Ordering::SeqCst));
    }

    #[test]
    fn a_failed_task_makes_the_worker_unready() {
        let health = Health::default();
        health.failed.store(true, Ordering::Relaxed);
        assert_eq!(health.readiness(), Err("a worker task stopped; exiting"));
    }
}
