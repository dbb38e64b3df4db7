//! The integration suite: one binary, real nats-server, real HTTP fake gateway.

mod auth;
mod chart;
mod cli;
mod consumers;
mod deadletter;
mod demo;
mod faults;
mod flow;
mod frontdoor;
mod function_mode;
mod function_mode_faults;
mod layout;
mod lifecycle;
mod lifecycle_timing;
mod limiter;
mod queue;
mod reliability;
mod retry;
mod secrets;
mod shutdown;
mod ssrf;
mod stale;
mod support;
