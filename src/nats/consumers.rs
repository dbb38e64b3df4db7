//! Per-function consumers ("function mode"), the cut-over between function mode and static
//! mode, and the helpers both directions share.
//!
//! # Naming
//!
//! Function mode keeps one durable pull consumer per distinct subject under `<queue>.>`
//! (normally `<queue>.<fn>.<ns>`), plus one for the legacy bare subject `<queue>`. Every
//! replica must arrive at the same consumer for the same subject without talking to the
//! others, so the name is a pure function of the subject ([`consumer_name`]): `fn-` and the
//! subject's suffix escaped injectively into `[A-Za-z0-9_-]` (a NATS consumer name may not
//! hold `.`, `*`, `>` or whitespace, and older servers also dislike other punctuation in the
//! file names the store makes from it), or `legacy-subject` for `<queue>` itself. Very long
//! names are cut and completed with a hash, in a form the escape never produces, so the two
//! forms cannot collide.
//!
//! # Cut-over
//!
//! A WorkQueue stream admits either one unfiltered consumer (static mode: the shared durable,
//! ours or OpenFaaS's) or any number of filtered consumers whose filters do not overlap
//! (function mode). The server enforces this: creating an unfiltered consumer next to a
//! filtered one fails with err_code 10099, an overlapping filtered one with 10100. The two
//! modes therefore cannot run side by side, and the switch is decided by a **marker**: a
//! durable consumer named [`MARKER`] filtered on [`marker_subject`] (a subject no function
//! has: function names cannot hold `$`), created with `inactive_threshold` = [`MARKER_TTL`].
//! Function-mode replicas keep it alive with a `no_wait` pull to it every [`MARKER_TOUCH`];
//! when the last one is gone the server deletes it by itself.
//!
//! - A function-mode replica starts with [`claim_function_mode`]: it creates the marker; if
//!   an unfiltered (static) consumer blocks that, it deletes it once the consumer has nothing
//!   in flight (the static replicas' calls have ended: a rolling update has stopped them),
//!   and creates the marker. Until then it waits, ready, and pulls nothing, so no static
//!   replica's call runs twice, long ones included. After waiting longer than any call can
//!   run, what is still unacknowledged belongs to replicas that died: the consumer is
//!   deleted anyway and those messages are delivered again to the function-mode consumers.
//!   Static replicas that try to recreate their durable now fail (10099, the marker is
//!   filtered), so function mode wins.
//! - A static replica whose durable cannot be created (10099/10100) calls
//!   [`claim_static_mode`]: while the marker exists it waits (function-mode replicas are
//!   alive); once the marker has expired, the function-mode consumers it finds are leftovers
//!   of replicas that are gone, and it deletes them (their unacked messages go back to the
//!   stream and to the static consumer).
//!
//! Both directions converge: a static replica that deletes leftovers just as a function-mode
//! replica creates its marker then fails to create its durable (the marker blocks it) and
//! waits; the function-mode replica recreates the consumers it lost when its pulls report
//! them deleted.
//!
//! # NATS rules met
//!
//! Only what nats-server 2.9 honours: a single `filter_subject` per consumer, consumers made
//! with `CONSUMER.DURABLE.CREATE.<stream>.<name>` (the named create API with a filter needs
//! 2.10). That API silently *updates* an existing consumer whose config differs, so consumers
//! are only ever created when `CONSUMER.INFO` says they are missing (racing replicas send
//! the same config, which the server accepts as a no-op). Deleting a consumer never deletes
//! messages from a WorkQueue stream.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, response::Response, ErrorCode};
use serde::Deserialize;
use serde_json::json;

use super::stream::{ConsumerProgress, Layout};
use crate::message::fingerprint::Fnv1a;
use crate::nats::presence;

/// The consumer of the legacy bare subject `<queue>` (older gateways publish every function
/// there).
pub const LEGACY: &str = "legacy-subject";

/// The marker consumer's name: while it exists, function-mode replicas are alive.
pub const MARKER: &str = "function-mode";

/// The marker's `inactive_threshold`: the server deletes it this long after the last touch,
/// which hands the stream back to static replicas.
pub const MARKER_TTL: Duration = Duration::from_secs(15);

/// How often function-mode replicas touch the marker (a `no_wait` pull to
/// [`next_subject`]`(stream, MARKER)`): three touches per [`MARKER_TTL`], so one lost touch
/// does not let it expire.
pub const MARKER_TOUCH: Duration = Duration::from_secs(5);

/// Names longer than this are cut and hashed (the server allows 255; the store makes a
/// directory of it, and some file systems count bytes of the whole path).
const MAX_NAME: usize = 200;
/// What is kept of a name that is too long, before `_h` and the hash.
const CUT_NAME: usize = 180;

