//! What the process tells its operators: log lines ([`logging`]), Prometheus metrics
//! ([`metrics`]) and the HTTP endpoints that serve them with the health probes ([`server`]).

pub mod logging;
pub mod metrics;
pub mod server;
