//! NATS authentication: secrets come from files and work against a real server.

use std::time::Duration;

use queue_worker::dev::natsd::{free_port, NatsServer};

use crate::support::FakeGateway;

async fn server_with(args: &[&str]) -> (NatsServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("js");
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let server = tokio::task::spawn_blocking(move || {
        NatsServer::start_with(&store, free_port().unwrap(), args)
    })
    .await
    .unwrap()
    .unwrap();
    (server, dir)
}

async fn runs_a_job(nats: &NatsServer, auth: &[(&str, String)]) {
    let gateway = FakeGateway::start().await;
    let mut pairs: Vec<(String, String)> = vec![
        ("nats_url".into(), nats.url()),
        ("gateway_url".into(), gateway.url()),
        ("metrics_port".into(), "0".into()),
    ];
    pairs.extend(auth.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let config = queue_worker::config::Config::load(
        &queue_worker::config::Sources::from_pairs(pairs).unwrap(),
    )
    .unwrap();
    let worker = queue_worker::worker::start(config.clone()).await.unwrap();
    crate::support::wait_ready(&worker).await;
    crate::support::submit(&config, "f", 1).await;
    gateway
        .wait_for("the call", Duration::from_secs(10), |g| {
            g.calls().len() == 1
        })
        .await;
    crate::support::stop(worker).await;
}

#[tokio::test]
async fn token_from_a_file() {
    let (nats, dir) = server_with(&["--auth", "s3cret-token"]).await;
    let file = dir.path().join("token");
    std::fs::write(&file, "s3cret-token\n").unwrap();
    runs_a_job(&nats, &[("nats_token_file", file.display().to_string())]).await;
}

#[tokio::test]
async fn user_and_password_from_a_file() {
    let (nats, dir) = server_with(&["--user", "worker", "--pass", "pa55word"]).await;
    let file = dir.path().join("password");
    std::fs::write(&file, "pa55word").unwrap();
    runs_a_job(
        &nats,
        &[
            ("nats_user", "worker".to_string()),
            ("nats_password_file", file.display().to_string()),
        ],
    )
    .await;
}

/// A worker with the wrong token reaches the server and is turned away: the server logs an
/// authentication error for it (a worker that never got there, e.g. a wrong port, would
/// leave no such line), and the worker stays unready while a control with the right token
/// becomes ready.
#[tokio::test]
async fn a_wrong_token_is_refused_by_the_server_and_never_ready() {
    let (nats, dir) = server_with(&["--auth", "right"]).await;
    let wrong = secret_file(dir.path(), "wrong", "wrong");
    let right = secret_file(dir.path(), "right", "right");
    refused(
        &nats,
        dir.path(),
        &[("nats_token_file", wrong)],
        &[("nats_token_file", right)],
    )
    .await;
}

#[tokio::test]
async fn a_wrong_password_is_refused_by_the_server_and_never_ready() {
    let (nats, dir) = server_with(&["--user", "worker", "--pass", "right"]).await;
    let wrong = secret_file(dir.path(), "wrong", "wrong");
    let right = secret_file(dir.path(), "right", "right");
    let user = || ("nats_user", "worker".to_string());
    refused(
        &nats,
        dir.path(),
        &[user(), ("nats_password_file", wrong)],
        &[user(), ("nats_password_file", right)],
    )
    .await;
}

#[tokio::test]
async fn an_unknown_nkey_is_refused_by_the_server_and_never_ready() {
    let known = nkeys::KeyPair::new_user();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users: [ {{ nkey: \"{}\" }} ] }}\n",
            known.public_key()
        ),
    )
    .unwrap();
    let (nats, store) = server_with(&["-c", &conf.display().to_string()]).await;
    let unknown = nkeys::KeyPair::new_user().seed().unwrap();
    let wrong = secret_file(dir.path(), "unknown.nk", &unknown);
    let right = secret_file(dir.path(), "known.nk", &known.seed().unwrap());
    refused(
        &nats,
        store.path(),
        &[("nats_nkey_file", wrong)],
        &[("nats_nkey_file", right)],
    )
    .await;
}

/// A user signed by an account the operator never signed is refused.
#[tokio::test]
async fn creds_of_an_unknown_account_are_refused_by_the_server_and_never_ready() {
    let dir = tempfile::tempdir().unwrap();
    let op = operator_setup(dir.path());
    let (nats, store) = server_with(&["-c", &op.conf.display().to_string()]).await;
    let wrong = secret_file(dir.path(), "stranger.creds", &op.stranger_creds);
    let right = secret_file(dir.path(), "worker.creds", &op.creds);
    refused(
        &nats,
        store.path(),
        &[("nats_creds_file", wrong)],
        &[("nats_creds_file", right)],
    )
    .await;
}

/// Writes `text` to `dir/name`; returns the path as a config value.
fn secret_file(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A worker configured with `bad` reaches the server and is turned away: the server logs an
/// authentication error for it (a worker that never got there, e.g. a wrong port, would
/// leave no such line), and the worker stays unready while a control with `good` becomes
/// ready. `store_dir` holds the server's store (`js`) and its log (`js.log`).
async fn refused(
    nats: &NatsServer,
    store_dir: &std::path::Path,
    bad: &[(&str, String)],
    good: &[(&str, String)],
) {
    let start = |auth: &[(&str, String)]| {
        let mut pairs = vec![
            ("nats_url".to_string(), nats.url()),
            ("metrics_port".to_string(), "0".to_string()),
        ];
        pairs.extend(auth.iter().map(|(k, v)| (k.to_string(), v.clone())));
        queue_worker::config::Config::load(
            &queue_worker::config::Sources::from_pairs(pairs).unwrap(),
        )
        .unwrap()
    };
    // The server's log (NatsServer writes it next to the store), before any client.
    let log = store_dir.join("js.log");
    let refusals = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("authentication error") || l.contains("Authorization Violation"))
            .count()
    };
    assert_eq!(refusals(), 0);
    let rejected = queue_worker::worker::start(start(bad)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while refusals() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the server saw no connection with bad credentials: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A control with the right credentials becomes ready; the other one is still refused.
    let accepted = queue_worker::worker::start(start(good)).await.unwrap();
    crate::support::wait_ready(&accepted).await;
    assert_eq!(rejected.health.readiness(), Err("NATS not connected"));
    for w in [rejected, accepted] {
        w.shutdown();
        tokio::time::timeout(Duration::from_secs(10), w.wait())
            .await
            .unwrap()
            .unwrap();
    }
}

/// What an operator sees when the server refuses the credentials: the worker binary warns,
/// naming the key the credentials came from, and keeps retrying; an operator command fails
/// at once with exit code 3 and the same key.
#[tokio::test]
async fn refused_credentials_are_reported_by_name() {
    use tokio::io::AsyncBufReadExt;
    let (nats, dir) = server_with(&["--auth", "right"]).await;
    let wrong = secret_file(dir.path(), "wrong", "wrong");
    let env = [
        ("nats_url", nats.url()),
        ("nats_token_file", wrong),
        ("metrics_port", "0".to_string()),
    ];
    let bin = env!("CARGO_BIN_EXE_queue-worker");

    let mut worker = tokio::process::Command::new(bin)
        .env_clear()
        .envs(env.iter().cloned())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(worker.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("WARN")
                && line.contains("refused the credentials from nats_token_file")
            {
                return true;
            }
            seen.push(line);
        }
        false
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "no refusal warning in:\n{}",
        seen.join("\n")
    );
    worker.kill().await.unwrap();

    let out = tokio::process::Command::new(bin)
        .env_clear()
        .envs(env.iter().cloned())
        .args(["queue", "status"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("refused the credentials from nats_token_file"),
        "{stderr}"
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
pub(crate) fn pki(dir: &std::path::Path) -> [std::path::PathBuf; 5] {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()]);
    let (client_cert, client_key) = leaf(vec!["queue-worker".into()]);
    let files = [
        "ca.pem",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
    ]
    .map(|f| dir.join(f));
    for (path, text) in
        files
            .iter()
            .zip([ca.pem(), server_cert, server_key, client_cert, client_key])
    {
        std::fs::write(path, text).unwrap();
    }
    files
}

#[tokio::test]
async fn mutual_tls_with_files() {
    let dir = tempfile::tempdir().unwrap();
    let [ca, cert, key, client_cert, client_key] = pki(dir.path());
    let arg = |p: &std::path::PathBuf| p.display().to_string();
    let (nats, _store) = server_with(&[
        "--tls",
        "--tlscert",
        &arg(&cert),
        "--tlskey",
        &arg(&key),
        "--tlsverify",
        "--tlscacert",
        &arg(&ca),
    ])
    .await;
    runs_a_job(
        &nats,
        &[
            ("nats_tls_ca_file", arg(&ca)),
            ("nats_tls_cert_file", arg(&client_cert)),
            ("nats_tls_key_file", arg(&client_key)),
        ],
    )
    .await;
}

#[tokio::test]
async fn nkey_seed_from_a_file() {
    let user = nkeys::KeyPair::new_user();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users: [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    )
    .unwrap();
    let seed = dir.path().join("user.nk");
    std::fs::write(&seed, user.seed().unwrap()).unwrap();
    let (nats, _store) = server_with(&["-c", &conf.display().to_string()]).await;
    runs_a_job(&nats, &[("nats_nkey_file", seed.display().to_string())]).await;
}

/// A NATS JWT (v2): `header.claims.signature`, base64url without padding, signed with the
/// issuer's nkey, as nats-server's `jwt` package decodes it.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    let header = B64.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("{subject}-{iat}"),
        "iat": iat,
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    let signing_input = format!("{header}.{}", B64.encode(claims.to_string()));
    let signature = issuer.sign(signing_input.as_bytes()).unwrap();
    format!("{signing_input}.{}", B64.encode(signature))
}

/// Decentralised auth: an operator, a system account, an application account with
/// JetStream, and a user of it. Returns the server's config file and the user's `.creds`
/// text; `stranger_creds` is a user signed by an account the server does not know.
pub(crate) struct Operator {
    pub conf: std::path::PathBuf,
    pub creds: String,
    pub stranger_creds: String,
}

pub(crate) fn operator_setup(dir: &std::path::Path) -> Operator {
    use serde_json::json;
    let operator = nkeys::KeyPair::new_operator();
    let system = nkeys::KeyPair::new_account();
    let account = nkeys::KeyPair::new_account();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "test-operator",
        json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
    );
    let account_jwt = |key: &nkeys::KeyPair, name: &str, jetstream: bool| {
        let mut limits = json!({
            "subs": -1, "conn": -1, "leaf": -1, "imports": -1, "exports": -1,
            "data": -1, "payload": -1, "wildcards": true,
        });
        if jetstream {
            let js = json!({"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1});
            limits
                .as_object_mut()
                .unwrap()
                .extend(js.as_object().unwrap().clone());
        }
        jwt(
            &operator,
            &key.public_key(),
            name,
            json!({"type": "account", "version": 2, "limits": limits}),
        )
    };
    let creds = |account: &nkeys::KeyPair, name: &str| {
        let user = nkeys::KeyPair::new_user();
        let user_jwt = jwt(
            account,
            &user.public_key(),
            name,
            json!({"type": "user", "version": 2, "pub": {}, "sub": {},
                   "subs": -1, "data": -1, "payload": -1}),
        );
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        )
    };
    let operator_file = dir.join("operator.jwt");
    std::fs::write(&operator_file, &operator_jwt).unwrap();
    let conf = dir.join("operator.conf");
    std::fs::write(
        &conf,
        format!(
            "operator: \"{}\"\nsystem_account: {}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {}: \"{}\"\n  {}: \"{}\"\n}}\n",
            operator_file.display(),
            system.public_key(),
            system.public_key(),
            account_jwt(&system, "SYS", false),
            account.public_key(),
            account_jwt(&account, "APP", true),
        ),
    )
    .unwrap();
    Operator {
        conf,
        creds: creds(&account, "worker"),
        stranger_creds: creds(&nkeys::KeyPair::new_account(), "stranger"),
    }
}

#[tokio::test]
async fn creds_file_with_an_operator_and_memory_resolver() {
    let dir = tempfile::tempdir().unwrap();
    let op = operator_setup(dir.path());
    let creds = dir.path().join("worker.creds");
    std::fs::write(&creds, &op.creds).unwrap();
    let (nats, _store) = server_with(&["-c", &op.conf.display().to_string()]).await;
    runs_a_job(&nats, &[("nats_creds_file", creds.display().to_string())]).await;
}
