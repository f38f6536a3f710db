//! API tokens (random, stored as SHA-256 hashes) and credential secrets (ChaCha20-Poly1305
//! with a key kept in the data directory, mode 0600).

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} does not hold a 64-character hex key; remove it to generate a new one (credentials encrypted with the old key are then lost)")]
    BadKey(String),
    #[error("a stored secret cannot be decrypted with this appliance's key")]
    Decrypt,
}

/// A new API token: 32 random bytes, hex, with a recognisable prefix.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    format!("ferry_{}", hex::encode(b))
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Writes `contents` to `path` with mode 0600, atomically (write a temp file, rename).
pub fn write_private(path: &Path, contents: &str) -> Result<(), SecretError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| SecretError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

#[derive(Clone)]
pub struct SecretBox {
    cipher: ChaCha20Poly1305,
}

impl SecretBox {
    /// Loads the key at `path`, creating it (0600) if missing.
    pub fn load_or_create(path: &Path) -> Result<SecretBox, SecretError> {
        let key = match std::fs::read_to_string(path) {
            Ok(s) => {
                let bytes = hex::decode(s.trim())
                    .ok()
                    .filter(|b| b.len() == 32)
                    .ok_or_else(|| SecretError::BadKey(path.display().to_string()))?;
                bytes
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut b = vec![0u8; 32];
                rand::rng().fill_bytes(&mut b);
                write_private(path, &hex::encode(&b))?;
                b
            }
            Err(source) => {
                return Err(SecretError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        Ok(SecretBox {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
        })
    }

    pub fn seal(&self, plain: &str) -> String {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plain.as_bytes())
            .expect("ChaCha20-Poly1305 encryption does not fail for in-memory buffers");
        format!("v1:{}{}", hex::encode(nonce), hex::encode(ct))
    }

    pub fn open(&self, sealed: &str) -> Result<String, SecretError> {
        let hexed = sealed.strip_prefix("v1:").ok_or(SecretError::Decrypt)?;
        let bytes = hex::decode(hexed).map_err(|_| SecretError::Decrypt)?;
        if bytes.len() < 12 {
            return Err(SecretError::Decrypt);
        }
        let (nonce, ct) = bytes.split_at(12);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), ct)
            .map_err(|_| SecretError::Decrypt)?;
        String::from_utf8(plain).map_err(|_| SecretError::Decrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_key_persists() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret.key");
        let b = SecretBox::load_or_create(&p).unwrap();
        let s = b.seal("hunter2");
        assert!(!s.contains("hunter2"));
        let b2 = SecretBox::load_or_create(&p).unwrap();
        assert_eq!(b2.open(&s).unwrap(), "hunter2");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn tokens_hash_stably() {
        let t = new_token();
        assert!(t.starts_with("ferry_"));
        assert_eq!(hash_token(&t), hash_token(&t));
        assert_ne!(hash_token(&t), hash_token(&new_token()));
    }
}
