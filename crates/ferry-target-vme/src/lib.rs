//! The HPE Morpheus VM Essentials (VME) target, through the Morpheus REST API only.
//!
//! Target: `kind: vme`, `endpoint: https://vme-manager`, `credential_id`: the service
//! account `ferry target setup-iam` made. Config (all optional but the placement the
//! profile does not give): `cloud`, `group`, `plan`, `layout` (default the first layout
//! of `instance_type`), `instance_type` (default `mvm`), `datastore`, `network` (the
//! production network when the profile's network map has none), `ca_bundle`,
//! `insecure`, `boot_timeout_s`, `probe_netns` (run tcp/http checks from inside this
//! network namespace: for labs and tests where the appliance is not routed to VME).
//!
//! Delivery is *image mode*: the replication engine syncs each disk into the migration's
//! work directory (the staging copy), and each instance (test or production) is
//! created from a virtual image made of the last complete generation, powered off, then
//! started on its network. Test instances and their images are temporary: stopping UAT
//! deletes both. What an instance is for is recorded in the work directory, so a retried
//! or resumed step finds what an earlier attempt created instead of creating it twice.

mod delta;
mod state;
mod worker_image;

use async_trait::async_trait;
use ferry_adapter::{
    AResult, AdapterError, CheckPhase, DiskDestination, SourceDisk, StepContext, TargetAdapter,
    TARGET_PASSWORD, TARGET_USERNAME,
};
use ferry_model::{PostCutoverAction, ValidationCheck};
use ferry_morpheus::inventory::{Inventory, Named, Placement};
use ferry_morpheus::provision::{self, InstanceSpec};
use ferry_morpheus::{Client, ClientOptions, Login, MorpheusError};
use state::{Deployed, Role};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct VmeTarget;

fn api_err(e: MorpheusError) -> AdapterError {
    AdapterError {
        retryable: e.is_retryable(),
        message: e.to_string(),
    }
}

fn cfg<'a>(ctx: &'a StepContext, key: &str) -> Option<&'a str> {
    ctx.target.config.get(key).and_then(|v| v.as_str())
}

fn client(ctx: &StepContext) -> AResult<Client> {
    let url = ctx.target.endpoint.clone().ok_or_else(|| {
        AdapterError::permanent(format!(
            "vme target '{}' has no endpoint: set the manager's URL",
            ctx.target.name
        ))
    })?;
    let (Some(user), Some(pass)) = (
        ctx.secrets.get(TARGET_USERNAME),
        ctx.secrets.get(TARGET_PASSWORD),
    ) else {
        return Err(AdapterError::permanent(format!(
            "vme target '{}' has no service account: run `ferry target setup-iam {}`",
            ctx.target.name, ctx.target.name
        )));
    };
    let mut o = ClientOptions::new(url);
    o.ca_bundle = cfg(ctx, "ca_bundle").map(PathBuf::from);
    o.insecure = ctx.target.config.get("insecure").and_then(|v| v.as_bool()) == Some(true);
    Client::new(
        &o,
        Login {
            username: user.to_string(),
            password: pass.to_string(),
        },
    )
    .map_err(api_err)
}

/// The placement of a workload, by name, from the profile then the target config.
fn placement(ctx: &StepContext) -> Placement {
    let p = &ctx.profile.spec.placement;
    let mut networks: Vec<String> = production_network(ctx).into_iter().collect();
    if let Some(u) = &ctx.profile.spec.uat.network {
        networks.push(u.clone());
    }
    Placement {
        cloud: cfg(ctx, "cloud").map(str::to_string),
        group: cfg(ctx, "group").map(str::to_string),
        cluster: p
            .cluster
            .clone()
            .or(cfg(ctx, "cluster").map(str::to_string)),
        plan: p.plan.clone().or(cfg(ctx, "plan").map(str::to_string)),
        datastore: p
            .datastore
            .clone()
            .or(cfg(ctx, "datastore").map(str::to_string)),
        networks,
    }
}

/// The target network of the workload's first NIC: the profile's network map, else the
/// target's `network`.
fn production_network(ctx: &StepContext) -> Option<String> {
    ctx.workload
        .nics
        .first()
        .and_then(|n| n.network.as_ref())
        .and_then(|n| ctx.profile.spec.network_map.get(n).cloned())
        .or_else(|| cfg(ctx, "network").map(str::to_string))
}

