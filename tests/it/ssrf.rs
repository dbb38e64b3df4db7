//! `callback_allowed_networks`: callbacks reach only what the list allows, checked on the
//! addresses actually connected to. The fake receiver is on loopback, the kind of internal
//! address an attacker's callback URL would aim at.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;

use crate::support::{wait_metric, Env};

const BLOCKED: &str =
    r#"queue_worker_callbacks_total{queue_name="faas-request",result="blocked"} 1"#;
const DELIVERED: &str =
    r#"queue_worker_callbacks_total{queue_name="faas-request",result="delivered"} 1"#;

/// Runs one job whose callback goes to `callback_url` under `allowed`; returns the worker
/// once the job is acknowledged (the callback comes after the settle, whatever its fate).
async fn job_with_callback(
    env: &Env,
    allowed: &str,
    callback_url: String,
) -> queue_worker::worker::Running {
    let worker = env
        .worker(&[
            ("callback_allowed_networks", allowed),
            ("callback_max_attempts", "3"),
        ])
        .await;
    let job = queue_worker::message::publish::Submission {
        function: "f".into(),
        callback_url: Some(callback_url),
        ..Default::default()
    };
    queue_worker::message::publish::publish(&env.config(&[]), &job, 1)
        .await
        .unwrap();
    env.wait_drained(Duration::from_secs(10)).await;
    assert_eq!(env.gateway.calls_to("f"), 1, "the job ran once");
    worker
}

/// Loopback, by IP literal (no resolver involved), is internal: a list that does not cover it
/// blocks the callback, once (no retries), and the job is still acknowledged.
#[tokio::test]
async fn a_callback_to_loopback_is_blocked_unless_its_network_is_listed() {
    let env = Env::start().await;
    let worker = job_with_callback(&env, "cb.example.com, *", env.gateway.callback_url("x")).await;
    wait_metric(&worker, BLOCKED).await;
    // Nothing arrives, not after a retry wait either.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.gateway.callbacks().len(), 0);
    let metrics = crate::support::scrape(&worker).await;
    assert!(!metrics.contains(r#"result="failed""#), "{metrics}");
    crate::support::stop(worker).await;

    let env = Env::start().await;
    let worker = job_with_callback(&env, "127.0.0.1/32", env.gateway.callback_url("y")).await;
    env.gateway.wait_callbacks(1).await;
    wait_metric(&worker, DELIVERED).await;
    crate::support::stop(worker).await;
}

/// A name goes through the worker's resolver: `localhost` listed by name still resolves to
/// loopback, which is internal, so it is blocked; with loopback's networks listed it passes.
#[tokio::test]
async fn a_listed_name_that_resolves_to_loopback_is_blocked() {
    let env = Env::start().await;
    let url = format!("http://localhost:{}/callback/n", env.gateway.addr.port());
    let worker = job_with_callback(&env, "localhost", url.clone()).await;
    wait_metric(&worker, BLOCKED).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.gateway.callbacks().len(), 0);
    crate::support::stop(worker).await;

    let env = Env::start().await;
    let url = format!("http://localhost:{}/callback/n", env.gateway.addr.port());
    let worker = job_with_callback(&env, "127.0.0.0/8, ::1", url).await;
    env.gateway.wait_callbacks(1).await;
    wait_metric(&worker, DELIVERED).await;
    crate::support::stop(worker).await;
}

/// An allowed receiver that redirects to an address outside the list: the redirect is not
/// followed (an IP literal meets no resolver, so the redirect policy checks it).
#[tokio::test]
async fn a_redirect_out_of_the_list_is_blocked() {
    let env = Env::start().await;
    // The forbidden target: 127.0.0.2, also loopback, but not in 127.0.0.1/32.
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let target = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let counted = hits.clone();
    let app = axum::Router::new().fallback(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { StatusCode::OK }
    });
    tokio::spawn(async move { axum::serve(target, app).await.unwrap() });
    let redirector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirector_addr = redirector.local_addr().unwrap();
    let location = format!("http://{target_addr}/stolen");
    let app = axum::Router::new().fallback(move || {
        let location = location.clone();
        async move { (StatusCode::TEMPORARY_REDIRECT, [("location", location)]).into_response() }
    });
    tokio::spawn(async move { axum::serve(redirector, app).await.unwrap() });

    let worker =
        job_with_callback(&env, "127.0.0.1/32", format!("http://{redirector_addr}/cb")).await;
    wait_metric(&worker, BLOCKED).await;
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    crate::support::stop(worker).await;
}
