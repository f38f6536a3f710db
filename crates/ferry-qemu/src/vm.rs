//! A QEMU virtual machine that runs detached from whoever started it.
//!
//! QEMU daemonizes (`-daemonize -pidfile`), so an appliance that is SIGKILLed or
//! restarted does not take its VMs down; everything needed to find the VM again
//! lives in its run directory (pid file, QMP and agent sockets, serial log, the
//! spec it was started with), and [`Vm::attach`] picks it up from there.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::Command;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::accel::Accel;
use crate::qga::{Qga, QgaError};
use crate::qmp::{Qmp, QmpError};

const QMP_SOCK: &str = "qmp.sock";
const QGA_SOCK: &str = "qga.sock";
const SERIAL_LOG: &str = "serial.log";
const PID_FILE: &str = "qemu.pid";
const SPEC_FILE: &str = "vm.json";
const STDERR_LOG: &str = "qemu-stderr.log";
/// sun_path is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Errors about a VM's life cycle.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid VM spec for {vm:?}: {why}")]
    BadSpec { vm: String, why: String },
    #[error("VM {vm} is already running (pid {pid}, run directory {})", run_dir.display())]
    AlreadyRunning {
        vm: String,
        pid: u32,
        run_dir: PathBuf,
    },
    #[error("QEMU failed to start VM {vm} ({status}): {stderr}")]
    LaunchFailed {
        vm: String,
        status: String,
        stderr: String,
    },
    #[error("no running VM in {}: {why}", run_dir.display())]
    NotRunning { run_dir: PathBuf, why: String },
    #[error(
        "VM {vm} exited while waiting for {marker:?} on its serial console; last output: {tail}"
    )]
    ExitedWhileWaiting {
        vm: String,
        marker: String,
        tail: String,
    },
    #[error("VM {vm} did not print {marker:?} on its serial console within {secs}s; last output: {tail}")]
    SerialTimeout {
        vm: String,
        marker: String,
        secs: u64,
        tail: String,
    },
    #[error("VM {vm} (pid {pid}) is still running after SIGKILL")]
    Unkillable { vm: String, pid: u32 },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Qga(#[from] QgaError),
}

/// A disk of a VM: `-blockdev` file node `<node_name>-file`, format node
/// `<node_name>`, guest device (per the VM's [`Hardware`]) with qdev id `<node_name>-dev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisk {
    pub path: PathBuf,
    /// `qcow2` or `raw` (dirty bitmaps need qcow2).
    pub format: String,
    pub node_name: String,
    #[serde(default)]
    pub read_only: bool,
}

impl VmDisk {
    /// The qdev id of the guest device.
    pub fn device_id(&self) -> String {
        format!("{}-dev", self.node_name)
    }
}

/// How a NIC reaches the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NicBackend {
    /// An existing tap device (created by the caller, in `netns` if one is set).
    Tap { ifname: String },
    /// QEMU user networking with `restrict=on`: no route out; a self-contained
    /// network for tests.
    RestrictedUser,
}

/// A NIC (virtio-net, or what the VM's [`Hardware`] says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNic {
    pub backend: NicBackend,
    /// `52:54:00:..`; QEMU picks one if absent.
    pub mac: Option<String>,
}

/// The devices a guest sees. A guest converted for KVM runs on `Virtio`; `Vmware` is what a
/// guest installed on vSphere was built for (its initramfs may hold only those drivers),
/// so the test bed can run such a guest; `Emulated` is what nearly every OS can boot
/// without drivers of its own, the fallback for a guest that cannot be converted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hardware {
    /// virtio-blk disks, virtio-net NICs.
    #[default]
    Virtio,
    /// A PVSCSI controller with SCSI disks, VMXNET3 NICs, VMware's SMBIOS vendor strings.
    Vmware,
    /// SATA (AHCI) disks, e1000e NICs.
    Emulated,
}

impl Hardware {
    pub fn as_str(self) -> &'static str {
        match self {
            Hardware::Virtio => "virtio",
            Hardware::Vmware => "vmware",
            Hardware::Emulated => "emulated",
        }
    }
}

