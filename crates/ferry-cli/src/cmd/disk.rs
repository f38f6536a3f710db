//! `ferry disk`: the replication engine on its own.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use ferry_disk::{Disk, OpenOptions};
use ferry_pki::{CaDir, Identity};
use ferry_replication::{Mode, Progress, SendOptions, SyncReport};

use crate::cmd::util::{human_bytes, parse_size, runtime};

#[derive(Subcommand)]
pub enum DiskCommand {
    /// Make DST a verified copy of SRC; run again for a delta (only changed chunks move).
    ///
    /// SRC: a raw image or block device, any image QEMU reads (qcow2, vmdk, vhdx: Ferry
    /// serves it with qemu-nbd), or an nbd:// / nbd+unix:// URI. Without --format, SRC's
    /// format is recognised from its header only when the image names no other file
    /// (backing file, data file, extents); state it otherwise. DST: a raw or qcow2 image
    /// path (qcow2 when named `*.qcow2`, raw otherwise: never guessed from its contents).
    /// Both ends run in this process and talk the same protocol as `send` and `receive`,
    /// over in-memory pipes (TLS protects bytes between machines, not inside one process).
    Sync {
        src: String,
        dst: PathBuf,
        #[command(flatten)]
        send: SendArgs,
    },
    /// Send SRC to a `ferry disk receive` on another machine.
    Send {
        src: String,
        /// HOST:PORT of the receiver.
        #[arg(long)]
        to: String,
        /// Name in the receiver's certificate (default: the host of --to).
        #[arg(long)]
        server_name: Option<String>,
        #[command(flatten)]
        identity: IdentityArgs,
        #[command(flatten)]
        send: SendArgs,
    },
    /// Receive syncs into DST (a raw or qcow2 image path) from `ferry disk send`.
    Receive {
        dst: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:7480")]
        listen: String,
        /// Exit after the first committed sync.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        identity: IdentityArgs,
    },
}

#[derive(Args)]
pub struct SendArgs {
    /// Read only the chunks this dirty bitmap marks (SRC must be an NBD export or qcow2
    /// image carrying it); without it, changes are found by hash compare.
    #[arg(long, value_name = "NAME")]
    dirty_bitmap: Option<String>,
    /// SRC's image format; `raw` reads the file as it is, whatever its first bytes say.
    /// Default: recognised from its header, and refused when that header names another
    /// file (a backing file, data file or extent), as a guest's raw disk may.
    #[arg(
        long,
        visible_alias = "src-format",
        value_name = "FORMAT",
        value_parser = clap::builder::PossibleValuesParser::new(ferry_disk::FORMATS)
    )]
    format: Option<String>,
    /// Chunk size: a power of two from 4K to 4M.
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    chunk_size: u64,
    /// Parallel data streams.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// zstd on the wire (auto: on between machines, off on loopback where the wire is
    /// never the bottleneck).
    #[arg(long, value_enum, default_value_t = Compress::Auto)]
    compress: Compress,
    /// Times to resume after an interruption before giving up.
    #[arg(long, default_value_t = 3)]
    retries: u32,
    /// Bandwidth limit, bytes per second over all streams (e.g. 100M).
    #[arg(long, value_parser = parse_size)]
    max_rate: Option<u64>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Fetch the target's index on every sync instead of keeping it between syncs (in
    /// ~/.cache/ferry/indexes; a receiver then sends it only when it is not the one
    /// kept).
    #[arg(long)]
    no_index_cache: bool,
    /// Hash every chunk a hash-compare sync reads, instead of only those whose
    /// fingerprint changed since the last sync of this source (fingerprints and digests
    /// are kept in ~/.cache/ferry/digests).
    #[arg(long)]
    no_digest_memo: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Compress {
    Auto,
    On,
    Off,
}

#[derive(Args)]
pub struct IdentityArgs {
    /// Directory made by `ferry pki init` holding this end's certificate.
    #[arg(long, value_name = "DIR", env = "FERRY_PKI_DIR")]
    pki_dir: Option<PathBuf>,
    /// Name of this end's certificate in --pki-dir (NAME.pem / NAME.key).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Certificate, key and CA files (instead of --pki-dir/--name).
    #[arg(long, requires_all = ["key", "ca"])]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    #[arg(long)]
    ca: Option<PathBuf>,
}

impl IdentityArgs {
    fn load(&self) -> Result<Identity> {
        if let (Some(cert), Some(key), Some(ca)) = (&self.cert, &self.key, &self.ca) {
            return Identity::from_files(cert, key, ca).context("loading the TLS identity");
        }
        let (Some(dir), Some(name)) = (&self.pki_dir, &self.name) else {
            anyhow::bail!(
                "no certificate given: pass --pki-dir DIR --name NAME (made with `ferry pki init` and `ferry pki issue`), or --cert/--key/--ca"
            );
        };
        CaDir::new(dir)
            .identity(name)
            .with_context(|| format!("loading certificate {name:?} from {}", dir.display()))
    }
}

