//! Private keys at rest: encrypted PKCS#8 (`ENCRYPTED PRIVATE KEY`, PBES2 with scrypt and
//! AES-256-CBC, which `openssl pkey` also reads), opened with a passphrase that is kept
//! apart from the keys.
//!
//! The passphrase comes from, in order:
//! 1. `FERRY_PKI_PASSPHRASE`, the passphrase itself;
//! 2. `FERRY_PKI_PASSPHRASE_FILE`, a file holding it (a systemd credential, a mounted
//!    secret);
//! 3. `pki-passphrase` in Ferry's configuration directory (`$XDG_CONFIG_HOME/ferry` or
//!    `~/.config/ferry`), which the first key written on this machine creates: 32 random
//!    bytes, mode 0600;
//! 4. on a machine without a home directory (a service), the file a program named with
//!    [`set_fallback_passphrase_file`] (the appliance: `pki-passphrase` in its data
//!    directory), created the same way.
//!
//! A CA directory can then be copied, archived or backed up without its keys being
//! readable, and the machine that uses a key issued elsewhere needs its passphrase too.
//! Keys that are not encrypted (brought from another PKI) are still read as they are.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use pkcs8::der::pem::LineEnding;
use pkcs8::{EncryptedPrivateKeyInfo, PrivateKeyInfo, SecretDocument};
use rand::RngCore;
use zeroize::Zeroizing;

use crate::PkiError;

/// The passphrase itself.
pub const PASSPHRASE_ENV: &str = "FERRY_PKI_PASSPHRASE";
/// A file holding the passphrase.
pub const PASSPHRASE_FILE_ENV: &str = "FERRY_PKI_PASSPHRASE_FILE";

const ENCRYPTED_LABEL: &str = "ENCRYPTED PRIVATE KEY";

/// scrypt with N = 2^14, r = 8 (16 MiB, tens of milliseconds): every process that opens a
/// key pays it once, and a guess at a chosen passphrase costs an attacker as much.
const SCRYPT_LOG_N: u8 = 14;

/// A passphrase and where it came from (for messages; never the passphrase itself).
pub(crate) struct Passphrase {
    secret: Zeroizing<String>,
    pub(crate) source: String,
}

/// Where this process takes the passphrase from.
enum Source {
    Env(Zeroizing<String>),
    File(PathBuf),
    Default(PathBuf),
}

fn source() -> Result<Source, PkiError> {
    if let Ok(p) = std::env::var(PASSPHRASE_ENV) {
        if !p.is_empty() {
            return Ok(Source::Env(Zeroizing::new(p)));
        }
    }
    if let Some(path) = std::env::var_os(PASSPHRASE_FILE_ENV).filter(|p| !p.is_empty()) {
        return Ok(Source::File(PathBuf::from(path)));
    }
    default_file().map(Source::Default).ok_or_else(|| {
        PkiError::Passphrase(format!(
            "private keys are stored encrypted, and neither ${PASSPHRASE_ENV}, ${PASSPHRASE_FILE_ENV} nor a home directory (for ~/.config/ferry/pki-passphrase) is set: give the passphrase with one of them"
        ))
    })
}

/// Where keys written now are encrypted with, for messages (never the passphrase).
pub fn describe_passphrase() -> String {
    match source() {
        Ok(Source::Env(_)) => format!("encrypted with the passphrase in ${PASSPHRASE_ENV}"),
        Ok(Source::File(f)) => format!("encrypted with the passphrase in {}", f.display()),
        Ok(Source::Default(f)) => format!(
            "encrypted with the passphrase in {}; a machine using this key needs a copy of it, named by ${PASSPHRASE_FILE_ENV}",
            f.display()
        ),
        Err(e) => e.to_string(),
    }
}

impl Passphrase {
    /// The passphrase of this process (see the module). `create`: make the default file
    /// when there is none (when a key is about to be written).
    pub(crate) fn resolve(create: bool) -> Result<Self, PkiError> {
        match source()? {
            Source::Env(secret) => Ok(Self {
                secret,
                source: format!("${PASSPHRASE_ENV}"),
            }),
            Source::File(path) => Self::from_file(
                &path,
                &format!("${PASSPHRASE_FILE_ENV} ({})", path.display()),
            ),
            Source::Default(path) => {
                if create && !path.exists() {
                    create_default(&path)?;
                }
                Self::from_file(&path, &path.display().to_string())
            }
        }
    }

    fn from_file(path: &Path, source: &str) -> Result<Self, PkiError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            PkiError::Passphrase(format!(
                "cannot read the passphrase of Ferry's private keys from {source}: {e} (on a machine using keys issued elsewhere, set ${PASSPHRASE_FILE_ENV} to a copy of the issuing machine's ~/.config/ferry/pki-passphrase, or ${PASSPHRASE_ENV})"
            ))
        })?;
        let secret = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string());
        if secret.is_empty() {
            return Err(PkiError::Passphrase(format!("{source} is empty")));
        }
        Ok(Self {
            secret,
            source: source.to_string(),
        })
    }
}

static FALLBACK_FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Names the passphrase file this process uses when it has no home directory (and
/// neither variable is set): a service has none, and keeps its secrets with its data.
/// The first call wins.
pub fn set_fallback_passphrase_file(path: PathBuf) {
    let _ = FALLBACK_FILE.set(path);
}

/// `~/.config/ferry/pki-passphrase` (or under `$XDG_CONFIG_HOME`), else the fallback.
fn default_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        });
    match base {
        Some(base) => Some(base.join("ferry").join("pki-passphrase")),
        None => FALLBACK_FILE.get().cloned(),
    }
}

