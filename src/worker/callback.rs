//! ⑦ Posting the result to the caller's `X-Callback-Url`. Runs after the message is settled,
//! on its own task and its own deadline (never the invocation's), with bounded retries. A
//! failed callback is logged and counted; it never re-runs the function.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::CallbackConfig;
use crate::telemetry::metrics::Metrics;
use crate::worker::invoke::{error_chain, is_hop_by_hop};

/// The `User-Agent` of callbacks, as OpenFaaS's worker sends `queue-worker/<version>`.
pub const USER_AGENT: &str = concat!("queue-worker/", env!("CARGO_PKG_VERSION"));

/// Everything a callback carries; built by the worker from the call's result.
#[derive(Debug)]
pub struct Callback {
    pub url: url::Url,
    pub call_id: String,
    /// The name as submitted (`fn`, not `fn.ns`), as OpenFaaS sends it.
    pub function: String,
    /// The function's status, or 503 when there was no response (as OpenFaaS does).
    pub status: u16,
    pub duration: Duration,
    /// Attempts made so far (the delivery count).
    pub attempt: u32,
    pub max_attempts: u32,
    pub response_headers: HeaderMap,
    pub body: Bytes,
    /// `X-Start-Time` values of the original request.
    pub start_times: Vec<String>,
}

impl Callback {
    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(self.response_headers.len() + 8);
        for (name, value) in &self.response_headers {
            if !is_hop_by_hop(name.as_str()) {
                h.append(name.clone(), value.clone());
            }
        }
        let mut set = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(HeaderName::from_static(name), v);
            }
        };
        set("x-call-id", self.call_id.clone());
        set("x-function-status", self.status.to_string());
        set("x-function-name", self.function.clone());
        set(
            "x-duration-seconds",
            format!("{:.6}", self.duration.as_secs_f64()),
        );
        // Deliveries that never reached the function (a drain hand-back, a lost lease) also
        // count in JetStream's delivery count; never report more attempts than allowed.
        set("x-retry", self.attempt.min(self.max_attempts).to_string());
        set("x-retry-max", self.max_attempts.to_string());
        set("user-agent", USER_AGENT.to_string());
        for t in &self.start_times {
            if let Ok(v) = HeaderValue::from_str(t) {
                h.append(HeaderName::from_static("x-start-time"), v);
            }
        }
        h
    }
}

/// Delivers callbacks.
#[derive(Clone)]
pub struct Callbacks {
    client: reqwest::Client,
    config: CallbackConfig,
    metrics: Arc<Metrics>,
}

impl Callbacks {
    pub fn new(config: CallbackConfig, metrics: Arc<Metrics>) -> anyhow::Result<Callbacks> {
        crate::tls::install_provider();
        // Header names title-cased, as OpenFaaS's Go worker writes them (`X-Call-Id`,
        // `X-Function-Status`): see `invoke::http_client`.
        let client = reqwest::Client::builder()
            .http1_title_case_headers()
            .timeout(config.timeout)
            .tcp_nodelay(true)
            .danger_accept_invalid_certs(config.tls_insecure)
            .build()?;
        Ok(Callbacks {
            client,
            config,
            metrics,
        })
    }

    /// Posts `cb`, retrying connection errors, 429 and 5xx up to `callback_max_attempts` times.
    pub async fn deliver(&self, cb: Callback) {
        let headers = cb.headers();
        let mut wait = self.config.retry_wait;
        for attempt in 1..=self.config.max_attempts {
            let result = self
                .client
                .post(cb.url.clone())
                .headers(headers.clone())
                .body(cb.body.clone())
                .send()
                .await;
            let last = attempt == self.config.max_attempts;
            match result {
                Ok(resp) if resp.status().is_success() => {
                    tracing::info!(callId = %cb.call_id, function = %cb.function, delivery = cb.attempt, url = %redact(&cb.url), status = resp.status().as_u16(), duration = cb.duration.as_secs_f64(), "Posted result");
                    self.metrics.callback("delivered");
                    return;
                }
                Ok(resp)
                    if resp.status().is_client_error()
                        && resp.status() != reqwest::StatusCode::TOO_MANY_REQUESTS
                        && resp.status() != reqwest::StatusCode::REQUEST_TIMEOUT =>
                {
                    tracing::warn!(callId = %cb.call_id, function = %cb.function, url = %redact(&cb.url), status = resp.status().as_u16(), "Callback rejected");
                    self.metrics.callback("rejected");
                    return;
                }
                Ok(resp) => {
                    tracing::warn!(callId = %cb.call_id, function = %cb.function, url = %redact(&cb.url), status = resp.status().as_u16(), attempt, last, "Callback failed");
                }
                Err(e) => {
                    tracing::warn!(callId = %cb.call_id, function = %cb.function, url = %redact(&cb.url), error = %error_chain(&e), attempt, last, "Callback failed");
                }
            }
            if last {
                break;
            }
            tokio::time::sleep(wait).await;
            wait = wait.saturating_mul(2);
        }
        self.metrics.callback("failed");
    }
}

/// The callback URL without credentials or query, which may carry tokens.
pub(crate) fn redact(u: &url::Url) -> String {
    let mut u = u.clone();
    let _ = u.set_password(None);
    let _ = u.set_username("");
    if u.query().is_some() {
        u.set_query(Some("redacted"));
    }
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_carry_the_contract() {
        let mut response_headers = HeaderMap::new();
        response_headers.insert("content-type", HeaderValue::from_static("text/plain"));
        response_headers.insert("content-length", HeaderValue::from_static("5"));
        response_headers.insert("x-call-id", HeaderValue::from_static("from-function"));
        let cb = Callback {
            url: "http://cb/x".parse().unwrap(),
            call_id: "c1".into(),
            function: "sleep".into(),
            status: 200,
            duration: Duration::from_millis(1500),
            attempt: 2,
            max_attempts: 5,
            response_headers,
            body: Bytes::from_static(b"hello"),
            start_times: vec!["123".into()],
        };
        let h = cb.headers();
        assert_eq!(h["x-call-id"], "c1");
        assert_eq!(h["x-function-status"], "200");
        assert_eq!(h["x-function-name"], "sleep");
        assert_eq!(h["x-duration-seconds"], "1.500000");
        assert_eq!(h["x-retry"], "2");
        assert_eq!(h["x-retry-max"], "5");
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(h["user-agent"], USER_AGENT);
        assert_eq!(h["x-start-time"], "123");
        assert!(!h.contains_key("content-length"));
    }

    #[test]
    fn redacts_secrets_from_logged_urls() {
        let u: url::Url = "https://user:pw@cb.example/done?token=abc".parse().unwrap();
        assert_eq!(redact(&u), "https://cb.example/done?redacted");
    }
}
