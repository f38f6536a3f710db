//! TSIG keys (RFC 8945): name, algorithm and shared secret.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use hickory_proto::rr::rdata::tsig::TsigAlgorithm as HickoryAlgorithm;
use hickory_proto::rr::{Name, TSigner};
use zeroize::Zeroizing;

use crate::error::DnsError;

/// Allowed difference, in seconds, between our clock and the server's (RFC 8945 suggests 300).
pub const TSIG_FUDGE: u16 = 300;

/// The HMAC algorithms Ferry signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TsigAlgorithm {
    /// `hmac-sha256`, the default (as in knsupdate and BIND's tsig-keygen).
    #[default]
    HmacSha256,
    /// `hmac-sha384`.
    HmacSha384,
    /// `hmac-sha512`.
    HmacSha512,
}

impl TsigAlgorithm {
    /// The name used in knot.conf, named.conf, knsupdate -y and on the wire (without the dot).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HmacSha256 => "hmac-sha256",
            Self::HmacSha384 => "hmac-sha384",
            Self::HmacSha512 => "hmac-sha512",
        }
    }

    fn to_hickory(self) -> HickoryAlgorithm {
        match self {
            Self::HmacSha256 => HickoryAlgorithm::HmacSha256,
            Self::HmacSha384 => HickoryAlgorithm::HmacSha384,
            Self::HmacSha512 => HickoryAlgorithm::HmacSha512,
        }
    }
}

impl fmt::Display for TsigAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TsigAlgorithm {
    type Err = DnsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().trim_end_matches('.').to_ascii_lowercase();
        match lower.as_str() {
            "hmac-sha256" | "sha256" => Ok(Self::HmacSha256),
            "hmac-sha384" | "sha384" => Ok(Self::HmacSha384),
            "hmac-sha512" | "sha512" => Ok(Self::HmacSha512),
            _ => Err(DnsError::InvalidKey(format!(
                "unsupported TSIG algorithm '{s}': use hmac-sha256 (default), hmac-sha384 or hmac-sha512"
            ))),
        }
    }
}

/// A TSIG key. Its `Debug` never shows the secret, and the secret is wiped from memory on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct TsigKey {
    /// The key's name, as configured on the server (`key: - id:` in knot.conf).
    pub name: Name,
    /// The HMAC algorithm.
    pub algorithm: TsigAlgorithm,
    secret: Zeroizing<Vec<u8>>,
}

impl TsigKey {
    /// A key from its parts. The name is made absolute; names with characters other than
    /// letters, digits, `-`, `_` and `.` are refused (they end up in server configuration files).
    pub fn new(name: &str, algorithm: TsigAlgorithm, secret: Vec<u8>) -> Result<Self, DnsError> {
        let secret = Zeroizing::new(secret);
        let name = name.trim();
        if name.is_empty() || name == "." {
            return Err(DnsError::InvalidKey("the TSIG key name is empty".into()));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(DnsError::InvalidKey(format!(
                "the TSIG key name '{name}' contains '{c}': use letters, digits, '-', '_' and '.'"
            )));
        }
        let mut parsed = Name::from_ascii(name).map_err(|e| {
            DnsError::InvalidKey(format!("the TSIG key name '{name}' is not a DNS name: {e}"))
        })?;
        parsed.set_fqdn(true);
        if secret.is_empty() {
            return Err(DnsError::InvalidKey(format!(
                "the secret of TSIG key '{name}' is empty"
            )));
        }
        Ok(Self {
            name: parsed,
            algorithm,
            secret,
        })
    }

    /// A key from a base64 secret, as written in knot.conf or named.conf.
    pub fn from_base64(
        name: &str,
        algorithm: TsigAlgorithm,
        secret_base64: &str,
    ) -> Result<Self, DnsError> {
        let secret = base64::engine::general_purpose::STANDARD
            .decode(secret_base64.trim())
            .map_err(|_| {
                // The decoder's message may quote the offending input: never show it.
                DnsError::InvalidKey(format!(
                    "the secret of TSIG key '{}' is not valid base64",
                    name.trim()
                ))
            })?;
        Self::new(name, algorithm, secret)
    }

    /// Parses `[algorithm:]name:base64secret`, the form of `knsupdate -y` and `nsupdate -y`.
    /// The algorithm defaults to hmac-sha256.
    pub fn parse(spec: &str) -> Result<Self, DnsError> {
        let parts: Vec<&str> = spec.trim().split(':').collect();
        match parts.as_slice() {
            [name, secret] => Self::from_base64(name, TsigAlgorithm::default(), secret),
            [alg, name, secret] => Self::from_base64(name, alg.parse()?, secret),
            _ => Err(DnsError::InvalidKey(
                "expected '[algorithm:]name:base64secret', e.g. 'hmac-sha256:ferry-update:c2VjcmV0...'"
                    .into(),
            )),
        }
    }

