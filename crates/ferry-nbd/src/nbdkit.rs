//! Starting `nbdkit` with a plugin on a private unix socket: how Ferry reads disks that
//! live behind another protocol (a datastore's HTTPS file access with the `curl` plugin,
//! VMware's VDDK with the `vddk` plugin).

use std::path::Path;

use tokio::process::Command;

use crate::server::{socket_dir, ServerProcess};
use crate::uri::NbdTarget;
use crate::NbdError;

/// How to run nbdkit.
#[derive(Clone, Default)]
pub struct NbdkitOptions {
    /// `curl`, `vddk`, `file`, …
    pub plugin: String,
    /// The plugin's `key=value` parameters. A secret is given as `key=-3` here and its
    /// value in `secret`, never on the command line (where `ps` shows it).
    pub params: Vec<String>,
    /// Filters, outermost first (`--filter=NAME`).
    pub filters: Vec<String>,
    pub read_only: bool,
    /// Readable by nbdkit on file descriptor 3 (a pipe): the value of a `key=-3`
    /// parameter.
    pub secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for NbdkitOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdkitOptions")
            .field("plugin", &self.plugin)
            .field("params", &self.params)
            .field("filters", &self.filters)
            .field("read_only", &self.read_only)
            .field("secret", &self.secret.as_ref().map(|_| "<secret>"))
            .finish()
    }
}

/// An nbdkit started by Ferry; stopped and waited for on drop. It also exits by itself
/// when Ferry does (`--exit-with-parent`), so a crash leaves no export behind.
#[derive(Debug)]
pub struct Nbdkit {
    process: ServerProcess,
}

impl Nbdkit {
    /// Starts nbdkit and waits (up to 10 s) until it serves. `what` names the export in
    /// messages (never a secret).
    pub async fn start(opts: &NbdkitOptions, what: &str) -> Result<Nbdkit, NbdError> {
        let dir = socket_dir("nbdkit")?;
        let mut cmd = Command::new("nbdkit");
        cmd.arg("--foreground")
            .arg("--exit-with-parent")
            .arg("--unix")
            .arg(&dir.1);
        if opts.read_only {
            cmd.arg("--readonly");
        }
        for f in &opts.filters {
            cmd.arg(format!("--filter={f}"));
        }
        cmd.arg(&opts.plugin).args(&opts.params);
        // The secret travels through a pipe that the child sees as fd 3; the pipe is
        // small and written whole before nbdkit starts, so nothing waits on it.
        let _pipe = match &opts.secret {
            Some(secret) => Some(secret_pipe(&mut cmd, secret)?),
            None => None,
        };
        let process = ServerProcess::spawn("nbdkit", cmd, dir, what, opts.read_only)
            .await
            .map_err(|e| match e {
                NbdError::Launch(m) if m.contains("cannot run nbdkit") => {
                    NbdError::Launch(format!("{m} (install it: apt-get install nbdkit)"))
                }
                e => e,
            })?;
        Ok(Nbdkit { process })
    }

    /// The `nbd+unix` target of the export.
    pub fn target(&self) -> NbdTarget {
        self.process.target()
    }

    /// `nbd+unix:///?socket=PATH`: what `ferry_disk::open` takes.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket().display())
    }

    pub fn socket(&self) -> &Path {
        self.process.socket()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// What nbdkit logged (its errors, e.g. the HTTP status a plugin met).
    pub fn log(&self) -> String {
        self.process.stderr()
    }

    pub async fn stop(self) -> Result<(), NbdError> {
        self.process.stop().await
    }
}

/// A pipe holding `secret`, whose read end becomes fd 3 of the child.
fn secret_pipe(cmd: &mut Command, secret: &[u8]) -> Result<std::os::fd::OwnedFd, NbdError> {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    if secret.len() > 4096 {
        return Err(NbdError::Launch("a secret for nbdkit over 4 KiB".into()));
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(NbdError::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are fresh and ours.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    std::fs::File::from(write).write_all(secret)?;
    let raw = read.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec, and
    // the copy on fd 3 does not have close-on-exec set.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConnectOptions, NbdClient};

    #[tokio::test]
    async fn serves_a_file_and_keeps_secrets_off_the_command_line() {
        if std::process::Command::new("nbdkit")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIP: nbdkit is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        let mut data = vec![0u8; 1 << 20];
        data[4096..8192].fill(0xab);
        std::fs::write(&img, &data).unwrap();
        let opts = NbdkitOptions {
            plugin: "file".into(),
            params: vec![format!("file={}", img.display())],
            read_only: true,
            secret: Some(b"secret\n".to_vec()),
            ..Default::default()
        };
        assert!(!format!("{opts:?}").contains("secret\\n"));
        let k = Nbdkit::start(&opts, "test image").await.unwrap();
        let c = NbdClient::connect(&k.target(), ConnectOptions::default())
            .await
            .unwrap();
        assert_eq!(c.size(), 1 << 20);
        let mut buf = vec![0u8; 8192];
        c.read(0, &mut buf).await.unwrap();
        assert_eq!(buf, data[..8192]);
        c.disconnect().await.unwrap();
        k.stop().await.unwrap();

        let bad = NbdkitOptions {
            plugin: "file".into(),
            params: vec!["file=/nonexistent/x.img".into()],
            ..Default::default()
        };
        let e = Nbdkit::start(&bad, "missing image").await.unwrap_err();
        assert!(e.to_string().contains("missing image"), "{e}");
    }
}
