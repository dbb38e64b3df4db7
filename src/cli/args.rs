//! The command line: clap's definitions of the flags and subcommands, the configuration flags
//! turned into keys, and OpenFaaS Pro's flags dropped before parsing.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::cli::CliError;
use crate::config::{Config, ConfigError, Sources};
use crate::message::function::FunctionName;
use crate::worker::deadletter::{Filter, Reason};

#[derive(Parser)]
#[command(
    name = "queue-worker",
    version,
    about = "Runs OpenFaaS asynchronous invocations out of NATS JetStream"
)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Configuration flags. Each is the same key as the env var and the YAML file; flags win.
#[derive(Args)]
pub struct Settings {
    /// YAML file of settings (same keys as the env vars; see config.example.yaml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Any setting as KEY=VALUE (repeatable), e.g. --set max_retry_attempts=5.
    #[arg(long = "set", short = 's', global = true, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[arg(long, global = true, value_name = "URL")]
    pub gateway_url: Option<String>,
    #[arg(long, global = true, value_name = "URLS")]
    pub nats_url: Option<String>,
    #[arg(long, global = true, value_name = "NAME")]
    pub queue_name: Option<String>,
    #[arg(long, global = true, value_name = "N")]
    pub max_inflight: Option<String>,
    #[arg(long, global = true, value_name = "DURATION")]
    pub ack_wait: Option<String>,
    #[arg(long, global = true, value_name = "DURATION")]
    pub upstream_timeout: Option<String>,
    #[arg(long, global = true, value_name = "DURATION")]
    pub drain_timeout: Option<String>,
    #[arg(long, global = true, value_name = "PORT")]
    pub metrics_port: Option<String>,
    #[arg(long, global = true, value_name = "console|json")]
    pub log_encoding: Option<String>,
    /// Log at debug level.
    #[arg(long, global = true)]
    pub debug: bool,
}