/// How many times [`claim_function_mode`] tries to create the marker, deleting static
/// consumers in between.
const CLAIM_ATTEMPTS: u32 = 6;

/// The consumer of `subject` in function mode: `legacy-subject` for `queue` itself, else
/// `fn-` and the part after `<queue>.` escaped: ASCII letters, digits and `-`
/// kept, `.` → `_d`, `_` → `_u`, any other byte → `_x` and two lowercase hex digits. Deterministic (all replicas
/// share it), injective (two subjects never share a consumer) and a valid NATS name.
///
/// A subject outside `<queue>.` (a caller's mistake) is escaped whole after `fn-_o`, a
/// prefix the escape never produces, so it cannot take the name of a subject inside.
pub fn consumer_name(queue: &str, subject: &str) -> String {
    if subject == queue {
        return LEGACY.to_string();
    }
    let mut name = String::from("fn-");
    match suffix(queue, subject) {
        Some(rest) => escape(rest, &mut name),
        None => {
            name.push_str("_o");
            escape(subject, &mut name);
        }
    }
    if name.len() > MAX_NAME {
        // The escape is ASCII, so any byte index is a char boundary. `_h` never comes out of
        // the escape (after `_` it writes only `d`, `u`, `x` or `o`), so a cut name cannot
        // equal an uncut one; two cut names differ by their hash.
        let hash = Fnv1a::default().bytes(subject.as_bytes()).finish();
        name.truncate(CUT_NAME);
        name.push_str(&format!("_h{hash:016x}"));
    }
    name
}

/// The `function_name` metric label of `subject`: the part after `<queue>.` as written
/// (`fn.ns` for `<queue>.<fn>.<ns>`), `None` for the legacy subject `<queue>`, whose messages
/// name their function only in the payload. A subject outside `<queue>.` is returned whole.
pub fn function_label(queue: &str, subject: &str) -> Option<String> {
    if subject == queue {
        return None;
    }
    Some(suffix(queue, subject).unwrap_or(subject).to_string())
}

fn suffix<'a>(queue: &str, subject: &'a str) -> Option<&'a str> {
    subject.strip_prefix(queue)?.strip_prefix('.')
}

/// Escapes `s` into `[A-Za-z0-9_-]`, injectively: ASCII letters, digits and `-` stay; `.`
/// becomes `_d`, `_` becomes `_u`, any other byte `_x` and two lowercase hex digits. Every
/// `_` starts an escape whose length its next character tells, so the output decodes one way.
fn escape(s: &str, out: &mut String) {
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' => out.push(char::from(b)),
            b'.' => out.push_str("_d"),
            b'_' => out.push_str("_u"),
            _ => out.push_str(&format!("_x{b:02x}")),
        }
    }
}

/// `<queue>.$queue-worker.function-mode`: the marker's filter. It lies inside the stream's
/// `<queue>.>` (a filter must), yet no function's subject is ever that (function names
/// cannot hold `$`), so the marker overlaps no function-mode consumer and never gets a
/// message.
pub fn marker_subject(queue: &str) -> String {
    format!("{queue}.$queue-worker.{MARKER}")
}

/// The subject a pull request to `consumer` is sent to (with the default API prefix).
pub fn next_subject(stream: &str, consumer: &str) -> String {
    format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}")
}

/// One function-mode consumer (or the marker): what we create when it is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionConsumer {
    pub stream: String,
    /// From [`consumer_name`].
    pub name: String,
    /// The filter subject: `<queue>.<fn>.<ns>`, `<queue>`, or the marker's.
    pub subject: String,
    pub ack_wait: Duration,
    /// The server's backstop: a consumer no replica pulls from for this long is deleted by
    /// the server, so consumers of functions that stopped getting messages, or of a fleet
    /// that is gone, do not pile up. Zero: never.
    pub inactive_threshold: Duration,
}

impl FunctionConsumer {
    /// The consumer of `subject` on the layout's stream.
    pub fn of(layout: &Layout, subject: &str, inactive_threshold: Duration) -> FunctionConsumer {
        FunctionConsumer {
            stream: layout.stream.clone(),
            name: consumer_name(&layout.queue, subject),
            subject: subject.to_string(),
            ack_wait: layout.ack_wait,
            inactive_threshold,
        }
    }

    /// The marker of the layout's stream (see the module doc).
    pub fn marker(layout: &Layout) -> FunctionConsumer {
        FunctionConsumer {
            stream: layout.stream.clone(),
            name: MARKER.to_string(),
            subject: marker_subject(&layout.queue),
            ack_wait: layout.ack_wait,
            inactive_threshold: MARKER_TTL,
        }
    }

