//! The async front door: `POST /async-function/<name>[/<path>][?query]` queues the call as
//! the OpenFaaS gateway does, so OpenFaaS CE, faasd and plain HTTP platforms get a JetStream
//! queue, and `hey -m POST http://…:8080/async-function/sleep` works as in OpenFaaS's docs.
//!
//! One request, in order:
//! 1. name and path from the URL (`fn` or `fn.namespace`; 400 otherwise), body read up to
//!    the limit (413), `X-Callback-Url` parsed (400), `X-Not-Before` (an RFC 3339 time or a
//!    delay in seconds from the request's arrival) checked and stored as an RFC 3339 time
//!    (400), `X-Call-Id` kept or made;
//! 2. optionally, the function looked up at the gateway (404 when unknown, 503 when the
//!    gateway cannot say), which also gives its `com.openfaas.queue`, retry, maximum-age and
//!    concurrency-cap annotations;
//! 3. the queue chosen: `frontdoor_queues`, then the annotation, then `queue_name`;
//! 4. the `QueueRequest` published to `<queue>.<fn>.<ns>` with `Nats-Msg-Id` =
//!    `<call id>:<fingerprint of subject, method, path, query and body>`;
//! 5. `202 Accepted` with `X-Call-Id` only once JetStream has stored it, else 503.
//!
//! A 503 may still have been stored (the acknowledgement can be lost after the write): a
//! client that retries the same request with the `X-Call-Id` it got back is deduplicated by
//! JetStream within the stream's duplicate window (2m), so retrying is always safe. The
//! fingerprint in the id keeps that deduplication to the *same* request: JetStream
//! deduplicates ids across the whole stream, and a function that forwards its own
//! `X-Call-Id` to other async calls must not have them dropped behind a 202.
//!
//! The server is hyper's HTTP/1 with a header read timeout, a body read timeout and a budget
//! of body bytes held at once, so slow or oversized clients cannot pin connections or
//! memory.

pub mod calls;
pub mod lookup;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use async_nats::jetstream::{self, context::PublishErrorKind};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{is_queue_name, Config};
use crate::message::function::FunctionName;
use crate::message::not_before;
use crate::message::request::QueueRequest;
use crate::nats::calls::{self as call_records, CallBook, Record};
use crate::nats::stream::{self, Layout, LayoutError};
use crate::telemetry::metrics::FrontDoorMetrics;
use crate::telemetry::server::{self, Health};
use lookup::{Found, Lookup};

/// The annotation that picks a function's queue, as OpenFaaS's gateway reads it.
pub const QUEUE_ANNOTATION: &str = "com.openfaas.queue";
/// Annotations copied into the message for the worker (`com.openfaas.retry.*`).
pub const COPIED_ANNOTATION_PREFIX: &str = "com.openfaas.retry.";
/// Other annotations the worker reads from the message, copied too: the function's
/// maximum age and its concurrency cap (function mode).
pub const COPIED_ANNOTATIONS: &[&str] = &[
    crate::worker::flow::MAX_AGE_ANNOTATION,
    crate::worker::flow::MAX_INFLIGHT_ANNOTATION,
];
/// Longest `X-Call-Id` accepted: it becomes the `Nats-Msg-Id`.
pub const MAX_CALL_ID: usize = 128;
/// Room kept in `max_payload` for the request's headers and JSON besides the encoded body
/// when the body limit is derived from it.
const ENVELOPE_RESERVE: u64 = 4096;
/// Room for the NATS headers (`Nats-Msg-Id`) of a message.
const NATS_HEADER_ROOM: u64 = 256;
/// Longest a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request's body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Request bodies held at once, across all requests (each costs about 3x its size while it
/// is encoded and published); over it, requests get 503 at once.
pub const BODY_BUDGET: usize = 64 << 20;
/// How long a failed stream set-up is reused for other requests of that queue, so they fail
/// fast instead of queueing behind one slow JetStream request each.
const ENSURE_FAILURE_TTL: Duration = Duration::from_secs(1);

/// Why a request was refused: the HTTP status, the metric reason, and a message for the
/// caller.
#[derive(Debug)]
struct Rejection {
    status: StatusCode,
    reason: &'static str,
    message: String,
    call_id: Option<String>,
}