fn find<'a>(list: &'a [Named], kind: &str, name: Option<&str>) -> AResult<&'a Named> {
    let name = name.ok_or_else(|| {
        AdapterError::permanent(format!(
            "no {kind} given: set it in the profile's placement or the target's config"
        ))
    })?;
    list.iter()
        .find(|x| x.name == name || x.id.to_string() == name)
        .ok_or_else(|| AdapterError::permanent(format!("the manager has no {kind} '{name}'")))
}

/// The instance to create for `role`, with ids resolved from the manager's inventory.
async fn instance_spec(c: &Client, ctx: &StepContext, role: Role) -> AResult<InstanceSpec> {
    let inv = Inventory::discover(c).await.map_err(api_err)?;
    let p = placement(ctx);
    inv.check_placement(&p).map_err(api_err)?;
    let cloud = find(&inv.clouds, "cloud", p.cloud.as_deref())?;
    let group = find(&inv.groups, "group", p.group.as_deref())?;
    // The layout is one of the instance type's; the plan one for the layout's provision
    // type (plans of other provision types share names with the VM ones).
    let itype_code = cfg(ctx, "instance_type").unwrap_or("mvm");
    let itype = inv
        .instance_types
        .iter()
        .find(|t| t.code.as_deref() == Some(itype_code))
        .ok_or_else(|| {
            AdapterError::permanent(format!(
                "the manager has no instance type with code '{itype_code}' (it has: {}): set the target's config.instance_type",
                inv.instance_types.iter().filter_map(|t| t.code.as_deref()).collect::<Vec<_>>().join(", ")
            ))
        })?;
    let layouts = Inventory::layouts_of(c, itype.id).await.map_err(api_err)?;
    let layout_kind = format!("layout of instance type {itype_code}");
    let layout = match cfg(ctx, "layout") {
        Some(l) => find(&layouts, &layout_kind, Some(l))?,
        None => layouts.first().ok_or_else(|| {
            AdapterError::permanent(format!(
                "instance type {itype_code} has no layout on the manager: add one, or set config.instance_type"
            ))
        })?,
    }
    .clone();
    let plans: Vec<Named> = inv
        .service_plans
        .iter()
        .filter(|pl| pl.provision_type.is_none() || pl.provision_type == layout.provision_type)
        .cloned()
        .collect();
    let plan_kind = format!(
        "service plan for provision type {}",
        layout.provision_type.as_deref().unwrap_or(itype_code)
    );
    let plan = find(&plans, &plan_kind, p.plan.as_deref())?;
    tracing::info!(
        instance_type = itype_code,
        layout = %format!("{} ({})", layout.name, layout.id),
        plan = %format!("{} ({})", plan.name, plan.id),
        "placement"
    );
    let datastore = match &p.datastore {
        Some(d) => Some(find(&inv.datastores, "datastore", Some(d))?.id),
        None => None,
    };
    let net_name = match role {
        Role::Production => production_network(ctx),
        Role::Test => ctx.profile.spec.uat.network.clone(),
    };
    let network = find(
        &inv.networks,
        match role {
            Role::Production => "production network",
            Role::Test => "migration network (profile uat.network)",
        },
        net_name.as_deref(),
    )?;
    let ip = instance_ip(ctx, role);
    // The manager refuses a static address outside the network's range: say so now.
    if let (Some(ip), Some(cidr)) = (&ip, &network.cidr) {
        if ferry_morpheus::inventory::in_cidr(ip, cidr) == Some(false) {
            let nic = ctx
                .workload
                .nics
                .first()
                .map(|n| n.name.as_str())
                .unwrap_or("eth0");
            return Err(AdapterError::permanent(match role {
                Role::Test => format!(
                    "the test instance would get {ip} on migration network '{}' ({cidr}), which the manager refuses: give it an address in {cidr} or DHCP in the profile (uat.addresses: {{\"{nic}\": \"dhcp\"}})",
                    network.name
                ),
                Role::Production => format!(
                    "the workload's address {ip} is outside production network '{}' ({cidr}): map its NIC's network to one that holds it (the profile's network_map)",
                    network.name
                ),
            }));
        }
    }
    let gib = |b: u64| b.div_ceil(1 << 30).max(1);
    Ok(InstanceSpec {
        name: state::instance_name(ctx, role),
        cloud_id: cloud.id,
        group_id: group.id,
        plan_id: plan.id,
        layout_id: layout.id,
        instance_type: cfg(ctx, "instance_type").unwrap_or("mvm").to_string(),
        resource_pool: match &p.cluster {
            Some(name) => Some(format!(
                "pool-{}",
                find(&inv.clusters, "cluster", Some(name))?.id
            )),
            None => None,
        },
        image_id: None,
        volumes: ctx
            .workload
            .disks
            .iter()
            .map(|d| (gib(d.size_bytes), datastore))
            .collect(),
        networks: vec![(network.id, ip)],
        powered_off: true,
    })
}

