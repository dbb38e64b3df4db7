//! Existing streams: OpenFaaS's own worker may have made `OF_<queue>` already.

use std::time::Duration;

use async_nats::jetstream::stream;

use crate::support::{publish_raw, Env};

#[tokio::test]
async fn a_limits_retention_stream_stops_start_up_with_advice() {
    let env = Env::start().await;
    let js = env.js().await;
    js.create_stream(stream::Config {
        name: "OF_faas-request".into(),
        subjects: vec!["faas-request".into()],
        retention: stream::RetentionPolicy::Limits,
        ..Default::default()
    })
    .await
    .unwrap();
    let worker = queue_worker::worker::start(env.config(&[])).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), worker.wait())
        .await
        .expect("the worker stops by itself")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Limits retention") && err.contains("delete the stream"),
        "{err}"
    );
}

#[tokio::test]
async fn a_legacy_stream_gets_our_subject_and_its_messages_are_served() {
    let env = Env::start().await;
    let js = env.js().await;
    js.create_stream(stream::Config {
        name: "OF_faas-request".into(),
        subjects: vec!["faas-request".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await
    .unwrap();
    // An old gateway's message on the bare queue subject, queued before the worker starts.
    publish_raw(
        &js,
        "faas-request",
        br#"{"Function":"legacy","Method":"POST","Body":"aGk="}"#.to_vec(),
    )
    .await;
    let worker = env.worker(&[]).await;
    let mut s = js.get_stream("OF_faas-request").await.unwrap();
    let subjects = s.info().await.unwrap().config.subjects.clone();
    assert_eq!(
        subjects,
        vec!["faas-request".to_string(), "faas-request.>".to_string()]
    );
    crate::support::submit(&env.config(&[]), "modern", 1).await;
    env.gateway
        .wait_for("both messages", Duration::from_secs(10), |g| {
            g.calls().len() == 2
        })
        .await;
    let paths: Vec<String> = env.gateway.calls().iter().map(|c| c.path.clone()).collect();
    assert_eq!(paths, vec!["/function/legacy", "/function/modern"]);
    crate::support::stop(worker).await;
}
