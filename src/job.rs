//! ② A delivered message: its JetStream handle (for acks and the delivery count) and the
//! decoded invocation. [`Job::settle`] is the only place a [`Settle`] becomes a JetStream ack,
//! so the meaning of every outcome is written down once.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};

use crate::request::QueueRequest;
use crate::retry::Decision;

/// What to tell JetStream about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Finished: remove it from the work queue.
    Ack,
    /// Redeliver after the delay (`None`: at once). Survives restarts, unlike a local sleep.
    Nak(Option<Duration>),
    /// Never redeliver (undecodable).
    Term,
}

impl From<Decision> for Settle {
    fn from(d: Decision) -> Settle {
        match d {
            Decision::Ack => Settle::Ack,
            Decision::Retry { after } => Settle::Nak(Some(after)),
            // The dead-letter stream is a later step; until then a give-up is logged, counted
            // and acknowledged, as OpenFaaS's worker "discards" it.
            Decision::GiveUp { .. } => Settle::Ack,
        }
    }
}

/// A message as delivered, before or after decoding.
pub struct Job {
    message: jetstream::Message,
    /// The JetStream delivery count: 1 for the first try. It is the attempt number, so no
    /// attempt state lives in the worker.
    pub attempt: u32,
    pub stream_sequence: u64,
    /// When this replica received the message; durations in callbacks count from here.
    pub received: Instant,
}

impl Job {
    /// Wraps a JetStream message. `None` when it has no ack metadata (not from a consumer).
    pub fn new(message: jetstream::Message) -> Option<Job> {
        let info = message.info().ok()?;
        let attempt = u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX);
        let stream_sequence = info.stream_sequence;
        Some(Job {
            message,
            attempt,
            stream_sequence,
            received: Instant::now(),
        })
    }

    pub fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    /// Renews the lease (`+WPI`) so a long call is not redelivered to another replica.
    pub async fn progress(&self) {
        if let Err(e) = self.message.ack_with(AckKind::Progress).await {
            tracing::debug!(error = %e, "in-progress ack not sent");
        }
    }

    /// Settles the message. Acks are published without waiting for the server's reply, so a
    /// settle never stalls the next dispatch; a lost ack means a redelivery (at-least-once),
    /// never a lost message.
    pub async fn settle(&self, settle: Settle) {
        let kind = match settle {
            Settle::Ack => AckKind::Ack,
            Settle::Nak(delay) => AckKind::Nak(delay),
            Settle::Term => AckKind::Term,
        };
        if let Err(e) = self.message.ack_with(kind).await {
            tracing::warn!(error = %e, seq = self.stream_sequence, "could not settle message; it will be redelivered after ack_wait");
        }
    }
}

/// Why a message cannot be run. Each becomes a `reason` label, so the set is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a QueueRequest: {0}")]
    Malformed(String),
    #[error("no Function in the message")]
    MissingFunction,
    #[error("invalid function name {0:?}: allowed are letters, digits, '-', '_' and '.'")]
    BadFunction(String),
    #[error("the function URL cannot be formed: {0}")]
    BadUrl(String),
}

impl DecodeError {
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Malformed(_) => "malformed",
            DecodeError::MissingFunction => "missing_function",
            DecodeError::BadFunction(_) => "bad_function",
            DecodeError::BadUrl(_) => "bad_url",
        }
    }
}

/// A decoded invocation, ready to call.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub request: QueueRequest,
    /// `<gateway>/function/<Function><Path>?<QueryString>`.
    pub url: String,
    pub call_id: String,
    /// `<fn>.<ns>`, the `function_name` label OpenFaaS's autoscaler joins on.
    pub function_label: String,
    pub callback: Option<url::Url>,
}

