//! Opening a disk from what a user typed: a path (raw, or any QEMU format served by a
//! `qemu-nbd` that Ferry starts) or an NBD URI.
//!
//! A guest controls every byte of its disks, so the bytes of an image are never trusted
//! to say how to open it. Where the caller states the format, that is the format, whatever
//! the header says (`raw` reads the file as it is). Where it does not, the format is
//! recognised from the header ([`sniff_format`]) but accepted only for an image that
//! names no other file: no backing file, no external data file, no extent files
//! (`qemu-img info -f FORMAT` says so). A guest that wrote a qcow2 header naming
//! `/etc/shadow` into its raw disk is refused, never served as qcow2; and a guessed image
//! is served with its backing file switched off all the same, in case its header changed
//! between the look and the open.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_nbd::{NbdTarget, QemuNbd, QemuNbdOptions};

use crate::qemu_img;
use crate::{Disk, DiskError, Extent, NbdDisk, RawDisk};

/// The image formats a caller may state: what QEMU reads and Ferry has a use for. Not
/// QEMU's protocol drivers (`file`, `nbd`, ...), which are no image formats.
pub const FORMATS: &[&str] = &["raw", "qcow2", "qed", "vmdk", "vhdx", "vpc", "vdi"];

/// How long starting a `qemu-nbd` and connecting to it may take, all told.
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);

/// How to open a disk.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Image format, one of [`FORMATS`]: the file is read as that, whatever its header
    /// says. `None` = recognise it from the file's header, accepted only for an image
    /// that names no other file (see the module documentation).
    pub format: Option<String>,
    /// Dirty bitmap to read changes from (NBD exports and qcow2 images only).
    pub dirty_bitmap: Option<String>,
    /// Changed areas `(offset, length)` the platform listed (VMware CBT); NBD exports only.
    pub changed_areas: Option<Vec<(u64, u64)>>,
}

/// Either kind of disk, so callers need no generics or boxing.
#[derive(Clone)]
pub enum AnyDisk {
    Raw(RawDisk),
    Nbd(NbdDisk),
}

/// The formats a caller may state, for messages: `raw|qcow2|...`.
pub(crate) fn format_choices() -> String {
    FORMATS.join("|")
}

/// Checks that `format` is one of [`FORMATS`].
pub fn check_format(disk: &str, format: &str) -> Result<(), DiskError> {
    if FORMATS.contains(&format) {
        return Ok(());
    }
    Err(DiskError::UnknownFormat {
        disk: disk.to_string(),
        format: format.to_string(),
    })
}

/// Opens `spec`: an `nbd://` / `nbd+unix://` URI, or a path to an image file or block
/// device.
pub async fn open(spec: &str, opts: &OpenOptions) -> Result<AnyDisk, DiskError> {
    if spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") {
        let target = NbdTarget::parse_uri(spec).map_err(|source| DiskError::Nbd {
            disk: spec.to_string(),
            source,
        })?;
        let mut disk = tokio::time::timeout(
            SERVE_TIMEOUT,
            NbdDisk::connect(
                spec.to_string(),
                &target,
                opts.dirty_bitmap.as_deref(),
                None,
            ),
        )
        .await
        .map_err(|_| DiskError::TimedOut {
            disk: spec.to_string(),
            what: "connecting to the NBD export".into(),
            timeout: SERVE_TIMEOUT,
        })??;
        if let Some(areas) = &opts.changed_areas {
            disk = disk.with_changed_areas(areas.clone());
        }
        return Ok(AnyDisk::Nbd(disk));
    }
    if opts.changed_areas.is_some() {
        return Err(DiskError::Unsupported(format!(
            "{spec}: a list of changed areas applies to NBD exports only"
        )));
    }
    let path = Path::new(spec);
    let (format, guessed) = match &opts.format {
        Some(f) => {
            check_format(spec, f)?;
            (f.clone(), false)
        }
        None => (sniff_format(path)?, true),
    };
    if format == "raw" {
        if let Some(bitmap) = &opts.dirty_bitmap {
            return Err(DiskError::Unsupported(format!(
                "{spec}: a raw image carries no dirty bitmap ({bitmap:?}); use a qcow2 image or an NBD export that serves the bitmap, or sync without --dirty-bitmap (hash compare)"
            )));
        }
        return Ok(AnyDisk::Raw(RawDisk::open(path)?));
    }
    // QEMU takes a relative name with a colon in it ("nbd:host:10809") for a protocol
    // and an address; an absolute path is always a file.
    let absolute = std::path::absolute(path).map_err(|source| DiskError::Io {
        disk: spec.to_string(),
        source,
    })?;
    let image = if guessed {
        refuse_references(spec, &absolute, &format).await?;
        without_backing(spec, &absolute, &format)?
    } else {
        absolute
    };
    let serve = async {
        let server = QemuNbd::start(
            &image,
            QemuNbdOptions {
                read_only: true,
                bitmap: opts.dirty_bitmap.clone(),
                ..QemuNbdOptions::new(format.as_str())
            },
        )
        .await
        .map_err(|source| DiskError::Nbd {
            disk: spec.to_string(),
            source,
        })?;
        let target = server.target();
        NbdDisk::connect(
            spec.to_string(),
            &target,
            opts.dirty_bitmap.as_deref(),
            Some(server),
        )
        .await
    };
    // A server that did not get this far is stopped when `serve` is dropped.
    let disk = tokio::time::timeout(SERVE_TIMEOUT, serve)
        .await
        .map_err(|_| DiskError::TimedOut {
            disk: spec.to_string(),
            what: format!("serving the {format} image with qemu-nbd"),
            timeout: SERVE_TIMEOUT,
        })??;
    Ok(AnyDisk::Nbd(disk))
}

