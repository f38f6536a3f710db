//! `ferry credential`: secrets the appliance keeps encrypted (source and guest accounts,
//! TSIG keys, tokens) and that profiles and endpoints name. A secret is read from a file,
//! `$FERRY_SECRET` or standard input, never from the command line (where `ps` and shell
//! history would keep it), and is never shown again.

use super::client::{print_json, print_page_footer, table, when, Client, ClientArgs, PageArgs};
use super::source::Paged;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_model::{Credential, CredentialKind, NewCredential};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct CredentialArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: CredentialCommand,
}

#[derive(Subcommand, Debug)]
pub enum CredentialCommand {
    /// List credentials (never their secrets).
    List(PageArgs),
    /// Store a credential, encrypted by the appliance.
    Add {
        name: String,
        /// password, private_key or token (a TSIG key is a token
        /// `hmac-sha256:NAME:BASE64`).
        #[arg(long, value_parser = parse_kind)]
        kind: CredentialKind,
        #[arg(long)]
        username: Option<String>,
        /// Read the secret from this file (else $FERRY_SECRET, else one line on standard
        /// input).
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
}

fn parse_kind(s: &str) -> Result<CredentialKind, String> {
    CredentialKind::parse(s).ok_or_else(|| {
        let all: Vec<&str> = CredentialKind::ALL.iter().map(|k| k.as_str()).collect();
        format!("unknown kind {s:?}: one of {}", all.join(", "))
    })
}

fn secret(file: Option<&PathBuf>, name: &str) -> Result<String> {
    let s = if let Some(f) = file {
        let s = std::fs::read_to_string(f)
            .with_context(|| format!("reading the secret from {}", f.display()))?;
        // A private key keeps its lines; only the final newline goes.
        s.trim_end_matches(['\n', '\r']).to_string()
    } else if let Ok(s) = std::env::var("FERRY_SECRET") {
        s
    } else {
        eprint!("secret of credential {name}: ");
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the secret from standard input")?;
        line.trim_end_matches(['\n', '\r']).to_string()
    };
    if s.is_empty() {
        bail!("the secret is empty: give --secret-file, $FERRY_SECRET or type it");
    }
    Ok(s)
}

pub fn run(a: CredentialArgs) -> Result<ExitCode> {
    let c = Client::new(&a.client)?;
    super::util::runtime()?.block_on(async move {
        match a.command {
            CredentialCommand::List(p) => {
                let page: Paged<Credential> =
                    c.get(&format!("/api/credentials?{}", p.query())).await?;
                if c.json {
                    return print_json(&page.items).map(|_| ExitCode::SUCCESS);
                }
                let rows = page
                    .items
                    .iter()
                    .map(|k| {
                        vec![
                            k.name.clone(),
                            k.kind.to_string(),
                            k.username.clone().unwrap_or_else(|| "-".into()),
                            when(k.created_at),
                            k.id.to_string(),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(&["NAME", "KIND", "USERNAME", "CREATED", "ID"], rows)
                );
                print_page_footer(page.total, page.items.len(), page.offset);
            }
            CredentialCommand::Add {
                name,
                kind,
                username,
                secret_file,
            } => {
                let secret = secret(secret_file.as_ref(), &name)?;
                let k: Credential = c
                    .post(
                        "/api/credentials",
                        &NewCredential {
                            name,
                            kind,
                            username,
                            secret,
                        },
                    )
                    .await?;
                if c.json {
                    return print_json(&k).map(|_| ExitCode::SUCCESS);
                }
                println!(
                    "credential {} ({}) stored encrypted; id {}",
                    k.name, k.kind, k.id
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