impl Rejection {
    fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Rejection {
        Rejection {
            status,
            reason,
            message: message.into(),
            call_id: None,
        }
    }
    fn bad(message: impl Into<String>) -> Rejection {
        Rejection::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn too_large(message: impl Into<String>) -> Rejection {
        Rejection::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }
    fn unavailable(message: impl Into<String>) -> Rejection {
        Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

/// A front door started by [`start`].
pub struct Running {
    /// Where `/async-function/…` is served.
    pub addr: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    pub metrics: Arc<FrontDoorMetrics>,
    pub health: Arc<Health>,
    shutdown: CancellationToken,
    done: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Stops taking requests (readiness turns false at once); requests being published get
    /// their answer, within `drain_timeout`.
    pub fn shutdown(&self) {
        self.health.draining.store(true, Ordering::Relaxed);
        self.shutdown.cancel();
    }

    /// Resolves when the front door has stopped (after a shutdown, or on a fatal error).
    pub async fn stopped(&self) {
        self.done.cancelled().await
    }

    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("front door task panicked")?
    }
}

struct Door {
    js: jetstream::Context,
    client: async_nats::Client,
    config: Config,
    lookup: Option<Lookup>,
    metrics: Arc<FrontDoorMetrics>,
    /// Per queue: whether its stream is known to exist, or the last failure to set it up.
    streams: Mutex<HashMap<String, StreamState>>,
    /// Per queue: one set-up at a time.
    ensuring: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Body bytes held by requests in progress (one permit a byte).
    body_budget: Arc<tokio::sync::Semaphore>,
    /// Call records (cancels; each call's state with `call_status`).
    calls: CallBook,
}

#[derive(Clone)]
enum StreamState {
    Ready,
    Failed(Instant, String),
}

/// Binds the front door and its metrics port, then connects to NATS and sets up the
/// streams in the background; connections are accepted once that is done (clients wait in
/// the listen backlog meanwhile).
pub async fn start(config: Config) -> anyhow::Result<Running> {
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    // Read here, not by `Config::load`: the worker shares the settings but not the files.
    // Only the function lookups use them.
    let file_auth = if config.frontdoor.check_function {
        config.frontdoor.gateway_auth()?
    } else {
        if config.frontdoor.secret_mount_path.is_some() {
            tracing::info!("secret_mount_path is not read: frontdoor_check_function is off");
        }
        None
    };
    let metrics = FrontDoorMetrics::new();
    let health = Arc::new(Health::default());
    let shutdown = CancellationToken::new();
    let server_stop = CancellationToken::new();
    let metrics_bind = SocketAddr::from(([0, 0, 0, 0], config.metrics_port));
    let (metrics_addr, metrics_server) = server::serve(
        metrics_bind,
        metrics.registry().clone(),
        health.clone(),
        server_stop.clone(),
    )
    .await
    .with_context(|| format!("cannot listen on metrics_port {}", config.metrics_port))?;
    let listener = tokio::net::TcpListener::bind(config.frontdoor.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on frontdoor_listen {}",
                config.frontdoor.listen
            )
        })?;
    let addr = listener.local_addr()?;
    let lookup = if config.frontdoor.check_function {
        let (base, _) = crate::worker::invoke::split_gateway(&config.gateway_url);
        Some(Lookup::new(base, gateway_auth(&config, file_auth))?)
    } else {
        None
    };
    let conn = crate::nats::connect(&config.nats, metrics.reconnects.clone()).await?;
    let client = conn.client;
    let _ = health.nats.set(client.clone());
    let door = Arc::new(Door {
        calls: CallBook::new(jetstream::new(client.clone()), config.clone()),
        js: jetstream::new(client.clone()),
        client: client.clone(),
        lookup,
        metrics: metrics.clone(),
        streams: Mutex::default(),
        ensuring: Mutex::default(),
        body_budget: Arc::new(tokio::sync::Semaphore::new(BODY_BUDGET)),
        config,
    });
    tracing::info!(
        %addr,
        queue = %door.config.queue,
        max_body = door.config.frontdoor.max_body,
        check_function = door.config.frontdoor.check_function,
        "Starting front door"
    );
    let done = CancellationToken::new();
    let task = tokio::spawn(run(
        door,
        listener,
        health.clone(),
        shutdown.clone(),
        done.clone(),
        server_stop,
        metrics_server,
    ));
    Ok(Running {
        addr,
        metrics_addr,
        metrics,
        health,
        shutdown,
        done,
        task,
    })
}

