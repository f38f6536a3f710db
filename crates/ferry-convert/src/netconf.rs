//! A guest's network configuration, read offline from its files.
//!
//! Conversion swaps the NIC (vmxnet3 becomes virtio-net), so its predictable name changes
//! (`ens192` becomes `enp1s0`) and a configuration that names the old interface no
//! longer applies: the guest boots without its address. Before the first boot Ferry reads
//! what the guest configured, in every format Linux distributions use, to know which
//! interface names and MAC addresses carry which static addresses.
//!
//! Every byte parsed here comes from the migrated guest, which controls its disk: these
//! parsers only ever produce data (names, addresses), never paths to open or commands,
//! and they accept anything without panicking.

use serde::{Deserialize, Serialize};

/// The formats this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigKind {
    /// Debian's `/etc/network/interfaces` (and `interfaces.d/*`).
    Ifupdown,
    /// `/etc/netplan/*.yaml` (Ubuntu).
    Netplan,
    /// `/etc/NetworkManager/system-connections/*.nmconnection`.
    NetworkManager,
    /// `/etc/sysconfig/network-scripts/ifcfg-*` (RHEL and relatives).
    Ifcfg,
    /// `/etc/systemd/network/*.network`.
    Networkd,
}

/// One interface a guest file configures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfiguredNic {
    /// The file it came from (a path inside the guest).
    pub file: String,
    pub kind: ConfigKind,
    /// The interface name it applies to, when it matches by name.
    pub name: Option<String>,
    /// The MAC address it applies to, when it matches by MAC (lower case).
    pub mac: Option<String>,
    /// Static addresses with their prefix (`10.0.0.5/24`); empty for DHCP.
    pub addresses: Vec<String>,
    pub gateway: Option<String>,
    pub dns: Vec<String>,
    pub dhcp: bool,
}

impl ConfiguredNic {
    fn new(file: &str, kind: ConfigKind) -> ConfiguredNic {
        ConfiguredNic {
            file: file.to_string(),
            kind,
            name: None,
            mac: None,
            addresses: vec![],
            gateway: None,
            dns: vec![],
            dhcp: false,
        }
    }

    fn is_loopback(&self) -> bool {
        self.name.as_deref() == Some("lo")
    }
}

/// A plausible interface name: what the kernel accepts (at most 15 bytes, no '/', no
/// white space) and nothing that needs quoting anywhere it is written.
pub fn valid_ifname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':'))
}

/// `aa:bb:cc:dd:ee:ff` in lower case, or nothing.
pub fn normalize_mac(s: &str) -> Option<String> {
    let s = s.trim().trim_matches('"').to_ascii_lowercase();
    let parts: Vec<&str> = s.split([':', '-']).collect();
    (parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit())))
    .then(|| parts.join(":"))
}

/// `10.0.0.5/24`, or `10.0.0.5` with a netmask, as address/prefix; IPv4 or IPv6.
fn cidr(addr: &str, netmask: Option<&str>) -> Option<String> {
    let addr = addr.trim().trim_matches('"');
    if let Some((a, p)) = addr.split_once('/') {
        let ip: std::net::IpAddr = a.parse().ok()?;
        let p: u8 = p.parse().ok()?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        return (p <= max).then(|| format!("{ip}/{p}"));
    }
    let ip: std::net::IpAddr = addr.parse().ok()?;
    let prefix = match (ip, netmask) {
        (std::net::IpAddr::V4(_), Some(m)) => {
            let m = m.trim().trim_matches('"');
            if let Ok(p) = m.parse::<u8>() {
                p.min(32)
            } else {
                let m: std::net::Ipv4Addr = m.parse().ok()?;
                u32::from(m).count_ones() as u8
            }
        }
        (std::net::IpAddr::V4(_), None) => 32,
        (std::net::IpAddr::V6(_), Some(m)) => m.trim().parse::<u8>().ok()?.min(128),
        (std::net::IpAddr::V6(_), None) => 128,
    };
    Some(format!("{ip}/{prefix}"))
}

fn ip(s: &str) -> Option<String> {
    s.trim()
        .trim_matches('"')
        .parse::<std::net::IpAddr>()
        .ok()
        .map(|i| i.to_string())
}

