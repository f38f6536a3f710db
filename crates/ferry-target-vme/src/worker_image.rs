//! The target worker image: a Linux image (`config.worker_base_image`, an ext4 filesystem
//! on the whole disk, systemd inside) with the `ferry` binary, a systemd unit running
//! `ferry worker`, and the worker's certificate written into it — without mounting
//! anything (`debugfs` edits the filesystem in the image file). One per target, uploaded
//! once, rebuilt when its recipe (base image, binary, certificate) changes.
//!
//! The worker's key travels inside the image, decrypted (the worker starts unattended): it
//! is issued by a CA of this target's own, used for nothing but worker connections, so a
//! copy of the image lets nobody speak to another target or to the appliance. On the
//! appliance the key stays encrypted like every other.

use std::path::{Path, PathBuf};

use ferry_adapter::{AResult, AdapterError};
use ferry_pki::CaDir;

/// The name in every worker's certificate (workers have no stable address of their own).
pub const SERVER_NAME: &str = "ferry-worker";

const UNIT: &str = "[Unit]
Description=Ferry target worker: receives syncs into this instance's volumes
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/usr/local/bin/ferry worker
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
";

/// The target's worker CA with the two certificates it issues: `worker` (the receiver)
/// and `appliance` (the sender). Made on first use.
pub fn pki(dir: &Path, target: &str) -> AResult<CaDir> {
    let ca = CaDir::new(dir);
    let err = |e: ferry_pki::PkiError| {
        AdapterError::permanent(format!("worker certificates in {}: {e}", dir.display()))
    };
    if !ca.ca_cert_path().exists() {
        ca.init(&format!("Ferry workers of target {target}"))
            .map_err(err)?;
    }
    if !ca.cert_path("worker").exists() {
        ca.issue("worker", &[SERVER_NAME.to_string()])
            .map_err(err)?;
    }
    if !ca.cert_path("appliance").exists() {
        ca.issue("appliance", &["ferry-appliance".to_string()])
            .map_err(err)?;
    }
    Ok(ca)
}

/// Longest any one tool run of the image build may take: the conversions copy a base
/// image of a few hundred MiB.
const TOOL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