impl std::fmt::Display for Hardware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Hardware {
    type Err = String;
    fn from_str(s: &str) -> Result<Hardware, String> {
        match s {
            "virtio" => Ok(Hardware::Virtio),
            "vmware" => Ok(Hardware::Vmware),
            "emulated" => Ok(Hardware::Emulated),
            other => Err(format!(
                "unknown hardware {other:?} (virtio, vmware or emulated)"
            )),
        }
    }
}

/// PCI slot of the first NIC with `Hardware::Vmware`, the next ones after it: fixed, so
/// the guest's predictable interface names (`enp0s5`, …) stay the same on every boot, as
/// they do on a vSphere VM.
pub const VMWARE_FIRST_NIC_SLOT: u8 = 5;

/// Everything needed to start a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Direct kernel boot; without one the firmware boots from the disks.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    pub disks: Vec<VmDisk>,
    pub nics: Vec<VmNic>,
    /// Run QEMU inside this network namespace (`ip netns exec NS`).
    pub netns: Option<String>,
    /// Holds qmp.sock, qga.sock, serial.log, qemu.pid, vm.json.
    pub run_dir: PathBuf,
    pub accel: Accel,
    /// Start with the CPUs stopped (`-S`); `cont` over QMP starts them.
    #[serde(default)]
    pub paused: bool,
    /// Exit instead of rebooting (`-no-reboot`).
    #[serde(default)]
    pub no_reboot: bool,
    #[serde(default = "default_qemu")]
    pub qemu_binary: PathBuf,
    /// The devices the guest sees (virtio unless said otherwise).
    #[serde(default)]
    pub hardware: Hardware,
}

fn default_qemu() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}

impl VmSpec {
    /// A spec with defaults (1 CPU, 512 MiB, no disks or NICs).
    pub fn new(name: &str, run_dir: &Path, accel: Accel) -> VmSpec {
        VmSpec {
            name: name.to_string(),
            memory_mib: 512,
            cpus: 1,
            kernel: None,
            initrd: None,
            append: None,
            disks: Vec::new(),
            nics: Vec::new(),
            netns: None,
            run_dir: run_dir.to_path_buf(),
            accel,
            paused: false,
            no_reboot: false,
            qemu_binary: default_qemu(),
            hardware: Hardware::Virtio,
        }
    }

    /// Check the spec without starting anything.
    pub fn validate(&self) -> Result<(), VmError> {
        let bad = |why: String| {
            Err(VmError::BadSpec {
                vm: self.name.clone(),
                why,
            })
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return bad(
                "the name must be non-empty and use only letters, digits, '-', '_', '.'".into(),
            );
        }
        if self.memory_mib < 16 {
            return bad(format!(
                "memory_mib {} is too small (at least 16)",
                self.memory_mib
            ));
        }
        if self.cpus == 0 || self.cpus > 255 {
            return bad(format!("cpus {} must be between 1 and 255", self.cpus));
        }
        if let Some(k) = &self.kernel {
            if !k.is_file() {
                return bad(format!("kernel {} does not exist", k.display()));
            }
        }
        match (&self.initrd, &self.kernel) {
            (Some(_), None) => return bad("an initrd needs a kernel".into()),
            (Some(i), Some(_)) if !i.is_file() => {
                return bad(format!("initrd {} does not exist", i.display()))
            }
            _ => {}
        }
        if self.append.is_some() && self.kernel.is_none() {
            return bad("a kernel command line (append) needs a kernel".into());
        }
        let most = match self.hardware {
            Hardware::Virtio => usize::MAX,
            Hardware::Vmware => 15,
            Hardware::Emulated => 6,
        };
        if self.disks.len() > most {
            return bad(format!(
                "{} disks do not fit the {} hardware (at most {most})",
                self.disks.len(),
                self.hardware
            ));
        }
        if self.hardware == Hardware::Vmware && self.nics.len() > 8 {
            return bad(format!(
                "{} NICs do not fit the vmware hardware (at most 8)",
                self.nics.len()
            ));
        }
        let mut names = std::collections::HashSet::new();
        for d in &self.disks {
            if !d.path.is_file() {
                return bad(format!("disk {} does not exist", d.path.display()));
            }
            if !matches!(d.format.as_str(), "qcow2" | "raw") {
                return bad(format!(
                    "disk {}: format {:?} is not supported (qcow2 or raw)",
                    d.path.display(),
                    d.format
                ));
            }
            // QEMU ids: a letter first, then letters, digits, '-', '_', '.'; at most
            // 31 bytes, and "<node>-file" must fit too.
            if !valid_qemu_id(&d.node_name) || d.node_name.len() > 26 {
                return bad(format!(
                    "disk node name {:?} must start with a letter, use letters, digits, '-', '_' and be at most 26 characters",
                    d.node_name
                ));
            }
            if !names.insert(d.node_name.as_str()) {
                return bad(format!("disk node name {:?} is used twice", d.node_name));
            }
        }
        for n in &self.nics {
            if let NicBackend::Tap { ifname } = &n.backend {
                if ifname.is_empty() || ifname.len() > 15 || ifname.contains([',', '/', ' ']) {
                    return bad(format!("tap interface name {ifname:?} is not valid"));
                }
            }
            if let Some(mac) = &n.mac {
                if !valid_mac(mac) {
                    return bad(format!(
                        "MAC address {mac:?} is not valid (xx:xx:xx:xx:xx:xx)"
                    ));
                }
            }
        }
        if let Some(ns) = &self.netns {
            if ns.is_empty() || ns.contains(['/', ' ']) {
                return bad(format!("network namespace name {ns:?} is not valid"));
            }
        }
        let longest = self.run_dir.join(QMP_SOCK);
        if longest.as_os_str().len() > MAX_SOCKET_PATH {
            return bad(format!(
                "run directory {} is too long for a Unix socket path (at most {} bytes with {QMP_SOCK})",
                self.run_dir.display(),
                MAX_SOCKET_PATH
            ));
        }
        if self.run_dir.to_string_lossy().contains(',') {
            return bad("the run directory must not contain ',' (QEMU option syntax)".into());
        }
        Ok(())
    }