/// `/etc/network/interfaces`: `iface NAME inet static` stanzas with `address`,
/// `netmask`, `gateway`, `dns-nameservers`; `hwaddress` when set.
pub fn parse_ifupdown(file: &str, text: &str) -> Vec<ConfiguredNic> {
    let mut out: Vec<ConfiguredNic> = vec![];
    let mut cur: Option<(ConfiguredNic, Option<String>, Option<String>)> = None;
    let flush = |cur: &mut Option<(ConfiguredNic, Option<String>, Option<String>)>,
                 out: &mut Vec<ConfiguredNic>| {
        if let Some((mut n, addr, mask)) = cur.take() {
            if let Some(a) = addr.and_then(|a| cidr(&a, mask.as_deref())) {
                n.addresses.push(a);
            }
            // Two stanzas for one interface (inet and inet6) are one NIC.
            if let Some(prev) = out.iter_mut().find(|p| p.name == n.name) {
                prev.addresses.extend(n.addresses);
                prev.dns.extend(n.dns);
                prev.gateway = prev.gateway.take().or(n.gateway);
                prev.dhcp |= n.dhcp;
                prev.mac = prev.mac.take().or(n.mac);
            } else if !n.is_loopback() {
                out.push(n);
            }
        }
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut w = line.split_whitespace();
        let Some(key) = w.next() else { continue };
        match key {
            "iface" => {
                flush(&mut cur, &mut out);
                let (Some(name), _family, method) = (w.next(), w.next(), w.next()) else {
                    continue;
                };
                if !valid_ifname(name) {
                    continue;
                }
                let mut n = ConfiguredNic::new(file, ConfigKind::Ifupdown);
                n.name = Some(name.to_string());
                n.dhcp = matches!(method, Some("dhcp") | Some("auto"));
                cur = Some((n, None, None));
            }
            "auto" | "allow-hotplug" | "mapping" | "source" | "source-directory" => {
                flush(&mut cur, &mut out);
            }
            _ => {
                let Some((n, addr, mask)) = cur.as_mut() else {
                    continue;
                };
                let val = w.next();
                match (key, val) {
                    ("address", Some(v)) => *addr = Some(v.to_string()),
                    ("netmask", Some(v)) => *mask = Some(v.to_string()),
                    ("gateway", Some(v)) => n.gateway = ip(v),
                    ("hwaddress", Some(v)) => {
                        // `hwaddress ether aa:bb:…` or `hwaddress aa:bb:…`
                        let v = if v == "ether" {
                            w.next().unwrap_or("")
                        } else {
                            v
                        };
                        n.mac = normalize_mac(v);
                    }
                    ("dns-nameservers", Some(v)) => {
                        n.dns.extend(std::iter::once(v).chain(w).filter_map(ip));
                    }
                    _ => {}
                }
            }
        }
    }
    flush(&mut cur, &mut out);
    out
}

