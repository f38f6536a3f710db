//! The image a commit writes into: a raw file directly, or a qcow2 image (what KVM and
//! VME keep volumes in) through a `qemu-nbd` that Ferry starts. The target code runs on
//! blocking threads; NBD calls are driven from there on the runtime's handle.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use ferry_nbd::{NbdClient, QemuNbd, QemuNbdOptions};
use tokio::runtime::Handle;

/// Image formats a target can be kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// The format of an existing image (from its header), or for a new one, from its
    /// name: `*.qcow2` is qcow2, anything else raw.
    pub fn of(dst: &Path) -> Result<Format, String> {
        if dst.exists() {
            let f = ferry_disk::sniff_format(dst).map_err(|e| e.to_string())?;
            return match f.as_str() {
                "raw" => Ok(Format::Raw),
                "qcow2" => Ok(Format::Qcow2),
                other => Err(format!(
                    "{}: a {other} image cannot be a sync target (raw or qcow2 only)",
                    dst.display()
                )),
            };
        }
        Ok(match dst.extension().and_then(|e| e.to_str()) {
            Some("qcow2") => Format::Qcow2,
            _ => Format::Raw,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
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
                qemu_img(
                    &["resize", "-q", "-f", "qcow2", "--shrink"],
                    path,
                    &size.to_string(),
                )?;
                let rt = Handle::current();
                let server = rt
                    .block_on(QemuNbd::start(
                        path,
                        QemuNbdOptions {
                            format: Some("qcow2".into()),
                            read_only: false,
                            ..Default::default()
                        },
                    ))
                    .map_err(other)?;
                let client = rt
                    .block_on(NbdClient::connect(&server.target(), Default::default()))
                    .map_err(other)?;
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

/// Writes the raw image `raw` as a new qcow2 image `out`, flushed.
pub fn raw_to_qcow2(raw: &Path, out: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(out);
    let status = Command::new("qemu-img")
        .args([
            "convert",
            "-q",
            "-t",
            "writeback",
            "-f",
            "raw",
            "-O",
            "qcow2",
        ])
        .arg(raw)
        .arg(out)
        .output()
        .map_err(|e| other(format!("cannot run qemu-img (install qemu-utils): {e}")))?;
    if !status.status.success() {
        return Err(other(format!(
            "qemu-img convert to qcow2 failed: {}",
            String::from_utf8_lossy(&status.stderr).trim()
        )));
    }
    File::open(out)?.sync_all()
}

fn qemu_img(args: &[&str], image: &Path, last: &str) -> std::io::Result<()> {
    let out = Command::new("qemu-img")
        .args(args)
        .arg(image)
        .arg(last)
        .output()
        .map_err(|e| other(format!("cannot run qemu-img (install qemu-utils): {e}")))?;
    if !out.status.success() {
        return Err(other(format!(
            "qemu-img {} {}: {}",
            args.join(" "),
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// An existing target image opened for reading, to index it.
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