/// Basic auth for the gateway's API: `secret_mount_path`, else credentials in `gateway_url`.
fn gateway_auth(
    config: &Config,
    from_files: Option<(String, crate::config::Secret)>,
) -> Option<(String, crate::config::Secret)> {
    if from_files.is_some() {
        return from_files;
    }
    let (_, auth) = crate::worker::invoke::split_gateway(&config.gateway_url);
    auth.map(|(u, p)| (u, crate::config::Secret::new(p.unwrap_or_default())))
}

async fn run(
    door: Arc<Door>,
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    shutdown: CancellationToken,
    done: CancellationToken,
    server_stop: CancellationToken,
    metrics_server: JoinHandle<()>,
) -> anyhow::Result<()> {
    let drain_timeout = door.config.drain_timeout;
    let app = Router::new()
        .route("/async-function", any(missing_name))
        .route("/async-function/", any(missing_name))
        .route("/async-function/{*rest}", any(handle))
        .with_state(door.clone());
    // Connections are accepted only once NATS is connected and the streams are set up:
    // until then clients wait in the listen backlog (the socket is already bound, so a port
    // conflict failed at start) instead of getting 503s.
    let ready = tokio::select! {
        r = door.prepare(&health) => Some(r),
        _ = shutdown.cancelled() => None,
    };
    let (result, server) = match ready {
        Some(Ok(())) => {
            tracing::info!("Front door ready: accepting requests");
            let server = tokio::spawn(serve_http(listener, app, shutdown.clone()));
            shutdown.cancelled().await;
            (Ok(()), Some(server))
        }
        // Stopped before it was ready; the clients waiting in the backlog are refused.
        None => (Ok(()), None),
        Some(Err(e)) => (Err(e), None),
    };
    health.draining.store(true, Ordering::Relaxed);
    tracing::info!("Front door stopping: no new requests; finishing those in progress");
    if let Some(mut server) = server {
        if tokio::time::timeout(drain_timeout, &mut server)
            .await
            .is_err()
        {
            tracing::warn!("drain_timeout reached; dropping requests still open");
            server.abort();
        }
    }
    // Nothing to flush from a client that never connected (and it would wait the timeout).
    if door.client.connection_state() == async_nats::connection::State::Connected {
        if let Err(e) = tokio::time::timeout(Duration::from_secs(5), door.client.flush()).await {
            tracing::warn!(error = %e, "could not flush NATS before exit");
        }
    }
    server_stop.cancel();
    let _ = metrics_server.await;
    done.cancel();
    tracing::info!("Stopped");
    result
}

/// Serves `app` over HTTP/1 until `stop`, then lets the requests in progress finish (the
/// caller bounds that with `drain_timeout`). Connections that take longer than
/// [`HEADER_TIMEOUT`] to send a request's headers are closed.
async fn serve_http(listener: tokio::net::TcpListener, app: Router, stop: CancellationToken) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // Connections live in this set, so aborting the server (at the drain deadline) ends
    // them too instead of leaving them publishing after the process said it stopped.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, usually: wait rather than spin.
                    tracing::warn!(error = %e, "front door cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "front door connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    while connections.join_next().await.is_some() {}
}

