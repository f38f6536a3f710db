//! Networks (a namespace with a bridge), taps, and veth links.

use std::time::Duration;

use crate::error::{NetError, Result};
use crate::ip::{global_addrs, ip, ip_in, link_info, netns_exists, LinkInfo};
use crate::names::{sanitize_netns_name, validate_ifname, Cidr};
use crate::netns::{self, HttpResponse};

/// Name of the bridge inside every network namespace.
pub const BRIDGE: &str = "br0";

/// What a network should look like; input of [`Network::ensure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    /// Network name; the namespace is [`sanitize_netns_name`] of it.
    pub name: String,
    /// Address of the namespace itself on the bridge (its "gateway"), if any.
    pub cidr: Option<Cidr>,
}

impl NetworkSpec {
    /// A network without an address on its bridge (a pure L2 segment).
    pub fn new(name: impl Into<String>) -> Self {
        NetworkSpec {
            name: name.into(),
            cidr: None,
        }
    }

    /// Sets the bridge address.
    pub fn with_cidr(mut self, cidr: Cidr) -> Self {
        self.cidr = Some(cidr);
        self
    }
}

/// A network of the local target: network namespace `namespace` holding bridge `bridge`.
///
/// Instances attach through taps ([`Network::add_tap`]); nothing connects it to any other
/// network or to the root namespace unless [`Network::link_to`], [`Network::attach_veth`] or
/// [`Network::uplink_host`] is called. All methods are blocking (each runs one to a few `ip`
/// processes, a few milliseconds); from async code call them through
/// `tokio::task::spawn_blocking`, or use the `*_async` probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// The name it was created with.
    pub name: String,
    /// Its network namespace (under `/var/run/netns`).
    pub namespace: String,
    /// The bridge inside the namespace ([`BRIDGE`]).
    pub bridge: String,
    /// Address of the namespace on the bridge, if any.
    pub cidr: Option<Cidr>,
}

impl Network {
    /// Creates the network or brings an existing one to `spec` (idempotent).
    ///
    /// Namespace (`ip netns add`), loopback up, bridge `br0` up, and exactly `spec.cidr` as
    /// global address on the bridge (other global addresses are removed).
    pub fn ensure(spec: &NetworkSpec) -> Result<Network> {
        let ns = sanitize_netns_name(&spec.name)?;
        netns::ensure_namespace(&ns)?;
        let n = Some(ns.as_str());
        if link_info(n, BRIDGE)?.is_none() {
            ip_in(
                n,
                &format!("creating bridge {BRIDGE} in network namespace {ns}"),
                &["link", "add", BRIDGE, "type", "bridge"],
            )?;
        }
        ip_in(
            n,
            &format!("bringing bridge {BRIDGE} up in network namespace {ns}"),
            &["link", "set", BRIDGE, "up"],
        )?;
        set_addr(n, BRIDGE, spec.cidr)?;
        tracing::info!(network = %spec.name, namespace = %ns, cidr = ?spec.cidr, "network ready");
        Ok(Network {
            name: spec.name.clone(),
            namespace: ns,
            bridge: BRIDGE.to_string(),
            cidr: spec.cidr,
        })
    }

    /// Deletes the namespace and so everything inside it (idempotent).
    pub fn destroy(&self) -> Result<()> {
        netns::delete_namespace(&self.namespace)?;
        tracing::info!(network = %self.name, namespace = %self.namespace, "network destroyed");
        Ok(())
    }

    /// Whether the namespace exists.
    pub fn exists(&self) -> bool {
        netns_exists(&self.namespace)
    }

    fn ns(&self) -> Option<&str> {
        Some(&self.namespace)
    }

    /// State of interface `ifname` in this network's namespace, `None` if absent.
    pub fn link_info(&self, ifname: &str) -> Result<Option<LinkInfo>> {
        validate_ifname(ifname)?;
        link_info(self.ns(), ifname)
    }