    /// The QEMU command line (without the `ip netns exec` prefix).
    pub fn qemu_args(&self) -> Vec<String> {
        let rd = |f: &str| self.run_dir.join(f).to_string_lossy().into_owned();
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        push(&["-name", &format!("{},debug-threads=on", self.name)]);
        push(&["-machine", "q35", "-accel", self.accel.as_str()]);
        if self.accel == Accel::Kvm {
            push(&["-cpu", "host"]);
        }
        push(&["-m", &self.memory_mib.to_string()]);
        push(&["-smp", &self.cpus.to_string()]);
        // No default devices (CD-ROM, NIC, monitor): only what the spec says.
        push(&["-nodefaults", "-display", "none", "-vga", "none"]);
        push(&["-daemonize", "-pidfile", &rd(PID_FILE)]);
        push(&["-serial", &format!("file:{}", rd(SERIAL_LOG))]);
        push(&["-qmp", &format!("unix:{},server=on,wait=off", rd(QMP_SOCK))]);
        push(&["-device", "virtio-serial-pci,id=vser0"]);
        push(&[
            "-chardev",
            &format!("socket,id=qga0,path={},server=on,wait=off", rd(QGA_SOCK)),
        ]);
        push(&[
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
        if let Some(k) = &self.kernel {
            push(&["-kernel", &k.to_string_lossy()]);
        }
        if let Some(i) = &self.initrd {
            push(&["-initrd", &i.to_string_lossy()]);
        }
        if let Some(ap) = &self.append {
            push(&["-append", ap]);
        }
        match self.hardware {
            Hardware::Vmware => {
                push(&[
                    "-smbios",
                    "type=1,manufacturer=VMware,, Inc.,product=VMware Virtual Platform",
                ]);
                if !self.disks.is_empty() {
                    push(&["-device", "pvscsi,id=scsi0"]);
                }
            }
            Hardware::Virtio | Hardware::Emulated => {}
        }
        for (i, d) in self.disks.iter().enumerate() {
            let ro = if d.read_only { "on" } else { "off" };
            push(&[
                "-blockdev",
                &format!(
                    "driver=file,node-name={n}-file,filename={p},read-only={ro}",
                    n = d.node_name,
                    p = d.path.to_string_lossy().replace(',', ",,")
                ),
            ]);
            push(&[
                "-blockdev",
                &format!(
                    "driver={f},node-name={n},file={n}-file,read-only={ro}",
                    f = d.format,
                    n = d.node_name
                ),
            ]);
            let boot = if self.kernel.is_none() {
                format!(",bootindex={i}")
            } else {
                String::new()
            };
            let (n, id) = (&d.node_name, d.device_id());
            push(&[
                "-device",
                &match self.hardware {
                    Hardware::Virtio => format!("virtio-blk-pci,drive={n},id={id}{boot}"),
                    Hardware::Vmware => {
                        format!("scsi-hd,bus=scsi0.0,scsi-id={i},drive={n},id={id}{boot}")
                    }
                    // q35's built-in AHCI controller has six ports, ide.0 … ide.5.
                    Hardware::Emulated => format!("ide-hd,bus=ide.{i},drive={n},id={id}{boot}"),
                },
            ]);
        }
        for (i, n) in self.nics.iter().enumerate() {
            let netdev = match &n.backend {
                NicBackend::Tap { ifname } => {
                    format!("tap,id=net{i},ifname={ifname},script=no,downscript=no")
                }
                NicBackend::RestrictedUser => format!("user,id=net{i},restrict=on"),
            };
            push(&["-netdev", &netdev]);
            let mac = n
                .mac
                .as_ref()
                .map(|m| format!(",mac={m}"))
                .unwrap_or_default();
            push(&[
                "-device",
                &match self.hardware {
                    Hardware::Virtio => format!("virtio-net-pci,netdev=net{i}{mac}"),
                    Hardware::Vmware => format!(
                        "vmxnet3,netdev=net{i}{mac},addr={:#x}",
                        VMWARE_FIRST_NIC_SLOT as usize + i
                    ),
                    Hardware::Emulated => format!("e1000e,netdev=net{i}{mac}"),
                },
            ]);
        }
        if self.paused {
            push(&["-S"]);
        }
        if self.no_reboot {
            push(&["-no-reboot"]);
        }
        a
    }
}

fn valid_qemu_id(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic())
        && c.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn valid_mac(m: &str) -> bool {
    let parts: Vec<&str> = m.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// How [`Vm::powerdown`] ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerdownOutcome {
    /// The guest shut down after the ACPI power button.
    Clean,
    /// The guest did not react in time: QEMU was told to `quit`.
    Quit,
    /// QEMU did not quit either: it was SIGKILLed.
    Killed,
}

/// A running (or once running) VM.
#[derive(Debug, Clone)]
pub struct Vm {
    name: String,
    pid: u32,
    run_dir: PathBuf,
    spec: Option<VmSpec>,
}

impl Vm {
    /// Start QEMU detached. Returns once QEMU has initialised (the daemonizing
    /// parent exits only then), so the QMP socket exists.
    pub async fn launch(spec: &VmSpec) -> Result<Vm, VmError> {
        spec.validate()?;
        let rd = &spec.run_dir;
        std::fs::create_dir_all(rd).map_err(|source| VmError::Io {
            what: "cannot create the run directory",
            path: rd.clone(),
            source,
        })?;
        if let Ok(vm) = Vm::attach(rd) {
            return Err(VmError::AlreadyRunning {
                vm: spec.name.clone(),
                pid: vm.pid,
                run_dir: rd.clone(),
            });
        }
        // Leftovers of an earlier run would confuse attach and wait_serial.
        for f in [QMP_SOCK, QGA_SOCK, SERIAL_LOG, PID_FILE, STDERR_LOG] {
            let _ = std::fs::remove_file(rd.join(f));
        }
        let spec_path = rd.join(SPEC_FILE);
        let json = serde_json::to_vec_pretty(spec).expect("a spec serialises");
        std::fs::write(&spec_path, json).map_err(|source| VmError::Io {
            what: "cannot write",
            path: spec_path.clone(),
            source,
        })?;
        let stderr_path = rd.join(STDERR_LOG);
        let stderr_file = std::fs::File::create(&stderr_path).map_err(|source| VmError::Io {
            what: "cannot create",
            path: stderr_path.clone(),
            source,
        })?;
        let args = spec.qemu_args();
        let mut cmd = match &spec.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&spec.qemu_binary);
                c
            }
            None => Command::new(&spec.qemu_binary),
        };
        cmd.args(&args)
            .current_dir(rd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // A file, not a pipe: the daemon keeps its inherited descriptors until
            // it has initialised, and we want its complaints even then.
            .stderr(stderr_file);
        debug!(vm = %spec.name, args = ?args, "starting QEMU");
        let started = Instant::now();
        let status = cmd.status().await.map_err(|source| VmError::Io {
            what: "cannot run",
            path: spec.qemu_binary.clone(),
            source,
        })?;
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        if !status.success() {
            return Err(VmError::LaunchFailed {
                vm: spec.name.clone(),
                status: status.to_string(),
                stderr: stderr.trim().to_string(),
            });
        }
        let pid = read_pid(rd).map_err(|why| VmError::LaunchFailed {
            vm: spec.name.clone(),
            status: "QEMU exited 0 but left no usable pid file".into(),
            stderr: format!("{why}; {}", stderr.trim()),
        })?;
        info!(vm = %spec.name, pid, accel = %spec.accel, run_dir = %rd.display(),
              elapsed_ms = started.elapsed().as_millis() as u64, "VM started");
        Ok(Vm {
            name: spec.name.clone(),
            pid,
            run_dir: rd.clone(),
            spec: Some(spec.clone()),
        })
    }