/// An INI-style file (`[Section]`, `key=value`): NetworkManager keyfiles and
/// systemd-networkd units. Sections and keys keep their case; values are trimmed.
fn ini(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = vec![];
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.trim().to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// A NetworkManager keyfile: `[connection] interface-name`, `[ethernet] mac-address`,
/// `[ipv4] method`, `address1=10.0.0.5/24,10.0.0.1`, `dns=…;…`, `gateway`.
pub fn parse_nm_keyfile(file: &str, text: &str) -> Vec<ConfiguredNic> {
    let mut n = ConfiguredNic::new(file, ConfigKind::NetworkManager);
    let mut ethernet = false;
    for (sec, k, v) in ini(text) {
        match (sec.as_str(), k.as_str()) {
            ("connection", "type") => {
                ethernet = matches!(v.as_str(), "ethernet" | "802-3-ethernet")
            }
            ("connection", "interface-name") if valid_ifname(&v) => n.name = Some(v),
            ("ethernet" | "802-3-ethernet", "mac-address") => n.mac = normalize_mac(&v),
            ("ipv4" | "ipv6", "method") => n.dhcp |= v == "auto",
            ("ipv4" | "ipv6", key) if key.starts_with("address") => {
                let mut parts = v.split(',');
                if let Some(a) = parts.next().and_then(|a| cidr(a, None)) {
                    n.addresses.push(a);
                }
                if let Some(g) = parts.next().and_then(ip) {
                    n.gateway.get_or_insert(g);
                }
            }
            ("ipv4" | "ipv6", "gateway") => n.gateway = n.gateway.take().or_else(|| ip(&v)),
            ("ipv4" | "ipv6", "dns") => n.dns.extend(v.split([';', ',']).filter_map(ip)),
            _ => {}
        }
    }
    if !ethernet || (n.name.is_none() && n.mac.is_none()) {
        return vec![];
    }
    vec![n]
}

/// A systemd-networkd `.network` unit: `[Match] Name=` / `MACAddress=`, `[Network]
/// Address=`, `Gateway=`, `DNS=`, `DHCP=`, `[Address] Address=`.
pub fn parse_networkd(file: &str, text: &str) -> Vec<ConfiguredNic> {
    let mut n = ConfiguredNic::new(file, ConfigKind::Networkd);
    for (sec, k, v) in ini(text) {
        match (sec.as_str(), k.as_str()) {
            // One exact name only: a glob or a list matches what it matches on any
            // hardware and needs no pinning.
            ("Match", "Name") if valid_ifname(&v) && !v.contains(['*', '?', '[']) => {
                n.name = Some(v);
            }
            ("Match", "MACAddress") => n.mac = normalize_mac(&v),
            ("Network" | "Address", "Address") => n.addresses.extend(cidr(&v, None)),
            ("Network", "Gateway") | ("Route", "Gateway") => {
                n.gateway = n.gateway.take().or_else(|| ip(&v))
            }
            ("Network", "DNS") => n.dns.extend(v.split_whitespace().filter_map(ip)),
            ("Network", "DHCP") => n.dhcp = matches!(v.as_str(), "yes" | "ipv4" | "ipv6" | "true"),
            _ => {}
        }
    }
    if n.name.is_none() && n.mac.is_none() || n.is_loopback() {
        return vec![];
    }
    vec![n]
}

/// `ifcfg-NAME`: shell assignments `DEVICE`, `HWADDR`, `BOOTPROTO`, `IPADDR[N]`,
/// `PREFIX[N]`/`NETMASK[N]`, `GATEWAY`, `DNS1…`. Only read, never run.
pub fn parse_ifcfg(file: &str, text: &str) -> Vec<ConfiguredNic> {
    let mut n = ConfiguredNic::new(file, ConfigKind::Ifcfg);
    let mut vars = std::collections::BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
            vars.insert(k.trim().to_string(), v.to_string());
        }
    }
    n.name = vars
        .get("DEVICE")
        .filter(|d| valid_ifname(d))
        .cloned()
        .or_else(|| {
            file.rsplit('/')
                .next()
                .and_then(|f| f.strip_prefix("ifcfg-"))
                .filter(|d| valid_ifname(d))
                .map(str::to_string)
        });
    n.mac = vars.get("HWADDR").and_then(|m| normalize_mac(m));
    n.dhcp = vars
        .get("BOOTPROTO")
        .is_some_and(|b| b.eq_ignore_ascii_case("dhcp"));
    for suffix in std::iter::once(String::new()).chain((0..10).map(|i| i.to_string())) {
        if let Some(a) = vars.get(&format!("IPADDR{suffix}")) {
            let mask = vars
                .get(&format!("PREFIX{suffix}"))
                .or_else(|| vars.get(&format!("NETMASK{suffix}")));
            n.addresses.extend(cidr(a, mask.map(String::as_str)));
        }
    }
    n.gateway = vars.get("GATEWAY").and_then(|g| ip(g));
    for i in 1..=3 {
        n.dns
            .extend(vars.get(&format!("DNS{i}")).and_then(|d| ip(d)));
    }
    if n.is_loopback() || (n.name.is_none() && n.mac.is_none()) {
        return vec![];
    }
    vec![n]
}

