//! `queue-worker queue status` and `queue purge`: what is queued, per function and per
//! consumer, and removing queued jobs while the workers keep running (OpenFaaS's docs need the
//! nats CLI, a stream delete and a rollout restart for the same).

use async_nats::jetstream;
use futures_util::TryStreamExt as _;
use serde::Serialize;
use time::OffsetDateTime;

use super::{human_bytes, plural, print_table, CliError};
use crate::config::Config;
use crate::message::function::FunctionName;

/// Messages of one subject of the stream.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FunctionDepth {
    /// `fn.namespace`; `None` for the shared `<queue>` subject older gateways publish to
    /// (its messages name their function only inside the payload).
    pub function: Option<String>,
    pub subject: String,
    pub messages: u64,
}

/// One consumer's counters.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConsumerStatus {
    pub name: String,
    /// Not yet delivered.
    pub pending: u64,
    /// Delivered and not settled: running now, or waiting for a delayed retry.
    pub ack_pending: u64,
    /// Delivered more than once.
    pub redelivered: u64,
    /// Pull requests waiting for messages (idle capacity of the workers).
    pub waiting: u64,
}

/// Size of the dead-letter stream, when it exists.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeadLetterTotals {
    pub stream: String,
    pub messages: u64,
    pub bytes: u64,
}

/// What `queue status` reports (its `--json` form is this, serialised).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub stream: String,
    pub subjects: Vec<String>,
    pub messages: u64,
    pub bytes: u64,
    /// When the oldest queued message was published.
    #[serde(with = "time::serde::rfc3339::option")]
    pub oldest: Option<OffsetDateTime>,
    pub oldest_age_seconds: Option<f64>,
    /// Deepest first.
    pub functions: Vec<FunctionDepth>,
    pub consumers: Vec<ConsumerStatus>,
    pub dead_letters: Option<DeadLetterTotals>,
}

/// Reads the queue's stream, its per-subject counts and its consumers.
pub async fn status(js: &jetstream::Context, config: &Config) -> Result<Status, CliError> {
    let name = config.stream_name();
    let mut stream = super::stream(js, &name).await?;
    let failed = |e: &dyn std::fmt::Display| CliError::Failed(format!("cannot read {name}: {e}"));
    let info = stream.info().await.map_err(|e| failed(&e))?.clone();
    let mut counts: Vec<(String, usize)> = stream
        .info_with_subjects(">")
        .await
        .map_err(|e| failed(&e))?
        .try_collect()
        .await
        .map_err(|e| failed(&e))?;
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let prefix = format!("{}.", config.queue);
    let functions = counts
        .into_iter()
        .map(|(subject, n)| FunctionDepth {
            function: subject.strip_prefix(&prefix).map(str::to_string),
            subject,
            messages: n as u64,
        })
        .collect();
    let mut consumers: Vec<ConsumerStatus> = stream
        .consumers()
        .map_ok(|c| ConsumerStatus {
            name: c.name,
            pending: c.num_pending,
            ack_pending: c.num_ack_pending as u64,
            redelivered: c.num_redelivered as u64,
            waiting: c.num_waiting as u64,
        })
        .try_collect()
        .await
        .map_err(|e| failed(&e))?;
    consumers.sort_by(|a, b| a.name.cmp(&b.name));
    let dead_letters = match js.get_stream(config.dead_letter_stream_name()).await {
        Ok(mut dl) => dl.info().await.ok().map(|i| DeadLetterTotals {
            stream: i.config.name.clone(),
            messages: i.state.messages,
            bytes: i.state.bytes,
        }),
        Err(_) => None,
    };
    let state = &info.state;
    let oldest = (state.messages > 0).then_some(state.first_timestamp);
    Ok(Status {
        stream: name,
        subjects: info.config.subjects.clone(),
        messages: state.messages,
        bytes: state.bytes,
        oldest,
        oldest_age_seconds: oldest
            .map(|t| (OffsetDateTime::now_utc() - t).as_seconds_f64().max(0.0)),
        functions,
        consumers,
        dead_letters,
    })
}

