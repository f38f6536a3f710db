//! The on-disk layout of a CA directory and loading identities from it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{CertificateAuthority, IssuedCert, PkiError};

/// A directory holding `ca.pem`, `ca.key` and issued `NAME.pem` / `NAME.key`.
pub struct CaDir {
    dir: PathBuf,
}

/// What one end of a mutual-TLS channel needs: its own certificate chain and key, and
/// the CA its peers must chain to.
#[derive(Clone)]
pub struct Identity {
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: std::sync::Arc<PrivateKeyDer<'static>>,
    pub ca: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("certs", &self.cert_chain.len())
            .finish_non_exhaustive()
    }
}

impl CaDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn ca_key_path(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    pub fn cert_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    pub fn key_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// Creates a new CA; refuses to overwrite an existing one.
    pub fn init(&self, ca_name: &str) -> Result<(), PkiError> {
        if self.ca_cert_path().exists() || self.ca_key_path().exists() {
            return Err(PkiError::Exists(self.ca_cert_path()));
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| PkiError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let ca = CertificateAuthority::generate(ca_name)?;
        write_key(&self.ca_key_path(), &ca.key_pem())?;
        write_public(&self.ca_cert_path(), ca.cert_pem().as_bytes())?;
        Ok(())
    }

    pub fn load_ca(&self) -> Result<CertificateAuthority, PkiError> {
        if !self.ca_cert_path().exists() {
            return Err(PkiError::NoCa(self.dir.clone()));
        }
        let cert = read(&self.ca_cert_path())?;
        let key = read_key(&self.ca_key_path())?;
        CertificateAuthority::from_pem(&cert, &key).map_err(|e| PkiError::BadPem {
            path: self.ca_key_path(),
            what: "CA",
            reason: e.to_string(),
        })
    }

    /// Issues `NAME.pem` / `NAME.key` valid for `names` (DNS names or IPs).
    pub fn issue(&self, name: &str, names: &[String]) -> Result<IssuedCert, PkiError> {
        let ca = self.load_ca()?;
        let issued = ca.issue(names)?;
        write_key(&self.key_path(name), &issued.key_pem)?;
        write_public(&self.cert_path(name), issued.cert_pem.as_bytes())?;
        Ok(issued)
    }

    /// Writes `NAME`'s private key, decrypted, to `to` (mode 0600, a new file): for a
    /// program that must open it without Ferry's passphrase (the worker inside its
    /// image; a simulator serving TLS in a test). The caller removes it when done.
    pub fn export_key(&self, name: &str, to: &Path) -> Result<(), PkiError> {
        write_secret(to, read_key(&self.key_path(name))?.as_bytes())
    }

    /// The identity `NAME` issued from this CA.
    pub fn identity(&self, name: &str) -> Result<Identity, PkiError> {
        Identity::from_files(
            &self.cert_path(name),
            &self.key_path(name),
            &self.ca_cert_path(),
        )
    }
}

impl Identity {
    pub fn from_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, PkiError> {
        Self::from_pem(&read(cert)?, &read_key(key)?, &read(ca)?).map_err(|(what, reason)| {
            let path = match what {
                "certificate" => cert,
                "private key" => key,
                _ => ca,
            };
            PkiError::BadPem {
                path: path.to_path_buf(),
                what,
                reason,
            }
        })
    }

    /// Builds an identity from PEM text; on failure says which part was unusable.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        ca_pem: &str,
    ) -> Result<Self, (&'static str, String)> {
        let certs = |pem: &str, what: &'static str| {
            let v: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| (what, e.to_string()))?;
            if v.is_empty() {
                return Err((what, "no CERTIFICATE block".to_string()));
            }
            Ok(v)
        };
        let cert_chain = certs(cert_pem, "certificate")?;
        let ca = certs(ca_pem, "CA certificate")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| ("private key", e.to_string()))?;
        Ok(Self {
            cert_chain,
            key: std::sync::Arc::new(key),
            ca,
        })
    }

    /// A throwaway CA with one leaf for `names`: used when both ends run in one process
    /// (`ferry disk sync`), so the local path still goes through mutual TLS.
    pub fn ephemeral(names: &[String]) -> Result<Self, PkiError> {
        let ca = CertificateAuthority::generate("Ferry ephemeral CA")?;
        let leaf = ca.issue(names)?;
        Self::from_pem(&leaf.cert_pem, &leaf.key_pem, &ca.cert_pem())
            .map_err(|(what, reason)| PkiError::Tls(format!("{what}: {reason}")))
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A private key file's plain PEM (decrypted when it is encrypted).
fn read_key(path: &Path) -> Result<zeroize::Zeroizing<String>, PkiError> {
    crate::keyfile::open(path, read(path)?)
}

/// Writes a private key, encrypted (see [`crate::keyfile`]).
fn write_key(path: &Path, key_pem: &str) -> Result<(), PkiError> {
    write_secret(path, crate::keyfile::seal(key_pem)?.as_bytes())
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_mode(path, bytes, 0o644)
}

/// Private keys are created with mode 0600 from the start (never world-readable, even
/// for a moment).
pub(crate) fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_mode(path, bytes, 0o600)
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}
