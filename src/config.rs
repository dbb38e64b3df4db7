//! Configuration: one flat set of keys, named exactly like the OpenFaaS queue-worker's env vars
//! (`max_inflight`, `ack_wait`, ...), read from four layers with the precedence
//! flag > env > file > default.
//!
//! Loading has two stages, as in ripgrep: [`Sources`] only collects strings and knows which
//! keys exist; [`Config::load`] turns them into typed values, checks ranges and cross-field
//! rules, and reads secret files. Every failure is a [`ConfigError`] that names the key, the
//! value and what is allowed, and the binary exits with code 2 on it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::duration;
use crate::retry::{Backoff, RetryPolicy};

/// One configuration key: the env var name, which is also the YAML key and the `--set` key.
pub struct Key {
    pub name: &'static str,
    /// The default as a user would write it; empty when the key is unset by default.
    pub default: &'static str,
    pub help: &'static str,
}

macro_rules! keys {
    ($($name:literal = $default:literal : $help:literal,)*) => {
        /// Every key the worker understands, with its default and a one-line description.
        /// `config.example.yaml` documents each of them (a test checks it).
        pub const KEYS: &[Key] = &[$(Key { name: $name, default: $default, help: $help },)*];
    };
}

keys! {
    "gateway_url" = "http://gateway.openfaas:8080": "Base URL of the OpenFaaS gateway; functions are called at <gateway_url>/function/<name>.",
    "nats_url" = "": "Comma-separated NATS URLs; overrides nats_host and nats_port.",
    "nats_host" = "nats": "NATS host, used when nats_url is empty.",
    "nats_port" = "4222": "NATS port, used when nats_url is empty.",
    "nats_user" = "": "NATS user name (with nats_password_file).",
    "nats_password_file" = "": "File holding the NATS password.",
    "nats_token_file" = "": "File holding a NATS token.",
    "nats_creds_file" = "": "NATS .creds file (JWT and nkey seed).",
    "nats_nkey_file" = "": "File holding an nkey seed.",
    "nats_tls_ca_file" = "": "PEM file of CA certificates to trust for NATS TLS.",
    "nats_tls_cert_file" = "": "PEM client certificate for NATS mutual TLS (with nats_tls_key_file).",
    "nats_tls_key_file" = "": "PEM client key for NATS mutual TLS (with nats_tls_cert_file).",
    "queue_name" = "": "Queue to consume; empty falls back to nats_stream. The stream is OF_<queue>.",
    "nats_stream" = "faas-request": "Queue name used when queue_name is empty (OpenFaaS's nats.channel / nats.stream.name).",
    "nats_stream_replicas" = "1": "Replicas of the stream when the worker creates it.",
    "nats_durable" = "faas-workers": "Name of the shared durable consumer (static mode).",
    "ack_wait" = "60s": "Lease of a delivered message; renewed with in-progress acks while a call runs.",
    "max_inflight" = "50": "Most invocations running at once in this replica.",
    "worker_threads" = "1": "Threads that run the process's tasks; 1 is the cheapest per call (no hand-offs between threads), 0 means one per CPU the process may use.",
    "consumer_pull_max_messages" = "": "Most messages requested from NATS but not yet received (at most max_inflight); empty means max_inflight.",
    "consumer_prefetch" = "0": "Messages pulled beyond free call slots, to start at once when a call ends; they wait in the worker (lease renewed) and are handed back at a drain. Faster for short calls, especially at low max_inflight; 0 pulls only what can start.",
    "scaling_mode" = "static": "static (one shared consumer) or function (not supported yet).",
    "limiter_enabled" = "true": "Adaptive concurrency (also read as adaptive_concurrency); applies only in function mode (not supported yet).",
    "consumer_inactive_threshold" = "30s": "Function mode: idle time before a function's consumer is removed.",
    "queue_partitions" = "1": "Partitions of the queue (only 1 is supported yet).",
    "filter_partition" = "0": "Partition this worker consumes (only 0 is supported yet).",
    "upstream_timeout" = "1m": "Longest a function call may take.",
    "max_retry_attempts" = "100": "Most times a message is sent to its function before giving up.",
    "initial_retry_wait" = "10s": "Delay before the first retry; doubles per attempt.",
    "max_retry_wait" = "120s": "Longest delay between retries.",
    "retry_http_codes" = "408,429,500,502,503,504": "HTTP status codes that are retried.",
    "backoff" = "exponential": "exponential, full (random in [0, d]) or equal (d/2 + random in [0, d/2]); empty means exponential.",
    "max_message_bytes" = "8MiB": "Largest message the worker decodes; a bigger one goes to the dead-letter stream (reason too_large).",
    "dead_letter_max_age" = "168h": "How long the dead-letter stream OF_<queue>-dead keeps an entry.",
    "dead_letter_max_bytes" = "1GiB": "Size cap of the dead-letter stream; when full, the oldest entries are removed.",
    "tls_insecure" = "false": "Skip TLS verification for callbacks.",
    "default_function_name" = "openfaas-fn": "Namespace used to qualify function names without one (metric labels, subjects).",
    "callback_max_attempts" = "3": "Most tries to deliver one callback.",
    "callback_timeout" = "10s": "Timeout of one callback request.",
    "callback_retry_wait" = "1s": "Delay before the first callback retry; doubles per try.",
    "callback_max_pending" = "500": "Most callbacks waiting or in delivery at once; when full, finished jobs keep their slot until one is delivered (back-pressure, nothing dropped).",
    "callback_max_pending_bytes" = "64MiB": "Most bytes of callback bodies held at once (counted in KiB; a bigger body goes alone); when full, finished jobs keep their slot as above.",
    "metrics_port" = "8081": "Port of /metrics, /healthz and /readyz.",
    "drain_timeout" = "25s": "On SIGTERM, how long in-flight calls may run before their messages are handed back.",
    "stream_poll_interval" = "5s": "How often stream and consumer state is read for metrics and readiness.",
    "frontdoor_listen" = "0.0.0.0:8080": "Address of the front door (queue-worker frontdoor): POST /async-function/<name>.",
    "frontdoor_max_body" = "1MiB": "Largest request body the front door queues (413 above it); lowered to what fits the NATS server's max_payload.",
    "frontdoor_queues" = "": "Queue per function for the front door, as fn=queue pairs (fn or fn.namespace), comma separated; others use queue_name.",
    "frontdoor_check_function" = "false": "Front door: look each function up at <gateway_url>/system/function/<name> (404 when unknown; its com.openfaas.queue and retry annotations apply).",
    "secret_mount_path" = "": "Directory holding basic-auth-user and basic-auth-password for the gateway's /system API (OpenFaaS's basic-auth secret).",
    "debug" = "false": "Log at debug level (includes bodies).",
    "log_encoding" = "console": "console or json.",
    "log_flush_interval" = "100ms": "Info lines are written in batches at most this late (warnings and errors at once); 0 writes every line at once, at a higher CPU cost per call.",
}