/// The address the instance for `role` gets on its first NIC: production keeps the
/// workload's; the test instance takes the profile's `uat.addresses` for that NIC (an
/// address, or none for DHCP), else the workload's too.
fn instance_ip(ctx: &StepContext, role: Role) -> Option<String> {
    if role == Role::Test {
        let nic = ctx
            .workload
            .nics
            .first()
            .map(|n| n.name.as_str())
            .unwrap_or("");
        if let Some(a) = ctx.profile.spec.uat.address_of(nic) {
            return a.map(str::to_string);
        }
    }
    workload_ip(ctx)
}

/// The workload's IPv4 address (its first NIC's), without a prefix length.
fn workload_ip(ctx: &StepContext) -> Option<String> {
    ctx.workload
        .nics
        .first()
        .and_then(|n| n.ips.first())
        .map(|ip| ip.split('/').next().unwrap_or(ip).to_string())
}

fn staging(ctx: &StepContext, disk: &str) -> PathBuf {
    ctx.work_dir.join("vme").join(format!("{disk}.raw"))
}

/// Where image mode's converted overlay for `role` lives (above the raw staging copy).
fn boot_dir(ctx: &StepContext, role: Role) -> PathBuf {
    ctx.work_dir.join("vme").join(match role {
        Role::Test => "boot-uat",
        Role::Production => "boot-production",
    })
}

/// Image mode's conversion: a qcow2 overlay above the raw staging copy, converted; the
/// delivered image is made from it, so the staging copy (the synced generation) stays
/// the source's. The NIC keeps the source's MAC address in the guest's pinning: a
/// manager that gives the instance another one leaves the interface to its default
/// name, which the conversion's warning says.
async fn prepare_image_boot(
    ctx: &StepContext,
    role: Role,
) -> AResult<Option<ferry_adapter::BootPrep>> {
    use ferry_convert::step;
    if delta::enabled(ctx) || !step::wanted(ctx) {
        return Ok(None);
    }
    if state::load(ctx, role).is_some() {
        // Already delivered: a retried step.
        return Ok(None);
    }
    let disks = &ctx.workload.disks;
    let bases = disks
        .iter()
        .map(|d| {
            (
                d.name.clone(),
                ferry_convert::GuestDisk {
                    path: staging(ctx, &d.name),
                    format: ferry_convert::ImageFormat::Raw,
                },
            )
        })
        .collect();
    let macs: Vec<String> = ctx
        .workload
        .nics
        .iter()
        .map(|n| n.mac.clone().unwrap_or_else(|| step::made_mac(ctx)))
        .collect();
    let kvm = ferry_qemu::detect_accel().await == ferry_qemu::Accel::Kvm;
    let (policy, tools) = step::tools(ctx, &ctx.work_dir.join("guestfs"), kvm).await;
    let req = ferry_convert::BootRequest {
        name: ctx.workload.name.clone(),
        bases,
        copy_first: false,
        nics: step::guest_nics(ctx, &macs),
        dir: boot_dir(ctx, role),
        policy,
    };
    let mut p = ferry_convert::prepare(&tools, &req)
        .await
        .map_err(|e| step::prepare_error(ctx, e))?;
    if p.emulated {
        // A manager's instance type fixes the devices: there is nothing to fall back to.
        return Err(AdapterError::permanent(format!(
            "{}; VME boots instances on virtio only, so the guest must be converted: fix it, or set the profile's conversion to \"none\" to deliver it as synced",
            p.warnings.join("; ")
        )));
    }
    p.warnings.push(
        "on VME the instance's NIC may get a MAC address other than the source's; the guest's interface name is pinned to the source's MAC".into(),
    );
    Ok(Some(step::boot_prep(&p)))
}

fn boot_timeout(ctx: &StepContext) -> Duration {
    Duration::from_secs(
        ctx.target
            .config
            .get("boot_timeout_s")
            .and_then(|v| v.as_u64())
            .unwrap_or(900),
    )
}

