//! Guest operations through the QEMU guest agent: run commands, read facts.

use ferry_adapter::{AResult, AdapterError};
use ferry_model::Nic;
use ferry_qemu::{Qga, Vm};
use std::time::Duration;

const AGENT_TIMEOUT: Duration = Duration::from_secs(20);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// What the guest agent tells about a guest (best effort: empty when it is not there).
#[derive(Debug, Default)]
pub struct GuestInfo {
    pub os: Option<String>,
    /// (MAC, address) pairs of the guest's interfaces, IPv4 only.
    pub ips: Vec<(String, String)>,
    /// (MAC, interface name) as the guest calls them: what a converted guest's
    /// configuration names, kept when its NIC is replaced.
    pub names: Vec<(String, String)>,
}

impl GuestInfo {
    /// The inventory entry of the guest's `index`th NIC, with the addresses the agent
    /// reports for its MAC.
    pub fn nic(&self, index: usize, network: Option<String>, mac: Option<String>) -> Nic {
        let guest_name = self
            .names
            .iter()
            .find(|(m, _)| Some(m) == mac.as_ref())
            .map(|(_, n)| n.clone());
        Nic {
            name: guest_name.unwrap_or_else(|| format!("eth{index}")),
            ips: self
                .ips
                .iter()
                .filter(|(m, _)| Some(m) == mac.as_ref())
                .map(|(_, ip)| ip.clone())
                .collect(),
            network,
            mac,
        }
    }
}

pub struct GuestOps<'a> {
    vm: &'a Vm,
}

/// A connected guest agent.
pub struct Agent {
    name: String,
    qga: Qga,
}

impl std::ops::Deref for Agent {
    type Target = Qga;
    fn deref(&self) -> &Qga {
        &self.qga
    }
}

impl std::ops::DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut Qga {
        &mut self.qga
    }
}

/// Single-quotes `s` for the guest's shell.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl<'a> GuestOps<'a> {
    pub fn new(vm: &'a Vm) -> Self {
        GuestOps { vm }
    }

    pub async fn connect(&self) -> AResult<Agent> {
        let qga = self.vm.qga(AGENT_TIMEOUT).await.map_err(|e| {
            AdapterError::transient(format!("guest agent of VM '{}': {e}", self.vm.name()))
        })?;
        Ok(Agent {
            name: self.vm.name().to_string(),
            qga,
        })
    }

    pub async fn ping(&self) -> AResult<()> {
        let mut a = self.connect().await?;
        a.qga
            .ping()
            .await
            .map_err(|e| AdapterError::transient(format!("guest agent of VM '{}': {e}", a.name)))
    }

    pub async fn info(&self) -> GuestInfo {
        match self.connect().await {
            Ok(a) => info(a).await,
            Err(_) => GuestInfo::default(),
        }
    }
}

/// The OS name and addresses the agent reports (best effort).
pub async fn info(mut a: Agent) -> GuestInfo {
    let mut info = GuestInfo::default();
    if let Ok(v) = a
        .qga
        .execute("guest-get-osinfo", serde_json::Value::Null)
        .await
    {
        info.os = v
            .get("pretty-name")
            .and_then(|x| x.as_str())
            .map(str::to_string);
    }
    if let Ok(v) = a
        .qga
        .execute("guest-network-get-interfaces", serde_json::Value::Null)
        .await
    {
        for iface in v.as_array().into_iter().flatten() {
            let mac = iface["hardware-address"].as_str().unwrap_or_default();
            if iface["name"] == "lo" {
                continue;
            }
            if let Some(name) = iface["name"].as_str() {
                // The guest's word: kept only if it is an interface name at all.
                if !name.is_empty()
                    && name.len() <= 15
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.@:".contains(c))
                {
                    info.names.push((mac.to_string(), name.to_string()));
                }
            }
            for addr in iface["ip-addresses"].as_array().into_iter().flatten() {
                if addr["ip-address-type"] == "ipv4" {
                    if let Some(ip) = addr["ip-address"].as_str() {
                        info.ips.push((mac.to_string(), ip.to_string()));
                    }
                }
            }
        }
    }
    info
}

impl Agent {
    pub fn new(name: &str, qga: Qga) -> Agent {
        Agent {
            name: name.to_string(),
            qga,
        }
    }

    /// Runs `command` with `/bin/sh -c` in the guest; its standard output when it exits 0.
    pub async fn shell(&mut self, command: &str) -> AResult<String> {
        let r = self
            .qga
            .shell(command, COMMAND_TIMEOUT)
            .await
            .map_err(|e| {
                AdapterError::transient(format!("guest agent of VM '{}': {e}", self.name))
            })?;
        if !r.success() {
            return Err(AdapterError::permanent(format!(
                "`{command}` in VM '{}' exited with {}: {}",
                self.name,
                r.exit_code,
                r.stderr_lossy().trim()
            )));
        }
        Ok(r.stdout_lossy())
    }
}
