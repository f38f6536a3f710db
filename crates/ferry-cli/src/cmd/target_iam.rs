//! `ferry target setup-iam`: step 1 of the workflow. The administrator's password is used
//! for this one run, from this process only: it never reaches the appliance. The service
//! user's password is generated here and goes only to the manager and, encrypted, to
//! the appliance's credential store.

use super::client::{print_json, table, Client};
use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_model::{Credential, CredentialKind, NewCredential, Target, TargetKind, TargetPatch};
use ferry_morpheus::iam::{self, IamRequest, ROLE};
use rand::Rng;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct SetupIamArgs {
    /// The target (kind vme) by name or id; its endpoint is the manager's URL.
    pub name: String,
    /// An administrator of the manager.
    #[arg(long, default_value = "admin")]
    pub admin_user: String,
    /// Read the administrator's password from this file (else $FERRY_ADMIN_PASSWORD,
    /// else one line on standard input).
    #[arg(long)]
    pub admin_password_file: Option<PathBuf>,
    /// The service user to create or update.
    #[arg(long, default_value = "ferry-svc")]
    pub service_user: String,
    /// The service user's e-mail address (Morpheus requires a valid one). Default:
    /// ferry-migration@ the manager's host name; given for an existing user, it replaces
    /// the user's address.
    #[arg(long)]
    pub email: Option<String>,
    /// Show the calls that would change something, and make none.
    #[arg(long)]
    pub dry_run: bool,
    /// CA certificates (PEM) to trust for the manager (default: the target's config.ca_bundle).
    #[arg(long)]
    pub ca_bundle: Option<PathBuf>,
    /// Do not verify the manager's TLS certificate (a lab only; default: config.insecure).
    #[arg(long)]
    pub insecure: bool,
}

fn admin_password(a: &SetupIamArgs) -> Result<String> {
    if let Some(f) = &a.admin_password_file {
        let s = std::fs::read_to_string(f)
            .with_context(|| format!("reading the admin password from {}", f.display()))?;
        return Ok(s.trim_end_matches(['\n', '\r']).to_string());
    }
    if let Ok(p) = std::env::var("FERRY_ADMIN_PASSWORD") {
        return Ok(p);
    }
    eprint!("password of {} on the manager: ", a.admin_user);
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the admin password from standard input")?;
    let p = line.trim_end_matches(['\n', '\r']).to_string();
    if p.is_empty() {
        bail!("no admin password: give --admin-password-file, $FERRY_ADMIN_PASSWORD or type it");
    }
    Ok(p)
}

/// A password that satisfies the usual complexity rules (upper, lower, digit, symbol).
fn generate_password() -> String {
    const ALNUM: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::rng();
    let body: String = (0..28)
        .map(|_| ALNUM[rng.random_range(0..ALNUM.len())] as char)
        .collect();
    format!("Fy{body}9-")
}

pub async fn run(c: &Client, a: SetupIamArgs) -> Result<ExitCode> {
    let t: Target = c
        .get(&format!("/api/targets/{}", super::client::enc(&a.name)))
        .await?;
    if t.kind != TargetKind::Vme {
        bail!(
            "target {} is of kind {}: setup-iam is for VM Essentials (kind vme) targets",
            t.name,
            t.kind
        );
    }
    let Some(url) = t.endpoint.clone() else {
        bail!(
            "target {} has no endpoint: set the manager's URL (ferry target add … --endpoint https://vme.example.com)",
            t.name
        );
    };
    let mut opts = ferry_morpheus::ClientOptions::new(url);
    opts.ca_bundle = a.ca_bundle.clone().or_else(|| {
        t.config
            .get("ca_bundle")
            .and_then(|v| v.as_str())
            .map(PathBuf::from)
    });
    opts.insecure = a.insecure || t.config.get("insecure").and_then(|v| v.as_bool()) == Some(true);

    // Does the appliance already hold this service user's credential for the target?
    let held = match t.credential_id {
        None => false,
        Some(id) => {
            let page: super::source::Paged<Credential> =
                c.get("/api/credentials?limit=500").await?;
            page.items
                .iter()
                .any(|x| x.id == id && x.username.as_deref() == Some(a.service_user.as_str()))
        }
    };
    let admin = ferry_morpheus::Client::new(
        &opts,
        ferry_morpheus::Login {
            username: a.admin_user.clone(),
            password: admin_password(&a)?,
        },
    )?;
    let email = match &a.email {
        Some(e) => e.clone(),
        None => iam::default_email(&opts.url).ok_or_else(|| {
            anyhow::anyhow!(
                "no e-mail address for the service user: the manager's address {} has no host name to make one from; give --email (managers refuse addresses without a domain)",
                opts.url
            )
        })?,
    };
    iam::check_email(&email).map_err(|m| anyhow::anyhow!("--email {email:?}: {m}"))?;
    let req = IamRequest {
        service_user: a.service_user.clone(),
        email,
        set_email: a.email.is_some(),
        password: generate_password(),
        reset_password: !held,
        dry_run: a.dry_run,
    };
    let rep = iam::setup(&admin, &req)
        .await
        .context("setting up the migration role and service user")?;

    let mut credential = None;
    if rep.password_set && !a.dry_run {
        let name = format!("{}-service-account", t.name);
        let existing: super::source::Paged<Credential> =
            c.get("/api/credentials?limit=500").await?;
        let name = if existing.items.iter().any(|x| x.name == name) {
            format!(
                "{name}-{}",
                time::OffsetDateTime::now_utc().unix_timestamp()
            )
        } else {
            name
        };
        let cred: Credential = c
            .post(
                "/api/credentials",
                &NewCredential {
                    name,
                    kind: CredentialKind::Password,
                    username: Some(a.service_user.clone()),
                    secret: req.password.clone(),
                },
            )
            .await
            .context("the service user was set up, but storing its credential in the appliance failed: run setup-iam again (it resets the password)")?;
        let _: Target = c
            .patch(
                &format!("/api/targets/{}", t.id),
                &TargetPatch {
                    credential_id: Some(cred.id),
                    ..Default::default()
                },
            )
            .await?;
        credential = Some(cred);
    }

    if c.json {
        print_json(&serde_json::json!({
            "target": t.name,
            "report": rep,
            "credential": credential,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if rep.changes.is_empty() {
        println!(
            "nothing to change: role {ROLE} and service user {} are as Ferry needs them",
            a.service_user
        );
    } else {
        let rows = rep
            .changes
            .iter()
            .map(|ch| vec![ch.call.clone(), ch.what.clone()])
            .collect();
        let head = if a.dry_run { "WOULD CALL" } else { "CALLED" };
        println!("{}", table(&[head, "CHANGE"], rows));
    }
    if let Some(cred) = credential {
        println!(
            "service user {}'s password stored encrypted in the appliance as credential {} ({}), used by target {}",
            a.service_user, cred.name, cred.id, t.name
        );
    }
    if a.dry_run {
        println!("dry run: nothing was changed");
    }
    Ok(ExitCode::SUCCESS)
}
