//! Development helpers, never on the worker's or the front door's production path: a local
//! nats-server child process ([`natsd`], also used by the tests and the benchmark), a sample
//! gateway ([`sample`]) and the self-contained demo ([`demo`]).

pub mod demo;
pub mod natsd;
pub mod sample;