/// Env vars of older OpenFaaS queue-workers that are accepted and ignored with a warning, so a
/// values file written for those versions does not stop the worker.
pub const LEGACY_KEYS: &[(&str, &str)] = &[
    ("max_waiting", "pull requests are sized to free slots"),
    ("max_reconnect", "the worker reconnects to NATS forever"),
    (
        "reconnect_delay",
        "reconnect delays are managed by the NATS client",
    ),
    ("gateway_address", "use gateway_url"),
    ("gateway_port", "use gateway_url"),
    ("print_request_body", "set debug=true to log bodies"),
    ("print_response_body", "set debug=true to log bodies"),
    ("write_debug", "set debug=true"),
    (
        "inactive_threshold",
        "renamed to consumer_inactive_threshold",
    ),
];

/// Other names of current keys: the env var a chart renders under a different name than ours.
/// Within a layer the key's own name wins over its alias; the value is checked under the
/// key's name.
pub const ALIASES: &[(&str, &str)] = &[
    // faas-netes' dedicated queue-worker chart renders `adaptiveConcurrency` under this name;
    // its main chart and the docs say `limiter_enabled`.
    ("adaptive_concurrency", "limiter_enabled"),
];

/// Where a value came from, for error messages ("max_inflight=abc (from env)").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Default,
    File,
    Env,
    Flag,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Default => "default",
            Origin::File => "config file",
            Origin::Env => "env",
            Origin::Flag => "flag",
        })
    }
}

/// Why configuration was refused. Each variant names the key so the operator can fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value {value:?} for {key} (from {origin}): expected {allowed}")]
    Invalid {
        key: &'static str,
        value: String,
        origin: Origin,
        allowed: String,
    },
    #[error("{key}={value:?} is not supported yet: {why}")]
    Unsupported {
        key: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("unknown key {key:?} in {origin}{hint}")]
    UnknownKey {
        key: String,
        origin: String,
        hint: String,
    },
    #[error("cannot read {key} file {path}: {reason}")]
    File {
        key: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Conflict(String),
}

/// The raw layers, as strings. No parsing beyond YAML happens here.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    file: BTreeMap<String, String>,
    env: BTreeMap<String, String>,
    flags: BTreeMap<String, String>,
    /// Legacy keys that were set, to warn about once logging is up.
    legacy_seen: Vec<(String, Origin)>,
}