    /// Find the VM running from `run_dir` again (after the caller restarted).
    /// The pid must be alive and be the QEMU of this run directory (pids get reused).
    pub fn attach(run_dir: &Path) -> Result<Vm, VmError> {
        let not = |why: String| VmError::NotRunning {
            run_dir: run_dir.to_path_buf(),
            why,
        };
        let pid = read_pid(run_dir).map_err(not)?;
        if !pid_alive(pid) {
            return Err(not(format!("pid {pid} from {PID_FILE} is not running")));
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let sock = run_dir.join(QMP_SOCK);
        let needle = sock.to_string_lossy();
        if !String::from_utf8_lossy(&cmdline).contains(needle.as_ref()) {
            return Err(not(format!(
                "pid {pid} is not the QEMU of this run directory (pid reused?)"
            )));
        }
        let spec: Option<VmSpec> = std::fs::read(run_dir.join(SPEC_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let name = spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_else(|| format!("pid-{pid}"));
        debug!(vm = %name, pid, "attached to a running VM");
        Ok(Vm {
            name,
            pid,
            run_dir: run_dir.to_path_buf(),
            spec,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn pid(&self) -> u32 {
        self.pid
    }
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }
    /// The spec it was started with (read back from `vm.json` after an attach).
    pub fn spec(&self) -> Option<&VmSpec> {
        self.spec.as_ref()
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join(QMP_SOCK)
    }
    pub fn qga_socket(&self) -> PathBuf {
        self.run_dir.join(QGA_SOCK)
    }
    pub fn serial_log(&self) -> PathBuf {
        self.run_dir.join(SERIAL_LOG)
    }
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir.join(PID_FILE)
    }

    /// Whether the QEMU process still runs.
    pub fn is_running(&self) -> bool {
        pid_alive(self.pid)
    }

    /// A new QMP session (QEMU's QMP socket takes one client at a time: drop it
    /// before asking for another).
    pub async fn qmp(&self) -> Result<Qmp, VmError> {
        Ok(Qmp::connect(&self.qmp_socket(), Duration::from_secs(10)).await?)
    }

    /// A synchronised guest agent session, waiting up to `timeout` for the agent.
    pub async fn qga(&self, timeout: Duration) -> Result<Qga, VmError> {
        Ok(Qga::connect(&self.name, &self.qga_socket(), timeout).await?)
    }

    /// Wait until a line of the serial log contains `marker`; returns that line.
    pub async fn wait_serial(&self, marker: &str, timeout: Duration) -> Result<String, VmError> {
        let path = self.serial_log();
        let deadline = Instant::now() + timeout;
        let mut offset = 0usize;
        let mut partial = String::new();
        let mut tail: Vec<String> = Vec::new();
        loop {
            let data = std::fs::read(&path).unwrap_or_default();
            if data.len() > offset {
                partial.push_str(&String::from_utf8_lossy(&data[offset..]));
                offset = data.len();
                while let Some(i) = partial.find('\n') {
                    let line: String = partial.drain(..=i).collect();
                    let line = line.trim_end().to_string();
                    if line.contains(marker) {
                        return Ok(line);
                    }
                    tail.push(line);
                    if tail.len() > 10 {
                        tail.remove(0);
                    }
                }
                if partial.contains(marker) {
                    return Ok(std::mem::take(&mut partial));
                }
            }
            let tail_text = || {
                let mut t = tail.join(" | ");
                if !partial.is_empty() {
                    t.push_str(" | ");
                    t.push_str(partial.trim_end());
                }
                t
            };
            if !self.is_running() {
                return Err(VmError::ExitedWhileWaiting {
                    vm: self.name.clone(),
                    marker: marker.into(),
                    tail: tail_text(),
                });
            }
            if Instant::now() >= deadline {
                return Err(VmError::SerialTimeout {
                    vm: self.name.clone(),
                    marker: marker.into(),
                    secs: timeout.as_secs(),
                    tail: tail_text(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Press the power button and wait up to `timeout` for the guest to power off;
    /// then `quit`, then SIGKILL, saying so.
    pub async fn powerdown(&self, timeout: Duration) -> Result<PowerdownOutcome, VmError> {
        if !self.is_running() {
            return Ok(PowerdownOutcome::Clean);
        }
        let mut qmp = self.qmp().await?;
        qmp.system_powerdown().await?;
        info!(vm = %self.name, secs = timeout.as_secs(), "ACPI power button pressed");
        if self.wait_exit(timeout).await {
            info!(vm = %self.name, "VM powered off");
            return Ok(PowerdownOutcome::Clean);
        }
        warn!(vm = %self.name, secs = timeout.as_secs(),
              "VM did not power off after the ACPI power button: ending QEMU with quit (the guest does not shut down cleanly)");
        if let Err(e) = qmp.quit().await {
            warn!(vm = %self.name, error = %e, "QMP quit failed");
        }
        drop(qmp);
        if self.wait_exit(Duration::from_secs(5)).await {
            self.remove_runtime_files();
            return Ok(PowerdownOutcome::Quit);
        }
        warn!(vm = %self.name, pid = self.pid, "QEMU did not quit: sending SIGKILL");
        self.kill().await?;
        Ok(PowerdownOutcome::Killed)
    }

    /// SIGKILL QEMU and wait for it to be gone.
    pub async fn kill(&self) -> Result<(), VmError> {
        if self.is_running() {
            // SAFETY: kill(2) with a pid we verified belongs to this VM's QEMU.
            unsafe {
                libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
            }
            if !self.wait_exit(Duration::from_secs(10)).await {
                return Err(VmError::Unkillable {
                    vm: self.name.clone(),
                    pid: self.pid,
                });
            }
            info!(vm = %self.name, pid = self.pid, "VM killed");
        }
        self.remove_runtime_files();
        Ok(())
    }

    async fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_running() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    fn remove_runtime_files(&self) {
        for f in [QMP_SOCK, QGA_SOCK, PID_FILE] {
            let _ = std::fs::remove_file(self.run_dir.join(f));
        }
    }
}

fn read_pid(run_dir: &Path) -> Result<u32, String> {
    let p = run_dir.join(PID_FILE);
    let text =
        std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|&pid| pid > 1)
        .ok_or_else(|| format!("{} does not hold a pid: {:?}", p.display(), text.trim()))
}

/// Alive and not a zombie (a daemonized QEMU is reparented to whatever reaps
/// orphans here, which may be slow or absent).
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> VmSpec {
        VmSpec::new("vm1", dir, Accel::Tcg)
    }

    #[test]
    fn rejects_missing_files_and_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.kernel = Some(dir.path().join("nope"));
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("kernel") && e.contains("does not exist"), "{e}");

        let mut s = spec(dir.path());
        s.disks.push(VmDisk {
            path: dir.path().join("missing.qcow2"),
            format: "qcow2".into(),
            node_name: "disk0".into(),
            read_only: false,
        });
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("disk") && e.contains("does not exist"), "{e}");

        let img = dir.path().join("d.raw");
        std::fs::write(&img, b"").unwrap();
        let mut s = spec(dir.path());
        s.disks.push(VmDisk {
            path: img,
            format: "raw".into(),
            node_name: "0bad".into(),
            read_only: false,
        });
        assert!(s.validate().unwrap_err().to_string().contains("node name"));

        let mut s = spec(dir.path());
        s.name = "a b".into();
        assert!(s.validate().is_err());
        let mut s = spec(dir.path());
        s.initrd = Some(dir.path().join("x"));
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("needs a kernel"));
        let mut s = spec(dir.path());
        s.nics.push(VmNic {
            backend: NicBackend::RestrictedUser,
            mac: Some("52:54:00:zz:00:01".into()),
        });
        assert!(s.validate().unwrap_err().to_string().contains("MAC"));
        let mut s = spec(&dir.path().join("x".repeat(120)));
        s.name = "ok".into();
        assert!(s.validate().unwrap_err().to_string().contains("too long"));
    }

    #[test]
    fn command_line_has_named_nodes_and_detaches() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.qcow2");
        std::fs::write(&img, b"").unwrap();
        let mut s = spec(dir.path());
        s.disks.push(VmDisk {
            path: img.clone(),
            format: "qcow2".into(),
            node_name: "disk0".into(),
            read_only: false,
        });
        s.nics.push(VmNic {
            backend: NicBackend::Tap {
                ifname: "tap0".into(),
            },
            mac: Some("52:54:00:12:34:56".into()),
        });
        s.validate().unwrap();
        let a = s.qemu_args().join(" ");
        assert!(a.contains("-daemonize"));
        assert!(a.contains("-accel tcg"));
        assert!(a.contains(&format!(
            "driver=file,node-name=disk0-file,filename={}",
            img.display()
        )));
        assert!(a.contains("driver=qcow2,node-name=disk0,file=disk0-file"));
        assert!(a.contains("virtio-blk-pci,drive=disk0,id=disk0-dev"));
        assert!(a.contains("tap,id=net0,ifname=tap0,script=no,downscript=no"));
        assert!(a.contains("virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56"));
        assert!(a.contains("name=org.qemu.guest_agent.0"));
    }

    #[test]
    fn hardware_picks_the_guest_devices() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.qcow2");
        std::fs::write(&img, b"").unwrap();
        let mut s = spec(dir.path());
        for node in ["disk0", "disk1"] {
            s.disks.push(VmDisk {
                path: img.clone(),
                format: "qcow2".into(),
                node_name: node.into(),
                read_only: false,
            });
        }
        s.nics.push(VmNic {
            backend: NicBackend::RestrictedUser,
            mac: Some("52:54:00:12:34:56".into()),
        });
        s.hardware = Hardware::Vmware;
        s.validate().unwrap();
        let a = s.qemu_args().join(" ");
        assert!(a.contains("manufacturer=VMware,, Inc."), "{a}");
        assert!(a.contains("-device pvscsi,id=scsi0"), "{a}");
        assert!(a.contains("scsi-hd,bus=scsi0.0,scsi-id=1,drive=disk1,id=disk1-dev,bootindex=1"));
        assert!(
            a.contains("vmxnet3,netdev=net0,mac=52:54:00:12:34:56,addr=0x5"),
            "{a}"
        );
        assert!(!a.contains("virtio-blk"), "{a}");

        s.hardware = Hardware::Emulated;
        let a = s.qemu_args().join(" ");
        assert!(
            a.contains("ide-hd,bus=ide.0,drive=disk0,id=disk0-dev,bootindex=0"),
            "{a}"
        );
        assert!(a.contains("e1000e,netdev=net0"), "{a}");
        for _ in 0..5 {
            s.disks.push(s.disks[0].clone());
        }
        assert!(s.validate().unwrap_err().to_string().contains("do not fit"));
        // Specs written before the field existed are virtio guests.
        let mut v = serde_json::to_value(spec(dir.path())).unwrap();
        v.as_object_mut().unwrap().remove("hardware");
        let old: VmSpec = serde_json::from_value(v).unwrap();
        assert_eq!(old.hardware, Hardware::Virtio);
        assert_eq!("vmware".parse::<Hardware>().unwrap(), Hardware::Vmware);
    }

    #[test]
    fn zombie_and_missing_pids_are_not_running() {
        assert!(!pid_alive(u32::MAX - 1));
        assert!(pid_alive(std::process::id()));
    }
}
