//! Secrets never leave the process: every credential the worker can be given, with values
//! that cannot occur by chance, is searched for in everything an operator can see: the
//! worker binary's log (at debug level, the most it says), `/metrics`, and `check-config`.

use std::time::Duration;

use base64::Engine;
use queue_worker::dev::natsd::{free_port, NatsServer};

use crate::support::FakeGateway;

/// One way of authenticating to NATS: the server's arguments, the worker's settings and the
/// secret values they carry.
struct Case {
    name: &'static str,
    server: Vec<String>,
    env: Vec<(&'static str, String)>,
    secrets: Vec<String>,
}

fn cases(dir: &std::path::Path) -> Vec<Case> {
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let nkey = nkeys::KeyPair::new_user();
    let nkey_conf = file(
        "nkey.conf",
        &format!(
            "authorization {{ users: [ {{ nkey: \"{}\" }} ] }}\n",
            nkey.public_key()
        ),
    );
    let op = crate::auth::operator_setup(dir);
    // The user's JWT is not a secret (the server shows it to nobody, though), its seed is;
    // both are searched for.
    let creds_parts: Vec<String> = op
        .creds
        .lines()
        .filter(|l| !l.starts_with('-') && !l.is_empty())
        .map(str::to_string)
        .collect();
    assert_eq!(creds_parts.len(), 2, "{}", op.creds);
    vec![
        Case {
            name: "token",
            server: vec!["--auth".into(), "tok-SECRET-b71f3e".into()],
            env: vec![("nats_token_file", file("token", "tok-SECRET-b71f3e\n"))],
            secrets: vec!["tok-SECRET-b71f3e".into()],
        },
        Case {
            name: "user and password file",
            server: vec![
                "--user".into(),
                "worker".into(),
                "--pass".into(),
                "pw-SECRET-4c9d02".into(),
            ],
            env: vec![
                ("nats_user", "worker".into()),
                ("nats_password_file", file("password", "pw-SECRET-4c9d02")),
            ],
            secrets: vec!["pw-SECRET-4c9d02".into()],
        },
        Case {
            name: "password in nats_url",
            server: vec![
                "--user".into(),
                "urluser".into(),
                "--pass".into(),
                "urlpw-SECRET-e83a51".into(),
            ],
            env: vec![],
            secrets: vec!["urlpw-SECRET-e83a51".into()],
        },
        Case {
            name: "token in nats_url",
            server: vec!["--auth".into(), "urltok-SECRET-d4419b".into()],
            env: vec![],
            secrets: vec!["urltok-SECRET-d4419b".into()],
        },
        Case {
            name: "nkey seed",
            server: vec!["-c".into(), nkey_conf],
            env: vec![("nats_nkey_file", file("user.nk", &nkey.seed().unwrap()))],
            secrets: vec![nkey.seed().unwrap()],
        },
        Case {
            name: "creds",
            server: vec!["-c".into(), op.conf.display().to_string()],
            env: vec![("nats_creds_file", file("worker.creds", &op.creds))],
            secrets: creds_parts,
        },
    ]
}

/// Secrets that are not NATS's: the gateway's basic auth in `gateway_url` (also as the
/// `Authorization` header value it becomes), the front door's basic-auth files (the worker
/// shares the settings), and a callback URL's password and query token.
const GATEWAY_PASSWORD: &str = "gwpw-SECRET-61d0aa";
const MOUNTED_PASSWORD: &str = "fdpw-SECRET-0f27c4";
const CALLBACK_PASSWORD: &str = "cbpw-SECRET-93be17";
const CALLBACK_TOKEN: &str = "cbtok-SECRET-5a7c88";

#[tokio::test]
async fn no_secret_reaches_logs_metrics_or_check_config() {
    crate::support::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mounted = dir.path().join("secrets");
    std::fs::create_dir(&mounted).unwrap();
    std::fs::write(mounted.join("basic-auth-user"), "admin").unwrap();
    std::fs::write(mounted.join("basic-auth-password"), MOUNTED_PASSWORD).unwrap();
    let gateway = FakeGateway::start().await;
    let gateway_url = format!("http://admin:{GATEWAY_PASSWORD}@{}", gateway.addr);
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("admin:{GATEWAY_PASSWORD}"));
    let common = [
        GATEWAY_PASSWORD.to_string(),
        basic,
        MOUNTED_PASSWORD.to_string(),
        CALLBACK_PASSWORD.to_string(),
        CALLBACK_TOKEN.to_string(),
    ];

