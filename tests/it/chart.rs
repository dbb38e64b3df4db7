//! The Helm chart and the dashboard, checked against the code: the env vars a values file
//! renders are loaded by the worker's own configuration loader and compared with what the
//! values say; bad values are refused; every dashboard query parses as PromQL and names only
//! metrics the worker exports.
//!
//! The tests that render the chart run a real `helm` ($HELM; `scripts/test` installs it and
//! sets it). A build without HELM lists them as ignored (build.rs), never as passed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use promql_parser::parser::{self, Expr};
use promql_parser::util::{walk_expr, ExprVisitor};
use queue_worker::config::{Config, NatsAuth, Sources, ALIASES, KEYS, LEGACY_KEYS};
use queue_worker::telemetry::metrics::NAMES;
use queue_worker::worker::retry::Backoff;
use serde_norway::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/chart/queue-worker");

/// The env vars faas-netes' chart/queue-worker renders (templates/deployment.yaml); ours must
/// render each of them, under the same name.
const OPENFAAS_ENV: &[&str] = &[
    "nats_host",
    "nats_port",
    "nats_stream",
    "nats_durable",
    "queue_name",
    "queue_partitions",
    "filter_partition",
    "max_inflight",
    "scaling_mode",
    "consumer_inactive_threshold",
    "consumer_pull_max_messages",
    "gateway_url",
    "tls_insecure",
    "debug",
    "log_encoding",
    "nats_stream_replicas",
    "ack_wait",
    "adaptive_concurrency",
    "upstream_timeout",
    "max_retry_attempts",
    "max_retry_wait",
    "initial_retry_wait",
    "retry_http_codes",
    "backoff",
];

/// faas-netes' chart/queue-worker values and their defaults (chart 0.2.31), which ours keeps.
/// `image` is left out: it names our image.
const OPENFAAS_DEFAULTS: &[(&str, &str)] = &[
    ("imagePullPolicy", "IfNotPresent"),
    ("replicas", "1"),
    ("queueName", ""),
    ("mode", "static"),
    ("maxInflight", "1"),
    ("adaptiveConcurrency", "true"),
    ("queuePartitions", "1"),
    ("partition", "0"),
    ("consumer.inactiveThreshold", "30s"),
    ("consumer.pullMaxMessages", ""),
    ("upstreamTimeout", "1m"),
    ("maxRetryAttempts", "100"),
    ("maxRetryWait", "120s"),
    ("initialRetryWait", "10s"),
    ("httpRetryCodes", "408,429,500,502,503,504"),
    ("backoff", ""),
    ("insecureTLS", "false"),
    ("gateway.host", "http://gateway.openfaas"),
    ("gateway.port", "8080"),
    ("nats.host", "nats.openfaas"),
    ("nats.port", "4222"),
    ("nats.stream.name", "custom-request"),
    ("nats.stream.replicas", "1"),
    ("nats.consumer.durableName", "custom-workers"),
    ("nats.consumer.ackWait", "30s"),
    ("logs.debug", "false"),
    ("logs.format", "console"),
    ("resources.requests.memory", "120Mi"),
    ("resources.requests.cpu", "50m"),
    ("nodeSelector", "{}"),
    ("tolerations", "[]"),
    ("affinity", "{}"),
];

/// The helm to run: $HELM, else `helm` on PATH (`cargo test -- --include-ignored` without
/// HELM). Not finding one fails the test: the chart tests are only run when helm is meant to
/// be there (build.rs).
fn helm() -> PathBuf {
    if let Some(h) = std::env::var_os("HELM").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let found = Command::new("helm").arg("version").output();
    if matches!(found, Ok(ref o) if o.status.success()) {
        return PathBuf::from("helm");
    }
    panic!(
        "helm not found: run scripts/ensure-helm and set HELM to the path it prints \
         (scripts/test does both)"
    );
}

/// `helm template qw <chart> --namespace openfaas <args>`: the rendered objects, or helm's
/// error text.
fn render(args: &[&str]) -> Result<Vec<Value>, String> {
    let out = Command::new(helm())
        .args(["template", "qw", CHART, "--namespace", "openfaas"])
        .args(args)
        .output()
        .expect("run helm");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    let docs = serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect();
    Ok(docs)
}

fn render_ok(args: &[&str]) -> Vec<Value> {
    render(args).unwrap_or_else(|e| panic!("helm template {args:?}: {e}"))
}

fn values_file(name: &str) -> String {
    format!("{CHART}/ci/{name}")
}

/// `a.b.c` in a YAML value.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| match v {
        Value::Mapping(m) => m.get(k).unwrap_or(&Value::Null),
        Value::Sequence(s) => k
            .parse()
            .ok()
            .and_then(|i: usize| s.get(i))
            .unwrap_or(&Value::Null),
        _ => &Value::Null,
    })
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        Value::Mapping(m) if m.is_empty() => "{}".into(),
        Value::Sequence(q) if q.is_empty() => "[]".into(),
        other => serde_norway::to_string(other).unwrap(),
    }
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| s(at(d, "kind")) == kind && s(at(d, "metadata.name")) == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn kinds(docs: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = docs
        .iter()
        .map(|d| format!("{}/{}", s(at(d, "kind")), s(at(d, "metadata.name"))))
        .collect();
    k.sort();
    k
}

/// The env of a Deployment's only container, in order. Every entry has a literal value.
fn env(deployment: &Value) -> Vec<(String, String)> {
    let containers = at(deployment, "spec.template.spec.containers")
        .as_sequence()
        .unwrap();
    assert_eq!(containers.len(), 1);
    at(&containers[0], "env")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(at(e, "valueFrom").is_null(), "{e:?}");
            (s(at(e, "name")), s(at(e, "value")))
        })
        .collect()
}