impl Door {
    /// Sets up the streams of the default queue and of every queue in `frontdoor_queues`,
    /// waiting out an unavailable server; then the door is ready.
    async fn prepare(&self, health: &Health) -> anyhow::Result<()> {
        let mut queues: Vec<String> = vec![self.config.queue.clone()];
        queues.extend(self.config.frontdoor.queues.values().cloned());
        queues.sort();
        queues.dedup();
        let mut wait = Duration::from_millis(200);
        for queue in &queues {
            loop {
                match self.ensure(queue).await {
                    Ok(()) => break,
                    Err(LayoutError::Incompatible(msg)) => anyhow::bail!(msg),
                    // Blocked is about consumers, which the front door never makes.
                    Err(LayoutError::Unavailable(msg) | LayoutError::Blocked(msg)) => {
                        tracing::warn!(error = %msg, retry_in = ?wait, "waiting for JetStream");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        let max_payload = self.client.server_info().max_payload as u64;
        let fits = body_limit(self.config.frontdoor.max_body, max_payload);
        if fits < self.config.frontdoor.max_body {
            // Expected with the defaults (1 MiB of body is ~1.4 MB once encoded, NATS allows
            // 1 MB): information, not a warning.
            tracing::info!(
                frontdoor_max_body = self.config.frontdoor.max_body,
                max_payload,
                effective = fits,
                "Body limit lowered to fit the NATS server's max_payload once base64-encoded; larger bodies get 413"
            );
        }
        health.layout_ready.store(true, Ordering::Relaxed);
        health.stream_ok.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn layout(&self, queue: &str) -> Layout {
        let mut layout = Layout::of(&self.config);
        layout.queue = queue.to_string();
        layout.stream = format!("OF_{queue}");
        layout
    }

    /// Makes sure the stream of `queue` exists (once per queue and process, unless a
    /// publish finds it gone). One set-up per queue runs at a time; the requests waiting for
    /// it share its failure for [`ENSURE_FAILURE_TTL`] instead of each trying again.
    async fn ensure(&self, queue: &str) -> Result<(), LayoutError> {
        if let Some(known) = self.stream_state(queue) {
            return known;
        }
        let lock = self
            .ensuring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(queue.to_string())
            .or_default()
            .clone();
        let _one_at_a_time = lock.lock().await;
        if let Some(known) = self.stream_state(queue) {
            return known;
        }
        let result = stream::ensure_stream(&self.js, &self.layout(queue)).await;
        let state = match &result {
            Ok(_) => StreamState::Ready,
            Err(e) => StreamState::Failed(Instant::now(), e.to_string()),
        };
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(queue.to_string(), state);
        result.map(|_| ())
    }

    /// `Some` when the stream is known to be there, or failed to be set up a moment ago.
    fn stream_state(&self, queue: &str) -> Option<Result<(), LayoutError>> {
        match self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(queue)?
        {
            StreamState::Ready => Some(Ok(())),
            StreamState::Failed(at, e) if at.elapsed() < ENSURE_FAILURE_TTL => {
                Some(Err(LayoutError::Unavailable(e.clone())))
            }
            StreamState::Failed(..) => None,
        }
    }

    fn forget(&self, queue: &str) {
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(queue);
    }

    /// Steps 1–5 of the module doc; `Ok` is the call id of a stored request.
    async fn accept(
        &self,
        method: Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<String, Rejection> {
        // A delay in `X-Not-Before` counts from here.
        let received = SystemTime::now();
        let (name, path) = split_path(uri.path(), &self.config.default_namespace)?;
        let function = name.as_written();
        let max_payload = self.client.server_info().max_payload as u64;
        let limit = body_limit(self.config.frontdoor.max_body, max_payload);
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(too_large(limit, max_payload, &self.config));
        }
        // Bytes count against the budget as they arrive (a declared length reserves
        // nothing), and stay counted until the request is answered.
        let (body, _budget) = read_body(body, limit as usize, &self.body_budget)
            .await
            .map_err(|e| match e {
                BodyError::Busy => {
                    Rejection::unavailable("too many request bodies in progress; retry shortly")
                }
                BodyError::TooLarge => too_large(limit, max_payload, &self.config),
                BodyError::Timeout => Rejection::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "bad_request",
                    format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
                ),
                BodyError::Read(e) => Rejection::bad(format!("cannot read the request body: {e}")),
            })?;
        let callback_url = match header_str(headers, "x-callback-url")? {
            None => None,
            Some(raw) => Some(parse_callback(raw)?),
        };
        let start = start_time(headers, received)?;
        let call_id = match header_str(headers, "x-call-id")? {
            Some(id) => check_call_id(id)?.to_string(),
            None => crate::message::publish::new_call_id(),
        };
        let with_id = |mut r: Rejection| {
            r.call_id = Some(call_id.clone());
            r
        };

        let mut annotations = BTreeMap::new();
        let mut queue = self.config.frontdoor.queues.get(name.qualified()).cloned();
        if let Some(lookup) = &self.lookup {
            match lookup.get(&name).await {
                Ok(Found::Missing) => {
                    return Err(Rejection::new(
                        StatusCode::NOT_FOUND,
                        "unknown_function",
                        format!("function {function} not found"),
                    ))
                }
                Ok(Found::Exists { annotations: all }) => {
                    if queue.is_none() {
                        queue = self.annotated_queue(function, all.get(QUEUE_ANNOTATION));
                    }
                    annotations.extend(all.into_iter().filter(|(k, _)| {
                        k.starts_with(COPIED_ANNOTATION_PREFIX)
                            || COPIED_ANNOTATIONS.contains(&k.as_str())
                    }));
                }
                Err(e) => {
                    // Logged once per failed lookup (by `Lookup`), not once per request.
                    tracing::debug!(function, error = %e, "cannot check the function; answering 503");
                    return Err(with_id(Rejection::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "lookup_failed",
                        format!("cannot check that function {function} exists: {e}"),
                    )));
                }
            }
        }
        let queue_name = queue.clone().unwrap_or_default();
        let queue = queue.unwrap_or_else(|| self.config.queue.clone());

        let method = match header_str(headers, "x-http-method-override")? {
            None => method.as_str().to_string(),
            Some(m) if method == Method::POST => check_method_override(m)?,
            Some(_) => {
                return Err(Rejection::bad(
                    "X-HTTP-Method-Override is honoured on POST only",
                ))
            }
        };
        let mut request = QueueRequest {
            method,
            function: function.to_string(),
            path: path.to_string(),
            query_string: uri.query().unwrap_or_default().to_string(),
            host: header_str(headers, "host")
                .ok()
                .flatten()
                .unwrap_or_default()
                .to_string(),
            body,
            queue_name,
            annotations,
            callback_url,
            ..QueueRequest::default()
        };
        for (name, value) in headers {
            // The call id is set once below: an empty or repeated X-Call-Id must not leave
            // the message with an id other than the one answered and used for dedup.
            // X-Not-Before is stored once, as the absolute time it was checked to be.
            if name == header::HOST
                || matches!(
                    name.as_str(),
                    "x-call-id" | "x-not-before" | "x-http-method-override"
                )
            {
                continue;
            }
            request.append_header(
                &canonical_header(name.as_str()),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            );
        }
        if let Some(at) = start {
            request.append_header(not_before::HEADER, not_before::format(at));
        }
        request.stamp(&call_id);
        let payload = serde_json::to_vec(&request)
            .map_err(|e| with_id(Rejection::bad(format!("cannot encode the request: {e}"))))?;
        if max_payload > 0 && payload.len() as u64 + NATS_HEADER_ROOM > max_payload {
            return Err(with_id(Rejection::too_large(format!(
                "the queued message would be {} bytes (body base64-encoded, headers included), over the NATS server's max_payload of {max_payload}",
                payload.len()
            ))));
        }

        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(with_id(Rejection::unavailable(
                "not connected to NATS; nothing was queued",
            )));
        }
        let subject = name.subject(&queue);
        let msg_id = format!(
            "{call_id}:{:016x}",
            fingerprint(&[
                subject.as_bytes(),
                request.method.as_bytes(),
                request.path.as_bytes(),
                request.query_string.as_bytes(),
                &request.body,
            ])
        );
        let started = Instant::now();
        let ack = self
            .publish(&queue, &subject, &msg_id, payload.into())
            .await
            .map_err(with_id)?;
        self.metrics.accepted(
            &queue,
            name.qualified(),
            ack.duplicate,
            started.elapsed().as_secs_f64(),
        );
        if ack.duplicate {
            tracing::debug!(call_id, function, "duplicate submission; stored once");
        } else if self.config.calls.status {
            // Stored: record it as queued before answering, so a status request right
            // after the 202 finds it. A failure here loses a status, never the call.
            let mut record = Record::new(
                &call_id,
                call_records::State::Queued,
                name.qualified(),
                &queue,
            );
            record.seq = Some(ack.sequence);
            record.not_before = start.map(time::OffsetDateTime::from);
            if let Err(e) = self.calls.queued(&record).await {
                tracing::warn!(call_id, error = %e, "call stored, but its status was not recorded");
                self.metrics.call_request("record", "error");
            }
        }
        Ok(call_id)
    }

    /// The queue named by a function's `com.openfaas.queue` annotation, when valid.
    fn annotated_queue(&self, function: &str, value: Option<&String>) -> Option<String> {
        let v = value?.trim();
        if v.is_empty() {
            return None;
        }
        if is_queue_name(v) {
            return Some(v.to_string());
        }
        tracing::warn!(
            function,
            annotation = QUEUE_ANNOTATION,
            value = v,
            expected = "letters, digits, '-' and '_'",
            "invalid queue annotation; using the default queue"
        );
        None
    }

    /// Publishes and waits for JetStream's acknowledgement. A stream that went missing
    /// (deleted by an operator) is set up again and the publish tried once more; the
    /// message id makes that retry safe.
    async fn publish(
        &self,
        queue: &str,
        subject: &str,
        msg_id: &str,
        payload: Bytes,
    ) -> Result<jetstream::publish::PublishAck, Rejection> {
        let stream_unavailable = |e: LayoutError| {
            Rejection::unavailable(format!(
                "stream OF_{queue} is not available ({e}); nothing was queued"
            ))
        };
        self.ensure(queue).await.map_err(stream_unavailable)?;
        let mut retried = false;
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", msg_id);
            let sent = self
                .js
                .publish_with_headers(subject.to_string(), headers, payload.clone())
                .await;
            let result = match sent {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match result {
                Ok(ack) => return Ok(ack),
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound && !retried => {
                    tracing::warn!(
                        queue,
                        "stream missing while publishing; setting it up again"
                    );
                    retried = true;
                    self.forget(queue);
                    self.ensure(queue).await.map_err(stream_unavailable)?;
                }
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    return Err(Rejection::too_large(format!(
                        "the queued message is over the NATS server's max_payload: {e}"
                    )))
                }
                Err(e) => {
                    tracing::warn!(queue, msg_id, error = %e, "publish not acknowledged; answering 503");
                    return Err(Rejection::unavailable(format!(
                        "JetStream did not acknowledge the request ({e}); retry with the same X-Call-Id"
                    )));
                }
            }
        }
    }
}

async fn handle(
    State(door): State<Arc<Door>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // As on OpenFaaS Pro's gateway, DELETE cancels a call by its id; GET asks its status.
    // A DELETE or GET invocation is sent as a POST with X-HTTP-Method-Override.
    if method == Method::DELETE {
        return calls::cancel(&door, &uri).await;
    }
    if method == Method::GET {
        return calls::status(&door, &uri).await;
    }
    match door.accept(method, &uri, &headers, body).await {
        Ok(call_id) => {
            let mut response = StatusCode::ACCEPTED.into_response();
            if let Ok(v) = HeaderValue::from_str(&call_id) {
                response.headers_mut().insert("x-call-id", v);
            }
            response
        }
        Err(r) => {
            door.metrics.rejected(r.reason);
            if r.status.is_server_error() {
                tracing::debug!(status = r.status.as_u16(), reason = r.reason, message = %r.message, "request refused");
            }
            let mut response = (r.status, format!("{}\n", r.message)).into_response();
            if let Some(v) = r.call_id.and_then(|id| HeaderValue::from_str(&id).ok()) {
                response.headers_mut().insert("x-call-id", v);
            }
            response
        }
    }
}

async fn missing_name(State(door): State<Arc<Door>>) -> Response {
    door.metrics.rejected("bad_request");
    (
        StatusCode::BAD_REQUEST,
        "missing function name: use /async-function/<name>\n",
    )
        .into_response()
}

/// The function and the rest of the path, as the gateway splits
/// `/async-function/<name><path>`. The path keeps its percent-encoding, so it reaches the
/// function as it was sent.
fn split_path<'a>(
    full: &'a str,
    default_namespace: &str,
) -> Result<(FunctionName, &'a str), Rejection> {
    let rest = full.strip_prefix("/async-function/").unwrap_or_default();
    let (name, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    match FunctionName::parse(name, default_namespace) {
        Ok(function) => Ok((function, path)),
        Err(e) => {
            let shown: String = name.chars().take(80).collect();
            Err(Rejection::bad(format!(
                "invalid function name {shown:?}: {e}"
            )))
        }
    }
}

/// The largest body that is queued: the configured limit, lowered so that the body, once
/// base64-encoded (4/3 of its size) with the request's headers, fits `max_payload`.
pub fn body_limit(max_body: u64, max_payload: u64) -> u64 {
    if max_payload == 0 {
        return max_body;
    }
    let fits = max_payload.saturating_sub(ENVELOPE_RESERVE) / 4 * 3;
    max_body.min(fits)
}

/// Why a body could not be read.
enum BodyError {
    /// The budget of bytes held at once is spent.
    Busy,
    TooLarge,
    Timeout,
    Read(String),
}

/// Reads a body of at most `limit` bytes within [`BODY_TIMEOUT`], taking one permit of
/// `budget` per byte as it arrives; the permits come back when the caller drops them.
async fn read_body(
    body: Body,
    limit: usize,
    budget: &Arc<tokio::sync::Semaphore>,
) -> Result<(Vec<u8>, Option<tokio::sync::OwnedSemaphorePermit>), BodyError> {
    use futures_util::StreamExt as _;
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let read = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| BodyError::Read(e.to_string()))?;
            if out.len() + chunk.len() > limit {
                return Err(BodyError::TooLarge);
            }
            if !chunk.is_empty() {
                let permit = budget
                    .clone()
                    .try_acquire_many_owned(chunk.len() as u32)
                    .map_err(|_| BodyError::Busy)?;
                match held.as_mut() {
                    Some(h) => h.merge(permit),
                    None => held = Some(permit),
                }
            }
            out.extend_from_slice(&chunk);
        }
        Ok(())
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .map_err(|_| BodyError::Timeout)??;
    Ok((out, held))
}

