//! How function calls reach the gateway: straight to it, or through the HTTP proxy the
//! environment names (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`, upper or lower
//! case, read as curl and Go's net/http read them), which the Go worker and reqwest honoured
//! too. The worker calls one gateway, so the route is chosen once, at start-up:
//!
//! - direct: TCP, plus TLS for an `https` gateway;
//! - an `http` gateway through a proxy: TCP to the proxy, requests in absolute form
//!   (`POST http://gateway/function/…`) with the proxy's `Proxy-Authorization`;
//! - an `https` gateway through a proxy: a `CONNECT` tunnel, then TLS to the gateway, which
//!   the proxy cannot read.
//!
//! Only `http://` proxies are supported; any other proxy scheme is refused at start-up
//! rather than ignored.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::header::HeaderValue;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use hyper_util::rt::TokioIo;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connection to the gateway (or to the proxy in front of it).
pub struct Io {
    inner: MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>,
    /// Requests on it go to a forward proxy: hyper then writes them in absolute form.
    proxied: bool,
}

impl Connection for Io {
    fn connected(&self) -> Connected {
        self.inner.connected().proxy(self.proxied)
    }
}

impl Read for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl Write for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
}

/// The route to the gateway, chosen once.
#[derive(Clone)]
enum Route {
    Direct(HttpsConnector<HttpConnector>),
    /// An `http` gateway through a forward proxy at `proxy`.
    Forward {
        proxy: Uri,
        via: HttpsConnector<HttpConnector>,
    },
    /// An `https` gateway through a `CONNECT` tunnel.
    Tunnel(HttpsConnector<Tunnel<HttpConnector>>),
}

/// The client's connector: see the module documentation.
#[derive(Clone)]
pub struct Connector {
    route: Route,
}

/// A connector for calls to `gateway`, and what requests through it must carry.
pub struct Built {
    pub connector: Connector,
    /// `Proxy-Authorization` for every request (forward proxy with credentials only; a
    /// tunnel sends it once, in its `CONNECT`).
    pub proxy_authorization: Option<HeaderValue>,
    /// The proxy in use, without credentials, for the start-up log.
    pub proxy: Option<String>,
}

/// Why no connector could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("cannot load the system's trusted certificates for https gateways: {0}")]
    Tls(#[from] rustls::Error),
    #[error("gateway_url {0}: not a URL the HTTP client accepts")]
    Gateway(String),
    #[error("the proxy for {gateway} ({proxy}, from HTTP_PROXY, HTTPS_PROXY or ALL_PROXY) is not supported: function calls go through http:// proxies only (or set NO_PROXY to the gateway's host)")]
    UnsupportedProxy { gateway: String, proxy: String },
}

/// Checks that the environment's proxy for `gateway`, if any, is one calls can go through.
pub fn check(gateway: &url::Url) -> Result<(), ConnectorError> {
    let uri =
        Uri::try_from(gateway.as_str()).map_err(|e| ConnectorError::Gateway(e.to_string()))?;
    proxy_for(&uri, &Matcher::from_env()).map(|_| ())
}

/// The proxy `proxies` choose for `gateway`, and how to show it (without credentials);
/// refused unless it is an `http://` proxy.
fn proxy_for(
    gateway: &Uri,
    proxies: &Matcher,
) -> Result<Option<(Intercept, String)>, ConnectorError> {
    let Some(intercept) = proxies.intercept(gateway) else {
        return Ok(None);
    };
    let proxy = intercept.uri();
    let shown = format!(
        "{}://{}",
        proxy.scheme_str().unwrap_or(""),
        proxy
            .authority()
            .map_or("", |a| a.as_str())
            .rsplit('@')
            .next()
            .unwrap_or("")
    );
    if proxy.scheme_str() != Some("http") {
        return Err(ConnectorError::UnsupportedProxy {
            gateway: gateway.to_string(),
            proxy: shown,
        });
    }
    Ok(Some((intercept, shown)))
}

