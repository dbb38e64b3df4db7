//! The NATS connection: auth and TLS from configuration, reconnect forever, and connection
//! events turned into the reconnect metric and a generation counter the pull loop watches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{NatsAuth, NatsConfig};
use crate::metrics::Metrics;

/// A connected client plus what the rest of the worker needs to know about its state.
pub struct Connection {
    pub client: async_nats::Client,
    /// Bumped on every reconnect. Pull requests die with the connection they were sent on,
    /// so the pull loop starts over when this changes.
    pub generation: watch::Receiver<u64>,
}

/// Connects, retrying until the server answers. Reconnects forever afterwards; every
/// reconnect is counted in `queue_worker_nats_reconnect_total`.
pub async fn connect(cfg: &NatsConfig, metrics: Arc<Metrics>) -> anyhow::Result<Connection> {
    let (gen_tx, gen_rx) = watch::channel(0u64);
    let disconnected = Arc::new(AtomicBool::new(false));
    let mut opts = match &cfg.auth {
        NatsAuth::CredsFile(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| anyhow::anyhow!("nats_creds_file {}: {e}", path.display()))?,
        _ => async_nats::ConnectOptions::new(),
    };
    opts = match &cfg.auth {
        NatsAuth::Token(t) => opts.token(t.expose().to_string()),
        NatsAuth::UserPassword { user, password } => {
            opts.user_and_password(user.clone(), password.expose().to_string())
        }
        NatsAuth::NkeySeed(seed) => opts.nkey(seed.expose().to_string()),
        NatsAuth::None | NatsAuth::CredsFile(_) => opts,
    };
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &cfg.tls_client {
        opts = opts
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    let events_metrics = metrics.clone();
    let events_disconnected = disconnected.clone();
    opts = opts
        .name(concat!("queue-worker/", env!("CARGO_PKG_VERSION")))
        .max_reconnects(None)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        .client_capacity(65_536)
        .reconnect_delay_callback(|attempts| {
            // 0, 100ms, 200ms, ... up to 5s: quick after a blip, gentle during an outage.
            Duration::from_millis((attempts as u64).saturating_mul(100).min(5_000))
        })
        .event_callback(move |event| {
            let metrics = events_metrics.clone();
            let disconnected = events_disconnected.clone();
            let gen_tx = gen_tx.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        disconnected.store(true, Ordering::SeqCst);
                        tracing::warn!("NATS disconnected; reconnecting");
                    }
                    async_nats::Event::Connected => {
                        if disconnected.swap(false, Ordering::SeqCst) {
                            metrics.reconnects.inc();
                            tracing::info!("NATS reconnected");
                        }
                        gen_tx.send_modify(|g| *g += 1);
                    }
                    async_nats::Event::LameDuckMode => {
                        tracing::warn!("NATS server entered lame duck mode")
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            }
        });
    let urls: Vec<async_nats::ServerAddr> = cfg
        .urls
        .iter()
        .map(|u| u.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("nats_url: {e}"))?;
    let shown: Vec<String> = cfg
        .urls
        .iter()
        .map(|u| crate::config::redact_url(u))
        .collect();
    tracing::info!(servers = %shown.join(","), "Connecting to NATS");
    let client = opts.connect(urls).await?;
    Ok(Connection {
        client,
        generation: gen_rx,
    })
}
