//! Which accelerator QEMU can use here: KVM where it works, software emulation
//! (TCG) everywhere else.
//!
//! `/dev/kvm` existing is not enough: under PVM (KVM inside a Firecracker-style
//! guest) stock kernels cannot run (QEMU aborts with "failed to set MSR 0x10a",
//! spins, or stops with "KVM internal error"). So we boot the host kernel once
//! under KVM without a disk: a working KVM prints kernel messages and panics
//! quickly (no root file system); anything else means "use TCG". The verdict is
//! cached per host kernel and QEMU version, so later runs are instant.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tracing::{debug, info, warn};

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The value of `-accel`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// Parse `kvm` or `tcg` (case-insensitive).
    pub fn parse(s: &str) -> Option<Accel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer of [`detect`], with the reason (for logs and `ferry doctor`-style output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelVerdict {
    pub accel: Accel,
    pub reason: String,
    /// The verdict came from the cache file rather than a probe.
    pub cached: bool,
}

/// Inputs of [`detect_with`]; [`DetectOptions::from_env`] is what [`detect`] uses.
#[derive(Debug, Clone)]
pub struct DetectOptions {
    /// `FERRY_ACCEL`: a forced choice, skipping the probe.
    pub forced: Option<String>,
    /// Where the verdict is cached (`${FERRY_CACHE:-/var/cache/ferry}/accel`).
    pub cache_file: PathBuf,
    pub kvm_device: PathBuf,
    pub qemu_binary: PathBuf,
    /// How long the probe boot may take; a working KVM panics within a few seconds.
    pub probe_timeout: Duration,
}

impl DetectOptions {
    pub fn from_env() -> DetectOptions {
        let cache = std::env::var_os("FERRY_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/ferry"));
        DetectOptions {
            forced: std::env::var("FERRY_ACCEL").ok().filter(|s| !s.is_empty()),
            cache_file: cache.join("accel"),
            kvm_device: PathBuf::from("/dev/kvm"),
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            probe_timeout: Duration::from_secs(15),
        }
    }
}

/// Choose the accelerator for this host (see the module documentation).
/// Never fails: when in doubt, TCG.
pub async fn detect() -> Accel {
    detect_with(&DetectOptions::from_env()).await.accel
}

/// [`detect`] with explicit inputs, returning the reason too.
pub async fn detect_with(opts: &DetectOptions) -> AccelVerdict {
    let v = decide(opts).await;
    match v.accel {
        Accel::Kvm => info!(cached = v.cached, "using KVM: {}", v.reason),
        Accel::Tcg => info!(
            cached = v.cached,
            "{}: using software emulation (TCG)", v.reason
        ),
    }
    v
}

async fn decide(opts: &DetectOptions) -> AccelVerdict {
    if let Some(f) = &opts.forced {
        match Accel::parse(f) {
            Some(a) => {
                return AccelVerdict {
                    accel: a,
                    reason: format!("FERRY_ACCEL={f}"),
                    cached: false,
                }
            }
            None => warn!(value = %f, "FERRY_ACCEL must be kvm or tcg; ignoring it"),
        }
    }
    if !opts.kvm_device.exists() {
        return AccelVerdict {
            accel: Accel::Tcg,
            reason: format!(
                "KVM unusable here ({} is missing)",
                opts.kvm_device.display()
            ),
            cached: false,
        };
    }
    let kernel = host_kernel();
    let key = cache_key(&opts.qemu_binary).await;
    if let Some(v) = read_cache(&opts.cache_file, &key) {
        return v;
    }
    let (accel, reason) = match &kernel {
        None => (
            Accel::Tcg,
            "KVM unusable here (no /boot/vmlinuz-* to test it with)".to_string(),
        ),
        Some(k) => probe(&opts.qemu_binary, k, opts.probe_timeout).await,
    };
    let v = AccelVerdict {
        accel,
        reason,
        cached: false,
    };
    write_cache(&opts.cache_file, &key, &v);
    v
}

/// The host kernel image to probe with: the running one if present, else any.
fn host_kernel() -> Option<PathBuf> {
    let running = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|r| PathBuf::from(format!("/boot/vmlinuz-{}", r.trim())));
    if let Some(k) = running.filter(|k| k.exists()) {
        return Some(k);
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    all.sort();
    all.pop()
}

/// The verdict depends on the host kernel (PVM or not) and on QEMU.
async fn cache_key(qemu: &Path) -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let version = Command::new(qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_default();
    format!("{} | {}", kernel.trim(), version.trim())
}