/// Creates the default passphrase file. Two processes doing it at once agree on one: the
/// file is written whole under another name and linked into place, and the loser of the
/// race reads the winner's.
fn create_default(path: &Path) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(&mut *bytes);
    let text = Zeroizing::new(hex::encode(*bytes) + "\n");
    // Unique per writer: threads of one process race as well as processes.
    let tmp = dir.join(format!(".pki-passphrase.{:016x}", rand::rng().next_u64()));
    crate::files::write_secret(&tmp, text.as_bytes())?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created the passphrase that encrypts Ferry's private keys on this machine");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(e)),
    }
}

/// Encrypts a PKCS#8 PEM private key with this process's passphrase.
pub(crate) fn seal(key_pem: &str) -> Result<Zeroizing<String>, PkiError> {
    let pass = Passphrase::resolve(true)?;
    seal_with(key_pem, &pass.secret)
}

fn seal_with(key_pem: &str, passphrase: &str) -> Result<Zeroizing<String>, PkiError> {
    let bad = |e: String| PkiError::Tls(format!("encrypting a private key: {e}"));
    let (_, doc) = SecretDocument::from_pem(key_pem).map_err(|e| bad(e.to_string()))?;
    let info = PrivateKeyInfo::try_from(doc.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let mut salt = [0u8; 16];
    let mut iv = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    rand::rng().fill_bytes(&mut iv);
    let scrypt = pkcs8::pkcs5::scrypt::Params::new(SCRYPT_LOG_N, 8, 1, 32)
        .map_err(|e| bad(e.to_string()))?;
    let params = pkcs8::pkcs5::pbes2::Parameters::scrypt_aes256cbc(scrypt, &salt, &iv)
        .map_err(|e| bad(e.to_string()))?;
    let sealed = info
        .encrypt_with_params(params, passphrase.as_bytes())
        .map_err(|e| bad(e.to_string()))?;
    sealed
        .to_pem(ENCRYPTED_LABEL, LineEnding::LF)
        .map_err(|e| bad(e.to_string()))
}

/// Whether `pem` holds an encrypted private key.
pub(crate) fn is_sealed(pem: &str) -> bool {
    pem.contains(&format!("-----BEGIN {ENCRYPTED_LABEL}-----"))
}

/// The plain PKCS#8 PEM of the key in `pem` (read from `path`): decrypted with this
/// process's passphrase when it is encrypted, as it is otherwise.
pub(crate) fn open(path: &Path, pem: String) -> Result<Zeroizing<String>, PkiError> {
    let pem = Zeroizing::new(pem);
    if !is_sealed(&pem) {
        return Ok(pem);
    }
    let pass = Passphrase::resolve(false)?;
    open_with(&pem, &pass.secret).map_err(|reason| PkiError::Decrypt {
        path: path.to_path_buf(),
        from: pass.source,
        reason,
    })
}

fn open_with(pem: &str, passphrase: &str) -> Result<Zeroizing<String>, String> {
    let (label, doc) = SecretDocument::from_pem(pem).map_err(|e| e.to_string())?;
    if label != ENCRYPTED_LABEL {
        return Err(format!("a PEM block {label:?}, not {ENCRYPTED_LABEL:?}"));
    }
    let info = EncryptedPrivateKeyInfo::try_from(doc.as_bytes()).map_err(|e| e.to_string())?;
    let plain = info
        .decrypt(passphrase.as_bytes())
        .map_err(|_| "wrong passphrase, or the file is damaged".to_string())?;
    plain
        .to_pem("PRIVATE KEY", LineEnding::LF)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_pem() -> String {
        rcgen::KeyPair::generate().unwrap().serialize_pem()
    }

    #[test]
    fn a_sealed_key_opens_with_its_passphrase_only() {
        let key = key_pem();
        let sealed = seal_with(&key, "correct horse").unwrap();
        assert!(is_sealed(&sealed));
        // Nothing of the key is left readable.
        let body = |pem: &str| {
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>()
        };
        assert!(!sealed.contains(&body(&key)[..40]));
        assert_eq!(*open_with(&sealed, "correct horse").unwrap(), key);
        let wrong = open_with(&sealed, "battery staple").unwrap_err();
        assert!(wrong.contains("wrong passphrase"), "{wrong}");
    }

    #[test]
    fn each_sealing_uses_a_fresh_salt() {
        let key = key_pem();
        assert_ne!(
            *seal_with(&key, "p").unwrap(),
            *seal_with(&key, "p").unwrap()
        );
    }

    #[test]
    fn the_default_passphrase_is_made_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry").join("pki-passphrase");
        let makers: Vec<_> = (0..4)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || create_default(&path).unwrap())
            })
            .collect();
        makers.into_iter().for_each(|t| t.join().unwrap());
        let first = std::fs::read_to_string(&path).unwrap();
        assert_eq!(first.trim().len(), 64);
        create_default(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        // Only the passphrase is left behind.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn plain_keys_are_read_as_they_are() {
        let key = key_pem();
        assert_eq!(*open(Path::new("k.pem"), key.clone()).unwrap(), key);
    }
}