/// Loads the worker's configuration from a container's env, with the library and with the
/// binary from its environment. Files under /var/secrets/ (the chart's mounts) are replaced by files in `dir`
/// holding `<file name>-content`, after checking that a volume of the pod provides them.
fn load(deployment: &Value, dir: &Path) -> Config {
    let pairs = env(deployment);
    assert_worker_reads(&pairs);
    let mounted = mounted_files(deployment);
    let pairs = pairs.into_iter().map(|(k, v)| {
        if let Some(rest) = v.strip_prefix("/var/secrets/") {
            if !k.ends_with("_path") {
                assert!(
                    mounted.contains(&v),
                    "{k}={v} is not provided by a volume: {mounted:?}"
                );
            }
            let local = dir.join(rest);
            std::fs::create_dir_all(local.parent().unwrap()).unwrap();
            if k.ends_with("_path") {
                std::fs::create_dir_all(&local).unwrap();
                for f in mounted.iter().filter(|m| m.starts_with(&format!("{v}/"))) {
                    let name = Path::new(f).file_name().unwrap().to_str().unwrap();
                    std::fs::write(local.join(name), format!("{name}-content")).unwrap();
                }
            } else {
                let name = local.file_name().unwrap().to_str().unwrap().to_string();
                std::fs::write(&local, format!("{name}-content")).unwrap();
            }
            return (k, local.to_str().unwrap().to_string());
        }
        (k, v)
    });
    let pairs: Vec<(String, String)> = pairs.collect();
    let sources = Sources::from_pairs(pairs.clone()).unwrap();
    let config = Config::load(&sources)
        .unwrap_or_else(|e| panic!("the worker refuses the rendered env: {e}"));

    // The binary reads the same env from its process environment (another code path: env
    // layer, aliases): `check-config` must print the same configuration, with no warning.
    let out = Command::new(env!("CARGO_BIN_EXE_queue-worker"))
        .arg("check-config")
        .env_clear()
        .envs(pairs)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check-config: {stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{config:#?}\n")
    );
    assert!(!stderr.contains("WARN"), "{stderr}");
    config
}

/// Each env var is rendered once, under a name the worker reads (a key or an alias, never a
/// legacy name).
fn assert_worker_reads(pairs: &[(String, String)]) {
    let names: BTreeSet<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names.len(), pairs.len(), "an env var is rendered twice");
    for (name, _) in pairs {
        assert!(
            KEYS.iter().any(|k| k.name == name) || ALIASES.iter().any(|(a, _)| a == name),
            "the chart renders {name}, which the worker does not read"
        );
        assert!(
            !LEGACY_KEYS.iter().any(|(k, _)| k == name),
            "{name} is a legacy key"
        );
    }
}

/// Every file path the pod's volumes put in the container: `<mountPath>/<item path>`.
fn mounted_files(deployment: &Value) -> BTreeSet<String> {
    let spec = at(deployment, "spec.template.spec");
    let mut files = BTreeSet::new();
    let mounts = at(&spec["containers"][0], "volumeMounts");
    for m in mounts.as_sequence().into_iter().flatten() {
        assert_eq!(at(m, "readOnly"), &Value::Bool(true), "{m:?}");
        let volume = at(spec, "volumes")
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| at(v, "name") == at(m, "name"))
            .expect("mount of a volume that exists");
        let mut secrets: Vec<&Value> = Vec::new();
        if !at(volume, "secret").is_null() {
            secrets.push(at(volume, "secret"));
        }
        for src in at(volume, "projected.sources")
            .as_sequence()
            .into_iter()
            .flatten()
        {
            secrets.push(at(src, "secret"));
        }
        for secret in secrets {
            let name = s(at(secret, "name")).to_owned() + &s(at(secret, "secretName"));
            assert!(
                !name.is_empty(),
                "a secret source without a name: {secret:?}"
            );
            for item in at(secret, "items").as_sequence().unwrap() {
                files.insert(format!("{}/{}", s(at(m, "mountPath")), s(at(item, "path"))));
            }
        }
    }
    files
}

