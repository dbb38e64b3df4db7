//! Call records by call id, kept in JetStream: the KV bucket `OF_<queue>-calls` (stream
//! `KV_OF_<queue>-calls`), one per queue, created like the work and dead-letter streams.
//!
//! Two kinds of keys, one value each (history 1):
//! - `c.<key>`: a cancel. Written by the front door or `queue-worker call cancel`; every
//!   worker replica watches `c.>` and keeps the ids in memory (a cache of the bucket, rebuilt
//!   from it at each start), so a cancel reaches whichever replica runs the call, costs no
//!   round trip per job, and survives restarts of every process.
//! - `s.<key>`: a call's [`Record`] (only with `call_status`): written by the front door when
//!   it stores the call, by the worker when a call starts, waits to retry and ends. Each write
//!   is the whole record from what the writer knows, so no write needs a read first.
//!
//! The bucket's `max_age` (`call_status_ttl`) and `max_bytes` bound it; when full the oldest
//! records go (discard old), so recording never blocks the work. A key is the call id when it
//! is made of letters, digits, `-` and `_` (UUIDs, the usual ids), else `=` and its hex
//! bytes, so every id the front door accepts (visible ASCII) is a valid key and the mapping
//! can be undone.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, response::Response, stream};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;

use crate::nats::stream::{unavailable, LayoutError};

/// What became of a call. `Queued` and `Waiting` may still be cancelled before they run;
/// the last four are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Queued,
    Running,
    /// A retry is scheduled (`attempt` made, `next_attempt_at` set).
    Waiting,
    Succeeded,
    /// Dead-lettered (`reason` says why).
    Failed,
    Cancelled,
    Expired,
}

impl State {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            State::Succeeded | State::Failed | State::Cancelled | State::Expired
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Waiting => "waiting",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
            State::Expired => "expired",
        }
    }
}

/// One call's state, as stored under `s.<key>` and answered by `GET /async-function/<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub call_id: String,
    pub state: State,
    /// `fn.namespace`.
    pub function: String,
    pub queue: String,
    /// The message's sequence in `OF_<queue>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Attempts made so far (the one running included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(with = "time::serde::rfc3339")]
    pub queued_at: OffsetDateTime,
    /// A delayed call's start time (`X-Not-Before`), on its `queued` record.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_before: Option<OffsetDateTime>,
    /// When the latest attempt started.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub started_at: Option<OffsetDateTime>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub next_attempt_at: Option<OffsetDateTime>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub finished_at: Option<OffsetDateTime>,
    /// The function's last HTTP status (0 when it never answered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// How long the last attempt took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// Why it failed (the dead-letter reason), or where a cancel found it (`queued`,
    /// `running`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl Record {
    /// A record in `state` with only what every writer knows.
    pub fn new(call_id: &str, state: State, function: &str, queue: &str) -> Record {
        let now = OffsetDateTime::now_utc();
        Record {
            call_id: call_id.to_string(),
            state,
            function: function.to_string(),
            queue: queue.to_string(),
            seq: None,
            attempt: None,
            max_attempts: None,
            queued_at: now,
            not_before: None,
            started_at: None,
            next_attempt_at: None,
            finished_at: None,
            status: None,
            duration_seconds: None,
            reason: None,
            updated_at: now,
        }
    }
}

/// The bucket name of a queue's call records.
pub fn bucket_name(queue: &str) -> String {
    format!("OF_{queue}-calls")
}

/// Longest key kept readable; a longer one (an id of over ~100 unusual bytes, which the
/// OpenFaaS gateway passes through) becomes a 128-bit hash, so a subject never nears the
/// server's 4 KiB control line.
const MAX_KEY: usize = 200;

