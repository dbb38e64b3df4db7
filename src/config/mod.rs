//! Configuration: one flat set of keys, named exactly like the OpenFaaS queue-worker's env vars
//! (`max_inflight`, `ack_wait`, ...), read from four layers with the precedence
//! flag > env > file > default.
//!
//! Loading has two stages, as in ripgrep: [`Sources`] only collects strings and knows which
//! keys exist; [`Config::load`] turns them into typed values, checks ranges and cross-field
//! rules, and reads secret files. Every failure is a [`ConfigError`] that names the key, the
//! value and what is allowed, and the binary exits with code 2 on it.

pub mod duration;
mod keys;
mod load;
mod secret;
mod size;
mod sources;

pub use keys::{Key, ALIASES, KEYS, LEGACY_KEYS};
pub use secret::{redact_url, Redacted, Secret};
pub use size::{format_size, parse_size};
pub use sources::{Origin, Sources};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::worker::retry::{Backoff, RetryPolicy};

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

/// How the worker authenticates to NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    None,
    Token(Secret),
    UserPassword {
        user: String,
        password: Secret,
    },
    CredsFile(PathBuf),
    NkeySeed(Secret),
    /// Credentials written into `nats_url` (`nats://user:pass@host`, or `nats://token@host`
    /// as Go clients read a user without a password). async-nats ignores them in the URL, so
    /// they are taken out here and sent like the others. Both parts are hidden: a lone user
    /// is a token.
    Url {
        user: Secret,
        password: Option<Secret>,
    },
}

impl NatsAuth {
    /// The keys the credentials came from, for messages telling an operator what to fix when
    /// the server refuses them (never the credentials themselves).
    pub fn source(&self) -> &'static str {
        match self {
            NatsAuth::None => "no credentials",
            NatsAuth::Url { .. } => "nats_url",
            NatsAuth::Token(_) => "nats_token_file",
            NatsAuth::UserPassword { .. } => "nats_user and nats_password_file",
            NatsAuth::CredsFile(_) => "nats_creds_file",
            NatsAuth::NkeySeed(_) => "nats_nkey_file",
        }
    }
}

/// Everything needed to open the NATS connection. `Debug` hides passwords in the URLs.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub urls: Vec<Redacted<String>>,
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

/// The call records of `OF_<queue>-calls` (cancels, and with `call_status` each call's state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallsConfig {
    /// `call_status`: record each call's state, not only cancels.
    pub status: bool,
    /// The bucket's max_age: how long a status and a cancel are kept.
    pub ttl: Duration,
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
    /// `secret_mount_path`: the directory holding the gateway's basic auth for its `/system`
    /// API. Only the front door calls that API, so only it reads the files, when it starts
    /// ([`FrontDoorConfig::gateway_auth`]): a worker sharing these settings starts without them.
    pub secret_mount_path: Option<PathBuf>,
}

impl FrontDoorConfig {
    /// Basic auth for the gateway's `/system` API, read from `secret_mount_path`
    /// (`basic-auth-user`, `basic-auth-password`); `None` when the key is unset. An error
    /// names the key and the file.
    pub fn gateway_auth(&self) -> Result<Option<(String, Secret)>, ConfigError> {
        let Some(dir) = &self.secret_mount_path else {
            return Ok(None);
        };
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
        Ok(Some((
            read("basic-auth-user")?,
            Secret(read("basic-auth-password")?),
        )))
    }
}

/// A queue name as OpenFaaS allows it: letters, digits, `-` and `_` (it becomes a subject
/// token and part of the stream name `OF_<queue>`).
pub fn is_queue_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Shortest `callback_retry_wait`. Zero doubles to zero: every try of a failing receiver
/// back to back. Callback tries are bounded (`callback_max_attempts`, at most 100) and the
/// wait doubles, so any non-zero floor ends the hot loop; 10ms keeps quick local set-ups.
pub const MIN_CALLBACK_RETRY_WAIT: Duration = Duration::from_millis(10);

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
    /// `callback_allowed_networks`: where callbacks may go; `None` is anywhere (OpenFaaS's
    /// behaviour). Callback URLs come from whoever queued the job, so this is the only thing
    /// between them and the worker's network position.
    pub allowed: Option<crate::worker::allowlist::AllowList>,
}

