//! govmomi's vSphere simulator (`scripts/testbed/vcsim/`), started for tests and demos.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A running simulator; stopped (SIGTERM, so it removes its datastores) when dropped.
pub struct Vcsim {
    child: Child,
    /// What it printed: `url`, `username`, `password` and the count of each kind of object.
    pub info: serde_json::Value,
}

impl Vcsim {
    /// Builds (or finds cached) the launcher with `scripts/testbed/build-vcsim.sh`.
    pub fn build() -> Result<PathBuf, String> {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/testbed/build-vcsim.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(PathBuf::from(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or_default()
                .trim(),
        ))
    }

    /// Starts `bin` serving TLS with `cert`/`key`; its datastores live under `tmp`.
    pub fn start(bin: &Path, cert: &Path, key: &Path, tmp: &Path) -> std::io::Result<Vcsim> {
        Self::start_with(bin, cert, key, tmp, &[])
    }

    /// Like [`Vcsim::start`], with more of the launcher's flags (`--disk-mib`,
    /// `--guest-log`, `--no-tools`, `--services`, …).
    pub fn start_with(
        bin: &Path,
        cert: &Path,
        key: &Path,
        tmp: &Path,
        args: &[&str],
    ) -> std::io::Result<Vcsim> {
        let mut child = Command::new(bin)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(args)
            .env("TMPDIR", tmp)
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let info = serde_json::from_str(&line).map_err(|e| {
            let _ = child.kill();
            std::io::Error::other(format!("vcsim said {line:?}: {e}"))
        })?;
        Ok(Vcsim { child, info })
    }

    pub fn url(&self) -> &str {
        self.info["url"].as_str().unwrap_or_default()
    }

    pub fn username(&self) -> &str {
        self.info["username"].as_str().unwrap_or_default()
    }

    pub fn password(&self) -> &str {
        self.info["password"].as_str().unwrap_or_default()
    }

    /// The local directory behind a datastore (where a test writes a VM's disk bytes).
    pub fn datastore_dir(&self, name: &str) -> Option<PathBuf> {
        self.info["datastore_paths"][name]
            .as_str()
            .map(PathBuf::from)
    }

    /// Calls one of the launcher's test endpoints (`/ferry/outage?ms=N`,
    /// `/ferry/expire-sessions`, `/ferry/reset-cbt?vm=NAME`, `/ferry/cbt-off?vm=NAME`,
    /// `/ferry/datastore-fail?ms=N`,
    /// `/ferry/shutdown-write?vm=NAME&offset=N`: 64 KiB written at N as NAME next powers off).
    pub async fn admin(&self, ca: &Path, path_and_query: &str) -> Result<(), String> {
        let pem = std::fs::read(ca).map_err(|e| e.to_string())?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| e.to_string())?;
        let http = reqwest::Client::builder()
            .add_root_certificate(cert)
            .build()
            .map_err(|e| e.to_string())?;
        let url = format!("{}{path_and_query}", self.url().trim_end_matches("/sdk"));
        let r = http.post(&url).send().await.map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("{url}: HTTP {}", r.status()));
        }
        Ok(())
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: it removes its temporary datastores on the way out.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}