    for (i, case) in cases(dir.path()).into_iter().enumerate() {
        let store = dir.path().join(format!("js-{i}"));
        let args = case.server.clone();
        let nats = tokio::task::spawn_blocking(move || {
            NatsServer::start_with(&store, free_port().unwrap(), args)
        })
        .await
        .unwrap()
        .unwrap();
        let nats_url = match case.name {
            "password in nats_url" => {
                nats.url()
                    .replacen("nats://", "nats://urluser:urlpw-SECRET-e83a51@", 1)
            }
            "token in nats_url" => {
                nats.url()
                    .replacen("nats://", "nats://urltok-SECRET-d4419b@", 1)
            }
            _ => nats.url(),
        };
        let metrics_port = free_port().unwrap();
        let mut env: Vec<(&str, String)> = vec![
            ("nats_url", nats_url),
            ("gateway_url", gateway_url.clone()),
            ("secret_mount_path", mounted.display().to_string()),
            ("metrics_port", metrics_port.to_string()),
            ("debug", "true".into()),
            ("log_flush_interval", "0".into()),
            ("drain_timeout", "5s".into()),
        ];
        env.extend(case.env.iter().cloned());
        let secrets: Vec<&String> = case.secrets.iter().chain(&common).collect();

        let mut shown = run_worker_with_a_job(&env, &gateway, metrics_port, case.name).await;
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
            .env_clear()
            .envs(env.iter().cloned())
            .arg("check-config")
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}: check-config failed", case.name);
        let check = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(check.contains("gateway_url"), "{check}");
        shown.push(("check-config", check));

        for (what, text) in &shown {
            for secret in &secrets {
                assert!(
                    !text.contains(secret.as_str()),
                    "{}: {what} shows the secret {secret:?}:\n{text}",
                    case.name
                );
            }
        }
    }
}

/// Runs the worker binary with `env`, lets it run one job with a callback, scrapes
/// `/metrics`, stops it with SIGTERM; returns (what, text) for its log and its metrics.
async fn run_worker_with_a_job(
    env: &[(&str, String)],
    gateway: &FakeGateway,
    metrics_port: u16,
    case: &str,
) -> Vec<(&'static str, String)> {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
        .env_clear()
        .envs(env.iter().cloned())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let metrics = format!("http://127.0.0.1:{metrics_port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ready = reqwest::get(format!("{metrics}/readyz")).await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{case}: the worker is not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The job is published with the same settings (and so the same credentials).
    let config = queue_worker::config::Config::load(
        &queue_worker::config::Sources::from_pairs(env.iter().cloned()).unwrap(),
    )
    .unwrap();
    let tag = format!("secrets-{}", gateway.callbacks().len());
    let callback_url = format!(
        "http://cb:{CALLBACK_PASSWORD}@{}/callback/{tag}?token={CALLBACK_TOKEN}",
        gateway.addr
    );
    let job = queue_worker::message::publish::Submission {
        function: "f".into(),
        callback_url: Some(callback_url),
        ..Default::default()
    };
    queue_worker::message::publish::publish(&config, &job, 1)
        .await
        .unwrap();
    let path = format!("/callback/{tag}");
    gateway
        .wait_for("the callback", Duration::from_secs(10), |g| {
            g.callbacks().iter().any(|c| c.path == path)
        })
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let scraped = loop {
        let text = reqwest::get(format!("{metrics}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains(r#"result="delivered"} 1"#) {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{case}: no delivered callback in /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the worker stops on SIGTERM")
        .unwrap();
    assert!(out.status.success(), "{case}: worker exit {:?}", out.status);
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("Posted result"), "{case}: {log}");
    vec![("the log", log), ("/metrics", scraped)]
}
