//! ② A delivered message: its JetStream handle (for acks and the delivery count) and the
//! decoded invocation. [`Job::settle`] is the only place a [`Settle`] becomes a JetStream ack,
//! so the meaning of every outcome is written down once.

use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, AckKind};

use crate::message::function::{FunctionName, FunctionNameError};
use crate::message::request::QueueRequest;
use crate::worker::deadletter::Reason;

/// What to tell JetStream about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Finished: remove it from the work queue.
    Ack,
    /// Redeliver after the delay (`None`: at once). Survives restarts, unlike a local sleep.
    Nak(Option<Duration>),
    /// Never redeliver: given up, and already stored in the dead-letter stream.
    Term,
}

/// A message as delivered, before or after decoding.
pub struct Job {
    message: jetstream::Message,
    /// The attempt number: JetStream's delivery count (1 for the first try), so no attempt
    /// state lives in the worker. The flow lowers it by one for a call whose first delivery
    /// was deferred to its start time (`timing::attempt`).
    pub attempt: u32,
    /// JetStream's delivery count, as delivered.
    pub delivered: u32,
    pub stream_sequence: u64,
    /// When the message was stored in the stream (the server's clock): a call's age counts
    /// from here, or from its start time.
    pub published: SystemTime,
    /// When this replica received the message; durations in callbacks count from here.
    pub received: Instant,
}

impl Job {
    /// Wraps a JetStream message. `None` when it has no ack metadata (not from a consumer).
    pub fn new(message: jetstream::Message) -> Option<Job> {
        let info = message.info().ok()?;
        let attempt = u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX);
        let stream_sequence = info.stream_sequence;
        let published = SystemTime::from(info.published);
        Some(Job {
            message,
            attempt,
            delivered: attempt,
            stream_sequence,
            published,
            received: Instant::now(),
        })
    }

    pub fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    /// The payload as a shared buffer (no copy), for the dead-letter stream.
    pub fn payload_bytes(&self) -> bytes::Bytes {
        self.message.payload.clone()
    }

    /// The work-queue subject the message was published on.
    pub fn subject(&self) -> &str {
        self.message.subject.as_str()
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

/// Why a message cannot be run. Each becomes a `reason` label (see
/// [`Reason`]), so the set is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {size} bytes is larger than max_message_bytes ({max})")]
    TooLarge { size: usize, max: usize },
    #[error("not a QueueRequest: {0}")]
    Malformed(String),
    #[error("no Function in the message")]
    MissingFunction,
    #[error(
        "invalid function name {0:?}: expected fn or fn.namespace of letters, digits, '-' and '_'"
    )]
    BadFunction(String),
    #[error("the function URL cannot be formed: {0}")]
    BadUrl(String),
}

impl DecodeError {
    /// The dead-letter reason and metric label.
    pub fn reason(&self) -> &'static str {
        Reason::from(self).as_str()
    }
}

/// The one mapping from a decode error to its dead-letter reason. It lives here, not in
/// `deadletter`, so the dependency runs one way: the job knows its give-up reasons, the
/// dead-letter store knows nothing of decoding.
impl From<&DecodeError> for Reason {
    fn from(e: &DecodeError) -> Reason {
        match e {
            DecodeError::TooLarge { .. } => Reason::TooLarge,
            DecodeError::Malformed(_) => Reason::Malformed,
            DecodeError::MissingFunction => Reason::MissingFunction,
            DecodeError::BadFunction(_) => Reason::BadFunction,
            DecodeError::BadUrl(_) => Reason::BadUrl,
        }
    }
}

/// A decoded invocation, ready to call.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub request: QueueRequest,
    /// `<gateway>/function/<Function><Path>?<QueryString>`.
    pub url: url::Url,
    /// The same URL in the HTTP client's form, converted once at decode: a URL the client
    /// would refuse is a bad message (dead-lettered), not a call that fails on every attempt.
    pub uri: hyper::Uri,
    pub call_id: String,
    /// The function; its `<fn>.<ns>` is the `function_name` label OpenFaaS's autoscaler
    /// joins on.
    pub function: FunctionName,
    pub callback: Option<url::Url>,
}

