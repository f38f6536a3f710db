//! `ferry inventory` and `ferry group`: workloads and move groups.

use super::client::{
    details, enc, opt, print_json, print_page_footer, table, when, Client, ClientArgs, PageArgs,
};
use super::source::Paged;
use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use ferry_model::{
    Disk, DiskFormat, Migration, MoveGroup, NewMoveGroup, NewWorkload, Source, Workload,
    WorkloadPatch,
};
use serde_json::Value;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct InventoryArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: InventoryCommand,
}

#[derive(Subcommand, Debug)]
pub enum InventoryCommand {
    /// List workloads.
    List {
        /// Name contains this text.
        #[arg(long)]
        name: Option<String>,
        /// Move group name or id.
        #[arg(long)]
        group: Option<String>,
        /// Source name or id.
        #[arg(long)]
        source: Option<String>,
        #[arg(long)]
        tag: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one workload by name or id.
    Show { name: String },
    /// Add one workload.
    Add {
        name: String,
        /// Source name or id.
        #[arg(long)]
        source: Option<String>,
        /// A disk as NAME=IMAGE_PATH (repeatable).
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// The --disk images' format (raw, qcow2, vmdk, ...). Default: recognised from
        /// each file's header, refused when the header names another file; say `raw` for
        /// a VM's raw disk, whose first bytes its guest wrote.
        #[arg(long, value_name = "FORMAT", value_parser = parse_disk_format)]
        disk_format: Option<DiskFormat>,
        /// Move group name or id.
        #[arg(long)]
        group: Option<String>,
        /// Order within the move group's cutover (lower first).
        #[arg(long, default_value_t = 0)]
        order: i32,
        #[arg(long)]
        os: Option<String>,
        #[arg(long)]
        cpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u64>,
        /// Services to stop at cutover (comma-separated).
        #[arg(long, value_delimiter = ',')]
        services: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
    },
    /// Change a workload: source, disks, move group and order, services, sizing, tags.
    Set {
        name: String,
        /// Source name or id.
        #[arg(long)]
        source: Option<String>,
        /// A disk as NAME=IMAGE_PATH (repeatable; replaces the disk list).
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// The --disk images' format (raw, qcow2, vmdk, ...). Default: recognised from
        /// each file's header, refused when the header names another file; say `raw` for
        /// a VM's raw disk, whose first bytes its guest wrote.
        #[arg(long, value_name = "FORMAT", value_parser = parse_disk_format)]
        disk_format: Option<DiskFormat>,
        /// Move group name or id.
        #[arg(long)]
        group: Option<String>,
        /// Order within the move group's cutover (lower first).
        #[arg(long)]
        order: Option<i32>,
        #[arg(long)]
        os: Option<String>,
        #[arg(long)]
        cpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u64>,
        /// Services to stop at cutover (comma-separated; replaces the list; '' clears it).
        #[arg(long, value_delimiter = ',')]
        services: Option<Vec<String>>,
        /// Tags (comma-separated; replaces the list; '' clears it).
        #[arg(long, value_delimiter = ',')]
        tags: Option<Vec<String>>,
    },
    /// Import workloads from a CSV in RiverMeadow's columns (host, username, password,
    /// private_key, agent, domain, move_group_name, target_migration_date,
    /// assigned_resource_email, cloud_sizing, tags).
    Import {
        #[arg(long)]
        csv: std::path::PathBuf,
    },
}

fn parse_disk_format(s: &str) -> Result<DiskFormat, String> {
    DiskFormat::parse(s).ok_or_else(|| {
        let all: Vec<&str> = DiskFormat::ALL.iter().map(|f| f.as_str()).collect();
        format!("unknown image format {s:?}: use one of {}", all.join(", "))
    })
}

fn parse_disks(disks: Vec<String>, format: Option<DiskFormat>) -> Result<Vec<Disk>> {
    if disks.is_empty() && format.is_some() {
        return Err(anyhow!(
            "--disk-format names the format of the --disk images: give the disks with it"
        ));
    }
    let mut ds = vec![];
    for d in disks {
        let (n, p) = d
            .split_once('=')
            .ok_or_else(|| anyhow!("--disk {d:?}: use NAME=IMAGE_PATH"))?;
        let abs = std::path::absolute(p).unwrap_or_else(|_| p.into());
        let size = std::fs::metadata(&abs).map(|m| m.len()).unwrap_or(0);
        ds.push(Disk {
            name: n.to_string(),
            size_bytes: size,
            path: Some(abs.display().to_string()),
            format,
        });
    }
    Ok(ds)
}

fn workload_rows(items: &[Workload]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|w| {
            vec![
                w.name.clone(),
                opt(&w.os),
                w.disks.len().to_string(),
                opt(&w.move_group_id.map(|g| g.to_string()[..8].to_string())),
                opt(&w.target_migration_date),
                w.tags.join(","),
                w.id.to_string(),
            ]
        })
        .collect()
}

