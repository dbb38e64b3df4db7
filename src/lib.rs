//! queue-worker: runs OpenFaaS asynchronous invocations out of NATS JetStream.
//!
//! A message's path through the crate, one folder per stage:
//!
//! ```text
//! producers: message/ (QueueRequest, publish) ← frontdoor/ (POST /async-function/<name>), cli/ (publish)
//!     │
//! OF_<queue>  (nats/: connection, stream and consumer set-up)
//!     │
//! worker/: ① pull (only what can start) ─② job (decode) ─③ invoke (HTTP to
//!     <gateway>/function/<name>, lease renewed) ─④ retry::decide (pure) ─⑤ settle (ack /
//!     nak+delay / dead-letter, then term) ─⑥ callback ─⑦ telemetry/ (metrics)
//! ```
//!
//! # Layout
//! - [`config`]: keys, sources (flag > env > file > default), validation, durations.
//! - [`message`]: the `QueueRequest` wire format, what a function name is (`fn` or `fn.ns`),
//!   and publishing; shared by every producer
//!   and the worker.
//! - [`nats`]: the connection, and the stream and consumer layout.
//! - [`worker`]: the daemon: wiring and drain, the pull loop, one message's flow, and each
//!   stage of it (job, invoke, retry, callback, dead letter).
//! - [`frontdoor`]: `POST /async-function/<name>` publishes to the queue as the gateway does.
//! - [`cli`]: operator commands (`queue status/purge`, `dead list/replay/purge`).
//! - [`telemetry`]: logging, Prometheus metrics, the health and metrics endpoints.
//! - [`dev`]: development helpers, never on the production path: a local nats-server, a
//!   sample gateway, the demo.
//! - [`tls`]: the process-wide rustls provider.

pub mod cli;
pub mod config;
pub mod dev;
pub mod frontdoor;
pub mod message;
pub mod nats;
pub mod telemetry;
pub mod tls;
pub mod worker;
