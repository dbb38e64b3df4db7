//! ⑥ Posting the result to the caller's `X-Callback-Url`. Runs after the message is settled,
//! on its own task and its own deadline (never the invocation's), with bounded retries. A
//! failed callback is logged and counted; it never re-runs the function.
//!
//! Callbacks waiting or in delivery share a [`Budget`] (`callback_max_pending` callbacks,
//! `callback_max_pending_bytes` of bodies): a receiver that never answers costs at most that
//! much memory. The worker holds the job's slot until its callback has a place in the
//! budget, so a full budget slows the intake (back-pressure) and no callback is dropped.
//!
//! With `callback_allowed_networks` set, every address a callback connects to passes
//! [`AllowList`] first: names are resolved by [`Guard`], the client's only resolver, so the
//! addresses checked are the ones connected to (a name cannot resolve to a public address
//! for the check and an internal one for the connection); IP literals, which no resolver
//! sees, are checked before the request and on each redirect. A blocked callback is not
//! retried (the next try would be blocked too): one warning, `result="blocked"`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::CallbackConfig;
use crate::telemetry::metrics::Metrics;
use crate::worker::allowlist::{AllowList, Blocked};
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
    /// `X-Call-Status`, for a call that ended without the function's answer: `cancelled`.
    pub state: Option<&'static str>,
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
        if let Some(state) = self.state {
            set("x-call-status", state.to_string());
        }
        for t in &self.start_times {
            if let Ok(v) = HeaderValue::from_str(t) {
                h.append(HeaderName::from_static("x-start-time"), v);
            }
        }
        h
    }
}

/// Bodies are counted against the byte budget in whole KiB, so that budgets above 4 GiB fit
/// the semaphore's `u32` requests.
const BUDGET_UNIT: usize = 1024;

/// How many callbacks, and how many bytes of their bodies, may be held at once.
struct Budget {
    count: Arc<Semaphore>,
    /// In [`BUDGET_UNIT`]s.
    units: Arc<Semaphore>,
    total_units: u32,
}

impl Budget {
    fn new(max_pending: usize, max_bytes: u64) -> Budget {
        let total_units = u32::try_from(max_bytes.div_ceil(BUDGET_UNIT as u64))
            .unwrap_or(u32::MAX)
            .max(1);
        Budget {
            count: Arc::new(Semaphore::new(max_pending.max(1))),
            units: Arc::new(Semaphore::new(total_units as usize)),
            total_units,
        }
    }

    /// The units a body of `len` bytes takes: at most the whole budget, so a body larger than
    /// the budget still goes (alone) instead of waiting forever.
    fn units_for(&self, len: usize) -> u32 {
        u32::try_from(len.div_ceil(BUDGET_UNIT))
            .unwrap_or(u32::MAX)
            .min(self.total_units)
    }
}

/// A callback's place in the budget, held until it is delivered, fails or is abandoned; the
/// backlog gauges follow it.
pub struct Reservation {
    _count: OwnedSemaphorePermit,
    _units: OwnedSemaphorePermit,
    bytes: usize,
    metrics: Arc<Metrics>,
}

impl Reservation {
    fn new(
        count: OwnedSemaphorePermit,
        units: OwnedSemaphorePermit,
        bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Reservation {
        metrics.callbacks_pending.inc();
        metrics.callbacks_pending_bytes.add(bytes as f64);
        Reservation {
            _count: count,
            _units: units,
            bytes,
            metrics,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.metrics.callbacks_pending.dec();
        self.metrics.callbacks_pending_bytes.sub(self.bytes as f64);
    }
}

/// Delivers callbacks.
#[derive(Clone)]
pub struct Callbacks {
    client: reqwest::Client,
    config: CallbackConfig,
    metrics: Arc<Metrics>,
    budget: Arc<Budget>,
}

impl Callbacks {
    pub fn new(config: CallbackConfig, metrics: Arc<Metrics>) -> anyhow::Result<Callbacks> {
        crate::tls::install_provider();
        // Header names title-cased, as OpenFaaS's Go worker writes them (`X-Call-Id`,
        // `X-Function-Status`): see `invoke::http_client`.
        let mut builder = reqwest::Client::builder()
            .http1_title_case_headers()
            .timeout(config.timeout)
            .tcp_nodelay(true)
            .danger_accept_invalid_certs(config.tls_insecure);
        if let Some(list) = &config.allowed {
            let list = Arc::new(list.clone());
            builder = builder
                .dns_resolver(Arc::new(Guard { list: list.clone() }))
                // Through a proxy the resolver would see the proxy's name, never the
                // destination's, and the check would be about the wrong machine.
                .no_proxy()
                .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                    if attempt.previous().len() >= MAX_REDIRECTS {
                        return attempt.error("too many redirects");
                    }
                    // A redirect to a name meets the resolver; one to an IP literal does not.
                    match literal_check(&list, attempt.url()) {
                        Err(blocked) => attempt.error(blocked),
                        Ok(()) => attempt.follow(),
                    }
                }));
        }
        let client = builder.build()?;
        let budget = Arc::new(Budget::new(config.max_pending, config.max_pending_bytes));
        Ok(Callbacks {
            client,
            config,
            metrics,
            budget,
        })
    }

    /// A place in the budget for a callback whose body is `len` bytes, if one is free now.
    pub fn try_reserve(&self, len: usize) -> Option<Reservation> {
        let count = self.budget.count.clone().try_acquire_owned().ok()?;
        let units = self
            .budget
            .units
            .clone()
            .try_acquire_many_owned(self.budget.units_for(len))
            .ok()?;
        Some(Reservation::new(count, units, len, self.metrics.clone()))
    }

    /// Waits for a place in the budget for a callback whose body is `len` bytes. Waiters are
    /// served in order (the semaphores are fair), and always the count before the bytes, so
    /// two waiters never hold each other up.
    pub async fn reserve(&self, len: usize) -> Reservation {
        const OPEN: &str = "the callback budget is never closed";
        let count = self.budget.count.clone().acquire_owned().await.expect(OPEN);
        let units = self
            .budget
            .units
            .clone()
            .acquire_many_owned(self.budget.units_for(len))
            .await
            .expect(OPEN);
        Reservation::new(count, units, len, self.metrics.clone())
    }

    /// Posts `cb`, retrying connection errors, 429 and 5xx up to `callback_max_attempts` times.
    pub async fn deliver(&self, cb: Callback) {
        if let Some(list) = &self.config.allowed {
            if let Err(blocked) = literal_check(list, &cb.url) {
                return self.blocked(&cb, &blocked);
            }
        }
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
                    if let Some(blocked) = find_blocked(&e) {
                        return self.blocked(&cb, blocked);
                    }
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

    /// The one warning and count of a callback `callback_allowed_networks` refused.
    fn blocked(&self, cb: &Callback, why: &Blocked) {
        tracing::warn!(callId = %cb.call_id, function = %cb.function, url = %redact(&cb.url), reason = %why, "Callback blocked by callback_allowed_networks");
        self.metrics.callback("blocked");
    }
}

