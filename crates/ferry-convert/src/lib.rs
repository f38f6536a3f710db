//! Guest conversion: a disk installed on other hardware (a VMware guest: PVSCSI disks,
//! VMXNET3 NICs, VMware Tools, an initramfs with only those drivers) made to boot on
//! KVM's virtio devices with its network identity kept.
//!
//! The field's tools do the work, driven from here: libguestfs' inspection says what the
//! guest is, `virt-v2v-in-place` converts it (virtio drivers into the initramfs, VMware
//! Tools removed, device names in fstab and the boot loader rewritten), and a libguestfs
//! appliance (`guestfish`) reads the guest's network configuration and pins each source
//! NIC's interface name to the MAC address of the NIC that replaces it.
//!
//! Conversion only ever writes into a qcow2 overlay above the synced disk
//! ([`create_overlay`]): the synced generation stays byte-equal to the source, deltas
//! keep applying after a test boot, and a rollback leaves nothing converted behind.
//! Disk formats are always stated (`-F`, `--format`, the domain's `driver type`), never
//! guessed from bytes the guest controls.

mod domain;
mod guestfish;
pub mod netconf;
pub mod prepare;
mod run;
pub mod step;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use netconf::{ConfigKind, ConfiguredNic};
pub use prepare::{missing_tools, prepare, BootRequest, Policy, PrepareError, Prepared};
pub use run::Tools;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{tool} is not installed: `apt-get install virt-v2v libguestfs-tools` (or `bash scripts/install-deps.sh`) installs it on the appliance's machine")]
    ToolMissing { tool: String },
    /// The guest is not one the tools can convert (no OS found, no boot loader, an OS
    /// virt-v2v does not know): with `conversion = "auto"` it boots unconverted.
    #[error("the guest cannot be converted: {why}")]
    NotConvertible { why: String },
    #[error("{tool} failed: {why} (its full output is in {})", log.display())]
    Failed {
        tool: String,
        why: String,
        log: PathBuf,
    },
    #[error("{tool} did not finish within {secs} s and was stopped (its output so far is in {})", log.display())]
    Timeout {
        tool: String,
        secs: u64,
        log: PathBuf,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ConvertError {
    /// Whether trying again may help (a tool that ran out of time or could not run on a
    /// busy machine); a guest that cannot be converted stays so.
    pub fn is_transient(&self) -> bool {
        matches!(self, ConvertError::Timeout { .. } | ConvertError::Io { .. })
    }
}

/// The format of an image, always stated to the tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        })
    }
}

/// A disk of the guest to convert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDisk {
    pub path: PathBuf,
    pub format: ImageFormat,
}

/// A NIC of the guest: the source's, and the one that replaces it on the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNic {
    /// The MAC the guest had on its source (lower case), if known.
    pub source_mac: Option<String>,
    /// The interface name the guest gave it on the source, if the inventory knows it.
    pub source_name: Option<String>,
    /// The MAC of the NIC that replaces it on the target.
    pub target_mac: String,
}

/// What to convert.
#[derive(Debug, Clone)]
pub struct Request {
    /// The guest's name (for the tools' messages).
    pub name: String,
    /// The qcow2 overlays to convert, in the guest's disk order.
    pub disks: Vec<GuestDisk>,
    pub nics: Vec<GuestNic>,
    /// Where logs and the generated domain description go.
    pub work_dir: PathBuf,
}

/// What inspection found (libguestfs' own inspection of the guest's file systems).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspection {
    /// `linux`, `windows`, …
    pub os_type: Option<String>,
    pub distro: Option<String>,
    pub product_name: Option<String>,
    pub osinfo: Option<String>,
    pub major_version: Option<String>,
    pub minor_version: Option<String>,
    pub arch: Option<String>,
    pub package_format: Option<String>,
    /// `bios` or `uefi`.
    pub firmware: Option<String>,
    /// The boot loader the guest has (`grub2`, …), from its configuration files.
    pub bootloader: Option<String>,
    pub took_ms: u64,
}

