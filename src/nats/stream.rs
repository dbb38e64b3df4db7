//! The JetStream layout: the work stream `OF_<queue>` and the shared durable consumer, made
//! when missing and checked when present (an OpenFaaS worker may have made them). Also the
//! periodic read of their state for the pending metrics and readiness.
//!
//! Only settings nats-server 2.9 honours are used: a single (empty) filter subject, no
//! multi-subject filters, no 2.10+ stream fields.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, response::Response, stream};
use serde::Deserialize;
use serde_json::json;

/// Why the layout could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// Retrying cannot help; start-up stops with this message.
    #[error("{0}")]
    Incompatible(String),
    /// NATS or JetStream is not answering (yet); worth retrying.
    #[error("JetStream not available: {0}")]
    Unavailable(String),
    /// The consumer cannot be created while other consumers hold the WorkQueue stream: an
    /// unfiltered one (10099) or one whose filter overlaps (10100), e.g. function mode's.
    /// Worth retrying once they are gone (see `nats::consumers::claim_static_mode`).
    #[error("{0}")]
    Blocked(String),
}

/// What the worker needs of the stream and consumer.
#[derive(Debug, Clone)]
pub struct Layout {
    pub queue: String,
    pub stream: String,
    pub durable: String,
    pub replicas: usize,
    pub ack_wait: Duration,
}

impl Layout {
    /// The work stream and shared consumer of a configuration.
    pub fn of(config: &crate::config::Config) -> Layout {
        Layout {
            queue: config.queue.clone(),
            stream: config.stream_name(),
            durable: config.durable.clone(),
            replicas: config.stream_replicas,
            ack_wait: config.ack_wait,
        }
    }

    /// `<queue>` for older gateways that publish every function to one subject, and
    /// `<queue>.>` for per-function subjects `<queue>.<fn>.<ns>`.
    pub fn subjects(&self) -> [String; 2] {
        [self.queue.clone(), format!("{}.>", self.queue)]
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            subjects: self.subjects().to_vec(),
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: Duration::from_secs(120),
            discard: stream::DiscardPolicy::Old,
            max_messages: -1,
            max_bytes: -1,
            max_messages_per_subject: -1,
            max_message_size: -1,
            // No cap; `create_stream` writes one on servers that take `-1` for their own
            // default (see `wanted_max_consumers`).
            max_consumers: -1,
            description: Some("OpenFaaS asynchronous invocations (queue-worker)".into()),
            ..Default::default()
        }
    }

    fn consumer_config(&self) -> consumer::Config {
        work_consumer(
            &self.durable,
            "queue-worker shared consumer (static mode)".into(),
            self.ack_wait,
        )
    }
}