/// Delivers the last complete generation as an instance for `role` and starts it.
async fn deploy(ctx: &StepContext, role: Role) -> AResult<()> {
    let c = client(ctx)?;
    if let Some(d) = state::load(ctx, role) {
        // A retried step: it exists; make sure it runs.
        return start(&c, ctx, d.instance_id).await;
    }
    let disks = &ctx.workload.disks;
    if disks.len() != 1 {
        return Err(AdapterError::permanent(format!(
            "image mode delivers one disk per instance; workload '{}' has {}: use delta mode (set the target's config.worker_base_image)",
            ctx.workload.name,
            disks.len()
        )));
    }
    // A converted overlay when the guest was converted for this boot, else the synced disk.
    let (synced, format) = match ferry_convert::Prepared::load(&boot_dir(ctx, role)) {
        Some(p) if p.converted => (p.disks[0].1.clone(), "qcow2"),
        _ => (staging(ctx, &disks[0].name), "raw"),
    };
    if !synced.exists() {
        return Err(AdapterError::permanent(format!(
            "no complete sync of disk '{}' to deliver ({} is missing): run a sync first",
            disks[0].name,
            synced.display()
        )));
    }
    let spec = instance_spec(&c, ctx, role).await?;
    // What an earlier attempt created before it could record it (the appliance died
    // in between) carries this delivery's name: it goes before a new one is made.
    remove_named(&c, &spec.name, true).await?;
    let t = Instant::now();
    let got = provision::deliver_image_mode(&c, &synced, format, &ctx.work_dir.join("vme"), &spec)
        .await
        .map_err(api_err)?;
    state::save(
        ctx,
        role,
        &Deployed {
            instance_id: got.instance_id,
            image_id: got.image_id,
        },
    )?;
    let _ = tokio::fs::remove_file(&got.qcow2).await;
    tracing::info!(
        workload = %ctx.workload.name, ?role, instance = got.instance_id,
        bytes = got.uploaded_bytes, secs = t.elapsed().as_secs_f64(), "delivered as a virtual image"
    );
    start(&c, ctx, got.instance_id).await
}

/// Starts the instance and waits until it runs.
async fn start(c: &Client, ctx: &StepContext, id: i64) -> AResult<()> {
    provision::start_instance(c, id).await.map_err(api_err)?;
    provision::wait_status(c, id, "running", boot_timeout(ctx))
        .await
        .map_err(api_err)
}

/// Stops and deletes what was deployed for `role`, and its image.
/// Deletes every instance and virtual image called `name` (the names Ferry gives what it
/// delivers). `leftovers`: they are what an interrupted delivery left, said as a warning.
async fn remove_named(c: &Client, name: &str, leftovers: bool) -> AResult<()> {
    for id in provision::instances_named(c, name).await.map_err(api_err)? {
        if leftovers {
            tracing::warn!(instance = id, %name, "removing an instance an interrupted delivery left on the manager");
        }
        match provision::delete_instance(c, id).await {
            Ok(()) | Err(MorpheusError::NotFound { .. }) => {}
            Err(e) => return Err(api_err(e)),
        }
    }
    for id in provision::images_named(c, name).await.map_err(api_err)? {
        if leftovers {
            tracing::warn!(image = id, %name, "removing a virtual image an interrupted delivery left on the manager");
        }
        match provision::delete_image(c, id).await {
            Ok(()) | Err(MorpheusError::NotFound { .. }) => {}
            Err(e) => return Err(api_err(e)),
        }
    }
    Ok(())
}

/// After a rollback, nothing Ferry delivered for `role` may remain: what does is named,
/// and the rollback fails rather than report a clean target.
async fn assert_removed(c: &Client, ctx: &StepContext, role: Role) -> AResult<()> {
    let name = state::instance_name(ctx, role);
    let mut left = vec![];
    for id in provision::instances_named(c, &name)
        .await
        .map_err(api_err)?
    {
        left.push(format!("instance {id}"));
    }
    for id in provision::images_named(c, &name).await.map_err(api_err)? {
        left.push(format!("virtual image {id}"));
    }
    if left.is_empty() {
        return Ok(());
    }
    Err(AdapterError::transient(format!(
        "rollback: {} named '{name}' still on the manager after it was deleted; delete it there (or wait for the manager to finish) and retry the rollback",
        left.join(" and ")
    )))
}

