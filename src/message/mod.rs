//! The message every producer writes and the worker reads: the OpenFaaS gateway's
//! `QueueRequest` ([`request`]) and publishing it to `<queue>.<fn>.<ns>` ([`publish`]).

pub mod fingerprint;
pub mod function;
pub mod publish;
pub mod request;