impl Sources {
    /// Reads the optional YAML file and the process environment; `flags` are `(key, value)`
    /// pairs from the command line and win over both.
    pub fn gather(
        file: Option<&Path>,
        flags: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut sources = Sources::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                key: "--config".into(),
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            sources.add_yaml(&text, &path.display().to_string())?;
        }
        for key in KEYS {
            if let Ok(value) = std::env::var(key.name) {
                sources.env.insert(key.name.to_string(), value);
            }
        }
        for (alias, _) in ALIASES {
            if let Ok(value) = std::env::var(alias) {
                sources.env.insert(alias.to_string(), value);
            }
        }
        for (legacy, _) in LEGACY_KEYS {
            if let Ok(value) = std::env::var(legacy) {
                sources.env.insert(legacy.to_string(), value);
                sources.legacy_seen.push((legacy.to_string(), Origin::Env));
            }
        }
        for (key, value) in flags {
            sources.set(Origin::Flag, &key, value)?;
        }
        Ok(sources)
    }

    /// Sources made only of `(key, value)` pairs at flag precedence; no env, no file. Tests and
    /// embedders use this to get a fully deterministic configuration.
    pub fn from_pairs<K: AsRef<str>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, ConfigError> {
        let mut sources = Sources::default();
        for (k, v) in pairs {
            sources.set(Origin::Flag, k.as_ref(), v.into())?;
        }
        Ok(sources)
    }

    /// Adds a YAML document of `key: value` pairs at file precedence.
    pub fn add_yaml(&mut self, text: &str, name: &str) -> Result<(), ConfigError> {
        let bad = |reason: String| ConfigError::File {
            key: "--config".into(),
            path: PathBuf::from(name),
            reason,
        };
        let doc: serde_norway::Value =
            serde_norway::from_str(text).map_err(|e| bad(e.to_string()))?;
        let map = match doc {
            serde_norway::Value::Null => return Ok(()),
            serde_norway::Value::Mapping(map) => map,
            _ => return Err(bad("expected a mapping of key: value".into())),
        };
        for (k, v) in map {
            let key = match k {
                serde_norway::Value::String(s) => s,
                other => return Err(bad(format!("key {other:?} is not a string"))),
            };
            let value = match v {
                serde_norway::Value::Null => continue,
                serde_norway::Value::Bool(b) => b.to_string(),
                serde_norway::Value::Number(n) => n.to_string(),
                serde_norway::Value::String(s) => s,
                serde_norway::Value::Sequence(items) => items
                    .into_iter()
                    .map(|i| match i {
                        serde_norway::Value::String(s) => Ok(s),
                        serde_norway::Value::Number(n) => Ok(n.to_string()),
                        _ => Err(bad(format!("{key}: list items must be scalars"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(","),
                _ => return Err(bad(format!("{key}: expected a scalar value"))),
            };
            self.set(Origin::File, &key, value)?;
        }
        Ok(())
    }

    fn set(&mut self, origin: Origin, key: &str, value: String) -> Result<(), ConfigError> {
        let layer = match origin {
            Origin::File => &mut self.file,
            Origin::Env => &mut self.env,
            _ => &mut self.flags,
        };
        if KEYS.iter().any(|k| k.name == key) || ALIASES.iter().any(|(a, _)| *a == key) {
            layer.insert(key.to_string(), value);
            return Ok(());
        }
        if LEGACY_KEYS.iter().any(|(k, _)| *k == key) {
            layer.insert(key.to_string(), value);
            self.legacy_seen.push((key.to_string(), origin));
            return Ok(());
        }
        Err(ConfigError::UnknownKey {
            key: key.to_string(),
            origin: origin.to_string(),
            hint: suggest(key),
        })
    }

    /// The winning value of `key` and where it came from; `None` when only the default applies.
    /// An empty value counts as unset, as in OpenFaaS's worker: Helm templates often render
    /// `key: ""` for a value left out.
    pub fn get(&self, key: &str) -> Option<(&str, Origin)> {
        let layers = [
            (&self.flags, Origin::Flag),
            (&self.env, Origin::Env),
            (&self.file, Origin::File),
        ];
        let aliases = ALIASES.iter().filter(|(_, k)| *k == key).map(|(a, _)| *a);
        let names: Vec<&str> = std::iter::once(key).chain(aliases).collect();
        layers.into_iter().find_map(|(layer, origin)| {
            names.iter().find_map(|name| {
                layer
                    .get(*name)
                    .filter(|v| !v.trim().is_empty())
                    .map(|v| (v.as_str(), origin))
            })
        })
    }
}

fn suggest(key: &str) -> String {
    let lower = key.to_ascii_lowercase().replace('-', "_");
    if let Some(k) = KEYS.iter().find(|k| k.name == lower) {
        return format!("; did you mean {}?", k.name);
    }
    let close = KEYS
        .iter()
        .filter(|k| k.name.contains(&lower) || lower.contains(k.name))
        .map(|k| k.name)
        .collect::<Vec<_>>();
    if close.is_empty() {
        "; see config.example.yaml for the keys".into()
    } else {
        format!("; did you mean {}?", close.join(" or "))
    }
}

/// Parses a byte size: digits, then an optional unit (`B`, `K`/`KiB`, `M`/`MiB`, `G`/`GiB` are
/// powers of 1024; `KB`, `MB`, `GB` powers of 1000). Case-insensitive; spaces allowed.
pub fn parse_size(raw: &str) -> Option<u64> {
    let s = raw.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let number: u64 = s[..digits].parse().ok()?;
    let scale: u64 = match s[digits..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return None,
    };
    number.checked_mul(scale)
}

/// The shortest exact form of a size for messages: `8MiB`, `1000`.
pub fn format_size(n: u64) -> String {
    for (unit, scale) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= scale && n % scale == 0 {
            return format!("{}{unit}", n / scale);
        }
    }
    n.to_string()
}

/// A secret read from a file. Its `Debug` never prints the value, so a config dump or a panic
/// message cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How the worker authenticates to NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    None,
    Token(Secret),
    UserPassword { user: String, password: Secret },
    CredsFile(PathBuf),
    NkeySeed(Secret),
}

/// A URL fit for logs: a password in it is replaced by `***`.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(_) => raw.to_string(),
        Err(_) if raw.contains('@') => "(unparsable URL with credentials)".to_string(),
        Err(_) => raw.to_string(),
    }
}

/// Everything needed to open the NATS connection. `Debug` hides passwords in the URLs.
#[derive(Clone)]
pub struct NatsConfig {
    pub urls: Vec<String>,
    pub auth: NatsAuth,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_client: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogEncoding {
    Console,
    Json,
}

/// Limits of the dead-letter stream `OF_<queue>-dead` (Limits retention: entries leave by
/// age or, when it is full, oldest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterConfig {
    pub max_age: Duration,
    pub max_bytes: u64,
}

/// Settings of the front door (`queue-worker frontdoor`), which publishes HTTP requests to
/// the queue as the OpenFaaS gateway does.
#[derive(Debug, Clone)]
pub struct FrontDoorConfig {
    pub listen: std::net::SocketAddr,
    /// Largest body accepted before the server's `max_payload` is taken into account.
    pub max_body: u64,
    /// Queue of a function, keyed by `fn.ns` (names without a namespace in the setting are
    /// qualified with `default_function_name`).
    pub queues: BTreeMap<String, String>,
    /// Ask the gateway whether a function exists before queueing it.
    pub check_function: bool,
    /// Basic auth for the gateway's `/system` API, from `secret_mount_path`.
    pub gateway_auth: Option<(String, Secret)>,
}