/// How consumers are laid out on the stream (`scaling_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalingMode {
    /// One durable consumer (`nats_durable`) shared by every replica: FIFO across functions.
    Static,
    /// One durable consumer per function with work, fair slots across functions.
    Function,
}

/// The validated configuration. Built only by [`Config::load`], so holding one means every
/// value is in range. `Debug` (what `check-config` prints) hides secrets: every field that
/// can hold one has a redacting type ([`Secret`], [`Redacted`]), so the derive cannot forget one.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateway_url: Redacted<url::Url>,
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
    /// `scaling_mode`: one shared consumer, or one consumer per function.
    pub mode: ScalingMode,
    /// Function mode: how long a function's consumer stays with nothing queued, unacked or
    /// running before the worker deletes it (`consumer_inactive_threshold`).
    pub inactive_threshold: Duration,
    /// Adaptive concurrency per function (`limiter_enabled`, function mode only; false in
    /// static mode whatever the setting).
    pub limiter: bool,
    pub upstream_timeout: Duration,
    pub retry: RetryPolicy,
    /// `max_call_age`: a call still queued this long after it became due is dead-lettered as
    /// `expired` instead of run; `None` (0) for no limit.
    pub max_call_age: Option<Duration>,
    /// Largest payload decoded; larger messages are dead-lettered as `too_large`.
    pub max_message_bytes: usize,
    pub dead_letter: DeadLetterConfig,
    pub calls: CallsConfig,
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

impl Config {
    /// The JetStream stream that holds the queue.
    pub fn stream_name(&self) -> String {
        format!("OF_{}", self.queue)
    }

    /// The KV bucket of call records: `OF_<queue>-calls` (its stream is `KV_OF_<queue>-calls`).
    pub fn calls_bucket_name(&self) -> String {
        format!("OF_{}-calls", self.queue)
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
        assert_eq!(c.nats.urls, vec![Redacted("nats://nats:4222".to_string())]);
    }

    #[test]
    fn a_bad_nats_url_is_named_without_its_password() {
        let e = load(&[("nats_url", "nats://u:s3cret@h:4222,http://x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nats_url"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        assert!(e.contains("http://x"), "{e}");
    }

    #[test]
    fn front_door_queues_are_keyed_by_the_qualified_name() {
        let c = load(&[
            ("frontdoor_queues", "sleep=slow, env.team=fast"),
            ("default_function_name", "fns"),
        ])
        .unwrap();
        let keys: Vec<(&str, &str)> = c
            .frontdoor
            .queues
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(keys, [("env.team", "fast"), ("sleep.fns", "slow")]);
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
        assert_eq!(c.nats.urls, vec![Redacted("nats://nats:4222".to_string())]);
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
        // A lone user in a NATS URL is a token.
        let c = load(&[("nats_url", "nats://t0ken-value@nats:4222")]).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("t0ken-value"), "{shown}");
        assert!(shown.contains("nats://***@nats:4222"), "{shown}");
    }

    /// async-nats ignores credentials in its URLs: they become the connection's auth, and
    /// count as a method, so they cannot silently lose to (or beat) a secret file.
    #[test]
    fn credentials_in_nats_url_are_the_auth() {
        let auth = |url: &str| load(&[("nats_url", url)]).unwrap().nats.auth;
        assert_eq!(
            auth("nats://worker:p%40ss@nats:4222"),
            NatsAuth::Url {
                user: Secret("worker".into()),
                password: Some(Secret("p@ss".into())),
            }
        );
        assert_eq!(
            auth("nats://nats-1:4222,nats://tok@nats-2:4222"),
            NatsAuth::Url {
                user: Secret("tok".into()),
                password: None,
            }
        );
        assert_eq!(auth("nats://nats:4222"), NatsAuth::None);
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t").unwrap();
        let err = load(&[
            ("nats_url", "nats://u:p@nats:4222"),
            ("nats_token_file", token.to_str().unwrap()),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("credentials in nats_url") && err.contains("nats_token_file"),
            "{err}"
        );
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
            ("default_function_name", "a.b", "namespace name"),
            ("frontdoor_queues", "a.b.c=slow", "fn=queue pairs"),
            ("frontdoor_queues", ".x=slow", "fn=queue pairs"),
            ("frontdoor_queues", "sleep=a.b", "fn=queue pairs"),
            (
                "callback_allowed_networks",
                "cb.example.com,10.0.0.0/33",
                "\"10.0.0.0/33\" is none of these",
            ),
            (
                "callback_allowed_networks",
                "http://cb.example.com",
                "IP networks",
            ),
        ];
        for (key, value, allowed) in cases {
            let err = load(&[(key, value)]).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
            assert!(err.contains(&format!("{value:?}")), "{err}");
            assert!(err.contains(allowed), "{key}: {err}");
        }
    }

    /// A retry wait of zero (or next to it) is a hot loop: NAK, redelivery, call, NAK. Each
    /// is refused with the key, the value and the floor; the floor itself is accepted.
    #[test]
    fn retry_waits_have_a_floor() {
        let refused = [
            ("initial_retry_wait", "0", "at least 100ms"),
            ("initial_retry_wait", "0s", "at least 100ms"),
            ("initial_retry_wait", "99ms", "at least 100ms"),
            ("max_retry_wait", "0", "at least 100ms"),
            ("max_retry_wait", "10ms", "at least 100ms"),
            ("callback_retry_wait", "0", "at least 10ms"),
            ("callback_retry_wait", "1ms", "at least 10ms"),
        ];
        for (key, value, allowed) in refused {
            let err = load(&[(key, value)]).unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { key: k, .. } if k == key),
                "{key}={value}: {err}"
            );
            let err = err.to_string();
            assert!(err.contains(&format!("{value:?}")), "{err}");
            assert!(err.contains(allowed), "{key}: {err}");
        }
        let c = load(&[
            ("initial_retry_wait", "100ms"),
            ("max_retry_wait", "100ms"),
            ("callback_retry_wait", "10ms"),
        ])
        .unwrap();
        assert_eq!(c.retry.initial_wait, Duration::from_millis(100));
        assert_eq!(c.retry.max_wait, Duration::from_millis(100));
        assert_eq!(c.callback.retry_wait, Duration::from_millis(10));
    }