/// Builds the connector for `gateway` with the proxy `proxies` choose for it, if any.
pub fn build(gateway: &Uri, proxies: &Matcher) -> Result<Built, ConnectorError> {
    crate::tls::install_provider();
    let tls =
        <rustls::ClientConfig as rustls_platform_verifier::ConfigVerifierExt>::with_platform_verifier()?;
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    // As reqwest did: a pooled connection whose peer vanished (node lost, NAT state
    // dropped) is found out in about a minute instead of hanging a call to its timeout.
    tcp.set_keepalive(Some(Duration::from_secs(15)));
    tcp.set_keepalive_interval(Some(Duration::from_secs(15)));
    tcp.set_keepalive_retries(Some(3));
    // The TLS layer decides by scheme; the TCP connector under it must not refuse https.
    tcp.enforce_http(false);
    let tls_over = |tls: rustls::ClientConfig| {
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
    };

    let Some((intercept, shown)) = proxy_for(gateway, proxies)? else {
        return Ok(Built {
            connector: Connector {
                route: Route::Direct(tls_over(tls).wrap_connector(tcp)),
            },
            proxy_authorization: None,
            proxy: None,
        });
    };
    let proxy = intercept.uri().clone();
    let auth = intercept.basic_auth().cloned().map(|mut v| {
        v.set_sensitive(true);
        v
    });
    let (route, proxy_authorization) = if gateway.scheme_str() == Some("https") {
        let mut tunnel = Tunnel::new(proxy, tcp);
        if let Some(auth) = auth {
            tunnel = tunnel.with_auth(auth);
        }
        (Route::Tunnel(tls_over(tls).wrap_connector(tunnel)), None)
    } else {
        (
            Route::Forward {
                proxy,
                via: tls_over(tls).wrap_connector(tcp),
            },
            auth,
        )
    };
    Ok(Built {
        connector: Connector { route },
        proxy_authorization,
        proxy: Some(shown),
    })
}

impl Service<Uri> for Connector {
    type Response = Io;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Io, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match &mut self.route {
            Route::Direct(c) | Route::Forward { via: c, .. } => c.poll_ready(cx),
            Route::Tunnel(c) => c.poll_ready(cx),
        }
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let (connecting, proxied) = match &mut self.route {
            Route::Direct(c) => (c.call(dst), false),
            Route::Forward { proxy, via } => (via.call(proxy.clone()), true),
            Route::Tunnel(c) => (c.call(dst), false),
        };
        Box::pin(async move {
            Ok(Io {
                inner: connecting.await?,
                proxied,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(http: &str, no: &str) -> Matcher {
        Matcher::builder().http(http).https(http).no(no).build()
    }

    #[test]
    fn routes() {
        let gw: Uri = "http://gateway.openfaas:8080".parse().unwrap();
        let tls_gw: Uri = "https://gateway.openfaas".parse().unwrap();

        let none = build(&gw, &proxies("", "")).unwrap();
        assert!(matches!(none.connector.route, Route::Direct(_)));
        assert_eq!(none.proxy, None);

        let forward = build(&gw, &proxies("http://u:p@proxy:3128", "")).unwrap();
        assert!(matches!(forward.connector.route, Route::Forward { .. }));
        assert_eq!(forward.proxy.as_deref(), Some("http://proxy:3128"));
        let auth = forward.proxy_authorization.unwrap();
        assert_eq!(auth, "Basic dTpw");
        assert!(auth.is_sensitive());

        let tunnel = build(&tls_gw, &proxies("http://u:p@proxy:3128", "")).unwrap();
        assert!(matches!(tunnel.connector.route, Route::Tunnel(_)));
        assert!(tunnel.proxy_authorization.is_none(), "sent in CONNECT only");

        let exempt = build(&gw, &proxies("http://proxy:3128", ".openfaas")).unwrap();
        assert!(matches!(exempt.connector.route, Route::Direct(_)));

        let err = build(&gw, &proxies("socks5://u:p@proxy:1080", ""))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("socks5://proxy:1080"), "{err}");
        assert!(!err.contains("u:p"), "{err}");
    }
}
