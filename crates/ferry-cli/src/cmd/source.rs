//! `ferry source` and `ferry target`: where workloads come from and go to.

use super::client::{
    details, enc, opt, print_json, print_page_footer, table, when, Client, ClientArgs, PageArgs,
};
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use ferry_model::{NewSource, NewTarget, Source, SourceKind, Target, TargetKind};
use serde::Deserialize;
use std::process::ExitCode;

#[derive(Deserialize)]
pub struct Paged<T> {
    pub items: Vec<T>,
    pub total: i64,
    pub offset: i64,
}

#[derive(Args, Debug)]
pub struct SourceArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: EndpointCommand,
}

#[derive(Subcommand, Debug)]
pub enum EndpointCommand {
    /// List them.
    List(PageArgs),
    /// Show one by name or id.
    Show { name: String },
    /// Add one.
    Add {
        name: String,
        /// Source kinds: vsphere, kvm, agent, disk_image. Target kinds: vme, libvirt, local_dir.
        #[arg(long)]
        kind: String,
        /// Endpoint URL or host.
        #[arg(long)]
        endpoint: Option<String>,
        /// Credential id.
        #[arg(long)]
        credential: Option<String>,
        /// Directory (disk_image sources: where images are; local_dir targets: where to write).
        #[arg(long)]
        path: Option<String>,
        /// Extra settings as a JSON object (merged with --path).
        #[arg(long)]
        config: Option<String>,
    },
    /// Remove one.
    Remove { name: String },
}

fn config(path: Option<String>, extra: Option<String>) -> Result<serde_json::Value> {
    let mut c = match extra {
        Some(s) => serde_json::from_str::<serde_json::Value>(&s)
            .map_err(|e| anyhow::anyhow!("--config is not JSON: {e}"))?,
        None => serde_json::json!({}),
    };
    if !c.is_object() {
        bail!("--config must be a JSON object, e.g. '{{\"path\": \"/images\"}}'");
    }
    if let Some(p) = path {
        let abs = std::path::absolute(&p).unwrap_or_else(|_| p.clone().into());
        c["path"] = abs.display().to_string().into();
    }
    Ok(c)
}

fn parse_cred(c: Option<String>) -> Result<Option<uuid::Uuid>> {
    c.map(|s| {
        uuid::Uuid::parse_str(&s)
            .map_err(|_| anyhow::anyhow!("--credential {s:?} is not a credential id"))
    })
    .transpose()
}

pub fn run_source(a: SourceArgs) -> Result<ExitCode> {
    let c = Client::new(&a.client)?;
    super::util::runtime()?.block_on(async move {
        match a.command {
            EndpointCommand::List(p) => {
                let page: Paged<Source> = c.get(&format!("/api/sources?{}", p.query())).await?;
                if c.json {
                    return print_json(&page.items).map(|_| ExitCode::SUCCESS);
                }
                let rows = page
                    .items
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            s.kind.to_string(),
                            opt(&s.endpoint),
                            s.config.to_string(),
                            s.id.to_string(),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(&["NAME", "KIND", "ENDPOINT", "CONFIG", "ID"], rows)
                );
                print_page_footer(page.total, page.items.len(), page.offset);
            }
            EndpointCommand::Show { name } => {
                let s: Source = c.get(&format!("/api/sources/{}", enc(&name))).await?;
                if c.json {
                    return print_json(&s).map(|_| ExitCode::SUCCESS);
                }
                println!(
                    "{}",
                    details(vec![
                        ("name", s.name.clone()),
                        ("id", s.id.to_string()),
                        ("kind", s.kind.to_string()),
                        ("endpoint", opt(&s.endpoint)),
                        ("credential", opt(&s.credential_id)),
                        ("config", s.config.to_string()),
                        ("created", when(s.created_at))
                    ])
                );
            }
            EndpointCommand::Add {
                name,
                kind,
                endpoint,
                credential,
                path,
                config: extra,
            } => {
                let kind = SourceKind::parse(&kind).ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown source kind {kind:?}: use one of vsphere, kvm, agent, disk_image"
                    )
                })?;
                let body = NewSource {
                    name,
                    kind,
                    endpoint,
                    credential_id: parse_cred(credential)?,
                    config: config(path, extra)?,
                };
                let s: Source = c.post("/api/sources", &body).await?;
                if c.json {
                    return print_json(&s).map(|_| ExitCode::SUCCESS);
                }
                println!("source {} added ({})", s.name, s.id);
            }
            EndpointCommand::Remove { name } => {
                c.delete(&format!("/api/sources/{}", enc(&name))).await?;
                if !c.json {
                    println!("source {name} removed");
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_target(a: SourceArgs) -> Result<ExitCode> {
    let c = Client::new(&a.client)?;
    super::util::runtime()?.block_on(async move {
        match a.command {
            EndpointCommand::List(p) => {
                let page: Paged<Target> = c.get(&format!("/api/targets?{}", p.query())).await?;
                if c.json {
                    return print_json(&page.items).map(|_| ExitCode::SUCCESS);
                }
                let rows = page
                    .items
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            s.kind.to_string(),
                            opt(&s.endpoint),
                            s.config.to_string(),
                            s.id.to_string(),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(&["NAME", "KIND", "ENDPOINT", "CONFIG", "ID"], rows)
                );
                print_page_footer(page.total, page.items.len(), page.offset);
            }
            EndpointCommand::Show { name } => {
                let s: Target = c.get(&format!("/api/targets/{}", enc(&name))).await?;
                if c.json {
                    return print_json(&s).map(|_| ExitCode::SUCCESS);
                }
                println!(
                    "{}",
                    details(vec![
                        ("name", s.name.clone()),
                        ("id", s.id.to_string()),
                        ("kind", s.kind.to_string()),
                        ("endpoint", opt(&s.endpoint)),
                        ("credential", opt(&s.credential_id)),
                        ("config", s.config.to_string()),
                        ("created", when(s.created_at))
                    ])
                );
            }
            EndpointCommand::Add {
                name,
                kind,
                endpoint,
                credential,
                path,
                config: extra,
            } => {
                let kind = TargetKind::parse(&kind).ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown target kind {kind:?}: use one of vme, libvirt, local_dir"
                    )
                })?;
                let body = NewTarget {
                    name,
                    kind,
                    endpoint,
                    credential_id: parse_cred(credential)?,
                    config: config(path, extra)?,
                };
                let s: Target = c.post("/api/targets", &body).await?;
                if c.json {
                    return print_json(&s).map(|_| ExitCode::SUCCESS);
                }
                println!("target {} added ({})", s.name, s.id);
            }
            EndpointCommand::Remove { name } => {
                c.delete(&format!("/api/targets/{}", enc(&name))).await?;
                if !c.json {
                    println!("target {name} removed");
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