/// The settings every consumer the worker pulls from relies on, in either mode (function
/// mode adds a filter and an inactivity backstop).
pub(crate) fn work_consumer(
    durable: &str,
    description: String,
    ack_wait: Duration,
) -> consumer::Config {
    consumer::Config {
        durable_name: Some(durable.to_string()),
        description: Some(description),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        // The worker decides when to give up, from the delivery count.
        max_deliver: -1,
        // Messages waiting for a delayed retry count as ack-pending; a finite limit would
        // let a pile of retries stall the whole queue. Flow control is the worker's own
        // (it pulls only what it can start).
        max_ack_pending: -1,
        deliver_policy: consumer::DeliverPolicy::All,
        replay_policy: consumer::ReplayPolicy::Instant,
        ..Default::default()
    }
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> LayoutError {
    LayoutError::Unavailable(e.to_string())
}

/// Makes sure the stream exists and suits us; returns its info.
pub async fn ensure_stream(
    js: &jetstream::Context,
    layout: &Layout,
) -> Result<stream::Info, LayoutError> {
    let subject = format!("STREAM.INFO.{}", layout.stream);
    let resp: Response<stream::Info> =
        js.request(subject, &json!({})).await.map_err(unavailable)?;
    let info = match resp {
        Response::Ok(info) => info,
        Response::Err { error } if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {
            return create_stream(js, layout).await;
        }
        Response::Err { error } => return Err(unavailable(error)),
    };
    check_existing_stream(js, layout, info).await
}

async fn create_stream(
    js: &jetstream::Context,
    layout: &Layout,
) -> Result<stream::Info, LayoutError> {
    let mut config = layout.stream_config();
    config.max_consumers = wanted_max_consumers(js).await;
    let subject = format!("STREAM.CREATE.{}", layout.stream);
    let resp: Response<stream::Info> = js.request(subject, &config).await.map_err(unavailable)?;
    match resp {
        Response::Ok(info) => {
            tracing::info!(stream = %layout.stream, subjects = ?config.subjects, replicas = layout.replicas, "Created stream");
            Ok(info)
        }
        // Another replica won the race: use theirs.
        Response::Err { error }
            if error.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST =>
        {
            Box::pin(ensure_stream(js, layout)).await
        }
        Response::Err { error } => Err(LayoutError::Incompatible(format!(
            "cannot create stream {} with subjects {:?}: {error}",
            layout.stream, config.subjects
        ))),
    }
}

async fn check_existing_stream(
    js: &jetstream::Context,
    layout: &Layout,
    info: stream::Info,
) -> Result<stream::Info, LayoutError> {
    let cfg = &info.config;
    match cfg.retention {
        stream::RetentionPolicy::WorkQueue => {}
        stream::RetentionPolicy::Limits => {
            return Err(LayoutError::Incompatible(format!(
                "stream {} uses Limits retention (made by an OpenFaaS queue-worker before 2024); \
                 it must be WorkQueue. Upgrade it: stop publishing, let the queue drain, delete the stream \
                 (it is recreated at start-up), then restart the workers. \
                 See https://docs.openfaas.com/openfaas-pro/jetstream/",
                layout.stream
            )))
        }
        stream::RetentionPolicy::Interest => {
            return Err(LayoutError::Incompatible(format!(
                "stream {} uses Interest retention; the queue-worker needs WorkQueue retention. \
                 Drain and delete the stream so it is recreated.",
                layout.stream
            )))
        }
    }
    if cfg.num_replicas != layout.replicas {
        tracing::warn!(stream = %layout.stream, has = cfg.num_replicas, configured = layout.replicas, "stream replicas differ from nats_stream_replicas; leaving the stream as it is");
    }
    if cfg.storage != stream::StorageType::File {
        tracing::warn!(stream = %layout.stream, "stream uses memory storage; messages are lost if the NATS server restarts");
    }
    if cfg.max_age != Duration::ZERO || cfg.max_messages > 0 || cfg.max_bytes > 0 {
        tracing::warn!(stream = %layout.stream, max_age = ?cfg.max_age, max_messages = cfg.max_messages, max_bytes = cfg.max_bytes, "stream has limits that may discard queued invocations");
    }
    let missing: Vec<String> = layout
        .subjects()
        .into_iter()
        .filter(|s| !cfg.subjects.contains(s))
        .collect();
    if missing.is_empty() {
        return Ok(lift_consumer_cap(js, layout, info).await);
    }
    let mut updated = cfg.clone();
    updated.subjects.extend(missing.iter().cloned());
    let subject = format!("STREAM.UPDATE.{}", layout.stream);
    let resp: Response<stream::Info> = js.request(subject, &updated).await.map_err(unavailable)?;
    match resp {
        Response::Ok(info) => {
            tracing::info!(stream = %layout.stream, added = ?missing, "Added subjects to existing stream");
            Ok(lift_consumer_cap(js, layout, info).await)
        }
        Response::Err { error } => Err(LayoutError::Incompatible(format!(
            "stream {} lacks subjects {missing:?} and they cannot be added: {error}",
            layout.stream
        ))),
    }
}

/// The work stream's `max_consumers` when it sets no cap of its own: as good as none
/// (the server's field is a signed 32-bit count).
const NO_CONSUMER_CAP: i32 = i32::MAX;

/// The `max_consumers` the work stream needs, so that function mode can keep a consumer
/// per function with work (thousands; see BENCHMARKS.md) plus its marker.
///
/// `-1` meant "no cap" until nats-server 2.15, which reads it as "unset" and caps such a
/// stream at the server's `default_max_consumers` (1,000 unless configured) when the
/// account has no consumer limit either: function mode then stops at 999 functions, and
/// the others' jobs wait forever. On those servers, without an account limit, the stream
/// says [`NO_CONSUMER_CAP`] itself. An account with a consumer limit keeps `-1`: its limit
/// applies instead of the server's default, and the server refuses a stream whose cap
/// exceeds it. Older servers keep `-1`, which still means no cap there.
async fn wanted_max_consumers(js: &jetstream::Context) -> i32 {
    if !defaults_unset_consumer_cap(&js.client().server_info().version) {
        return -1;
    }
    match js.query_account().await {
        Ok(account) => {
            let limited = |n: Option<i64>| n.is_some_and(|n| n > 0);
            let tiers = account.tiers.values().map(|t| t.limits.max_consumers);
            if limited(account.limits.max_consumers) || tiers.into_iter().any(limited) {
                -1
            } else {
                NO_CONSUMER_CAP
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the account's JetStream limits; the stream sets no consumer cap");
            -1
        }
    }
}

/// Whether a nats-server of `version` (`2.15.1`, `v2.16.0-RC.1`) applies its own
/// `default_max_consumers` to a stream whose `max_consumers` is `-1`: 2.15 and later. A
/// version it cannot read counts as older, which keeps the stream as it was.
fn defaults_unset_consumer_cap(version: &str) -> bool {
    let mut parts = version.trim_start_matches('v').split('.');
    let mut next = || parts.next().and_then(|p| p.parse::<u32>().ok());
    match (next(), next()) {
        (Some(major), Some(minor)) => (major, minor) >= (2, 15),
        _ => false,
    }
}

/// Gives an existing work stream that sets no consumer cap (made by an earlier
/// queue-worker or by OpenFaaS's, with `-1`) the one [`wanted_max_consumers`] asks for.
/// Not fatal: static mode needs one consumer, and function mode logs the consumer the cap
/// refuses. A cap an operator set (above zero) is theirs and left alone.
async fn lift_consumer_cap(
    js: &jetstream::Context,
    layout: &Layout,
    info: stream::Info,
) -> stream::Info {
    if info.config.max_consumers > 0 {
        return info;
    }
    let wanted = wanted_max_consumers(js).await;
    if wanted <= 0 {
        return info;
    }
    let mut updated = info.config.clone();
    updated.max_consumers = wanted;
    let subject = format!("STREAM.UPDATE.{}", layout.stream);
    match js.request(subject, &updated).await {
        Ok(Response::Ok(lifted)) => {
            tracing::info!(stream = %layout.stream, max_consumers = wanted, "Set the stream's consumer cap (the server's default would cap function mode's consumers)");
            lifted
        }
        Ok(Response::Err { error }) => {
            tracing::warn!(stream = %layout.stream, error = %error, "cannot set the stream's consumer cap; the server's default_max_consumers applies, which caps function mode's consumers");
            info
        }
        Err(e) => {
            tracing::warn!(stream = %layout.stream, error = %e, "cannot set the stream's consumer cap; the server's default_max_consumers applies, which caps function mode's consumers");
            info
        }
    }
}

/// Makes sure the shared durable consumer exists, creating it when missing. An existing one
/// is updated to our `ack_wait` where the server allows; a push consumer is refused.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    layout: &Layout,
) -> Result<consumer::Info, LayoutError> {
    let subject = format!("CONSUMER.INFO.{}.{}", layout.stream, layout.durable);
    let resp: Response<consumer::Info> =
        js.request(subject, &json!({})).await.map_err(unavailable)?;
    let wanted = layout.consumer_config();
    match resp {
        Response::Ok(info) => {
            let c = &info.config;
            if c.deliver_subject.is_some() {
                return Err(LayoutError::Incompatible(format!(
                    "consumer {} on {} is a push consumer; the queue-worker needs a pull consumer. \
                     Delete it (pending messages stay in the stream) or set nats_durable to another name.",
                    layout.durable, layout.stream
                )));
            }
            if !c.filter_subject.is_empty() && c.filter_subject != ">" {
                tracing::warn!(consumer = %layout.durable, filter = %c.filter_subject, "existing consumer only sees messages on its filter subject");
            }
            if c.ack_wait == wanted.ack_wait && c.max_deliver == -1 && c.max_ack_pending == -1 {
                return Ok(info);
            }
            // Ours now: the lease we renew, the worker deciding when to give up, and no cap
            // on ack-pending (delayed retries count against it and would stall the queue).
            let mut updated = c.clone();
            updated.ack_wait = wanted.ack_wait;
            updated.max_deliver = -1;
            updated.max_ack_pending = -1;
            match create_consumer(js, layout, &updated).await {
                Ok(info) => {
                    tracing::info!(consumer = %layout.durable, ack_wait = ?wanted.ack_wait, "Updated consumer (ack_wait, max_deliver=-1, max_ack_pending=-1)");
                    Ok(info)
                }
                Err(LayoutError::Incompatible(e) | LayoutError::Blocked(e)) => {
                    tracing::warn!(consumer = %layout.durable, error = %e, "could not update the existing consumer; using it as it is");
                    Ok(info)
                }
                Err(e) => Err(e),
            }
        }
        Response::Err { error }
            if error.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND =>
        {
            let info = create_consumer(js, layout, &wanted).await?;
            tracing::info!(stream = %layout.stream, consumer = %layout.durable, "Created consumer");
            Ok(info)
        }
        Response::Err { error } if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {
            Err(unavailable(format!("stream {} not found", layout.stream)))
        }
        Response::Err { error } => Err(unavailable(error)),
    }
}

async fn create_consumer(
    js: &jetstream::Context,
    layout: &Layout,
    config: &consumer::Config,
) -> Result<consumer::Info, LayoutError> {
    // The durable form of the create API exists on every server since 2.2; the named
    // `CONSUMER.CREATE.<stream>.<name>` form needs 2.9 and its filter variant 2.10.
    let subject = format!(
        "CONSUMER.DURABLE.CREATE.{}.{}",
        layout.stream, layout.durable
    );
    let resp: Response<consumer::Info> = js
        .request(
            subject,
            &json!({"stream_name": layout.stream, "config": config}),
        )
        .await
        .map_err(unavailable)?;
    match resp {
        Response::Ok(info) => Ok(info),
        Response::Err { error } if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {
            Err(unavailable(format!("stream {} not found", layout.stream)))
        }
        Response::Err { error }
            if error.error_code() == jetstream::ErrorCode::CONSUMER_WQ_MULTIPLE_UNFILTERED
                || error.error_code() == jetstream::ErrorCode::CONSUMER_WQ_CONSUMER_NOT_UNIQUE =>
        {
            Err(LayoutError::Blocked(format!(
                "cannot create consumer {} on {}: other consumers hold the work-queue stream \
                 (function mode, or another unfiltered consumer): {error}",
                layout.durable, layout.stream
            )))
        }
        Response::Err { error } => Err(LayoutError::Incompatible(format!(
            "cannot create consumer {} on {}: {error}",
            layout.durable, layout.stream
        ))),
    }
}

/// The first message at or after `seq` on `subject` (wildcards allowed), read without a
/// consumer (`STREAM.MSG.GET` with `next_by_subj`); `None` when there is none.
pub async fn next_on_subject(
    stream: &jetstream::stream::Stream,
    subject: &str,
    seq: u64,
) -> Result<Option<jetstream::message::StreamMessage>, jetstream::stream::RawMessageError> {
    match stream
        .raw_message_builder()
        .sequence(seq)
        .next_by_subject(subject.to_string())
        .send()
        .await
    {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Stream and consumer counters read for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueState {
    /// The stream's last sequence: every message ever published to it.
    pub submitted: u64,
    /// Waiting for delivery + delivered and not yet acked (in flight or waiting to retry).
    pub pending: u64,
    /// Messages the stream counts (read before the consumer).
    pub stored: u64,
    /// The shared consumer's progress; `None` when it does not exist.
    pub consumer: Option<ConsumerProgress>,
}

/// What a consumer owes and how far it delivered, for telling stale messages
/// (`worker::stale`) from queued ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerProgress {
    /// `num_pending + num_ack_pending`.
    pub owed: u64,
    /// `delivered.stream_seq`: the last stream sequence it delivered.
    pub delivered: u64,
}

/// Reads the current [`QueueState`].
pub async fn read_state(
    js: &jetstream::Context,
    layout: &Layout,
) -> Result<QueueState, LayoutError> {
    let resp: Response<stream::Info> = js
        .request(format!("STREAM.INFO.{}", layout.stream), &json!({}))
        .await
        .map_err(unavailable)?;
    let stream = match resp {
        Response::Ok(info) => info,
        Response::Err { error } => return Err(unavailable(error)),
    };
    let resp: Response<consumer::Info> = js
        .request(
            format!("CONSUMER.INFO.{}.{}", layout.stream, layout.durable),
            &json!({}),
        )
        .await
        .map_err(unavailable)?;
    let consumer = match resp {
        Response::Ok(info) => Some(ConsumerProgress {
            owed: info.num_pending + info.num_ack_pending as u64,
            delivered: info.delivered.stream_sequence,
        }),
        // No shared consumer (a switch from function mode is waiting for function-mode
        // replicas to go): every message in the WorkQueue stream is still to be done.
        Response::Err { error }
            if error.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND =>
        {
            None
        }
        Response::Err { error } => return Err(unavailable(error)),
    };
    Ok(QueueState {
        submitted: stream.state.last_sequence,
        pending: consumer.map_or(stream.state.messages, |c| c.owed),
        stored: stream.state.messages,
        consumer,
    })
}

/// The stream's totals, for discovering work without touching any consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamSummary {
    /// Messages in the stream: on a WorkQueue stream, queued plus delivered-unacked.
    pub messages: u64,
    /// The last sequence: moves whenever anything is published.
    pub last_seq: u64,
    /// Distinct subjects holding messages.
    pub num_subjects: u64,
}

/// Messages per subject (queued plus delivered-unacked on a WorkQueue stream), with the
/// stream's totals as the first page reported them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubjectCounts {
    pub summary: StreamSummary,
    pub subjects: HashMap<String, u64>,
}

