//! `queue-worker call cancel|status <call-id>`: the front door's `DELETE` and `GET
//! /async-function/<call-id>` for operators, on the same records (`nats/calls.rs`).

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::cli::{print_table, CliError};
use crate::nats::calls::{CallBook, CancelOutcome, Record, State};

fn unreachable(e: crate::nats::calls::CallsError) -> CliError {
    CliError::NoJetStream(e.to_string())
}

fn unknown(call_id: &str) -> CliError {
    CliError::UnknownCall(format!(
        "no call with id {call_id:?}: unknown, older than call_status_ttl, or the workers run without call_status"
    ))
}

pub async fn cancel(book: &CallBook, call_id: &str, json: bool) -> Result<(), CliError> {
    match book.cancel(call_id).await.map_err(unreachable)? {
        CancelOutcome::Accepted { found, record } => {
            if json {
                crate::outln!(
                    "{}",
                    serde_json::json!({"call_id": call_id, "result": "accepted", "state": found, "call": record})
                );
            } else {
                match found {
                    Some(found) => crate::outln!(
                        "cancelled {call_id} (last recorded {}{})",
                        found.as_str(),
                        match found {
                            State::Running => ": its request is dropped by the replica running it",
                            State::Cancelled => ": it was cancelled already",
                            // A call that started less than 100 ms ago is still recorded as
                            // queued or waiting; it is dropped like a running one.
                            _ => ": it will not run, or is dropped if it just started",
                        }
                    ),
                    None => crate::outln!(
                        "cancel of {call_id} recorded: it will not run if it is still queued, and is stopped if running (call_status is off, so an unknown or finished id is not reported)"
                    ),
                }
            }
            Ok(())
        }
        CancelOutcome::Unknown => Err(unknown(call_id)),
        CancelOutcome::Finished(r) => Err(CliError::CallEnded(format!(
            "call {call_id} already ended: {}{}",
            r.state.as_str(),
            r.finished_at
                .and_then(|t| t.format(&Rfc3339).ok())
                .map(|t| format!(" at {t}"))
                .unwrap_or_default()
        ))),
    }
}

pub async fn status(book: &CallBook, call_id: &str, json: bool) -> Result<(), CliError> {
    let Some(record) = book.status(call_id).await.map_err(unreachable)? else {
        return Err(unknown(call_id));
    };
    if json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&record).unwrap_or_default()
        );
    } else {
        print_table(&rows(&record));
    }
    Ok(())
}

/// The record as `field  value` rows, only the fields it has.
fn rows(r: &Record) -> Vec<Vec<String>> {
    let time = |t: Option<OffsetDateTime>| t.and_then(|t| t.format(&Rfc3339).ok());
    let mut rows = vec![
        vec!["call id".into(), r.call_id.clone()],
        vec!["state".into(), r.state.as_str().into()],
        vec!["function".into(), r.function.clone()],
        vec!["queue".into(), r.queue.clone()],
    ];
    let mut add = |name: &str, v: Option<String>| {
        if let Some(v) = v {
            rows.push(vec![name.into(), v]);
        }
    };
    add(
        "attempt",
        r.attempt.map(|a| match r.max_attempts {
            Some(m) => format!("{a} of {m}"),
            None => a.to_string(),
        }),
    );
    add("status", r.status.map(|s| s.to_string()));
    add("duration", r.duration_seconds.map(|d| format!("{d:.3}s")));
    add("reason", r.reason.clone());
    add("queued at", time(Some(r.queued_at)));
    add("not before", time(r.not_before));
    add("started at", time(r.started_at));
    add("next attempt at", time(r.next_attempt_at));
    add("finished at", time(r.finished_at));
    add("updated at", time(Some(r.updated_at)));
    rows
}
