//! Logging setup: `log_encoding` console or json, `debug` for debug level. `RUST_LOG`, when
//! set, overrides the level filter (for example `RUST_LOG=queue_worker=debug,async_nats=info`).

use tracing_subscriber::EnvFilter;

use crate::config::LogEncoding;

/// Installs the global subscriber; later calls do nothing. `quiet` logs warnings only (the
/// demo, whose own output is the show).
pub fn init(encoding: LogEncoding, debug: bool, quiet: bool) {
    let default = if quiet {
        "warn"
    } else if debug {
        "debug,hyper=info,reqwest=info,h2=info,rustls=info"
    } else {
        "info,async_nats=warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: escape codes in a log collector are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match encoding {
        LogEncoding::Console => builder.try_init(),
        LogEncoding::Json => builder.json().flatten_event(true).try_init(),
    };
}
