//! The key table: every configuration key with its default and help, the legacy keys
//! accepted and ignored, and aliases. It is the one schema: env vars, YAML keys, `--set`, the
//! README's table, `config.example.yaml` and the chart are all checked against it.

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
    "consumer_pull_max_messages" = "": "Most messages requested from NATS but not yet received (at most max_inflight); in function mode, most messages in one pull of one function. Empty means max_inflight.",
    "consumer_prefetch" = "0": "Messages pulled beyond free call slots, to start at once when a call ends; they wait in the worker (lease renewed) and are handed back at a drain. Faster for short calls, especially at low max_inflight; 0 pulls only what can start.",
    "scaling_mode" = "static": "static (one shared consumer) or function (one consumer per function with work, fair slots).",
    "limiter_enabled" = "true": "Adaptive concurrency (also read as adaptive_concurrency): each function's calls at once are learned from its 2xx and 429 answers, and held-back work stays queued; applies only in function mode.",
    "consumer_inactive_threshold" = "30s": "Function mode: how long a function's consumer may be idle (nothing queued, unacked or running on any replica) before the worker deletes it. At least 1s. The server's inactive_threshold is set longer (2x, and beyond upstream_timeout + ack_wait), a backstop for replicas that die.",
    "queue_partitions" = "1": "Partitions of the queue (only 1 is supported yet).",
    "filter_partition" = "0": "Partition this worker consumes (only 0 is supported yet).",
    "upstream_timeout" = "1m": "Longest a function call may take.",
    "max_retry_attempts" = "100": "Most times a message is sent to its function before giving up.",
    "initial_retry_wait" = "10s": "Delay before the first retry; doubles per attempt. At least 100ms (shorter is a hot redelivery loop).",
    "max_retry_wait" = "120s": "Longest delay between retries. At least 100ms.",
    "retry_http_codes" = "408,429,500,502,503,504": "HTTP status codes that are retried.",
    "backoff" = "exponential": "exponential, full (random in [0, d]) or equal (d/2 + random in [0, d/2]); empty means exponential.",
    "max_call_age" = "0": "A call still queued this long after it became due (published, or its X-Not-Before start time) is not run: it goes to the dead-letter stream (reason expired) and its failure callback is sent. Checked at every delivery, retries included. 0: no limit. A function's com.openfaas.queue.max_age annotation overrides it.",
    "max_message_bytes" = "8MiB": "Largest message the worker decodes; a bigger one goes to the dead-letter stream (reason too_large).",
    "dead_letter_max_age" = "168h": "How long the dead-letter stream OF_<queue>-dead keeps an entry.",
    "dead_letter_max_bytes" = "1GiB": "Size cap of the dead-letter stream; when full, the oldest entries are removed.",
    "call_status" = "false": "Record each call's state (queued, running, waiting to retry, succeeded, failed, cancelled, expired) in the KV bucket OF_<queue>-calls, for GET /async-function/<call-id> and queue-worker call status; costs a few small JetStream writes per call. Cancel works either way.",
    "call_status_ttl" = "24h": "How long a call's status, and a cancel, are kept in OF_<queue>-calls (the bucket's max_age). At least 1m.",
    "call_status_max_bytes" = "256MiB": "Size cap of OF_<queue>-calls; when full, the oldest records are removed.",
    "tls_insecure" = "false": "Skip TLS verification for callbacks.",
    "default_function_name" = "openfaas-fn": "Namespace used to qualify function names without one (metric labels, subjects).",
    "callback_max_attempts" = "3": "Most tries to deliver one callback.",
    "callback_timeout" = "10s": "Timeout of one callback request.",
    "callback_retry_wait" = "1s": "Delay before the first callback retry; doubles per try. At least 10ms.",
    "callback_allowed_networks" = "": "Where callbacks may go, against SSRF: comma-separated host names (cb.example.com), wildcards (*.example.com, or * for any host) and IP networks (10.1.0.0/16, 127.0.0.1). A listed name is reached only at public addresses; internal ones (loopback, link-local incl. cloud metadata, private) only inside a listed network. Empty: no restriction.",
    "callback_max_pending" = "500": "Most callbacks waiting or in delivery at once; when full, finished jobs keep their slot until one is delivered (back-pressure: a slow receiver slows the intake instead of growing memory).",
    "callback_max_pending_bytes" = "64MiB": "Most bytes of callback bodies held at once (counted in KiB; a bigger body goes alone); when full, finished jobs keep their slot as above.",
    "metrics_port" = "8081": "Port of /metrics, /healthz and /readyz.",
    "drain_timeout" = "25s": "On SIGTERM, how long in-flight calls may run before their messages are handed back.",
    "stream_poll_interval" = "5s": "How often stream and consumer state is read for metrics and readiness.",
    "frontdoor_listen" = "0.0.0.0:8080": "Address of the front door (queue-worker frontdoor): POST /async-function/<name>.",
    "frontdoor_max_body" = "1MiB": "Largest request body the front door queues (413 above it); lowered to what fits the NATS server's max_payload.",
    "frontdoor_queues" = "": "Queue per function for the front door, as fn=queue pairs (fn or fn.namespace), comma separated; others use queue_name.",
    "frontdoor_check_function" = "false": "Front door: look each function up at <gateway_url>/system/function/<name> (404 when unknown; its com.openfaas.queue and retry annotations apply).",
    "secret_mount_path" = "": "Directory holding basic-auth-user and basic-auth-password for the gateway's /system API (OpenFaaS's basic-auth secret). Read by the front door when it starts, if frontdoor_check_function is on; the worker ignores it.",
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

/// A hint for an unknown key: the key it most likely meant.
pub(super) fn suggest(key: &str) -> String {
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
