//! `ferry profile`: migration profiles from TOML files, validated with errors that point
//! at the line.

use super::client::{
    details, enc, print_json, print_page_footer, table, when, Client, ClientArgs, PageArgs,
};
use super::source::Paged;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_model::{Profile, ProfileSpec};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct ProfileArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: ProfileCommand,
}

#[derive(Subcommand, Debug)]
pub enum ProfileCommand {
    /// List profiles.
    List(PageArgs),
    /// Show a profile.
    Show { name: String },
    /// Check a profile file without sending it.
    Validate { file: PathBuf },
    /// Create a profile from a TOML file.
    Create { file: PathBuf },
}

/// Parses and validates a profile file; errors name the file and line.
pub fn load(path: &Path) -> Result<ProfileSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text, &path.display().to_string())
}

pub fn parse(text: &str, name: &str) -> Result<ProfileSpec> {
    let spec: ProfileSpec = match toml::from_str(text) {
        Ok(s) => s,
        Err(e) => {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(1);
            bail!("{name}:{line}: {}", e.message());
        }
    };
    let errs = spec.validate();
    if !errs.is_empty() {
        let lines: Vec<String> = errs
            .iter()
            .map(|e| {
                format!(
                    "{name}:{}: {}: {}",
                    line_of(text, &e.field),
                    e.field,
                    e.message
                )
            })
            .collect();
        bail!("invalid profile:\n{}", lines.join("\n"));
    }
    Ok(spec)
}

/// The line of a dotted field path (`schedule.cron`, `post_cutover[1].kind`) in the TOML.
fn line_of(text: &str, field: &str) -> usize {
    let parts: Vec<&str> = field.split('.').collect();
    let key_re = |line: &str, key: &str| {
        let t = line.trim_start();
        t.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0;
    if parts.len() > 1 {
        let (table, idx) = match parts[0].split_once('[') {
            Some((t, i)) => (t, i.trim_end_matches(']').parse::<usize>().unwrap_or(0)),
            None => (parts[0], 0),
        };
        let mut seen = 0;
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim();
            if t == format!("[{table}]") || t == format!("[[{table}]]") {
                if seen == idx {
                    start = i;
                    break;
                }
                seen += 1;
            }
            if key_re(l, parts[0]) {
                return i + 1;
            }
        }
    }
    let key = parts
        .last()
        .map(|k| k.split('[').next().unwrap_or(k))
        .unwrap_or(field);
    for (i, l) in lines.iter().enumerate().skip(start) {
        if key_re(l, key) {
            return i + 1;
        }
    }
    if start > 0 {
        return start + 1;
    }
    1
}

pub fn run(a: ProfileArgs) -> Result<ExitCode> {
    if let ProfileCommand::Validate { file } = &a.command {
        let spec = load(file)?;
        if a.client.json {
            print_json(&spec)?;
        } else {
            println!("{}: profile '{}' is valid", file.display(), spec.name);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let c = Client::new(&a.client)?;
    super::util::runtime()?.block_on(async move {
        match a.command {
            ProfileCommand::List(p) => {
                let page: Paged<Profile> = c.get(&format!("/api/profiles?{}", p.query())).await?;
                if c.json {
                    return print_json(&page.items).map(|_| ExitCode::SUCCESS);
                }
                let rows = page
                    .items
                    .iter()
                    .map(|p| {
                        vec![
                            p.spec.name.clone(),
                            p.spec.target.clone(),
                            p.spec.sync_method.to_string(),
                            p.spec.schedule.mode.to_string(),
                            p.spec.uat.required.to_string(),
                            p.id.to_string(),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(
                        &["NAME", "TARGET", "SYNC", "SCHEDULE", "UAT REQUIRED", "ID"],
                        rows
                    )
                );
                print_page_footer(page.total, page.items.len(), page.offset);
            }
            ProfileCommand::Show { name } => {
                let p: Profile = c.get(&format!("/api/profiles/{}", enc(&name))).await?;
                if c.json {
                    return print_json(&p).map(|_| ExitCode::SUCCESS);
                }
                println!(
                    "{}",
                    details(vec![
                        ("name", p.spec.name.clone()),
                        ("id", p.id.to_string()),
                        ("created", when(p.created_at))
                    ])
                );
                println!("{}", toml::to_string_pretty(&p.spec).unwrap_or_default());
            }
            ProfileCommand::Create { file } => {
                let spec = load(&file)?;
                let p: Profile = c.post("/api/profiles", &spec).await?;
                if c.json {
                    return print_json(&p).map(|_| ExitCode::SUCCESS);
                }
                println!("profile {} created ({})", p.spec.name, p.id);
            }
            ProfileCommand::Validate { .. } => unreachable!("handled above"),
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_point_at_the_line() {
        let e = parse("name = \"p\"\ntarget = \"t\"\nsync_method = 3\n", "p.toml").unwrap_err();
        assert!(e.to_string().starts_with("p.toml:3:"), "{e}");
        let e = parse("name = \"p\"\ntarget = \"t\"\ncolour = \"red\"\n", "p.toml").unwrap_err();
        assert!(e.to_string().starts_with("p.toml:3:"), "{e}");
    }

    #[test]
    fn semantic_errors_point_at_the_line() {
        let text = "name = \"p\"\ntarget = \"t\"\n\n[schedule]\nmode = \"cron\"\ncron = \"99 * * * *\"\n\n[[post_cutover]]\nkind = \"dns\"\n\n[[post_cutover]]\nkind = \"teleport\"\n";
        let e = parse(text, "p.toml").unwrap_err().to_string();
        assert!(e.contains("p.toml:6: schedule.cron"), "{e}");
        assert!(e.contains("p.toml:12: post_cutover[1].kind"), "{e}");
    }

    #[test]
    fn a_full_profile_parses() {
        let text = r#"
name = "wave1-default"
target = "lab"
sync_method = "hash_compare"
services_to_stop = ["nginx", "postgresql"]

[placement]
cluster = "c1"
datastore = "ds1"
plan = "4cpu-8gb"

[network_map]
"VM Network" = "prod-vlan-10"

[schedule]
mode = "continuous"
min_interval_secs = 300

[uat]
network = "migration-net"
required = true

[[validation]]
kind = "http"
params = { url = "http://10.0.0.5/" }
"#;
        let p = parse(text, "p.toml").unwrap();
        assert_eq!(p.network_map["VM Network"], "prod-vlan-10");
        assert!(p.uat.required);
    }
}