/// The key of a call id (see the module doc): the id itself when it is plain, else `=` and
/// its bytes in hex, or `==` and a 128-bit hash of it when that would be over [`MAX_KEY`].
pub fn key_of(call_id: &str) -> std::borrow::Cow<'_, str> {
    use crate::message::fingerprint::Fnv1a;
    let plain = !call_id.is_empty()
        && call_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain && call_id.len() <= MAX_KEY {
        return std::borrow::Cow::Borrowed(call_id);
    }
    if 1 + 2 * call_id.len() > MAX_KEY {
        let a = Fnv1a::default()
            .part(b"call-key-a")
            .part(call_id.as_bytes())
            .finish();
        let b = Fnv1a::default()
            .part(b"call-key-b")
            .part(call_id.as_bytes())
            .finish();
        return std::borrow::Cow::Owned(format!("=={a:016x}{b:016x}"));
    }
    let mut k = String::with_capacity(1 + 2 * call_id.len());
    k.push('=');
    for b in call_id.bytes() {
        k.push_str(&format!("{b:02x}"));
    }
    std::borrow::Cow::Owned(k)
}

/// The call id of a key made by [`key_of`]; `None` for a key it cannot have made or that
/// is a hash.
pub fn id_of(key: &str) -> Option<String> {
    if key.starts_with("==") {
        return None;
    }
    match key.strip_prefix('=') {
        None => Some(key.to_string()).filter(|k| !k.is_empty()),
        Some(hex) => {
            if hex.len() % 2 != 0 {
                return None;
            }
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()?;
            String::from_utf8(bytes).ok()
        }
    }
}

/// `s.<key>`: where a call's record lives.
pub fn status_key(call_id: &str) -> String {
    format!("s.{}", key_of(call_id))
}

/// `c.<key>`: where a call's cancel lives.
pub fn cancel_key(call_id: &str) -> String {
    format!("c.{}", key_of(call_id))
}

/// The bucket of one queue, as configured.
#[derive(Debug, Clone)]
pub struct CallsLayout {
    pub bucket: String,
    pub replicas: usize,
    pub ttl: Duration,
    pub max_bytes: u64,
}

impl CallsLayout {
    pub fn of(config: &crate::config::Config, queue: &str) -> CallsLayout {
        CallsLayout {
            bucket: bucket_name(queue),
            replicas: config.stream_replicas,
            ttl: config.calls.ttl,
            max_bytes: config.calls.max_bytes,
        }
    }

    pub fn stream(&self) -> String {
        format!("KV_{}", self.bucket)
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream(),
            subjects: vec![format!("$KV.{}.>", self.bucket)],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            max_age: self.ttl,
            max_bytes: i64::try_from(self.max_bytes).unwrap_or(i64::MAX),
            // A full bucket drops its oldest records rather than refuse new ones: a status
            // write must never hold up the work, nor a cancel fail for old records.
            discard: stream::DiscardPolicy::Old,
            max_messages_per_subject: 1,
            max_messages: -1,
            max_message_size: -1,
            max_consumers: -1,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            duplicate_window: Duration::from_secs(120).min(self.ttl),
            description: Some("queue-worker call records (cancels, status) of OF_ queue".into()),
            ..Default::default()
        }
    }
}

/// Makes sure the bucket exists, bringing an existing one to the configured `max_age` and
/// `max_bytes`, and opens it.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    layout: &CallsLayout,
) -> Result<kv::Store, LayoutError> {
    let wanted = layout.stream_config();
    let resp: Response<stream::Info> = js
        .request(format!("STREAM.INFO.{}", layout.stream()), &json!({}))
        .await
        .map_err(unavailable)?;
    match resp {
        Response::Ok(info) => {
            let cfg = &info.config;
            if cfg.max_age != wanted.max_age || cfg.max_bytes != wanted.max_bytes {
                let mut updated = cfg.clone();
                updated.max_age = wanted.max_age;
                updated.max_bytes = wanted.max_bytes;
                updated.duplicate_window = wanted.duplicate_window;
                let resp: Response<stream::Info> = js
                    .request(format!("STREAM.UPDATE.{}", layout.stream()), &updated)
                    .await
                    .map_err(unavailable)?;
                match resp {
                    Response::Ok(_) => {
                        tracing::info!(bucket = %layout.bucket, ttl = ?layout.ttl, max_bytes = layout.max_bytes, "Updated call records bucket")
                    }
                    Response::Err { error } => {
                        tracing::warn!(bucket = %layout.bucket, error = %error, "could not apply call_status_ttl / call_status_max_bytes to the existing bucket; using it as it is")
                    }
                }
            }
        }
        Response::Err { error } if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {
            create_bucket(js, wanted).await?
        }
        Response::Err { error } => return Err(unavailable(error)),
    }
    js.get_key_value(layout.bucket.clone())
        .await
        .map_err(unavailable)
}

