//! The `queue-worker` binary. With no subcommand it runs the worker configured from env vars,
//! as the OpenFaaS container does. Exit codes: 0 after a clean stop, 1 on a runtime failure
//! (for example an incompatible stream), 2 on bad configuration or usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use queue_worker::cli::{self, CliError};
use queue_worker::config::{Config, ConfigError, LogEncoding, Sources};
use queue_worker::deadletter::{Filter, Reason};
use queue_worker::nats::ConnectError;

#[derive(Parser)]
#[command(
    name = "queue-worker",
    version,
    about = "Runs OpenFaaS asynchronous invocations out of NATS JetStream"
)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Configuration flags. Each is the same key as the env var and the YAML file; flags win.
#[derive(Args)]
struct Settings {
    /// YAML file of settings (same keys as the env vars; see config.example.yaml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Any setting as KEY=VALUE (repeatable), e.g. --set max_retry_attempts=5.
    #[arg(long = "set", short = 's', global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[arg(long, global = true, value_name = "URL")]
    gateway_url: Option<String>,
    #[arg(long, global = true, value_name = "URLS")]
    nats_url: Option<String>,
    #[arg(long, global = true, value_name = "NAME")]
    queue_name: Option<String>,
    #[arg(long, global = true, value_name = "N")]
    max_inflight: Option<String>,
    #[arg(long, global = true, value_name = "DURATION")]
    ack_wait: Option<String>,
    #[arg(long, global = true, value_name = "DURATION")]
    upstream_timeout: Option<String>,
    #[arg(long, global = true, value_name = "DURATION")]
    drain_timeout: Option<String>,
    #[arg(long, global = true, value_name = "PORT")]
    metrics_port: Option<String>,
    #[arg(long, global = true, value_name = "console|json")]
    log_encoding: Option<String>,
    /// Log at debug level.
    #[arg(long, global = true)]
    debug: bool,
}

