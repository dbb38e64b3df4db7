//! The dead-letter stream `OF_<queue>-dead`: a message the worker gave up on (attempts
//! exhausted), cannot run (undecodable, too large) or may no longer run (expired) is stored
//! there, with why, before the
//! original is terminated. Nothing leaves the work queue without a trace.
//!
//! An entry is the original payload, unchanged, on `<queue>-dead.<fn>.<ns>` (or
//! `<queue>-dead._unknown` when no function could be read), with `Dead-Letter-*` headers. The
//! same type serves the operator commands `dead list`, `dead replay` and `dead purge`.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Serialize;
use time::OffsetDateTime;

use crate::message::function::FunctionName;
use crate::nats::stream::DeadLetterLayout;
use crate::worker::retry::GiveUpReason;

/// Headers of a dead-letter entry. The payload is the original message, byte for byte.
pub mod header {
    /// One of [`super::Reason`], e.g. `attempts_exhausted`.
    pub const REASON: &str = "Dead-Letter-Reason";
    /// The `Function` of the message as submitted (absent when it could not be read).
    pub const FUNCTION: &str = "Dead-Letter-Function";
    /// Attempts when it was given up: the JetStream delivery count (less a deferral to the
    /// start time); for `expired`, the calls made before it expired.
    pub const ATTEMPTS: &str = "Dead-Letter-Attempts";
    /// The last call's result: an HTTP status, `timeout` or `error` (absent: never called).
    pub const STATUS: &str = "Dead-Letter-Status";
    /// When the worker gave up, RFC 3339 UTC.
    pub const TIME: &str = "Dead-Letter-Time";
    /// A one-line explanation for people.
    pub const ERROR: &str = "Dead-Letter-Error";
    /// The work-queue subject the message came from; `dead replay` publishes it back there.
    pub const SUBJECT: &str = "Dead-Letter-Subject";
    /// The message's sequence in the work stream.
    pub const SEQUENCE: &str = "Dead-Letter-Sequence";
    pub const CALL_ID: &str = "Dead-Letter-Call-Id";
    /// Set when the payload had to be left out (it did not fit `max_payload` with the
    /// headers): the original size in bytes.
    pub const PAYLOAD_DROPPED: &str = "Dead-Letter-Payload-Dropped";
}

/// Why a message was dead-lettered: the `reason` header and metric label. A closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Retryable failures on every allowed attempt.
    AttemptsExhausted,
    /// Larger than `max_message_bytes`.
    TooLarge,
    /// Not JSON, or not a `QueueRequest` (wrong types, bad base64).
    Malformed,
    MissingFunction,
    BadFunction,
    /// `Path` or `QueryString` cannot form a URL.
    BadUrl,
    /// Still queued past its maximum age (`max_call_age`, `com.openfaas.queue.max_age`),
    /// counted from when it became due: not run.
    Expired,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::AttemptsExhausted,
        Reason::TooLarge,
        Reason::Malformed,
        Reason::MissingFunction,
        Reason::BadFunction,
        Reason::BadUrl,
        Reason::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::AttemptsExhausted => "attempts_exhausted",
            Reason::TooLarge => "too_large",
            Reason::Malformed => "malformed",
            Reason::MissingFunction => "missing_function",
            Reason::BadFunction => "bad_function",
            Reason::BadUrl => "bad_url",
            Reason::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl From<GiveUpReason> for Reason {
    fn from(r: GiveUpReason) -> Reason {
        match r {
            GiveUpReason::AttemptsExhausted => Reason::AttemptsExhausted,
        }
    }
}

/// What the worker knows about a message it gives up on.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub reason: Reason,
    /// `Function` as submitted, when the message could be read.
    pub function: Option<&'a str>,
    /// The function, when the message could be read; names the entry's subject.
    pub function_label: Option<&'a FunctionName>,
    pub attempts: u32,
    /// The last call's status label (`503`, `timeout`, `error`); `None` when never called.
    pub last_status: Option<&'a str>,
    pub error: &'a str,
    pub call_id: Option<&'a str>,
    pub original_subject: &'a str,
    pub original_sequence: u64,
    pub payload: Bytes,
}

