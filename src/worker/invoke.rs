//! ③ The function call: one pooled HTTP client, the queued method, headers and body, a
//! timeout. The result is a value ([`Response`]), never an error: every way a call can end is
//! an input to the retry decision.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, PROXY_AUTHORIZATION,
};
use hyper::{Method, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::worker::connector::{Connector, ConnectorError};

use crate::worker::job::Invocation;
use crate::worker::retry::CallResult;

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
                        .get(hyper::header::RETRY_AFTER)
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

/// The HTTP client of function calls: hyper's pooled client over [`Connector`].
pub type HttpClient = Client<Connector, Full<Bytes>>;

/// A client for calls to one gateway, and what every request must carry for its route.
#[derive(Clone)]
pub struct Transport {
    pub client: HttpClient,
    /// `Proxy-Authorization` when calls go through a forward proxy with credentials.
    pub proxy_authorization: Option<HeaderValue>,
    /// The proxy in use, if any, without credentials.
    pub proxy: Option<String>,
}

/// The HTTP client of function calls to `gateway`: a connection pool sized to the
/// concurrency so that every in-flight call can reuse a kept-alive connection, Nagle off,
/// TCP keepalive on, no redirects (a gateway answers, it does not send us elsewhere), no
/// replays (retries are the worker's decision, made from the response). `https` gateways are
/// verified against the system's trust store, as reqwest does (`SSL_CERT_FILE`/`SSL_CERT_DIR`
/// override it); the environment's proxy settings apply ([`crate::worker::connector`]).
///
/// hyper's client directly rather than reqwest: at tens of thousands of calls a second the
/// worker's one thread is busy, and reqwest's layers (redirect and retry policies, URL to URI
/// conversion, a boxed timer per request) cost a share of its CPU per call (BENCHMARKS.md).
/// The benchmark's raw-HTTP baseline uses this client too, so both compare the same settings.
///
/// Header names go out title-cased (`X-Call-Id`, not hyper's `x-call-id`): for the names hyper
/// holds (always lower case) that is exactly Go's canonical form, which OpenFaaS's worker
/// writes, so a function that compares names case-sensitively sees what it saw there. It
/// applies through a forward proxy and inside a `CONNECT` tunnel too (the same client writes
/// those requests; the `CONNECT` itself is written title-cased by hyper-util).
pub fn http_client(max_inflight: usize, gateway: &Uri) -> Result<Transport, ConnectorError> {
    let built = crate::worker::connector::build(gateway, &Matcher::from_env())?;
    let client = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(max_inflight.max(1))
        .pool_idle_timeout(Duration::from_secs(90))
        .http1_title_case_headers(true)
        .build(built.connector);
    Ok(Transport {
        client,
        proxy_authorization: built.proxy_authorization,
        proxy: built.proxy,
    })
}

/// Calls functions through the gateway.
#[derive(Clone)]
pub struct Invoker {
    transport: Transport,
    timeout: Duration,
    /// Basic auth taken out of `gateway_url` (so the URLs that are logged carry no secret),
    /// as the `Authorization` value, encoded once: sent with every call that does not carry
    /// the caller's own.
    authorization: Option<HeaderValue>,
}

/// An `Authorization: Basic` value, marked sensitive so it is never logged.
fn basic_authorization(user: &str, password: Option<&str>) -> HeaderValue {
    use base64::Engine as _;
    let pair = format!("{user}:{}", password.unwrap_or(""));
    let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
    let mut value = HeaderValue::try_from(format!("Basic {encoded}"))
        .expect("base64 is always a valid header value");
    value.set_sensitive(true);
    value
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

impl Invoker {
    /// One client for all calls to `gateway`, with a connection pool sized to the concurrency
    /// so that every in-flight call can reuse a kept-alive connection.
    pub fn new(
        gateway: &Uri,
        timeout: Duration,
        max_inflight: usize,
        basic_auth: Option<(String, Option<String>)>,
    ) -> Result<Invoker, ConnectorError> {
        let transport = http_client(max_inflight, gateway)?;
        if let Some(proxy) = &transport.proxy {
            tracing::info!(proxy = %proxy, "Function calls go through a proxy (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY; NO_PROXY exempts hosts)");
        }
        Ok(Invoker {
            transport,
            timeout,
            authorization: basic_auth.map(|(u, p)| basic_authorization(&u, p.as_deref())),
        })
    }

    /// Calls the function with `body` (the invocation's, taken out of it so it is not
    /// copied). The response body is kept (up to [`MAX_KEPT_BODY`]) only when
    /// `keep_body`, that is when a callback will carry it; otherwise it is read and dropped,
    /// so the connection can be reused without holding the bytes. The timeout covers the
    /// whole exchange, body included.
    pub async fn call(&self, inv: &Invocation, body: Bytes, keep_body: bool) -> Response {
        let started = Instant::now();
        let request = self.request(inv, body);
        let exchange = async {
            let resp = self
                .transport
                .client
                .request(request)
                .await
                .map_err(|e| error_chain(&e))?;
            let (parts, mut incoming) = resp.into_parts();
            let mut body = Vec::new();
            let mut truncated = false;
            while let Some(frame) = incoming.frame().await {
                // The answer did not arrive whole (reset mid-body): treat it as no answer,
                // so it is retried rather than acknowledged with a partial result.
                let frame = frame.map_err(|e| error_chain(&e))?;
                let Ok(chunk) = frame.into_data() else {
                    continue;
                };
                if !keep_body {
                    continue;
                }
                if body.len() + chunk.len() <= MAX_KEPT_BODY {
                    body.extend_from_slice(&chunk);
                } else {
                    truncated = true;
                }
            }
            if truncated {
                tracing::warn!(callId = %inv.call_id, limit = MAX_KEPT_BODY, "response body too large for the callback; truncated");
            }
            Ok::<_, String>((parts.status.as_u16(), parts.headers, Bytes::from(body)))
        };
        let (status, headers, body, error) =
            match tokio::time::timeout(self.timeout, exchange).await {
                Ok(Ok((status, headers, body))) => (Ok(status), headers, body, None),
                Ok(Err(error)) => (
                    Err(Failure::Error),
                    HeaderMap::new(),
                    Bytes::new(),
                    Some(error),
                ),
                Err(_) => (
                    Err(Failure::Timeout),
                    HeaderMap::new(),
                    Bytes::new(),
                    Some(format!(
                        "no whole answer within upstream_timeout ({:?})",
                        self.timeout
                    )),
                ),
            };
        Response {
            status,
            headers,
            body,
            error,
            duration: started.elapsed(),
        }
    }

    /// The queued method, headers and body, to the invocation's URL. Hop-by-hop headers are
    /// dropped (the client sets its own); invalid names or values are skipped, not fatal.
    fn request(&self, inv: &Invocation, body: Bytes) -> hyper::Request<Full<Bytes>> {
        let req = &inv.request;
        let method = match req.method.trim() {
            "" => Method::POST,
            m => Method::from_bytes(m.as_bytes()).unwrap_or(Method::POST),
        };
        let mut headers = HeaderMap::with_capacity(req.header.len() + 2);
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
        // What reqwest, and so earlier versions of the worker, sent by default.
        if !headers.contains_key(ACCEPT) {
            headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
        }
        // The gateway's credentials, unless the publisher queued its own: those are the
        // caller's, for the function to check, and win (as they did with earlier versions).
        if let Some(auth) = &self.authorization {
            if !headers.contains_key(AUTHORIZATION) {
                headers.insert(AUTHORIZATION, auth.clone());
            }
        }
        if let Some(auth) = &self.transport.proxy_authorization {
            headers.insert(PROXY_AUTHORIZATION, auth.clone());
        }
        let mut request = hyper::Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = inv.uri.clone();
        *request.headers_mut() = headers;
        request
    }
}

/// The error and its causes in one line: a client's own message alone ("client error
/// (Connect)", "error sending request") hides whether the connection was refused or reset.
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
