//! ⑤ The function call: one pooled HTTP client, the queued method, headers and body, a
//! timeout. The result is a value ([`Response`]), never an error: every way a call can end is
//! an input to the retry decision.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::job::Invocation;
use crate::retry::CallResult;

/// Headers that describe one hop, not the request: the client sets its own.
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    [
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// The most response body kept for a callback (16 MiB); the rest is read and dropped.
pub const MAX_KEPT_BODY: usize = 16 << 20;

/// How a call ended when there was no HTTP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Timeout,
    Error,
}

/// What the function returned.
#[derive(Debug)]
pub struct Response {
    pub status: Result<u16, Failure>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Error text when there was no response, for logs.
    pub error: Option<String>,
    pub duration: Duration,
}

impl Response {
    /// The status label of metrics and logs.
    pub fn status_label(&self) -> String {
        match self.status {
            Ok(code) => code.to_string(),
            Err(Failure::Timeout) => "timeout".into(),
            Err(Failure::Error) => "error".into(),
        }
    }

    /// The reduced form the retry decision takes.
    pub fn call_result(&self) -> CallResult {
        match self.status {
            Err(_) => CallResult::NoResponse,
            Ok(code) => CallResult::Status {
                code,
                internal: self.headers.contains_key("x-openfaas-internal"),
                retry_after: if code == 429 || code == 503 {
                    self.headers
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, SystemTime::now()))
                } else {
                    None
                },
            },
        }
    }
}

/// `Retry-After` as delta-seconds or an HTTP-date; `None` when it does not parse.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Calls functions through the gateway.
#[derive(Clone)]
pub struct Invoker {
    client: reqwest::Client,
    timeout: Duration,
    /// Basic auth taken out of `gateway_url`, so the URLs that are logged carry no secret.
    basic_auth: Option<(String, Option<String>)>,
}

/// Splits credentials off a gateway URL: the base URL to build function URLs from (no
/// trailing `/`, no userinfo) and the basic-auth pair, if any.
pub fn split_gateway(url: &url::Url) -> (String, Option<(String, Option<String>)>) {
    let auth = (!url.username().is_empty()).then(|| {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        (decode(url.username()), url.password().map(decode))
    });
    let mut base = url.clone();
    let _ = base.set_username("");
    let _ = base.set_password(None);
    (base.as_str().trim_end_matches('/').to_string(), auth)
}

/// The HTTP client of function calls: a connection pool sized to the concurrency so that every
/// in-flight call can reuse a kept-alive connection, no redirects (a gateway answers, it does
/// not send us elsewhere), no client-side replays. The benchmark's raw-HTTP baseline uses it too, so both compare the
/// same client settings.
pub fn http_client(max_inflight: usize) -> reqwest::Result<reqwest::Client> {
    crate::tls::install_provider();
    reqwest::Client::builder()
        .pool_max_idle_per_host(max_inflight.max(1))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        // reqwest's default policy copies every request (headers, extensions, body) in case
        // it must be replayed after an HTTP/2 or HTTP/3 refusal, which HTTP/1.1 never sends.
        // Retries are the worker's own decision, made from the response.
        .retry(reqwest::retry::never().max_retries_per_request(0))
        .build()
}

impl Invoker {
    /// One client for all calls, with a connection pool sized to the concurrency so that every
    /// in-flight call can reuse a kept-alive connection.
    pub fn new(
        timeout: Duration,
        max_inflight: usize,
        basic_auth: Option<(String, Option<String>)>,
    ) -> anyhow::Result<Invoker> {
        Ok(Invoker {
            client: http_client(max_inflight)?,
            timeout,
            basic_auth,
        })
    }

    /// Calls the function with `body` (the invocation's, taken out of it so it is not
    /// copied). The response body is kept (up to [`MAX_KEPT_BODY`]) only when
    /// `keep_body`, that is when a callback will carry it; otherwise it is read and dropped,
    /// so the connection can be reused without holding the bytes.
    pub async fn call(&self, inv: &Invocation, body: Bytes, keep_body: bool) -> Response {
        let started = Instant::now();
        let req = &inv.request;
        let method = match req.method.trim() {
            "" => reqwest::Method::POST,
            m => reqwest::Method::from_bytes(m.as_bytes()).unwrap_or(reqwest::Method::POST),
        };
        let mut headers = HeaderMap::with_capacity(req.header.len());
        for (name, values) in &req.header {
            if is_hop_by_hop(name) {
                continue;
            }
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                tracing::debug!(callId = %inv.call_id, header = %name, "skipping invalid header name");
                continue;
            };
            for v in values {
                match HeaderValue::from_str(v) {
                    Ok(v) => {
                        headers.append(name.clone(), v);
                    }
                    Err(_) => {
                        tracing::debug!(callId = %inv.call_id, header = %name, "skipping invalid header value")
                    }
                }
            }
        }
        let mut request = self.client.request(method, inv.url.clone());
        if let Some((user, password)) = &self.basic_auth {
            request = request.basic_auth(user, password.as_ref());
        }
        let result = request
            .headers(headers)
            .body(body)
            .timeout(self.timeout)
            .send()
            .await;
        let (status, headers, body, error) = match result {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let headers = std::mem::take(resp.headers_mut());
                let mut body = Vec::new();
                let mut truncated = false;
                let read = loop {
                    match resp.chunk().await {
                        Ok(Some(chunk)) if keep_body => {
                            if body.len() + chunk.len() <= MAX_KEPT_BODY {
                                body.extend_from_slice(&chunk);
                            } else {
                                truncated = true;
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                };
                if truncated {
                    tracing::warn!(callId = %inv.call_id, limit = MAX_KEPT_BODY, "response body too large for the callback; truncated");
                }
                match read {
                    Ok(()) => (Ok(status), headers, Bytes::from(body), None),
                    // The answer did not arrive whole (reset, timeout mid-body): treat it
                    // as no answer, so it is retried rather than acknowledged with a
                    // partial result.
                    Err(e) => no_answer(&e),
                }
            }
            Err(e) => no_answer(&e),
        };
        Response {
            status,
            headers,
            body,
            error,
            duration: started.elapsed(),
        }
    }
}

/// The parts of a [`Response`] when the call produced no (whole) answer.
fn no_answer(e: &reqwest::Error) -> (Result<u16, Failure>, HeaderMap, Bytes, Option<String>) {
    let failure = if e.is_timeout() {
        Failure::Timeout
    } else {
        Failure::Error
    };
    (
        Err(failure),
        HeaderMap::new(),
        Bytes::new(),
        Some(error_chain(e)),
    )
}

/// The error and its causes in one line: reqwest's own message alone ("error sending request")
/// hides whether the connection was refused or reset.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_credentials_are_split_off() {
        let (base, auth) = split_gateway(&"http://admin:p%40ss+1@gw:8080/".parse().unwrap());
        assert_eq!(base, "http://gw:8080");
        assert_eq!(auth, Some(("admin".into(), Some("p@ss+1".into()))));
        let (base, auth) = split_gateway(&"https://gw/prefix/".parse().unwrap());
        assert_eq!((base.as_str(), auth), ("https://gw/prefix", None));
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
