//! The one TLS client configuration of the process: the Mozilla root set
//! (webpki-roots) on the `ring` provider, built once, for guests' HTTPS
//! requests and for exporting traces to an `https://` collector.

use std::sync::{Arc, OnceLock};

/// A connector on the process's TLS client configuration.
pub fn connector() -> tokio_rustls::TlsConnector {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
        };
        // The provider is named, not taken from the process default, so a
        // second crypto backend elsewhere in the build cannot make this panic.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    });
    tokio_rustls::TlsConnector::from(config.clone())
}