/// `STREAM.INFO` as we read it: only our fields, each optional, so async-nats's own type
/// (which may not expose `state.subjects` or the paging fields) is not needed.
#[derive(Debug, Default, Deserialize)]
struct RawStreamInfo {
    #[serde(default)]
    state: RawStreamState,
    /// Subjects matching the filter, over all pages.
    #[serde(default)]
    total: u64,
}

#[derive(Debug, Default, Deserialize)]
struct RawStreamState {
    #[serde(default)]
    messages: u64,
    #[serde(default)]
    last_seq: u64,
    #[serde(default)]
    num_subjects: u64,
    #[serde(default)]
    subjects: Option<HashMap<String, u64>>,
}

impl RawStreamState {
    fn summary(&self) -> StreamSummary {
        StreamSummary {
            messages: self.messages,
            last_seq: self.last_seq,
            num_subjects: self.num_subjects,
        }
    }
}

async fn raw_stream_info(
    js: &jetstream::Context,
    stream: &str,
    body: serde_json::Value,
) -> Result<RawStreamInfo, LayoutError> {
    let resp: Response<RawStreamInfo> = js
        .request(format!("STREAM.INFO.{stream}"), &body)
        .await
        .map_err(unavailable)?;
    match resp {
        Response::Ok(info) => Ok(info),
        Response::Err { error } if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {
            Err(unavailable(format!("stream {stream} not found")))
        }
        Response::Err { error } => {
            Err(unavailable(format!("cannot read stream {stream}: {error}")))
        }
    }
}