/// FNV-1a over the parts (with their lengths, so parts cannot run into each other): the
/// same on every replica and version, which a deduplication id needs.
pub fn fingerprint(parts: &[&[u8]]) -> u64 {
    parts
        .iter()
        .fold(crate::message::fingerprint::Fnv1a::default(), |h, p| {
            h.part(p)
        })
        .finish()
}

fn too_large(limit: u64, max_payload: u64, config: &Config) -> Rejection {
    let why = if limit < config.frontdoor.max_body {
        format!(" (frontdoor_max_body, lowered to fit the NATS server's max_payload of {max_payload} once encoded)")
    } else {
        " (frontdoor_max_body)".to_string()
    };
    Rejection::too_large(format!("request body larger than {limit} bytes{why}"))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Rejection> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()).filter(|s| !s.is_empty()))
            .map_err(|_| Rejection::bad(format!("header {name} is not valid text"))),
    }
}

/// `X-Not-Before` as an absolute time: RFC 3339, or a delay in seconds from `received`;
/// refused (400) when malformed, negative, more than 7 days ahead, or sent twice.
fn start_time(headers: &HeaderMap, received: SystemTime) -> Result<Option<SystemTime>, Rejection> {
    if headers.get_all("x-not-before").iter().count() > 1 {
        return Err(Rejection::bad(format!(
            "{} was sent more than once; send one: {}",
            not_before::HEADER,
            not_before::ALLOWED
        )));
    }
    match header_str(headers, "x-not-before")? {
        None => Ok(None),
        Some(raw) => not_before::parse(raw, received)
            .map(Some)
            .map_err(|e| Rejection::bad(e.to_string())),
    }
}