/// Why the dead-letter stream could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("dead-letter stream {0} does not exist (a worker creates it when it starts)")]
    NoStream(String),
    #[error("{0}")]
    Nats(String),
}

/// An entry as read back by the operator commands.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Sequence in the dead-letter stream.
    pub sequence: u64,
    /// When it was stored.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub function: String,
    pub reason: String,
    pub attempts: u32,
    pub last_status: String,
    pub call_id: String,
    pub error: String,
    pub original_subject: String,
    pub bytes: usize,
    /// The entry was stored without the original payload (it did not fit with the headers).
    pub payload_dropped: bool,
    /// The original message; empty when listed without payloads.
    #[serde(skip)]
    pub payload: Bytes,
}

impl Record {
    /// How long ago it was stored.
    pub fn age(&self) -> Duration {
        let secs = (OffsetDateTime::now_utc() - self.time).as_seconds_f64();
        Duration::from_secs_f64(secs.max(0.0))
    }
}

/// Which entries an operator command applies to.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub function: Option<FunctionName>,
    pub reason: Option<Reason>,
    pub limit: Option<usize>,
}

/// What `dead replay` did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub replayed: usize,
    /// Entries stored without their payload (see [`header::PAYLOAD_DROPPED`]): nothing to
    /// replay, so they stay.
    pub skipped: Vec<u64>,
    /// What stopped the replay early, if anything; `replayed` counts what was done before.
    pub error: Option<DeadLetterError>,
    /// Sequences that were republished but could not be removed from the dead-letter stream
    /// (they would be replayed again by a second run; the work queue's duplicate window drops
    /// such a copy for two minutes).
    pub not_removed: Vec<u64>,
}

/// The dead-letter stream of one queue, for writing (the worker) and for the operator
/// commands.
#[derive(Clone)]
pub struct DeadLetters {
    js: jetstream::Context,
    layout: DeadLetterLayout,
    queue: String,
    work_stream: String,
    default_namespace: String,
}