impl Inspection {
    /// "Debian GNU/Linux 12 (bookworm), x86_64, bios".
    pub fn summary(&self) -> String {
        // Debian's "product name" is its version alone ("12.15"): the distribution goes
        // in front of a name that does not say it.
        let distro = self.distro.as_deref().map(|d| {
            let mut c = d.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        });
        let os = match (distro, self.product_name.clone()) {
            (Some(d), Some(p)) if !p.to_ascii_lowercase().contains(&d.to_ascii_lowercase()) => {
                format!("{d} {p}")
            }
            (_, Some(p)) => p,
            (Some(d), None) => d,
            (None, None) => self
                .os_type
                .clone()
                .unwrap_or_else(|| "an unknown OS".into()),
        };
        let mut parts = vec![os];
        parts.extend(self.arch.clone());
        parts.extend(self.firmware.clone());
        parts.join(", ")
    }

    pub fn is_windows(&self) -> bool {
        self.os_type.as_deref() == Some("windows")
    }
}

/// A NIC's name pinned to its new MAC, and the configuration that names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedNic {
    pub name: String,
    pub target_mac: String,
    /// The `.link` file written into the guest.
    pub link_file: String,
    /// How the source NIC's name was found.
    pub found_by: String,
    /// Its static addresses in the guest's configuration.
    pub addresses: Vec<String>,
}

/// What a conversion did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub inspection: Inspection,
    /// Every interface the guest's configuration names.
    pub configured: Vec<ConfiguredNic>,
    pub pinned: Vec<PinnedNic>,
    /// Configuration files that matched a NIC by its old MAC, rewritten for the new one.
    pub rewritten: Vec<String>,
    /// What virt-v2v said it changed, in its words.
    pub changes: Vec<String>,
    /// Things worth a warning (a NIC whose name was guessed, an address not found).
    pub warnings: Vec<String>,
    pub inspect_ms: u64,
    pub network_ms: u64,
    pub convert_ms: u64,
    pub log: PathBuf,
}

impl Report {
    /// Static addresses the guest configured: each must answer on the target.
    pub fn static_addresses(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .configured
            .iter()
            .flat_map(|n| n.addresses.iter().cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Creates `overlay`, a qcow2 v3 image (`compat=1.1`: what VME's incremental backups
/// need) whose backing file is `base` with its format stated.
pub async fn create_overlay(base: &GuestDisk, overlay: &Path) -> Result<(), ConvertError> {
    let base_abs = std::path::absolute(&base.path).map_err(|e| ConvertError::Io {
        what: "resolving",
        path: base.path.clone(),
        source: e,
    })?;
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "compat=1.1", "-F"])
        .arg(base.format.to_string())
        .arg("-b")
        .arg(&base_abs)
        .arg(overlay)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    // An overlay is a few KiB of metadata: a minute means the storage is stuck.
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), out)
        .await
        .map_err(|_| ConvertError::Failed {
            tool: "qemu-img create".into(),
            why: "did not finish within 60 s and was stopped".into(),
            log: overlay.to_path_buf(),
        })?
        .map_err(|e| ConvertError::Io {
            what: "running qemu-img for",
            path: overlay.to_path_buf(),
            source: e,
        })?;
    if !out.status.success() {
        return Err(ConvertError::Failed {
            tool: "qemu-img create".into(),
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            log: overlay.to_path_buf(),
        });
    }
    Ok(())
}

fn log_path(req: &Request) -> PathBuf {
    req.work_dir.join("conversion.log")
}

async fn write_domain(req: &Request) -> Result<PathBuf, ConvertError> {
    tokio::fs::create_dir_all(&req.work_dir)
        .await
        .map_err(|e| ConvertError::Io {
            what: "creating",
            path: req.work_dir.clone(),
            source: e,
        })?;
    let xml = domain::libvirt_xml(&req.name, &req.disks, &req.nics);
    let path = req.work_dir.join("source-domain.xml");
    tokio::fs::write(&path, xml)
        .await
        .map_err(|e| ConvertError::Io {
            what: "writing",
            path: path.clone(),
            source: e,
        })?;
    Ok(path)
}

