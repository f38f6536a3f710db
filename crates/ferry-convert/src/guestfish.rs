//! One libguestfs appliance kept running for a series of file operations on a guest's
//! disks (`guestfish --listen`, then `--remote` calls): the appliance takes half a
//! minute to boot under software emulation, so it boots once per conversion.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::run::{error_line, Tools};
use crate::{ConvertError, GuestDisk};

/// Longest file read from a guest: configuration files are small, and a guest that
/// planted a huge one costs nothing but its first bytes.
const MAX_FILE: u64 = 1 << 20;

pub(crate) struct Guestfish {
    tools: Tools,
    pid: u32,
    log: PathBuf,
    closed: bool,
}

impl Guestfish {
    /// Boots the appliance on `disks` (each with its format stated) and mounts the guest's
    /// file systems as its OS has them (`-i`). `None`: libguestfs found no OS there.
    pub(crate) async fn open(
        tools: &Tools,
        disks: &[GuestDisk],
        log: &Path,
    ) -> Result<Result<Guestfish, String>, ConvertError> {
        let mut args: Vec<std::ffi::OsString> = vec!["--listen".into()];
        for d in disks {
            args.push(format!("--format={}", d.format).into());
            args.push("-a".into());
            args.push(d.path.clone().into_os_string());
        }
        args.push("-i".into());
        let argv: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let ran = tools.run_daemonizing("guestfish", &argv, log).await?;
        if !ran.status.success() {
            return Ok(Err(error_line(&ran.output)));
        }
        // "GUESTFISH_PID=1234; export GUESTFISH_PID"
        let pid = ran
            .output
            .lines()
            .find_map(|l| l.trim().strip_prefix("GUESTFISH_PID="))
            .and_then(|r| r.split(';').next())
            .and_then(|p| p.trim().parse::<u32>().ok())
            .ok_or_else(|| ConvertError::Failed {
                tool: "guestfish".into(),
                why: format!(
                    "no GUESTFISH_PID in its output: {}",
                    error_line(&ran.output)
                ),
                log: log.to_path_buf(),
            })?;
        Ok(Ok(Guestfish {
            tools: tools.clone(),
            pid,
            log: log.to_path_buf(),
            closed: false,
        }))
    }

    async fn call(&self, args: &[&str]) -> Result<Result<String, String>, ConvertError> {
        let remote = format!("--remote={}", self.pid);
        let mut argv: Vec<&OsStr> = vec![OsStr::new(&remote), OsStr::new("--")];
        argv.extend(args.iter().map(OsStr::new));
        let ran = self.tools.run("guestfish", &argv, &self.log).await?;
        Ok(if ran.status.success() {
            Ok(ran.output)
        } else {
            Err(error_line(&ran.output))
        })
    }

    /// A guest command that must work.
    async fn must(&self, args: &[&str]) -> Result<String, ConvertError> {
        self.call(args).await?.map_err(|why| ConvertError::Failed {
            tool: "guestfish".into(),
            why: format!("{}: {why}", args.join(" ")),
            log: self.log.clone(),
        })
    }

