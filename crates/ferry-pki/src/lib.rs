//! Ferry's own certificate authority and the rustls configurations built from it.
//!
//! Every network channel between Ferry's parts is TLS 1.3 with mutual authentication:
//! both ends present a certificate issued by the same Ferry CA, and a peer presenting a
//! certificate from any other CA is refused during the handshake.
//!
//! A CA lives in a directory: `ca.pem` (public) and `ca.key` (private, mode 0600). Leaf
//! certificates are `NAME.pem` / `NAME.key` beside it. Private keys are written
//! encrypted, with a passphrase kept elsewhere (see [`keyfile`]).

mod files;
mod issue;
pub mod keyfile;
mod tls;

pub use files::{CaDir, Identity};
pub use issue::{CertificateAuthority, IssuedCert};
pub use tls::{client_config, server_config};

/// Everything that can go wrong creating, loading or using certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a usable PEM {what}: {reason}")]
    BadPem {
        path: std::path::PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("{0} already exists; refusing to overwrite a certificate authority (remove it first if you really mean to)")]
    Exists(std::path::PathBuf),
    #[error("no certificate authority in {0}: create one with `ferry pki init --dir {0}`")]
    NoCa(std::path::PathBuf),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("{0}")]
    Passphrase(String),
    #[error("cannot decrypt the private key {path} with the passphrase from {from}: {reason}; keys issued on another machine need that machine's passphrase (FERRY_PKI_PASSPHRASE_FILE or FERRY_PKI_PASSPHRASE)")]
    Decrypt {
        path: std::path::PathBuf,
        from: String,
        reason: String,
    },
}