    /// The consumer config: the same settings as the static consumer (explicit acks, the
    /// worker deciding when to give up, no cap on ack-pending, see `stream::Layout`), with
    /// our filter and the inactivity backstop.
    pub fn config(&self) -> consumer::Config {
        consumer::Config {
            filter_subject: self.subject.clone(),
            inactive_threshold: self.inactive_threshold,
            ..crate::nats::stream::work_consumer(
                &self.name,
                format!("queue-worker function mode: {}", self.subject),
                self.ack_wait,
            )
        }
    }
}

/// Why a function-mode consumer could not be set up, in the three ways callers branch on.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// Another mode holds the stream: an unfiltered consumer (10099) or one whose filter
    /// overlaps ours (10100). The cut-over ([`claim_function_mode`], [`claim_static_mode`])
    /// resolves it.
    #[error("{0}")]
    Blocked(String),
    /// NATS or JetStream is not answering, or the stream is missing; worth retrying.
    #[error("JetStream not available: {0}")]
    Unavailable(String),
    /// The server refused for another reason (consumer limit, a foreign consumer with our
    /// name, ...): retrying as it is will not help.
    #[error("{0}")]
    Refused(String),
}

fn unavailable(e: impl std::fmt::Display) -> ConsumerError {
    ConsumerError::Unavailable(e.to_string())
}

/// A consumer as `CONSUMER.INFO` / `CONSUMER.LIST` report it: only the fields we read, all
/// optional, so a server version adding or dropping others does not break us.
#[derive(Debug, Default, Deserialize)]
struct RawConsumer {
    #[serde(default)]
    name: String,
    #[serde(default)]
    config: RawConsumerConfig,
    #[serde(default)]
    num_pending: u64,
    #[serde(default)]
    num_ack_pending: u64,
    #[serde(default)]
    num_waiting: u64,
    #[serde(default)]
    delivered: RawSequence,
}

#[derive(Debug, Default, Deserialize)]
struct RawSequence {
    #[serde(default)]
    stream_seq: u64,
}

#[derive(Debug, Default, Deserialize)]
struct RawConsumerConfig {
    #[serde(default)]
    filter_subject: Option<String>,
    #[serde(default)]
    filter_subjects: Option<Vec<String>>,
    #[serde(default)]
    deliver_subject: Option<String>,
}

/// A consumer of the stream, as the cut-over needs to see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerSummary {
    pub name: String,
    /// Empty when the consumer has none (or several, see `filter_subjects`).
    pub filter_subject: String,
    /// nats-server 2.10+'s multiple filters; empty on 2.9.
    pub filter_subjects: Vec<String>,
    /// Not yet delivered.
    pub num_pending: u64,
    /// Delivered, not yet acknowledged (in flight or waiting for a delayed retry).
    pub num_ack_pending: u64,
}

impl ConsumerSummary {
    /// Sees every subject of the stream: static mode's shared consumer (or anyone's).
    pub fn is_unfiltered(&self) -> bool {
        let all = |f: &str| f.is_empty() || f == ">";
        all(&self.filter_subject) && self.filter_subjects.iter().all(|f| all(f))
    }

    /// The filters the consumer has (one on 2.9).
    fn filters(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.filter_subjects.iter().map(String::as_str).collect();
        if !self.filter_subject.is_empty() {
            v.push(&self.filter_subject);
        }
        v
    }
}

impl From<RawConsumer> for ConsumerSummary {
    fn from(c: RawConsumer) -> ConsumerSummary {
        ConsumerSummary {
            name: c.name,
            filter_subject: c.config.filter_subject.unwrap_or_default(),
            filter_subjects: c.config.filter_subjects.unwrap_or_default(),
            num_pending: c.num_pending,
            num_ack_pending: c.num_ack_pending,
        }
    }
}

/// `CONSUMER.INFO`: `None` when the consumer does not exist.
async fn info(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
) -> Result<Option<RawConsumer>, ConsumerError> {
    let resp: Response<RawConsumer> = js
        .request(format!("CONSUMER.INFO.{stream}.{name}"), &json!({}))
        .await
        .map_err(unavailable)?;
    match resp {
        Response::Ok(c) => Ok(Some(c)),
        Response::Err { error } if error.error_code() == ErrorCode::CONSUMER_NOT_FOUND => Ok(None),
        Response::Err { error } if error.error_code() == ErrorCode::STREAM_NOT_FOUND => {
            Err(unavailable(format!("stream {stream} not found")))
        }
        Response::Err { error } => Err(unavailable(format!(
            "cannot read consumer {name} on {stream}: {error}"
        ))),
    }
}