fn selector_matches(selector: &Value, labels: &Value) -> bool {
    selector
        .as_mapping()
        .unwrap()
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn values_keep_openfaas_names_and_defaults() {
    let values: Value =
        serde_norway::from_str(&std::fs::read_to_string(format!("{CHART}/values.yaml")).unwrap())
            .unwrap();
    for (path, default) in OPENFAAS_DEFAULTS {
        assert_eq!(s(at(&values, path)), *default, "values.yaml {path}");
    }
    assert!(at(&values, "image").is_string());
}

#[test]
#[cfg_attr(not(has_helm), ignore = "needs helm: set HELM (scripts/test does)")]
fn openfaas_values_file_renders_their_env_vars_and_the_worker_reads_them() {
    let docs = render_ok(&["-f", &values_file("openfaas-values.yaml")]);
    assert_eq!(kinds(&docs), ["Deployment/qw-queue-worker"]);
    let d = find(&docs, "Deployment", "qw-queue-worker");
    let names: BTreeSet<String> = env(d).into_iter().map(|(k, _)| k).collect();
    for name in OPENFAAS_ENV {
        assert!(names.contains(*name), "{name} is not rendered");
    }
    let dir = tempfile::tempdir().unwrap();
    let c = load(d, dir.path());
    assert_eq!(c.queue, "slow-queue");
    assert_eq!(c.durable, "slow-queue-workers");
    assert_eq!(c.stream_replicas, 3);
    assert_eq!(c.ack_wait, Duration::from_secs(120));
    assert_eq!(c.max_inflight, 5);
    assert_eq!(c.pull_max_messages, 3);
    assert_eq!(c.upstream_timeout, Duration::from_secs(15 * 60));
    assert_eq!(c.retry.max_attempts, 7);
    assert_eq!(c.retry.max_wait, Duration::from_secs(300));
    assert_eq!(c.retry.initial_wait, Duration::from_secs(20));
    assert_eq!(c.retry.codes, [429, 503]);
    assert_eq!(c.retry.backoff, Backoff::Full);
    assert!(c.callback.tls_insecure);
    assert_eq!(
        c.gateway_url.as_str(),
        "http://gateway.openfaas.svc.cluster.local:8081/"
    );
    assert_eq!(c.nats.urls, ["nats://nats.openfaas.svc.cluster.local:4223"]);
    assert!(c.debug);
    assert_eq!(format!("{:?}", c.log_encoding), "Json");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let adaptive = env(d)
        .into_iter()
        .find(|(k, _)| k == "adaptive_concurrency");
    assert_eq!(adaptive.unwrap().1, "false");

    // The pod spec values are carried over as they are.
    assert_eq!(s(at(d, "spec.replicas")), "3");
    let pod = at(d, "spec.template.spec");
    let container = &pod["containers"][0];
    assert_eq!(
        s(at(container, "image")),
        "ghcr.io/openfaasltd/jetstream-queue-worker:0.5.7"
    );
    assert_eq!(s(at(container, "imagePullPolicy")), "Always");
    assert_eq!(s(at(container, "resources.limits.memory")), "256Mi");
    assert_eq!(s(at(container, "resources.requests.cpu")), "100m");
    assert_eq!(
        at(pod, "nodeSelector").get("kubernetes.io/os").map(s),
        Some("linux".into())
    );
    assert_eq!(s(at(pod, "tolerations.0.key")), "dedicated");
    assert!(!at(pod, "affinity.nodeAffinity").is_null());
}

#[test]
#[cfg_attr(not(has_helm), ignore = "needs helm: set HELM (scripts/test does)")]
fn default_values_give_openfaas_defaults_probes_and_a_locked_down_pod() {
    let docs = render_ok(&[]);
    assert_eq!(kinds(&docs), ["Deployment/qw-queue-worker"]);
    let d = find(&docs, "Deployment", "qw-queue-worker");
    let dir = tempfile::tempdir().unwrap();
    let c = load(d, dir.path());
    assert_eq!(c.queue, "custom-request");
    assert_eq!(c.durable, "custom-workers");
    assert_eq!(c.max_inflight, 1);
    assert_eq!(c.ack_wait, Duration::from_secs(30));
    assert_eq!(c.retry.max_attempts, 100);
    assert_eq!(c.retry.backoff, Backoff::Exponential);
    assert_eq!(c.upstream_timeout, Duration::from_secs(60));
    assert_eq!(c.gateway_url.as_str(), "http://gateway.openfaas:8080/");
    assert_eq!(c.nats.urls, ["nats://nats.openfaas:4222"]);
    assert!(matches!(c.nats.auth, NatsAuth::None));
    assert_eq!(c.drain_timeout, Duration::from_secs(25));
    assert_eq!(c.max_call_age, None, "no maximum age unless set");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    // faas-netes' selector, so `helm upgrade` from their chart keeps the Deployment.
    let selector = at(d, "spec.selector.matchLabels");
    assert_eq!(
        serde_norway::to_string(selector).unwrap(),
        "app: queue-worker\ncomponent: queue-worker\n"
    );
    let template = at(d, "spec.template");
    assert!(selector_matches(selector, at(template, "metadata.labels")));
    assert_eq!(s(at(template, "metadata.labels.release")), "qw");
    let ann = at(template, "metadata.annotations");
    assert_eq!(ann.get("prometheus.io/scrape").map(s), Some("true".into()));
    assert_eq!(ann.get("prometheus.io/port").map(s), Some("8081".into()));

    let pod = at(template, "spec");
    // Kubernetes waits longer than the drain before it kills the worker.
    assert_eq!(s(at(pod, "terminationGracePeriodSeconds")), "40");
    assert_eq!(s(at(pod, "automountServiceAccountToken")), "false");
    assert_eq!(s(at(pod, "securityContext.runAsNonRoot")), "true");
    let container = &pod["containers"][0];
    assert_eq!(s(at(container, "livenessProbe.httpGet.path")), "/healthz");
    assert_eq!(s(at(container, "readinessProbe.httpGet.path")), "/readyz");
    assert_eq!(s(at(container, "livenessProbe.httpGet.port")), "metrics");
    assert_eq!(s(at(container, "ports.0.name")), "metrics");
    assert_eq!(s(at(container, "ports.0.containerPort")), "8081");
    assert_eq!(
        s(at(container, "securityContext.readOnlyRootFilesystem")),
        "true"
    );
    assert_eq!(
        s(at(container, "securityContext.allowPrivilegeEscalation")),
        "false"
    );
    assert_eq!(
        s(at(container, "securityContext.capabilities.drop.0")),
        "ALL"
    );
}

#[test]
#[cfg_attr(not(has_helm), ignore = "needs helm: set HELM (scripts/test does)")]
fn every_option_renders_objects_that_fit_together() {
    let docs = render_ok(&["-f", &values_file("full-values.yaml")]);
    assert_eq!(
        kinds(&docs),
        [
            "ConfigMap/qw-queue-worker-dashboard",
            "Deployment/qw-queue-worker",
            "Deployment/qw-queue-worker-frontdoor",
            "PodDisruptionBudget/qw-queue-worker",
            "PodDisruptionBudget/qw-queue-worker-frontdoor",
            "ScaledObject/report-custom-request",
            "ScaledObject/sleep-custom-request",
            "Service/qw-queue-worker-frontdoor",
            "Service/qw-queue-worker-metrics",
            "ServiceMonitor/qw-queue-worker",
        ]
    );
    let worker = find(&docs, "Deployment", "qw-queue-worker");
    let frontdoor = find(&docs, "Deployment", "qw-queue-worker-frontdoor");

    // The worker: NATS credentials and TLS from Secrets, read through the mounted files.
    let dir = tempfile::tempdir().unwrap();
    let c = load(worker, dir.path());
    assert_eq!(
        c.nats.urls,
        ["tls://nats-0.nats:4222", "tls://nats-1.nats:4222"]
    );
    match &c.nats.auth {
        NatsAuth::UserPassword { user, password } => {
            assert_eq!(user, "worker");
            assert_eq!(password.expose(), "password-content");
        }
        other => panic!("auth {other:?}"),
    }
    assert!(c
        .nats
        .tls_ca_file
        .as_ref()
        .unwrap()
        .ends_with("nats/ca.crt"));
    let (cert, key) = c.nats.tls_client.as_ref().unwrap();
    assert!(cert.ends_with("nats/tls.crt") && key.ends_with("nats/tls.key"));
    assert_eq!(c.dead_letter.max_age, Duration::from_secs(72 * 3600));
    assert_eq!(c.dead_letter.max_bytes, 512 << 20);
    assert_eq!(
        c.callback.allowed,
        queue_worker::worker::allowlist::AllowList::parse("*.hooks.example.com,10.20.0.0/16")
            .unwrap()
    );
    assert_eq!(c.drain_timeout, Duration::from_secs(60));
    assert_eq!(c.max_call_age, Some(Duration::from_secs(6 * 3600)));
    assert_eq!(c.stream_poll_interval, Duration::from_secs(2), "extraEnv");
    assert_eq!(
        s(at(
            worker,
            "spec.template.spec.terminationGracePeriodSeconds"
        )),
        "90"
    );

    // The front door: the same settings plus its own, and the gateway's basic auth.
    let dir = tempfile::tempdir().unwrap();
    let f = load(frontdoor, dir.path());
    assert_eq!(f.queue, c.queue);
    assert_eq!(f.frontdoor.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(f.frontdoor.max_body, 2 << 20);
    assert!(f.frontdoor.check_function);
    assert_eq!(
        f.frontdoor.queues,
        BTreeMap::from([
            ("report.team-a".to_string(), "reports".to_string()),
            ("slow.openfaas-fn".to_string(), "slow-queue".to_string()),
        ])
    );
    let (user, password) = f.frontdoor.gateway_auth().unwrap().expect("basic auth");
    assert_eq!(user, "basic-auth-user-content");
    assert_eq!(password.expose(), "basic-auth-password-content");
    assert_eq!(
        s(at(frontdoor, "spec.template.spec.containers.0.args.0")),
        "frontdoor"
    );
    // Grace covers the preStop sleep and the drain.
    assert_eq!(
        s(at(
            frontdoor,
            "spec.template.spec.terminationGracePeriodSeconds"
        )),
        "95"
    );
    assert_eq!(
        s(at(
            frontdoor,
            "spec.template.spec.containers.0.lifecycle.preStop.sleep.seconds"
        )),
        "5"
    );

    // Selectors: each Service, PDB and monitor selects the pods it is meant for, and only them.
    let pods = [
        ("worker", at(worker, "spec.template.metadata.labels")),
        ("frontdoor", at(frontdoor, "spec.template.metadata.labels")),
    ];
    let selected = |kind: &str, name: &str, path: &str| -> Vec<&str> {
        let selector = at(find(&docs, kind, name), path);
        pods.iter()
            .filter(|(_, labels)| selector_matches(selector, labels))
            .map(|(pod, _)| *pod)
            .collect()
    };
    let both = ["worker", "frontdoor"];
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            "Service",
            "qw-queue-worker-frontdoor",
            "spec.selector",
            &["frontdoor"],
        ),
        ("Service", "qw-queue-worker-metrics", "spec.selector", &both),
        (
            "PodDisruptionBudget",
            "qw-queue-worker",
            "spec.selector.matchLabels",
            &["worker"],
        ),
        (
            "PodDisruptionBudget",
            "qw-queue-worker-frontdoor",
            "spec.selector.matchLabels",
            &["frontdoor"],
        ),
    ];
    for (kind, name, path, expected) in cases {
        assert_eq!(selected(kind, name, path), *expected, "{kind}/{name}");
    }
    let fd_svc = find(&docs, "Service", "qw-queue-worker-frontdoor");
    assert_eq!(s(at(fd_svc, "spec.ports.0.targetPort")), "http");
    let fd_ports = at(frontdoor, "spec.template.spec.containers.0.ports");
    assert_eq!(s(at(fd_ports, "0.name")), "http");
    let metrics_svc = find(&docs, "Service", "qw-queue-worker-metrics");
    let sm = find(&docs, "ServiceMonitor", "qw-queue-worker");
    assert!(selector_matches(
        at(sm, "spec.selector.matchLabels"),
        at(metrics_svc, "metadata.labels")
    ));
    assert_eq!(
        s(at(sm, "spec.endpoints.0.port")),
        s(at(metrics_svc, "spec.ports.0.name"))
    );
    assert_eq!(
        at(sm, "metadata.labels").get("release").map(s).as_deref(),
        Some("prometheus"),
        "the monitor's own labels win: Prometheus selects monitors by them"
    );
    let pdb = find(&docs, "PodDisruptionBudget", "qw-queue-worker");
    assert_eq!(at(pdb, "spec.minAvailable"), &Value::from(1));
    assert!(at(pdb, "spec.maxUnavailable").is_null());
    let fd_pdb = find(&docs, "PodDisruptionBudget", "qw-queue-worker-frontdoor");
    assert_eq!(s(at(fd_pdb, "spec.maxUnavailable")), "50%");
    // KEDA: one ScaledObject per function, in the function's namespace, on a query that parses
    // and names a metric the worker exports.
    let sleep = find(&docs, "ScaledObject", "sleep-custom-request");
    assert_eq!(s(at(sleep, "metadata.namespace")), "openfaas-fn");
    assert_eq!(s(at(sleep, "spec.scaleTargetRef.name")), "sleep");
    assert_eq!(s(at(sleep, "spec.minReplicaCount")), "0");
    assert_eq!(s(at(sleep, "spec.maxReplicaCount")), "20");
    let trigger = at(sleep, "spec.triggers.0");
    assert_eq!(s(at(trigger, "type")), "prometheus");
    assert_eq!(s(at(trigger, "metadata.threshold")), "5");
    let query = s(at(trigger, "metadata.query"));
    assert_eq!(
        query,
        r#"max(queue_worker_pending_messages{queue_name="custom-request"})"#
    );
    assert_eq!(metric_names(&query), ["queue_worker_pending_messages"]);
    let report = find(&docs, "ScaledObject", "report-custom-request");
    assert_eq!(s(at(report, "metadata.namespace")), "team-a");
    assert!(s(at(report, "spec.triggers.0.metadata.query")).contains("reports"));

    // The dashboard ConfigMap carries the dashboard file unchanged.
    let cm = find(&docs, "ConfigMap", "qw-queue-worker-dashboard");
    assert_eq!(s(at(cm, "metadata.labels.grafana_dashboard")), "1");
    let file = std::fs::read_to_string(format!("{CHART}/dashboards/queue-worker.json")).unwrap();
    let data = at(cm, "data").get("queue-worker.json").map(s);
    assert_eq!(data.as_deref(), Some(file.trim_end()));
}

