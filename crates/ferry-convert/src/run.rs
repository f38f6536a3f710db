//! Running libguestfs' tools: the environment they need here, a timeout on every call,
//! and their whole output kept in a log file beside the migration's other records.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::ConvertError;

/// How the tools are run.
#[derive(Debug, Clone)]
pub struct Tools {
    /// Run libguestfs' appliance under software emulation. KVM that is present but not
    /// usable (nested, or `/dev/kvm` without permission) makes libguestfs fail at once
    /// instead of falling back, so the caller decides from a real probe.
    pub force_tcg: bool,
    /// Longest time one tool may run (inspection, conversion), then it is killed.
    pub timeout: Duration,
    /// Where libguestfs keeps its appliance between runs (`LIBGUESTFS_CACHEDIR`).
    pub cache_dir: Option<PathBuf>,
}

impl Default for Tools {
    fn default() -> Tools {
        Tools {
            force_tcg: false,
            timeout: Duration::from_secs(1800),
            cache_dir: None,
        }
    }
}

/// What a finished tool printed (stdout and stderr interleaved into `log`).
pub(crate) struct Ran {
    pub status: std::process::ExitStatus,
    pub output: String,
}

impl Tools {
    pub(crate) fn command(&self, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(program);
        // The direct backend: no libvirtd needed, the appliance is a QEMU child.
        c.env("LIBGUESTFS_BACKEND", "direct");
        if self.force_tcg {
            c.env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg");
        } else {
            c.env_remove("LIBGUESTFS_BACKEND_SETTINGS");
        }
        if let Some(d) = &self.cache_dir {
            c.env("LIBGUESTFS_CACHEDIR", d);
        }
        // Plain, parseable messages, whatever the terminal.
        c.env("LANG", "C").env("LC_ALL", "C").env_remove("TERM");
        c.stdin(Stdio::null()).kill_on_drop(true);
        c
    }

    /// Runs `program args`, appending everything it prints to `log`; fails only when it
    /// cannot be started or outlives the timeout (the exit status is the caller's).
    pub(crate) async fn run(
        &self,
        program: &str,
        args: &[&std::ffi::OsStr],
        log: &Path,
    ) -> Result<Ran, ConvertError> {
        let mut c = self.command(program);
        c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let started = Instant::now();
        let child = spawn(&mut c, program)?;
        // Dropping the future on a timeout kills the child (kill_on_drop).
        let out = self.within(program, log, child.wait_with_output()).await?;
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        append_log(log, program, args, out.status, started, &output).await?;
        Ok(Ran {
            status: out.status,
            output,
        })
    }

    /// Starts a program that leaves a daemon behind (`guestfish --listen`) and waits for
    /// the program itself, not for its output to end: the daemon keeps the output open
    /// for as long as it lives. What it printed is read back from a file.
    pub(crate) async fn run_daemonizing(
        &self,
        program: &str,
        args: &[&std::ffi::OsStr],
        log: &Path,
    ) -> Result<Ran, ConvertError> {
        let out_path = log.with_extension("listen");
        let io = |what: &'static str| {
            let path = out_path.clone();
            move |source| ConvertError::Io { what, path, source }
        };
        let file = std::fs::File::create(&out_path).map_err(io("creating"))?;
        let err = file.try_clone().map_err(io("opening"))?;
        let mut c = self.command(program);
        c.args(args).stdout(file).stderr(err);
        let started = Instant::now();
        let mut child = spawn(&mut c, program)?;
        let status = self.within(program, log, child.wait()).await?;
        let output = std::fs::read_to_string(&out_path).unwrap_or_default();
        let _ = std::fs::remove_file(&out_path);
        append_log(log, program, args, status, started, &output).await?;
        Ok(Ran { status, output })
    }

    /// `wait`'s result, or a timeout error once [`Tools::timeout`] has passed.
    async fn within<T>(
        &self,
        program: &str,
        log: &Path,
        wait: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> Result<T, ConvertError> {
        match tokio::time::timeout(self.timeout, wait).await {
            Ok(r) => r.map_err(|e| ConvertError::Io {
                what: "waiting for",
                path: PathBuf::from(program),
                source: e,
            }),
            Err(_) => Err(ConvertError::Timeout {
                tool: program.to_string(),
                secs: self.timeout.as_secs(),
                log: log.to_path_buf(),
            }),
        }
    }
}

/// Starts `c`; a program that is not installed says so.
fn spawn(
    c: &mut tokio::process::Command,
    program: &str,
) -> Result<tokio::process::Child, ConvertError> {
    let child = c.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ConvertError::ToolMissing {
                tool: program.to_string(),
            }
        } else {
            ConvertError::Io {
                what: "starting",
                path: PathBuf::from(program),
                source: e,
            }
        }
    })?;
    tracing::debug!(tool = program, "started");
    Ok(child)
}

/// Appends a run's command line, status and output to `log`.
async fn append_log(
    log: &Path,
    program: &str,
    args: &[&std::ffi::OsStr],
    status: std::process::ExitStatus,
    started: Instant,
    output: &str,
) -> Result<(), ConvertError> {
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .await
        .map_err(|e| ConvertError::Io {
            what: "writing",
            path: log.to_path_buf(),
            source: e,
        })?;
    let head = format!(
        "\n==== {program} {} ({status} in {:.1} s)\n",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        started.elapsed().as_secs_f64()
    );
    let _ = f.write_all(head.as_bytes()).await;
    let _ = f.write_all(output.as_bytes()).await;
    Ok(())
}

/// The last lines of a tool's output that say what went wrong (libguestfs ends with a
/// line `PROGRAM: error: …` and a hint about debugging that helps nobody here).
pub(crate) fn error_line(output: &str) -> String {
    let lines: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if let Some(l) = lines.iter().rev().find(|l| l.contains(": error:")) {
        return l
            .split_once(": error:")
            .map(|(_, m)| m.trim())
            .unwrap_or(l)
            .to_string();
    }
    lines
        .iter()
        .rev()
        .take(3)
        .rev()
        .cloned()
        .collect::<Vec<_>>()
        .join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_line_takes_the_tools_own_words() {
        let out = "[   0.0] Setting up the source\nvirt-v2v-inspector: error: no bootloader detected\n\nIf reporting bugs, run virt-v2v-inspector with debugging enabled\n";
        assert_eq!(error_line(out), "no bootloader detected");
        assert_eq!(error_line("a\nb\nc\nd"), "b / c / d");
    }

    #[tokio::test]
    async fn a_missing_tool_says_so_and_a_slow_one_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let t = Tools::default();
        let e = t.run("ferry-no-such-tool", &[], &log).await.err().unwrap();
        assert!(matches!(e, ConvertError::ToolMissing { .. }), "{e}");
        let t = Tools {
            timeout: Duration::from_millis(200),
            ..Tools::default()
        };
        let started = Instant::now();
        let e = t
            .run("sleep", &[std::ffi::OsStr::new("30")], &log)
            .await
            .err()
            .unwrap();
        assert!(matches!(e, ConvertError::Timeout { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