/// Turns payloads into invocations for one gateway.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// The gateway, parsed once: each function URL is a copy with its path and query set,
    /// which costs a fraction of parsing the whole URL (scheme, host, IDNA) per message.
    base: url::Url,
    /// The gateway's own path prefix without a trailing `/` (usually empty).
    base_path: String,
    /// Namespace of function names given without one.
    default_namespace: String,
    /// Larger payloads are refused before parsing, so one message cannot make the worker
    /// allocate without bound (a base64 body costs its size again once decoded).
    max_bytes: usize,
}

impl Decoder {
    /// A decoder for the gateway at `gateway` (a base URL, as [`crate::worker::invoke::split_gateway`]
    /// gives it).
    pub fn new(
        gateway: &str,
        default_namespace: &str,
        max_bytes: usize,
    ) -> Result<Decoder, url::ParseError> {
        let base = url::Url::parse(gateway)?;
        if base.cannot_be_a_base() {
            return Err(url::ParseError::RelativeUrlWithCannotBeABaseBase);
        }
        Ok(Decoder {
            base_path: base.path().trim_end_matches('/').to_string(),
            base,
            default_namespace: default_namespace.to_string(),
            max_bytes,
        })
    }

    /// Decodes and validates a payload. Never panics, whatever the bytes (a property test
    /// feeds it arbitrary input).
    pub fn decode(&self, payload: &[u8]) -> Result<Invocation, DecodeError> {
        if payload.len() > self.max_bytes {
            return Err(DecodeError::TooLarge {
                size: payload.len(),
                max: self.max_bytes,
            });
        }
        self.decode_json(payload)
    }

