//! NATS authentication: secrets come from files and work against a real server.

use std::time::Duration;

use queue_worker::natsd::{free_port, NatsServer};
use queue_worker::publish::{publish, Submission};

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
    let worker = queue_worker::app::start(config.clone()).await.unwrap();
    crate::support::wait_ready(&worker).await;
    publish(
        &config,
        &Submission {
            function: "f".into(),
            ..Default::default()
        },
        1,
    )
    .await
    .unwrap();
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

#[tokio::test]
async fn a_wrong_token_is_never_ready() {
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
    let rejected = queue_worker::app::start(start(&wrong)).await.unwrap();
    // A control with the right token becomes ready; by then the other one has had its
    // chance and is still refused.
    let accepted = queue_worker::app::start(start(&right)).await.unwrap();
    crate::support::wait_ready(&accepted).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rejected.health.readiness(), Err("NATS not connected"));
    for w in [rejected, accepted] {
        w.shutdown();
        tokio::time::timeout(Duration::from_secs(10), w.wait())
            .await
            .unwrap()
            .unwrap();
    }
}