/// Inspects, pins the network identity, and converts the overlays in place.
pub async fn convert(tools: &Tools, req: &Request) -> Result<Report, ConvertError> {
    let log = log_path(req);
    tokio::fs::create_dir_all(&req.work_dir)
        .await
        .map_err(|e| ConvertError::Io {
            what: "creating",
            path: req.work_dir.clone(),
            source: e,
        })?;
    let _ = tokio::fs::remove_file(&log).await;
    let mut report = Report {
        log: log.clone(),
        ..Report::default()
    };
    // One libguestfs appliance for inspection and the network: under software emulation
    // each boot of one costs half a minute. virt-v2v-inspector is not used, because it
    // runs a whole conversion into a throwaway overlay to report what it would do
    // (172 s under TCG on the test guest): what it prints is what virt-v2v-in-place
    // prints anyway. The network goes first: the .link files must be in place when
    // virt-v2v rebuilds the initramfs, whose udev names the NICs before the root is
    // mounted.
    let t = Instant::now();
    let g = match guestfish::Guestfish::open(tools, &req.disks, &log).await? {
        Ok(g) => g,
        Err(why) => return Err(ConvertError::NotConvertible { why }),
    };
    report.inspection = g.inspect().await?;
    report.inspection.took_ms = ms(t.elapsed());
    report.inspect_ms = ms(t.elapsed());
    if report.inspection.is_windows() && std::env::var_os("VIRTIO_WIN").is_none() {
        g.close().await?;
        return Err(ConvertError::NotConvertible {
            why: "a Windows guest needs the virtio-win drivers (VIRTIO_WIN) and rhsrvany, which this appliance does not have".into(),
        });
    }
    stable_device_names(&g, &mut report).await?;
    let t = Instant::now();
    pin_network(&g, req, &mut report).await?;
    g.close().await?;
    report.network_ms = ms(t.elapsed());

    let t = Instant::now();
    let dom = write_domain(req).await?;
    let ran = tools
        .run(
            "virt-v2v-in-place",
            &["-i".as_ref(), "libvirtxml".as_ref(), dom.as_os_str()],
            &log,
        )
        .await?;
    report.convert_ms = ms(t.elapsed());
    if !ran.status.success() {
        let why = run::error_line(&ran.output);
        return Err(if not_convertible(&why) {
            ConvertError::NotConvertible { why }
        } else {
            ConvertError::Failed {
                tool: "virt-v2v-in-place".into(),
                why,
                log,
            }
        });
    }
    report.changes.extend(changes(&ran.output));
    Ok(report)
}

/// Files that name the root and other file systems by device.
const DEVICE_NAME_FILES: &[&str] = &[
    "/etc/fstab",
    "/etc/default/grub",
    "/boot/grub/grub.cfg",
    "/boot/grub2/grub.cfg",
    "/boot/grub/menu.lst",
];

/// Replaces SCSI device names (`/dev/sda1`) in fstab and the boot loader's configuration
/// with `UUID=…` of the file system on them. On virtio the disk is `/dev/vda`, and
/// virt-v2v could not always rewrite Debian's GRUB configuration itself ("could not
/// determine a way to update the configuration of Grub2"); a UUID names the same file
/// system on any bus. The guest's SCSI disks are in its disk order, as the appliance's
/// are, so `/dev/sdb2` there is `/dev/sdb2` here.
async fn stable_device_names(
    g: &guestfish::Guestfish,
    report: &mut Report,
) -> Result<(), ConvertError> {
    let mut uuids: Vec<(String, String)> = vec![];
    for line in g.list_filesystems().await? {
        let (dev, _fs) = line;
        if !dev.starts_with("/dev/sd") {
            continue;
        }
        if let Some(u) = g.vfs_uuid(&dev).await? {
            uuids.push((dev, u));
        }
    }
    // /dev/sda10 before /dev/sda1.
    uuids.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
    for f in DEVICE_NAME_FILES {
        let Some(text) = g.read(f).await? else {
            continue;
        };
        let (new, changed) = replace_devices(&text, &uuids);
        if !changed.is_empty() {
            g.write(f, &new).await?;
            report
                .changes
                .push(format!("{f}: {} named by UUID", changed.join(", ")));
        }
    }
    Ok(())
}