/// Makes sure `fc` exists: created when missing, left as it is when present (so another
/// replica's settings, e.g. a different `ack_wait` or threshold, are never overwritten by
/// `CONSUMER.DURABLE.CREATE`'s silent update). A consumer with our name but another filter
/// (or a push consumer) is someone else's: refused, with a warning. Replicas racing to
/// create the same consumer send the same config, which the server accepts from all of them.
///
/// A server refusing the inactive threshold (10153: above the stream's `consumer_limits`,
/// nats-server 2.10+) gets the consumer without one, with a warning: the server then applies
/// the stream's cap; with none, the consumer stays until deleted.
pub async fn ensure_function_consumer(
    js: &jetstream::Context,
    fc: &FunctionConsumer,
) -> Result<(), ConsumerError> {
    ensure(js, fc, true).await
}

/// [`ensure_function_consumer`]; `may_drop_threshold: false` for the marker, which must
/// expire (a marker without a threshold would keep static replicas waiting forever).
async fn ensure(
    js: &jetstream::Context,
    fc: &FunctionConsumer,
    may_drop_threshold: bool,
) -> Result<(), ConsumerError> {
    if let Some(existing) = info(js, &fc.stream, &fc.name).await? {
        return check_existing(fc, existing);
    }
    let config = fc.config();
    let error = match create(js, fc, &config).await? {
        None => {
            tracing::info!(stream = %fc.stream, consumer = %fc.name, subject = %fc.subject, "Created function-mode consumer");
            return Ok(());
        }
        Some(error) => error,
    };
    let code = error.error_code();
    if may_drop_threshold
        && !fc.inactive_threshold.is_zero()
        && (code == ErrorCode::CONSUMER_INACTIVE_THRESHOLD_EXCESS
            || error
                .to_string()
                .to_lowercase()
                .contains("inactive threshold"))
    {
        tracing::warn!(stream = %fc.stream, consumer = %fc.name, inactive_threshold = ?fc.inactive_threshold, error = %error, "the server refuses the consumer's inactive threshold; creating it without one (the stream's own cap applies if it has one; otherwise the consumer stays until deleted)");
        let mut config = config;
        config.inactive_threshold = Duration::ZERO;
        return match create(js, fc, &config).await? {
            None => {
                tracing::info!(stream = %fc.stream, consumer = %fc.name, subject = %fc.subject, "Created function-mode consumer (no inactive threshold)");
                Ok(())
            }
            Some(error) => Err(classify(fc, error)),
        };
    }
    Err(classify(fc, error))
}

/// An existing consumer with our name: ours if it has our filter and is a pull consumer.
fn check_existing(fc: &FunctionConsumer, existing: RawConsumer) -> Result<(), ConsumerError> {
    let push = existing
        .config
        .deliver_subject
        .as_deref()
        .is_some_and(|d| !d.is_empty());
    let summary = ConsumerSummary::from(existing);
    if !push && summary.filters() == [fc.subject.as_str()] {
        return Ok(());
    }
    tracing::warn!(stream = %fc.stream, consumer = %fc.name, filter = ?summary.filters(), push, expected = %fc.subject, "a consumer with the function-mode name exists with other settings; leaving it alone");
    Err(ConsumerError::Refused(format!(
        "consumer {} on {} exists with filter {:?}{}, not {}: not ours; delete it or rename it",
        fc.name,
        fc.stream,
        summary.filters(),
        if push { " (push)" } else { "" },
        fc.subject
    )))
}

/// `CONSUMER.DURABLE.CREATE`: `Ok(None)` once created (or already there with this very
/// config), `Ok(Some(error))` for the server's refusal, `Err` when it did not answer.
async fn create(
    js: &jetstream::Context,
    fc: &FunctionConsumer,
    config: &consumer::Config,
) -> Result<Option<jetstream::Error>, ConsumerError> {
    let resp: Response<RawConsumer> = js
        .request(
            format!("CONSUMER.DURABLE.CREATE.{}.{}", fc.stream, fc.name),
            &json!({"stream_name": fc.stream, "config": config}),
        )
        .await
        .map_err(unavailable)?;
    match resp {
        Response::Ok(_) => Ok(None),
        // A replica made it with another config between our INFO and this create (servers
        // that refuse rather than update): judge what is there now.
        Response::Err { error }
            if error.error_code() == ErrorCode::CONSUMER_NAME_EXIST
                || error.error_code() == ErrorCode::CONSUMER_ALREADY_EXISTS =>
        {
            match info(js, &fc.stream, &fc.name).await? {
                Some(existing) => check_existing(fc, existing).map(|()| None),
                None => Ok(Some(error)),
            }
        }
        Response::Err { error } => Ok(Some(error)),
    }
}