    /// Creates persistent tap `ifname` in the namespace, a port of the bridge, up (idempotent).
    ///
    /// Run QEMU inside the namespace ([`Network::command`]) with
    /// [`Tap::qemu_netdev`]. Until a process opens the tap it has no carrier.
    pub fn add_tap(&self, ifname: &str) -> Result<Tap> {
        validate_ifname(ifname)?;
        let ns = &self.namespace;
        if link_info(self.ns(), ifname)?.is_none() {
            ip_in(
                self.ns(),
                &format!("creating tap {ifname} in network namespace {ns}"),
                &["tuntap", "add", "dev", ifname, "mode", "tap"],
            )?;
        }
        ip_in(
            self.ns(),
            &format!(
                "attaching tap {ifname} to {} in network namespace {ns}",
                self.bridge
            ),
            &["link", "set", ifname, "master", &self.bridge, "up"],
        )?;
        Ok(Tap {
            namespace: ns.clone(),
            ifname: ifname.to_string(),
            bridge: self.bridge.clone(),
        })
    }

    /// Deletes tap `ifname` (idempotent; also fine if the network is gone).
    pub fn remove_tap(&self, ifname: &str) -> Result<()> {
        validate_ifname(ifname)?;
        delete_link(self.ns(), ifname)
    }

    /// Links this network's bridge to `other`'s with a veth pair named `ifname` at both ends
    /// (idempotent). The two networks become one L2 segment until [`Link::cut`].
    pub fn link_to(&self, other: &Network, ifname: &str) -> Result<Link> {
        validate_ifname(ifname)?;
        let link = Link {
            ifname: ifname.to_string(),
            a: Some(self.namespace.clone()),
            b: Some(other.namespace.clone()),
        };
        create_veth(&link)?;
        enslave(self.ns(), ifname, &self.bridge)?;
        enslave(other.ns(), ifname, &other.bridge)?;
        Ok(link)
    }

    /// Plugs a "machine" into this network: a veth pair `ifname` (same name at both ends), one
    /// end a port of the bridge, the other in namespace `peer_namespace` (`None`: the root
    /// namespace) with address `peer_addr` (idempotent).
    pub fn attach_veth(
        &self,
        ifname: &str,
        peer_namespace: Option<&str>,
        peer_addr: Option<Cidr>,
    ) -> Result<Link> {
        validate_ifname(ifname)?;
        if let Some(p) = peer_namespace {
            if !netns_exists(p) {
                return Err(NetError::NoSuchNamespace {
                    namespace: p.to_string(),
                });
            }
        }
        let link = Link {
            ifname: ifname.to_string(),
            a: Some(self.namespace.clone()),
            b: peer_namespace.map(str::to_string),
        };
        create_veth(&link)?;
        enslave(self.ns(), ifname, &self.bridge)?;
        ip_in(
            peer_namespace,
            &format!("bringing {ifname} up in {}", where_(peer_namespace)),
            &["link", "set", ifname, "up"],
        )?;
        set_addr(peer_namespace, ifname, peer_addr)?;
        Ok(link)
    }

    /// Gives the root namespace (where the appliance runs) address `host_addr` on this
    /// network through veth `host_ifname` (idempotent). Same as
    /// `attach_veth(host_ifname, None, Some(host_addr))`; pick an address in the network's
    /// subnet that nothing else uses, and a name unused in the root namespace.
    pub fn uplink_host(&self, host_ifname: &str, host_addr: Cidr) -> Result<Link> {
        self.attach_veth(host_ifname, None, Some(host_addr))
    }

    /// `ip netns exec NAMESPACE program`: a command that runs `program` in this network
    /// (add arguments with `.arg`). For QEMU: `net.command("qemu-system-x86_64")` plus
    /// `-netdev` [`Tap::qemu_netdev`].
    pub fn command(&self, program: &str) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.namespace, program]);
        c
    }

    /// [`Network::command`] for tokio.
    pub fn tokio_command(&self, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.namespace, program]);
        c
    }

    /// [`crate::in_netns`] in this network's namespace.
    pub fn in_netns<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        netns::in_netns(&self.namespace, f)
    }

    /// [`crate::tcp_check`] from this network's namespace.
    pub fn tcp_check(&self, addr: std::net::SocketAddr, timeout: Duration) -> Result<Duration> {
        netns::tcp_check(&self.namespace, addr, timeout)
    }

    /// [`crate::http_get`] from this network's namespace.
    pub fn http_get(&self, url: &str, timeout: Duration) -> Result<HttpResponse> {
        netns::http_get(&self.namespace, url, timeout)
    }
}