fn read_cache(path: &Path, key: &str) -> Option<AccelVerdict> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    if lines.next()? != format!("key={key}") {
        return None;
    }
    let accel = Accel::parse(lines.next()?.strip_prefix("accel=")?)?;
    let reason = lines.next()?.strip_prefix("reason=")?.to_string();
    debug!(path = %path.display(), %accel, "accelerator verdict from cache");
    Some(AccelVerdict {
        accel,
        reason,
        cached: true,
    })
}

fn write_cache(path: &Path, key: &str, v: &AccelVerdict) {
    let text = format!(
        "key={key}\naccel={}\nreason={}\n",
        v.accel,
        v.reason.replace('\n', " ")
    );
    let r = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| {
            // Write then rename, so a concurrent reader never sees half a file.
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, path)
        });
    if let Err(e) = r {
        warn!(path = %path.display(), error = %e, "cannot cache the accelerator verdict");
    }
}

/// Boot `kernel` under KVM with no disk. Kernel panic text on the serial console
/// means the guest ran; QEMU errors, a KVM internal error or silence mean not.
async fn probe(qemu: &Path, kernel: &Path, timeout: Duration) -> (Accel, String) {
    debug!(kernel = %kernel.display(), "probing KVM with a short boot");
    let mut child = match Command::new(qemu)
        .args([
            "-accel",
            "kvm",
            "-machine",
            "q35",
            "-cpu",
            "host",
            "-m",
            "128",
            "-nodefaults",
            "-display",
            "none",
            "-vga",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            "-kernel",
        ])
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return (
                Accel::Tcg,
                format!("KVM unusable here (cannot run {}: {e})", qemu.display()),
            )
        }
    };
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let watch = async {
        let mut out = BufReader::new(stdout).lines();
        let mut err = BufReader::new(stderr).lines();
        let mut first_error: Option<String> = None;
        let (mut out_open, mut err_open) = (true, true);
        while out_open || err_open {
            tokio::select! {
                l = out.next_line(), if out_open => match l {
                    Ok(Some(l)) => {
                        if l.contains("Kernel panic") || l.contains("VFS: Unable to mount root") {
                            return Ok(());
                        }
                        if l.contains("KVM internal error") {
                            return Err(l);
                        }
                    }
                    _ => out_open = false,
                },
                l = err.next_line(), if err_open => match l {
                    Ok(Some(l)) => {
                        if l.contains("KVM internal error") || l.contains("failed to") {
                            return Err(l);
                        }
                        if first_error.is_none() && !l.contains("warning:") {
                            first_error = Some(l);
                        }
                    }
                    _ => err_open = false,
                },
            }
        }
        Err(first_error.unwrap_or_else(|| "QEMU exited before the guest kernel panicked".into()))
    };
    let r = tokio::time::timeout(timeout, watch).await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    match r {
        Ok(Ok(())) => (Accel::Kvm, "a test kernel booted under KVM".to_string()),
        Ok(Err(why)) => (Accel::Tcg, format!("KVM unusable here ({})", why.trim())),
        Err(_) => (
            Accel::Tcg,
            format!(
                "KVM unusable here (a test kernel showed no sign of life under KVM within {}s)",
                timeout.as_secs()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> DetectOptions {
        DetectOptions {
            forced: None,
            cache_file: dir.join("accel"),
            kvm_device: PathBuf::from("/dev/kvm"),
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            probe_timeout: Duration::from_secs(15),
        }
    }

    #[tokio::test]
    async fn forced_choice_wins() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.forced = Some("KVM".into());
        let v = detect_with(&o).await;
        assert_eq!(v.accel, Accel::Kvm);
        assert!(v.reason.contains("FERRY_ACCEL"));
    }

    #[tokio::test]
    async fn missing_device_means_tcg_without_probing() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.kvm_device = dir.path().join("no-kvm");
        let v = detect_with(&o).await;
        assert_eq!(v.accel, Accel::Tcg);
        assert!(v.reason.contains("is missing"), "{}", v.reason);
        assert!(!o.cache_file.exists());
    }

    #[test]
    fn cache_round_trip_and_key_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sub/accel");
        let v = AccelVerdict {
            accel: Accel::Tcg,
            reason: "KVM unusable here (x)".into(),
            cached: false,
        };
        write_cache(&f, "k1", &v);
        let back = read_cache(&f, "k1").unwrap();
        assert_eq!(back.accel, Accel::Tcg);
        assert!(back.cached);
        assert!(read_cache(&f, "k2").is_none());
    }
}
