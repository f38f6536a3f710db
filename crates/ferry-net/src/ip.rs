//! Running the `ip` tool and reading its answers.

use std::io::ErrorKind;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::error::{NetError, Result};

/// Where `ip netns` keeps its namespace files.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// The file `ip netns` mounts namespace `ns` on.
pub fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from(NETNS_RUN_DIR).join(ns)
}

/// Whether namespace `ns` exists (its file in `/var/run/netns` is there).
pub fn netns_exists(ns: &str) -> bool {
    netns_path(ns).exists()
}

fn render(args: &[&str]) -> String {
    let mut s = String::from("ip");
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Runs `ip ARGS`, returning stdout; `action` says what for (used in errors).
pub(crate) fn ip(action: &str, args: &[&str]) -> Result<String> {
    let command = render(args);
    tracing::debug!(%command, "running");
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                NetError::IpNotFound
            } else {
                NetError::Io {
                    action: format!("{action}: running `{command}`"),
                    source: e,
                }
            }
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let lower = stderr.to_ascii_lowercase();
    if lower.contains("operation not permitted") || lower.contains("permission denied") {
        return Err(NetError::PermissionDenied {
            action: action.to_string(),
            command,
            stderr,
        });
    }
    if lower.contains("cannot open network namespace") {
        let namespace = args
            .iter()
            .position(|a| *a == "-n")
            .and_then(|i| args.get(i + 1))
            .unwrap_or(&"?")
            .to_string();
        return Err(NetError::NoSuchNamespace { namespace });
    }
    Err(NetError::Ip {
        action: action.to_string(),
        command,
        status: out
            .status
            .code()
            .map_or_else(|| "a signal".to_string(), |c| format!("status {c}")),
        stderr,
    })
}

/// Runs `ip -n NS ARGS` (or plain `ip ARGS` in the root namespace when `ns` is `None`).
pub(crate) fn ip_in(ns: Option<&str>, action: &str, args: &[&str]) -> Result<String> {
    match ns {
        None => ip(action, args),
        Some(ns) => {
            let mut full = vec!["-n", ns];
            full.extend_from_slice(args);
            ip(action, &full)
        }
    }
}

/// State of one interface as `ip link show` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface name (without the `@peer` suffix `ip` prints for veths).
    pub name: String,
    /// Administratively up (flag `UP`).
    pub admin_up: bool,
    /// Carrier present (flag `LOWER_UP`): for a tap, a process has it open.
    pub carrier: bool,
    /// Bridge it is a port of, if any.
    pub master: Option<String>,
    /// Operational state (`UP`, `DOWN`, `UNKNOWN`, ...).
    pub oper_state: String,
}

impl LinkInfo {
    /// Parses one line of `ip -o link show`.
    pub(crate) fn parse(line: &str) -> Option<LinkInfo> {
        // "3: tap0: <NO-CARRIER,BROADCAST,MULTICAST,UP> mtu 1500 ... master br0 state DOWN ..."
        let mut parts = line.splitn(3, ": ");
        parts.next()?;
        let name = parts.next()?;
        let name = name.split('@').next()?.to_string();
        let rest = parts.next()?;
        let flags = rest
            .strip_prefix('<')
            .and_then(|r| r.split_once('>'))
            .map(|(f, _)| f)
            .unwrap_or("");
        let flags: Vec<&str> = flags.split(',').collect();
        let words: Vec<&str> = rest.split_whitespace().collect();
        let after = |key: &str| {
            words
                .iter()
                .position(|w| *w == key)
                .and_then(|i| words.get(i + 1))
                .map(|s| s.to_string())
        };
        Some(LinkInfo {
            name,
            admin_up: flags.contains(&"UP"),
            carrier: flags.contains(&"LOWER_UP"),
            master: after("master"),
            oper_state: after("state").unwrap_or_default(),
        })
    }
}

/// `ip link show dev IFNAME` in `ns`; `Ok(None)` when the interface does not exist.
pub(crate) fn link_info(ns: Option<&str>, ifname: &str) -> Result<Option<LinkInfo>> {
    match ip_in(
        ns,
        &format!("reading interface {ifname}"),
        &["-o", "link", "show", "dev", ifname],
    ) {
        Ok(out) => Ok(out.lines().next().and_then(LinkInfo::parse)),
        Err(NetError::Ip { stderr, .. }) if stderr.contains("does not exist") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Global-scope addresses on `ifname` in `ns`, as `ADDR/PREFIX` strings.
pub(crate) fn global_addrs(ns: Option<&str>, ifname: &str) -> Result<Vec<String>> {
    let out = ip_in(
        ns,
        &format!("reading addresses of {ifname}"),
        &["-o", "addr", "show", "dev", ifname, "scope", "global"],
    )?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "inet" || *x == "inet6")?;
            w.get(i + 1).map(|s| s.to_string())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_link() {
        let l = LinkInfo::parse("3: tap0: <NO-CARRIER,BROADCAST,MULTICAST,UP> mtu 1500 qdisc pfifo_fast master br0 state DOWN mode DEFAULT group default qlen 1000\\    link/ether a2:bb:8e:b2:41:33 brd ff:ff:ff:ff:ff:ff").unwrap();
        assert_eq!(l.name, "tap0");
        assert!(l.admin_up && !l.carrier);
        assert_eq!(l.master.as_deref(), Some("br0"));
        assert_eq!(l.oper_state, "DOWN");
        let l = LinkInfo::parse("2: lk0@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noop state UP mode DEFAULT").unwrap();
        assert_eq!(l.name, "lk0");
        assert!(l.carrier && l.master.is_none());
    }
}