/// A tap device that is a port of a network's bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tap {
    pub namespace: String,
    pub ifname: String,
    pub bridge: String,
}

impl Tap {
    /// The QEMU `-netdev` value for this tap: `tap,id=ID,ifname=IF,script=no,downscript=no`.
    /// QEMU must run inside the namespace (see [`Network::command`]).
    pub fn qemu_netdev(&self, id: &str) -> String {
        format!("tap,id={id},ifname={},script=no,downscript=no", self.ifname)
    }

    /// State of the tap (`carrier` is true while a process such as QEMU has it open).
    pub fn info(&self) -> Result<Option<LinkInfo>> {
        link_info(Some(&self.namespace), &self.ifname)
    }
}

/// A veth pair `ifname` between namespace `a` and namespace `b` (`None`: the root namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub ifname: String,
    pub a: Option<String>,
    pub b: Option<String>,
}

impl Link {
    /// Takes both ends down: no frame crosses until [`Link::restore`].
    pub fn cut(&self) -> Result<()> {
        self.set(false)
    }

    /// Brings both ends up again.
    pub fn restore(&self) -> Result<()> {
        self.set(true)
    }

    fn set(&self, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        for end in [self.a.as_deref(), self.b.as_deref()] {
            ip_in(
                end,
                &format!("setting {} {state} in {}", self.ifname, where_(end)),
                &["link", "set", &self.ifname, state],
            )?;
        }
        Ok(())
    }

    /// Deletes the pair (idempotent; also fine if either namespace is gone).
    pub fn remove(&self) -> Result<()> {
        delete_link(self.a.as_deref(), &self.ifname)?;
        delete_link(self.b.as_deref(), &self.ifname)
    }
}

fn where_(ns: Option<&str>) -> String {
    match ns {
        Some(ns) => format!("network namespace {ns}"),
        None => "the root network namespace".to_string(),
    }
}

fn create_veth(link: &Link) -> Result<()> {
    let (a, b) = (link.a.as_deref(), link.b.as_deref());
    if link_info(a, &link.ifname)?.is_some() {
        return Ok(());
    }
    let mut args = vec!["link", "add", &link.ifname];
    if let Some(a) = a {
        args.extend(["netns", a]);
    }
    args.extend(["type", "veth", "peer", "name", &link.ifname]);
    if let Some(b) = b {
        args.extend(["netns", b]);
    }
    ip(
        &format!(
            "creating veth pair {} between {} and {}",
            link.ifname,
            where_(a),
            where_(b)
        ),
        &args,
    )?;
    Ok(())
}

fn enslave(ns: Option<&str>, ifname: &str, bridge: &str) -> Result<()> {
    ip_in(
        ns,
        &format!("attaching {ifname} to {bridge} in {}", where_(ns)),
        &["link", "set", ifname, "master", bridge, "up"],
    )?;
    Ok(())
}

fn delete_link(ns: Option<&str>, ifname: &str) -> Result<()> {
    if let Some(n) = ns {
        if !netns_exists(n) {
            return Ok(());
        }
    }
    match ip_in(
        ns,
        &format!("deleting {ifname} in {}", where_(ns)),
        &["link", "del", "dev", ifname],
    ) {
        Ok(_) => Ok(()),
        Err(NetError::Ip { stderr, .. })
            if stderr.contains("Cannot find device") || stderr.contains("does not exist") =>
        {
            Ok(())
        }
        Err(NetError::NoSuchNamespace { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Makes `want` the only global address on `ifname`.
fn set_addr(ns: Option<&str>, ifname: &str, want: Option<Cidr>) -> Result<()> {
    let mut present = false;
    for have in global_addrs(ns, ifname)? {
        if want.is_some() && have.parse::<Cidr>().ok() == want {
            present = true;
            continue;
        }
        ip_in(
            ns,
            &format!("removing address {have} from {ifname} in {}", where_(ns)),
            &["addr", "del", &have, "dev", ifname],
        )?;
    }
    if let (Some(want), false) = (want, present) {
        ip_in(
            ns,
            &format!("adding address {want} to {ifname} in {}", where_(ns)),
            &["addr", "add", &want.to_string(), "dev", ifname],
        )?;
    }
    Ok(())
}