async fn run(program: &str, args: &[&std::ffi::OsStr]) -> AResult<String> {
    let run = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(TOOL_TIMEOUT, run)
        .await
        .map_err(|_| {
            AdapterError::permanent(format!(
                "{program} did not finish within {} s while building the worker image, and was stopped",
                TOOL_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| {
            AdapterError::permanent(format!(
                "cannot run {program}: {e} (see scripts/install-deps.sh)"
            ))
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        return Err(AdapterError::permanent(format!(
            "{program} failed: {stderr}"
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A digest of what goes into the image, to know when to rebuild it.
pub fn recipe_key(base: &Path, ferry: &Path, ca: &CaDir) -> AResult<String> {
    use std::os::unix::fs::MetadataExt;
    let mut parts = String::from("worker-image-1\n");
    for p in [base, ferry, &ca.cert_path("worker")] {
        let m = std::fs::metadata(p)
            .map_err(|e| AdapterError::permanent(format!("{}: {e}", p.display())))?;
        parts.push_str(&format!(
            "{} {} {}\n",
            p.display(),
            m.len(),
            m.mtime_nsec() + m.mtime() * 1_000_000_000
        ));
    }
    use sha2::Digest;
    Ok(hex::encode(sha2::Sha256::digest(parts.as_bytes())))
}

/// Builds the worker image from `base` into `out` (qcow2), with `ferry` inside.
pub async fn build(base: &Path, ferry: &Path, ca: &CaDir, out: &Path) -> AResult<u64> {
    let dir = out.parent().unwrap_or(Path::new("."));
    tokio::fs::create_dir_all(dir).await?;
    let raw = out.with_extension("raw");
    let bin = dir.join("ferry.stripped");
    let unit = dir.join("ferry-worker.service");
    // The base image is the operator's, but its format is still stated to qemu-img, never
    // probed: recognised from its header and refused if it names another file.
    let base_format = ferry_disk::recognise_format(base)
        .await
        .map_err(|e| AdapterError::permanent(format!("worker_base_image: {e}")))?;
    run(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-f".as_ref(),
            base_format.as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            "--".as_ref(),
            base.as_os_str(),
            raw.as_os_str(),
        ],
    )
    .await?;
    // A debug build carries hundreds of MiB of symbols the worker never needs.
    if run(
        "objcopy",
        &["--strip-debug".as_ref(), ferry.as_os_str(), bin.as_os_str()],
    )
    .await
    .is_err()
    {
        tokio::fs::copy(ferry, &bin).await?;
    }
    tokio::fs::write(&unit, UNIT).await?;
    let key = dir.join("worker.key.plain");
    let script = dir.join("debugfs.cmds");
    let lines = [
        "mkdir /etc/ferry-worker".to_string(),
        format!("write {} /etc/ferry-worker/ca.pem", ca.ca_cert_path().display()),
        format!("write {} /etc/ferry-worker/worker.pem", ca.cert_path("worker").display()),
        format!("write {} /etc/ferry-worker/worker.key", key.display()),
        "rm /usr/local/bin/ferry".to_string(),
        format!("write {} /usr/local/bin/ferry", bin.display()),
        "rm /etc/systemd/system/ferry-worker.service".to_string(),
        format!("write {} /etc/systemd/system/ferry-worker.service", unit.display()),
        "mkdir /etc/systemd/system/multi-user.target.wants".to_string(),
        "rm /etc/systemd/system/multi-user.target.wants/ferry-worker.service".to_string(),
        "symlink /etc/systemd/system/multi-user.target.wants/ferry-worker.service /etc/systemd/system/ferry-worker.service".to_string(),
    ];
    tokio::fs::write(&script, lines.join("\n") + "\n").await?;
    // Inside the image the key must open without a passphrase: a decrypted copy, mode
    // 0600, exists only while the image is written.
    let _ = std::fs::remove_file(&key);
    ca.export_key("worker", &key).map_err(|e| {
        let _ = std::fs::remove_file(&key);
        AdapterError::permanent(format!("the worker's key: {e}"))
    })?;
    let written = run(
        "debugfs",
        &[
            "-w".as_ref(),
            "-f".as_ref(),
            script.as_os_str(),
            raw.as_os_str(),
        ],
    )
    .await;
    let _ = tokio::fs::remove_file(&key).await;
    written?;
    // debugfs reports most failures on stderr with a zero status: check the result.
    let check = run(
        "debugfs",
        &[
            "-R".as_ref(),
            "stat /usr/local/bin/ferry".as_ref(),
            raw.as_os_str(),
        ],
    )
    .await;
    match check {
        Ok(s) if s.contains("Size:") => {}
        _ => {
            let _ = tokio::fs::remove_file(&raw).await;
            return Err(AdapterError::permanent(format!(
                "cannot write the worker into {}: worker_base_image must hold an ext4 filesystem on the whole disk (no partition table)",
                base.display()
            )));
        }
    }
    // The raw copy's length is the image's virtual size.
    let size = tokio::fs::metadata(&raw).await?.len();
    let tmp = out.with_extension("qcow2.tmp");
    run(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            "--".as_ref(),
            raw.as_os_str(),
            tmp.as_os_str(),
        ],
    )
    .await?;
    tokio::fs::rename(&tmp, out).await?;
    for f in [&raw, &bin, &unit, &script] {
        let _ = tokio::fs::remove_file(f).await;
    }
    Ok(size)
}

/// Where a target keeps its worker CA and image, beside the migrations' work
/// directories.
pub fn target_dir(work_dir: &Path, target_id: &str) -> PathBuf {
    work_dir
        .parent()
        .unwrap_or(work_dir)
        .join("targets")
        .join(target_id)
}