pub fn run(cmd: DiskCommand) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        match cmd {
            DiskCommand::Sync { src, dst, send } => {
                let opts = send_options(&send, false)?;
                // The target's session begins while qemu-nbd (if any) starts.
                let (disk, local) = tokio::join!(open_source(&src, &send), async {
                    let local = ferry_replication::LocalTarget::prepare(&dst).await?;
                    local.begin_early(opts.chunk_size, &src).await;
                    Ok::<_, ferry_replication::SyncError>(local)
                });
                let (disk, local) = (disk?, local?);
                let report = with_progress(send.json, disk.size(), |p| async move {
                    local.sync(&disk, &opts, p).await
                })
                .await
                .with_context(|| format!("sync of {src} to {} failed", dst.display()))?;
                print_report(&report, send.json);
            }
            DiskCommand::Send {
                src,
                to,
                server_name,
                identity,
                send,
            } => {
                let identity = identity.load()?;
                let endpoint =
                    ferry_replication::Endpoint::new(&to, server_name.as_deref(), &identity)?;
                let disk = open_source(&src, &send).await?;
                let opts = send_options(&send, true)?;
                let report = with_progress(send.json, disk.size(), |p| async move {
                    ferry_replication::send(&disk, &endpoint, &opts, p).await
                })
                .await
                .with_context(|| format!("sending {src} to {to} failed"))?;
                print_report(&report, send.json);
            }
            DiskCommand::Receive {
                dst,
                listen,
                once,
                identity,
            } => {
                let identity = identity.load()?;
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                eprintln!(
                    "receiving into {} on {} (mutual TLS)",
                    dst.display(),
                    listener.local_addr()?
                );
                let receiver = ferry_replication::Receiver::new(dst.clone());
                let mut commits = receiver.commits();
                let server = tokio::spawn(
                    std::sync::Arc::clone(&receiver)
                        .serve(listener, ferry_replication::acceptor(&identity)?),
                );
                loop {
                    commits.changed().await?;
                    if let Some(r) = commits.borrow().clone() {
                        eprintln!(
                            "committed generation {} of {} ({} written, {} chunks applied)",
                            r.commit.generation,
                            dst.display(),
                            human_bytes(r.bytes_written),
                            r.commit.chunks_applied
                        );
                    }
                    if once {
                        break;
                    }
                }
                server.abort();
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

async fn open_source(src: &str, send: &SendArgs) -> Result<ferry_disk::AnyDisk> {
    ferry_disk::open(
        src,
        &OpenOptions {
            format: send.format.clone(),
            dirty_bitmap: send.dirty_bitmap.clone(),
            changed_areas: None,
        },
    )
    .await
    .with_context(|| format!("cannot open source {src}"))
}

fn send_options(args: &SendArgs, remote: bool) -> Result<SendOptions> {
    let chunk_size = u32::try_from(args.chunk_size).context("chunk size too large")?;
    Ok(SendOptions {
        chunk_size,
        streams: args.streams.clamp(1, 64),
        compress: match args.compress {
            Compress::On => true,
            Compress::Off => false,
            Compress::Auto => remote,
        },
        mode: if args.dirty_bitmap.is_some() {
            Mode::DirtyBitmap
        } else {
            Mode::HashCompare
        },
        work_dir: None,
        retries: args.retries,
        max_rate: args.max_rate,
        // In one process the index is a local copy away; between machines, a large
        // disk's index is gigabytes on the wire.
        index_cache: (remote && !args.no_index_cache)
            .then(|| cache_dir("indexes"))
            .flatten(),
        digest_memo: (!args.no_digest_memo)
            .then(|| cache_dir("digests"))
            .flatten(),
    })
}

/// Runs `f` with a progress bar on stderr (hidden with --json or without a terminal).
pub(crate) async fn with_progress<F, Fut>(json: bool, size: u64, f: F) -> Result<SyncReport>
where
    F: FnOnce(Arc<Progress>) -> Fut,
    Fut: std::future::Future<Output = Result<SyncReport, ferry_replication::SyncError>>,
{
    let progress = Arc::new(Progress::default());
    let bar = if json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(size)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
        )
        .unwrap(),
    );
    let ticker = {
        let p = Arc::clone(&progress);
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(Progress::get(&p.scanned));
                bar.set_message(format!(
                    "sent {} · {} chunks changed",
                    human_bytes(Progress::get(&p.bytes_sent)),
                    Progress::get(&p.chunks_changed)
                ));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let result = f(Arc::clone(&progress)).await;
    ticker.abort();
    bar.finish_and_clear();
    Ok(result?)
}

pub(crate) fn print_report(r: &SyncReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).expect("report serialises"));
        return;
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    let kind = if r.full {
        "full"
    } else if r.mode == Mode::DirtyBitmap {
        "delta (dirty bitmap)"
    } else {
        "delta (hash compare)"
    };
    let rows: Vec<(&str, String)> = vec![
        ("source", r.source.clone()),
        ("target", r.target.clone()),
        (
            "sync",
            format!("{kind}{}", if r.resumed { ", resumed" } else { "" }),
        ),
        ("generation", r.generation.to_string()),
        ("disk size", human_bytes(r.disk_size)),
        ("scanned", human_bytes(r.bytes_scanned)),
        ("read", human_bytes(r.bytes_read)),
        ("hashed", human_bytes(r.bytes_hashed)),
        ("sent", human_bytes(r.bytes_sent)),
        ("written", human_bytes(r.bytes_written)),
        (
            "chunks changed",
            format!(
                "{} of {} ({} zeroed)",
                r.chunks_changed, r.chunks_total, r.chunks_zeroed
            ),
        ),
        ("duration", format!("{:.2} s", r.duration_s)),
        (
            "of which",
            format!(
                "open {:.3} s, transfer {:.3} s (index in after {:.3} s), commit {:.3} s",
                r.phases.open_s, r.phases.transfer_s, r.phases.index_s, r.phases.commit_s
            ),
        ),
        ("throughput", format!("{:.0} MiB/s", r.throughput_mib_s)),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_string(), v]);
    }
    println!("{t}");
}

/// `$XDG_CACHE_HOME/ferry/NAME`, or `~/.cache/ferry/NAME`.
fn cache_dir(name: &str) -> Option<PathBuf> {
    let nonempty = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    nonempty("XDG_CACHE_HOME")
        .or_else(|| nonempty("HOME").map(|h| h.join(".cache")))
        .map(|c| c.join("ferry").join(name))
}
