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
    pub command: SourceCommand,
}

#[derive(Args, Debug)]
pub struct TargetArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: TargetCommand,
}

#[derive(Subcommand, Debug)]
pub enum SourceCommand {
    #[command(flatten)]
    Common(EndpointCommand),
    /// List the source's workloads (VMs with their disks and NICs) and add or update them
    /// in the inventory.
    Discover {
        name: String,
        /// Move workloads of the same name that belong to another source to this one.
        #[arg(long)]
        adopt: bool,
    },
    /// Apply a fix pre-flight offers to workloads, e.g.
    /// `ferry source fix vc1 enable-cbt db01 web01` (vSphere: changed block tracking on).
    Fix {
        name: String,
        /// The fix: enable-cbt.
        fix: String,
        /// Workloads (VM names) to fix.
        #[arg(required = true)]
        workloads: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TargetCommand {
    #[command(flatten)]
    Common(EndpointCommand),
    /// For kind vme: with an administrator's login, once, create or update the
    /// `ferry-migration` role (only what migration needs) and a service user bound to it,
    /// and store that user's credentials, encrypted, in the appliance for the target.
    SetupIam(super::target_iam::SetupIamArgs),
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
        /// Source kinds: vsphere, kvm, disk_image. Target kinds: vme, local, local_dir.
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
    /// Change one: its endpoint, credential or settings (the fields given replace the
    /// stored ones; a new endpoint needs --credential too).
    Set {
        name: String,
        #[arg(long)]
        endpoint: Option<String>,
        /// Credential id.
        #[arg(long)]
        credential: Option<String>,
        /// Directory (disk_image sources, local_dir targets).
        #[arg(long)]
        path: Option<String>,
        /// Settings as a JSON object: replaces the stored ones (merged with --path; without
        /// either, the settings stay).
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

/// What `ferry source` and `ferry target` differ in; everything else is shared.
trait Endpoint: serde::de::DeserializeOwned + serde::Serialize {
    /// "source" or "target", for messages.
    const NOUN: &'static str;
    /// The API collection.
    const PATH: &'static str;
    type New: serde::Serialize;
    /// The body that creates one, or an error naming the valid kinds.
    fn new_body(
        name: String,
        kind: &str,
        endpoint: Option<String>,
        credential_id: Option<uuid::Uuid>,
        config: serde_json::Value,
    ) -> Result<Self::New>;
    /// (name, id, kind, endpoint, credential, config, created), for tables.
    fn fields(&self) -> [String; 7];
}

impl Endpoint for Source {
    const NOUN: &'static str = "source";
    const PATH: &'static str = "/api/sources";
    type New = NewSource;
    fn new_body(
        name: String,
        kind: &str,
        endpoint: Option<String>,
        credential_id: Option<uuid::Uuid>,
        config: serde_json::Value,
    ) -> Result<NewSource> {
        let kind = SourceKind::parse(kind).ok_or_else(|| {
            anyhow::anyhow!("unknown source kind {kind:?}: use one of vsphere, kvm, disk_image")
        })?;
        Ok(NewSource {
            name,
            kind,
            endpoint,
            credential_id,
            config,
        })
    }
    fn fields(&self) -> [String; 7] {
        [
            self.name.clone(),
            self.id.to_string(),
            self.kind.to_string(),
            opt(&self.endpoint),
            opt(&self.credential_id),
            self.config.to_string(),
            when(self.created_at),
        ]
    }
}

impl Endpoint for Target {
    const NOUN: &'static str = "target";
    const PATH: &'static str = "/api/targets";
    type New = NewTarget;
    fn new_body(
        name: String,
        kind: &str,
        endpoint: Option<String>,
        credential_id: Option<uuid::Uuid>,
        config: serde_json::Value,
    ) -> Result<NewTarget> {
        let kind = TargetKind::parse(kind).ok_or_else(|| {
            anyhow::anyhow!("unknown target kind {kind:?}: use one of vme, local, local_dir")
        })?;
        Ok(NewTarget {
            name,
            kind,
            endpoint,
            credential_id,
            config,
        })
    }
    fn fields(&self) -> [String; 7] {
        [
            self.name.clone(),
            self.id.to_string(),
            self.kind.to_string(),
            opt(&self.endpoint),
            opt(&self.credential_id),
            self.config.to_string(),
            when(self.created_at),
        ]
    }
}

pub fn run_source(a: SourceArgs) -> Result<ExitCode> {
    let c = Client::new(&a.client)?;
    super::util::runtime()?.block_on(async move {
        match a.command {
            SourceCommand::Common(cmd) => run::<Source>(&c, cmd).await,
            SourceCommand::Discover { name, adopt } => discover(&c, &name, adopt).await,
            SourceCommand::Fix {
                name,
                fix,
                workloads,
            } => {
                let done: Vec<String> = c
                    .post(
                        &format!("{}/{}/fix", Source::PATH, enc(&name)),
                        &serde_json::json!({"fix": fix, "workloads": workloads}),
                    )
                    .await?;
                if c.json {
                    return print_json(&done).map(|_| ExitCode::SUCCESS);
                }
                for line in done {
                    println!("{line}");
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

pub fn run_target(a: TargetArgs) -> Result<ExitCode> {
    let c = Client::new(&a.client)?;
    super::util::runtime()?.block_on(async move {
        match a.command {
            TargetCommand::Common(cmd) => run::<Target>(&c, cmd).await,
            TargetCommand::SetupIam(args) => super::target_iam::run(&c, args).await,
        }
    })
}

async fn run<E: Endpoint>(c: &Client, cmd: EndpointCommand) -> Result<ExitCode> {
    {
        match cmd {
            EndpointCommand::List(p) => {
                let page: Paged<E> = c.get(&format!("{}?{}", E::PATH, p.query())).await?;
                if c.json {
                    return print_json(&page.items).map(|_| ExitCode::SUCCESS);
                }
                let rows = page
                    .items
                    .iter()
                    .map(|e| {
                        let [name, id, kind, endpoint, _, config, _] = e.fields();
                        vec![name, kind, endpoint, config, id]
                    })
                    .collect();
                println!(
                    "{}",
                    table(&["NAME", "KIND", "ENDPOINT", "CONFIG", "ID"], rows)
                );
                print_page_footer(page.total, page.items.len(), page.offset);
            }
            EndpointCommand::Show { name } => {
                let e: E = c.get(&format!("{}/{}", E::PATH, enc(&name))).await?;
                if c.json {
                    return print_json(&e).map(|_| ExitCode::SUCCESS);
                }
                let labels = [
                    "name",
                    "id",
                    "kind",
                    "endpoint",
                    "credential",
                    "config",
                    "created",
                ];
                println!("{}", details(labels.into_iter().zip(e.fields()).collect()));
            }
            EndpointCommand::Add {
                name,
                kind,
                endpoint,
                credential,
                path,
                config: extra,
            } => {
                let body = E::new_body(
                    name,
                    &kind,
                    endpoint,
                    parse_cred(credential)?,
                    config(path, extra)?,
                )?;
                let e: E = c.post(E::PATH, &body).await?;
                if c.json {
                    return print_json(&e).map(|_| ExitCode::SUCCESS);
                }
                let [name, id, ..] = e.fields();
                println!("{} {name} added ({id})", E::NOUN);
            }
            EndpointCommand::Set {
                name,
                endpoint,
                credential,
                path,
                config: extra,
            } => {
                let config = match (&path, &extra) {
                    (None, None) => None,
                    _ => Some(config(path, extra)?),
                };
                let patch = ferry_model::EndpointPatch {
                    endpoint,
                    credential_id: parse_cred(credential)?,
                    config,
                };
                let e: E = c
                    .patch(&format!("{}/{}", E::PATH, enc(&name)), &patch)
                    .await?;
                if c.json {
                    return print_json(&e).map(|_| ExitCode::SUCCESS);
                }
                let [name, ..] = e.fields();
                println!("{} {name} updated", E::NOUN);
            }
            EndpointCommand::Remove { name } => {
                c.delete(&format!("{}/{}", E::PATH, enc(&name))).await?;
                if !c.json {
                    println!("{} {name} removed", E::NOUN);
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// `ferry source discover`: what the source holds, into the inventory.
async fn discover(c: &Client, name: &str, adopt: bool) -> Result<ExitCode> {
    let found: Vec<ferry_model::Workload> = c
        .post(
            &format!(
                "{}/{}/discover{}",
                Source::PATH,
                enc(name),
                if adopt { "?adopt=true" } else { "" }
            ),
            &serde_json::json!({}),
        )
        .await?;
    if c.json {
        return print_json(&found).map(|_| ExitCode::SUCCESS);
    }
    let rows = found
        .iter()
        .map(|w| {
            let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
            vec![
                w.name.clone(),
                opt(&w.os),
                opt(&w.cpus),
                w.memory_mib.map(|m| format!("{m} MiB")).unwrap_or_default(),
                w.disks
                    .iter()
                    .map(|d| format!("{} {}", d.name, gib(d.size_bytes)))
                    .collect::<Vec<_>>()
                    .join(", "),
                w.nics
                    .iter()
                    .map(|n| {
                        format!("{} {} {}", n.name, opt(&n.network), n.ips.join(" "))
                            .trim()
                            .to_string()
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["WORKLOAD", "OS", "CPUS", "MEMORY", "DISKS", "NICS"], rows)
    );
    println!("{} workload(s) discovered on {name}", found.len());
    Ok(ExitCode::SUCCESS)
}