/// `mode: function` renders `scaling_mode=function` with the consumer settings, and each KEDA
/// trigger reads its function's own pending series, averaged across the worker's replicas as
/// OpenFaaS's autoscaler rule does (`avg(queue_worker_pending_messages) by (function_name)`).
#[test]
#[cfg_attr(not(has_helm), ignore = "needs helm: set HELM (scripts/test does)")]
fn function_mode_renders_its_settings_and_scales_each_function_on_its_own_series() {
    let docs = render_ok(&["-f", &values_file("function-values.yaml")]);
    assert_eq!(
        kinds(&docs),
        [
            "Deployment/qw-queue-worker",
            "ScaledObject/report-custom-request",
            "ScaledObject/sleep-custom-request",
        ]
    );
    let pairs = env(find(&docs, "Deployment", "qw-queue-worker"));
    assert_worker_reads(&pairs);
    let value = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(value("scaling_mode"), Some("function"));
    assert_eq!(value("consumer_inactive_threshold"), Some("1m"));
    assert_eq!(value("consumer_pull_max_messages"), Some("10"));
    assert_eq!(value("max_inflight"), Some("20"));

    let query = |name: &str| {
        let so = find(&docs, "ScaledObject", name);
        s(at(so, "spec.triggers.0.metadata.query"))
    };
    let sleep = query("sleep-custom-request");
    assert_eq!(
        sleep,
        r#"avg(queue_worker_pending_messages{queue_name="custom-request",function_name="sleep.openfaas-fn"})"#
    );
    assert_eq!(metric_names(&sleep), ["queue_worker_pending_messages"]);
    let report = query("report-custom-request");
    assert_eq!(
        report,
        r#"avg(queue_worker_pending_messages{queue_name="custom-request",function_name="report.team-a"})"#
    );
    assert_eq!(
        s(at(
            find(&docs, "ScaledObject", "report-custom-request"),
            "metadata.namespace"
        )),
        "team-a"
    );

    // --set mode=function on its own gives the same env, and keeps a query given by hand.
    let docs = render_ok(&[
        "-f",
        &values_file("full-values.yaml"),
        "--set",
        "mode=function",
    ]);
    let worker = env(find(&docs, "Deployment", "qw-queue-worker"));
    assert!(worker.contains(&("scaling_mode".into(), "function".into())));
    assert!(worker.contains(&("consumer_inactive_threshold".into(), "30s".into())));
    assert!(!worker
        .iter()
        .any(|(k, _)| k == "consumer_pull_max_messages"));
    let so = find(&docs, "ScaledObject", "sleep-custom-request");
    assert!(s(at(so, "spec.triggers.0.metadata.query"))
        .contains(r#"function_name="sleep.openfaas-fn""#));
    let so = find(&docs, "ScaledObject", "report-custom-request");
    assert_eq!(
        s(at(so, "spec.triggers.0.metadata.query")),
        r#"max(queue_worker_pending_messages{queue_name="reports"})"#
    );
}

#[test]
#[cfg_attr(not(has_helm), ignore = "needs helm: set HELM (scripts/test does)")]
fn bad_values_are_refused_naming_the_value() {
    let cases: &[(&str, &str)] = &[
        ("mode=fast", "/mode"),
        // The worker refuses an inactive threshold under 1s, and a bare number is no duration.
        (
            "consumer.inactiveThreshold=500ms",
            "/consumer/inactiveThreshold",
        ),
        (
            "consumer.inactiveThreshold=0s",
            "/consumer/inactiveThreshold",
        ),
        (
            "consumer.inactiveThreshold=0.5s",
            "/consumer/inactiveThreshold",
        ),
        (
            "consumer.inactiveThreshold=30",
            "/consumer/inactiveThreshold",
        ),
        (
            "consumer.inactiveThreshold=soon",
            "/consumer/inactiveThreshold",
        ),
        ("consumer.pullMaxMessages=-1", "/consumer/pullMaxMessages"),
        ("consumer.pullMaxMessages=abc", "/consumer/pullMaxMessages"),
        ("consumer.pullMaxMessages=1.5", "/consumer/pullMaxMessages"),
        (
            "consumer.pullMaxMessages=100001",
            "/consumer/pullMaxMessages",
        ),
        (
            "queuePartitions=4",
            "queuePartitions: 4 is not supported yet",
        ),
        ("maxInflight=0", "/maxInflight"),
        ("maxInflight=abc", "/maxInflight"),
        ("ackWait=30s", "ackWait"),
        ("nats.reconect.attempts=3", "reconect"),
        ("httpRetryCodes=429;503", "/httpRetryCodes"),
        ("backoff=linear", "/backoff"),
        ("upstreamTimeout=15", "/upstreamTimeout"),
        // A bare number is not a duration: the worker (like Go's time.ParseDuration) would
        // refuse the "60" faas-netes' chart renders.
        ("upstreamTimeout=60", "/upstreamTimeout"),
        ("nats.consumer.ackWait=30", "/nats/consumer/ackWait"),
        ("maxRetryWait=120", "/maxRetryWait"),
        ("maxCallAge=3600", "/maxCallAge"),
        ("maxCallAge=-1h", "/maxCallAge"),
        // Below the worker's floors: refused at install, not in a crash-looping pod.
        ("initialRetryWait=0", "/initialRetryWait"),
        ("initialRetryWait=50ms", "/initialRetryWait"),
        ("maxRetryWait=99ms", "/maxRetryWait"),
        ("callback.retryWait=5ms", "/callback/retryWait"),
        ("callback.maxPending=0", "/callback/maxPending"),
        ("callback.maxPendingBytes=0", "/callback/maxPendingBytes"),
        ("callback.maxPendingBytes=1KiB", "/callback/maxPendingBytes"),
        ("httpRetryCodes=99", "/httpRetryCodes"),
        ("httpRetryCodes=600", "/httpRetryCodes"),
        ("logs.debug=2", "/logs/debug"),
        ("insecureTLS=maybe", "/insecureTLS"),
        ("queueName=a.b", "/queueName"),
        ("logs.format=text", "/logs/format"),
        (
            "terminationGracePeriodSeconds=35",
            "terminationGracePeriodSeconds: 35 must be more than drainTimeout (25s) + 10s",
        ),
        (
            "metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true",
            "enable serviceMonitor or podMonitor, not both",
        ),
        (
            "frontdoor.enabled=true,metrics.port=8080",
            "frontdoor.service.port: 8080 is also metrics.port",
        ),
        (
            "metrics.podMonitor.interval=1.5m",
            "/metrics/podMonitor/interval",
        ),
        ("drainTimeout=100us", "/drainTimeout"),
        ("drainTimeout=soon", "/drainTimeout"),
        (
            "extraEnv[0].name=max_inflight,extraEnv[0].value=9",
            "extraEnv: max_inflight is rendered by the chart",
        ),
        (
            "podDisruptionBudget.enabled=true,podDisruptionBudget.minAvailable=1",
            "podDisruptionBudget: set one of minAvailable and maxUnavailable",
        ),
        ("keda.enabled=true,keda.functions[0].namespace=x", "name"),
    ];
    for (set, expected) in cases {
        let result = render(&["--set", set]);
        match result {
            Ok(_) => panic!("--set {set} was accepted"),
            Err(e) => assert!(
                e.contains(expected),
                "--set {set}: expected {expected:?} in {e}"
            ),
        }
    }
    // A "0" given as text is rendered (only the number 0 is false to a template), and the
    // worker would refuse it.
    for set in ["consumer.inactiveThreshold=0", "consumer.pullMaxMessages=0"] {
        let e = render(&["--set-string", set]).expect_err(set);
        let path = format!("/{}", set.split_once('=').unwrap().0.replace('.', "/"));
        assert!(
            e.contains(&path),
            "--set-string {set}: expected {path} in {e}"
        );
    }
    // Values only older OpenFaaS charts have are accepted, and render nothing.
    let docs = render_ok(&[
        "--set",
        "maxWaiting=512,nats.reconnect.attempts=120,nats.reconnect.delay=2s",
    ]);
    let names: Vec<String> = env(find(&docs, "Deployment", "qw-queue-worker"))
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(!names
        .iter()
        .any(|n| n == "max_waiting" || n == "max_reconnect"));
}

/// What `--set` gives a template is typed (`429` a number, `true`/`True` a boolean, `0123`
/// text) and faas-netes' chart renders each value as `"{{ .Values.x }}"`, whatever its type.
/// Every value an OpenFaaS user can pass that way is accepted here, renders the same text,
/// and the worker reads it.
#[test]
#[cfg_attr(not(has_helm), ignore = "needs helm: set HELM (scripts/test does)")]
fn values_set_on_the_command_line_render_as_openfaas_renders_them() {
    type Check = fn(&Config);
    let cases: &[(&[&str], &str, &str, Check)] = &[
        (
            &["--set", "httpRetryCodes=429"],
            "retry_http_codes",
            "429",
            |c| assert_eq!(c.retry.codes, [429]),
        ),
        (
            &["--set-string", "httpRetryCodes=503"],
            "retry_http_codes",
            "503",
            |c| assert_eq!(c.retry.codes, [503]),
        ),
        (&["--set", "maxInflight=5"], "max_inflight", "5", |c| {
            assert_eq!(c.max_inflight, 5)
        }),
        (
            &["--set-string", "maxInflight=5"],
            "max_inflight",
            "5",
            |c| assert_eq!(c.max_inflight, 5),
        ),
        (
            &["--set", "maxRetryAttempts=7"],
            "max_retry_attempts",
            "7",
            |c| assert_eq!(c.retry.max_attempts, 7),
        ),
        (&["--set", "queueName=2024"], "queue_name", "2024", |c| {
            assert_eq!(c.queue, "2024")
        }),
        (&["--set", "queueName=-1"], "queue_name", "-1", |c| {
            assert_eq!(c.queue, "-1")
        }),
        (
            &["--set", "nats.stream.name=42"],
            "nats_stream",
            "42",
            |c| assert_eq!(c.queue, "42"),
        ),
        (
            &["--set", "nats.consumer.durableName=7"],
            "nats_durable",
            "7",
            |c| assert_eq!(c.durable, "7"),
        ),
        (&["--set", "nats.port=4223"], "nats_port", "4223", |c| {
            assert_eq!(c.nats.urls, ["nats://nats.openfaas:4223"])
        }),
        (
            &["--set", "nats.stream.replicas=3"],
            "nats_stream_replicas",
            "3",
            |c| assert_eq!(c.stream_replicas, 3),
        ),
        (&["--set", "logs.debug=true"], "debug", "true", |c| {
            assert!(c.debug)
        }),
        (&["--set", "logs.debug=True"], "debug", "true", |c| {
            assert!(c.debug)
        }),
        (&["--set", "logs.debug=1"], "debug", "1", |c| {
            assert!(c.debug)
        }),
        (&["--set-string", "logs.debug=TRUE"], "debug", "TRUE", |c| {
            assert!(c.debug)
        }),
        (&["--set", "insecureTLS=0"], "tls_insecure", "0", |c| {
            assert!(!c.callback.tls_insecure)
        }),
        (
            &["--set-string", "insecureTLS=t"],
            "tls_insecure",
            "t",
            |c| assert!(c.callback.tls_insecure),
        ),
        (
            &["--set", "adaptiveConcurrency=false"],
            "adaptive_concurrency",
            "false",
            |_| {},
        ),
        (
            &["--set", "adaptiveConcurrency=1"],
            "adaptive_concurrency",
            "1",
            |_| {},
        ),
        (
            &["--set", "queuePartitions=1,partition=0"],
            "filter_partition",
            "0",
            |_| {},
        ),
        (
            &["--set", "consumer.pullMaxMessages=3"],
            "consumer_pull_max_messages",
            "3",
            |c| assert_eq!(c.pull_max_messages, 3),
        ),
        (
            &["--set-string", "consumer.pullMaxMessages=010"],
            "consumer_pull_max_messages",
            "010",
            |c| assert_eq!(c.pull_max_messages, 10),
        ),
        (
            &["--set", "consumer.inactiveThreshold=2m"],
            "consumer_inactive_threshold",
            "2m",
            |_| {},
        ),
        (
            &["--set", "consumer.inactiveThreshold=1s"],
            "consumer_inactive_threshold",
            "1s",
            |_| {},
        ),
        (
            &["--set", "upstreamTimeout=15m"],
            "upstream_timeout",
            "15m",
            |c| assert_eq!(c.upstream_timeout, Duration::from_secs(900)),
        ),
    ];
    for (args, name, rendered, check) in cases {
        let docs = render_ok(args);
        let d = find(&docs, "Deployment", "qw-queue-worker");
        let value = env(d).into_iter().find(|(k, _)| k == name).map(|(_, v)| v);
        assert_eq!(value.as_deref(), Some(*rendered), "{args:?}");
        let dir = tempfile::tempdir().unwrap();
        check(&load(d, dir.path()));
    }
    // 0 is false to a template: like faas-netes' chart, nothing is rendered (the worker's
    // default applies).
    let docs = render_ok(&["--set", "consumer.inactiveThreshold=0"]);
    let d = find(&docs, "Deployment", "qw-queue-worker");
    assert!(!env(d)
        .iter()
        .any(|(k, _)| k == "consumer_inactive_threshold"));
    // Values of older charts, whatever their type, are accepted and render nothing.
    let docs = render_ok(&[
        "--set",
        "nats.reconnect.delay=2,nats.reconnect.attempts=true",
    ]);
    let d = find(&docs, "Deployment", "qw-queue-worker");
    assert!(!env(d).iter().any(|(k, _)| k.contains("reconnect")));
}

#[test]
#[cfg_attr(not(has_helm), ignore = "needs helm: set HELM (scripts/test does)")]
fn pod_monitor_selects_worker_and_front_door_pods() {
    let docs = render_ok(&["-f", &values_file("podmonitor-values.yaml")]);
    let pm = find(&docs, "PodMonitor", "qw-queue-worker");
    let selector = at(pm, "spec.selector.matchLabels");
    for name in ["qw-queue-worker", "qw-queue-worker-frontdoor"] {
        let pod = at(
            find(&docs, "Deployment", name),
            "spec.template.metadata.labels",
        );
        assert!(selector_matches(selector, pod), "{name}");
    }
    assert_eq!(s(at(pm, "spec.podMetricsEndpoints.0.port")), "metrics");
    assert_eq!(
        at(pm, "metadata.labels").get("release").map(s).as_deref(),
        Some("prometheus")
    );
    assert!(!kinds(&docs)
        .iter()
        .any(|k| k.starts_with("ServiceMonitor/")));
}

/// `key: null` is how a values file unsets a value: it means the default, never "<nil>".
#[test]
#[cfg_attr(not(has_helm), ignore = "needs helm: set HELM (scripts/test does)")]
fn null_values_mean_unset() {
    let docs = render_ok(&[
        "--set",
        "queueName=null,backoff=null,consumer.pullMaxMessages=null,terminationGracePeriodSeconds=null",
        "--set",
        "podDisruptionBudget.enabled=true,podDisruptionBudget.maxUnavailable=null,podDisruptionBudget.minAvailable=1",
    ]);
    let d = find(&docs, "Deployment", "qw-queue-worker");
    assert!(
        !env(d).iter().any(|(_, v)| v.contains("nil")),
        "{:?}",
        env(d)
    );
    let dir = tempfile::tempdir().unwrap();
    let c = load(d, dir.path());
    assert_eq!(c.queue, "custom-request");
    assert_eq!(
        s(at(d, "spec.template.spec.terminationGracePeriodSeconds")),
        "40"
    );
    let pdb = find(&docs, "PodDisruptionBudget", "qw-queue-worker");
    assert_eq!(s(at(pdb, "spec.minAvailable")), "1");
}

/// Metric names of the selectors in a PromQL expression; a histogram's `_bucket`, `_sum`
/// and `_count` series count as the histogram.
fn metric_names(expr: &str) -> Vec<String> {
    struct Names(Vec<String>);
    impl ExprVisitor for Names {
        type Error = ();
        fn pre_visit(&mut self, e: &Expr) -> Result<bool, ()> {
            let vs = match e {
                Expr::VectorSelector(vs) => vs,
                Expr::MatrixSelector(ms) => &ms.vs,
                _ => return Ok(true),
            };
            let name = vs.name.clone().expect("a selector names its metric");
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| NAMES.contains(base))
                .map(str::to_string);
            self.0.push(base.unwrap_or(name));
            Ok(true)
        }
    }
    // Grafana's variables, as Grafana substitutes them before the query reaches Prometheus.
    let expr = expr.replace("$__rate_interval", "1m");
    let parsed = parser::parse(&expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
    let mut names = Names(Vec::new());
    walk_expr(&mut names, &parsed).unwrap();
    names.0
}

#[test]
fn dashboard_queries_parse_and_name_only_exported_metrics() {
    let text = std::fs::read_to_string(format!("{CHART}/dashboards/queue-worker.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let mut used = BTreeSet::new();
    let mut panels: Vec<&serde_json::Value> = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten());
    }
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "panel ids are unique"
        );
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            for name in names {
                assert!(
                    NAMES.contains(&name.as_str()),
                    "panel {}: {name} is not exported (metrics::NAMES)",
                    p["title"]
                );
                used.insert(name);
            }
        }
    }
    // Template variables query label values of exported metrics too.
    for v in dash["templating"]["list"].as_array().unwrap() {
        let Some(q) = v["query"]["query"].as_str() else {
            continue;
        };
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.rsplit_once(',').map(|(sel, _)| sel))
            .unwrap_or_else(|| panic!("unexpected variable query {q}"));
        for name in metric_names(inner) {
            assert!(NAMES.contains(&name.as_str()), "{q}");
        }
    }
    // What the issue asks the dashboard to show.
    for needed in [
        "queue_worker_messages_submitted_total",
        "queue_worker_messages_processed_total",
        "queue_worker_pending_messages",
        "queue_worker_function_invocation_inflight",
        "queue_worker_invocations_total",
        "queue_worker_invocation_duration_seconds",
        "queue_worker_retries_total",
        "queue_worker_dead_lettered_total",
        "queue_worker_max_inflight",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
}