/// A queue name as OpenFaaS allows it: letters, digits, `-` and `_` (it becomes a subject
/// token and part of the stream name `OF_<queue>`).
pub fn is_queue_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Callback delivery settings. Callbacks are best effort with bounded retries; they never
/// change the fate of the message.
#[derive(Debug, Clone)]
pub struct CallbackConfig {
    pub max_attempts: u32,
    pub timeout: Duration,
    pub retry_wait: Duration,
    pub tls_insecure: bool,
    /// Most callbacks held at once (waiting to be tried again or in delivery).
    pub max_pending: usize,
    /// Most bytes of callback bodies held at once.
    pub max_pending_bytes: u64,
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("NatsConfig")
            .field("urls", &urls)
            .field("auth", &self.auth)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_client", &self.tls_client)
            .finish()
    }
}

/// The validated configuration. Built only by [`Config::load`], so holding one means every
/// value is in range. `Debug` (what `check-config` prints) hides secrets.
#[derive(Clone)]
pub struct Config {
    pub gateway_url: url::Url,
    pub nats: NatsConfig,
    /// The queue name; subjects are `<queue>` and `<queue>.>`.
    pub queue: String,
    pub stream_replicas: usize,
    pub durable: String,
    pub ack_wait: Duration,
    pub max_inflight: usize,
    /// Runtime threads; 0 means one per CPU. See `main.rs` for why 1 is the default.
    pub worker_threads: usize,
    pub pull_max_messages: usize,
    /// Messages pulled beyond free call slots (`consumer_prefetch`); 0 pulls only what can
    /// start.
    pub prefetch: usize,
    pub upstream_timeout: Duration,
    pub retry: RetryPolicy,
    /// Largest payload decoded; larger messages are dead-lettered as `too_large`.
    pub max_message_bytes: usize,
    pub dead_letter: DeadLetterConfig,
    pub default_namespace: String,
    pub callback: CallbackConfig,
    pub frontdoor: FrontDoorConfig,
    pub metrics_port: u16,
    pub drain_timeout: Duration,
    pub stream_poll_interval: Duration,
    pub debug: bool,
    pub log_encoding: LogEncoding,
    /// Longest an info line waits in the log buffer; zero writes each line at once.
    pub log_flush_interval: Duration,
    /// Notes about accepted-but-ignored settings, logged once logging is configured.
    pub warnings: Vec<String>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("gateway_url", &redact_url(self.gateway_url.as_str()))
            .field("nats", &self.nats)
            .field("queue", &self.queue)
            .field("stream_replicas", &self.stream_replicas)
            .field("durable", &self.durable)
            .field("ack_wait", &self.ack_wait)
            .field("max_inflight", &self.max_inflight)
            .field("worker_threads", &self.worker_threads)
            .field("pull_max_messages", &self.pull_max_messages)
            .field("prefetch", &self.prefetch)
            .field("upstream_timeout", &self.upstream_timeout)
            .field("retry", &self.retry)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("dead_letter", &self.dead_letter)
            .field("default_namespace", &self.default_namespace)
            .field("callback", &self.callback)
            .field("frontdoor", &self.frontdoor)
            .field("metrics_port", &self.metrics_port)
            .field("drain_timeout", &self.drain_timeout)
            .field("stream_poll_interval", &self.stream_poll_interval)
            .field("debug", &self.debug)
            .field("log_encoding", &self.log_encoding)
            .field("log_flush_interval", &self.log_flush_interval)
            .field("warnings", &self.warnings)
            .finish()
    }
}

impl Config {
    /// The JetStream stream that holds the queue.
    pub fn stream_name(&self) -> String {
        format!("OF_{}", self.queue)
    }

    /// The dead-letter stream: `OF_<queue>-dead`.
    pub fn dead_letter_stream_name(&self) -> String {
        format!("OF_{}-dead", self.queue)
    }

    /// How often an in-progress ack renews the lease of a running call: a third of `ack_wait`,
    /// so two renewals can be lost before the server redelivers.
    pub fn progress_interval(&self) -> Duration {
        (self.ack_wait / 3).max(Duration::from_millis(50))
    }