fn parse_callback(raw: &str) -> Result<String, Rejection> {
    match url::Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(raw.into()),
        _ => Err(Rejection::bad(format!(
            "X-Callback-Url {raw:?} is not an absolute http(s) URL"
        ))),
    }
}

/// The method of an invocation sent with `X-HTTP-Method-Override` (an HTTP token).
fn check_method_override(m: &str) -> Result<String, Rejection> {
    let m = m.to_ascii_uppercase();
    match Method::from_bytes(m.as_bytes()) {
        Ok(_) if m.len() <= 32 => Ok(m),
        _ => Err(Rejection::bad(format!(
            "X-HTTP-Method-Override {m:?} is not an HTTP method"
        ))),
    }
}

fn check_call_id(id: &str) -> Result<&str, Rejection> {
    if id.len() <= MAX_CALL_ID && id.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(id)
    } else {
        Err(Rejection::bad(format!(
            "X-Call-Id must be at most {MAX_CALL_ID} visible ASCII characters"
        )))
    }
}

/// A header name in Go's canonical form (`content-type` → `Content-Type`), as the gateway's
/// `http.Header` holds them.
pub fn canonical_header(name: &str) -> String {
    let mut upper = true;
    name.chars()
        .map(|c| {
            let out = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_as_the_gateway_does() {
        let split =
            |p| split_path(p, "openfaas-fn").map(|(f, path)| (f.as_written().to_string(), path));
        assert_eq!(
            split("/async-function/sleep").unwrap(),
            ("sleep".into(), "")
        );
        assert_eq!(
            split("/async-function/sleep/").unwrap(),
            ("sleep".into(), "/")
        );
        let (f, path) = split_path("/async-function/sleep.team-a/a/b%20c", "openfaas-fn").unwrap();
        assert_eq!((f.tokens(), path), (("sleep", "team-a"), "/a/b%20c"));
        let (f, _) = split_path("/async-function/sleep", "openfaas-fn").unwrap();
        assert_eq!(f.qualified(), "sleep.openfaas-fn");
        for bad in [
            "/async-function/",
            "/async-function/a.b.c",
            "/async-function/a*b",
            "/async-function/.x",
            "/async-function/x.",
            "/async-function/%2e%2e",
        ] {
            let r = split(bad).unwrap_err();
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        let long = format!("/async-function/{}", "f".repeat(254));
        assert!(split(&long).is_err());
    }

    /// The front door takes exactly the names the worker runs: one it queued and the worker
    /// dead-lettered as `bad_function` (or the other way round) would be a lost call.
    #[test]
    fn the_front_door_takes_the_names_the_worker_runs() {
        let decoder =
            crate::worker::job::Decoder::new("http://gw:8080", "openfaas-fn", 1 << 16).unwrap();
        let long = "f".repeat(crate::message::function::MAX_LEN + 1);
        for name in [
            "sleep",
            "sleep.team-a",
            "Sleep",
            "a_b-c",
            "a.b.c",
            "a..b",
            ".x",
            "x.",
            "a*b",
            "é",
            "a%20b",
            &long,
        ] {
            let path = format!("/async-function/{name}");
            let door = split_path(&path, "openfaas-fn");
            let doc = serde_json::json!({ "Function": name });
            let worker = decoder.decode(doc.to_string().as_bytes());
            assert_eq!(door.is_ok(), worker.is_ok(), "{name:?}: {worker:?}");
            if let (Ok((f, _)), Ok(inv)) = (door, worker) {
                assert_eq!(f, inv.function);
            }
        }
    }

    #[test]
    fn the_body_limit_fits_max_payload() {
        assert_eq!(body_limit(1 << 20, 0), 1 << 20);
        assert_eq!(body_limit(1 << 20, 8 << 20), 1 << 20);
        let fits = body_limit(1 << 20, 1_048_576);
        assert!(fits < 1 << 20);
        // The base64 of the largest body plus the reserve is within max_payload.
        assert!(fits.div_ceil(3) * 4 + ENVELOPE_RESERVE <= 1_048_576);
        assert_eq!(body_limit(100, 1_048_576), 100);
    }

    #[test]
    fn headers_take_go_canonical_names() {
        assert_eq!(canonical_header("content-type"), "Content-Type");
        assert_eq!(canonical_header("x-call-id"), "X-Call-Id");
        assert_eq!(canonical_header("X-CALLBACK-URL"), "X-Callback-Url");
    }

    #[test]
    fn call_ids_and_callbacks_are_checked() {
        assert!(check_call_id("0f7c1c5e-1d2b-4b8a-9a43-2a6c0b1e9d11").is_ok());
        assert!(check_call_id("a b").is_err());
        assert!(check_call_id(&"x".repeat(MAX_CALL_ID + 1)).is_err());
        assert!(parse_callback("http://cb:8080/x?y=1").is_ok());
        assert!(parse_callback("ftp://cb/x").is_err());
        assert!(parse_callback("/relative").is_err());
    }
}
