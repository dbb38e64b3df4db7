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
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "wrong").unwrap();
    let right = dir.path().join("right");
    std::fs::write(&right, "right").unwrap();
    let start = |file: &std::path::Path| {
        let pairs = vec![
            ("nats_url".to_string(), nats.url()),
            ("metrics_port".to_string(), "0".to_string()),
            ("nats_token_file".to_string(), file.display().to_string()),
        ];
        queue_worker::config::Config::load(
            &queue_worker::config::Sources::from_pairs(pairs).unwrap(),
        )
        .unwrap()
    };
    // The server's log (NatsServer writes it next to the store), before any client.
    let log = dir.path().join("js.log");
    let refusals = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| l.contains("authentication error") || l.contains("Authorization Violation"))
            .count()
    };
    assert_eq!(refusals(), 0);
    let rejected = queue_worker::worker::start(start(&wrong)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while refusals() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the server saw no connection with a bad token: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A control with the right token becomes ready; the other one is still refused.
    let accepted = queue_worker::worker::start(start(&right)).await.unwrap();
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
