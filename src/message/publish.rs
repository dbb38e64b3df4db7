//! Writing invocations the way the OpenFaaS gateway does: a `QueueRequest` on
//! `<queue>.<fn>.<ns>` with `X-Call-Id` and `X-Start-Time` headers, and `Nats-Msg-Id` = call
//! id so a repeated submission inside the stream's duplicate window is stored once.

use anyhow::Context as _;
use async_nats::jetstream;

use crate::config::Config;
use crate::message::function::FunctionName;
use crate::message::request::QueueRequest;
use crate::nats::stream::{self, Layout};

/// What to publish.
#[derive(Debug, Clone, Default)]
pub struct Submission {
    /// `fn` or `fn.ns`, as the gateway writes it (checked by [`FunctionName`] when published).
    pub function: String,
    pub body: Vec<u8>,
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub callback_url: Option<String>,
    /// The function's annotations, as the gateway copies them (e.g. `com.openfaas.retry.*`).
    pub annotations: Vec<(String, String)>,
}

/// A fresh call id in the UUID v4 text form the gateway uses.
pub fn new_call_id() -> String {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    let bytes: Vec<u8> = a.to_be_bytes().into_iter().chain(b.to_be_bytes()).collect();
    let hex: String = bytes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let b = match i {
                6 => (b & 0x0f) | 0x40,
                8 => (b & 0x3f) | 0x80,
                _ => *b,
            };
            format!("{b:02x}")
        })
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

impl Submission {
    /// The `QueueRequest` as the gateway would write it, and its call id.
    pub fn to_request(&self, call_id: &str) -> QueueRequest {
        let mut req = QueueRequest {
            method: if self.method.is_empty() {
                "POST".into()
            } else {
                self.method.clone()
            },
            function: self.function.clone(),
            path: self.path.clone(),
            query_string: self.query.clone(),
            body: self.body.clone(),
            callback_url: self.callback_url.clone(),
            annotations: self.annotations.iter().cloned().collect(),
            ..QueueRequest::default()
        };
        for (k, v) in &self.headers {
            req.append_header(k, v.clone());
        }
        req.stamp(call_id);
        if let Some(cb) = &self.callback_url {
            if req.header_value("X-Callback-Url").is_none() {
                req.append_header("X-Callback-Url", cb.clone());
            }
        }
        req
    }
}

/// Publishes `count` copies of `sub` (each with its own call id) and waits for JetStream to
/// store every one. Creates the stream when it is missing, as the worker would. Returns the
/// call ids.
pub async fn publish(
    config: &Config,
    sub: &Submission,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    // Refused here as the worker would refuse it, before anything is stored.
    let function = FunctionName::parse(&sub.function, &config.default_namespace)
        .with_context(|| format!("invalid function name {:?}", sub.function))?;
    let client = crate::nats::connect_once(&config.nats).await?;
    let js = jetstream::new(client.clone());
    let layout = Layout::of(config);
    tokio::time::timeout(
        std::time::Duration::from_secs(15),
        stream::ensure_stream(&js, &layout),
    )
    .await
    .context("NATS did not answer within 15s")?
    .context("cannot set up the stream")?;
    let subject = function.subject(&config.queue);
    let mut ids = Vec::with_capacity(count);
    let mut pending = Vec::new();
    for _ in 0..count {
        let id = new_call_id();
        let payload = serde_json::to_vec(&sub.to_request(&id))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        let ack = js
            .publish_with_headers(subject.clone(), headers, payload.into())
            .await
            .context("publish failed")?;
        pending.push(ack);
        ids.push(id);
        if pending.len() >= 256 {
            for ack in pending.drain(..) {
                ack.await.context("JetStream did not store a message")?;
            }
        }
    }
    for ack in pending {
        ack.await.context("JetStream did not store a message")?;
    }
    client.flush().await.ok();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_the_worker_would_refuse_are_not_published() {
        // The server is never reached: the name is refused first.
        let sources =
            crate::config::Sources::from_pairs([("nats_url", "nats://127.0.0.1:1")]).unwrap();
        let config = Config::load(&sources).unwrap();
        for bad in ["a.b.c", "a*b", "", ".x", "café"] {
            let sub = Submission {
                function: bad.into(),
                ..Default::default()
            };
            let err = publish(&config, &sub, 1).await.unwrap_err();
            assert!(
                format!("{err:#}").starts_with(&format!("invalid function name {bad:?}")),
                "{bad:?}: {err:#}"
            );
        }
    }

    #[test]
    fn call_ids_look_like_uuids() {
        let id = new_call_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
    }

    #[test]
    fn requests_match_the_gateway_shape() {
        let s = Submission {
            function: "sleep".into(),
            body: b"hi".to_vec(),
            callback_url: Some("http://cb:1/x".into()),
            ..Default::default()
        };
        let r = s.to_request("id-1");
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""Body":"aGk=""#), "{json}");
        assert!(json.contains(r#""Method":"POST""#), "{json}");
        assert!(json.contains(r#""X-Call-Id":["id-1"]"#), "{json}");
        assert!(json.contains(r#""CallbackUrl":{"Scheme":"http""#), "{json}");
    }
}