/// The server's refusal to create `fc`, as a [`ConsumerError`].
fn classify(fc: &FunctionConsumer, error: jetstream::Error) -> ConsumerError {
    let code = error.error_code();
    let (name, stream) = (&fc.name, &fc.stream);
    if code == ErrorCode::CONSUMER_WQ_MULTIPLE_UNFILTERED {
        ConsumerError::Blocked(format!(
            "cannot create consumer {name} on {stream}: the stream has an unfiltered consumer (static mode): {error}"
        ))
    } else if code == ErrorCode::CONSUMER_WQ_CONSUMER_NOT_UNIQUE {
        ConsumerError::Blocked(format!(
            "cannot create consumer {name} on {stream}: another consumer's filter overlaps {}: {error}",
            fc.subject
        ))
    } else if code == ErrorCode::STREAM_NOT_FOUND {
        ConsumerError::Unavailable(format!("stream {stream} not found"))
    } else if error.code() == 503 {
        ConsumerError::Unavailable(format!(
            "cannot create consumer {name} on {stream}: {error}"
        ))
    } else if code == ErrorCode::MAXIMUM_CONSUMERS_LIMIT {
        // Function mode needs a consumer per function with work; say which cap to raise.
        ConsumerError::Refused(format!(
            "cannot create consumer {name} on {stream}: {error}; the stream's max_consumers, \
             the account's JetStream max_consumers or, for a stream without its own, \
             nats-server's jetstream.limits.default_max_consumers (1,000 since 2.15) caps \
             function mode's consumers: raise it, or lower consumer_inactive_threshold so \
             idle functions give theirs back sooner"
        ))
    } else {
        ConsumerError::Refused(format!(
            "cannot create consumer {name} on {stream}: {error}"
        ))
    }
}

#[derive(Debug, Deserialize)]
struct DeleteResponse {
    #[serde(default)]
    success: bool,
}

/// `CONSUMER.DELETE`; a consumer already gone counts as deleted.
async fn delete(js: &jetstream::Context, stream: &str, name: &str) -> Result<(), ConsumerError> {
    let resp: Response<DeleteResponse> = js
        .request(format!("CONSUMER.DELETE.{stream}.{name}"), &json!({}))
        .await
        .map_err(unavailable)?;
    match resp {
        Response::Ok(DeleteResponse { success: true }) => Ok(()),
        Response::Ok(DeleteResponse { success: false }) => Err(ConsumerError::Refused(format!(
            "the server did not delete consumer {name} on {stream}"
        ))),
        Response::Err { error } if error.error_code() == ErrorCode::CONSUMER_NOT_FOUND => Ok(()),
        Response::Err { error } if error.error_code() == ErrorCode::STREAM_NOT_FOUND => {
            Err(unavailable(format!("stream {stream} not found")))
        }
        Response::Err { error } => Err(ConsumerError::Refused(format!(
            "cannot delete consumer {name} on {stream}: {error}"
        ))),
    }
}

/// What [`delete_if_idle`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaped {
    /// Deleted, or already gone.
    Gone,
    /// Kept: messages are pending on it, or delivered and not yet acknowledged.
    Busy,
    /// Kept: nothing pending or unacknowledged, but pull requests are waiting on it.
    Waiting,
}

/// Deletes the consumer if it holds no work: nothing pending, nothing delivered and
/// unacknowledged, and no pull request waiting unless `past_waiting`. A consumer with
/// unacked work is never deleted here: those calls are running and their acks must find it.
///
/// Why `past_waiting`: function-mode replicas only send `no_wait` pulls, answered at once, so
/// a waiting request seen on two looks a threshold apart belongs to a replica that died
/// (nats-server 2.9 keeps a killed client's `no_wait` request on a consumer with nothing to
/// deliver indefinitely, which would keep the consumer, and its own server-side
/// `inactive_threshold` backstop, alive forever). The reaper passes it on its second look.
pub async fn delete_if_idle(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    past_waiting: bool,
) -> Result<Reaped, ConsumerError> {
    let Some(c) = info(js, stream, name).await? else {
        return Ok(Reaped::Gone);
    };
    if c.num_pending != 0 || c.num_ack_pending != 0 {
        return Ok(Reaped::Busy);
    }
    if c.num_waiting != 0 && !past_waiting {
        return Ok(Reaped::Waiting);
    }
    delete(js, stream, name).await?;
    tracing::info!(
        stream,
        consumer = name,
        waiting = c.num_waiting,
        "Deleted idle function-mode consumer"
    );
    Ok(Reaped::Gone)
}