async fn undeploy(ctx: &StepContext, role: Role) -> AResult<()> {
    let Some(d) = state::load(ctx, role) else {
        return Ok(());
    };
    let c = client(ctx)?;
    match provision::delete_instance(&c, d.instance_id).await {
        Ok(()) | Err(MorpheusError::NotFound { .. }) => {}
        Err(e) => return Err(api_err(e)),
    }
    match provision::delete_image(&c, d.image_id).await {
        Ok(()) | Err(MorpheusError::NotFound { .. }) => {}
        Err(e) => return Err(api_err(e)),
    }
    match tokio::fs::remove_dir_all(boot_dir(ctx, role)).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(AdapterError::transient(format!(
                "removing the converted overlay {}: {e}",
                boot_dir(ctx, role).display()
            )))
        }
        _ => {}
    }
    state::clear(ctx, role)
}

use ferry_adapter::checks::{param, retry};

/// Retries a TCP connect to `addr` (from inside `netns` when given) until it succeeds or
/// `within` has passed.
async fn tcp_reachable(
    netns: Option<&str>,
    addr: std::net::SocketAddr,
    within: Duration,
) -> AResult<()> {
    retry(within, || async move {
        let r = match netns {
            Some(ns) => ferry_net::tcp_check_async(ns, addr, Duration::from_secs(3))
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            None => {
                tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| "timeout".to_string())
                    .and_then(|r| r.map(drop).map_err(|e| e.to_string()))
            }
        };
        r.map_err(AdapterError::transient)
    })
    .await
}

#[async_trait]
impl TargetAdapter for VmeTarget {
    async fn preflight(&self, ctx: &StepContext) -> AResult<()> {
        ferry_convert::step::check_windows(ctx)?;
        let c = client(ctx)?;
        c.log_in().await.map_err(api_err)?;
        instance_spec(&c, ctx, Role::Production).await?;
        if ctx.profile.spec.uat.network.is_some() {
            instance_spec(&c, ctx, Role::Test).await?;
        }
        if delta::enabled(ctx) {
            delta::preflight(ctx)?;
        }
        Ok(())
    }

    async fn begin_sync(&self, ctx: &StepContext, disks: &[SourceDisk]) -> AResult<()> {
        if delta::enabled(ctx) {
            delta::begin(ctx, disks).await?;
        }
        Ok(())
    }

    async fn end_sync(&self, ctx: &StepContext, committed: bool) -> AResult<()> {
        if delta::enabled(ctx) {
            delta::end(ctx, committed).await?;
        }
        Ok(())
    }

    async fn disk_destination(
        &self,
        ctx: &StepContext,
        disk: &SourceDisk,
    ) -> AResult<DiskDestination> {
        if delta::enabled(ctx) {
            return delta::destination(ctx, disk);
        }
        Ok(DiskDestination::Local(staging(ctx, &disk.name)))
    }

    async fn prepare_boot(
        &self,
        ctx: &StepContext,
        phase: CheckPhase,
    ) -> AResult<Option<ferry_adapter::BootPrep>> {
        let role = match phase {
            CheckPhase::Uat => Role::Test,
            CheckPhase::Final => Role::Production,
        };
        prepare_image_boot(ctx, role).await
    }

    async fn start_test_instance(&self, ctx: &StepContext) -> AResult<()> {
        if ctx.profile.spec.uat.network.is_none() {
            return Err(AdapterError::permanent(
                "UAT on VME needs the profile's uat.network: the migration network test instances boot on",
            ));
        }
        if delta::enabled(ctx) {
            return delta::start_test(ctx).await;
        }
        deploy(ctx, Role::Test).await
    }

    async fn stop_test_instance(&self, ctx: &StepContext) -> AResult<()> {
        if delta::enabled(ctx) {
            return delta::stop_test(ctx).await;
        }
        undeploy(ctx, Role::Test).await
    }

    async fn start_production(&self, ctx: &StepContext) -> AResult<()> {
        if delta::enabled(ctx) {
            return delta::start_production(ctx).await;
        }
        deploy(ctx, Role::Production).await
    }

    async fn post_cutover(
        &self,
        ctx: &StepContext,
        actions: &[PostCutoverAction],
    ) -> AResult<Vec<serde_json::Value>> {
        let lookup = |r: &str| ctx.secrets.get(r).map(str::to_string);
        let ip = workload_ip(ctx);
        let mut undo = vec![];
        for a in actions {
            match a.kind.as_str() {
                "dns" => undo.push(
                    ferry_dns::action::update(&a.params, &ctx.workload.name, ip.as_deref(), &lookup)
                        .await
                        .map_err(|e| AdapterError {
                            message: e.message,
                            retryable: e.retryable,
                        })?,
                ),
                other => {
                    return Err(AdapterError::permanent(format!(
                        "the vme target does not run post-cutover action '{other}' (target '{}'; it runs dns)",
                        ctx.target.name
                    )))
                }
            }
        }
        Ok(undo)
    }