/// `text` with each whole device name of `uuids` replaced by `UUID=…`; the names changed.
fn replace_devices(text: &str, uuids: &[(String, String)]) -> (String, Vec<String>) {
    let mut out = text.to_string();
    let mut changed = vec![];
    for (dev, uuid) in uuids {
        let mut result = String::with_capacity(out.len());
        let mut rest = out.as_str();
        let mut hit = false;
        while let Some(i) = rest.find(dev.as_str()) {
            let after = &rest[i + dev.len()..];
            let whole = !after
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric());
            result.push_str(&rest[..i]);
            if whole {
                result.push_str(&format!("UUID={uuid}"));
                hit = true;
            } else {
                result.push_str(dev);
            }
            rest = after;
        }
        result.push_str(rest);
        out = result;
        if hit {
            changed.push(dev.clone());
        }
    }
    (out, changed)
}

/// virt-v2v's words for a guest it cannot convert (as opposed to a failure to run).
fn not_convertible(why: &str) -> bool {
    let w = why.to_ascii_lowercase();
    [
        "inspection",
        "not supported",
        "unsupported",
        "no bootloader",
        "no root device",
        "multi-boot",
        "not a linux or windows",
        "no kernels",
    ]
    .iter()
    .any(|p| w.contains(p))
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// virt-v2v's progress lines (`[  12.3] Converting Debian … to run on KVM`) and its
/// statements about the guest, without timestamps.
fn changes(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            if let Some(rest) = l.strip_prefix('[') {
                let (_, msg) = rest.split_once(']')?;
                Some(msg.trim().to_string())
            } else {
                l.strip_prefix("virt-v2v-in-place: ")
                    .filter(|m| !m.starts_with("error"))
                    .map(|m| m.trim().to_string())
            }
        })
        .filter(|m| !m.is_empty())
        .collect()
}

/// Reads the guest's network configuration and writes, for each source NIC, a systemd
/// `.link` file giving the interface that replaces it its old name; configuration that
/// matches a NIC by its old MAC is rewritten for the new one.
async fn pin_network(
    g: &guestfish::Guestfish,
    req: &Request,
    report: &mut Report,
) -> Result<(), ConvertError> {
    let mut files: Vec<String> = netconf::CONFIG_FILES
        .iter()
        .map(|s| s.to_string())
        .collect();
    for dir in netconf::CONFIG_DIRS {
        if g.is_dir(dir).await? {
            for n in g.ls(dir).await? {
                files.push(format!("{dir}/{n}"));
            }
        }
    }
    let mut texts = vec![];
    for f in files {
        if let Some(text) = g.read(&f).await? {
            report.configured.extend(netconf::parse(&f, &text));
            texts.push((f, text));
        }
    }
    let plan = plan_pins(&req.nics, &report.configured);
    report.warnings.extend(plan.warnings);
    for (file, from, to) in &plan.rewrites {
        if let Some((_, text)) = texts.iter().find(|(f, _)| f == file) {
            let new = replace_mac(text, from, to);
            if new != *text {
                g.write(file, &new).await?;
                report.rewritten.push(file.clone());
            }
        }
    }
    for p in plan.pins {
        let content = format!(
            "# Written by Ferry when it converted this guest: the NIC it knew as {name} on its\n\
             # source is now the one with this MAC address, and keeps its name.\n\
             [Match]\nMACAddress={mac}\n\n[Link]\nName={name}\n",
            name = p.name,
            mac = p.target_mac
        );
        g.write(&p.link_file, &content).await?;
        report.pinned.push(p);
    }
    Ok(())
}

struct Plan {
    pins: Vec<PinnedNic>,
    /// (file, old MAC, new MAC)
    rewrites: Vec<(String, String, String)>,
    warnings: Vec<String>,
}