/// Prints a status for people.
pub fn print_status(s: &Status) {
    let age = s
        .oldest_age_seconds
        .map(|a| {
            format!(
                ", oldest queued {} ago",
                crate::config::duration::format(std::time::Duration::from_secs(a as u64))
            )
        })
        .unwrap_or_default();
    crate::outln!(
        "{}: {} ({}){age}",
        s.stream,
        plural(s.messages, "message", "messages"),
        human_bytes(s.bytes)
    );
    crate::outln!("subjects: {}", s.subjects.join(", "));
    crate::outln!();
    if s.functions.is_empty() {
        crate::outln!("No queued messages.");
    } else {
        let mut rows = vec![vec![
            "FUNCTION".to_string(),
            "QUEUED".into(),
            "SUBJECT".into(),
        ]];
        for f in &s.functions {
            rows.push(vec![
                f.function
                    .clone()
                    .unwrap_or_else(|| "(any, shared subject)".into()),
                f.messages.to_string(),
                f.subject.clone(),
            ]);
        }
        print_table(&rows);
    }
    crate::outln!();
    if s.consumers.is_empty() {
        crate::outln!("No consumers: no worker has started on this queue yet.");
    } else {
        let mut rows = vec![vec![
            "CONSUMER".to_string(),
            "PENDING".into(),
            "ACK PENDING".into(),
            "REDELIVERED".into(),
            "WAITING PULLS".into(),
        ]];
        for c in &s.consumers {
            rows.push(vec![
                c.name.clone(),
                c.pending.to_string(),
                c.ack_pending.to_string(),
                c.redelivered.to_string(),
                c.waiting.to_string(),
            ]);
        }
        print_table(&rows);
    }
    if let Some(d) = &s.dead_letters {
        crate::outln!();
        crate::outln!(
            "{}: {} ({}); see `queue-worker dead list`",
            d.stream,
            plural(d.messages, "entry", "entries"),
            human_bytes(d.bytes)
        );
    }
}

/// What `queue purge` removed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Purged {
    pub stream: String,
    pub function: Option<String>,
    pub purged: u64,
    /// Messages left on the shared `<queue>` subject, which a per-function purge cannot
    /// look into (they name their function only in the payload).
    pub shared_subject_left: u64,
}