/// The stream's totals (`STREAM.INFO` without subjects: one small answer), to tell cheaply
/// whether anything changed since the last [`read_subjects`].
pub async fn read_summary(
    js: &jetstream::Context,
    stream: &str,
) -> Result<StreamSummary, LayoutError> {
    Ok(raw_stream_info(js, stream, json!({}))
        .await?
        .state
        .summary())
}

/// Messages per subject matching `filter` (wildcards allowed), every page of
/// `STREAM.INFO {"subjects_filter", "offset"}` read (the server answers at most 100,000
/// subjects at a time).
pub async fn read_subjects(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
) -> Result<SubjectCounts, LayoutError> {
    let first =
        raw_stream_info(js, stream, json!({"subjects_filter": filter, "offset": 0})).await?;
    let mut counts = SubjectCounts {
        summary: first.state.summary(),
        subjects: HashMap::new(),
    };
    let mut page = first;
    let mut offset = 0;
    loop {
        let subjects = page.state.subjects.take().unwrap_or_default();
        match merge_page(&mut counts.subjects, subjects, offset, page.total) {
            Some(next) => offset = next,
            None => return Ok(counts),
        }
        page = raw_stream_info(
            js,
            stream,
            json!({"subjects_filter": filter, "offset": offset}),
        )
        .await?;
    }
}