/// What a function's consumer owes and how far it delivered (`CONSUMER.INFO`), for telling
/// stale messages from queued ones; `None` when it does not exist.
pub async fn progress(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
) -> Result<Option<ConsumerProgress>, ConsumerError> {
    Ok(info(js, stream, name).await?.map(|c| ConsumerProgress {
        owed: c.num_pending + c.num_ack_pending,
        delivered: c.delivered.stream_seq,
    }))
}

/// Whether the [`MARKER`] consumer exists (function-mode replicas hold the stream).
pub async fn marker_exists(
    js: &jetstream::Context,
    layout: &Layout,
) -> Result<bool, ConsumerError> {
    Ok(info(js, &layout.stream, MARKER).await?.is_some())
}

#[derive(Debug, Deserialize)]
struct ConsumerPage {
    #[serde(default)]
    total: u64,
    #[serde(default)]
    consumers: Option<Vec<RawConsumer>>,
}

/// Every consumer of `stream` (`CONSUMER.LIST`, paged by offset).
pub async fn list_consumers(
    js: &jetstream::Context,
    stream: &str,
) -> Result<Vec<ConsumerSummary>, ConsumerError> {
    let mut all: Vec<ConsumerSummary> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    loop {
        let resp: Response<ConsumerPage> = js
            .request(
                format!("CONSUMER.LIST.{stream}"),
                &json!({"offset": all.len()}),
            )
            .await
            .map_err(unavailable)?;
        let page = match resp {
            Response::Ok(page) => page,
            Response::Err { error } if error.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                return Err(unavailable(format!("stream {stream} not found")))
            }
            Response::Err { error } => {
                return Err(unavailable(format!(
                    "cannot list the consumers of {stream}: {error}"
                )))
            }
        };
        let consumers = page.consumers.unwrap_or_default();
        let before = all.len();
        for c in consumers {
            // A consumer created between two pages can shift the next page by one.
            if seen.insert(c.name.clone()) {
                all.push(c.into());
            }
        }
        // Stop at the total, or when a page adds nothing (a server ignoring the offset).
        if all.len() == before || all.len() as u64 >= page.total {
            return Ok(all);
        }
    }
}

/// Whether the literal `subject` is matched by `filter` (which may hold `*` and `>`).
fn matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// What [`claim_function_mode`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FunctionClaim {
    /// The marker exists: the stream is in function mode.
    Claimed,
    /// Static-mode replicas hold messages of their consumer (they are running calls):
    /// deleting it now would run those calls again through the function consumers, long
    /// ones included. Nothing was deleted; ask again later. `unacked`: what they hold.
    Wait { consumer: String, unacked: u64 },
}

