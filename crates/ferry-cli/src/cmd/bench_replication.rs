//! `ferry bench replication`: Ferry's full and delta syncs side by side with
//! `qemu-img convert` (full copy) and `rsync -I --inplace --no-whole-file` (delta), on a
//! reproducible synthetic disk, with every result checked byte for byte.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

use crate::cmd::util::{human_bytes, parse_size, runtime};

#[derive(clap::Args)]
pub struct Args {
    /// Size of the synthetic disk.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    size: u64,
    /// Share of the disk changed between syncs, in percent (scattered 64 KiB writes).
    #[arg(long, default_value_t = 1.0)]
    change_percent: f64,
    /// Rounds of each measurement; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Working directory (needs about 5x --size of free space; sparse files).
    #[arg(long, default_value = "/var/tmp/ferry-bench")]
    dir: PathBuf,
    /// Seed of the synthetic disk and of the changes.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Skip the dirty-bitmap delta (needs qemu-img and qemu-nbd).
    #[arg(long)]
    skip_bitmap: bool,
    /// Print the results as one JSON object.
    #[arg(long)]
    json: bool,
    /// Keep the copies in --dir afterwards (by default only the synthetic source, which
    /// the next run reuses, is kept: the copies take several times its size).
    #[arg(long)]
    keep: bool,
}

#[derive(Serialize, Default)]
struct Results {
    disk_size: u64,
    data_bytes: u64,
    changed_bytes: u64,
    rounds: usize,
    /// `qemu-img convert` as users run it: cache=unsafe, nothing flushed to disk.
    full_qemu_img_s: f64,
    /// `qemu-img convert -t writeback`: flushed to disk at the end, as Ferry is.
    full_qemu_img_flushed_s: f64,
    /// The same data written straight to the disk by `dd oflag=direct bs=1M` (zero
    /// megabytes skipped, one request at a time, reading and writing in turn): about what
    /// the disk takes for a copy that is on it when it ends, as Ferry's is.
    full_disk_floor_s: f64,
    full_ferry_s: f64,
    full_ratio: f64,
    full_ratio_flushed: f64,
    full_ratio_floor: f64,
    /// Ferry between two processes over mutual TLS on loopback (`disk send` to a
    /// `disk receive`), zstd off as on any wire faster than the disk.
    full_tls_ferry_s: f64,
    full_tls_ratio: f64,
    full_ferry_bytes_sent: u64,
    delta_rsync_s: f64,
    delta_hash_ferry_s: f64,
    delta_hash_speedup: f64,
    delta_hash_bytes_sent: u64,
    /// Of what a hash-compare delta read, the bytes hashed with BLAKE3 (the digest memo
    /// vouches for the rest).
    delta_hash_bytes_read: u64,
    delta_hash_bytes_hashed: u64,
    delta_hash_sent_per_changed: f64,
    delta_bitmap_ferry_s: Option<f64>,
    delta_bitmap_speedup: Option<f64>,
    delta_bitmap_bytes_sent: Option<u64>,
    delta_bitmap_sent_per_changed: Option<f64>,
    /// Where a hash-compare delta's time went (medians over the rounds).
    delta_hash_profile: Profile,
    delta_bitmap_profile: Option<Profile>,
}

/// The parts of a timed `ferry disk sync`, in seconds: its report's phases, and what
/// the process spent outside the sync (starting, opening the source, which for a qcow2
/// starts a qemu-nbd, and stopping it all).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Profile {
    open_s: f64,
    transfer_s: f64,
    index_s: f64,
    commit_s: f64,
    outside_s: f64,
}