    /// The key's name without the trailing dot, as written in server configuration files.
    pub fn name_str(&self) -> String {
        self.name.to_ascii().trim_end_matches('.').to_string()
    }

    /// The raw secret.
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// The secret in base64. Handle with care: this is the credential.
    pub fn secret_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.secret.as_slice()))
    }

    pub(crate) fn signer(&self) -> Result<TSigner, DnsError> {
        TSigner::new(
            self.secret.to_vec(),
            self.algorithm.to_hickory(),
            self.name.clone(),
            TSIG_FUDGE,
        )
        .map_err(|e| DnsError::InvalidKey(format!("TSIG key '{}': {e}", self.name_str())))
    }
}

impl fmt::Debug for TsigKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TsigKey")
            .field("name", &self.name_str())
            .field("algorithm", &self.algorithm)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl FromStr for TsigKey {
    type Err = DnsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0IQ=="; // "secret-secret-secret-secret!"

    #[test]
    fn parses_name_and_secret_with_default_algorithm() {
        let k = TsigKey::parse(&format!("ferry-update:{SECRET}")).unwrap();
        assert_eq!(k.name_str(), "ferry-update");
        assert!(k.name.is_fqdn());
        assert_eq!(k.algorithm, TsigAlgorithm::HmacSha256);
        assert_eq!(k.secret(), b"secret-secret-secret-secret!");
        assert_eq!(k.secret_base64().as_str(), SECRET);
    }

    #[test]
    fn parses_algorithm_name_and_secret() {
        let k = TsigKey::parse(&format!("hmac-sha512:key.example.:{SECRET}")).unwrap();
        assert_eq!(k.algorithm, TsigAlgorithm::HmacSha512);
        assert_eq!(k.name_str(), "key.example");
        let k = TsigKey::parse(&format!("HMAC-SHA256:k:{SECRET}")).unwrap();
        assert_eq!(k.algorithm, TsigAlgorithm::HmacSha256);
        let k: TsigKey = format!("hmac-sha384:k:{SECRET}").parse().unwrap();
        assert_eq!(k.algorithm, TsigAlgorithm::HmacSha384);
    }

    #[test]
    fn refuses_bad_forms_without_echoing_the_secret() {
        for bad in [
            "".to_string(),
            "onlyname".to_string(),
            format!("a:b:c:{SECRET}"),
            format!("hmac-md5:k:{SECRET}"),
            format!(":{SECRET}"),
            format!("bad name:{SECRET}"),
            "k:not*base64!".to_string(),
            "k:".to_string(),
        ] {
            let err = TsigKey::parse(&bad).unwrap_err();
            assert!(matches!(err, DnsError::InvalidKey(_)), "{bad}: {err}");
            let msg = err.to_string();
            assert!(!msg.contains(SECRET), "{msg}");
            assert!(!msg.contains("not*base64"), "{msg}");
        }
    }

    #[test]
    fn unsupported_algorithm_is_named() {
        let err = TsigKey::parse(&format!("hmac-md5:k:{SECRET}")).unwrap_err();
        assert!(err.to_string().contains("hmac-md5"), "{err}");
        assert!(err.to_string().contains("hmac-sha256"), "{err}");
    }

    #[test]
    fn debug_redacts_the_secret() {
        let k = TsigKey::parse(&format!("hmac-sha512:ferry-update:{SECRET}")).unwrap();
        let dbg = format!("{k:?} {k:#?}");
        assert!(!dbg.contains(SECRET), "{dbg}");
        assert!(!dbg.contains("secret-secret"), "{dbg}");
        assert!(!dbg.contains("115, 101, 99"), "{dbg}"); // the bytes as a list
        assert!(dbg.contains("ferry-update"), "{dbg}");
        assert!(dbg.contains("redacted"), "{dbg}");
    }

    #[test]
    fn builds_a_signer_for_every_algorithm() {
        for alg in [
            TsigAlgorithm::HmacSha256,
            TsigAlgorithm::HmacSha384,
            TsigAlgorithm::HmacSha512,
        ] {
            let k = TsigKey::new("k", alg, b"0123456789abcdef".to_vec()).unwrap();
            k.signer().unwrap();
            assert_eq!(alg.as_str().parse::<TsigAlgorithm>().unwrap(), alg);
        }
    }
}