/// Takes the stream for function mode: makes sure the marker exists, deleting every
/// unfiltered (static-mode) consumer that stands in its way, but only once no live static
/// replica holds its messages (asked over [`presence`]; unacked messages nobody holds were
/// handed back or belong to replicas that died, and are delivered again), or when `force` (the caller has waited longer than any call can run: what is
/// still unacknowledged then belongs to replicas that died). The unacked messages of a
/// forced deletion stay in the stream and are delivered again to the function-mode
/// consumers. Static replicas may race to recreate their durable after it is deleted, so
/// this tries a few times; a filtered consumer overlapping the marker (it should not exist)
/// is reported as [`ConsumerError::Blocked`] and left alone.
///
/// A static replica may pull between the look and the deletion; the calls it starts in
/// those milliseconds are the only ones an unforced claim can repeat.
pub async fn claim_function_mode(
    js: &jetstream::Context,
    layout: &Layout,
    force: bool,
) -> Result<FunctionClaim, ConsumerError> {
    let marker = FunctionConsumer::marker(layout);
    let mut backoff = Duration::from_millis(50);
    let mut last = String::new();
    for attempt in 1..=CLAIM_ATTEMPTS {
        match ensure(js, &marker, false).await {
            Ok(()) => return Ok(FunctionClaim::Claimed),
            Err(ConsumerError::Blocked(why)) => last = why,
            Err(e) => return Err(e),
        }
        let consumers = list_consumers(js, &layout.stream).await?;
        let (unfiltered, filtered): (Vec<_>, Vec<_>) =
            consumers.into_iter().partition(|c| c.is_unfiltered());
        if !force {
            if let Some(busy) = unfiltered.iter().find(|c| c.num_ack_pending > 0) {
                // Unacknowledged: running on a live static replica, or handed back by one
                // that stopped (nobody pulls them now). Only the replicas can say.
                let asked = presence::ask(&js.client(), &layout.stream, presence::WINDOW)
                    .await
                    .map_err(|e| {
                        ConsumerError::Unavailable(format!(
                            "cannot ask static replicas what they hold: {e}"
                        ))
                    })?;
                if asked.held > 0 {
                    return Ok(FunctionClaim::Wait {
                        consumer: busy.name.clone(),
                        unacked: asked.held,
                    });
                }
            }
        }
        if unfiltered.is_empty() {
            let overlapping: Vec<String> = filtered
                .iter()
                .filter(|c| c.filters().iter().any(|f| matches(f, &marker.subject)))
                .map(|c| format!("{} (filter {:?})", c.name, c.filters()))
                .collect();
            if !overlapping.is_empty() {
                return Err(ConsumerError::Blocked(format!(
                    "stream {} has consumers whose filter overlaps the function-mode marker {}: {}; \
                     function mode cannot start while they exist",
                    layout.stream,
                    marker.subject,
                    overlapping.join(", ")
                )));
            }
        }
        for c in &unfiltered {
            tracing::warn!(
                stream = %layout.stream,
                consumer = %c.name,
                unacked = c.num_ack_pending,
                pending = c.num_pending,
                "stream is switching to function mode: deleting the static-mode consumer; its {} unacked message(s) (of replicas gone, or past the wait for them) are delivered again to the function-mode consumers",
                c.num_ack_pending
            );
            delete(js, &layout.stream, &c.name).await?;
        }
        // Right after a deletion, retry at once (the best chance to beat a static replica
        // recreating its durable); after that, give the racers some room.
        if attempt > 1 {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
    Err(ConsumerError::Blocked(format!(
        "could not claim stream {} for function mode after {CLAIM_ATTEMPTS} attempts \
         (static-mode replicas keep recreating their consumer?): {last}",
        layout.stream
    )))
}

/// What a static replica should do after [`claim_static_mode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StaticClaim {
    /// The stream is free: create the shared durable again.
    Ready,
    /// Others hold the stream: the marker (function-mode replicas are alive) or consumers
    /// that are not ours. Log them and try again later.
    Wait { holders: Vec<String> },
}

/// Function mode's own consumers: the per-subject ones.
fn is_function_mode_name(name: &str) -> bool {
    name.starts_with("fn-") || name == LEGACY
}

/// For a static replica whose shared durable cannot be created (10099/10100): while the
/// marker exists, [`StaticClaim::Wait`]. Without it, every function-mode consumer left is a
/// leftover of replicas that are gone (the marker expired), so they are deleted, whatever
/// they hold: their unacked messages go back to the stream, for the static consumer. Other
/// consumers (someone else's) are never deleted: they are returned as holders to wait for.
pub async fn claim_static_mode(
    js: &jetstream::Context,
    layout: &Layout,
) -> Result<StaticClaim, ConsumerError> {
    let consumers = list_consumers(js, &layout.stream).await?;
    let foreign: Vec<String> = consumers
        .iter()
        .filter(|c| c.name != layout.durable && c.name != MARKER && !is_function_mode_name(&c.name))
        .map(|c| c.name.clone())
        .collect();
    if consumers.iter().any(|c| c.name == MARKER) {
        let mut holders = vec![MARKER.to_string()];
        holders.extend(foreign);
        return Ok(StaticClaim::Wait { holders });
    }
    if !foreign.is_empty() {
        return Ok(StaticClaim::Wait { holders: foreign });
    }
    for c in consumers.iter().filter(|c| is_function_mode_name(&c.name)) {
        tracing::warn!(
            stream = %layout.stream,
            consumer = %c.name,
            unacked = c.num_ack_pending,
            pending = c.num_pending,
            "function mode has ended (its marker expired): deleting its leftover consumer; {} unacked message(s) are delivered again to the static consumer",
            c.num_ack_pending
        );
        delete(js, &layout.stream, &c.name).await?;
    }
    Ok(StaticClaim::Ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: &str = "faas-request";

    fn name(suffix: &str) -> String {
        consumer_name(Q, &format!("{Q}.{suffix}"))
    }

    #[test]
    fn names_escape_the_subject_suffix() {
        assert_eq!(name("sleep-1.openfaas-fn"), "fn-sleep-1_dopenfaas-fn");
        assert_eq!(name("a_b.ns"), "fn-a_ub_dns");
        assert_eq!(name("a b"), "fn-a_x20b");
        assert_eq!(name("é"), "fn-_xc3_xa9");
        assert_eq!(consumer_name(Q, Q), LEGACY);
        assert_eq!(consumer_name(Q, "other.x"), "fn-_oother_dx");
    }

    #[test]
    fn names_are_valid_nats_names() {
        for s in ["sleep.openfaas-fn", "a_.b", "x y\t*>/\\", "日本.ns", ""] {
            let n = name(s);
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{n}"
            );
            assert!(n.len() <= MAX_NAME, "{n}");
        }
    }

    #[test]
    fn names_are_injective_on_tricky_pairs() {
        for (a, b) in [
            ("a-b.c", "a.b-c"),
            ("a_.b", "a._b"),
            ("a_db", "a.b"),
            ("a_ub", "a_b"),
            ("a_x2eb", "a.b"),
            ("a_x2eb", "a\u{2e}b"),
            ("é", "_xc3_xa9"),
            ("e\u{301}", "é"),
            ("a.b", "a-b"),
        ] {
            assert_ne!(name(a), name(b), "{a:?} vs {b:?}");
        }
        // The legacy name cannot be taken by a function, nor an outside subject's by an inside one.
        assert_ne!(name("legacy-subject"), LEGACY);
        assert_ne!(consumer_name(Q, "x.y"), name("x.y"));
        assert_ne!(consumer_name(Q, "x.y"), name("_ox_dy"));
    }

    #[test]
    fn long_names_are_cut_and_hashed() {
        let long = "f".repeat(300);
        let n = name(&format!("{long}.ns"));
        assert_eq!(n.len(), CUT_NAME + 2 + 16);
        assert!(n.starts_with("fn-fff"));
        assert_eq!(&n[CUT_NAME..CUT_NAME + 2], "_h");
        assert!(n[CUT_NAME + 2..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        // Same prefix, different tails: different names.
        assert_ne!(n, name(&format!("{long}.other")));
        // Deterministic.
        assert_eq!(n, name(&format!("{long}.ns")));
        // Exactly at the limit: not cut.
        let at_limit = "g".repeat(MAX_NAME - 3);
        assert_eq!(name(&at_limit), format!("fn-{at_limit}"));
        let over = "g".repeat(MAX_NAME - 2);
        assert!(name(&over).contains("_h"));
        // A cut in the middle of an escape still gives a valid, distinct name.
        let dots = ".".repeat(150);
        let n = name(&dots);
        assert!(n.len() <= MAX_NAME && n.contains("_h"), "{n}");
        assert_ne!(n, name(&".".repeat(151)));
    }

    #[test]
    fn uncut_names_never_hold_the_hash_marker() {
        for s in ["h", "_h", "a_hb", "_", "__h", ".h", "_x68"] {
            assert!(!name(s).contains("_h"), "{s}: {}", name(s));
        }
    }

    #[test]
    fn labels_are_the_suffix_as_written() {
        assert_eq!(
            function_label(Q, "faas-request.sleep.openfaas-fn").as_deref(),
            Some("sleep.openfaas-fn")
        );
        assert_eq!(function_label(Q, Q), None);
        assert_eq!(function_label(Q, "a_b.c").as_deref(), Some("a_b.c"));
    }

    #[test]
    fn the_marker_subject_is_inside_the_queue_and_no_function_subject() {
        let m = marker_subject(Q);
        assert_eq!(m, "faas-request.$queue-worker.function-mode");
        assert!(matches(&format!("{Q}.>"), &m));
        assert!(!matches(Q, &m));
        assert!(!matches(&format!("{Q}.*.*"), &format!("{Q}.sleep")));
        assert!(matches(&format!("{Q}.*.*"), &m));
        assert_eq!(
            next_subject("OF_faas-request", MARKER),
            "$JS.API.CONSUMER.MSG.NEXT.OF_faas-request.function-mode"
        );
    }

    #[test]
    fn the_config_is_a_filtered_durable_pull_consumer() {
        let fc = FunctionConsumer {
            stream: "OF_q".into(),
            name: "fn-a_db".into(),
            subject: "q.a.b".into(),
            ack_wait: Duration::from_secs(30),
            inactive_threshold: Duration::from_secs(3600),
        };
        let c = fc.config();
        assert_eq!(c.durable_name.as_deref(), Some("fn-a_db"));
        assert_eq!(c.filter_subject, "q.a.b");
        assert_eq!(c.max_deliver, -1);
        assert_eq!(c.max_ack_pending, -1);
        assert_eq!(c.inactive_threshold, Duration::from_secs(3600));
        assert_eq!(
            c.description.as_deref(),
            Some("queue-worker function mode: q.a.b")
        );
        assert!(c.deliver_subject.is_none());
    }

    #[test]
    fn unfiltered_means_every_subject() {
        let c = |f: &str, fs: &[&str]| ConsumerSummary {
            filter_subject: f.into(),
            filter_subjects: fs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(c("", &[]).is_unfiltered());
        assert!(c(">", &[]).is_unfiltered());
        assert!(!c("q.a.b", &[]).is_unfiltered());
        assert!(!c("", &["q.a", "q.b"]).is_unfiltered());
    }
}