/// Adds one page of subject counts at `offset`; returns the next page's offset, or `None`
/// when everything is in (`total` reached) or the page added nothing (a server that ignores
/// the offset sends the first page again; an empty page ends it too).
fn merge_page(
    into: &mut HashMap<String, u64>,
    page: HashMap<String, u64>,
    offset: u64,
    total: u64,
) -> Option<u64> {
    let before = into.len();
    let returned = page.len() as u64;
    into.extend(page);
    if into.len() == before || into.len() as u64 >= total {
        None
    } else {
        Some(offset + returned)
    }
}

/// The dead-letter stream `OF_<queue>-dead`: where messages go that the worker gave up on or
/// could not decode. Limits retention (entries stay until they age out or the stream is full,
/// whatever reads them), so `dead list` can show them without consuming them.
#[derive(Debug, Clone)]
pub struct DeadLetterLayout {
    pub stream: String,
    /// `<queue>-dead`; entries go to `<queue>-dead.<fn>.<ns>`.
    pub prefix: String,
    pub replicas: usize,
    pub max_age: Duration,
    pub max_bytes: u64,
    /// How long a repeated store of the same give-up is recognised. A lost term brings the
    /// message back after `ack_wait`, and its call may take `upstream_timeout` before the
    /// second store: so at least `ack_wait + upstream_timeout` (plus slack), two `ack_wait`s
    /// and 2 minutes, at most `max_age`.
    pub duplicate_window: Duration,
}