    /// Validates every key of `sources` into a `Config`.
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        let r = Reader { sources };
        let mut warnings = Vec::new();
        for (key, origin) in &sources.legacy_seen {
            let why = LEGACY_KEYS
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, why)| *why)
                .unwrap_or("");
            warnings.push(format!(
                "{key} (from {origin}) is no longer used and is ignored: {why}"
            ));
        }

        let gateway_url = r.url("gateway_url")?;
        let nats = r.nats()?;

        let queue = match r.string("queue_name") {
            (q, _) if !q.trim().is_empty() => q.trim().to_string(),
            _ => r.string("nats_stream").0.trim().to_string(),
        };
        let queue_key = if r.string("queue_name").0.trim().is_empty() {
            "nats_stream"
        } else {
            "queue_name"
        };
        if !is_queue_name(&queue) {
            return Err(r.invalid(
                queue_key,
                "a queue name of letters, digits, '-' and '_' (it becomes the subject and the stream OF_<queue>)",
            ));
        }

        let durable = r.string("nats_durable").0.trim().to_string();
        if durable.is_empty()
            || !durable
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(r.invalid(
                "nats_durable",
                "a consumer name of letters, digits, '-' and '_'",
            ));
        }

        let stream_replicas = r.number("nats_stream_replicas", 1, 5)? as usize;
        let ack_wait = r.duration("ack_wait", Duration::from_millis(100), None)?;
        let max_inflight = r.number("max_inflight", 1, 100_000)? as usize;
        let worker_threads = r.number("worker_threads", 0, 1024)? as usize;
        let pull_max_messages = match r.sources.get("consumer_pull_max_messages") {
            Some((v, _)) if !v.trim().is_empty() => {
                r.number("consumer_pull_max_messages", 1, 100_000)? as usize
            }
            _ => max_inflight,
        };
        let prefetch = r.number("consumer_prefetch", 0, 100_000)? as usize;
        let upstream_timeout = r.duration("upstream_timeout", Duration::from_millis(1), None)?;

        match r.string("scaling_mode").0.trim() {
            "static" | "" => {}
            "function" => return Err(ConfigError::Unsupported {
                key: "scaling_mode",
                value: "function".into(),
                why:
                    "function mode (one consumer per function) is planned; use scaling_mode=static",
            }),
            _ => return Err(r.invalid("scaling_mode", "static or function")),
        }
        // Adaptive concurrency applies only in function mode, as in OpenFaaS; in static mode the
        // value is checked and has no effect. No warning: both OpenFaaS charts render it (true
        // by default) on every install.
        r.boolean("limiter_enabled")?;
        r.duration("consumer_inactive_threshold", Duration::from_secs(1), None)?;
        if r.number("queue_partitions", 1, 1024)? != 1 {
            return Err(ConfigError::Unsupported {
                key: "queue_partitions",
                value: r.string("queue_partitions").0.into(),
                why: "queue partitions are not implemented; use 1",
            });
        }
        if r.number("filter_partition", 0, 1023)? != 0 {
            return Err(ConfigError::Unsupported {
                key: "filter_partition",
                value: r.string("filter_partition").0.into(),
                why: "queue partitions are not implemented; use 0",
            });
        }

        let retry = RetryPolicy {
            max_attempts: r.number(
                "max_retry_attempts",
                1,
                crate::retry::MAX_ATTEMPTS_LIMIT.into(),
            )? as u32,
            initial_wait: r.duration("initial_retry_wait", Duration::ZERO, None)?,
            max_wait: r.duration("max_retry_wait", Duration::ZERO, None)?,
            codes: r.codes("retry_http_codes")?,
            backoff: match r.string("backoff").0.trim() {
                "" | "exponential" => Backoff::Exponential,
                "full" => Backoff::Full,
                "equal" => Backoff::Equal,
                _ => {
                    return Err(r.invalid(
                        "backoff",
                        "exponential, full or equal (empty means exponential)",
                    ))
                }
            },
        };
        if retry.max_wait < retry.initial_wait {
            return Err(ConfigError::Conflict(format!(
                "max_retry_wait ({}) must not be shorter than initial_retry_wait ({})",
                duration::format(retry.max_wait),
                duration::format(retry.initial_wait)
            )));
        }

        let max_message_bytes = r.size("max_message_bytes", 1024, 1 << 30)? as usize;
        let dead_letter = DeadLetterConfig {
            max_age: r.duration("dead_letter_max_age", Duration::from_secs(60), None)?,
            max_bytes: r.size("dead_letter_max_bytes", 1 << 20, 1 << 50)?,
        };

        let default_namespace = r.string("default_function_name").0.trim().to_string();
        if default_namespace.is_empty()
            || !default_namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(r.invalid(
                "default_function_name",
                "a Kubernetes namespace name (letters, digits, '-')",
            ));
        }

        let callback = CallbackConfig {
            max_attempts: r.number("callback_max_attempts", 1, 100)? as u32,
            timeout: r.duration("callback_timeout", Duration::from_millis(1), None)?,
            retry_wait: r.duration("callback_retry_wait", Duration::ZERO, None)?,
            tls_insecure: r.boolean("tls_insecure")?,
            max_pending: r.number("callback_max_pending", 1, 1_000_000)? as usize,
            max_pending_bytes: r.size("callback_max_pending_bytes", 1 << 16, 1 << 40)?,
        };

        let frontdoor = r.frontdoor(&default_namespace)?;

        let metrics_port = r.number("metrics_port", 0, 65535)? as u16;
        let drain_timeout = r.duration("drain_timeout", Duration::ZERO, None)?;
        let stream_poll_interval =
            r.duration("stream_poll_interval", Duration::from_millis(100), None)?;
        let debug = r.boolean("debug")?;
        let log_flush_interval = r.duration(
            "log_flush_interval",
            Duration::ZERO,
            Some(Duration::from_secs(10)),
        )?;
        let log_encoding = match r.string("log_encoding").0.trim() {
            "console" | "" => LogEncoding::Console,
            "json" => LogEncoding::Json,
            _ => return Err(r.invalid("log_encoding", "console or json")),
        };

        Ok(Config {
            gateway_url,
            nats,
            queue,
            stream_replicas,
            durable,
            ack_wait,
            max_inflight,
            worker_threads,
            pull_max_messages,
            prefetch,
            upstream_timeout,
            retry,
            max_message_bytes,
            dead_letter,
            default_namespace,
            callback,
            frontdoor,
            metrics_port,
            drain_timeout,
            stream_poll_interval,
            debug,
            log_encoding,
            log_flush_interval,
            warnings,
        })
    }
}

/// Typed access to `Sources` with the key's default applied and errors that name the key.
struct Reader<'a> {
    sources: &'a Sources,
}