    /// What libguestfs' inspection found: the guest's OS (`-i` already mounted it).
    pub(crate) async fn inspect(&self) -> Result<crate::Inspection, ConvertError> {
        let roots = self.must(&["inspect-get-roots"]).await?;
        let Some(root) = roots
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("/dev/"))
        else {
            return Err(ConvertError::NotConvertible {
                why: "libguestfs found no operating system on the disks".into(),
            });
        };
        let root = root.to_string();
        let get = |what: &'static str| {
            let root = root.clone();
            async move {
                self.call(&[what, &root]).await.map(|r| {
                    r.ok()
                        .map(|v| v.trim().to_string())
                        .filter(|v| !v.is_empty() && v != "unknown")
                })
            }
        };
        let mut i = crate::Inspection {
            os_type: get("inspect-get-type").await?,
            distro: get("inspect-get-distro").await?,
            product_name: get("inspect-get-product-name").await?,
            osinfo: get("inspect-get-osinfo").await?,
            major_version: get("inspect-get-major-version").await?,
            minor_version: get("inspect-get-minor-version").await?,
            arch: get("inspect-get-arch").await?,
            package_format: get("inspect-get-package-format").await?,
            ..crate::Inspection::default()
        };
        let mounts = self.must(&["inspect-get-mountpoints", &root]).await?;
        i.firmware = Some(if mounts.lines().any(|l| l.starts_with("/boot/efi:")) {
            "uefi".into()
        } else {
            "bios".into()
        });
        for (cfg, loader) in [
            ("/boot/grub/grub.cfg", "grub2"),
            ("/boot/grub2/grub.cfg", "grub2"),
            ("/boot/grub/menu.lst", "grub"),
            ("/boot/extlinux/extlinux.conf", "extlinux"),
        ] {
            if self.is_file(cfg).await? {
                i.bootloader = Some(loader.into());
                break;
            }
        }
        Ok(i)
    }

    /// (device, file system type) of every file system libguestfs sees.
    pub(crate) async fn list_filesystems(&self) -> Result<Vec<(String, String)>, ConvertError> {
        Ok(self
            .must(&["list-filesystems"])
            .await?
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(d, _)| d.starts_with("/dev/") && !d.contains(char::is_whitespace))
            .map(|(d, t)| (d.to_string(), t.trim().to_string()))
            .collect())
    }

    /// The UUID of the file system on `dev`, if it has one (a guest chooses it: only
    /// hex digits and dashes pass).
    pub(crate) async fn vfs_uuid(&self, dev: &str) -> Result<Option<String>, ConvertError> {
        let u = match self.call(&["vfs-uuid", dev]).await? {
            Ok(u) => u.trim().to_string(),
            Err(_) => return Ok(None),
        };
        Ok(
            (!u.is_empty()
                && u.len() <= 64
                && u.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
            .then_some(u),
        )
    }

    pub(crate) async fn is_file(&self, path: &str) -> Result<bool, ConvertError> {
        Ok(self.must(&["is-file", path]).await?.trim() == "true")
    }

    pub(crate) async fn is_dir(&self, path: &str) -> Result<bool, ConvertError> {
        Ok(self.must(&["is-dir", path]).await?.trim() == "true")
    }

    /// Names in a guest directory that are plain enough to name again (no separators,
    /// no control characters: a guest chooses them).
    pub(crate) async fn ls(&self, dir: &str) -> Result<Vec<String>, ConvertError> {
        Ok(self
            .must(&["ls", dir])
            .await?
            .lines()
            .filter(|n| {
                !n.is_empty()
                    && *n != "."
                    && *n != ".."
                    && n.len() <= 255
                    && !n.contains('/')
                    && !n.chars().any(char::is_control)
            })
            .map(str::to_string)
            .collect())
    }

    /// A regular file's text, at most [`MAX_FILE`] bytes of it; `None` if it is not a
    /// regular file (a symlink out of /etc, a device, a directory).
    pub(crate) async fn read(&self, path: &str) -> Result<Option<String>, ConvertError> {
        if !self.is_file(path).await? {
            return Ok(None);
        }
        let size: u64 = self
            .must(&["filesize", path])
            .await?
            .trim()
            .parse()
            .unwrap_or(0);
        let text = if size > MAX_FILE {
            self.must(&["head-n", "2000", path]).await?
        } else {
            self.must(&["cat", path]).await?
        };
        Ok(Some(text))
    }

    pub(crate) async fn write(&self, path: &str, content: &str) -> Result<(), ConvertError> {
        if let Some((dir, _)) = path.rsplit_once('/') {
            if !dir.is_empty() {
                self.must(&["mkdir-p", dir]).await?;
            }
        }
        self.must(&["write", path, content]).await?;
        Ok(())
    }

    /// Unmounts, syncs and stops the appliance.
    pub(crate) async fn close(mut self) -> Result<(), ConvertError> {
        self.closed = true;
        self.must(&["umount-all"]).await?;
        self.must(&["exit"]).await?;
        Ok(())
    }
}

impl Drop for Guestfish {
    fn drop(&mut self) {
        if !self.closed {
            // An error on the way: the appliance must not outlive us holding the disks.
            // SAFETY: kill(2) on the listener this value started.
            unsafe {
                libc::kill(self.pid as i32, libc::SIGTERM);
            }
        }
    }
}
