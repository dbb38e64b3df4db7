//! queue-worker: runs OpenFaaS asynchronous invocations out of NATS JetStream.
//!
//! A message's path through the crate (the numbers match the module docs):
//!
//! ```text
//! OF_<queue> ──① consumer (pull only what can start) ──② job (decode QueueRequest)
//!     ──⑤ invoke (HTTP to <gateway>/function/<name>, lease renewed while it runs)
//!     ──⑥ retry::decide (pure) ──> job.settle (ack / nak+delay / dead-letter, then term)
//!     ──⑦ callback (after settling, bounded retries) ──⑧ metrics
//! ```
//!
//! # Layout
//! - [`config`]: keys, sources (flag > env > file > default) and validation.
//! - [`app`]: wiring and the graceful drain.
//! - [`nats`], [`stream`]: the connection; the stream and consumer layout.
//! - [`consumer`]: the pull loop. [`job`]: a delivered message and its settle.
//! - [`worker`]: one message's straight line. [`invoke`] (over [`connector`]), [`retry`],
//!   [`callback`]. [`lease`]: keeping the lease while it waits or runs.
//! - [`deadletter`]: the dead-letter stream `OF_<queue>-dead` and its operator commands.
//! - [`metrics`], [`server`]: Prometheus metrics and health endpoints.
//! - [`request`]: the `QueueRequest` wire format. [`publish`]: writing it.
//! - [`frontdoor`]: `POST /async-function/<name>` publishes to the queue as the gateway does.
//! - [`cli`]: operator commands (`queue status/purge`, `dead list/replay/purge`).
//! - [`natsd`], [`sample`], [`demo`]: a local nats-server, a sample gateway, the demo.

pub mod app;
pub mod callback;
pub mod cli;
pub mod config;
pub mod connector;
pub mod consumer;
pub mod deadletter;
pub mod demo;
pub mod duration;
pub mod frontdoor;
pub mod invoke;
pub mod job;
pub mod lease;
pub mod logging;
pub mod metrics;
pub mod nats;
pub mod natsd;
pub mod publish;
pub mod request;
pub mod retry;
pub mod sample;
pub mod server;
pub mod stream;
pub mod tls;
pub mod worker;
