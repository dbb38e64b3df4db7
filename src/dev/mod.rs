//! Development helpers, never on the worker's or the front door's production path: a local
//! nats-server child process ([`natsd`], also used by the tests and the benchmark), a sample
//! gateway ([`sample`]), a fake function platform with replicas and an autoscaler
//! ([`platform`], for load simulations) and the self-contained demo ([`demo`]).

pub mod demo;
pub mod natsd;
pub mod platform;
pub mod sample;