impl Settings {
    fn pairs(&self) -> Result<Vec<(String, String)>, String> {
        let mut pairs = Vec::new();
        let named = [
            ("gateway_url", &self.gateway_url),
            ("nats_url", &self.nats_url),
            ("queue_name", &self.queue_name),
            ("max_inflight", &self.max_inflight),
            ("ack_wait", &self.ack_wait),
            ("upstream_timeout", &self.upstream_timeout),
            ("drain_timeout", &self.drain_timeout),
            ("metrics_port", &self.metrics_port),
            ("log_encoding", &self.log_encoding),
        ];
        for (k, v) in named {
            if let Some(v) = v {
                pairs.push((k.to_string(), v.clone()));
            }
        }
        if self.debug {
            pairs.push(("debug".into(), "true".into()));
        }
        for kv in &self.set {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
            pairs.push((k.trim().to_string(), v.to_string()));
        }
        Ok(pairs)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker (the default).
    Run,
    /// Publish invocations in the gateway's format, e.g. `queue-worker publish sleep --data hi`.
    Publish(PublishArgs),
    /// Run a sample gateway: /function/<name> sleeps and echoes, /callback counts.
    SampleFunction(SampleArgs),
    /// Run a self-contained demo: nats-server, sample `sleep` function, worker, front door,
    /// a burst of jobs with live progress.
    Demo(DemoArgs),
    /// Validate the configuration and print the effective settings (secrets hidden).
    CheckConfig,
    /// Inspect, replay or purge the dead-letter stream OF_<queue>-dead.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Inspect or purge the work queue OF_<queue> while workers run.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Run the async front door: POST /async-function/<name> queues a call and answers 202.
    Frontdoor {
        /// Address to listen on [default: frontdoor_listen, 0.0.0.0:8080].
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Messages and bytes, depth per function, consumers, oldest message age.
    Status {
        /// Print one JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Remove queued jobs now, with no restart: those of one function, or all (with --yes).
    Purge {
        /// Only this function (`fn` or `fn.namespace`).
        #[arg(long, value_parser = parse_function)]
        function: Option<String>,
        /// Confirm removing every queued job when no --function is given.
        #[arg(long)]
        yes: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DeadCommand {
    /// List entries, oldest first: function, reason, attempts, last status, age.
    List {
        #[command(flatten)]
        filter: DeadFilter,
        /// Only this reason.
        #[arg(long, value_parser = parse_reason)]
        reason: Option<Reason>,
        /// Print one JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Publish entries back to the work queue (with a fresh set of attempts) and remove them.
    /// Only give-ups (attempts_exhausted) unless --reason or --any-reason says otherwise:
    /// undecodable messages would come straight back.
    Replay {
        #[command(flatten)]
        filter: DeadFilter,
        /// Only this reason [default: attempts_exhausted].
        #[arg(long, value_parser = parse_reason, conflicts_with = "any_reason")]
        reason: Option<Reason>,
        /// Replay entries of every reason.
        #[arg(long)]
        any_reason: bool,
    },
    /// Remove entries: those of one function, or all of them (with --yes).
    Purge {
        /// Only this function (`fn` or `fn.namespace`).
        #[arg(long, value_parser = parse_function)]
        function: Option<String>,
        /// Confirm removing every entry when no --function is given.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
struct DeadFilter {
    /// Only this function (`fn` or `fn.namespace`).
    #[arg(long, value_parser = parse_function)]
    function: Option<String>,
    /// At most this many entries.
    #[arg(long)]
    limit: Option<usize>,
}

impl DeadFilter {
    fn filter(&self, reason: Option<Reason>) -> Filter {
        Filter {
            function: self.function.clone(),
            reason,
            limit: self.limit,
        }
    }
}

/// A function name as the gateway accepts it; wildcards would widen a subject filter.
fn parse_function(s: &str) -> Result<String, String> {
    if queue_worker::deadletter::is_subject_tail(s) {
        Ok(s.to_string())
    } else {
        Err("expected a function name `fn` or `fn.namespace` (letters, digits, '-', '_')".into())
    }
}

fn parse_reason(s: &str) -> Result<Reason, String> {
    Reason::parse(s).ok_or_else(|| {
        let all: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        format!("expected one of {}", all.join(", "))
    })
}

#[derive(Args)]
struct PublishArgs {
    /// Function name, `fn` or `fn.namespace`.
    function: String,
    /// Request body.
    #[arg(long, conflicts_with = "data_file")]
    data: Option<String>,
    /// Read the request body from a file.
    #[arg(long, value_name = "FILE")]
    data_file: Option<PathBuf>,
    /// How many copies to publish, each with its own call id.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Where to post the result.
    #[arg(long, value_name = "URL")]
    callback_url: Option<String>,
    /// Extra header as `Name: value` (repeatable).
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Path after the function name, e.g. `/sub/path`.
    #[arg(long, default_value = "")]
    path: String,
    /// Query string without `?`.
    #[arg(long, default_value = "")]
    query: String,
    /// A function annotation as KEY=VALUE (repeatable), as the gateway copies them into the
    /// message, e.g. `--annotation com.openfaas.retry.attempts=3`.
    #[arg(long = "annotation", short = 'a', value_name = "KEY=VALUE")]
    annotations: Vec<String>,
}

#[derive(Args)]
struct DemoArgs {
    /// Jobs in the burst.
    #[arg(long, default_value_t = 200)]
    jobs: usize,
    /// The worker's max_inflight.
    #[arg(long = "inflight", default_value_t = 16)]
    inflight: usize,
    /// The sample function's own limit; calls above it get 429 and are retried.
    #[arg(long, default_value_t = 10)]
    function_inflight: u64,
    /// Front door address (try `hey -m POST -n 500 -c 4 http://ADDR/async-function/sleep`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Keep everything running after the burst, until Ctrl-C.
    #[arg(long)]
    stay: bool,
}

#[derive(Args)]
struct SampleArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    #[arg(long, default_value_t = 50)]
    min_ms: u64,
    #[arg(long, default_value_t = 500)]
    max_ms: u64,
    /// Answer 503 to the first try of one call in N (0: never).
    #[arg(long, default_value_t = 0)]
    fail_every: u64,
    /// Answer 429 when more calls than this run at once, like the watchdog's max_inflight
    /// (0: no limit).
    /// (Named apart from the global --max-inflight, which is the worker's setting.)
    #[arg(long, default_value_t = 0)]
    function_inflight: u64,
}

/// Drops the flags OpenFaaS's charts pass to their `jetstream-queue-worker` binary
/// (`-license-file=/var/secrets/license/license`, `-pprof=true`), so this image can stand in for
/// it under OpenFaaS's main chart. Go accepts one or two dashes, and a separate value for
/// `-license-file`. Returns the other arguments and the dropped flags, for a log line.
fn strip_openfaas_flags(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> (Vec<std::ffi::OsString>, Vec<String>) {
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy().into_owned();
        let name = text.trim_start_matches('-');
        let dashes = text.len() - name.len();
        let (flag, has_value) = match name.split_once('=') {
            Some((flag, _)) => (flag, true),
            None => (name, false),
        };
        if !(1..=2).contains(&dashes) || !matches!(flag, "license-file" | "pprof") {
            kept.push(arg);
            continue;
        }
        let takes_next = flag == "license-file" && !has_value;
        dropped.push(text.clone());
        if takes_next {
            if let Some(value) = args.next() {
                dropped.push(value.to_string_lossy().into_owned());
            }
        }
    }
    (kept, dropped)
}

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
            .map(|c| queue_worker::connector::check(&c.gateway_url))
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
    queue_worker::logging::init(encoding, debug, quiet, flush_interval);
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
            queue_worker::logging::finish();
            eprintln!("queue-worker: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    if !flush_interval.is_zero() {
        runtime.spawn(queue_worker::logging::flush_periodically(flush_interval));
    }
    let result = runtime.block_on(run(cli.command, config));
    // Tasks still running are dropped with the runtime and may log: write after that.
    drop(runtime);
    let plain = |e: &anyhow::Error| e.is::<CliError>() || e.is::<ConnectError>();
    if let Err(e) = &result {
        if !plain(e) {
            tracing::error!("{e:#}");
        }
    }
    // Everything logged is written (unless it was dropped for a full queue) before the
    // last message below, which goes straight to stderr.
    queue_worker::logging::finish();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if plain(&e) => {
            let e = match e.downcast::<ConnectError>() {
                Ok(c) => CliError::from(c),
                Err(e) => e.downcast::<CliError>().expect("checked above"),
            };
            eprintln!("queue-worker: {e}");
            ExitCode::from(e.exit_code())
        }
        Err(e) => {
            eprintln!("queue-worker: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Loads the configuration; `Ok(None)` is never returned today but keeps room for commands
/// that need none.
fn load_config(settings: &Settings) -> Result<Option<Config>, String> {
    let pairs = settings.pairs()?;
    let sources = Sources::gather(settings.config.as_deref(), pairs)
        .map_err(|e: ConfigError| e.to_string())?;
    Config::load(&sources).map(Some).map_err(|e| e.to_string())
}

async fn run(command: Option<Command>, config: Option<Config>) -> anyhow::Result<()> {
    let config = config.expect("configuration is loaded for every command");
    match command.unwrap_or(Command::Run) {
        Command::Run => {
            let worker = queue_worker::app::start(config).await?;
            let shutdown = async {
                shutdown_signal().await;
                tracing::info!("Signal received, shutting down");
            };
            tokio::select! {
                _ = shutdown => worker.shutdown(),
                // A fatal start-up error ends the worker before any signal.
                _ = worker_finished(&worker) => {}
            }
            worker.wait().await
        }
        Command::Publish(args) => {
            let body = match (&args.data, &args.data_file) {
                (Some(d), _) => d.clone().into_bytes(),
                (None, Some(path)) => std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("--data-file {}: {e}", path.display()))?,
                (None, None) => Vec::new(),
            };
            let mut headers = Vec::new();
            for h in &args.headers {
                let (k, v) = h
                    .split_once(':')
                    .ok_or_else(|| anyhow::anyhow!("--header {h:?}: expected 'Name: value'"))?;
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
            let mut annotations = Vec::new();
            for a in &args.annotations {
                let (k, v) = a
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--annotation {a:?}: expected KEY=VALUE"))?;
                annotations.push((k.trim().to_string(), v.to_string()));
            }
            let sub = queue_worker::publish::Submission {
                function: args.function.clone(),
                body,
                headers,
                annotations,
                path: args.path,
                query: args.query,
                callback_url: args.callback_url,
                ..Default::default()
            };
            let ids = queue_worker::publish::publish(&config, &sub, args.count).await?;
            queue_worker::outln!(
                "published {} message(s) for {} to {}{}",
                ids.len(),
                args.function,
                config.stream_name(),
                if ids.len() == 1 {
                    format!(" (call id {})", ids[0])
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        Command::SampleFunction(args) => {
            let stop = tokio_util::sync::CancellationToken::new();
            let (addr, _) = queue_worker::sample::serve(
                args.listen,
                queue_worker::sample::SampleOptions {
                    min_delay: std::time::Duration::from_millis(args.min_ms),
                    max_delay: std::time::Duration::from_millis(args.max_ms.max(args.min_ms)),
                    fail_every: args.fail_every,
                    max_inflight: args.function_inflight,
                    functions: Vec::new(),
                },
                stop.clone(),
            )
            .await?;
            queue_worker::outln!("sample gateway on http://{addr} (functions at /function/<name>)");
            shutdown_signal().await;
            stop.cancel();
            Ok(())
        }
        Command::Demo(a) => {
            queue_worker::demo::run(queue_worker::demo::DemoOptions {
                jobs: a.jobs,
                max_inflight: a.inflight.max(1),
                function_inflight: a.function_inflight,
                listen: a.listen,
                stay: a.stay,
            })
            .await
        }
        Command::CheckConfig => {
            queue_worker::outln!("{config:#?}");
            Ok(())
        }
        Command::Dead(cmd) => Ok(dead(cmd, &config).await?),
        Command::Queue(cmd) => Ok(queue(cmd, &config).await?),
        Command::Frontdoor { listen } => {
            let mut config = config;
            if let Some(addr) = listen {
                config.frontdoor.listen = addr;
            }
            let door = queue_worker::frontdoor::start(config).await?;
            tokio::select! {
                _ = shutdown_signal() => {
                    tracing::info!("Signal received, shutting down");
                    door.shutdown();
                }
                _ = door.stopped() => {}
            }
            door.wait().await
        }
    }
}

/// The `dead` subcommands.
async fn dead(cmd: DeadCommand, config: &Config) -> Result<(), CliError> {
    let (dl, total, bytes) = cli::dead::open(config).await?;
    match cmd {
        DeadCommand::List {
            filter,
            reason,
            json,
        } => {
            if !json {
                queue_worker::outln!(
                    "{}: {} ({bytes} bytes)",
                    dl.stream(),
                    if total == 1 {
                        "1 entry".to_string()
                    } else {
                        format!("{total} entries")
                    }
                );
            }
            cli::dead::list(&dl, &filter.filter(reason), json).await
        }
        DeadCommand::Replay {
            filter,
            reason,
            any_reason,
        } => {
            let reason = cli::dead::replay_reason(reason, any_reason);
            cli::dead::replay(&dl, &filter.filter(reason), &config.stream_name()).await
        }
        DeadCommand::Purge { function, yes } => {
            cli::dead::purge(&dl, total, function.as_deref(), yes).await
        }
    }
}

/// The `queue` subcommands.
async fn queue(cmd: QueueCommand, config: &Config) -> Result<(), CliError> {
    let js = cli::jetstream(&config.nats).await?;
    match cmd {
        QueueCommand::Status { json } => {
            let status = cli::queue::status(&js, config).await?;
            if json {
                queue_worker::outln!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
            } else {
                cli::queue::print_status(&status);
            }
            Ok(())
        }
        QueueCommand::Purge {
            function,
            yes,
            json,
        } => {
            let purged = cli::queue::purge(&js, config, function.as_deref(), yes).await?;
            if json {
                queue_worker::outln!("{}", serde_json::to_string(&purged).unwrap_or_default());
            } else {
                cli::queue::print_purged(&purged);
            }
            Ok(())
        }
    }
}

async fn worker_finished(worker: &queue_worker::app::Running) {
    // Polls rather than awaiting the JoinHandle, which `wait` consumes later.
    while !worker.is_finished() {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn openfaas_pro_flags_are_dropped() {
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let (kept, dropped) = super::strip_openfaas_flags(args(&[
            "jetstream-queue-worker",
            "-license-file=/var/secrets/license/license",
            "--pprof=true",
            "-license-file",
            "/x",
            "--max-inflight",
            "5",
            "---pprof",
        ]));
        assert_eq!(
            kept,
            args(&["jetstream-queue-worker", "--max-inflight", "5", "---pprof"])
        );
        assert_eq!(dropped.len(), 4, "{dropped:?}");
        let cli = <super::Cli as clap::Parser>::try_parse_from(kept.iter().take(3)).unwrap();
        assert!(cli.command.is_none(), "no subcommand runs the worker");
    }

    /// clap's own consistency checks over every subcommand (duplicate names, a subcommand
    /// argument shadowing a global flag, ...), which otherwise only fail when used.
    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }

    /// A subcommand argument with the id of a global flag compiles and passes clap's checks,
    /// then panics when read (`sample-function --max-inflight` once did).
    #[test]
    fn no_subcommand_argument_shadows_a_global_flag() {
        fn walk(cmd: &clap::Command, globals: &[String], path: &str) {
            for sub in cmd.get_subcommands() {
                let here = format!("{path} {}", sub.get_name());
                for arg in sub.get_arguments() {
                    assert!(
                        !globals.contains(&arg.get_id().to_string()),
                        "`{here}` has an argument `{}` that shadows the global flag",
                        arg.get_id()
                    );
                }
                walk(sub, globals, &here);
            }
        }
        let cmd = super::Cli::command();
        let globals: Vec<String> = cmd
            .get_arguments()
            .filter(|a| a.is_global_set())
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(globals.contains(&"max_inflight".to_string()));
        walk(&cmd, &globals, "queue-worker");
    }
}
