//! The integration suite: one binary, real nats-server, real HTTP fake gateway.

mod auth;
mod chart;
mod cli;
mod cluster;
mod consumers;
mod deadletter;
mod demo;
mod faults;
mod flow;
mod frontdoor;
mod function_mode;
mod function_mode_faults;
mod layout;
mod limiter;
mod queue;
mod retry;
mod shutdown;
mod stale;
mod support;