/// Which name each target NIC must carry, decided from the guest's configuration and
/// the inventory: a configuration matching by MAC names it (and is rewritten for the new
/// MAC), else the name the inventory recorded, else — one NIC, one configured name —
/// that name.
fn plan_pins(nics: &[GuestNic], configured: &[ConfiguredNic]) -> Plan {
    let mut plan = Plan {
        pins: vec![],
        rewrites: vec![],
        warnings: vec![],
    };
    let by_name: Vec<&ConfiguredNic> = configured
        .iter()
        .filter(|c| c.name.is_some() && c.mac.is_none())
        .collect();
    let mut names: Vec<String> = by_name.iter().filter_map(|c| c.name.clone()).collect();
    names.dedup();
    for (i, n) in nics.iter().enumerate() {
        let target = n.target_mac.to_ascii_lowercase();
        let by_mac: Vec<&ConfiguredNic> = configured
            .iter()
            .filter(|c| c.mac.is_some() && c.mac == n.source_mac)
            .collect();
        for c in &by_mac {
            if let Some(old) = &n.source_mac {
                if *old != target {
                    plan.rewrites
                        .push((c.file.clone(), old.clone(), target.clone()));
                }
            }
        }
        let (name, found_by) = if let Some(name) = by_mac.iter().find_map(|c| c.name.clone()) {
            (name, "its configuration matches its MAC".to_string())
        } else if let Some(name) = n.source_name.clone().filter(|s| names.contains(s)) {
            (name, "the inventory's interface name".to_string())
        } else if nics.len() == 1 && names.len() == 1 {
            (
                names[0].clone(),
                "the only interface its configuration names".to_string(),
            )
        } else if let Some(name) = names.get(i).filter(|_| nics.len() == names.len()) {
            plan.warnings.push(format!(
                "NIC {i} ({}) was taken to be '{name}' by order: neither the guest's configuration nor the inventory ties a name to it",
                n.source_mac.as_deref().unwrap_or("no MAC")
            ));
            (
                name.clone(),
                "the order of the configured interfaces".to_string(),
            )
        } else {
            if by_mac.is_empty() {
                plan.warnings.push(format!(
                    "NIC {i} ({}): no configuration in the guest names it; it keeps whatever name the target's hardware gives it",
                    n.source_mac.as_deref().unwrap_or("no MAC")
                ));
            }
            continue;
        };
        let addresses = configured
            .iter()
            .filter(|c| {
                c.name.as_deref() == Some(name.as_str())
                    || (c.mac.is_some() && c.mac == n.source_mac)
            })
            .flat_map(|c| c.addresses.iter().cloned())
            .collect();
        plan.pins.push(PinnedNic {
            link_file: format!("/etc/systemd/network/10-ferry-{name}.link"),
            name,
            target_mac: target,
            found_by,
            addresses,
        });
    }
    plan
}