impl DeadLetterLayout {
    /// The dead-letter stream of a configuration.
    pub fn of(config: &crate::config::Config) -> DeadLetterLayout {
        DeadLetterLayout {
            stream: config.dead_letter_stream_name(),
            prefix: format!("{}-dead", config.queue),
            replicas: config.stream_replicas,
            max_age: config.dead_letter.max_age,
            max_bytes: config.dead_letter.max_bytes,
            duplicate_window: (config.ack_wait * 2)
                .max(config.ack_wait + config.upstream_timeout + Duration::from_secs(30))
                .max(Duration::from_secs(120))
                .min(config.dead_letter.max_age),
        }
    }

    pub fn subjects(&self) -> Vec<String> {
        vec![format!("{}.>", self.prefix)]
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            subjects: self.subjects(),
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            max_age: self.max_age,
            max_bytes: i64::try_from(self.max_bytes).unwrap_or(i64::MAX),
            // Full: the oldest entries make room, so a flood of failures never blocks the
            // worker from recording the newest.
            discard: stream::DiscardPolicy::Old,
            // A give-up stored but not yet terminated when the worker died is stored again
            // on redelivery with the same Nats-Msg-Id; the window drops that copy.
            duplicate_window: self.duplicate_window,
            max_messages: -1,
            max_messages_per_subject: -1,
            max_message_size: -1,
            max_consumers: -1,
            description: Some("queue-worker dead letters of OF_ queue".into()),
            ..Default::default()
        }
    }
}

