//! `ferry worker`: the target worker. Booted on a target instance in place of its own
//! disks, it receives syncs into the instance's volumes, written in place, over mutual
//! TLS; the appliance then detaches it and the instance boots its own disks.
//!
//! Volume `k` (in the kernel's order, the disk `/` is on left out) is served on port
//! `first_port + k`: the appliance sends source disk `k` there.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use crate::cmd::util::{human_bytes, runtime};

#[derive(Args)]
pub struct WorkerArgs {
    /// Directory holding `ca.pem`, `worker.pem` and `worker.key` (issued by the
    /// appliance's CA for the name `ferry-worker`).
    #[arg(long, default_value = "/etc/ferry-worker")]
    tls_dir: PathBuf,
    /// Where each volume's sidecar (state, chunk index) lives: on the worker's own disk.
    #[arg(long, default_value = "/var/lib/ferry-worker")]
    state_dir: PathBuf,
    /// Port of the first volume; the next volumes use the ports after it.
    #[arg(long, default_value_t = 7480)]
    first_port: u16,
    /// Volumes to serve, in order (default: every disk but the one `/` is on).
    #[arg(long = "volume", value_name = "DEVICE")]
    volumes: Vec<PathBuf>,
}

pub fn run(args: WorkerArgs) -> Result<ExitCode> {
    let volumes = if args.volumes.is_empty() {
        data_volumes(Path::new("/sys/block"), root_device()?)?
    } else {
        args.volumes.clone()
    };
    if volumes.is_empty() {
        anyhow::bail!("no volume to receive into: the instance has only the worker's own disk");
    }
    let identity = ferry_pki::Identity::from_files(
        &args.tls_dir.join("worker.pem"),
        &args.tls_dir.join("worker.key"),
        &args.tls_dir.join("ca.pem"),
    )
    .with_context(|| {
        format!(
            "loading the worker's certificate from {}",
            args.tls_dir.display()
        )
    })?;
    runtime()?.block_on(async move {
        let acceptor = ferry_replication::acceptor(&identity)?;
        let mut tasks = Vec::new();
        for (k, dev) in volumes.iter().enumerate() {
            let name = dev
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("volume{k}"));
            let port = args.first_port + k as u16;
            let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
                .await
                .with_context(|| format!("cannot listen on port {port}"))?;
            let receiver =
                ferry_replication::Receiver::device(dev.clone(), args.state_dir.join(&name));
            eprintln!("volume {k}: {} on port {port} (mutual TLS)", dev.display());
            let mut commits = receiver.commits();
            let shown = dev.display().to_string();
            tasks.push(tokio::spawn(async move {
                while commits.changed().await.is_ok() {
                    if let Some(r) = commits.borrow().clone() {
                        eprintln!(
                            "committed generation {} of {shown} ({} written)",
                            r.commit.generation,
                            human_bytes(r.bytes_written)
                        );
                    }
                }
            }));
            tasks.push(tokio::spawn(receiver.serve(listener, acceptor.clone())));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The device number of the filesystem `/` is on.
fn root_device() -> Result<u64> {
    Ok(std::fs::metadata("/").context("stat /")?.dev())
}

/// Whole disks under `sys_block` (virtio, SCSI, Xen, NVMe) except the one holding the
/// device `root` (itself or one of its partitions), in the kernel's naming order.
fn data_volumes(sys_block: &Path, root: u64) -> Result<Vec<PathBuf>> {
    let root = format!("{}:{}", libc::major(root), libc::minor(root));
    let mut disks = Vec::new();
    for e in
        std::fs::read_dir(sys_block).with_context(|| format!("listing {}", sys_block.display()))?
    {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !["vd", "sd", "xvd", "nvme"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let holds_root = std::fs::read_dir(e.path())?
            .filter_map(|p| p.ok())
            .map(|p| p.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with(&name))
            })
            .chain([e.path()])
            .any(|p| std::fs::read_to_string(p.join("dev")).is_ok_and(|d| d.trim() == root));
        if !holds_root {
            disks.push(name);
        }
    }
    // vdb < vdc < ... < vdz < vdaa.
    disks.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
    Ok(disks
        .into_iter()
        .map(|n| Path::new("/dev").join(n))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_volumes_leave_out_the_root_disk_and_keep_kernel_order() {
        let d = tempfile::tempdir().unwrap();
        let disk = |name: &str, dev: &str, parts: &[(&str, &str)]| {
            let p = d.path().join(name);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("dev"), format!("{dev}\n")).unwrap();
            for (part, pdev) in parts {
                std::fs::create_dir_all(p.join(part)).unwrap();
                std::fs::write(p.join(part).join("dev"), pdev).unwrap();
            }
        };
        disk("vda", "253:0", &[("vda1", "253:1")]);
        disk("vdb", "253:16", &[]);
        disk("vdaa", "253:32", &[]);
        disk("vdc", "253:48", &[]);
        disk("loop0", "7:0", &[]);
        let root = libc::makedev(253, 1);
        let got = data_volumes(d.path(), root).unwrap();
        assert_eq!(
            got,
            ["/dev/vdb", "/dev/vdc", "/dev/vdaa"]
                .map(PathBuf::from)
                .to_vec()
        );
    }
}