/// Netplan YAML: `network: ethernets: ID: {match: {macaddress, name}, set-name,
/// addresses, gateway4, routes, nameservers: {addresses}, dhcp4}`.
pub fn parse_netplan(file: &str, text: &str) -> Vec<ConfiguredNic> {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Doc {
        network: Net,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Net {
        ethernets: std::collections::BTreeMap<String, Eth>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "kebab-case")]
    struct Eth {
        #[serde(rename = "match")]
        matches: Match,
        set_name: Option<String>,
        addresses: Vec<serde_yaml_ng::Value>,
        gateway4: Option<String>,
        gateway6: Option<String>,
        routes: Vec<Route>,
        nameservers: Ns,
        dhcp4: serde_yaml_ng::Value,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Match {
        macaddress: Option<String>,
        name: Option<String>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Route {
        to: Option<String>,
        via: Option<String>,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Ns {
        addresses: Vec<String>,
    }
    let Ok(doc) = serde_yaml_ng::from_str::<Doc>(text) else {
        return vec![];
    };
    let mut out = vec![];
    for (id, e) in doc.network.ethernets {
        let mut n = ConfiguredNic::new(file, ConfigKind::Netplan);
        n.mac = e.matches.macaddress.as_deref().and_then(normalize_mac);
        n.name = e
            .set_name
            .or(e.matches.name)
            .or_else(|| (n.mac.is_none()).then(|| id.clone()))
            .filter(|x| valid_ifname(x) && !x.contains(['*', '?', '[']));
        n.addresses = e
            .addresses
            .iter()
            .filter_map(|a| a.as_str().and_then(|s| cidr(s, None)))
            .collect();
        n.gateway = e
            .gateway4
            .as_deref()
            .and_then(ip)
            .or_else(|| {
                e.routes
                    .iter()
                    .find(|r| matches!(r.to.as_deref(), Some("default") | Some("0.0.0.0/0")))
                    .and_then(|r| r.via.as_deref().and_then(ip))
            })
            .or_else(|| e.gateway6.as_deref().and_then(ip));
        n.dns = e
            .nameservers
            .addresses
            .iter()
            .filter_map(|a| ip(a))
            .collect();
        n.dhcp = matches!(e.dhcp4, serde_yaml_ng::Value::Bool(true))
            || e.dhcp4.as_str().is_some_and(|s| s == "yes" || s == "true");
        if (n.name.is_some() || n.mac.is_some()) && !n.is_loopback() {
            out.push(n);
        }
    }
    out
}

/// The parser for a file at `path` inside the guest, by where it lives.
pub fn parse(path: &str, text: &str) -> Vec<ConfiguredNic> {
    let name = path.rsplit('/').next().unwrap_or("");
    if path == "/etc/network/interfaces" || path.starts_with("/etc/network/interfaces.d/") {
        parse_ifupdown(path, text)
    } else if path.starts_with("/etc/netplan/") && name.ends_with(".yaml") {
        parse_netplan(path, text)
    } else if path.starts_with("/etc/NetworkManager/system-connections/") {
        parse_nm_keyfile(path, text)
    } else if path.starts_with("/etc/sysconfig/network-scripts/") && name.starts_with("ifcfg-") {
        parse_ifcfg(path, text)
    } else if path.starts_with("/etc/systemd/network/") && name.ends_with(".network") {
        parse_networkd(path, text)
    } else {
        vec![]
    }
}

/// The directories (and the one file) whose configuration [`parse`] reads.
pub const CONFIG_DIRS: &[&str] = &[
    "/etc/network/interfaces.d",
    "/etc/netplan",
    "/etc/NetworkManager/system-connections",
    "/etc/sysconfig/network-scripts",
    "/etc/systemd/network",
];
pub const CONFIG_FILES: &[&str] = &["/etc/network/interfaces"];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ifupdown_static_and_dhcp() {
        let t = "auto lo\niface lo inet loopback\n\nauto enp0s5\niface enp0s5 inet static\n  address 10.200.1.10\n  netmask 255.255.255.0\n  gateway 10.200.1.1\n  dns-nameservers 10.200.1.2 10.200.1.3\n\niface ens224 inet dhcp\n";
        let n = parse("/etc/network/interfaces", t);
        assert_eq!(n.len(), 2, "{n:?}");
        assert_eq!(n[0].name.as_deref(), Some("enp0s5"));
        assert_eq!(n[0].addresses, vec!["10.200.1.10/24"]);
        assert_eq!(n[0].gateway.as_deref(), Some("10.200.1.1"));
        assert_eq!(n[0].dns, vec!["10.200.1.2", "10.200.1.3"]);
        assert!(!n[0].dhcp);
        assert!(n[1].dhcp && n[1].addresses.is_empty());
        let cidr_form = parse_ifupdown("f", "iface eth0 inet static\naddress 192.0.2.5/26\n");
        assert_eq!(cidr_form[0].addresses, vec!["192.0.2.5/26"]);
    }

    #[test]
    fn netplan_by_name_and_by_mac() {
        let t = r#"
network:
  version: 2
  ethernets:
    ens192:
      addresses: [10.0.0.5/24]
      routes: [{to: default, via: 10.0.0.1}]
      nameservers: {addresses: [10.0.0.2]}
    lan:
      match: {macaddress: "00:50:56:AA:BB:CC"}
      set-name: lan0
      dhcp4: true
"#;
        let n = parse("/etc/netplan/50-cloud-init.yaml", t);
        assert_eq!(n.len(), 2, "{n:?}");
        assert_eq!(n[0].name.as_deref(), Some("ens192"));
        assert_eq!(n[0].gateway.as_deref(), Some("10.0.0.1"));
        assert_eq!(n[1].mac.as_deref(), Some("00:50:56:aa:bb:cc"));
        assert_eq!(n[1].name.as_deref(), Some("lan0"));
        assert!(n[1].dhcp);
        assert!(parse("/etc/netplan/x.yaml", ": : not yaml [").is_empty());
    }

    #[test]
    fn keyfile_ifcfg_and_networkd() {
        let nm = "[connection]\nid=Wired\ntype=ethernet\ninterface-name=ens192\n[ethernet]\nmac-address=00:50:56:01:02:03\n[ipv4]\nmethod=manual\naddress1=10.1.1.5/24,10.1.1.1\ndns=10.1.1.2;\n";
        let n = parse(
            "/etc/NetworkManager/system-connections/Wired.nmconnection",
            nm,
        );
        assert_eq!(n[0].addresses, vec!["10.1.1.5/24"]);
        assert_eq!(n[0].gateway.as_deref(), Some("10.1.1.1"));
        assert_eq!(n[0].mac.as_deref(), Some("00:50:56:01:02:03"));

        let ifcfg = "DEVICE=ens192\nBOOTPROTO=none\nHWADDR=\"00:50:56:01:02:03\"\nIPADDR=10.2.2.5\nNETMASK=255.255.255.0\nGATEWAY=10.2.2.1\nDNS1=10.2.2.2\n";
        let n = parse("/etc/sysconfig/network-scripts/ifcfg-ens192", ifcfg);
        assert_eq!(n[0].name.as_deref(), Some("ens192"));
        assert_eq!(n[0].addresses, vec!["10.2.2.5/24"]);
        assert_eq!(n[0].dns, vec!["10.2.2.2"]);

        let nd = "[Match]\nName=ens192\n[Network]\nAddress=10.3.3.5/24\nGateway=10.3.3.1\nDNS=10.3.3.2\n";
        let n = parse("/etc/systemd/network/10-ens192.network", nd);
        assert_eq!(n[0].addresses, vec!["10.3.3.5/24"]);
        assert!(parse(
            "/etc/systemd/network/x.network",
            "[Match]\nName=en*\n[Network]\nDHCP=yes\n"
        )
        .is_empty());
        assert!(parse("/etc/passwd", "root:x:0:0").is_empty());
    }

    #[test]
    fn names_that_could_be_paths_are_dropped() {
        for bad in ["../../etc", "a/b", "", "x y", "averyveryverylongname0"] {
            assert!(!valid_ifname(bad), "{bad}");
        }
        let n = parse_ifupdown("f", "iface ../x inet static\naddress 10.0.0.1/24\n");
        assert!(n.is_empty());
    }

    proptest! {
        #[test]
        fn parsers_take_any_bytes(s in ".{0,400}") {
            for p in ["/etc/network/interfaces", "/etc/netplan/a.yaml",
                      "/etc/NetworkManager/system-connections/a", "/etc/sysconfig/network-scripts/ifcfg-a",
                      "/etc/systemd/network/a.network"] {
                for n in parse(p, &s) {
                    prop_assert!(n.name.as_deref().is_none_or(valid_ifname));
                }
            }
        }
    }
}
