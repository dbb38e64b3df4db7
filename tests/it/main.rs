//! The integration suite: one binary, real nats-server, real HTTP fake gateway.

mod auth;
mod cli;
mod cluster;
mod deadletter;
mod faults;
mod flow;
mod layout;
mod retry;
mod shutdown;
mod support;
