//! The TLS crypto provider. reqwest is built without a bundled provider (to avoid compiling a
//! second crypto library next to the `ring` that async-nats uses), so the process installs
//! `ring` once before the first HTTP client is made.

/// Installs `ring` as the process-wide rustls provider; later calls do nothing.
pub fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