pub fn run_inventory(a: InventoryArgs) -> Result<ExitCode> {
    let c = Client::new(&a.client)?;
    super::util::runtime()?.block_on(async move {
        match a.command {
            InventoryCommand::List {
                name,
                group,
                source,
                tag,
                page,
            } => {
                let mut q = page.query();
                for (k, v) in [
                    ("name", name),
                    ("group", group),
                    ("source", source),
                    ("tag", tag),
                ] {
                    if let Some(v) = v {
                        q.push_str(&format!("&{k}={}", enc(&v)));
                    }
                }
                let p: Paged<Workload> = c.get(&format!("/api/workloads?{q}")).await?;
                if c.json {
                    return print_json(&p.items).map(|_| ExitCode::SUCCESS);
                }
                println!(
                    "{}",
                    table(
                        &["NAME", "OS", "DISKS", "GROUP", "DATE", "TAGS", "ID"],
                        workload_rows(&p.items)
                    )
                );
                print_page_footer(p.total, p.items.len(), p.offset);
            }
            InventoryCommand::Show { name } => {
                let w: Workload = c.get(&format!("/api/workloads/{}", enc(&name))).await?;
                if c.json {
                    return print_json(&w).map(|_| ExitCode::SUCCESS);
                }
                let disks = w
                    .disks
                    .iter()
                    .map(|d| {
                        let fmt = d.format.map(|f| format!(" {f}")).unwrap_or_default();
                        format!("{} ({} bytes{fmt}) {}", d.name, d.size_bytes, opt(&d.path))
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                let nics = w
                    .nics
                    .iter()
                    .map(|n| {
                        format!(
                            "{} mac {} network {} {}",
                            n.name,
                            opt(&n.mac),
                            opt(&n.network),
                            n.ips.join(" ")
                        )
                        .trim()
                        .to_string()
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                println!(
                    "{}",
                    details(vec![
                        ("name", w.name.clone()),
                        ("id", w.id.to_string()),
                        ("source", opt(&w.source_id)),
                        ("os", opt(&w.os)),
                        ("cpus", opt(&w.cpus)),
                        ("memory MiB", opt(&w.memory_mib)),
                        ("disks", disks),
                        ("nics", nics),
                        ("hardware", opt(&w.hardware)),
                        ("services", w.services.join(", ")),
                        ("move group", opt(&w.move_group_id)),
                        ("order", w.group_order.to_string()),
                        ("agent", w.agent.to_string()),
                        ("domain", opt(&w.domain)),
                        ("assigned to", opt(&w.assigned_email)),
                        ("cloud sizing", opt(&w.cloud_sizing)),
                        ("target date", opt(&w.target_migration_date)),
                        ("tags", w.tags.join(", ")),
                        ("created", when(w.created_at)),
                    ])
                );
            }
            InventoryCommand::Add {
                name,
                source,
                disks,
                disk_format,
                group,
                order,
                os,
                cpus,
                memory_mib,
                services,
                tags,
            } => {
                let source_id = match source {
                    Some(s) => Some(
                        c.get::<Source>(&format!("/api/sources/{}", enc(&s)))
                            .await?
                            .id,
                    ),
                    None => None,
                };
                let move_group_id = match group {
                    Some(g) => Some(
                        c.get::<MoveGroup>(&format!("/api/groups/{}", enc(&g)))
                            .await?
                            .id,
                    ),
                    None => None,
                };
                let ds = parse_disks(disks, disk_format)?;
                let body = NewWorkload {
                    name,
                    source_id,
                    os,
                    cpus,
                    memory_mib,
                    disks: ds,
                    services: non_empty(services),
                    move_group_id,
                    group_order: order,
                    tags: non_empty(tags),
                    ..Default::default()
                };
                let w: Workload = c.post("/api/workloads", &body).await?;
                if c.json {
                    return print_json(&w).map(|_| ExitCode::SUCCESS);
                }
                println!("workload {} added ({})", w.name, w.id);
            }
            InventoryCommand::Set {
                name,
                source,
                disks,
                disk_format,
                group,
                order,
                os,
                cpus,
                memory_mib,
                services,
                tags,
            } => {
                let source_id = match source {
                    Some(s) => Some(
                        c.get::<Source>(&format!("/api/sources/{}", enc(&s)))
                            .await?
                            .id,
                    ),
                    None => None,
                };
                let move_group_id = match group {
                    Some(g) => Some(
                        c.get::<MoveGroup>(&format!("/api/groups/{}", enc(&g)))
                            .await?
                            .id,
                    ),
                    None => None,
                };
                let patch = WorkloadPatch {
                    source_id,
                    os,
                    cpus,
                    memory_mib,
                    disks: if disks.is_empty() && disk_format.is_none() {
                        None
                    } else {
                        Some(parse_disks(disks, disk_format)?)
                    },
                    // `--services ''` clears the list.
                    services: services.map(non_empty),
                    move_group_id,
                    group_order: order,
                    tags: tags.map(non_empty),
                    ..Default::default()
                };
                let w: Workload = c
                    .patch(&format!("/api/workloads/{}", enc(&name)), &patch)
                    .await?;
                if c.json {
                    return print_json(&w).map(|_| ExitCode::SUCCESS);
                }
                println!("workload {} updated", w.name);
            }
            InventoryCommand::Import { csv } => {
                let text = std::fs::read_to_string(&csv)
                    .with_context(|| format!("reading {}", csv.display()))?;
                let r: Value = c
                    .post_text("/api/workloads/import", "text/csv", text)
                    .await?;
                if c.json {
                    print_json(&r)?;
                } else {
                    println!(
                        "imported {} workloads, rejected {} rows",
                        r["imported"], r["rejected"]
                    );
                    for e in r["errors"].as_array().into_iter().flatten() {
                        println!(
                            "  {}:{}: {}",
                            csv.display(),
                            e["line"],
                            e["message"].as_str().unwrap_or("")
                        );
                    }
                }
                if r["errors"].as_array().is_some_and(|e| !e.is_empty()) {
                    return Ok(ExitCode::from(2));
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Args, Debug)]
pub struct GroupArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: GroupCommand,
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// List move groups.
    List(PageArgs),
    /// Show a move group and its members' migrations.
    Show { name: String },
    /// Create a move group (a wave).
    Add {
        name: String,
        /// YYYY-MM-DD.
        #[arg(long)]
        target_date: Option<String>,
        /// Members cut over at once.
        #[arg(long, default_value_t = 1)]
        concurrency: u32,
        /// Free text, e.g. "Sat 22:00-02:00 UTC".
        #[arg(long)]
        window: Option<String>,
    },
    /// Apply a profile to every member: creates (and starts) their migrations.
    Apply {
        name: String,
        #[arg(long)]
        profile: String,
        /// Create the migrations without starting them.
        #[arg(long)]
        no_start: bool,
    },
    /// A delta sync now for every member.
    Sync { name: String },
    /// Cut the group over, respecting member order and the group's concurrency.
    Cutover { name: String },
}

pub fn run_group(a: GroupArgs) -> Result<ExitCode> {
    let c = Client::new(&a.client)?;
    super::util::runtime()?.block_on(async move {
        match a.command {
            GroupCommand::List(p) => {
                let page: Paged<MoveGroup> = c.get(&format!("/api/groups?{}", p.query())).await?;
                if c.json {
                    return print_json(&page.items).map(|_| ExitCode::SUCCESS);
                }
                let rows = page
                    .items
                    .iter()
                    .map(|g| {
                        vec![
                            g.name.clone(),
                            opt(&g.target_date),
                            g.concurrency.to_string(),
                            opt(&g.cutover_window),
                            if g.cutover_requested {
                                "in progress".into()
                            } else {
                                "-".into()
                            },
                            g.id.to_string(),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(
                        &[
                            "NAME",
                            "TARGET DATE",
                            "CONCURRENCY",
                            "WINDOW",
                            "CUTOVER",
                            "ID"
                        ],
                        rows
                    )
                );
                print_page_footer(page.total, page.items.len(), page.offset);
            }
            GroupCommand::Show { name } => {
                let g: MoveGroup = c.get(&format!("/api/groups/{}", enc(&name))).await?;
                let ms: Paged<Migration> = c
                    .get(&format!("/api/migrations?group={}&limit=500", g.id))
                    .await?;
                if c.json {
                    return print_json(
                        &serde_json::json!({"move_group": g, "migrations": ms.items}),
                    )
                    .map(|_| ExitCode::SUCCESS);
                }
                println!(
                    "{}",
                    details(vec![
                        ("name", g.name.clone()),
                        ("id", g.id.to_string()),
                        ("target date", opt(&g.target_date)),
                        ("concurrency", g.concurrency.to_string()),
                        ("window", opt(&g.cutover_window)),
                        ("cutover", g.cutover_requested.to_string())
                    ])
                );
                let rows = ms
                    .items
                    .iter()
                    .map(|m| {
                        vec![
                            m.workload_name.clone(),
                            m.status.state.to_string(),
                            m.id.to_string(),
                        ]
                    })
                    .collect();
                println!("{}", table(&["WORKLOAD", "STATE", "MIGRATION"], rows));
            }
            GroupCommand::Add {
                name,
                target_date,
                concurrency,
                window,
            } => {
                let g: MoveGroup = c
                    .post(
                        "/api/groups",
                        &NewMoveGroup {
                            name,
                            target_date,
                            concurrency,
                            cutover_window: window,
                        },
                    )
                    .await?;
                if c.json {
                    return print_json(&g).map(|_| ExitCode::SUCCESS);
                }
                println!("move group {} created ({})", g.name, g.id);
            }
            GroupCommand::Apply {
                name,
                profile,
                no_start,
            } => {
                let r: Value = c
                    .post(
                        &format!("/api/groups/{}/migrations", enc(&name)),
                        &serde_json::json!({"profile": profile, "start": !no_start}),
                    )
                    .await?;
                if c.json {
                    return print_json(&r).map(|_| ExitCode::SUCCESS);
                }
                println!(
                    "created {} migrations",
                    r["created"].as_array().map(|a| a.len()).unwrap_or(0)
                );
                for s in r["skipped"].as_array().into_iter().flatten() {
                    println!("  skipped {}", s.as_str().unwrap_or(""));
                }
            }
            GroupCommand::Sync { name } => {
                let r: Value = c
                    .post(
                        &format!("/api/groups/{}/sync", enc(&name)),
                        &serde_json::json!({}),
                    )
                    .await?;
                if c.json {
                    return print_json(&r).map(|_| ExitCode::SUCCESS);
                }
                println!(
                    "delta sync started for {} members",
                    r["applied"].as_array().map(|a| a.len()).unwrap_or(0)
                );
                for s in r["skipped"].as_array().into_iter().flatten() {
                    println!("  skipped {}", s.as_str().unwrap_or(""));
                }
            }
            GroupCommand::Cutover { name } => {
                let g: MoveGroup = c
                    .post(
                        &format!("/api/groups/{}/cutover", enc(&name)),
                        &serde_json::json!({}),
                    )
                    .await?;
                if c.json {
                    return print_json(&g).map(|_| ExitCode::SUCCESS);
                }
                println!(
                    "cutover of move group {} started (concurrency {})",
                    g.name, g.concurrency
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// A comma-separated list as given, without empty items (`--tags ''` is no tags).
fn non_empty(v: Vec<String>) -> Vec<String> {
    v.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}
