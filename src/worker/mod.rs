//! The worker daemon: from a pulled message to a settled one.
//!
//! - [`run`]: wiring (metrics first, then NATS, the stream and consumer, the poller and the
//!   pull loop) and the graceful drain. [`start`] and [`Running`] are the entry point.
//! - [`pull`]: ① static mode's pull loop, which asks only for what its free slots can start.
//! - [`functions`]: ① function mode's pull loop: a consumer per function with work, fair
//!   slots from [`schedule`] (pure), work found by [`discovery`], idle consumers reaped.
//! - [`stale`]: the pure decision whether a stream counts messages its consumer already ran
//!   (a nats-server fault), read by [`discovery`] and static mode's poller.
//! - [`slot`]: the right to run one message, in either mode; it gives itself back on drop.
//! - [`flow`]: one message's straight line, from delivery to callback.
//! - [`job`]: ② a delivered message, its decode and its settle (the JetStream ack kinds).
//! - [`timing`]: the pure gate after the decode: not before its start time (`X-Not-Before`,
//!   a NAK until then), not past its maximum age (dead-lettered as `expired`); and the
//!   attempt number's correction for a deferral.
//! - [`lease`]: keeping a message's lease while it waits or its call runs.
//! - [`invoke`] (over [`connector`]): ③ the HTTP call to the function.
//! - [`retry`]: ④ the pure decision: ack, retry later, or give up.
//! - [`schedule`]: function mode's pure fair-slot scheduler: which function may pull how
//!   many messages.
//! - [`deadletter`]: ⑤ give-ups, stored in `OF_<queue>-dead` before the original is
//!   terminated; also read by the `dead` operator commands.
//! - [`callback`]: ⑥ the result, posted to the caller's `X-Callback-Url`, where
//!   [`allowlist`] (pure) allows it (`callback_allowed_networks`).

pub mod allowlist;
pub mod callback;
pub mod connector;
pub mod deadletter;
pub mod discovery;
pub mod flow;
pub mod functions;
pub mod invoke;
pub mod job;
pub mod lease;
pub mod lifecycle;
pub mod limiter;
pub mod pull;
pub mod retry;
pub mod run;
pub mod schedule;
pub mod slot;
pub mod stale;
pub mod timing;

pub use run::{start, Running};