impl Profile {
    fn of(wall_s: f64, out: &str) -> Result<Profile> {
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).context("ferry --json output")?;
        let f = |key: &str| {
            v["phases"][key]
                .as_f64()
                .with_context(|| format!("no phases.{key} in {out}"))
        };
        let duration = v["duration_s"]
            .as_f64()
            .with_context(|| format!("no duration_s in {out}"))?;
        Ok(Profile {
            open_s: f("open_s")?,
            transfer_s: f("transfer_s")?,
            index_s: f("index_s")?,
            commit_s: f("commit_s")?,
            outside_s: (wall_s - duration).max(0.0),
        })
    }

    /// Field by field: the median of each part over the rounds.
    fn median(all: &[Profile]) -> Profile {
        let m = |f: fn(&Profile) -> f64| median(&all.iter().map(f).collect::<Vec<_>>());
        Profile {
            open_s: m(|p| p.open_s),
            transfer_s: m(|p| p.transfer_s),
            index_s: m(|p| p.index_s),
            commit_s: m(|p| p.commit_s),
            outside_s: m(|p| p.outside_s),
        }
    }

    fn describe(&self) -> String {
        let ms = |s: f64| s * 1000.0;
        format!(
            "open {:.1} ms, transfer {:.1} ms (index in after {:.1} ms), commit {:.1} ms; outside the sync {:.1} ms",
            ms(self.open_s),
            ms(self.transfer_s),
            ms(self.index_s),
            ms(self.commit_s),
            ms(self.outside_s)
        )
    }
}

const BLOCK: u64 = 64 * 1024;

