//! The image a commit writes into: a raw file directly, or a qcow2 image (what KVM and
//! VME keep volumes in) through a `qemu-nbd` that Ferry starts. The target code runs on
//! blocking threads; NBD calls are driven from there on the runtime's handle.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use ferry_nbd::{NbdClient, QemuNbd, QemuNbdOptions};
use tokio::runtime::Handle;

/// Image formats a target can be kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// The format Ferry keeps a target at `dst` in, from its name alone: `*.qcow2` is
    /// qcow2, anything else raw. Never from the file's contents: a raw target holds a
    /// guest's bytes, and a guest may well have written a qcow2 header at its start.
    pub fn for_name(dst: &Path) -> Format {
        match dst.extension().and_then(|e| e.to_str()) {
            Some("qcow2") => Format::Qcow2,
            _ => Format::Raw,
        }
    }

    /// The format named `name` (as [`Format::name`] spells it).
    pub fn parse(name: &str) -> Option<Format> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// How long `qemu-img resize` of a qcow2 target may take (it rewrites a few tables).
const RESIZE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long starting the target's `qemu-nbd` and connecting to it may take.
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `qemu-img convert` of a new qcow2 target may take: ten minutes, plus a
/// second for every 16 MiB of disk (it copies the allocated part; far slower storage than
/// that is broken storage).
fn convert_timeout(size: u64) -> Duration {
    Duration::from_secs(600 + size / (16 << 20))
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// An image open for writing chunks.
pub enum Sink {
    File(File),
    Nbd {
        client: NbdClient,
        server: Box<QemuNbd>,
        rt: Handle,
    },
}

impl Sink {
    /// Opens `path` for writing, sized to `size` bytes.
    pub fn open(path: &Path, format: Format, size: u64) -> std::io::Result<Sink> {
        match format {
            Format::Raw => {
                let file = OpenOptions::new().read(true).write(true).open(path)?;
                file.set_len(size)?;
                Ok(Sink::File(file))
            }
            Format::Qcow2 => {
                // Absolute: QEMU takes a relative name with a colon in it for a protocol.
                let path = &std::path::absolute(path)?;
                let mut resize: Vec<std::ffi::OsString> =
                    ["resize", "-q", "-f", "qcow2", "--shrink", "--"]
                        .iter()
                        .map(Into::into)
                        .collect();
                resize.push(path.into());
                resize.push(size.to_string().into());
                ferry_disk::qemu_img::run_blocking(resize, RESIZE_TIMEOUT).map_err(other)?;
                let rt = Handle::current();
                let serve = async {
                    let server = QemuNbd::start(
                        path,
                        QemuNbdOptions {
                            read_only: false,
                            ..QemuNbdOptions::new("qcow2")
                        },
                    )
                    .await
                    .map_err(other)?;
                    let client = NbdClient::connect(&server.target(), Default::default())
                        .await
                        .map_err(other)?;
                    Ok::<_, std::io::Error>((client, server))
                };
                let (client, server) = rt
                    .block_on(async { tokio::time::timeout(SERVE_TIMEOUT, serve).await })
                    .map_err(|_| {
                        other(format!(
                            "{}: qemu-nbd did not serve the qcow2 target within {} s",
                            path.display(),
                            SERVE_TIMEOUT.as_secs()
                        ))
                    })??;
                Ok(Sink::Nbd {
                    client,
                    server: Box::new(server),
                    rt,
                })
            }
        }
    }

    pub fn write(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::File(f) => f.write_all_at(bytes, offset),
            Sink::Nbd { client, rt, .. } => rt.block_on(client.write(offset, bytes)).map_err(other),
        }
    }

    /// Makes a range read as zeros, freeing its space where the format can.
    pub fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match self {
            Sink::File(f) => crate::target::punch_zero(f, offset, len),
            Sink::Nbd { client, rt, .. } => rt
                .block_on(client.write_zeroes(offset, len, true))
                .map_err(other),
        }
    }

    /// A helper that starts writing back what was written so far (raw files only).
    pub fn writeback(&self) -> Option<Writeback> {
        match self {
            Sink::File(f) => Writeback::new(f).ok(),
            Sink::Nbd { .. } => None,
        }
    }

    /// Everything written is on stable storage (and the qemu-nbd is gone).
    pub fn finish(self) -> std::io::Result<()> {
        match self {
            Sink::File(f) => f.sync_all(),
            Sink::Nbd { client, server, rt } => rt.block_on(async move {
                client.flush().await.map_err(other)?;
                client.disconnect().await.map_err(other)?;
                server.stop().await.map_err(other)
            }),
        }
    }
}

