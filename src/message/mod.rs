//! The message every producer writes and the worker reads: the OpenFaaS gateway's
//! `QueueRequest` ([`request`]) and publishing it to `<queue>.<fn>.<ns>` ([`publish`]);
//! [`not_before`] is its delayed-start header, read by every producer and the worker.

pub mod fingerprint;
pub mod function;
pub mod not_before;
pub mod publish;
pub mod request;