pub fn run(args: Args) -> Result<ExitCode> {
    for tool in ["qemu-img", "rsync", "cmp", "dd"] {
        which(tool)?;
    }
    let ferry = std::env::current_exe().context("locating the ferry binary")?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let d = |name: &str| args.dir.join(name);
    // What Ferry keeps of a source between syncs (its digest memo) goes under a cache of
    // the bench's own, and every full copy starts without it, as a first sync does.
    let cache = d("cache");
    let ferry_cmd = || {
        let mut c = Command::new(&ferry);
        c.env("XDG_CACHE_HOME", &cache);
        c
    };
    let forget = || {
        let _ = std::fs::remove_dir_all(&cache);
    };
    let src = d("source.raw");
    let data_bytes = synthetic_disk(&src, args.size, args.seed)?;
    let say = |m: String| {
        if !args.json {
            eprintln!("{m}");
        }
    };
    say(format!(
        "synthetic disk {} ({} of data: zeros, text and random), {} round(s)",
        human_bytes(args.size),
        human_bytes(data_bytes),
        args.rounds
    ));

    let mut r = Results {
        disk_size: args.size,
        data_bytes,
        rounds: args.rounds,
        ..Default::default()
    };

    // Full copy. Every timed run starts with the page cache holding the source and no
    // dirty data left over from the previous run.
    let (mut t_qemu, mut t_qemu_wb, mut t_ferry) = (Vec::new(), Vec::new(), Vec::new());
    let mut t_floor = Vec::new();
    for round in 0..args.rounds {
        remove(&d("direct.raw"));
        settle()?;
        t_floor.push(
            time(
                Command::new("dd")
                    .arg(format!("if={}", src.display()))
                    .arg(format!("of={}", d("direct.raw").display()))
                    .args(["bs=1M", "oflag=direct", "conv=sparse,fsync", "status=none"]),
            )?
            .0,
        );
        remove(&d("qemu.raw"));
        settle()?;
        t_qemu.push(
            time(
                Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "raw"])
                    .arg(&src)
                    .arg(d("qemu.raw")),
            )?
            .0,
        );
        remove(&d("qemu.raw"));
        settle()?;
        t_qemu_wb.push(
            time(
                Command::new("qemu-img")
                    .args(["convert", "-t", "writeback", "-f", "raw", "-O", "raw"])
                    .arg(&src)
                    .arg(d("qemu.raw")),
            )?
            .0,
        );
        remove_target(&d("ferry.raw"));
        forget();
        settle()?;
        let (t, out) = time(
            ferry_cmd()
                .args(["disk", "sync", "--json"])
                .arg(&src)
                .arg(d("ferry.raw")),
        )?;
        t_ferry.push(t);
        r.full_ferry_bytes_sent = json_u64(&out, "bytes_sent")?;
        say(format!(
            "full {round}: dd oflag=direct {:.2} s, qemu-img convert {:.2} s, with -t writeback {:.2} s, ferry {t:.2} s",
            t_floor[round], t_qemu[round], t_qemu_wb[round]
        ));
    }
    // The same full copy between two processes, over mutual TLS.
    let pki = d("pki");
    let _ = std::fs::remove_dir_all(&pki);
    let pki_arg = pki.to_str().context("the bench directory is not UTF-8")?;
    run_ok(ferry_cmd().args(["pki", "init", "--dir", pki_arg]))?;
    run_ok(ferry_cmd().args([
        "pki",
        "issue",
        "--dir",
        pki_arg,
        "receiver",
        "--san",
        "127.0.0.1",
    ]))?;
    run_ok(ferry_cmd().args(["pki", "issue", "--dir", pki_arg, "sender"]))?;
    let mut t_tls = Vec::new();
    for round in 0..args.rounds {
        remove_target(&d("tls.raw"));
        forget();
        let receiver = Receiver::start(&ferry, &d("tls.raw"), pki_arg)?;
        settle()?;
        let (t, _) = time(
            ferry_cmd()
                .args(["disk", "send", "--json", "--compress", "off"])
                .arg(&src)
                .args([
                    "--to",
                    &receiver.addr,
                    "--pki-dir",
                    pki_arg,
                    "--name",
                    "sender",
                ]),
        )?;
        drop(receiver);
        say(format!("full {round} over mutual TLS: ferry {t:.2} s"));
        t_tls.push(t);
    }
    same(&src, &d("tls.raw"))?;
    remove_target(&d("tls.raw"));
    let _ = std::fs::remove_dir_all(&pki);
    r.full_tls_ferry_s = median(&t_tls);
    same(&src, &d("direct.raw"))?;
    remove(&d("direct.raw"));
    same(&src, &d("qemu.raw"))?;
    // Gone before the deltas: a 4 GiB file nobody reads again would only take disk
    // space and crowd the page cache the delta tools work from.
    remove(&d("qemu.raw"));
    same(&src, &d("ferry.raw"))?;
    r.full_qemu_img_s = median(&t_qemu);
    r.full_qemu_img_flushed_s = median(&t_qemu_wb);
    r.full_ferry_s = median(&t_ferry);
    r.full_ratio = r.full_ferry_s / r.full_qemu_img_s;
    r.full_ratio_flushed = r.full_ferry_s / r.full_qemu_img_flushed_s;
    r.full_disk_floor_s = median(&t_floor);
    r.full_ratio_floor = r.full_ferry_s / r.full_disk_floor_s;
    r.full_tls_ratio = r.full_tls_ferry_s / r.full_qemu_img_s;

    // Baselines for the deltas: rsync's copy, and a qcow2 twin carrying a dirty bitmap.
    remove(&d("rsync.raw"));
    run_ok(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(&src)
            .arg(d("rsync.raw")),
    )?;
    let qcow = d("source.qcow2");
    if !args.skip_bitmap {
        remove(&qcow);
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&src)
                .arg(&qcow),
        )?;
        remove_target(&d("bitmap.raw"));
        run_ok(
            ferry_cmd()
                .args(["disk", "sync", "--json"])
                .arg(&qcow)
                .arg(d("bitmap.raw")),
        )?;
    }

    let (mut t_rsync, mut t_hash, mut t_bitmap) = (Vec::new(), Vec::new(), Vec::new());
    let (mut p_hash, mut p_bitmap) = (Vec::new(), Vec::new());
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed ^ 0xde17a);
    let rt = runtime()?;
    for round in 0..args.rounds {
        if !args.skip_bitmap {
            let _ = Command::new("qemu-img")
                .args(["bitmap", "--remove"])
                .arg(&qcow)
                .arg("bm0")
                .output();
            run_ok(
                Command::new("qemu-img")
                    .args(["bitmap", "--add"])
                    .arg(&qcow)
                    .arg("bm0"),
            )?;
        }
        let changes = make_changes(&mut rng, args.size, args.change_percent);
        r.changed_bytes = changes.len() as u64 * BLOCK;
        apply_raw(&src, &changes)?;
        if !args.skip_bitmap {
            rt.block_on(crate::cmd::util::write_via_qemu_nbd(
                &qcow, "qcow2", &changes,
            ))?;
            run_ok(
                Command::new("qemu-img")
                    .args(["bitmap", "--disable"])
                    .arg(&qcow)
                    .arg("bm0"),
            )?;
        }
        // Each timed delta starts with what it reads in the page cache, as each full
        // copy starts with the source there: whatever ran before it (and the checks of
        // the last round) would otherwise decide which tool finds its input cached.
        // rsync reads its old copy whole as well as the source; Ferry reads the source
        // (for a dirty-bitmap delta, its qcow2) and the target's index.
        settle()?;
        warm(&[&src, &d("rsync.raw")])?;
        let (tr, _) = time(
            Command::new("rsync")
                .args(["-I", "--inplace", "--no-whole-file"])
                .arg(&src)
                .arg(d("rsync.raw")),
        )?;
        t_rsync.push(tr);
        settle()?;
        warm(&[&src])?;
        let (th, out) = time(
            ferry_cmd()
                .args(["disk", "sync", "--json"])
                .arg(&src)
                .arg(d("ferry.raw")),
        )?;
        t_hash.push(th);
        p_hash.push(Profile::of(th, &out)?);
        r.delta_hash_bytes_sent = json_u64(&out, "bytes_sent")?;
        r.delta_hash_bytes_read = json_u64(&out, "bytes_read")?;
        r.delta_hash_bytes_hashed = json_u64(&out, "bytes_hashed")?;
        let mut line = format!("delta {round}: rsync {tr:.2} s, ferry hash compare {th:.2} s");
        if !args.skip_bitmap {
            settle()?;
            warm(&[&qcow])?;
            let (tb, out) = time(
                ferry_cmd()
                    .args(["disk", "sync", "--json", "--dirty-bitmap", "bm0"])
                    .arg(&qcow)
                    .arg(d("bitmap.raw")),
            )?;
            t_bitmap.push(tb);
            p_bitmap.push(Profile::of(tb, &out)?);
            r.delta_bitmap_bytes_sent = Some(json_u64(&out, "bytes_sent")?);
            line += &format!(", ferry dirty bitmap {tb:.2} s");
        }
        say(line);
        same(&src, &d("rsync.raw"))?;
        same(&src, &d("ferry.raw"))?;
        if !args.skip_bitmap {
            same(&src, &d("bitmap.raw"))?;
        }
    }
    r.delta_rsync_s = median(&t_rsync);
    r.delta_hash_ferry_s = median(&t_hash);
    r.delta_hash_speedup = r.delta_rsync_s / r.delta_hash_ferry_s;
    r.delta_hash_sent_per_changed = r.delta_hash_bytes_sent as f64 / r.changed_bytes as f64;
    r.delta_hash_profile = Profile::median(&p_hash);
    if !args.skip_bitmap {
        let tb = median(&t_bitmap);
        r.delta_bitmap_ferry_s = Some(tb);
        r.delta_bitmap_speedup = Some(r.delta_rsync_s / tb);
        r.delta_bitmap_profile = Some(Profile::median(&p_bitmap));
        r.delta_bitmap_sent_per_changed = r
            .delta_bitmap_bytes_sent
            .map(|b| b as f64 / r.changed_bytes as f64);
    }

    if !args.keep {
        for f in ["rsync.raw", "source.qcow2"] {
            remove(&d(f));
        }
        for f in ["ferry.raw", "bitmap.raw"] {
            remove_target(&d(f));
        }
        forget();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_table(&r);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(r: &Results) {
    let mut t = comfy_table::Table::new();
    t.set_header(vec![
        "measure",
        "baseline",
        "ferry",
        "ratio",
        "bytes sent / changed",
    ]);
    t.add_row(vec![
        "full copy".to_string(),
        format!("qemu-img convert {:.2} s", r.full_qemu_img_s),
        format!("{:.2} s", r.full_ferry_s),
        format!("{:.2}x the time", r.full_ratio),
        format!("{} sent", human_bytes(r.full_ferry_bytes_sent)),
    ]);
    t.add_row(vec![
        "full copy, flushed".to_string(),
        format!(
            "qemu-img convert -t writeback {:.2} s",
            r.full_qemu_img_flushed_s
        ),
        format!("{:.2} s", r.full_ferry_s),
        format!("{:.2}x the time", r.full_ratio_flushed),
        String::new(),
    ]);
    t.add_row(vec![
        "full copy over mutual TLS".to_string(),
        format!("qemu-img convert {:.2} s", r.full_qemu_img_s),
        format!("{:.2} s", r.full_tls_ferry_s),
        format!("{:.2}x the time", r.full_tls_ratio),
        "two processes, loopback".to_string(),
    ]);
    t.add_row(vec![
        "full copy vs a direct dd".to_string(),
        format!("dd oflag=direct {:.2} s", r.full_disk_floor_s),
        format!("{:.2} s", r.full_ferry_s),
        format!("{:.2}x the time", r.full_ratio_floor),
        String::new(),
    ]);
    t.add_row(vec![
        "delta, hash compare".to_string(),
        format!("rsync {:.2} s", r.delta_rsync_s),
        format!("{:.2} s", r.delta_hash_ferry_s),
        format!("{:.1}x faster", r.delta_hash_speedup),
        format!("{:.3}", r.delta_hash_sent_per_changed),
    ]);
    if let (Some(tb), Some(s), Some(b)) = (
        r.delta_bitmap_ferry_s,
        r.delta_bitmap_speedup,
        r.delta_bitmap_sent_per_changed,
    ) {
        t.add_row(vec![
            "delta, dirty bitmap".to_string(),
            format!("rsync {:.2} s", r.delta_rsync_s),
            format!("{tb:.2} s"),
            format!("{s:.1}x faster"),
            format!("{b:.3}"),
        ]);
    }
    println!(
        "disk {} ({} data), change {} in 64 KiB blocks, median of {} round(s)\n{t}",
        human_bytes(r.disk_size),
        human_bytes(r.data_bytes),
        human_bytes(r.changed_bytes),
        r.rounds
    );
    println!("where a Ferry delta's time goes (medians):");
    println!(
        "  hash compare: {}; read {}, hashed {}",
        r.delta_hash_profile.describe(),
        human_bytes(r.delta_hash_bytes_read),
        human_bytes(r.delta_hash_bytes_hashed)
    );
    if let Some(p) = &r.delta_bitmap_profile {
        println!("  dirty bitmap: {}", p.describe());
    }
}

/// Builds (or reuses) the synthetic disk: per 1 MiB region, 40% zeros (holes), 30% text
/// (compresses about 4:1), 30% random. Returns the bytes of data it holds.
fn synthetic_disk(path: &Path, size: u64, seed: u64) -> Result<u64> {
    let recipe = format!("v1 size={size} seed={seed}\n");
    let stamp = path.with_extension("recipe");
    const REGION: u64 = 1 << 20;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let words: Vec<&str> = "the quick brown fox jumps over lazy dog ferry moves disks from vmware into kvm while engineers sleep at two in the morning record log entry status ok error warning user request served bytes".split(' ').collect();
    let mut plan = Vec::new();
    for region in 0..size.div_ceil(REGION) {
        plan.push((region, rng.random_range(0..10u32)));
    }
    let data_bytes: u64 = plan
        .iter()
        .filter(|p| p.1 >= 4)
        .map(|p| REGION.min(size - p.0 * REGION))
        .sum();
    // Reused only if untouched since it was made (the deltas write into it).
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let untouched = matches!((modified(path), modified(&stamp)), (Some(d), Some(s)) if d <= s);
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(recipe.as_str())
        && std::fs::metadata(path).map(|m| m.len()).ok() == Some(size)
        && untouched
    {
        return Ok(data_bytes);
    }
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    let mut buf = vec![0u8; REGION as usize];
    for (region, class) in plan {
        let off = region * REGION;
        let len = REGION.min(size - off) as usize;
        match class {
            0..=3 => continue,
            4..=6 => {
                let mut pos = 0;
                while pos < len {
                    let w = words[rng.random_range(0..words.len())].as_bytes();
                    let n = w.len().min(len - pos);
                    buf[pos..pos + n].copy_from_slice(&w[..n]);
                    pos += n;
                    if pos < len {
                        buf[pos] = if rng.random_range(0..12) == 0 {
                            b'\n'
                        } else {
                            b' '
                        };
                        pos += 1;
                    }
                }
            }
            _ => rng.fill_bytes(&mut buf[..len]),
        }
        f.write_all_at(&buf[..len], off)?;
    }
    f.sync_all()?;
    std::fs::write(&stamp, recipe)?;
    Ok(data_bytes)
}

/// Distinct random 64 KiB-aligned blocks covering `percent` of the disk, with new random
/// contents.
fn make_changes(rng: &mut impl Rng, size: u64, percent: f64) -> Vec<(u64, Vec<u8>)> {
    let blocks = size / BLOCK;
    let n = ((blocks as f64) * percent / 100.0).round() as u64;
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < n.min(blocks) {
        chosen.insert(rng.random_range(0..blocks));
    }
    chosen
        .into_iter()
        .map(|b| {
            let mut data = vec![0u8; BLOCK as usize];
            rng.fill_bytes(&mut data);
            (b * BLOCK, data)
        })
        .collect()
}

fn apply_raw(path: &Path, changes: &[(u64, Vec<u8>)]) -> Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    for (off, data) in changes {
        f.write_all_at(data, *off)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Flushes dirty data left by the previous step, so it is not billed to the next one.
/// Lets the machine settle before a timed run: dirty data flushed, then a pause. On a
/// virtual disk the host is still writing out what the guest's flush handed it; a run
/// started at once pays for its predecessor (the tools that flush, most of all).
fn settle() -> Result<()> {
    run_ok(&mut Command::new("sync"))?;
    std::thread::sleep(std::time::Duration::from_secs(1));
    Ok(())
}

/// Reads files through once, so that the page cache holds them.
fn warm(paths: &[&Path]) -> Result<()> {
    use std::io::Read;
    let mut buf = vec![0u8; 1 << 20];
    for p in paths {
        let mut f = File::open(p).with_context(|| format!("reading {}", p.display()))?;
        while f
            .read(&mut buf)
            .with_context(|| format!("reading {}", p.display()))?
            > 0
        {}
    }
    Ok(())
}

fn time(cmd: &mut Command) -> Result<(f64, String)> {
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let t = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((t, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    time(cmd).map(|_| ())
}

fn same(a: &Path, b: &Path) -> Result<()> {
    let ok = Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()?
        .success();
    if !ok {
        bail!(
            "{} differs from {}: the copy is wrong",
            b.display(),
            a.display()
        );
    }
    Ok(())
}

fn json_u64(out: &str, key: &str) -> Result<u64> {
    let v: serde_json::Value = serde_json::from_str(out.trim()).context("ferry --json output")?;
    v[key]
        .as_u64()
        .with_context(|| format!("no {key} in {out}"))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

/// A `ferry disk receive` on a free loopback port, stopped when dropped.
struct Receiver {
    child: std::process::Child,
    addr: String,
}

impl Receiver {
    fn start(ferry: &Path, dst: &Path, pki: &str) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(ferry)
            .args(["disk", "receive"])
            .arg(dst)
            .args(["--listen", &addr, "--pki-dir", pki, "--name", "receiver"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting ferry disk receive")?;
        let receiver = Self { child, addr };
        let until = Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(&receiver.addr).is_err() {
            if Instant::now() > until {
                bail!(
                    "ferry disk receive did not listen on {} within 10 s",
                    receiver.addr
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(receiver)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn remove(p: &Path) {
    let _ = std::fs::remove_file(p);
}

fn remove_target(p: &Path) {
    remove(p);
    let mut side = p.as_os_str().to_owned();
    side.push(".ferry");
    let _ = std::fs::remove_dir_all(PathBuf::from(side));
}

fn which(tool: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        bail!("{tool} is not installed: run scripts/install-deps.sh (the benchmark compares against it)");
    }
    Ok(())
}