/// The format of an image file a user named without saying its format: recognised from
/// its header, and refused (as [`open`] refuses it) when opening it as that would read any
/// other file. For callers that hand the image to a QEMU tool themselves, with `-f`.
pub async fn recognise_format(path: &Path) -> Result<String, DiskError> {
    let spec = path.display().to_string();
    let format = sniff_format(path)?;
    if format != "raw" {
        let absolute = std::path::absolute(path).map_err(|source| DiskError::Io {
            disk: spec.clone(),
            source,
        })?;
        refuse_references(&spec, &absolute, &format).await?;
    }
    Ok(format)
}

/// Refuses a guessed `format` for the image at `path` when opening it as that would read
/// any other file. Text VMDK descriptors always do (they name their extents) and are
/// refused without asking QEMU, which would open the extents to describe them.
async fn refuse_references(spec: &str, path: &Path, format: &str) -> Result<(), DiskError> {
    let refused = |kind: qemu_img::ReferenceKind, name: String| DiskError::GuessRefused {
        disk: spec.to_string(),
        format: format.to_string(),
        kind,
        name,
    };
    if format == "vmdk" {
        if let Some(extents) = descriptor_extents(path)? {
            let name = if extents.is_empty() {
                "(extents the descriptor lists)".to_string()
            } else {
                extents.join(", ")
            };
            return Err(refused(qemu_img::ReferenceKind::Extent, name));
        }
    }
    let info = qemu_img::info(path, format)
        .await
        .map_err(|source| DiskError::QemuImg {
            disk: spec.to_string(),
            source,
        })?;
    match qemu_img::references(&info, path).into_iter().next() {
        Some(r) => Err(refused(r.kind, r.name)),
        None => Ok(()),
    }
}

/// When `path` is a VMDK text descriptor (not a sparse VMDK with its own data), the
/// extent files it lists.
fn descriptor_extents(path: &Path) -> Result<Option<Vec<String>>, DiskError> {
    use std::io::Read;
    let io = |source| DiskError::Io {
        disk: path.display().to_string(),
        source,
    };
    let mut head = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(64 * 1024)
        .read_to_end(&mut head)
        .map_err(io)?;
    if !head.starts_with(b"# Disk DescriptorFile") {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&head);
    // Extent lines: `RW 2048 FLAT "name-flat.vmdk" 0`.
    let extents = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            ["RW ", "RDONLY ", "NOACCESS "]
                .iter()
                .any(|a| l.starts_with(a))
        })
        .filter_map(|l| l.split('"').nth(1))
        .map(str::to_string)
        .collect();
    Ok(Some(extents))
}

/// A QEMU file name for the image at `path` (absolute) as `format` with its backing file
/// switched off: `json:{"driver":FORMAT,"backing":null,"file":{"filename":PATH}}`.
fn without_backing(spec: &str, path: &Path, format: &str) -> Result<PathBuf, DiskError> {
    let name = path
        .to_str()
        .ok_or_else(|| DiskError::Unsupported(format!("{spec}: the image's path is not UTF-8")))?;
    let options = serde_json::json!({
        "driver": format,
        "backing": null,
        "file": { "filename": name },
    });
    Ok(PathBuf::from(format!("json:{options}")))
}

