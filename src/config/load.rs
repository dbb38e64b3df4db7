//! [`Config::load`]: the second stage of loading. Turns the collected strings into typed
//! values, checks ranges and cross-field rules, and reads secret files.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

impl Config {
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

        let mode = match r.string("scaling_mode").0.trim() {
            "static" | "" => ScalingMode::Static,
            "function" => ScalingMode::Function,
            _ => return Err(r.invalid("scaling_mode", "static or function")),
        };
        // Adaptive concurrency applies only in function mode, as in OpenFaaS; in static mode the
        // value is checked and has no effect. No warning: both OpenFaaS charts render it (true
        // by default) on every install.
        let limiter = r.boolean("limiter_enabled")? && mode == ScalingMode::Function;
        let inactive_threshold =
            r.duration("consumer_inactive_threshold", Duration::from_secs(1), None)?;
        if mode == ScalingMode::Function && prefetch > 0 {
            warnings.push(format!(
                "consumer_prefetch={prefetch} applies only in static mode; function mode pulls only what its free slots can start"
            ));
        }
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
                crate::worker::retry::MAX_ATTEMPTS_LIMIT.into(),
            )? as u32,
            initial_wait: r.duration(
                "initial_retry_wait",
                crate::worker::retry::MIN_RETRY_WAIT,
                None,
            )?,
            max_wait: r.duration("max_retry_wait", crate::worker::retry::MIN_RETRY_WAIT, None)?,
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
            hold_rejections: limiter,
        };
        if retry.max_wait < retry.initial_wait {
            return Err(ConfigError::Conflict(format!(
                "max_retry_wait ({}) must not be shorter than initial_retry_wait ({})",
                duration::format(retry.max_wait),
                duration::format(retry.initial_wait)
            )));
        }

        let max_call_age =
            Some(r.duration("max_call_age", Duration::ZERO, None)?).filter(|d| !d.is_zero());
        let max_message_bytes = r.size("max_message_bytes", 1024, 1 << 30)? as usize;
        let dead_letter = DeadLetterConfig {
            max_age: r.duration("dead_letter_max_age", Duration::from_secs(60), None)?,
            max_bytes: r.size("dead_letter_max_bytes", 1 << 20, 1 << 50)?,
        };

        let calls = CallsConfig {
            status: r.boolean("call_status")?,
            ttl: r.duration("call_status_ttl", Duration::from_secs(60), None)?,
            max_bytes: r.size("call_status_max_bytes", 1 << 20, 1 << 50)?,
        };

        let default_namespace = r.string("default_function_name").0.trim().to_string();
        if !crate::message::function::FunctionName::is_namespace(&default_namespace) {
            return Err(r.invalid(
                "default_function_name",
                "a Kubernetes namespace name (letters, digits, '-' and '_')",
            ));
        }

        let callback = CallbackConfig {
            max_attempts: r.number("callback_max_attempts", 1, 100)? as u32,
            timeout: r.duration("callback_timeout", Duration::from_millis(1), None)?,
            retry_wait: r.duration("callback_retry_wait", MIN_CALLBACK_RETRY_WAIT, None)?,
            tls_insecure: r.boolean("tls_insecure")?,
            max_pending: r.number("callback_max_pending", 1, 1_000_000)? as usize,
            max_pending_bytes: r.size("callback_max_pending_bytes", 1 << 16, 1 << 40)?,
            allowed: crate::worker::allowlist::AllowList::parse(
                r.string("callback_allowed_networks").0,
            )
            .map_err(|entry| {
                r.invalid(
                    "callback_allowed_networks",
                    &format!("comma-separated host names (cb.example.com), wildcards (*.example.com, or *) and IP networks (10.1.0.0/16, 127.0.0.1, fd00::/8); {entry:?} is none of these"),
                )
            })?,
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
            gateway_url: Redacted(gateway_url),
            nats,
            queue,
            stream_replicas,
            durable,
            ack_wait,
            max_inflight,
            worker_threads,
            pull_max_messages,
            prefetch,
            mode,
            inactive_threshold,
            limiter,
            upstream_timeout,
            retry,
            max_call_age,
            max_message_bytes,
            dead_letter,
            calls,
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
        // The message is printed (stderr, `check-config`): a URL's credentials never are.
        let value = value
            .split(',')
            .map(|part| {
                if part.contains('@') {
                    crate::config::secret::redact_url(part.trim())
                } else {
                    part.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(",");
        ConfigError::Invalid {
            key,
            value,
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
        crate::worker::retry::parse_codes(self.string(key).0).ok_or_else(|| {
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
            let function =
                crate::message::function::FunctionName::parse(function, default_namespace)
                    .map_err(|_| bad())?;
            if !is_queue_name(queue) {
                return Err(bad());
            }
            queues.insert(function.qualified().to_string(), queue.to_string());
        }
        let check_function = self.boolean("frontdoor_check_function")?;
        Ok(FrontDoorConfig {
            listen,
            max_body,
            queues,
            check_function,
            secret_mount_path: self.optional_path("secret_mount_path"),
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
        if let Some(from_url) = url_credentials(&urls) {
            chosen.push("credentials in nats_url");
            auth = from_url;
        }
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
            urls: urls.into_iter().map(Redacted).collect(),
            auth,
            tls_ca_file,
            tls_client,
        })
    }
}

/// The credentials in the first of `urls` that carries any, percent-decoded: a user and a
/// password, or a lone user, which NATS clients send as a token.
fn url_credentials(urls: &[String]) -> Option<NatsAuth> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    urls.iter().find_map(|raw| {
        let u = url::Url::parse(raw).ok()?;
        if u.username().is_empty() && u.password().is_none() {
            return None;
        }
        Some(NatsAuth::Url {
            user: Secret(decode(u.username())),
            password: u.password().map(|p| Secret(decode(p))),
        })
    })
}
