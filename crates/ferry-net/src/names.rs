//! Interface names, namespace names and `ADDR/PREFIX` addresses.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::error::{NetError, Result};

/// Longest Linux interface name (`IFNAMSIZ` - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Longest namespace name this crate produces.
pub const MAX_NETNS_LEN: usize = 64;

/// Checks that `name` is a Linux interface name the kernel accepts unchanged.
///
/// Allowed: 1 to 15 bytes of ASCII letters, digits, `-`, `_` and `.`; not `.` or `..`.
pub fn validate_ifname(name: &str) -> Result<()> {
    let bad = |reason: String| {
        Err(NetError::InvalidIfName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty".into());
    }
    if name.len() > MAX_IFNAME_LEN {
        return bad(format!(
            "it is {} bytes long; Linux limits interface names to {MAX_IFNAME_LEN} bytes (IFNAMSIZ - 1): choose a shorter name",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return bad("`.` and `..` are reserved".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return bad(format!(
            "character {c:?} is not allowed: use ASCII letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

/// Turns a network name into a namespace name: ASCII lower-case letters, digits, `-`, `_`
/// and `.`; anything else becomes `-`; leading `-`/`.` are dropped; at most 64 bytes.
///
/// Fails when nothing usable is left (e.g. `"///"`).
pub fn sanitize_netns_name(name: &str) -> Result<String> {
    let mapped: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut out = String::with_capacity(mapped.len());
    for c in mapped.trim_start_matches(['-', '.']).chars() {
        // Collapse runs of '-' produced by the mapping.
        if c == '-' && out.ends_with('-') {
            continue;
        }
        out.push(c);
    }
    out.truncate(MAX_NETNS_LEN);
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() || out.chars().all(|c| c == '.') {
        return Err(NetError::InvalidNetworkName {
            name: name.to_string(),
            reason: "it has no letters or digits to name a network namespace with".into(),
        });
    }
    Ok(out)
}

/// An interface address with its prefix length, e.g. `10.200.1.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Builds a `Cidr`, checking the prefix length against the address family.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(NetError::InvalidCidr {
                value: format!("{addr}/{prefix}"),
                reason: format!("prefix length {prefix} is larger than {max}"),
            });
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| NetError::InvalidCidr {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let (addr, prefix) = s.split_once('/').ok_or_else(|| bad("no /PREFIX"))?;
        let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| bad("prefix length is not a number"))?;
        Cidr::new(addr, prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifnames() {
        assert!(validate_ifname("tap0").is_ok());
        assert!(validate_ifname("abcdefghijklmno").is_ok());
        let e = validate_ifname("abcdefghijklmnop").unwrap_err().to_string();
        assert!(e.contains("16 bytes") && e.contains("15"), "{e}");
        assert!(validate_ifname("").is_err());
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("a b").is_err());
        assert!(validate_ifname("..").is_err());
    }

    #[test]
    fn netns_names() {
        assert_eq!(sanitize_netns_name("prod").unwrap(), "prod");
        assert_eq!(
            sanitize_netns_name("UAT wave/1 ").unwrap(),
            "uat-wave-1".to_string()
        );
        assert_eq!(sanitize_netns_name("../x").unwrap(), "x");
        assert!(sanitize_netns_name("///").is_err());
        assert!(sanitize_netns_name("..").is_err());
        assert_eq!(sanitize_netns_name(&"a".repeat(100)).unwrap().len(), 64);
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.200.1.1/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.200.1.1/24");
        assert_eq!(c.prefix, 24);
        assert!("10.200.1.1".parse::<Cidr>().is_err());
        assert!("10.200.1.1/33".parse::<Cidr>().is_err());
        assert!("fd00::1/64".parse::<Cidr>().is_ok());
        assert!("x/24".parse::<Cidr>().is_err());
    }
}