async fn create_bucket(js: &jetstream::Context, wanted: stream::Config) -> Result<(), LayoutError> {
    let names = crate::nats::stream::Capped {
        what: "call records bucket",
        max_bytes_key: "call_status_max_bytes",
        max_age_key: "call_status_ttl",
    };
    // `None`: another process created it first, which is as good.
    crate::nats::stream::create_capped(js, wanted, names)
        .await
        .map(|_| ())
}

/// Reading or writing a record failed (NATS trouble); the caller answers 503 / exits 3.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CallsError(pub String);

fn failed(e: impl std::fmt::Display) -> CallsError {
    CallsError(e.to_string())
}

/// What a cancel found.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// Queued, waiting to retry or running (or already cancelled): it will not run, or is
    /// being stopped. `found` is the state the cancel found it in, `record` the record as it
    /// is now; both `None` when there is no record to tell (without `call_status`).
    Accepted {
        found: Option<State>,
        record: Option<Record>,
    },
    /// No record of that id (only with `call_status`).
    Unknown,
    /// It already ended (succeeded, failed or expired).
    Finished(Record),
}

/// The call records of every queue, for the front door and the `call` commands: a call id
/// does not say its queue, so each bucket is asked (the configured queues first, then those
/// found in JetStream, listed at most every few seconds).
pub struct CallBook {
    js: jetstream::Context,
    config: crate::config::Config,
    stores: tokio::sync::Mutex<HashMap<String, kv::Store>>,
    listed: Mutex<Option<(Instant, Vec<String>)>>,
}

/// How long a listing of the buckets is reused.
const LISTING_TTL: Duration = Duration::from_secs(5);

impl CallBook {
    pub fn new(js: jetstream::Context, config: crate::config::Config) -> CallBook {
        CallBook {
            js,
            config,
            stores: tokio::sync::Mutex::new(HashMap::new()),
            listed: Mutex::new(None),
        }
    }

    /// The bucket of `queue`, set up (once per process) if needed.
    pub async fn store(&self, queue: &str) -> Result<kv::Store, CallsError> {
        let mut stores = self.stores.lock().await;
        if let Some(s) = stores.get(queue) {
            return Ok(s.clone());
        }
        let store = ensure_bucket(&self.js, &CallsLayout::of(&self.config, queue))
            .await
            .map_err(failed)?;
        stores.insert(queue.to_string(), store.clone());
        Ok(store)
    }