/// `text` with every spelling of MAC `from` (upper or lower case, ':' or '-') replaced.
fn replace_mac(text: &str, from: &str, to: &str) -> String {
    let mut out = text.to_string();
    for sep in [":", "-"] {
        let f = from.replace(':', sep);
        for variant in [f.to_ascii_lowercase(), f.to_ascii_uppercase()] {
            out = out.replace(&variant, &to.replace(':', sep));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(name: &str, mac: Option<&str>, addr: &str) -> ConfiguredNic {
        ConfiguredNic {
            file: "/etc/network/interfaces".into(),
            kind: ConfigKind::Ifupdown,
            name: Some(name.into()),
            mac: mac.map(str::to_string),
            addresses: vec![addr.into()],
            gateway: None,
            dns: vec![],
            dhcp: false,
        }
    }

    #[test]
    fn one_nic_one_name_is_pinned_to_the_new_mac() {
        let p = plan_pins(
            &[GuestNic {
                source_mac: Some("00:50:56:00:00:01".into()),
                source_name: None,
                target_mac: "52:54:00:AA:00:01".into(),
            }],
            &[nic("ens192", None, "10.0.0.5/24")],
        );
        assert_eq!(p.pins.len(), 1);
        assert_eq!(p.pins[0].name, "ens192");
        assert_eq!(p.pins[0].target_mac, "52:54:00:aa:00:01");
        assert_eq!(
            p.pins[0].link_file,
            "/etc/systemd/network/10-ferry-ens192.link"
        );
        assert_eq!(p.pins[0].addresses, vec!["10.0.0.5/24"]);
        assert!(p.warnings.is_empty() && p.rewrites.is_empty());
    }

    #[test]
    fn a_configuration_by_mac_is_rewritten_and_names_win() {
        let nics = [
            GuestNic {
                source_mac: Some("00:50:56:00:00:01".into()),
                source_name: None,
                target_mac: "52:54:00:00:00:01".into(),
            },
            GuestNic {
                source_mac: Some("00:50:56:00:00:02".into()),
                source_name: Some("ens224".into()),
                target_mac: "52:54:00:00:00:02".into(),
            },
        ];
        let mut by_mac = nic("lan0", Some("00:50:56:00:00:01"), "10.0.0.5/24");
        by_mac.file = "/etc/netplan/1.yaml".into();
        let p = plan_pins(
            &nics,
            &[
                by_mac,
                nic("ens224", None, "10.1.0.5/24"),
                nic("ens256", None, "10.2.0.5/24"),
            ],
        );
        assert_eq!(p.pins.len(), 2, "{:?}", p.warnings);
        assert_eq!(p.pins[0].name, "lan0");
        assert_eq!(p.pins[1].name, "ens224");
        assert_eq!(
            p.rewrites,
            vec![(
                "/etc/netplan/1.yaml".into(),
                "00:50:56:00:00:01".into(),
                "52:54:00:00:00:01".into()
            )]
        );
        assert_eq!(
            replace_mac(
                "macaddress: 00:50:56:00:00:01 HWADDR=00-50-56-00-00-01",
                "00:50:56:00:00:01",
                "52:54:00:00:00:01"
            ),
            "macaddress: 52:54:00:00:00:01 HWADDR=52-54-00-00-00-01"
        );
    }

    #[test]
    fn an_unnamed_nic_is_a_warning_not_a_guess() {
        let p = plan_pins(
            &[
                GuestNic {
                    source_mac: None,
                    source_name: None,
                    target_mac: "52:54:00:00:00:01".into(),
                },
                GuestNic {
                    source_mac: None,
                    source_name: None,
                    target_mac: "52:54:00:00:00:02".into(),
                },
            ],
            &[nic("ens192", None, "10.0.0.5/24")],
        );
        assert!(p.pins.is_empty());
        assert_eq!(p.warnings.len(), 2);
    }

    #[test]
    fn device_names_become_uuids_whole_names_only() {
        let u = vec![
            ("/dev/sda10".to_string(), "u10".to_string()),
            ("/dev/sda1".to_string(), "u1".to_string()),
        ];
        let (t, c) = replace_devices(
            "/dev/sda1 / ext4 defaults 0 1\n/dev/sda10 /srv ext4 defaults 0 2\nlinux /vmlinuz root=/dev/sda1 ro\n/dev/sda1x\n",
            &u,
        );
        assert_eq!(
            t,
            "UUID=u1 / ext4 defaults 0 1\nUUID=u10 /srv ext4 defaults 0 2\nlinux /vmlinuz root=UUID=u1 ro\n/dev/sda1x\n"
        );
        assert_eq!(c, vec!["/dev/sda10", "/dev/sda1"]);
    }

    #[test]
    fn changes_are_virt_v2vs_own_lines() {
        let out = "[   0.0] Setting up the source: -i libvirtxml x.xml\n[  12.5] Converting Debian GNU/Linux 12 (bookworm) to run on KVM\nvirt-v2v-in-place: This guest has virtio drivers installed.\n[ 100.1] Finishing off\n";
        let c = changes(out);
        assert_eq!(
            c[1],
            "Converting Debian GNU/Linux 12 (bookworm) to run on KVM"
        );
        assert_eq!(c[2], "This guest has virtio drivers installed.");
    }
}