    fn decode_json(&self, payload: &[u8]) -> Result<Invocation, DecodeError> {
        let mut request: QueueRequest =
            serde_json::from_slice(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        // Surrounding spaces are tolerated (hand-written messages); the gateway sends none.
        let name = match FunctionName::parse(request.function.trim(), &self.default_namespace) {
            Ok(name) => name,
            Err(FunctionNameError::Empty) => return Err(DecodeError::MissingFunction),
            Err(_) => {
                // Shown in logs and headers: keep it short whatever was sent.
                let shown: String = request.function.chars().take(80).collect();
                return Err(DecodeError::BadFunction(shown));
            }
        };
        let function = name.as_written();
        let path = request.path.as_str();
        if !(path.is_empty() || path.starts_with('/'))
            || path.contains(['?', '#'])
            || path.chars().any(|c| c.is_control() || c == ' ')
        {
            return Err(DecodeError::BadUrl(format!("Path {path:?}")));
        }
        if request.query_string.contains('#') || request.query_string.chars().any(char::is_control)
        {
            return Err(DecodeError::BadUrl(format!(
                "QueryString {:?}",
                request.query_string
            )));
        }
        // `<gateway>/function/<Function><Path>?<QueryString>`.
        let mut full_path =
            String::with_capacity(self.base_path.len() + 10 + function.len() + path.len());
        full_path.push_str(&self.base_path);
        full_path.push_str("/function/");
        full_path.push_str(function);
        let prefix_len = full_path.len();
        full_path.push_str(path);
        let mut url = self.base.clone();
        url.set_path(&full_path);
        // Dot segments (`/..`, `/%2e%2e`, `\..`) are resolved by URL parsing: a Path could
        // climb out of the function to the gateway's own API (`/system/...`), called with
        // the gateway credentials. The resolved path must stay inside the function.
        let inside = url.path().strip_prefix(&full_path[..prefix_len]);
        if !matches!(inside, Some(rest) if rest.is_empty() || rest.starts_with('/')) {
            return Err(DecodeError::BadUrl(format!(
                "Path {path:?} leaves /function/{function}"
            )));
        }
        url.set_query((!request.query_string.is_empty()).then_some(&*request.query_string));
        url.set_fragment(None);
        let uri = hyper::Uri::try_from(url.as_str())
            .map_err(|e| DecodeError::BadUrl(format!("{url}: {e}")))?;

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
            uri,
            call_id,
            function: name,
            callback,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: &str = "http://gw:8080";

    fn decoder() -> Decoder {
        Decoder::new(GW, "openfaas-fn", 64 << 10).unwrap()
    }

    fn msg(json: &str) -> Result<Invocation, DecodeError> {
        decoder().decode(json.as_bytes())
    }

    /// What every successful decode must give: a URL the HTTP client accepts, on the gateway,
    /// and labels fit for metrics and subjects.
    fn check_invariants(inv: &Invocation) {
        // The URL is built from parts; it must be the URL its text parses to, which is what
        // the client would have built from the whole string.
        let text = inv.url.as_str();
        let url = url::Url::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(url, inv.url);
        // The client's form is the same URL, byte for byte.
        assert_eq!(inv.uri.to_string(), text);
        let whole = format!(
            "{GW}/function/{}{}{}{}",
            inv.request.function.trim(),
            inv.request.path,
            if inv.request.query_string.is_empty() {
                ""
            } else {
                "?"
            },
            inv.request.query_string
        );
        // Parsing a whole string trims trailing spaces, which dropped them from a query; the
        // query is now kept as sent (percent-encoded).
        if !inv.request.query_string.ends_with(' ') {
            assert_eq!(url::Url::parse(&whole).as_ref(), Ok(&url), "{whole}");
        }
        assert_eq!(url.host_str(), Some("gw"), "{}", inv.url);
        let inside = format!("/function/{}", inv.request.function.trim());
        assert!(
            url.path() == inside || url.path().starts_with(&format!("{inside}/")),
            "{}",
            inv.url
        );
        let (name, ns) = inv.function.tokens();
        assert!(
            [name, ns]
                .iter()
                .all(|t| !t.is_empty() && !t.contains([' ', '*', '>', '.'])),
            "{:?}",
            inv.function
        );
        assert_eq!(inv.function.as_written(), inv.request.function.trim());
        assert!(!inv.call_id.is_empty());
    }

    #[test]
    fn hostile_inputs_are_refused_without_panicking() {
        let deep_array = "[".repeat(100_000);
        let deep_object = r#"{"Function":"#.repeat(20_000);
        let deep_header = format!(
            r#"{{"Function":"f","Header":{{"X":{}}}}}"#,
            "[".repeat(10_000)
        );
        let many_headers = format!(
            r#"{{"Function":"f","Header":{{{}}}}}"#,
            (0..5_000)
                .map(|i| format!(r#""H{i}":["v"]"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        let cases: Vec<(&[u8], Option<&str>)> = vec![
            (b"", Some("malformed")),
            (b"\xff\xfe\x00", Some("malformed")),
            (b"null", Some("malformed")),
            // serde reads a struct from an array of its fields: an empty one has no Function.
            (b"[]", Some("missing_function")),
            (b"{}", Some("missing_function")),
            (deep_array.as_bytes(), Some("malformed")),
            (deep_object.as_bytes(), Some("malformed")),
            (deep_header.as_bytes(), Some("malformed")),
            (br#"{"Function":"f","Body":"e30"}"#, Some("malformed")),
            (br#"{"Function":"f","Body":"!!!!"}"#, Some("malformed")),
            (br#"{"Function":"f","Body":5}"#, Some("malformed")),
            (br#"{"Function":"f","Body":null}"#, None),
            (br#"{"Function":"f","Body":"e30="}"#, None),
            (br#"{"Function":"f","Header":{"A":"one","B":null}}"#, None),
            (
                br#"{"Function":"f","CallbackUrl":{"Scheme":7}}"#,
                Some("malformed"),
            ),
            (
                br#"{"Function":"f","Annotations":{"a":1}}"#,
                Some("malformed"),
            ),
            (br#"{"Function":"f\u0000"}"#, Some("bad_function")),
            (br#"{"Function":"f","Path":"/\u0007"}"#, Some("bad_url")),
            (
                br#"{"Function":"f","QueryString":"a=1#frag"}"#,
                Some("bad_url"),
            ),
            (many_headers.as_bytes(), None),
        ];
        let mut d = decoder();
        d.max_bytes = 1 << 20;
        for (input, want) in cases {
            let shown = String::from_utf8_lossy(&input[..input.len().min(60)]).into_owned();
            match (d.decode(input), want) {
                (Ok(inv), None) => check_invariants(&inv),
                (Err(e), Some(reason)) => assert_eq!(e.reason(), reason, "{shown}: {e}"),
                (got, _) => panic!("{shown}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn oversized_messages_are_refused_before_parsing() {
        let mut d = decoder();
        d.max_bytes = 100;
        let body = format!(r#"{{"Function":"f","Body":"{}"}}"#, "A".repeat(200));
        let err = d.decode(body.as_bytes()).unwrap_err();
        assert_eq!(err.reason(), "too_large");
        assert!(err.to_string().contains("max_message_bytes (100)"), "{err}");
        assert!(d.decode(br#"{"Function":"f"}"#).is_ok());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(serde_json::Value::from),
                ".{0,20}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                    prop::collection::btree_map("[A-Za-z]{1,12}", inner, 0..6)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        const FIELDS: &[&str] = &[
            "Header",
            "Host",
            "Body",
            "Method",
            "Path",
            "QueryString",
            "Function",
            "QueueName",
            "Annotations",
            "Labels",
            "Environment",
            "CallbackUrl",
        ];

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            #[test]
            fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
                if let Ok(inv) = decoder().decode(&bytes) {
                    check_invariants(&inv);
                }
            }

            #[test]
            fn any_json_in_any_field_never_panics(
                field in prop::sample::select(FIELDS),
                value in json_value(),
            ) {
                let mut doc = serde_json::json!({"Function": "f"});
                doc[field] = value;
                if let Ok(inv) = decoder().decode(doc.to_string().as_bytes()) {
                    check_invariants(&inv);
                }
            }

            #[test]
            fn urls_built_from_parts_match_parsing_the_whole(
                path in "(/([^?#\\s\\p{Cc}]{0,8}|\\.\\.|%2e%2e|\\.)){0,4}",
                query in "[^#\\p{Cc}]{0,24}[^ #\\p{Cc}]|",
            ) {
                let doc = serde_json::json!({"Function": "f", "Path": path, "QueryString": query});
                match decoder().decode(doc.to_string().as_bytes()) {
                    Ok(inv) => check_invariants(&inv),
                    // Refused only when the path really climbs out of the function.
                    Err(e) => {
                        prop_assert_eq!(e.reason(), "bad_url", "{}", e);
                        let whole = url::Url::parse(&format!("{GW}/function/f{path}")).unwrap();
                        prop_assert!(
                            whole.path() != "/function/f" && !whole.path().starts_with("/function/f/"),
                            "{:?} refused, but it resolves to {}", path, whole
                        );
                    }
                }
            }

            /// The decoder and every other entry point share one idea of a name.
            #[test]
            fn decode_accepts_exactly_the_names_function_name_accepts(
                function in "[a-zA-Z0-9_. *>/%é\\t-]{0,12}",
            ) {
                let doc = serde_json::json!({"Function": function});
                let parsed = FunctionName::parse(function.trim(), "openfaas-fn");
                match (decoder().decode(doc.to_string().as_bytes()), parsed) {
                    (Ok(inv), Ok(name)) => {
                        check_invariants(&inv);
                        prop_assert_eq!(inv.function.qualified(), name.qualified());
                        prop_assert_eq!(inv.function.as_written(), name.as_written());
                    }
                    (Err(e), Err(FunctionNameError::Empty)) => {
                        prop_assert_eq!(e.reason(), "missing_function")
                    }
                    (Err(e), Err(_)) => prop_assert_eq!(e.reason(), "bad_function"),
                    (got, want) => prop_assert!(false, "{:?}: decode {:?}, parse {:?}", function, got, want),
                }
            }

            #[test]
            fn arbitrary_strings_give_a_valid_url_or_a_reason(
                function in ".{0,24}",
                path in ".{0,24}",
                query in ".{0,24}",
                body in "[A-Za-z0-9+/=]{0,24}",
                headers in prop::collection::btree_map(".{0,8}", prop::collection::vec(".{0,8}", 0..3), 0..40),
                callback in ".{0,24}",
            ) {
                let doc = serde_json::json!({
                    "Function": function,
                    "Path": path,
                    "QueryString": query,
                    "Body": body,
                    "Header": headers,
                    "CallbackUrl": callback,
                });
                match decoder().decode(doc.to_string().as_bytes()) {
                    Ok(inv) => check_invariants(&inv),
                    Err(e) => prop_assert!(
                        ["malformed", "missing_function", "bad_function", "bad_url"]
                            .contains(&e.reason()),
                        "{e}"
                    ),
                }
            }
        }
    }

    #[test]
    fn builds_the_function_url() {
        let inv = msg(r#"{"Function":"echo","Path":"/a/b","QueryString":"x=1&y=2","Header":{"X-Call-Id":["c1"]}}"#).unwrap();
        assert_eq!(inv.url.as_str(), "http://gw:8080/function/echo/a/b?x=1&y=2");
        assert_eq!(inv.call_id, "c1");
        assert_eq!(inv.function.qualified(), "echo.openfaas-fn");
        for escape in [
            "/../../system/functions",
            "/%2e%2e/%2E%2e/system/functions",
            "/..\\..\\system",
            "/./../other",
            "/a/../../other/x",
        ] {
            let doc = serde_json::json!({"Function": "echo", "Path": escape});
            let err = decoder().decode(doc.to_string().as_bytes()).unwrap_err();
            assert_eq!(err.reason(), "bad_url", "{escape}: {err}");
        }
        // Dot segments that stay inside the function are fine.
        let inv = msg(r#"{"Function":"echo","Path":"/a/../b/./c"}"#).unwrap();
        assert_eq!(inv.url.as_str(), "http://gw:8080/function/echo/b/c");
        let prefixed = Decoder::new("https://gw.example/prefix/", "openfaas-fn", 1024).unwrap();
        let inv = prefixed
            .decode(br#"{"Function":"echo","Path":"/a","QueryString":"q=1"}"#)
            .unwrap();
        assert_eq!(
            inv.url.as_str(),
            "https://gw.example/prefix/function/echo/a?q=1"
        );
        let inv = msg(r#"{"Function":"echo.team-a"}"#).unwrap();
        assert_eq!(inv.url.as_str(), "http://gw:8080/function/echo.team-a");
        assert_eq!(inv.function.qualified(), "echo.team-a");
        assert_eq!(
            inv.request.header_value("X-Call-Id"),
            Some(inv.call_id.as_str())
        );
    }

    #[test]
    fn decode_errors_have_reasons() {
        let long_name = format!(
            r#"{{"Function":"{}"}}"#,
            "f".repeat(crate::message::function::MAX_LEN + 1)
        );
        let cases = [
            ("not json", "malformed"),
            (r#"{"Function":5}"#, "malformed"),
            (r#"{"Method":"POST"}"#, "missing_function"),
            (r#"{"Function":"../etc"}"#, "bad_function"),
            (r#"{"Function":"a b"}"#, "bad_function"),
            (r#"{"Function":"a..b"}"#, "bad_function"),
            // Accepted here once (and called as `/function/a.b.c`) while the front door
            // refused it: a name is `fn` or `fn.namespace` everywhere.
            (r#"{"Function":"a.b.c"}"#, "bad_function"),
            (r#"{"Function":"café"}"#, "bad_function"),
            (r#"{"Function":" "}"#, "missing_function"),
            (&long_name, "bad_function"),
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
