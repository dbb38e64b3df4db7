//! The NATS connection: auth and TLS from configuration, reconnect forever, and connection
//! events turned into the reconnect metric and a generation counter the pull loop watches.

pub mod calls;
pub mod consumers;
pub mod presence;
pub mod stream;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{NatsAuth, NatsConfig};

/// A connected client plus what the rest of the worker needs to know about its state.
pub struct Connection {
    pub client: async_nats::Client,
    /// Bumped on every reconnect. Pull requests die with the connection they were sent on,
    /// so the pull loop starts over when this changes. Closed (`changed()` errs) once the
    /// connection is closed for good, after which nothing can be pulled.
    pub generation: watch::Receiver<u64>,
}

/// Why a command could not get a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Bad settings (a .creds file that does not load, a URL that does not parse).
    #[error("{0}")]
    Config(String),
    /// No server answered.
    #[error("cannot reach NATS at {servers}: {reason}")]
    Unreachable { servers: String, reason: String },
    /// A server answered and turned the credentials down: retrying will not help, the
    /// settings named in `auth` must change.
    #[error("NATS at {servers} refused the credentials from {auth}: {reason}")]
    Refused {
        servers: String,
        auth: &'static str,
        reason: String,
    },
}

/// Connects for a long-running process (worker, front door): retries until the server
/// answers and reconnects forever afterwards; every reconnect is counted in `reconnects`
/// (`queue_worker_nats_reconnect_total`).
pub async fn connect(
    cfg: &NatsConfig,
    reconnects: prometheus::Counter,
) -> anyhow::Result<Connection> {
    let (gen_tx, gen_rx) = watch::channel(0u64);
    // Taken (dropped) when the connection is closed for good, which closes the channel.
    let gen_tx = Arc::new(Mutex::new(Some(gen_tx)));
    let disconnected = Arc::new(AtomicBool::new(false));
    let auth = cfg.auth.source();
    let opts = options(cfg)
        .await?
        .max_reconnects(None)
        .retry_on_initial_connect()
        .reconnect_delay_callback(|attempts| {
            // 0, 100ms, 200ms, ... up to 5s: quick after a blip, gentle during an outage.
            Duration::from_millis((attempts as u64).saturating_mul(100).min(5_000))
        })
        .event_callback(move |event| {
            let reconnects = reconnects.clone();
            let disconnected = disconnected.clone();
            let gen_tx = gen_tx.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        disconnected.store(true, Ordering::SeqCst);
                        tracing::warn!("NATS disconnected; reconnecting");
                    }
                    async_nats::Event::Connected => {
                        if disconnected.swap(false, Ordering::SeqCst) {
                            reconnects.inc();
                            tracing::info!("NATS reconnected");
                        }
                        if let Some(tx) = &*gen_tx.lock().unwrap_or_else(|e| e.into_inner()) {
                            tx.send_modify(|g| *g += 1);
                        }
                    }
                    async_nats::Event::Closed => {
                        // Also what every clean exit does; when it happens to a running
                        // worker, the pull loop says so (an error) and the worker exits.
                        tracing::debug!("NATS connection closed");
                        drop(gen_tx.lock().unwrap_or_else(|e| e.into_inner()).take());
                    }
                    // The client keeps retrying (a token may be rotated under a running
                    // worker), so this is a warning each time, not a stop; the readiness
                    // probe stays red meanwhile. Without it a refused start would log
                    // nothing above debug.
                    async_nats::Event::ClientError(async_nats::ClientError::Other(why))
                        if is_refusal(&why) =>
                    {
                        tracing::warn!(auth, reason = %why, "NATS refused the credentials from {auth}; retrying");
                    }
                    // A user not allowed to see JetStream's advisories: the pull loop
                    // then recovers from a leader's loss on its timers (`worker/pull.rs`).
                    async_nats::Event::ServerError(e)
                        if e.to_string().contains("$JS.EVENT.ADVISORY") =>
                    {
                        tracing::debug!(error = %e, "no JetStream advisories for this user; leader changes are noticed by timers")
                    }
                    async_nats::Event::ServerError(e) => {
                        tracing::warn!(error = %e, "NATS server error")
                    }
                    async_nats::Event::LameDuckMode => {
                        tracing::warn!("NATS server entered lame duck mode")
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            }
        });
    let (urls, shown) = servers(cfg).map_err(anyhow::Error::msg)?;
    tracing::info!(servers = %shown, "Connecting to NATS");
    let client = opts.connect(urls).await?;
    Ok(Connection {
        client,
        generation: gen_rx,
    })
}

/// Connects once for an operator command: an unreachable server is an error at once (after
/// the 5s connection timeout), not a reason to wait.
pub async fn connect_once(cfg: &NatsConfig) -> Result<async_nats::Client, ConnectError> {
    let opts = options(cfg)
        .await
        .map_err(|e| ConnectError::Config(e.to_string()))?
        .max_reconnects(Some(1));
    let (urls, shown) = servers(cfg).map_err(ConnectError::Config)?;
    opts.connect(urls).await.map_err(|e| match e.kind() {
        async_nats::ConnectErrorKind::AuthorizationViolation
        | async_nats::ConnectErrorKind::Authentication => ConnectError::Refused {
            servers: shown,
            auth: cfg.auth.source(),
            reason: e.to_string(),
        },
        _ => ConnectError::Unreachable {
            servers: shown,
            reason: e.to_string(),
        },
    })
}

/// `raw` without a user or password (unchanged when it does not parse: async-nats will say
/// so, and the error names no credentials since nothing was parsed).
fn without_credentials(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_password(None);
            let _ = u.set_username("");
            u.to_string()
        }
        _ => raw.to_string(),
    }
}

/// Whether a client error reported while connecting is the server turning the credentials
/// down (async-nats reports it as the text of `ConnectErrorKind`).
fn is_refusal(why: &str) -> bool {
    why == async_nats::ConnectErrorKind::AuthorizationViolation.to_string()
        || why == async_nats::ConnectErrorKind::Authentication.to_string()
}

/// Auth, TLS and timeouts shared by both ways of connecting.
async fn options(cfg: &NatsConfig) -> anyhow::Result<async_nats::ConnectOptions> {
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
        NatsAuth::Url {
            user,
            password: Some(password),
        } => opts.user_and_password(user.expose().to_string(), password.expose().to_string()),
        NatsAuth::Url {
            user,
            password: None,
        } => opts.token(user.expose().to_string()),
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
    Ok(opts
        .name(concat!("queue-worker/", env!("CARGO_PKG_VERSION")))
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        .client_capacity(65_536))
}

/// The server addresses, and the same for logs (passwords hidden). Credentials are taken
/// out of the addresses: `Config::load` made them the connection's auth
/// (`NatsAuth::Url`), async-nats would not send them from a URL anyway, and its debug log
/// prints each address it tries in full.
fn servers(cfg: &NatsConfig) -> Result<(Vec<async_nats::ServerAddr>, String), String> {
    let urls = cfg
        .urls
        .iter()
        .map(|u| without_credentials(u.expose()).parse())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("nats_url: {e}"))?;
    let shown: Vec<String> = cfg.urls.iter().map(|u| u.to_string()).collect();
    Ok((urls, shown.join(",")))
}
