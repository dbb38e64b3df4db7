//! `DELETE /async-function/<call-id>` (cancel) and `GET /async-function/<call-id>` (status),
//! answered from the call records of `nats/calls.rs`.
//!
//! Cancel: 202 when the call was queued, waiting to retry or running (or already
//! cancelled: a repeated cancel is not an error); 404 when no call has that id; 409 when it
//! already ended. Without `call_status` nothing records which ids exist or ended, so every
//! well-formed id is accepted (202) and cancelled if it is still queued or running.
//! Status: 200 with the record as JSON, 404 when unknown, 501 when `call_status` is off.
//! NATS trouble is a 503 (nothing was cancelled; try again).

use axum::http::{HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{check_call_id, Door};
use crate::nats::calls::{CancelOutcome, Record};

/// The call id of `/async-function/<call-id>`, percent-decoded; `None` when it is not one
/// the front door would accept.
fn call_id(uri: &Uri) -> Option<String> {
    let raw = uri.path().strip_prefix("/async-function/")?;
    let id = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?
        .into_owned();
    (!id.is_empty() && check_call_id(&id).is_ok()).then_some(id)
}

fn bad_id(door: &Door, op: &str) -> Response {
    door.metrics.call_request(op, "bad_request");
    answer(
        StatusCode::BAD_REQUEST,
        None,
        json!({"error": format!("expected /async-function/<call-id> with a call id of at most {} visible ASCII characters", super::MAX_CALL_ID)}),
    )
}

fn answer(status: StatusCode, call_id: Option<&str>, body: serde_json::Value) -> Response {
    let mut body = serde_json::to_vec_pretty(&body).unwrap_or_default();
    body.push(b'\n');
    let mut response = (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    if let Some(v) = call_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        response.headers_mut().insert("x-call-id", v);
    }
    response
}

fn record_json(record: &Record) -> serde_json::Value {
    serde_json::to_value(record).unwrap_or_default()
}

pub(super) async fn cancel(door: &Door, uri: &Uri) -> Response {
    let Some(id) = call_id(uri) else {
        return bad_id(door, "cancel");
    };
    let (status, result, body) = match door.calls.cancel(&id).await {
        Ok(CancelOutcome::Accepted { found, record }) => {
            tracing::info!(callId = %id, found = found.map(|s| s.as_str()), "Cancel accepted");
            let mut body = json!({"call_id": id, "result": "accepted"});
            if let (Some(found), Some(r)) = (found, record) {
                // The state the cancel found the call in; `call` is its record now.
                body["state"] = json!(found);
                body["call"] = record_json(&r);
            } else {
                body["note"] = json!("call_status is off: the call is cancelled if it is still queued or running; an unknown or finished id is not reported");
            }
            (StatusCode::ACCEPTED, "accepted", body)
        }
        Ok(CancelOutcome::Unknown) => (
            StatusCode::NOT_FOUND,
            "unknown",
            json!({"call_id": id, "error": "no call with this id (or its record is older than call_status_ttl)", "note": "the cancel is kept all the same: a call queued without a record (by the OpenFaaS gateway or queue-worker publish) will not run"}),
        ),
        Ok(CancelOutcome::Finished(r)) => (
            StatusCode::CONFLICT,
            "finished",
            json!({"call_id": id, "error": format!("the call already ended: {}", r.state.as_str()), "state": r.state, "call": record_json(&r)}),
        ),
        Err(e) => {
            tracing::warn!(callId = %id, error = %e, "cannot cancel: NATS did not answer");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "error",
                json!({"call_id": id, "error": format!("cannot reach the call records ({e}); nothing was cancelled, try again")}),
            )
        }
    };
    door.metrics.call_request("cancel", result);
    answer(status, Some(&id), body)
}

pub(super) async fn status(door: &Door, uri: &Uri) -> Response {
    let Some(id) = call_id(uri) else {
        return bad_id(door, "status");
    };
    if !door.config.calls.status {
        door.metrics.call_request("status", "off");
        return answer(
            StatusCode::NOT_IMPLEMENTED,
            Some(&id),
            json!({"call_id": id, "error": "call status is off (set call_status=true on the front door and the workers)"}),
        );
    }
    let (status, result, body) = match door.calls.status(&id).await {
        Ok(Some(r)) => (StatusCode::OK, "found", record_json(&r)),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            "unknown",
            json!({"call_id": id, "error": "no call with this id (or its record is older than call_status_ttl)"}),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "error",
            json!({"call_id": id, "error": format!("cannot reach the call records ({e}); try again")}),
        ),
    };
    door.metrics.call_request("status", result);
    answer(status, Some(&id), body)
}
