//! rustls configurations for mutual TLS 1.3 between Ferry's parts.

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::{Identity, PkiError};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(identity: &Identity) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for ca in &identity.ca {
        roots
            .add(ca.clone())
            .map_err(|e| PkiError::Tls(format!("CA certificate rejected: {e}")))?;
    }
    Ok(roots)
}

/// A server that only accepts clients whose certificate chains to the identity's CA.
pub fn server_config(identity: &Identity) -> Result<Arc<ServerConfig>, PkiError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(identity)?), provider())
            .build()
            .map_err(|e| PkiError::Tls(e.to_string()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    Ok(Arc::new(config))
}

/// A client that presents the identity's certificate and only trusts servers chaining to
/// its CA.
pub fn client_config(identity: &Identity) -> Result<Arc<ClientConfig>, PkiError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_root_certificates(roots(identity)?)
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CaDir;

    #[test]
    fn ca_dir_round_trip_and_configs() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::new(dir.path());
        ca.init("test CA").unwrap();
        assert!(matches!(ca.init("again"), Err(PkiError::Exists(_))));
        ca.issue("receiver", &["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        let id = ca.identity("receiver").unwrap();
        server_config(&id).unwrap();
        client_config(&id).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ca.key_path("receiver"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn missing_ca_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = CaDir::new(dir.path()).load_ca().err().unwrap();
        assert!(err.to_string().contains("ferry pki init"), "{err}");
    }
}