/// Writes the raw image `raw` (of `size` bytes) as a new qcow2 image `out`, flushed.
pub fn raw_to_qcow2(raw: &Path, out: &Path, size: u64) -> std::io::Result<()> {
    let _ = std::fs::remove_file(out);
    let (raw, out) = (std::path::absolute(raw)?, std::path::absolute(out)?);
    let mut args: Vec<std::ffi::OsString> = [
        "convert",
        "-q",
        "-t",
        "writeback",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "--",
    ]
    .iter()
    .map(Into::into)
    .collect();
    args.push(raw.into_os_string());
    args.push(out.clone().into_os_string());
    ferry_disk::qemu_img::run_blocking(args, convert_timeout(size)).map_err(other)?;
    File::open(&out)?.sync_all()
}

/// An existing target image opened for reading, to index it, as `format` (stated: never
/// guessed from its header).
pub fn open_for_reading(path: &Path, format: Format) -> Result<ferry_disk::AnyDisk, String> {
    let spec = path.to_str().ok_or("non-UTF-8 path")?;
    Handle::current()
        .block_on(ferry_disk::open(
            spec,
            &ferry_disk::OpenOptions {
                format: Some(format.name().into()),
                dirty_bitmap: None,
                changed_areas: None,
            },
        ))
        .map_err(|e| e.to_string())
}

/// Starts writeback of a file from a thread of its own, so whoever writes the data never
/// waits for the device to take requests: the disk works while data keeps coming, and
/// the final flush finds little left to do. Kicks made while one runs are merged.
/// Advisory: a failure only makes the final flush longer.
pub struct Writeback {
    kick: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writeback {
    pub fn new(file: &File) -> std::io::Result<Writeback> {
        use std::os::unix::io::AsRawFd;
        let file = file.try_clone()?;
        let (kick, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("ferry-writeback".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    // SAFETY: plain syscall on a descriptor this thread owns.
                    unsafe {
                        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
                    };
                }
            })?;
        Ok(Writeback {
            kick: Some(kick),
            thread: Some(thread),
        })
    }

    /// Asks for writeback of everything written so far; never blocks.
    pub fn kick(&self) {
        if let Some(k) = &self.kick {
            let _ = k.try_send(());
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        drop(self.kick.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_targets_format_comes_from_its_name_not_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        // A raw file whose bytes say qcow2 is still kept raw.
        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, b"QFI\xfb\0\0\0\x03").unwrap();
        assert_eq!(Format::for_name(&raw), Format::Raw);
        assert_eq!(Format::for_name(Path::new("/v/disk")), Format::Raw);
        assert_eq!(Format::for_name(Path::new("/v/disk.img")), Format::Raw);
        assert_eq!(Format::for_name(Path::new("/v/disk.qcow2")), Format::Qcow2);
        for f in [Format::Raw, Format::Qcow2] {
            assert_eq!(Format::parse(f.name()), Some(f));
        }
        assert_eq!(Format::parse("vmdk"), None);
    }

    #[test]
    fn qemu_img_runs_for_targets_have_deadlines_that_grow_with_the_disk() {
        assert_eq!(convert_timeout(0), Duration::from_secs(600));
        assert!(convert_timeout(2 << 40) > Duration::from_secs(100_000));
    }
}