/// Recognises the common image formats from their magic; anything else is raw. Cheaper
/// than asking `qemu-img info`, and works where QEMU is not installed.
///
/// Only a guess, from bytes a guest may have written: [`open`] acts on it only for images
/// that name no other file.
pub fn sniff_format(path: &Path) -> Result<String, DiskError> {
    use std::io::Read;
    let io = |source| DiskError::Io {
        disk: path.display().to_string(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut head = [0u8; 64];
    let n = f.read(&mut head).map_err(io)?;
    let head = &head[..n];
    let format = if head.starts_with(b"QFI\xfb") {
        "qcow2"
    } else if head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile") {
        "vmdk"
    } else if head.starts_with(b"vhdxfile") {
        "vhdx"
    } else if head.starts_with(b"conectix") {
        "vpc"
    } else {
        "raw"
    };
    Ok(format.to_string())
}

impl Disk for AnyDisk {
    fn name(&self) -> &str {
        match self {
            AnyDisk::Raw(d) => d.name(),
            AnyDisk::Nbd(d) => d.name(),
        }
    }

    fn size(&self) -> u64 {
        match self {
            AnyDisk::Raw(d) => d.size(),
            AnyDisk::Nbd(d) => d.size(),
        }
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        match self {
            AnyDisk::Raw(d) => d.read_at(offset, len).await,
            AnyDisk::Nbd(d) => d.read_at(offset, len).await,
        }
    }

    async fn read_into(&self, offset: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>, DiskError> {
        match self {
            AnyDisk::Raw(d) => d.read_into(offset, len, buf).await,
            AnyDisk::Nbd(d) => d.read_into(offset, len, buf).await,
        }
    }

    fn reads_block(&self) -> bool {
        match self {
            AnyDisk::Raw(d) => d.reads_block(),
            AnyDisk::Nbd(d) => d.reads_block(),
        }
    }

    fn read_blocking(&self, offset: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>, DiskError> {
        match self {
            AnyDisk::Raw(d) => d.read_blocking(offset, len, buf),
            AnyDisk::Nbd(d) => d.read_blocking(offset, len, buf),
        }
    }

    async fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DiskError> {
        match self {
            AnyDisk::Raw(d) => d.extents(offset, len).await,
            AnyDisk::Nbd(d) => d.extents(offset, len).await,
        }
    }

    async fn changed_extents(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<Extent>>, DiskError> {
        match self {
            AnyDisk::Raw(d) => d.changed_extents(offset, len).await,
            AnyDisk::Nbd(d) => d.changed_extents(offset, len).await,
        }
    }

    fn tracks_changes(&self) -> bool {
        match self {
            AnyDisk::Raw(d) => d.tracks_changes(),
            AnyDisk::Nbd(d) => d.tracks_changes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn have_qemu() -> bool {
        ["qemu-img", "qemu-nbd"].iter().all(|t| {
            Command::new(t)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
    }

    fn qemu_img(args: &[&str]) {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn opts(format: Option<&str>) -> OpenOptions {
        OpenOptions {
            format: format.map(str::to_string),
            ..Default::default()
        }
    }

    /// A 1 MiB qcow2 image at `img` whose backing file is the raw file `backing`.
    fn qcow2_backed_by(img: &Path, backing: &Path) {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            backing.to_str().unwrap(),
            img.to_str().unwrap(),
            "1M",
        ]);
    }

    /// A raw disk of `size` bytes whose first bytes are a qcow2 header naming `backing`
    /// as its backing file: what a hostile guest writes into its disk.
    fn raw_with_qcow2_header(dir: &Path, backing: &Path, size: u64) -> PathBuf {
        let hdr = dir.join("hdr.qcow2");
        qcow2_backed_by(&hdr, backing);
        let mut bytes = std::fs::read(&hdr).unwrap();
        bytes.resize(size as usize, 0x5a);
        let evil = dir.join("evil.raw");
        std::fs::write(&evil, &bytes).unwrap();
        evil
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn an_unknown_stated_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        std::fs::write(&img, [0u8; 4096]).unwrap();
        for bad in ["file", "nbd", "host_device", "json", ""] {
            let err = rt()
                .block_on(open(img.to_str().unwrap(), &opts(Some(bad))))
                .err()
                .unwrap();
            assert!(matches!(err, DiskError::UnknownFormat { .. }), "{err}");
            assert!(err.to_string().contains("--format raw|qcow2"), "{err}");
        }
        assert!(check_format("d", "qcow2").is_ok());
    }

    #[test]
    fn a_raw_disk_with_a_qcow2_header_naming_a_backing_file_is_not_guessed() {
        if !have_qemu() {
            eprintln!("skipped: no qemu-img/qemu-nbd");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"the appliance's private key\n").unwrap();
        let evil = raw_with_qcow2_header(dir.path(), &secret, 4 << 20);
        let spec = evil.to_str().unwrap();
        let t = std::time::Instant::now();
        let err = rt().block_on(open(spec, &opts(None))).err().unwrap();
        assert!(t.elapsed() < Duration::from_secs(30));
        let DiskError::GuessRefused {
            disk,
            format,
            kind,
            name,
        } = &err
        else {
            panic!("not refused: {err}");
        };
        assert_eq!(disk, spec);
        assert_eq!(format, "qcow2");
        assert_eq!(*kind, qemu_img::ReferenceKind::Backing);
        assert_eq!(name, secret.to_str().unwrap());
        let msg = err.to_string();
        for part in [
            spec,
            secret.to_str().unwrap(),
            "--format raw",
            "backing file",
        ] {
            assert!(msg.contains(part), "{part:?} not in: {msg}");
        }

        // Stated raw, it is read as the bytes it is.
        let disk = rt().block_on(open(spec, &opts(Some("raw")))).unwrap();
        assert!(matches!(disk, AnyDisk::Raw(_)));
        let bytes = rt().block_on(disk.read_at(0, 4 << 20)).unwrap();
        assert_eq!(bytes, std::fs::read(&evil).unwrap());
    }

    #[test]
    fn an_external_data_file_is_not_guessed() {
        if !have_qemu() {
            eprintln!("skipped: no qemu-img/qemu-nbd");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.bin");
        let img = dir.path().join("d.img");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={},data_file_raw=on", data.display()),
            img.to_str().unwrap(),
            "1M",
        ]);
        let err = rt()
            .block_on(open(img.to_str().unwrap(), &opts(None)))
            .err()
            .unwrap();
        assert!(
            matches!(
                &err,
                DiskError::GuessRefused { kind: qemu_img::ReferenceKind::DataFile, name, .. }
                    if name == data.to_str().unwrap()
            ),
            "{err}"
        );
    }

    #[test]
    fn a_vmdk_descriptor_is_not_guessed_and_qemu_is_not_asked() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.raw");
        std::fs::write(
            &img,
            "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n\n# Extent description\nRW 2048 FLAT \"/etc/shadow\" 0\n",
        )
        .unwrap();
        let err = rt()
            .block_on(open(img.to_str().unwrap(), &opts(None)))
            .err()
            .unwrap();
        assert!(
            matches!(
                &err,
                DiskError::GuessRefused { kind: qemu_img::ReferenceKind::Extent, name, format, .. }
                    if name == "/etc/shadow" && format == "vmdk"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_self_contained_qcow2_is_still_recognised() {
        if !have_qemu() {
            eprintln!("skipped: no qemu-img/qemu-nbd");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("src.raw");
        let mut bytes = vec![0u8; 2 << 20];
        bytes[..13].copy_from_slice(b"hello, world!");
        bytes[1 << 20] = 7;
        std::fs::write(&raw, &bytes).unwrap();
        // No extension to go by: only the header says qcow2.
        let img = dir.path().join("image");
        qemu_img(&[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        let rt = rt();
        let disk = rt
            .block_on(open(img.to_str().unwrap(), &opts(None)))
            .unwrap();
        assert!(matches!(disk, AnyDisk::Nbd(_)));
        assert_eq!(disk.size(), 2 << 20);
        assert_eq!(rt.block_on(disk.read_at(0, 2 << 20)).unwrap(), bytes);
        drop(disk);
        // Its dirty bitmaps are served too.
        qemu_img(&["bitmap", "--add", img.to_str().unwrap(), "bm0"]);
        let with_bitmap = OpenOptions {
            dirty_bitmap: Some("bm0".into()),
            ..opts(None)
        };
        let disk = rt
            .block_on(open(img.to_str().unwrap(), &with_bitmap))
            .unwrap();
        assert!(disk.tracks_changes());
    }

    #[test]
    fn a_guessed_image_is_served_without_its_backing_file() {
        if !have_qemu() {
            eprintln!("skipped: no qemu-img/qemu-nbd");
            return;
        }
        // Should a header gain a backing file between the look and the open, qemu-nbd
        // still reads no other file.
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, vec![b'S'; 1 << 20]).unwrap();
        let img = dir.path().join("overlay");
        qcow2_backed_by(&img, &secret);
        let name = without_backing("overlay", &img, "qcow2").unwrap();
        let rt = rt();
        let bytes = rt.block_on(async {
            let server = QemuNbd::start(
                &name,
                QemuNbdOptions {
                    read_only: true,
                    ..QemuNbdOptions::new("qcow2")
                },
            )
            .await
            .unwrap();
            let target = server.target();
            let disk = NbdDisk::connect("overlay".into(), &target, None, Some(server))
                .await
                .unwrap();
            disk.read_at(0, 1 << 20).await.unwrap()
        });
        assert!(bytes.iter().all(|&b| b == 0), "the backing file was read");
    }
}
