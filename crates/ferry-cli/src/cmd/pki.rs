//! `ferry pki`: the CA and certificates for mutual TLS between Ferry's parts.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use ferry_pki::CaDir;

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Create a new certificate authority in DIR (ca.pem, ca.key).
    Init {
        #[arg(long, env = "FERRY_PKI_DIR")]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Ferry CA")]
        ca_name: String,
    },
    /// Issue NAME.pem / NAME.key from the CA in DIR, valid for the given DNS names or IPs
    /// (as server and as client).
    Issue {
        name: String,
        #[arg(long, env = "FERRY_PKI_DIR")]
        dir: PathBuf,
        /// DNS name or IP address the certificate is valid for (repeatable; default NAME).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
}

pub fn run(cmd: PkiCommand) -> Result<ExitCode> {
    match cmd {
        PkiCommand::Init { dir, ca_name } => {
            CaDir::new(&dir)
                .init(&ca_name)
                .with_context(|| format!("creating a CA in {}", dir.display()))?;
            println!(
                "created CA {ca_name:?}: {} (private key ca.key, mode 0600, {})",
                CaDir::new(&dir).ca_cert_path().display(),
                ferry_pki::keyfile::describe_passphrase()
            );
        }
        PkiCommand::Issue { name, dir, sans } => {
            let sans = if sans.is_empty() {
                vec![name.clone()]
            } else {
                sans
            };
            let ca = CaDir::new(&dir);
            ca.issue(&name, &sans)
                .with_context(|| format!("issuing {name:?} from {}", dir.display()))?;
            println!(
                "issued {} for {} (key {}, mode 0600, {})",
                ca.cert_path(&name).display(),
                sans.join(", "),
                ca.key_path(&name).display(),
                ferry_pki::keyfile::describe_passphrase()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
