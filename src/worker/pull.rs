//! ① The pull loop. It asks JetStream only for as many messages as there are free slots, so
//! nothing waits in a local buffer while its `ack_wait` runs out; each delivered message
//! arrives with the slot (semaphore permit) that was reserved for it. The slots are
//! `max_inflight`, plus `consumer_prefetch` when set: those few messages wait for a call
//! slot in the worker, renewing their lease (`flow.rs`).
//!
//! Protocol, as nats-server 2.9 and later speak it: pull requests
//! `{"batch":n,"expires":ns,"idle_heartbeat":ns}` go to
//! `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>` with one long-lived inbox as reply subject.
//! The server answers with messages, `100` heartbeats while a request waits, and a status
//! (`408` expired, `409` consumer deleted, ...) carrying `Nats-Pending-Messages` for what a
//! request did not deliver. Several requests may be outstanding at once, so pulls pipeline
//! with the work instead of waiting for each batch to finish.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::StatusCode;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::nats::consumers::{claim_static_mode, StaticClaim};
use crate::nats::stream::{ensure_consumer, ensure_stream, Layout, LayoutError};

/// How long a pull request waits on the server for messages.
const EXPIRES: Duration = Duration::from_secs(20);
/// Heartbeat interval the server keeps while a request waits.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// No heartbeat for this long while requests are outstanding: assume they are gone (the
/// server restarted, or the consumer was deleted without telling us).
const HEARTBEAT_LOST: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest a stopping pull loop waits for its outstanding requests to end (`wind_down`).
const WIND_DOWN: Duration = Duration::from_millis(500);
/// While function-mode replicas hold the stream: how often to look again, and to say so.
const STATIC_CLAIM_EVERY: Duration = Duration::from_secs(2);
const WAIT_LOG_EVERY: Duration = Duration::from_secs(30);

/// What the pull loop needs.
pub struct Puller {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub layout: Layout,
    /// One permit per invocation slot (`max_inflight`).
    pub slots: Arc<Semaphore>,
    /// Most messages requested but not yet received (`consumer_pull_max_messages`).
    pub max_outstanding: usize,
    /// The consumer's own limits on pull requests (an existing consumer may have them).
    pub limits: PullLimits,
    /// Changes on every NATS reconnect.
    pub generation: watch::Receiver<u64>,
    /// False when the consumer could not be set up at start-up (the stream is still in
    /// function mode): the loop waits for it before pulling.
    pub consumer_ready: bool,
}

/// Limits a consumer puts on each pull request; requests beyond them are refused with a 409.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullLimits {
    /// `max_batch`; 0 means none.
    pub max_batch: usize,
    /// `max_expires`; zero means none.
    pub max_expires: Duration,
}

impl PullLimits {
    pub fn of(info: &jetstream::consumer::Info) -> PullLimits {
        PullLimits {
            max_batch: usize::try_from(info.config.max_batch.max(0)).unwrap_or(0),
            max_expires: info.config.max_expires,
        }
    }

    fn expires(&self) -> Duration {
        if self.max_expires.is_zero() {
            EXPIRES
        } else {
            EXPIRES.min(self.max_expires)
        }
    }

    /// The server refuses a heartbeat longer than half of `expires`.
    fn heartbeat(&self) -> Duration {
        HEARTBEAT.min(self.expires() / 3)
    }

    fn batch(&self, n: usize) -> usize {
        if self.max_batch == 0 {
            n
        } else {
            n.min(self.max_batch)
        }
    }
}

/// Permits held by the loop: acquired but not yet asked for (`free`), and backing requests
/// the server has not filled yet (`reserved`).
#[derive(Default)]
struct Slots {
    free: Option<OwnedSemaphorePermit>,
    reserved: Option<OwnedSemaphorePermit>,
}

fn count(p: &Option<OwnedSemaphorePermit>) -> usize {
    p.as_ref().map_or(0, |p| p.num_permits())
}

fn merge(into: &mut Option<OwnedSemaphorePermit>, p: OwnedSemaphorePermit) {
    match into {
        Some(existing) => existing.merge(p),
        None => *into = Some(p),
    }
}

fn take(from: &mut Option<OwnedSemaphorePermit>, n: usize) -> Option<OwnedSemaphorePermit> {
    if n == 0 {
        return None;
    }
    let have = count(from);
    if n >= have {
        return from.take();
    }
    from.as_mut().and_then(|p| p.split(n))
}