/// What [`create_capped`] should call the stream and its settings in logs and errors.
pub(crate) struct Capped<'a> {
    /// "dead-letter stream", "call records bucket".
    pub what: &'a str,
    /// The settings behind its `max_bytes` and `max_age`.
    pub max_bytes_key: &'a str,
    pub max_age_key: &'a str,
}

/// Creates a stream the worker owns with `wanted`'s limits. When that fails (the usual
/// cause: JetStream cannot reserve `max_bytes`, a small `max_file_store` or an account
/// limit) it is created again without a size cap, bounded by age only, and a warning says
/// which setting to lower: better than a worker that does not start. `Ok(None)` when
/// another process created it first.
pub(crate) async fn create_capped(
    js: &jetstream::Context,
    wanted: stream::Config,
    names: Capped<'_>,
) -> Result<Option<stream::Info>, LayoutError> {
    let create = |config: stream::Config| async move {
        let resp: Response<stream::Info> = js
            .request(format!("STREAM.CREATE.{}", config.name), &config)
            .await
            .map_err(unavailable)?;
        Ok::<_, LayoutError>(resp)
    };
    let exists = |e: &jetstream::Error| e.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST;
    let error = match create(wanted.clone()).await? {
        Response::Ok(info) => {
            tracing::info!(stream = %wanted.name, subjects = ?wanted.subjects, max_age = ?wanted.max_age, max_bytes = wanted.max_bytes, "Created {}", names.what);
            return Ok(Some(info));
        }
        Response::Err { error } if exists(&error) => return Ok(None),
        Response::Err { error } => error,
    };
    let mut uncapped = wanted.clone();
    uncapped.max_bytes = -1;
    match create(uncapped).await? {
        Response::Ok(info) => {
            tracing::warn!(stream = %wanted.name, max_bytes = wanted.max_bytes, error = %error, "could not create the {} with {}; created it bounded by {} only. Lower {} to what JetStream can hold.", names.what, names.max_bytes_key, names.max_age_key, names.max_bytes_key);
            Ok(Some(info))
        }
        Response::Err { error: second } if exists(&second) => Ok(None),
        Response::Err { error: second } => Err(LayoutError::Incompatible(format!(
            "cannot create the {} {} with subjects {:?} ({}={}): {error}; without a size cap: {second}",
            names.what, wanted.name, wanted.subjects, names.max_bytes_key, wanted.max_bytes
        ))),
    }
}

async fn create_dead_letter_stream(
    js: &jetstream::Context,
    layout: &DeadLetterLayout,
    wanted: stream::Config,
) -> Result<stream::Info, LayoutError> {
    let names = Capped {
        what: "dead-letter stream",
        max_bytes_key: "dead_letter_max_bytes",
        max_age_key: "dead_letter_max_age",
    };
    match create_capped(js, wanted, names).await? {
        Some(info) => Ok(info),
        // Another replica won the race: use theirs.
        None => Box::pin(ensure_dead_letter_stream(js, layout)).await,
    }
}