    /// Queues whose bucket may hold `call_id`: the configured ones, then every other
    /// `KV_OF_<queue>-calls` stream.
    async fn queues(&self) -> Result<Vec<String>, CallsError> {
        let mut queues = vec![self.config.queue.clone()];
        queues.extend(self.config.frontdoor.queues.values().cloned());
        let cached = self
            .listed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|(at, _)| at.elapsed() < LISTING_TTL)
            .map(|(_, q)| q.clone());
        let listed = match cached {
            Some(q) => q,
            None => {
                let q = self.list().await?;
                *self.listed.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((Instant::now(), q.clone()));
                q
            }
        };
        queues.extend(listed);
        let mut seen = std::collections::HashSet::new();
        queues.retain(|q| seen.insert(q.clone()));
        Ok(queues)
    }

    /// The queues that have a call records bucket.
    async fn list(&self) -> Result<Vec<String>, CallsError> {
        #[derive(Deserialize)]
        struct Names {
            #[serde(default)]
            streams: Option<Vec<String>>,
            total: usize,
            limit: usize,
        }
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let resp: Response<Names> = self
                .js
                .request("STREAM.NAMES".to_string(), &json!({ "offset": offset }))
                .await
                .map_err(failed)?;
            let names = match resp {
                Response::Ok(n) => n,
                Response::Err { error } => return Err(failed(error)),
            };
            let page = names.streams.unwrap_or_default();
            offset += page.len();
            out.extend(page.iter().filter_map(|s| {
                s.strip_prefix("KV_OF_")?
                    .strip_suffix("-calls")
                    .map(str::to_string)
            }));
            if page.is_empty() || offset >= names.total || names.limit == 0 {
                return Ok(out);
            }
        }
    }

    /// The record of `call_id` and its revision, from the first bucket that has one.
    pub async fn find(
        &self,
        call_id: &str,
    ) -> Result<Option<(kv::Store, Record, u64)>, CallsError> {
        let key = status_key(call_id);
        for queue in self.queues().await? {
            let store = match self.existing(&queue).await? {
                Some(s) => s,
                None => continue,
            };
            if let Some(entry) = store.entry(key.clone()).await.map_err(failed)? {
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                match serde_json::from_slice::<Record>(&entry.value) {
                    Ok(record) => return Ok(Some((store, record, entry.revision))),
                    Err(e) => {
                        tracing::warn!(bucket = %bucket_name(&queue), key, error = %e, "unreadable call record; ignoring it")
                    }
                }
            }
        }
        Ok(None)
    }

    /// The bucket of `queue` if it exists (never created here: a status lookup must not
    /// make buckets for queues that have none).
    async fn existing(&self, queue: &str) -> Result<Option<kv::Store>, CallsError> {
        if let Some(s) = self.stores.lock().await.get(queue) {
            return Ok(Some(s.clone()));
        }
        let resp: Response<stream::Info> = self
            .js
            .request(format!("STREAM.INFO.KV_{}", bucket_name(queue)), &json!({}))
            .await
            .map_err(failed)?;
        match resp {
            Response::Ok(_) => {}
            Response::Err { error }
                if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                return Ok(None)
            }
            Response::Err { error } => return Err(failed(error)),
        }
        let store = self
            .js
            .get_key_value(bucket_name(queue))
            .await
            .map_err(failed)?;
        self.stores
            .lock()
            .await
            .insert(queue.to_string(), store.clone());
        Ok(Some(store))
    }

    /// `GET /async-function/<id>`, `queue-worker call status`.
    pub async fn status(&self, call_id: &str) -> Result<Option<Record>, CallsError> {
        Ok(self.find(call_id).await?.map(|(_, r, _)| r))
    }

    /// Cancels `call_id`. A record, when there is one, decides the answer; the cancel is
    /// written to the record's bucket, and a call not yet running is marked cancelled at
    /// once (only if no worker wrote in between). Without a record the cancel goes to every
    /// queue's bucket; the id is then unknown with `call_status`, and accepted without it
    /// (nothing records which ids exist or ended).
    pub async fn cancel(&self, call_id: &str) -> Result<CancelOutcome, CallsError> {
        let cancel = Bytes::from(
            serde_json::to_vec(&json!({
                "call_id": call_id,
                "cancelled_at": OffsetDateTime::now_utc()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            }))
            .unwrap_or_default(),
        );
        let Some((store, mut record, revision)) = self.find(call_id).await? else {
            // No record: the cancel goes to every queue's bucket all the same, since a call
            // put on the queue by a publisher that records nothing (the OpenFaaS gateway,
            // `queue-worker publish`) has none until a worker starts it.
            for queue in self.queues().await? {
                let store = self.store(&queue).await?;
                store
                    .put(cancel_key(call_id), cancel.clone())
                    .await
                    .map_err(failed)?;
            }
            if self.config.calls.status {
                return Ok(CancelOutcome::Unknown);
            }
            return Ok(CancelOutcome::Accepted {
                found: None,
                record: None,
            });
        };
        match record.state {
            State::Succeeded | State::Failed | State::Expired => {
                return Ok(CancelOutcome::Finished(record))
            }
            State::Cancelled => {
                return Ok(CancelOutcome::Accepted {
                    found: Some(State::Cancelled),
                    record: Some(record),
                })
            }
            State::Queued | State::Running | State::Waiting => {}
        }
        store
            .put(cancel_key(call_id), cancel)
            .await
            .map_err(failed)?;
        let found = record.state;
        if matches!(found, State::Queued | State::Waiting) {
            // No worker holds it: say so now. If a worker wrote meanwhile (it started the
            // call), its own record wins, and it writes `cancelled` when it stops the call.
            let was = record.state;
            record.state = State::Cancelled;
            record.reason = Some(was.as_str().to_string());
            record.next_attempt_at = None;
            record.finished_at = Some(OffsetDateTime::now_utc());
            record.updated_at = OffsetDateTime::now_utc();
            let value = Bytes::from(serde_json::to_vec(&record).map_err(failed)?);
            match store.update(status_key(call_id), value, revision).await {
                Ok(_) => {}
                // A worker wrote in between: what it wrote decides (it may have finished).
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    record = match self.find(call_id).await? {
                        Some((_, now, _)) => now,
                        None => {
                            record.state = was;
                            record
                        }
                    };
                    if matches!(
                        record.state,
                        State::Succeeded | State::Failed | State::Expired
                    ) {
                        return Ok(CancelOutcome::Finished(record));
                    }
                }
                Err(e) => return Err(failed(e)),
            }
        }
        Ok(CancelOutcome::Accepted {
            found: Some(found),
            record: Some(record),
        })
    }

    /// Records a call the front door (or `publish`) just stored, unless a worker already
    /// wrote (it may start the call before this write lands).
    pub async fn queued(&self, record: &Record) -> Result<(), CallsError> {
        let store = self.store(&record.queue).await?;
        let value = Bytes::from(serde_json::to_vec(record).map_err(failed)?);
        match store
            .create(status_key(&record.call_id), value.clone())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                // An older call with the same id (ended) is replaced; a worker's record of
                // this call (same or later sequence) is kept.
                let Some(entry) = store
                    .entry(status_key(&record.call_id))
                    .await
                    .map_err(failed)?
                else {
                    return Ok(());
                };
                let older = serde_json::from_slice::<Record>(&entry.value)
                    .map(|r| r.seq < record.seq && r.state.is_final())
                    .unwrap_or(true);
                if older {
                    match store
                        .update(status_key(&record.call_id), value, entry.revision)
                        .await
                    {
                        Ok(_) => {}
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                        Err(e) => return Err(failed(e)),
                    }
                }
                Ok(())
            }
            Err(e) => Err(failed(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_and_undone() {
        for id in [
            "7f1c2c2b-1e1a-4b8f-a2d6-4e0f1b0e9c11",
            "plain_id-1",
            "a.b",
            "with space",
            "=x",
            "slash/and:colon",
            "..",
            "*>",
        ] {
            let key = key_of(id);
            assert!(
                key.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)),
                "{key}"
            );
            assert_eq!(id_of(&key).as_deref(), Some(id), "{id}");
        }
        assert_eq!(key_of("abc-1_2"), "abc-1_2");
        let long = "é".repeat(300);
        let hashed = key_of(&long);
        assert!(hashed.starts_with("==") && hashed.len() == 34, "{hashed}");
        assert_ne!(hashed, key_of(&"é".repeat(301)));
        assert_eq!(id_of(&hashed), None);
        assert_eq!(key_of("a.b"), "=612e62");
        assert_eq!(id_of("=6"), None);
        assert_eq!(id_of("=zz"), None);
        assert_eq!(id_of(""), None);
    }

    #[test]
    fn records_round_trip_and_skip_empty_fields() {
        let mut r = Record::new("id", State::Waiting, "f.openfaas-fn", "faas-request");
        r.attempt = Some(2);
        r.next_attempt_at = Some(r.queued_at + Duration::from_secs(10));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""state":"waiting""#), "{json}");
        assert!(!json.contains("finished_at"), "{json}");
        let back: Record = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert!(State::Expired.is_final() && !State::Waiting.is_final());
    }
}