    async fn validate(
        &self,
        ctx: &StepContext,
        phase: CheckPhase,
        checks: &[ValidationCheck],
        _source_disks: &[SourceDisk],
    ) -> AResult<()> {
        let role = match phase {
            CheckPhase::Uat => Role::Test,
            CheckPhase::Final => Role::Production,
        };
        let d = state::load(ctx, role)
            .ok_or_else(|| AdapterError::permanent(format!("no {role:?} instance to validate")))?;
        let c = client(ctx)?;
        let within = boot_timeout(ctx);
        let ip = instance_ip(ctx, role);
        let netns = cfg(ctx, "probe_netns").map(str::to_string);
        for (i, check) in checks.iter().enumerate() {
            let fail =
                |m: String| AdapterError::permanent(format!("check {i} ({}): {m}", check.kind));
            match (param(check, "phase"), phase) {
                (None, _) | (Some("uat"), CheckPhase::Uat) | (Some("final"), CheckPhase::Final) => {
                }
                _ => continue,
            }
            let host = param(check, "host")
                .map(str::to_string)
                .or(ip.clone())
                .ok_or_else(|| fail("no host: the workload has no address".into()));
            match check.kind.as_str() {
                "boot" => {
                    let s = provision::instance_status(&c, d.instance_id)
                        .await
                        .map_err(api_err)?;
                    if s != "running" {
                        return Err(fail(format!("instance {} is {s}", d.instance_id)));
                    }
                }
                "tcp" => {
                    let addr: std::net::SocketAddr =
                        format!("{}:{}", host?, param(check, "port").unwrap_or("22"))
                            .parse()
                            .map_err(|e| fail(format!("bad address: {e}")))?;
                    tcp_reachable(netns.as_deref(), addr, within)
                        .await
                        .map_err(|e| fail(format!("{addr}: {}", e.message)))?;
                }
                "http" => {
                    let url = format!(
                        "http://{}:{}{}",
                        host?,
                        param(check, "port").unwrap_or("80"),
                        param(check, "path").unwrap_or("/")
                    );
                    let want: u16 = param(check, "status")
                        .unwrap_or("200")
                        .parse()
                        .unwrap_or(200);
                    let contains = param(check, "contains").map(str::to_string);
                    let Some(ns) = netns.clone() else {
                        return Err(fail(
                            "http checks on VME run from config.probe_netns (set it to a namespace routed to the instance's network)".into(),
                        ));
                    };
                    retry(within, || {
                        let (ns, url, contains) = (ns.clone(), url.clone(), contains.clone());
                        async move {
                            let r = ferry_net::http_get_async(&ns, &url, Duration::from_secs(5))
                                .await
                                .map_err(|e| AdapterError::transient(e.to_string()))?;
                            if r.status != want {
                                return Err(AdapterError::transient(format!(
                                    "status {} (expected {want})",
                                    r.status
                                )));
                            }
                            if let Some(s) = &contains {
                                if !r.body_text().contains(s.as_str()) {
                                    return Err(AdapterError::transient(format!(
                                        "the body does not contain {s:?}"
                                    )));
                                }
                            }
                            Ok(())
                        }
                    })
                    .await
                    .map_err(|e| fail(format!("GET {url}: {}", e.message)))?;
                }
                other => {
                    return Err(fail(format!(
                        "the vme target does not run '{other}' checks yet: use boot, tcp or http"
                    )))
                }
            }
        }
        Ok(())
    }

    async fn remove(&self, ctx: &StepContext) -> AResult<()> {
        if delta::enabled(ctx) {
            delta::stop_test(ctx).await?;
            delta::stop_production(ctx).await?;
        } else {
            undeploy(ctx, Role::Test).await?;
            undeploy(ctx, Role::Production).await?;
            // Also what an interrupted delivery left without a record.
            let c = client(ctx)?;
            for role in [Role::Test, Role::Production] {
                remove_named(&c, &state::instance_name(ctx, role), true).await?;
                assert_removed(&c, ctx, role).await?;
            }
        }
        let lookup = |r: &str| ctx.secrets.get(r).map(str::to_string);
        for u in ctx.facts.undo.iter().rev().filter(|u| u["kind"] == "dns") {
            ferry_dns::action::undo(u, &lookup)
                .await
                .map_err(|e| AdapterError {
                    message: format!("rollback: {}", e.message),
                    retryable: e.retryable,
                })?;
        }
        Ok(())
    }
}