/// Decodes and validates a payload. `gateway` is the gateway base URL without a trailing `/`.
pub fn decode(payload: &[u8], gateway: &str, default_ns: &str) -> Result<Invocation, DecodeError> {
    let mut request: QueueRequest =
        serde_json::from_slice(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let function = request.function.trim();
    if function.is_empty() {
        return Err(DecodeError::MissingFunction);
    }
    if !function
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || function.starts_with('.')
        || function.ends_with('.')
    {
        return Err(DecodeError::BadFunction(request.function.clone()));
    }
    let path = request.path.as_str();
    if !(path.is_empty() || path.starts_with('/'))
        || path.contains(['?', '#'])
        || path.chars().any(|c| c.is_control() || c == ' ')
    {
        return Err(DecodeError::BadUrl(format!("Path {path:?}")));
    }
    if request.query_string.contains('#') || request.query_string.chars().any(char::is_control) {
        return Err(DecodeError::BadUrl(format!(
            "QueryString {:?}",
            request.query_string
        )));
    }
    let mut url = String::with_capacity(
        gateway.len() + 10 + function.len() + path.len() + request.query_string.len() + 1,
    );
    url.push_str(gateway);
    url.push_str("/function/");
    url.push_str(function);
    url.push_str(path);
    if !request.query_string.is_empty() {
        url.push('?');
        url.push_str(&request.query_string);
    }
    let function_label = if function.contains('.') {
        function.to_string()
    } else {
        format!("{function}.{default_ns}")
    };

    let callback = match request
        .callback_url
        .clone()
        .or_else(|| request.header_value("X-Callback-Url").map(str::to_string))
    {
        None => None,
        Some(raw) => match url::Url::parse(&raw) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => Some(u),
            _ => {
                tracing::warn!(function = %request.function, callback = %raw, "ignoring callback URL that is not http(s)");
                None
            }
        },
    };

    let call_id = match request.header_value("X-Call-Id") {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => {
            // The gateway always sets one; other publishers may not. Make one up so logs,
            // the function and the callback all see the same id.
            let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
            request.append_header("X-Call-Id", id.clone());
            id
        }
    };

    Ok(Invocation {
        request,
        url,
        call_id,
        function_label,
        callback,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: &str = "http://gw:8080";

    fn msg(json: &str) -> Result<Invocation, DecodeError> {
        decode(json.as_bytes(), GW, "openfaas-fn")
    }

    #[test]
    fn builds_the_function_url() {
        let inv = msg(r#"{"Function":"echo","Path":"/a/b","QueryString":"x=1&y=2","Header":{"X-Call-Id":["c1"]}}"#).unwrap();
        assert_eq!(inv.url, "http://gw:8080/function/echo/a/b?x=1&y=2");
        assert_eq!(inv.call_id, "c1");
        assert_eq!(inv.function_label, "echo.openfaas-fn");
        let inv = msg(r#"{"Function":"echo.team-a"}"#).unwrap();
        assert_eq!(inv.url, "http://gw:8080/function/echo.team-a");
        assert_eq!(inv.function_label, "echo.team-a");
        assert_eq!(
            inv.request.header_value("X-Call-Id"),
            Some(inv.call_id.as_str())
        );
    }

    #[test]
    fn decode_errors_have_reasons() {
        let cases = [
            ("not json", "malformed"),
            (r#"{"Function":5}"#, "malformed"),
            (r#"{"Method":"POST"}"#, "missing_function"),
            (r#"{"Function":"../etc"}"#, "bad_function"),
            (r#"{"Function":"a b"}"#, "bad_function"),
            (r#"{"Function":"f","Path":"nope"}"#, "bad_url"),
            (r#"{"Function":"f","Path":"/a b"}"#, "bad_url"),
        ];
        for (json, reason) in cases {
            assert_eq!(msg(json).unwrap_err().reason(), reason, "{json}");
        }
    }

    #[test]
    fn callback_falls_back_to_the_header() {
        let inv = msg(r#"{"Function":"f","Header":{"X-Callback-Url":["http://cb/x"]}}"#).unwrap();
        assert_eq!(inv.callback.unwrap().as_str(), "http://cb/x");
        let inv = msg(r#"{"Function":"f","CallbackUrl":"ftp://cb/x"}"#).unwrap();
        assert!(inv.callback.is_none());
    }
}