    #[test]
    fn unknown_keys_are_refused_with_a_hint() {
        let err = Sources::from_pairs([("max-inflight", "3")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean max_inflight"), "{err}");
    }

    #[test]
    fn scaling_mode_selects_the_consumer_layout() {
        assert_eq!(load(&[]).unwrap().mode, ScalingMode::Static);
        let c = load(&[
            ("scaling_mode", "function"),
            ("consumer_inactive_threshold", "5s"),
        ])
        .unwrap();
        assert_eq!(c.mode, ScalingMode::Function);
        assert_eq!(c.inactive_threshold, Duration::from_secs(5));
        let err = load(&[("scaling_mode", "functions")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("scaling_mode") && err.contains("static or function"),
            "{err}"
        );
    }

    #[test]
    fn the_limiter_is_on_by_default_in_function_mode_only() {
        let function = [("scaling_mode", "function")];
        assert!(load(&function).unwrap().limiter);
        assert!(load(&function).unwrap().retry.hold_rejections);
        assert!(!load(&[]).unwrap().retry.hold_rejections);
        assert!(!load(&[]).unwrap().limiter);
        assert!(!load(&[("limiter_enabled", "true")]).unwrap().limiter);
        for off in [("limiter_enabled", "false"), ("adaptive_concurrency", "0")] {
            assert!(!load(&[function[0], off]).unwrap().limiter, "{off:?}");
        }
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
        // The front door's basic auth is read when it starts, not here: the worker shares
        // these settings and must start without the files.
        let c = load(&[("secret_mount_path", "/nonexistent/secrets")]).unwrap();
        let err = c.frontdoor.gateway_auth().unwrap_err().to_string();
        assert!(err.contains("secret_mount_path"), "{err}");
        std::fs::write(dir.path().join("basic-auth-user"), "admin\n").unwrap();
        std::fs::write(dir.path().join("basic-auth-password"), "pw\n").unwrap();
        let c = load(&[("secret_mount_path", dir.path().to_str().unwrap())]).unwrap();
        let (user, password) = c.frontdoor.gateway_auth().unwrap().unwrap();
        assert_eq!((user.as_str(), password.expose()), ("admin", "pw"));
    }

    #[test]
    fn readme_documents_every_key() {
        let readme = include_str!("../../README.md");
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
        let text = include_str!("../../config.example.yaml");
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