/// Why the loop starts over with a new inbox.
enum Reset {
    /// The connection was re-established; outstanding requests died with the old one.
    Reconnected,
    /// Start over at once (a status we could not attribute to one request).
    Quiet,
    /// The server said something went wrong; pause before asking again.
    Trouble(String),
    /// The consumer (or its stream) is gone or unreachable: recreate it, then pause.
    Consumer(String),
    /// A new consumer leader was elected: requests waiting on the old one are gone with it.
    Elected,
    /// Shutdown.
    Stop,
}

impl Puller {
    /// Pulls until `stop` is cancelled (or the connection is closed for good), handing each
    /// message and its slot to `dispatch`.
    /// The slot is `None` only for a message the loop did not ask for; the receiver must then
    /// wait for a slot itself. Messages that arrive after a reset or after `stop` are handed
    /// back to JetStream for immediate redelivery.
    pub async fn run<F>(mut self, stop: CancellationToken, mut dispatch: F)
    where
        F: FnMut(jetstream::Message, Option<OwnedSemaphorePermit>),
    {
        let subject = format!(
            "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
            self.layout.stream, self.layout.durable
        );
        // Pipelining: while a request is outstanding, ask again only for a sizeable batch.
        // This also bounds the requests one replica keeps waiting on the server to about
        // three, far below the consumer's max_waiting.
        let threshold = (self.max_outstanding / 2).max(1);
        let mut backoff = BACKOFF_MIN;
        let mut slots = Slots::default();
        self.generation.borrow_and_update();
        let mut elected = LeaderElected::subscribe(&self.client, &self.layout).await;
        if !self.consumer_ready && !self.wait_for_consumer(&stop, &mut elected).await {
            return;
        }

        loop {
            let inbox = self.client.new_inbox();
            let mut sub = match self.client.subscribe(inbox.clone()).await {
                Ok(sub) => sub,
                Err(e) => {
                    if self.generation.has_changed().is_err() {
                        // Closed for good: see the select below.
                        tracing::error!("the NATS connection is closed for good; pulls stop");
                        return;
                    }
                    tracing::warn!(error = %e, "cannot subscribe to pull inbox; retrying");
                    if sleep_or_stop(&stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            // The new requests go to whichever leader is there now: elections announced
            // before them are old news (left queued, they would reset these requests and
            // hand their messages back, costing each an attempt).
            elected.clear();
            let mut last_activity = Instant::now();
            // One timer for the watchdog, moved only when it fires early: making a new one
            // per loop turn cost a timer-wheel insert and removal per message.
            let watchdog = tokio::time::sleep_until(last_activity + HEARTBEAT_LOST);
            tokio::pin!(watchdog);

            let reset = loop {
                let outstanding = count(&slots.reserved);
                let free = count(&slots.free);
                let connected =
                    self.client.connection_state() == async_nats::connection::State::Connected;
                // A request made while disconnected would be queued and sent on the new
                // connection after we have moved to a new inbox; wait for the reconnect.
                // None once stopping: its messages would be on the wire as the inbox goes.
                if connected
                    && free > 0
                    && (outstanding == 0 || free >= threshold)
                    && !stop.is_cancelled()
                {
                    let n = self.limits.batch(free);
                    let payload = format!(
                        r#"{{"batch":{n},"expires":{},"idle_heartbeat":{}}}"#,
                        self.limits.expires().as_nanos(),
                        self.limits.heartbeat().as_nanos()
                    );
                    match self
                        .client
                        .publish_with_reply(subject.clone(), inbox.clone(), payload.into())
                        .await
                    {
                        Ok(()) => {
                            if outstanding == 0 {
                                last_activity = Instant::now();
                            }
                            if let Some(p) = take(&mut slots.free, n) {
                                merge(&mut slots.reserved, p);
                            }
                            continue;
                        }
                        Err(e) => break Reset::Trouble(format!("pull request not sent: {e}")),
                    }
                }

                let want_permits = free + outstanding < self.max_outstanding;
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break Reset::Stop,
                    changed = self.generation.changed() => {
                        if changed.is_err() {
                            // The connection is closed for good: nothing can be pulled any
                            // more. End, so the worker exits and is restarted (app.rs
                            // supervises this task) rather than stay up doing nothing.
                            tracing::error!("the NATS connection is closed for good; pulls stop");
                            return;
                        }
                        break Reset::Reconnected;
                    }
                    permit = self.slots.clone().acquire_owned(), if want_permits => {
                        let Ok(mut permit) = permit else { break Reset::Stop };
                        let room = self.max_outstanding - (free + outstanding + 1);
                        let more = self.slots.available_permits().min(room);
                        if more > 0 {
                            if let Ok(p) = self.slots.clone().try_acquire_many_owned(more as u32) {
                                permit.merge(p);
                            }
                        }
                        merge(&mut slots.free, permit);
                    }
                    msg = sub.next() => {
                        let Some(msg) = msg else {
                            break Reset::Trouble("pull inbox closed".into());
                        };
                        last_activity = Instant::now();
                        match msg.status {
                            None => {
                                backoff = BACKOFF_MIN;
                                let permit = take(&mut slots.reserved, 1);
                                if permit.is_none() {
                                    tracing::debug!("message arrived without a reserved slot");
                                }
                                dispatch(jetstream::Message { message: msg, context: self.js.clone() }, permit);
                            }
                            Some(StatusCode::IDLE_HEARTBEAT) => {}
                            Some(StatusCode::TIMEOUT) | Some(StatusCode::NOT_FOUND) => {
                                match pending_messages(&msg) {
                                    Some(n) => {
                                        tracing::debug!(undelivered = n, "pull request expired");
                                        drop(take(&mut slots.reserved, n));
                                    }
                                    // Without the count we cannot tell which request ended:
                                    // start over so no slot stays reserved forever.
                                    None => break Reset::Quiet,
                                }
                            }
                            Some(StatusCode::NO_RESPONDERS) => {
                                break Reset::Consumer("no responders (consumer missing or no JetStream leader)".into());
                            }
                            Some(code) => {
                                let what = msg.description.clone().unwrap_or_default();
                                let lower = what.to_ascii_lowercase();
                                if lower.contains("consumer deleted") || lower.contains("consumer is push based") {
                                    break Reset::Consumer(format!("{code} {what}"));
                                }
                                if lower.contains("exceeded max") {
                                    // MaxWaiting, MaxRequestBatch, MaxRequestExpires: the
                                    // consumer's limits changed under us; re-read them.
                                    break Reset::Consumer(format!("{code} {what}"));
                                }
                                break Reset::Trouble(format!("{code} {what}"));
                            }
                        }
                    }
                    // A clustered consumer's leader died and another took over: the
                    // requests waiting on the dead one will never be answered, and its
                    // heartbeats are already missing. Ask the new leader at once instead of
                    // waiting for the watchdog (and a consumer check that would time out
                    // during the election).
                    () = elected.consumer(), if count(&slots.reserved) > 0 => break Reset::Elected,
                    _ = &mut watchdog, if count(&slots.reserved) > 0 => {
                        let due = last_activity + HEARTBEAT_LOST;
                        if Instant::now() < due {
                            watchdog.as_mut().reset(due);
                            continue;
                        }
                        break Reset::Consumer("no heartbeat from the server".into());
                    }
                    // Waiting for a reconnect: look again now and then rather than rely on
                    // the reconnect event alone.
                    _ = tokio::time::sleep(Duration::from_millis(500)), if !connected && free > 0 => {}
                }
            };

            if matches!(reset, Reset::Stop) {
                wind_down(&mut sub, &mut slots.reserved, &self.js).await;
            }
            // Every outstanding request dies with this inbox; release its slots, and hand
            // back whatever was already on its way to it.
            drop(slots.reserved.take());
            hand_back(&mut sub, &self.js).await;
            match reset {
                Reset::Stop => return,
                Reset::Reconnected => {
                    tracing::info!("resuming pulls after reconnect");
                    continue;
                }
                Reset::Quiet => {
                    tracing::debug!(
                        "a pull request ended without saying how many it delivered; new inbox"
                    );
                    continue;
                }
                Reset::Elected => {
                    tracing::info!(consumer = %self.layout.durable, "new consumer leader elected; pulling from it");
                    backoff = BACKOFF_MIN;
                    continue;
                }
                Reset::Trouble(why) => {
                    tracing::warn!(reason = %why, retry_in = ?backoff, "pull interrupted");
                }
                Reset::Consumer(why) => {
                    tracing::warn!(reason = %why, "consumer unavailable; checking stream and consumer");
                    if !self.wait_for_consumer(&stop, &mut elected).await {
                        return;
                    }
                }
            }
            if elected.sleep_or_stop(&stop, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

impl Puller {
    /// Makes sure the stream and the shared consumer exist, waiting as long as it takes;
    /// false when `stop` came first. While function-mode replicas hold the stream (their
    /// consumers block an unfiltered one on a WorkQueue stream), this replica waits and says
    /// what for; once they are gone it removes what they left and takes the stream back.
    ///
    /// A leader election (the stream's or the consumer's) cuts a wait short: a check asked
    /// during the election would otherwise sit out its request timeout after the new leader
    /// is there.
    async fn wait_for_consumer(
        &mut self,
        stop: &CancellationToken,
        elected: &mut LeaderElected,
    ) -> bool {
        let mut backoff = BACKOFF_MIN;
        let mut told: Option<Instant> = None;
        loop {
            // The consumer first: if it answers, its stream is there, and a clustered
            // stream's leader may still be in election when the consumer's new leader can
            // already deliver. Only when the consumer cannot be had is the stream checked
            // (and made again if it was deleted).
            let check = async {
                match ensure_consumer(&self.js, &self.layout).await {
                    Ok(info) => Ok(info),
                    Err(e @ (LayoutError::Incompatible(_) | LayoutError::Blocked(_))) => Err(e),
                    Err(LayoutError::Unavailable(_)) => {
                        ensure_stream(&self.js, &self.layout).await?;
                        ensure_consumer(&self.js, &self.layout).await
                    }
                }
            };
            let result = tokio::select! {
                r = check => r,
                _ = stop.cancelled() => return false,
                () = elected.any() => {
                    tracing::info!(stream = %self.layout.stream, consumer = %self.layout.durable, "new leader elected; checking the stream and consumer again");
                    backoff = BACKOFF_MIN;
                    continue;
                }
            };
            let wait = match result {
                Ok(info) => {
                    self.limits = PullLimits::of(&info);
                    if told.is_some() {
                        tracing::info!(consumer = %self.layout.durable, "Static mode: the shared consumer is back; pulling");
                    }
                    return true;
                }
                Err(LayoutError::Blocked(why)) => {
                    let claim = tokio::select! {
                        r = claim_static_mode(&self.js, &self.layout) => r,
                        _ = stop.cancelled() => return false,
                    };
                    match claim {
                        Ok(StaticClaim::Ready) => continue,
                        Ok(StaticClaim::Wait { holders }) => {
                            if told.is_none_or(|t| t.elapsed() >= WAIT_LOG_EVERY) {
                                told = Some(Instant::now());
                                tracing::info!(stream = %self.layout.stream, holders = ?holders, reason = %why, "Static mode: waiting for function-mode replicas to finish; their consumers hold the stream (they expire once those replicas are gone)");
                            }
                            STATIC_CLAIM_EVERY
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot check the stream's consumers; retrying");
                            backoff
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "consumer not ready yet");
                    backoff
                }
            };
            if elected.sleep_or_stop(stop, wait).await {
                return false;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// The leader-elected advisories of the stream and of the consumer
/// (`$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.<stream>`,
/// `$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.<stream>.<consumer>`), published when a
/// clustered stream or consumer gets a new leader: the moment to pull or check again, rather
/// than a timer. Without the subscriptions (they failed, or the account does not see
/// advisories) the loop falls back on its heartbeat watchdog and consumer checks alone.
struct LeaderElected {
    stream: Option<async_nats::Subscriber>,
    consumer: Option<async_nats::Subscriber>,
}

impl LeaderElected {
    async fn subscribe(client: &async_nats::Client, layout: &Layout) -> LeaderElected {
        let subscribe = async |subject: String| match client.subscribe(subject).await {
            Ok(sub) => Some(sub),
            Err(e) => {
                tracing::debug!(error = %e, "no leader-election advisories; relying on the heartbeat watchdog");
                None
            }
        };
        LeaderElected {
            stream: subscribe(format!(
                "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{}",
                layout.stream
            ))
            .await,
            consumer: subscribe(format!(
                "$JS.EVENT.ADVISORY.CONSUMER.LEADER_ELECTED.{}.{}",
                layout.stream, layout.durable
            ))
            .await,
        }
    }

    /// The consumer's next election: requests waiting on its old leader are lost.
    async fn consumer(&mut self) {
        next(&mut self.consumer).await
    }

    /// The next election of either: a check of the stream and the consumer that waits for
    /// an answer may get one now.
    async fn any(&mut self) {
        tokio::select! {
            () = next(&mut self.stream) => {}
            () = next(&mut self.consumer) => {}
        }
    }

    /// Forgets the advisories already received.
    fn clear(&mut self) {
        for sub in [&mut self.stream, &mut self.consumer].into_iter().flatten() {
            while let Some(Some(_)) = sub.next().now_or_never() {}
        }
    }

    /// Sleeps for `d` unless `stop` fires (true) or a leader is elected (false) first.
    async fn sleep_or_stop(&mut self, stop: &CancellationToken, d: Duration) -> bool {
        tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep(d) => false,
            () = self.any() => false,
        }
    }
}

/// The next message of an advisory subscription; pending forever without one (or once it
/// has ended).
async fn next(sub: &mut Option<async_nats::Subscriber>) {
    if let Some(s) = sub {
        if s.next().await.is_some() {
            return;
        }
        *sub = None;
    }
    std::future::pending::<()>().await
}

/// At a stop, before the inbox goes: lets the outstanding requests end while handing back
/// (NAK) whatever they deliver, for at most [`WIND_DOWN`].
///
/// Why: async-nats forgets a drained subscription as soon as its UNSUB is written, so a
/// message the server sent before it read the UNSUB is dropped on arrival and waits out
/// `ack_wait` on a worker that is gone. During a burst the outstanding requests fill within
/// milliseconds (a filled request gets no status: its slots are counted down as messages
/// arrive); an idle worker's requests expire later, but nothing is on its way to them.
async fn wind_down(
    sub: &mut async_nats::Subscriber,
    reserved: &mut Option<OwnedSemaphorePermit>,
    js: &jetstream::Context,
) {
    let deadline = Instant::now() + WIND_DOWN;
    while count(reserved) > 0 {
        let msg = tokio::select! {
            msg = sub.next() => msg,
            _ = tokio::time::sleep_until(deadline) => return,
        };
        let Some(msg) = msg else { return };
        match msg.status {
            None => {
                drop(take(reserved, 1));
                if msg.reply.is_some() {
                    let msg = jetstream::Message {
                        message: msg,
                        context: js.clone(),
                    };
                    let _ = msg.ack_with(jetstream::AckKind::Nak(None)).await;
                }
            }
            Some(StatusCode::IDLE_HEARTBEAT) => {}
            Some(StatusCode::TIMEOUT) | Some(StatusCode::NOT_FOUND) => match pending_messages(&msg)
            {
                Some(n) => drop(take(reserved, n)),
                None => return,
            },
            Some(_) => return,
        }
    }
}

/// Unsubscribes an inbox while still taking what the server already sent to it, and NAKs
/// those messages (no delay) so they are redelivered at once instead of after `ack_wait`.
pub(crate) async fn hand_back(sub: &mut async_nats::Subscriber, js: &jetstream::Context) {
    if sub.drain().await.is_err() {
        let _ = sub.unsubscribe().await;
    }
    let drained = async {
        while let Some(msg) = sub.next().await {
            if msg.status.is_none() && msg.reply.is_some() {
                let msg = jetstream::Message {
                    message: msg,
                    context: js.clone(),
                };
                let _ = msg.ack_with(jetstream::AckKind::Nak(None)).await;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drained).await;
}

/// The `Nats-Pending-Messages` header of a terminal status: what the request did not deliver.
fn pending_messages(msg: &async_nats::Message) -> Option<usize> {
    msg.headers
        .as_ref()?
        .get("Nats-Pending-Messages")?
        .as_str()
        .parse()
        .ok()
}

/// Sleeps unless `stop` fires first; true when stopping.
async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permit_pools_split_and_merge() {
        let sem = Arc::new(Semaphore::new(10));
        let mut free = Some(sem.clone().try_acquire_many_owned(6).unwrap());
        let mut reserved = None;
        merge(&mut reserved, take(&mut free, 4).unwrap());
        assert_eq!((count(&free), count(&reserved)), (2, 4));
        drop(take(&mut reserved, 1));
        assert_eq!(sem.available_permits(), 5);
        assert!(take(&mut reserved, 0).is_none());
        let all = take(&mut reserved, 10).unwrap();
        assert_eq!(all.num_permits(), 3);
        assert_eq!(count(&reserved), 0);
    }
}
