//! Static replicas answer "how many messages do you hold?" on a core NATS subject, so a
//! function-mode replica taking the stream over knows whether deleting the static consumer
//! would run a call again. The consumer's own counts cannot tell: its ack-pending also
//! counts messages a stopped replica handed back (a NAK leaves them pending until someone
//! pulls again), and a live replica's lease renewals do not show in its info.
//!
//! Request: an empty message to `queue-worker.static.<stream>` with a reply inbox. Each
//! static replica answers `{"held":n}`: the messages it has received and not yet settled.
//! The asker sums the answers that arrive within a short window; no answer means no live
//! static replica (an older version that does not answer counts as gone).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

/// How long the asker collects answers. Replicas answer at once; this covers a loaded
/// machine's scheduling delay.
pub const WINDOW: Duration = Duration::from_millis(300);

/// The presence subject of a stream's static replicas.
pub fn subject(stream: &str) -> String {
    format!("queue-worker.static.{stream}")
}

/// What the static replicas said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Presence {
    /// Replicas that answered.
    pub replicas: usize,
    /// Messages they hold, summed.
    pub held: u64,
}

/// Answers presence requests with `held` until `stop` (a static replica runs this until its
/// drain has ended, so its last calls are still seen).
pub async fn answer(
    client: async_nats::Client,
    stream: String,
    held: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let mut sub = match client.subscribe(subject(&stream)).await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::warn!(error = %e, "cannot answer presence requests; a function-mode replica taking the stream over will not wait for this replica's calls");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            _ = stop.cancelled() => break,
        };
        let Some(msg) = msg else { break };
        if let Some(reply) = msg.reply {
            let body = format!(r#"{{"held":{}}}"#, held.load(Ordering::Relaxed));
            let _ = client.publish(reply, body.into()).await;
        }
    }
    let _ = sub.unsubscribe().await;
}

/// Asks the static replicas of `stream` what they hold, collecting answers for `window`.
pub async fn ask(
    client: &async_nats::Client,
    stream: &str,
    window: Duration,
) -> Result<Presence, async_nats::Error> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(subject(stream), inbox, Default::default())
        .await?;
    client.flush().await?;
    let mut presence = Presence::default();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, answers.next()).await {
        if msg.status.is_some() {
            continue;
        }
        let held = serde_json::from_slice::<serde_json::Value>(&msg.payload)
            .ok()
            .and_then(|v| v.get("held")?.as_u64())
            .unwrap_or(0);
        presence.replicas += 1;
        presence.held += held;
    }
    let _ = answers.unsubscribe().await;
    Ok(presence)
}