impl Reader<'_> {
    fn string(&self, key: &'static str) -> (&str, Origin) {
        self.sources.get(key).unwrap_or_else(|| {
            let default = KEYS
                .iter()
                .find(|k| k.name == key)
                .map(|k| k.default)
                .unwrap_or_else(|| panic!("config key {key} is not in KEYS"));
            (default, Origin::Default)
        })
    }

    fn invalid(&self, key: &'static str, allowed: &str) -> ConfigError {
        let (value, origin) = self.string(key);
        ConfigError::Invalid {
            key,
            value: value.to_string(),
            origin,
            allowed: allowed.to_string(),
        }
    }

    fn number(&self, key: &'static str, min: u64, max: u64) -> Result<u64, ConfigError> {
        let allowed = format!("a whole number from {min} to {max}");
        match self.string(key).0.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.invalid(key, &allowed)),
        }
    }

    fn duration(
        &self,
        key: &'static str,
        min: Duration,
        max: Option<Duration>,
    ) -> Result<Duration, ConfigError> {
        let allowed = match max {
            Some(max) => format!(
                "a duration like 30s, 1m or 1m30s, from {} to {}",
                duration::format(min),
                duration::format(max)
            ),
            None if min.is_zero() => "a duration like 30s, 1m or 1m30s".to_string(),
            None => format!(
                "a duration like 30s, 1m or 1m30s, at least {}",
                duration::format(min)
            ),
        };
        match duration::parse(self.string(key).0) {
            Some(d) if d >= min && max.is_none_or(|m| d <= m) => Ok(d),
            _ => Err(self.invalid(key, &allowed)),
        }
    }

    /// A byte size: a whole number of bytes, or with a unit (`512KiB`, `8MiB`, `1GiB`; `KB`,
    /// `MB`, `GB` are powers of 1000).
    fn size(&self, key: &'static str, min: u64, max: u64) -> Result<u64, ConfigError> {
        match parse_size(self.string(key).0) {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.invalid(
                key,
                &format!(
                    "a size like 1048576, 512KiB, 8MiB or 1GiB, from {} to {}",
                    format_size(min),
                    format_size(max)
                ),
            )),
        }
    }

    fn boolean(&self, key: &'static str) -> Result<bool, ConfigError> {
        match self.string(key).0.trim().to_ascii_lowercase().as_str() {
            "1" | "t" | "true" | "yes" | "on" => Ok(true),
            "0" | "f" | "false" | "no" | "off" | "" => Ok(false),
            _ => Err(self.invalid(key, "true or false")),
        }
    }

    fn url(&self, key: &'static str) -> Result<url::Url, ConfigError> {
        let raw = self.string(key).0.trim();
        match url::Url::parse(raw) {
            // The HTTP client is stricter than URL parsing about hosts (`gw{x}` parses):
            // refuse here what would otherwise fail every call.
            Ok(u)
                if matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && hyper::Uri::try_from(u.as_str()).is_ok() =>
            {
                Ok(u)
            }
            _ => Err(self.invalid(
                key,
                "an http:// or https:// URL such as http://gateway.openfaas:8080",
            )),
        }
    }

    fn codes(&self, key: &'static str) -> Result<Vec<u16>, ConfigError> {
        crate::retry::parse_codes(self.string(key).0).ok_or_else(|| {
            self.invalid(
                key,
                "a comma-separated list of HTTP status codes (100-599), e.g. 429,502,503",
            )
        })
    }

    fn frontdoor(&self, default_namespace: &str) -> Result<FrontDoorConfig, ConfigError> {
        let listen = self
            .string("frontdoor_listen")
            .0
            .trim()
            .parse()
            .map_err(|_| self.invalid("frontdoor_listen", "an address like 0.0.0.0:8080"))?;
        let max_body = self.size("frontdoor_max_body", 1, 1 << 30)?;
        let mut queues = BTreeMap::new();
        for pair in self
            .string("frontdoor_queues")
            .0
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let bad = || {
                self.invalid(
                    "frontdoor_queues",
                    &format!("fn=queue pairs separated by commas, such as sleep=slow,env.team-a=fast (\"{pair}\" is not one)"),
                )
            };
            let (function, queue) = pair.split_once('=').ok_or_else(bad)?;
            let (function, queue) = (function.trim(), queue.trim());
            let qualified = match function.split_once('.') {
                Some(_) => function.to_string(),
                None => format!("{function}.{default_namespace}"),
            };
            let valid_fn =
                qualified.split('.').count() == 2 && qualified.split('.').all(is_queue_name);
            if !valid_fn || !is_queue_name(queue) {
                return Err(bad());
            }
            queues.insert(qualified, queue.to_string());
        }
        let check_function = self.boolean("frontdoor_check_function")?;
        let gateway_auth = match self.optional_path("secret_mount_path") {
            None => None,
            Some(dir) => {
                let read = |name: &str| {
                    let path = dir.join(name);
                    std::fs::read_to_string(&path)
                        .map_err(|e| ConfigError::File {
                            key: "secret_mount_path".into(),
                            path: path.clone(),
                            reason: e.to_string(),
                        })
                        .map(|t| t.trim().to_string())
                };
                Some((
                    read("basic-auth-user")?,
                    Secret(read("basic-auth-password")?),
                ))
            }
        };
        Ok(FrontDoorConfig {
            listen,
            max_body,
            queues,
            check_function,
            gateway_auth,
        })
    }

    fn optional_path(&self, key: &'static str) -> Option<PathBuf> {
        match self.sources.get(key) {
            Some((v, _)) if !v.trim().is_empty() => Some(PathBuf::from(v.trim())),
            _ => None,
        }
    }

    fn read_secret(&self, key: &'static str) -> Result<Option<Secret>, ConfigError> {
        let Some(path) = self.optional_path(key) else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::File {
            key: key.into(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let value = text.trim().to_string();
        if value.is_empty() {
            return Err(ConfigError::File {
                key: key.into(),
                path,
                reason: "the file is empty".into(),
            });
        }
        Ok(Some(Secret(value)))
    }

    fn existing_file(&self, key: &'static str) -> Result<Option<PathBuf>, ConfigError> {
        let Some(path) = self.optional_path(key) else {
            return Ok(None);
        };
        std::fs::metadata(&path).map_err(|e| ConfigError::File {
            key: key.into(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Some(path))
    }

    fn nats(&self) -> Result<NatsConfig, ConfigError> {
        let urls: Vec<String> = match self.sources.get("nats_url") {
            Some((v, _)) if !v.trim().is_empty() => {
                let mut urls = Vec::new();
                for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let with_scheme = if part.contains("://") {
                        part.to_string()
                    } else {
                        format!("nats://{part}")
                    };
                    match url::Url::parse(&with_scheme) {
                        Ok(u)
                            if matches!(u.scheme(), "nats" | "tls" | "ws" | "wss")
                                && u.host().is_some() =>
                        {
                            urls.push(with_scheme)
                        }
                        _ => return Err(self.invalid(
                            "nats_url",
                            "comma-separated NATS URLs such as nats://nats:4222,nats://nats-2:4222",
                        )),
                    }
                }
                urls
            }
            _ => {
                let host = self.string("nats_host").0.trim().to_string();
                if host.is_empty() || host.contains([' ', '/', ',']) {
                    return Err(self.invalid("nats_host", "a host name or IP address"));
                }
                let port = self.number("nats_port", 1, 65535)?;
                let host = if host.contains(':') && !host.starts_with('[') {
                    format!("[{host}]")
                } else {
                    host
                };
                vec![format!("nats://{host}:{port}")]
            }
        };

        let token = self.read_secret("nats_token_file")?;
        let password = self.read_secret("nats_password_file")?;
        let nkey = self.read_secret("nats_nkey_file")?;
        let creds = self.existing_file("nats_creds_file")?;
        let user = self.string("nats_user").0.trim().to_string();
        let mut chosen = Vec::new();
        let mut auth = NatsAuth::None;
        if let Some(t) = token {
            chosen.push("nats_token_file");
            auth = NatsAuth::Token(t);
        }
        if !user.is_empty() || password.is_some() {
            chosen.push("nats_user/nats_password_file");
            match password {
                Some(password) if !user.is_empty() => {
                    auth = NatsAuth::UserPassword { user, password }
                }
                _ => {
                    return Err(ConfigError::Conflict(
                        "nats_user and nats_password_file must be set together".into(),
                    ))
                }
            }
        }
        if let Some(c) = creds {
            chosen.push("nats_creds_file");
            auth = NatsAuth::CredsFile(c);
        }
        if let Some(n) = nkey {
            chosen.push("nats_nkey_file");
            auth = NatsAuth::NkeySeed(n);
        }
        if chosen.len() > 1 {
            return Err(ConfigError::Conflict(format!(
                "choose one NATS authentication method, not {}",
                chosen.join(" and ")
            )));
        }

        let tls_ca_file = self.existing_file("nats_tls_ca_file")?;
        let cert = self.existing_file("nats_tls_cert_file")?;
        let key = self.existing_file("nats_tls_key_file")?;
        let tls_client = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Conflict(
                    "nats_tls_cert_file and nats_tls_key_file must be set together".into(),
                ))
            }
        };
        Ok(NatsConfig {
            urls,
            auth,
            tls_ca_file,
            tls_client,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(&Sources::from_pairs(pairs.iter().copied()).unwrap())
    }

    #[test]
    fn defaults_match_openfaas() {
        let c = load(&[]).unwrap();
        assert_eq!(c.queue, "faas-request");
        assert_eq!(c.stream_name(), "OF_faas-request");
        assert_eq!(c.durable, "faas-workers");
        assert_eq!(c.ack_wait, Duration::from_secs(60));
        assert_eq!(c.max_inflight, 50);
        assert_eq!(c.retry.max_attempts, 100);
        assert_eq!(c.retry.initial_wait, Duration::from_secs(10));
        assert_eq!(c.retry.max_wait, Duration::from_secs(120));
        assert_eq!(c.retry.codes, vec![408, 429, 500, 502, 503, 504]);
        assert_eq!(c.retry.backoff, Backoff::Exponential);
        assert_eq!(c.upstream_timeout, Duration::from_secs(60));
        assert_eq!(c.metrics_port, 8081);
        assert_eq!(c.default_namespace, "openfaas-fn");
        assert_eq!(c.nats.urls, vec!["nats://nats:4222".to_string()]);
    }

    #[test]
    fn queue_name_falls_back_to_nats_stream() {
        assert_eq!(
            load(&[("nats_stream", "custom-request")]).unwrap().queue,
            "custom-request"
        );
        let c = load(&[
            ("nats_stream", "custom-request"),
            ("queue_name", "slow-fns"),
        ])
        .unwrap();
        assert_eq!(c.queue, "slow-fns");
        assert_eq!(load(&[("queue_name", "")]).unwrap().queue, "faas-request");
    }

    #[test]
    fn empty_values_mean_the_default() {
        let c = load(&[("max_inflight", ""), ("ack_wait", "  "), ("nats_url", "")]).unwrap();
        assert_eq!(c.max_inflight, 50);
        assert_eq!(c.ack_wait, Duration::from_secs(60));
        assert_eq!(c.nats.urls, vec!["nats://nats:4222".to_string()]);
    }

    #[test]
    fn passwords_in_urls_never_print() {
        let c = load(&[
            ("nats_url", "nats://worker:hunter2@nats:4222"),
            ("gateway_url", "http://admin:s3cret@gateway:8080"),
        ])
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert!(shown.contains("nats://worker:***@nats:4222"), "{shown}");
    }

    #[test]
    fn sizes_take_units() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("8MiB"), Some(8 << 20));
        assert_eq!(parse_size("512 kib"), Some(512 << 10));
        assert_eq!(parse_size("1GB"), Some(1_000_000_000));
        assert_eq!(parse_size("1.5MiB"), None);
        assert_eq!(parse_size("MiB"), None);
        assert_eq!(parse_size("99999999999999999999"), None);
        let c = load(&[]).unwrap();
        assert_eq!(c.max_message_bytes, 8 << 20);
        assert_eq!(c.dead_letter.max_bytes, 1 << 30);
        assert_eq!(c.dead_letter.max_age, Duration::from_secs(7 * 24 * 3600));
        let err = load(&[("dead_letter_max_bytes", "10")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("dead_letter_max_bytes") && err.contains("from 1MiB"),
            "{err}"
        );
        assert_eq!(format_size(1000), "1000");
    }

    #[test]
    fn empty_backoff_means_exponential() {
        assert_eq!(
            load(&[("backoff", "")]).unwrap().retry.backoff,
            Backoff::Exponential
        );
        assert_eq!(
            load(&[("backoff", "full")]).unwrap().retry.backoff,
            Backoff::Full
        );
    }

    #[test]
    fn invalid_values_name_key_value_and_allowed() {
        let cases = [
            ("max_inflight", "abc", "a whole number from 1 to 100000"),
            ("max_inflight", "0", "a whole number"),
            ("ack_wait", "60", "a duration like 30s"),
            ("backoff", "linear", "exponential, full or equal"),
            (
                "retry_http_codes",
                "500,abc",
                "comma-separated list of HTTP status codes",
            ),
            ("gateway_url", "gateway:8080", "http:// or https:// URL"),
            (
                "gateway_url",
                "http://gw{x}:8080",
                "http:// or https:// URL",
            ),
            ("log_encoding", "xml", "console or json"),
            ("debug", "maybe", "true or false"),
            ("nats_url", "http://x", "NATS URLs"),
            ("queue_name", "a.b", "queue name"),
        ];
        for (key, value, allowed) in cases {
            let err = load(&[(key, value)]).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
            assert!(err.contains(&format!("{value:?}")), "{err}");
            assert!(err.contains(allowed), "{key}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_a_hint() {
        let err = Sources::from_pairs([("max-inflight", "3")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean max_inflight"), "{err}");
    }

    #[test]
    fn function_mode_is_refused_clearly() {
        let err = load(&[("scaling_mode", "function")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("scaling_mode") && err.contains("not supported yet"),
            "{err}"
        );
    }

    #[test]
    fn alias_sets_its_key_unless_the_key_is_set() {
        let limiter = |pairs: &[(&str, &str)]| -> String {
            let s = Sources::from_pairs(pairs.iter().copied()).unwrap();
            s.get("limiter_enabled")
                .map(|(v, _)| v.to_string())
                .unwrap_or_default()
        };
        assert_eq!(limiter(&[("adaptive_concurrency", "false")]), "false");
        assert_eq!(
            limiter(&[
                ("adaptive_concurrency", "false"),
                ("limiter_enabled", "true")
            ]),
            "true"
        );
        assert_eq!(
            limiter(&[
                ("limiter_enabled", "true"),
                ("adaptive_concurrency", "false")
            ]),
            "true"
        );
        let err = load(&[("adaptive_concurrency", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("limiter_enabled"), "{err}");
        let c = load(&[("adaptive_concurrency", "true")]).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn legacy_keys_warn() {
        let c = load(&[("max_waiting", "512")]).unwrap();
        assert!(c.warnings.iter().any(|w| w.contains("max_waiting")));
    }

    #[test]
    fn precedence_is_flag_env_file_default() {
        let mut s = Sources::default();
        s.add_yaml(
            "max_inflight: 7\nack_wait: 5s\nbackoff: full\n",
            "test.yaml",
        )
        .unwrap();
        s.env.insert("max_inflight".into(), "8".into());
        s.env.insert("ack_wait".into(), "6s".into());
        s.flags.insert("max_inflight".into(), "9".into());
        let c = Config::load(&s).unwrap();
        assert_eq!(c.max_inflight, 9);
        assert_eq!(c.ack_wait, Duration::from_secs(6));
        assert_eq!(c.retry.backoff, Backoff::Full);
        assert_eq!(c.drain_timeout, Duration::from_secs(25));
    }

    #[test]
    fn secrets_come_from_files_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let c = load(&[("nats_token_file", path.to_str().unwrap())]).unwrap();
        assert_eq!(c.nats.auth, NatsAuth::Token(Secret("s3cret".into())));
        assert!(!format!("{c:?}").contains("s3cret"));
        let err = load(&[("nats_token_file", "/nonexistent/token")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nats_token_file"), "{err}");
    }

    #[test]
    fn readme_documents_every_key() {
        let readme = include_str!("../README.md");
        for key in KEYS {
            assert!(
                readme.contains(&format!("| `{}` |", key.name)),
                "README.md lacks {}",
                key.name
            );
        }
    }

    #[test]
    fn example_file_parses_and_documents_every_key() {
        let text = include_str!("../config.example.yaml");
        let mut s = Sources::default();
        s.add_yaml(text, "config.example.yaml").unwrap();
        Config::load(&s).unwrap();
        for key in KEYS {
            assert!(
                text.contains(&format!("\n{}:", key.name))
                    || text.contains(&format!("\n# {}:", key.name)),
                "config.example.yaml does not document {}",
                key.name
            );
        }
    }
}
