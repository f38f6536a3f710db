//! `ferry quickstart --disk-only`: a real disk through the replication engine alone — an image served by qemu-nbd with a dirty bitmap, a full sync over mutual
//! TLS, changes while "the guest runs", a dirty-bitmap delta, and a byte-for-byte check.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ferry_disk::{Disk, OpenOptions};
use ferry_replication::{Mode, SendOptions};
use rand::{Rng, SeedableRng};

use crate::cmd::disk::{print_report, with_progress};
use crate::cmd::util::{human_bytes, runtime};

pub struct Args {
    pub data_dir: PathBuf,
    pub size: u64,
}

const BITMAP: &str = "ferry-quickstart";

pub fn run(args: Args) -> Result<ExitCode> {
    for tool in ["qemu-img", "qemu-nbd"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is not installed: run `bash scripts/install-deps.sh` first");
        }
    }
    let started = Instant::now();
    let dir = &args.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let source = dir.join("source.qcow2");
    let target = dir.join("target.raw");
    for p in [&source, &target] {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_dir_all(dir.join("target.raw.ferry"));

    step(
        1,
        "a source disk",
        &format!(
            "A {} qcow2 image, as a KVM host keeps it, with some data on it.",
            human_bytes(args.size)
        ),
    );
    qemu_img(
        &["create", "-q", "-f", "qcow2"],
        &source,
        Some(&args.size.to_string()),
    )?;
    let rt = runtime()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let written = rt.block_on(write_through_nbd(
        &source,
        &mut rng,
        args.size,
        96 << 20,
        4 << 20,
    ))?;
    println!("  wrote {} of data through qemu-nbd", human_bytes(written));

    step(2, "initial sync", "A persistent dirty bitmap starts recording every write from this point in time; Ferry reads only allocated data, skips zeros, and streams 64 KiB chunks with their BLAKE3 digests over mutual TLS; the receiver verifies every chunk before writing it.");
    qemu_img(&["bitmap", "--add"], &source, Some(BITMAP))?;
    let full = rt.block_on(sync(&source, &target, None))?;
    print_report(&full, false);

    step(
        3,
        "the source keeps changing",
        "While replication goes on, the workload writes; the dirty bitmap records which blocks.",
    );
    let changed = rt.block_on(write_through_nbd(
        &source,
        &mut rng,
        args.size,
        24 << 20,
        64 << 10,
    ))?;
    println!(
        "  wrote {} in scattered 64 KiB blocks",
        human_bytes(changed)
    );
    // A bitmap is read once it stops recording; a source worker would start the next one
    // in the same step (see ARCHITECTURE.md).
    qemu_img(&["bitmap", "--disable"], &source, Some(BITMAP))?;

    step(4, "delta sync from the dirty bitmap", "Only the blocks the bitmap marks are read and sent; the target keeps its last complete copy until the delta is whole and verified.");
    let delta = rt.block_on(sync(&source, &target, Some(BITMAP)))?;
    print_report(&delta, false);

    step(
        5,
        "verification",
        "The target is compared byte for byte with the source, read through qemu-img.",
    );
    let reference = dir.join("source-as-raw.raw");
    let _ = std::fs::remove_file(&reference);
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&source)
        .arg(&reference)
        .output()?;
    if !out.status.success() {
        bail!(
            "qemu-img convert failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let same = Command::new("cmp")
        .arg("-s")
        .arg(&reference)
        .arg(&target)
        .status()?
        .success();
    let _ = std::fs::remove_file(&reference);
    if !same {
        bail!("the target differs from the source: this is a bug, please report it");
    }
    println!("  {} is identical to the source", target.display());
    println!(
        "\ndone in {:.1} s. Next: `ferry disk sync --help`, and `ferry appliance` for the migration workflow.",
        started.elapsed().as_secs_f64()
    );
    println!(
        "delta: {} sent for {} changed, final delta {:.2} s",
        human_bytes(delta.bytes_sent),
        human_bytes(changed),
        delta.duration_s
    );
    Ok(ExitCode::SUCCESS)
}

fn step(n: u32, title: &str, why: &str) {
    println!("\n[{n}/5] {title}\n  {why}");
}

fn qemu_img(args: &[&str], image: &Path, last: Option<&str>) -> Result<()> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(args).arg(image);
    if let Some(l) = last {
        cmd.arg(l);
    }
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes `total` bytes in blocks of `block` at random aligned places, half text, half
/// random, through a writable qemu-nbd (so the image's dirty bitmap records them).
async fn write_through_nbd(
    image: &Path,
    rng: &mut impl Rng,
    size: u64,
    total: u64,
    block: u64,
) -> Result<u64> {
    let writes: Vec<(u64, Vec<u8>)> = (0..total / block)
        .map(|i| {
            let at = rng.random_range(0..size / block) * block;
            let mut buf = vec![0u8; block as usize];
            if i % 2 == 0 {
                rng.fill_bytes(&mut buf);
            } else {
                let line = format!("{at:016x} ferry quickstart record {i}\n");
                for (j, b) in buf.iter_mut().enumerate() {
                    *b = line.as_bytes()[j % line.len()];
                }
            }
            (at, buf)
        })
        .collect();
    crate::cmd::util::write_via_qemu_nbd(image, "qcow2", &writes).await?;
    Ok(total / block * block)
}

async fn sync(
    source: &Path,
    target: &Path,
    bitmap: Option<&str>,
) -> Result<ferry_replication::SyncReport> {
    let disk = ferry_disk::open(
        source.to_str().context("non-UTF-8 path")?,
        &OpenOptions {
            format: Some("qcow2".into()),
            dirty_bitmap: bitmap.map(str::to_string),
            changed_areas: None,
        },
    )
    .await?;
    let opts = SendOptions {
        mode: if bitmap.is_some() {
            Mode::DirtyBitmap
        } else {
            Mode::HashCompare
        },
        compress: false,
        ..Default::default()
    };
    let target = target.to_path_buf();
    let size = disk.size();
    with_progress(false, size, |p| async move {
        ferry_replication::sync_local(&disk, &target, &opts, Arc::clone(&p)).await
    })
    .await
}