impl Settings {
    pub fn pairs(&self) -> Result<Vec<(String, String)>, String> {
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
pub enum Command {
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
    /// Cancel a call, or show its status, by its call id (X-Call-Id).
    #[command(subcommand)]
    Call(CallCommand),
    /// Run the async front door: POST /async-function/<name> queues a call and answers 202.
    Frontdoor {
        /// Address to listen on [default: frontdoor_listen, 0.0.0.0:8080].
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
}

#[derive(Subcommand)]
pub enum QueueCommand {
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
pub enum CallCommand {
    /// Cancel a queued or running call: it is not run, or its request is dropped, and it is
    /// not retried. Exit 5 when no call has that id, 6 when it already ended (both need
    /// call_status; without it every id is accepted).
    Cancel {
        call_id: String,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// What became of a call (needs call_status): queued, running, waiting (to retry),
    /// succeeded, failed, cancelled or expired, with times. Exit 5 when unknown.
    Status {
        call_id: String,
        /// Print the record as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum DeadCommand {
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
pub struct DeadFilter {
    /// Only this function (`fn` or `fn.namespace`).
    #[arg(long, value_parser = parse_function)]
    pub function: Option<String>,
    /// At most this many entries.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl DeadFilter {
    pub fn filter(&self, reason: Option<Reason>, config: &Config) -> Result<Filter, CliError> {
        Ok(Filter {
            function: function_name(self.function.as_deref(), config)?,
            reason,
            limit: self.limit,
        })
    }
}

/// An HTTP method (a token), upper-cased.
pub fn parse_method(s: &str) -> Result<String, String> {
    let m = s.trim().to_ascii_uppercase();
    if !m.is_empty() && m.len() <= 32 && m.bytes().all(|b| b.is_ascii_alphabetic()) {
        Ok(m)
    } else {
        Err(format!("{s:?} is not an HTTP method"))
    }
}

/// A function name as the worker and the gateway accept it (checked again, and qualified,
/// by [`function_name`] once the configuration names the default namespace).
pub fn parse_function(s: &str) -> Result<String, String> {
    FunctionName::validate(s)
        .map(|()| s.to_string())
        .map_err(|e| format!("expected a function name `fn` or `fn.namespace`: {e}"))
}

/// `--function`, qualified with `default_function_name`.
pub fn function_name(
    function: Option<&str>,
    config: &Config,
) -> Result<Option<FunctionName>, CliError> {
    function
        .map(|f| FunctionName::parse(f, &config.default_namespace))
        .transpose()
        .map_err(|e| CliError::Usage(format!("--function: {e}")))
}

pub fn parse_reason(s: &str) -> Result<Reason, String> {
    Reason::parse(s).ok_or_else(|| {
        let all: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        format!("expected one of {}", all.join(", "))
    })
}

#[derive(Args)]
pub struct PublishArgs {
    /// Function name, `fn` or `fn.namespace`.
    #[arg(value_parser = parse_function)]
    pub function: String,
    /// Request body.
    #[arg(long, conflicts_with = "data_file")]
    pub data: Option<String>,
    /// Read the request body from a file.
    #[arg(long, value_name = "FILE")]
    pub data_file: Option<PathBuf>,
    /// How many copies to publish, each with its own call id.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Where to post the result.
    #[arg(long, value_name = "URL")]
    pub callback_url: Option<String>,
    /// Extra header as `Name: value` (repeatable).
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// Path after the function name, e.g. `/sub/path`.
    #[arg(long, default_value = "")]
    pub path: String,
    /// Query string without `?`.
    #[arg(long, default_value = "")]
    pub query: String,
    /// HTTP method the function is called with.
    #[arg(long, default_value = "POST", value_parser = parse_method)]
    pub method: String,
    /// A function annotation as KEY=VALUE (repeatable), as the gateway copies them into the
    /// message, e.g. `--annotation com.openfaas.retry.attempts=3`.
    #[arg(long = "annotation", short = 'a', value_name = "KEY=VALUE")]
    pub annotations: Vec<String>,
    /// Do not start the call before this time: an RFC 3339 time (2026-05-01T12:00:00Z) or a
    /// delay in seconds from now (30, 1.5), at most 7 days ahead. Stored as the
    /// X-Not-Before header, in RFC 3339.
    #[arg(long, value_name = "RFC3339|SECONDS", value_parser = parse_not_before)]
    pub not_before: Option<String>,
}

/// `--not-before`: checked here (a usage error, exit 2), anchored to the time of publishing
/// by the command.
pub fn parse_not_before(s: &str) -> Result<String, String> {
    crate::message::not_before::Spec::parse(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

#[derive(Args)]
pub struct DemoArgs {
    /// Jobs in the burst.
    #[arg(long, default_value_t = 200)]
    pub jobs: usize,
    /// The worker's max_inflight.
    #[arg(long = "inflight", default_value_t = 50)]
    pub inflight: usize,
    /// Each replica's own limit (OpenFaaS's max_inflight); calls above it get 429.
    #[arg(long, default_value_t = 5)]
    pub function_inflight: u64,
    /// Most replicas of the function; it starts with one and is scaled on in-flight load.
    #[arg(long, default_value_t = 4)]
    pub replicas: u32,
    /// Adaptive concurrency off: pull as fast as slots allow and retry the 429s, the old way.
    #[arg(long)]
    pub greedy: bool,
    /// Front door address (try `hey -m POST -n 500 -c 4 http://ADDR/async-function/sleep`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Keep everything running after the burst, until Ctrl-C.
    #[arg(long)]
    pub stay: bool,
}

#[derive(Args)]
pub struct SampleArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    #[arg(long, default_value_t = 50)]
    pub min_ms: u64,
    #[arg(long, default_value_t = 500)]
    pub max_ms: u64,
    /// Answer 503 to the first try of one call in N (0: never).
    #[arg(long, default_value_t = 0)]
    pub fail_every: u64,
    /// Answer 429 when more calls than this run at once, like the watchdog's max_inflight
    /// (0: no limit).
    /// (Named apart from the global --max-inflight, which is the worker's setting.)
    #[arg(long, default_value_t = 0)]
    pub function_inflight: u64,
}

/// Drops the flags OpenFaaS's charts pass to their `jetstream-queue-worker` binary
/// (`-license-file=/var/secrets/license/license`, `-pprof=true`), so this image can stand in for
/// it under OpenFaaS's main chart. Go accepts one or two dashes, and a separate value for
/// `-license-file`. Returns the other arguments and the dropped flags, for a log line.
pub fn strip_openfaas_flags(
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

/// Loads the configuration; `Ok(None)` is never returned today but keeps room for commands
/// that need none.
pub fn load_config(settings: &Settings) -> Result<Option<Config>, String> {
    let pairs = settings.pairs()?;
    let sources = Sources::gather(settings.config.as_deref(), pairs)
        .map_err(|e: ConfigError| e.to_string())?;
    Config::load(&sources).map(Some).map_err(|e| e.to_string())
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