/// As reqwest's default policy.
const MAX_REDIRECTS: usize = 10;

/// The callback client's resolver when `callback_allowed_networks` is set: resolves as the
/// system does, then refuses the name unless every address passes the allow-list.
struct Guard {
    list: Arc<AllowList>,
}

impl reqwest::dns::Resolve for Guard {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let list = self.list.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            list.check_all(&host, addrs.iter().map(|a| a.ip()))?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The allow-list for a URL whose host is an IP literal (no resolver sees those); a name
/// passes here and is checked when it is resolved.
fn literal_check(list: &AllowList, url: &url::Url) -> Result<(), Blocked> {
    let addr = match url.host() {
        Some(url::Host::Ipv4(a)) => IpAddr::V4(a),
        Some(url::Host::Ipv6(a)) => IpAddr::V6(a),
        _ => return Ok(()),
    };
    list.check_all(url.host_str().unwrap_or_default(), [addr])
}

/// The allow-list's refusal inside a request error (from the resolver or the redirect
/// policy), if that is what failed.
fn find_blocked(e: &reqwest::Error) -> Option<&Blocked> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(blocked) = s.downcast_ref::<Blocked>() {
            return Some(blocked);
        }
        source = s.source();
    }
    None
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
            state: None,
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

    fn callbacks(max_pending: usize, max_pending_bytes: u64) -> (Callbacks, Arc<Metrics>) {
        let metrics = Metrics::new("q", 1);
        let config = CallbackConfig {
            max_attempts: 1,
            timeout: Duration::from_secs(1),
            retry_wait: Duration::ZERO,
            tls_insecure: false,
            max_pending,
            max_pending_bytes,
            allowed: None,
        };
        (Callbacks::new(config, metrics.clone()).unwrap(), metrics)
    }

    const KIB: usize = 1024;

    #[tokio::test]
    async fn the_budget_bounds_the_count_and_the_bytes() {
        // (max_pending, max_pending_bytes, body size, places before the budget is full)
        let table: &[(usize, u64, usize, usize)] = &[
            (3, 64 << 20, 64 * KIB, 3),
            (100, 256 << 10, 64 * KIB, 4),
            (100, 256 << 10, 64 * KIB + 1, 3),
            (100, 64 << 10, 0, 100),
            (100, 64 << 10, 1, 64),
        ];
        for &(count, bytes, body, fits) in table {
            let (cb, metrics) = callbacks(count, bytes);
            let held: Vec<Reservation> = (0..fits)
                .map(|i| {
                    cb.try_reserve(body)
                        .unwrap_or_else(|| panic!("{count}/{bytes}/{body}: place {i} refused"))
                })
                .collect();
            assert!(
                cb.try_reserve(body).is_none(),
                "{count}/{bytes}/{body}: more than {fits} places"
            );
            assert_eq!(metrics.callbacks_pending.get(), fits as f64);
            assert_eq!(metrics.callbacks_pending_bytes.get(), (fits * body) as f64);
            drop(held);
            assert_eq!(metrics.callbacks_pending.get(), 0.0);
            assert_eq!(metrics.callbacks_pending_bytes.get(), 0.0);
            assert!(cb.try_reserve(body).is_some(), "places come back");
        }
    }

    /// A body larger than the whole byte budget still gets a place (alone), never a deadlock.
    #[tokio::test(start_paused = true)]
    async fn a_body_larger_than_the_budget_goes_alone() {
        let (cb, metrics) = callbacks(10, 64 << 10);
        let big = cb.reserve(1 << 20).await;
        assert_eq!(metrics.callbacks_pending_bytes.get(), (1 << 20) as f64);
        assert!(cb.try_reserve(1).is_none(), "the big body fills the budget");
        let waiter = tokio::spawn({
            let cb = cb.clone();
            async move { cb.reserve(1 << 20).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "the second waits for the first");
        drop(big);
        let second = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the second gets its place once the first is gone")
            .unwrap();
        drop(second);
        assert_eq!(metrics.callbacks_pending.get(), 0.0);
    }
}