/// Every value of values.yaml has a row in the chart README's table, and every row names a
/// value that exists.
#[test]
fn chart_readme_documents_every_value() {
    // Values holding Kubernetes objects or free-form maps are documented as a whole.
    const WHOLE: &[&str] = &[
        "resources",
        "nodeSelector",
        "affinity",
        "podSecurityContext",
        "securityContext",
        "livenessProbe",
        "readinessProbe",
        "labels",
        "annotations",
        "podAnnotations",
        "podLabels",
    ];
    fn leaves(prefix: &str, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Mapping(m) if !m.is_empty() => {
                for (k, v) in m {
                    let k = k.as_str().unwrap();
                    let path = if prefix.is_empty() {
                        k.to_string()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    if WHOLE.contains(&k) {
                        out.push(path);
                    } else {
                        leaves(&path, v, out);
                    }
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let values: Value =
        serde_norway::from_str(&std::fs::read_to_string(format!("{CHART}/values.yaml")).unwrap())
            .unwrap();
    let mut paths = Vec::new();
    leaves("", &values, &mut paths);
    let readme = std::fs::read_to_string(format!("{CHART}/README.md")).unwrap();
    let rows: BTreeSet<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(name, _)| name))
        .collect();
    for p in &paths {
        assert!(rows.contains(p.as_str()), "chart README has no row for {p}");
    }
    let legacy = [
        "maxWaiting",
        "nats.reconnect.attempts",
        "nats.reconnect.delay",
    ];
    for r in &rows {
        assert!(
            paths.iter().any(|p| p == r) || legacy.contains(r),
            "chart README documents {r}, which values.yaml does not have"
        );
    }
}
