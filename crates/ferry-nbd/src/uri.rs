//! NBD URIs (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md>):
//! `nbd://host[:port]/export` and `nbd+unix:///export?socket=/path`.

use std::fmt;
use std::path::PathBuf;

use crate::NbdError;

/// The IANA-assigned NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdAddr::Unix(path) => write!(f, "unix socket {}", path.display()),
        }
    }
}

/// A server address plus the export name to ask it for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTarget {
    pub addr: NbdAddr,
    pub export: String,
}

impl NbdTarget {
    /// Parse `nbd://host[:port]/export`, `nbd+tcp://...` or
    /// `nbd+unix:///export?socket=/path`. The export name is the percent-decoded
    /// path without its leading slash, and may be empty. TLS schemes (`nbds...`)
    /// are refused because this client does not speak TLS.
    pub fn parse_uri(uri: &str) -> Result<NbdTarget, NbdError> {
        let bad = |why: &str| NbdError::BadUri(format!("{uri:?}: {why}"));
        let url = url::Url::parse(uri).map_err(|e| bad(&e.to_string()))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("user information is not supported"));
        }
        if url.fragment().is_some() {
            return Err(bad("fragments are not allowed"));
        }
        let export = percent_decode(url.path().strip_prefix('/').unwrap_or(url.path()))
            .ok_or_else(|| bad("export name is not valid percent-encoded UTF-8"))?;
        let addr = match url.scheme() {
            "nbd" | "nbd+tcp" => {
                if url
                    .query()
                    .is_some_and(|q| q.split('&').any(|p| p.starts_with("socket=")))
                {
                    return Err(bad("socket= is only valid with nbd+unix://"));
                }
                let host = match url.host() {
                    Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
                    Some(url::Host::Ipv4(a)) => a.to_string(),
                    Some(url::Host::Ipv6(a)) => a.to_string(),
                    _ => return Err(bad("a host is required")),
                };
                NbdAddr::Tcp {
                    host,
                    port: url.port().unwrap_or(DEFAULT_PORT),
                }
            }
            "nbd+unix" => {
                if url.host_str().is_some_and(|h| !h.is_empty()) || url.port().is_some() {
                    return Err(bad(
                        "nbd+unix:// takes no host or port (use nbd+unix:///export?socket=PATH)",
                    ));
                }
                let socket = url
                    .query_pairs()
                    .find(|(k, _)| k == "socket")
                    .map(|(_, v)| v.into_owned())
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH"))?;
                NbdAddr::Unix(PathBuf::from(socket))
            }
            "nbds" | "nbds+tcp" | "nbds+unix" => {
                return Err(NbdError::Unsupported(format!(
                    "{uri:?}: NBD over TLS is not supported"
                )))
            }
            other => return Err(bad(&format!("unknown scheme {other:?}"))),
        };
        Ok(NbdTarget { addr, export })
    }
}

impl fmt::Display for NbdTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export);
        match &self.addr {
            NbdAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            NbdAddr::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
            NbdAddr::Unix(path) => {
                let socket = percent_encode(&path.to_string_lossy());
                write!(f, "nbd+unix:///{export}?socket={socket}")
            }
        }
    }
}

/// Keep RFC 3986 unreserved characters and '/', encode the rest, so that the
/// URI parses back to the same export name and socket path.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdTarget {
        NbdTarget {
            addr: NbdAddr::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn parses_tcp_uris() {
        assert_eq!(
            NbdTarget::parse_uri("nbd://example.com/disk0").unwrap(),
            tcp("example.com", 10809, "disk0")
        );
        assert_eq!(
            NbdTarget::parse_uri("nbd://10.0.0.1:1234/a/b").unwrap(),
            tcp("10.0.0.1", 1234, "a/b")
        );
        assert_eq!(
            NbdTarget::parse_uri("nbd://[::1]:5000/x").unwrap(),
            tcp("::1", 5000, "x")
        );
        assert_eq!(
            NbdTarget::parse_uri("nbd+tcp://h/").unwrap(),
            tcp("h", 10809, "")
        );
        assert_eq!(
            NbdTarget::parse_uri("nbd://h").unwrap(),
            tcp("h", 10809, "")
        );
        assert_eq!(
            NbdTarget::parse_uri("nbd://h/my%20disk").unwrap(),
            tcp("h", 10809, "my disk")
        );
    }

    #[test]
    fn parses_unix_uris() {
        let t = NbdTarget::parse_uri("nbd+unix:///exp?socket=/run/x.sock").unwrap();
        assert_eq!(t.addr, NbdAddr::Unix("/run/x.sock".into()));
        assert_eq!(t.export, "exp");
        let t = NbdTarget::parse_uri("nbd+unix:///?socket=/tmp/a%20b.sock").unwrap();
        assert_eq!(t.addr, NbdAddr::Unix("/tmp/a b.sock".into()));
        assert_eq!(t.export, "");
    }

    #[test]
    fn rejects_bad_uris() {
        for uri in [
            "",
            "disk.img",
            "http://h/x",
            "nbd:///x",
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd://h/x?socket=/s",
            "nbd://user@h/x",
            "nbd://h/x#frag",
            "nbd://h:99999/x",
            "nbd://h/%zz",
        ] {
            match NbdTarget::parse_uri(uri) {
                Err(NbdError::BadUri(msg)) => assert!(msg.contains(&format!("{uri:?}")), "{msg}"),
                other => panic!("{uri:?} gave {other:?}"),
            }
        }
        assert!(matches!(
            NbdTarget::parse_uri("nbds://h/x"),
            Err(NbdError::Unsupported(_))
        ));
    }

    #[test]
    fn display_round_trips() {
        for t in [
            tcp("example.com", 10809, "disk0"),
            tcp("::1", 7, "a b/c%"),
            tcp("h", 1, ""),
            NbdTarget {
                addr: NbdAddr::Unix("/tmp/dir with space/s.sock".into()),
                export: "e?x&y".into(),
            },
        ] {
            let uri = t.to_string();
            assert_eq!(NbdTarget::parse_uri(&uri).unwrap(), t, "{uri}");
        }
    }
}