/// Removes the queued messages of `function`, or all of them. Messages
/// running now are removed too: their calls finish, and their acks find nothing to settle.
/// Only messages present when the purge starts are removed (see [`purge_through`]).
///
/// One function's messages are deleted one by one rather than with a filtered purge:
/// nats-server 2.9 moves a consumer past *every* message on a filtered purge of a stream
/// (measured: the other functions' messages stayed in the stream but were never delivered
/// again), while 2.15 does not. Deleting by sequence leaves the consumer alone on both.
///
/// Emptying the whole queue needs `yes`; without it the answer is a usage error saying how
/// many messages that would remove.
pub async fn purge(
    js: &jetstream::Context,
    config: &Config,
    function: Option<&FunctionName>,
    yes: bool,
) -> Result<Purged, CliError> {
    let name = config.stream_name();
    let mut stream = super::stream(js, &name).await?;
    let failed = |e: &dyn std::fmt::Display| CliError::Failed(format!("cannot purge {name}: {e}"));
    if function.is_none() && !yes {
        return Err(CliError::Usage(format!(
            "this removes all {} queued in {name}; add --yes to confirm, or --function F",
            plural(stream.cached_info().state.messages, "message", "messages")
        )));
    }
    let Some(function) = function else {
        // The info fetched with the handle is as of the command's start: what is removed.
        let last = stream.cached_info().state.last_sequence;
        let purged = purge_through(&stream, last).await.map_err(|e| failed(&e))?;
        return Ok(Purged {
            stream: name,
            function: None,
            purged,
            shared_subject_left: 0,
        });
    };
    let subject = function.subject(&config.queue);
    let state = stream.info().await.map_err(|e| failed(&e))?.state.clone();
    let mut purged = 0;
    let mut failures = Vec::new();
    let mut seq = state.first_sequence.max(1);
    let mut batch = Vec::with_capacity(PURGE_BATCH);
    loop {
        let found = if seq <= state.last_sequence {
            crate::nats::stream::next_on_subject(&stream, &subject, seq)
                .await
                .map_err(|e| failed(&e))?
                .map(|m| m.sequence)
                .filter(|s| *s <= state.last_sequence)
        } else {
            None
        };
        if let Some(s) = found {
            batch.push(s);
            seq = s + 1;
        }
        if batch.len() >= PURGE_BATCH || (found.is_none() && !batch.is_empty()) {
            let deletes = batch.drain(..).map(|s| {
                let stream = &stream;
                async move { (s, stream.delete_message(s).await) }
            });
            for (s, result) in futures_util::future::join_all(deletes).await {
                match result {
                    Ok(true) => purged += 1,
                    Ok(false) => {}
                    // A message acked meanwhile is already gone: not an error, not counted.
                    Err(e) if already_gone(&e) => {}
                    Err(e) => failures.push(format!("{s}: {e}")),
                }
            }
        }
        if found.is_none() {
            break;
        }
    }
    if !failures.is_empty() {
        return Err(CliError::Failed(format!(
            "purged {purged} message(s) of {subject} from {name}, but {} could not be deleted ({}); run the command again",
            failures.len(),
            failures.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    let mut shared_subject_left = 0;
    let mut subjects = stream
        .info_with_subjects(config.queue.clone())
        .await
        .map_err(|e| failed(&e))?;
    while let Some((s, n)) = subjects.try_next().await.map_err(|e| failed(&e))? {
        if s == config.queue {
            shared_subject_left = n as u64;
        }
    }
    Ok(Purged {
        stream: name,
        function: Some(function.to_string()),
        purged,
        shared_subject_left,
    })
}

/// Removes every message of the work stream up to and including sequence `last` (the last
/// sequence when `queue purge --yes` started); what was published after is kept. Returns how
/// many were removed.
///
/// A sequence purge (`{"seq": last + 1}`: up to, not including) rather than a plain one,
/// which would also take what arrived between the command's start and the request. It has
/// no subject filter, so nats-server 2.9's filtered-purge fault does not apply: consumers
/// move up to `last + 1` only, and later messages are still delivered (tested on 2.9).
pub async fn purge_through(
    stream: &jetstream::stream::Stream,
    last: u64,
) -> Result<u64, jetstream::stream::PurgeError> {
    if last == 0 {
        return Ok(0);
    }
    Ok(stream.purge().sequence(last + 1).await?.purged)
}

/// A delete that failed because the message is no longer there: a worker acked it between
/// finding and deleting it. nats-server answers 10043 (sequence not found) inside the
/// stream, 10057 below its first sequence, 10037 on some versions.
fn already_gone(e: &jetstream::stream::DeleteMessageError) -> bool {
    use jetstream::ErrorCode;
    matches!(
        e.kind(),
        jetstream::stream::DeleteMessageErrorKind::JetStream(j)
            if [
                ErrorCode::SEQUENCE_NOT_FOUND,
                ErrorCode::STREAM_MESSAGE_DELETE_FAILED,
                ErrorCode::NO_MESSAGE_FOUND,
            ]
            .contains(&j.error_code())
    )
}

/// Deletes sent at once by a per-function purge.
const PURGE_BATCH: usize = 128;

/// Prints what a purge did.
pub fn print_purged(p: &Purged) {
    match &p.function {
        Some(f) => crate::outln!(
            "purged {} of {f} from {}",
            plural(p.purged, "message", "messages"),
            p.stream
        ),
        None => crate::outln!(
            "purged {} from {}",
            plural(p.purged, "message", "messages"),
            p.stream
        ),
    }
    if p.shared_subject_left > 0 {
        crate::outln!(
            "note: {} on the shared subject (from older gateways) were left alone; they may include this function",
            plural(p.shared_subject_left, "message", "messages")
        );
    }
}