/// Header values cannot hold line breaks; error texts are also kept short.
fn header_value(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(512)
        .collect()
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// See [`DeadLetters::store_id`]. The hash is FNV-1a 64 ([`payload_hash`]): the same on every
/// replica and Rust version, which `DefaultHasher` does not promise.
fn store_id(work_stream: &str, sequence: u64, payload: &[u8]) -> String {
    format!("{work_stream}:{sequence}:{:016x}", payload_hash(payload))
}

/// FNV-1a 64 of `bytes` (`message::fingerprint::Fnv1a`: stable across versions and replicas).
fn payload_hash(bytes: &[u8]) -> u64 {
    crate::message::fingerprint::Fnv1a::default()
        .bytes(bytes)
        .finish()
}

impl DeadLetters {
    pub fn new(
        js: jetstream::Context,
        layout: DeadLetterLayout,
        queue: &str,
        work_stream: &str,
        default_namespace: &str,
    ) -> DeadLetters {
        DeadLetters {
            js,
            layout,
            queue: queue.to_string(),
            work_stream: work_stream.to_string(),
            default_namespace: default_namespace.to_string(),
        }
    }

    /// The stream name, `OF_<queue>-dead`.
    pub fn stream(&self) -> &str {
        &self.layout.stream
    }

    /// The subject an entry for `function` is stored on; `None`: every entry.
    pub fn subject(&self, function: Option<&FunctionName>) -> String {
        match function {
            Some(f) => f.subject(&self.layout.prefix),
            None => format!("{}.>", self.layout.prefix),
        }
    }

    /// The entry's `Nats-Msg-Id`: `<work stream>:<sequence>:<payload hash>`. Every delivery
    /// of one message gives the same id, so a give-up stored twice (the term was lost and
    /// the message came back) is kept once. The call id is left out on purpose: for a message
    /// without `X-Call-Id` the decoder makes one up per delivery. The stream's name and the
    /// payload keep a work stream re-created inside the duplicate window from making two
    /// different messages look like one.
    fn store_id(&self, entry: &Entry<'_>) -> String {
        store_id(&self.work_stream, entry.original_sequence, &entry.payload)
    }

    /// Stores an entry and waits for JetStream to confirm it. Tries three times, 1.25 s of
    /// pauses apart, each try waiting up to the client's request timeout (5 s) for the
    /// stream's acknowledgement, so up to about 16 s when JetStream does not answer;
    /// re-creates the stream if it was deleted. The caller keeps the original message when
    /// this fails.
    pub async fn store(&self, entry: &Entry<'_>) -> Result<(), DeadLetterError> {
        let subject = match entry.function_label {
            Some(f) => f.subject(&self.layout.prefix),
            None => format!("{}._unknown", self.layout.prefix),
        };
        let mut headers = HeaderMap::new();
        // Stored twice (the worker died between storing and terminating): the second copy
        // has the same id and the stream's duplicate window drops it.
        headers.insert("Nats-Msg-Id", self.store_id(entry).as_str());
        headers.insert(header::REASON, entry.reason.as_str());
        if let Some(f) = entry.function {
            headers.insert(header::FUNCTION, header_value(f).as_str());
        }
        headers.insert(header::ATTEMPTS, entry.attempts.to_string().as_str());
        if let Some(s) = entry.last_status {
            headers.insert(header::STATUS, s);
        }
        headers.insert(header::TIME, now_rfc3339().as_str());
        headers.insert(header::ERROR, header_value(entry.error).as_str());
        headers.insert(
            header::SUBJECT,
            header_value(entry.original_subject).as_str(),
        );
        headers.insert(
            header::SEQUENCE,
            entry.original_sequence.to_string().as_str(),
        );
        if let Some(id) = entry.call_id {
            headers.insert(header::CALL_ID, header_value(id).as_str());
        }

        let mut payload = entry.payload.clone();
        let mut last_error = String::new();
        for wait in [
            Duration::ZERO,
            Duration::from_millis(250),
            Duration::from_secs(1),
        ] {
            tokio::time::sleep(wait).await;
            let sent = self
                .js
                .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await;
            let result = match sent {
                Ok(ack) => ack.await.map(|_| ()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.kind() == PublishErrorKind::MaxPayloadExceeded && !payload.is_empty() =>
                {
                    // The original fitted; with our headers it does not. Keep the record of
                    // what happened rather than nothing: the headers, without the body.
                    tracing::error!(seq = entry.original_sequence, bytes = payload.len(), "dead letter too large for NATS max_payload with its headers; storing it without the payload");
                    headers.insert(header::PAYLOAD_DROPPED, payload.len().to_string().as_str());
                    payload = Bytes::new();
                    last_error = e.to_string();
                }
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    // Deleted while we run (an operator, a reset): make it again.
                    tracing::warn!(stream = %self.layout.stream, "dead-letter stream missing; creating it again");
                    if let Err(e) =
                        crate::nats::stream::ensure_dead_letter_stream(&self.js, &self.layout).await
                    {
                        last_error = e.to_string();
                    } else {
                        last_error = "dead-letter stream was missing".into();
                    }
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(DeadLetterError::Nats(last_error))
    }

    async fn stream_handle(&self) -> Result<jetstream::stream::Stream, DeadLetterError> {
        self.js
            .get_stream(&self.layout.stream)
            .await
            .map_err(|e| match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    DeadLetterError::NoStream(self.layout.stream.clone())
                }
                _ => {
                    DeadLetterError::Nats(format!("cannot read stream {}: {e}", self.layout.stream))
                }
            })
    }

    /// How many entries the stream holds, and their bytes.
    pub async fn totals(&self) -> Result<(u64, u64), DeadLetterError> {
        let stream = self.stream_handle().await?;
        let state = &stream.cached_info().state;
        Ok((state.messages, state.bytes))
    }

    /// The next entry at or after `seq` on `subject`; `None` past the last.
    async fn next_entry(
        &self,
        stream: &jetstream::stream::Stream,
        subject: &str,
        seq: u64,
    ) -> Result<Option<jetstream::message::StreamMessage>, DeadLetterError> {
        crate::nats::stream::next_on_subject(stream, subject, seq)
            .await
            .map_err(|e| DeadLetterError::Nats(format!("cannot read {}: {e}", self.layout.stream)))
    }

    /// Calls `each` with the entries matching `filter`, oldest first, one at a time (the
    /// stream can hold a gigabyte; nothing is collected here). Reading removes nothing.
    ///
    /// Only entries present when the walk starts are visited: a running worker may store new
    /// ones meanwhile (a replayed message that fails again comes back at a higher sequence),
    /// and following them would never end.
    pub async fn for_each(
        &self,
        filter: &Filter,
        mut each: impl AsyncFnMut(Record) -> Result<(), DeadLetterError>,
    ) -> Result<(), DeadLetterError> {
        // The info fetched with the handle is as of now: where this walk ends.
        let stream = self.stream_handle().await?;
        let last = stream.cached_info().state.last_sequence;
        let subject = self.subject(filter.function.as_ref());
        let mut seq = 1;
        let mut matched = 0;
        while seq <= last && filter.limit.is_none_or(|l| matched < l) {
            let Some(msg) = self.next_entry(&stream, &subject, seq).await? else {
                break;
            };
            if msg.sequence > last {
                break;
            }
            seq = msg.sequence + 1;
            let record = to_record(msg);
            if filter
                .reason
                .is_none_or(|r| r.as_str() == record.reason.as_str())
            {
                matched += 1;
                each(record).await?;
            }
        }
        Ok(())
    }

    /// The entries matching `filter`, oldest first. Payloads are kept only when asked for.
    pub async fn list(
        &self,
        filter: &Filter,
        with_payloads: bool,
    ) -> Result<Vec<Record>, DeadLetterError> {
        let mut records = Vec::new();
        self.for_each(filter, async |mut r| {
            if !with_payloads {
                r.payload = Bytes::new();
            }
            records.push(r);
            Ok(())
        })
        .await?;
        Ok(records)
    }

    /// Publishes the matching entries back to the work queue (on the subject they came from)
    /// as new messages, so they get a fresh set of attempts, and removes each from the
    /// dead-letter stream once JetStream has stored its copy. Entries stored without their
    /// payload are skipped (and kept). On an error, the report says what was done before it.
    pub async fn replay(&self, filter: &Filter) -> ReplayReport {
        let mut report = ReplayReport::default();
        let stream = match self.stream_handle().await {
            Ok(s) => s,
            Err(e) => {
                report.error = Some(e);
                return report;
            }
        };
        let result = self
            .for_each(filter, async |record| {
                if record.payload_dropped {
                    report.skipped.push(record.sequence);
                    return Ok(());
                }
                let subject = self.replay_subject(&record);
                let mut headers = HeaderMap::new();
                // Unique to this entry (its time in the dead-letter stream, which restarts
                // its sequences if re-created): a second run after a crash between publish
                // and delete is dropped by the work stream's duplicate window, and nothing
                // else can be.
                headers.insert(
                    "Nats-Msg-Id",
                    format!(
                        "replay:{}:{}:{}",
                        self.layout.stream,
                        record.sequence,
                        record.time.unix_timestamp_nanos()
                    )
                    .as_str(),
                );
                let ack = self
                    .js
                    .publish_with_headers(subject.clone(), headers, record.payload.clone())
                    .await
                    .map_err(|e| {
                        DeadLetterError::Nats(format!("cannot publish to {subject}: {e}"))
                    })?;
                ack.await.map_err(|e| {
                    DeadLetterError::Nats(format!(
                        "JetStream did not store the replay on {subject}: {e}"
                    ))
                })?;
                report.replayed += 1;
                if let Err(e) = stream.delete_message(record.sequence).await {
                    tracing::warn!(seq = record.sequence, error = %e, "replayed but not removed from the dead-letter stream");
                    report.not_removed.push(record.sequence);
                }
                Ok(())
            })
            .await;
        report.error = result.err();
        report
    }

    /// Where a replayed entry goes: its original subject when that belongs to this queue,
    /// otherwise the function's subject.
    fn replay_subject(&self, record: &Record) -> String {
        let s = record.original_subject.as_str();
        if s == self.queue
            || s.strip_prefix(&self.queue)
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(is_subject_tail)
        {
            return s.to_string();
        }
        match FunctionName::parse(record.function.trim(), &self.default_namespace) {
            Ok(f) => f.subject(&self.queue),
            Err(_) => self.queue.clone(),
        }
    }

    /// Removes the entries of `function`, or every entry. Returns how many.
    pub async fn purge(&self, function: Option<&FunctionName>) -> Result<u64, DeadLetterError> {
        let stream = self.stream_handle().await?;
        // Only what is there now: entries a running worker stores meanwhile stay.
        let upto = stream.cached_info().state.last_sequence + 1;
        let purge = stream.purge();
        let resp = match function {
            Some(_) => purge.filter(self.subject(function)).sequence(upto).await,
            None => purge.sequence(upto).await,
        };
        resp.map(|r| r.purged)
            .map_err(|e| DeadLetterError::Nats(format!("cannot purge {}: {e}", self.layout.stream)))
    }
}

/// Dot-separated tokens of letters, digits, `-` and `_`: safe to append to a subject (a
/// function name is checked by [`FunctionName`], not by this).
pub fn is_subject_tail(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn to_record(msg: jetstream::message::StreamMessage) -> Record {
    let get = |name: &str| {
        msg.headers
            .get(name)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default()
    };
    Record {
        sequence: msg.sequence,
        time: msg.time,
        function: get(header::FUNCTION),
        reason: get(header::REASON),
        attempts: get(header::ATTEMPTS).parse().unwrap_or(0),
        last_status: get(header::STATUS),
        call_id: get(header::CALL_ID),
        error: get(header::ERROR),
        original_subject: get(header::SUBJECT),
        bytes: msg.payload.len(),
        payload_dropped: msg.headers.get(header::PAYLOAD_DROPPED).is_some(),
        payload: msg.payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
        assert_eq!(Reason::parse("nope"), None);
    }

    /// Pinned values (the published FNV-1a 64 test vectors): a change here would let a
    /// give-up stored by one version be stored again by the next.
    #[test]
    fn payload_hash_is_fnv1a_64() {
        assert_eq!(payload_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(payload_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(payload_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn store_id_is_stream_sequence_and_payload_hash() {
        assert_eq!(
            store_id("OF_faas-request", 7, b"foobar"),
            "OF_faas-request:7:85944171f73967e8"
        );
        assert_ne!(store_id("OF_a", 7, b"x"), store_id("OF_b", 7, b"x"));
        assert_ne!(store_id("OF_a", 7, b"x"), store_id("OF_a", 8, b"x"));
        assert_ne!(store_id("OF_a", 7, b"x"), store_id("OF_a", 7, b"y"));
    }

    #[test]
    fn header_values_are_one_line() {
        assert_eq!(header_value("a\r\nb\tc"), "a  b c");
        assert_eq!(header_value(&"x".repeat(2000)).len(), 512);
    }

    #[test]
    fn time_is_rfc3339() {
        let t = now_rfc3339();
        assert!(
            t.len() >= 20 && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "{t}"
        );
    }
}