/// Makes sure the dead-letter stream exists with our subjects and the configured limits. The
/// worker owns this stream, so an existing one is brought to the configured `max_age` and
/// `max_bytes`.
pub async fn ensure_dead_letter_stream(
    js: &jetstream::Context,
    layout: &DeadLetterLayout,
) -> Result<stream::Info, LayoutError> {
    let wanted = layout.stream_config();
    let resp: Response<stream::Info> = js
        .request(format!("STREAM.INFO.{}", layout.stream), &json!({}))
        .await
        .map_err(unavailable)?;
    let info = match resp {
        Response::Ok(info) => info,
        Response::Err { error } if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {
            return create_dead_letter_stream(js, layout, wanted).await;
        }
        Response::Err { error } => return Err(unavailable(error)),
    };
    let cfg = &info.config;
    if cfg.retention != stream::RetentionPolicy::Limits {
        tracing::warn!(stream = %layout.stream, retention = ?cfg.retention, "dead-letter stream does not use Limits retention; entries may vanish when read");
    }
    let missing: Vec<String> = wanted
        .subjects
        .iter()
        .filter(|s| !cfg.subjects.contains(s))
        .cloned()
        .collect();
    if missing.is_empty()
        && cfg.max_age == wanted.max_age
        && cfg.max_bytes == wanted.max_bytes
        && cfg.duplicate_window == wanted.duplicate_window
    {
        return Ok(info);
    }
    let mut updated = cfg.clone();
    updated.subjects.extend(missing.iter().cloned());
    updated.max_age = wanted.max_age;
    updated.max_bytes = wanted.max_bytes;
    updated.duplicate_window = wanted.duplicate_window;
    let resp: Response<stream::Info> = js
        .request(format!("STREAM.UPDATE.{}", layout.stream), &updated)
        .await
        .map_err(unavailable)?;
    match resp {
        Response::Ok(info) => {
            tracing::info!(stream = %layout.stream, added = ?missing, max_age = ?wanted.max_age, max_bytes = wanted.max_bytes, "Updated dead-letter stream");
            Ok(info)
        }
        Response::Err { error } if missing.is_empty() => {
            tracing::warn!(stream = %layout.stream, error = %error, "could not apply dead_letter_max_age / dead_letter_max_bytes to the existing dead-letter stream; using it as it is");
            Ok(info)
        }
        Response::Err { error } => Err(LayoutError::Incompatible(format!(
            "dead-letter stream {} lacks subjects {missing:?} and they cannot be added: {error}",
            layout.stream
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::{defaults_unset_consumer_cap, merge_page};

    #[test]
    fn servers_from_2_15_cap_a_stream_without_max_consumers() {
        for (version, caps) in [
            ("2.9.10", false),
            ("2.10.22", false),
            ("2.14.3", false),
            ("2.15.0", true),
            ("2.15.1", true),
            ("v2.16.0-RC.1", true),
            ("3.0.0", true),
            ("", false),
            ("unknown", false),
        ] {
            assert_eq!(defaults_unset_consumer_cap(version), caps, "{version}");
        }
    }

    fn page(range: std::ops::Range<u32>) -> HashMap<String, u64> {
        range
            .map(|i| (format!("q.f{i}.ns"), u64::from(i)))
            .collect()
    }

    #[test]
    fn pages_are_merged_until_the_total() {
        let mut all = HashMap::new();
        assert_eq!(merge_page(&mut all, page(0..3), 0, 7), Some(3));
        assert_eq!(merge_page(&mut all, page(3..6), 3, 7), Some(6));
        assert_eq!(merge_page(&mut all, page(6..7), 6, 7), None);
        assert_eq!(all, page(0..7));
    }

    #[test]
    fn one_page_is_enough_when_it_holds_the_total() {
        let mut all = HashMap::new();
        assert_eq!(merge_page(&mut all, page(0..5), 0, 5), None);
        // A server that reports no total (nothing matched, or an older answer).
        let mut none = HashMap::new();
        assert_eq!(merge_page(&mut none, HashMap::new(), 0, 0), None);
        assert_eq!(merge_page(&mut none, page(0..2), 0, 0), None);
        assert_eq!(none.len(), 2);
    }

    #[test]
    fn a_server_ignoring_the_offset_ends_the_paging() {
        let mut all = HashMap::new();
        assert_eq!(merge_page(&mut all, page(0..3), 0, 10), Some(3));
        // The same first page again: nothing new, stop rather than loop forever.
        assert_eq!(merge_page(&mut all, page(0..3), 3, 10), None);
        assert_eq!(all, page(0..3));
    }

    #[test]
    fn an_empty_page_ends_the_paging() {
        let mut all = page(0..3);
        assert_eq!(merge_page(&mut all, HashMap::new(), 3, 10), None);
    }
}
