//! The `queue-worker` binary. With no subcommand it runs the worker configured from env vars,
//! as the OpenFaaS container does. Exit codes: 0 after a clean stop, 1 on a runtime failure
//! (for example an incompatible stream), 2 on bad configuration or usage.

//!
//! Everything else lives in the library: the command line in `cli::args`, what each command
//! does in `cli::commands`. This file owns what only a process has: the runtime, logging,
//! and the exit code.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;
use queue_worker::cli::args::{load_config, strip_openfaas_flags, Cli, Command};
use queue_worker::cli::CliError;
use queue_worker::config::{ConfigError, LogEncoding};
use queue_worker::nats::ConnectError;

/// The async runtime. One thread (the default, `worker_threads=1`) runs every task on the
/// thread that woke it: no task moves between threads, so no cross-thread wake-ups (futex
/// calls), no contended allocator arenas. In `BENCHMARKS.md` that cut the worker's CPU per
/// call from about 39 µs to 24 µs and raised throughput on two cores, where the worker
/// shares the machine with nats-server and the functions. One thread still carries tens of
/// thousands of calls per second; more threads (`0`: one per CPU) buy headroom for CPU-heavy
/// work such as TLS to many callback receivers, at a higher cost per call.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder.enable_all().build()
}

fn main() -> ExitCode {
    let (args, openfaas_flags) = strip_openfaas_flags(std::env::args_os());
    let cli = Cli::parse_from(args);
    let config = match load_config(&cli.settings) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("queue-worker: configuration error: {msg}");
            return ExitCode::from(2);
        }
    };
    // The proxy variables decide how function calls reach the gateway: one the worker
    // cannot use is a configuration error, found before anything connects.
    if matches!(
        cli.command,
        None | Some(Command::Run | Command::CheckConfig)
    ) {
        if let Some(Err(e)) = config
            .as_ref()
            .map(|c| queue_worker::worker::connector::check(&c.gateway_url))
        {
            eprintln!("queue-worker: configuration error: {e}");
            return ExitCode::from(2);
        }
    }
    let (encoding, debug, flush_interval) = config
        .as_ref()
        .map(|c| (c.log_encoding, c.debug, c.log_flush_interval))
        .unwrap_or((LogEncoding::Console, false, Duration::ZERO));
    let quiet = matches!(
        cli.command,
        Some(Command::Demo(_) | Command::Queue(_) | Command::Dead(_))
    );
    queue_worker::telemetry::logging::init(encoding, debug, quiet, flush_interval);
    if !openfaas_flags.is_empty() {
        tracing::info!(
            flags = %openfaas_flags.join(" "),
            "ignoring OpenFaaS Pro flags: no licence is needed"
        );
    }
    let threads = config.as_ref().map_or(0, |c| c.worker_threads);
    let runtime = match runtime(threads) {
        Ok(rt) => rt,
        Err(e) => {
            queue_worker::telemetry::logging::finish();
            queue_worker::telemetry::logging::last_words(format_args!(
                "queue-worker: cannot start the runtime: {e}"
            ));
            return ExitCode::from(1);
        }
    };
    if !flush_interval.is_zero() {
        runtime.spawn(queue_worker::telemetry::logging::flush_periodically(
            flush_interval,
        ));
    }
    let result = runtime.block_on(queue_worker::cli::commands::run(cli.command, config));
    // Tasks still running are dropped with the runtime and may log: write after that.
    drop(runtime);
    let plain =
        |e: &anyhow::Error| e.is::<CliError>() || e.is::<ConnectError>() || e.is::<ConfigError>();
    if let Err(e) = &result {
        if !plain(e) {
            tracing::error!("{e:#}");
        }
    }
    // Everything logged is written (unless it was dropped for a full queue) before the
    // last message below, which goes straight to stderr.
    queue_worker::telemetry::logging::finish();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Settings only a command reads when it starts (the front door's secret files).
        Err(e) if e.is::<ConfigError>() => {
            queue_worker::telemetry::logging::last_words(format_args!(
                "queue-worker: configuration error: {e}"
            ));
            ExitCode::from(2)
        }
        Err(e) if plain(&e) => {
            let e = match e.downcast::<ConnectError>() {
                Ok(c) => CliError::from(c),
                Err(e) => e.downcast::<CliError>().expect("checked above"),
            };
            queue_worker::telemetry::logging::last_words(format_args!("queue-worker: {e}"));
            ExitCode::from(e.exit_code())
        }
        Err(e) => {
            queue_worker::telemetry::logging::last_words(format_args!("queue-worker: {e:#}"));
            ExitCode::from(1)
        }
    }
}
