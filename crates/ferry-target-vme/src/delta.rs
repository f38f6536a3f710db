//! Delta mode: the instance and its volumes are created once, empty, at the disks'
//! sizes, plus one volume made from the target worker image. For every sync the worker
//! volume is attached as the instance's root volume and the instance boots it; the worker
//! receives each disk into its volume over mutual TLS (written in place). Before that, an
//! instance snapshot is taken: a failed sync is reverted to it. After the sync the worker
//! volume is detached again, so the instance boots its own disks. Only the Morpheus API
//! is used: no access to the VME hosts is needed.
//!
//! What this target set up for a migration is recorded in its work directory right after
//! each change the manager confirms, so a retried or resumed step carries on from there.

use std::path::PathBuf;

use ferry_adapter::{
    AResult, AdapterError, DiskDestination, RemoteReceiver, SourceDisk, StepContext,
};
use ferry_morpheus::provision::{self, AttachedVolume};
use ferry_morpheus::Client;
use serde::{Deserialize, Serialize};

use crate::state::Role;
use crate::worker_image::{self, SERVER_NAME};
use crate::{api_err, boot_timeout, cfg, client, instance_spec};

/// The port of the first volume on the worker (`ferry worker --first-port`).
const WORKER_PORT: u16 = 7480;

/// The migration's instance in delta mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeltaInstance {
    pub instance_id: i64,
    pub server_id: i64,
    pub worker_volume: i64,
    pub worker_controller: Option<i64>,
    pub worker_attached: bool,
    /// The snapshot taken before the sync in progress, if one is.
    pub pending_snapshot: Option<i64>,
    /// Syncs committed into the volumes.
    pub syncs: u64,
    /// The snapshot UAT runs behind, while it runs.
    #[serde(default)]
    pub uat_snapshot: Option<i64>,
    /// A sync interrupted UAT: boot the test again once it ended.
    #[serde(default)]
    pub resume_uat: bool,
    /// The snapshot the production boot runs behind (what a rollback reverts to).
    #[serde(default)]
    pub cutover_snapshot: Option<i64>,
}

/// The worker image uploaded for a target.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UploadedWorker {
    key: String,
    image_id: i64,
    size_bytes: u64,
}

/// Whether this target delivers by delta mode: `config.delivery = "delta"`, or a worker
/// base image configured and no `delivery` said.
pub fn enabled(ctx: &StepContext) -> bool {
    match cfg(ctx, "delivery") {
        Some(d) => d == "delta",
        None => cfg(ctx, "worker_base_image").is_some(),
    }
}

fn state_path(ctx: &StepContext) -> PathBuf {
    ctx.work_dir.join("vme").join("delta-instance.json")
}

pub fn load(ctx: &StepContext) -> Option<DeltaInstance> {
    crate::state::read_json(&state_path(ctx))
}

/// Where `begin` records the running worker's address for `destination`.
fn worker_address_path(ctx: &StepContext) -> PathBuf {
    ctx.work_dir.join("vme").join("worker-address")
}

/// The worker's base image (`config.worker_base_image`).
fn base_image(ctx: &StepContext) -> AResult<PathBuf> {
    cfg(ctx, "worker_base_image").map(PathBuf::from).ok_or_else(|| {
        AdapterError::permanent(format!(
            "delta mode needs a worker base image: set config.worker_base_image on target '{}' (a Linux image with systemd, ext4 on the whole disk)",
            ctx.target.name
        ))
    })
}

/// Deletes a snapshot that served its purpose; one already gone is fine, and a failure
/// only leaves it behind (said in the log).
async fn drop_snapshot(c: &Client, snapshot: i64, what: &str) {
    match provision::delete_snapshot(c, snapshot).await {
        Ok(()) | Err(ferry_morpheus::MorpheusError::NotFound { .. }) => {}
        Err(e) => tracing::warn!(snapshot, "cannot delete {what}: {e}"),
    }
}

fn save(ctx: &StepContext, d: &DeltaInstance) -> AResult<()> {
    crate::state::write_atomic(
        &state_path(ctx),
        &serde_json::to_vec_pretty(d).expect("serialisable"),
    )
}

fn worker_dir(ctx: &StepContext) -> PathBuf {
    worker_image::target_dir(&ctx.work_dir, &ctx.target.id.to_string()).join("worker")
}

/// The `ferry` binary that goes into the worker image.
fn ferry_binary(ctx: &StepContext) -> AResult<PathBuf> {
    if let Some(p) = cfg(ctx, "worker_binary") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    if exe.file_name().is_some_and(|n| n == "ferry") {
        return Ok(exe);
    }
    Err(AdapterError::permanent(format!(
        "this process ({}) is not the ferry binary: set the target's config.worker_binary to the ferry binary the worker runs",
        exe.display()
    )))
}

/// What delta mode needs on this appliance before any data moves: the worker's base
/// image, the binary to put in it, and the tools that write it.
pub fn preflight(ctx: &StepContext) -> AResult<()> {
    let base = base_image(ctx)?;
    std::fs::File::open(&base).map_err(|e| {
        AdapterError::permanent(format!(
            "worker base image {}: {e} (target '{}', config.worker_base_image)",
            base.display(),
            ctx.target.name
        ))
    })?;
    let ferry = ferry_binary(ctx)?;
    if !ferry.is_file() {
        return Err(AdapterError::permanent(format!(
            "worker binary {} does not exist (config.worker_binary)",
            ferry.display()
        )));
    }
    for tool in ["debugfs", "qemu-img"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            || std::path::Path::new("/sbin").join(tool).is_file();
        if !found {
            return Err(AdapterError::permanent(format!(
                "{tool} is not installed on the appliance: delta mode writes the worker image with it (e2fsprogs, qemu-utils)"
            )));
        }
    }
    Ok(())
}

/// Builds and uploads the worker image once per target (again when its recipe changed).
async fn worker_image(c: &Client, ctx: &StepContext) -> AResult<UploadedWorker> {
    let base = base_image(ctx)?;
    let dir = worker_dir(ctx);
    let ca = worker_image::pki(&dir.join("pki"), &ctx.target.name)?;
    let ferry = ferry_binary(ctx)?;
    let key = worker_image::recipe_key(&base, &ferry, &ca)?;
    let record = dir.join("image.json");
    if let Some(u) = crate::state::read_json::<UploadedWorker>(&record) {
        if u.key == key {
            return Ok(u);
        }
    }
    let t = std::time::Instant::now();
    let qcow2 = dir.join("ferry-worker.qcow2");
    let size_bytes = worker_image::build(&base, &ferry, &ca, &qcow2).await?;
    let name = format!("ferry-worker-{}", &key[..8]);
    let image_id = provision::create_image(c, &name).await.map_err(api_err)?;
    let sent = provision::upload_image(c, image_id, &qcow2, &format!("{name}.qcow2"))
        .await
        .map_err(api_err)?;
    let u = UploadedWorker {
        key,
        image_id,
        size_bytes,
    };
    crate::state::write_atomic(
        &record,
        &serde_json::to_vec_pretty(&u).expect("serialisable"),
    )?;
    let _ = tokio::fs::remove_file(&qcow2).await;
    tracing::info!(target = %ctx.target.name, image = image_id, bytes = sent, secs = t.elapsed().as_secs_f64(), "worker image uploaded");
    Ok(u)
}

/// The migration's instance, created on first use: the worker volume as root, then one
/// empty volume per disk, on the migration network (the production one when the profile
/// has none), powered off.
async fn instance(c: &Client, ctx: &StepContext) -> AResult<DeltaInstance> {
    if let Some(d) = load(ctx) {
        return Ok(d);
    }
    let worker = worker_image(c, ctx).await?;
    let role = if ctx.profile.spec.uat.network.is_some() {
        Role::Test
    } else {
        Role::Production
    };
    let mut spec = instance_spec(c, ctx, role).await?;
    spec.name = crate::state::instance_name(ctx, Role::Production);
    spec.image_id = Some(worker.image_id);
    let datastore = spec.volumes.first().and_then(|v| v.1);
    spec.volumes
        .insert(0, (worker.size_bytes.div_ceil(1 << 30).max(1), datastore));
    spec.powered_off = true;
    let id = provision::create_instance(c, &spec)
        .await
        .map_err(api_err)?;
    provision::wait_status(c, id, "stopped", boot_timeout(ctx))
        .await
        .map_err(api_err)?;
    let details = provision::instance_details(c, id).await.map_err(api_err)?;
    let root = details.volumes.first().ok_or_else(|| {
        AdapterError::permanent(format!("instance {id} was created without volumes"))
    })?;
    if details.volumes.len() != ctx.workload.disks.len() + 1 {
        return Err(AdapterError::permanent(format!(
            "instance {id} has {} volumes, expected {} (the worker's and one per disk): delete it in the manager and sync again",
            details.volumes.len(),
            ctx.workload.disks.len() + 1
        )));
    }
    let d = DeltaInstance {
        instance_id: id,
        server_id: details.server_id,
        worker_volume: root.id,
        worker_controller: root.controller_id,
        worker_attached: true,
        pending_snapshot: None,
        syncs: 0,
        uat_snapshot: None,
        resume_uat: false,
        cutover_snapshot: None,
    };
    save(ctx, &d)?;
    tracing::info!(workload = %ctx.workload.name, instance = id, "instance created for delta syncs");
    Ok(d)
}

async fn stop(c: &Client, ctx: &StepContext, id: i64) -> AResult<()> {
    if provision::instance_status(c, id).await.map_err(api_err)? != "stopped" {
        provision::stop_instance(c, id).await.map_err(api_err)?;
        provision::wait_status(c, id, "stopped", boot_timeout(ctx))
            .await
            .map_err(api_err)?;
    }
    Ok(())
}

fn worker_volume(d: &DeltaInstance) -> AttachedVolume {
    AttachedVolume {
        id: d.worker_volume,
        name: "ferry-worker".into(),
        root: true,
        size_gib: 0,
        controller_id: d.worker_controller,
    }
}

/// Boots the worker on the instance, behind a fresh snapshot.
pub async fn begin(ctx: &StepContext, disks: &[SourceDisk]) -> AResult<()> {
    let c = client(ctx)?;
    let mut d = instance(&c, ctx).await?;
    if d.cutover_snapshot.is_some() {
        return Err(AdapterError::permanent(format!(
            "instance {} runs in production: roll the migration back before syncing into it",
            d.instance_id
        )));
    }
    if d.uat_snapshot.is_some() {
        // The test runs on these very disks: undo it, sync, and boot the test again after.
        tracing::info!(instance = d.instance_id, "pausing UAT for the sync");
        undo_own(&c, ctx, &mut d, Own::Uat).await?;
        d.resume_uat = true;
        save(ctx, &d)?;
    }
    stop(&c, ctx, d.instance_id).await?;
    if let Some(s) = d.pending_snapshot {
        // A sync that ended without `end` (the appliance stopped): put it back first.
        tracing::warn!(
            instance = d.instance_id,
            snapshot = s,
            "reverting a sync that did not finish"
        );
        provision::revert_snapshot(&c, d.instance_id, s)
            .await
            .map_err(api_err)?;
    }
    if !d.worker_attached {
        provision::attach_volume(&c, d.server_id, &worker_volume(&d), true, 0)
            .await
            .map_err(api_err)?;
        d.worker_attached = true;
        save(ctx, &d)?;
    }
    if d.pending_snapshot.is_none() {
        let name = format!("ferry-sync-{}", ctx.migration.status.generation + 1);
        let s = provision::snapshot(&c, d.instance_id, &name)
            .await
            .map_err(api_err)?;
        d.pending_snapshot = Some(s);
        save(ctx, &d)?;
    }
    tracing::info!(instance = d.instance_id, "booting the target worker");
    crate::start(&c, ctx, d.instance_id).await?;
    let details = provision::instance_details(&c, d.instance_id)
        .await
        .map_err(api_err)?;
    let ip = details.ip.ok_or_else(|| {
        AdapterError::permanent(format!(
            "instance {} has no address the worker can be reached at",
            d.instance_id
        ))
    })?;
    // The worker listens once it has booted: wait for every volume's port.
    let netns = cfg(ctx, "probe_netns").map(str::to_string);
    for k in 0..disks.len() {
        let addr: std::net::SocketAddr = format!("{ip}:{}", WORKER_PORT + k as u16)
            .parse()
            .map_err(|e| AdapterError::permanent(format!("worker address {ip}: {e}")))?;
        let within = boot_timeout(ctx);
        if let Err(e) = crate::tcp_reachable(netns.as_deref(), addr, within).await {
            return Err(AdapterError::transient(format!(
                "the target worker on instance {} did not answer at {addr}: {} (its console log in the manager says why)",
                d.instance_id, e.message
            )));
        }
    }
    tracing::info!(instance = d.instance_id, %ip, "the target worker answers");
    tokio::fs::write(worker_address_path(ctx), &ip).await?;
    Ok(())
}

/// Where disk `disk` goes: its volume on the running worker.
pub fn destination(ctx: &StepContext, disk: &SourceDisk) -> AResult<DiskDestination> {
    let k = ctx
        .workload
        .disks
        .iter()
        .position(|d| d.name == disk.name)
        .ok_or_else(|| {
            AdapterError::permanent(format!(
                "disk '{}' is not one of workload '{}''s disks: run the inventory again",
                disk.name, ctx.workload.name
            ))
        })?;
    let ip = std::fs::read_to_string(worker_address_path(ctx)).map_err(|_| {
        AdapterError::permanent(
            "no target worker is running for this migration (the sync did not begin)",
        )
    })?;
    let pki = worker_dir(ctx).join("pki");
    let ca = ferry_pki::CaDir::new(&pki);
    Ok(DiskDestination::Remote(RemoteReceiver {
        addr: format!("{}:{}", ip.trim(), WORKER_PORT + k as u16),
        server_name: SERVER_NAME.into(),
        cert: ca.cert_path("appliance"),
        key: ca.key_path("appliance"),
        ca: ca.ca_cert_path(),
        netns: cfg(ctx, "probe_netns").map(str::to_string),
    }))
}

/// Stops the worker, reverts a failed sync to the snapshot taken before it, and gives
/// the instance its own disks back.
pub async fn end(ctx: &StepContext, committed: bool) -> AResult<()> {
    let Some(mut d) = load(ctx) else {
        return Ok(());
    };
    let c = client(ctx)?;
    let _ = tokio::fs::remove_file(worker_address_path(ctx)).await;
    tracing::info!(
        instance = d.instance_id,
        committed,
        "stopping the target worker"
    );
    stop(&c, ctx, d.instance_id).await?;
    if let Some(s) = d.pending_snapshot {
        if !committed {
            provision::revert_snapshot(&c, d.instance_id, s)
                .await
                .map_err(api_err)?;
            tracing::warn!(
                instance = d.instance_id,
                snapshot = s,
                "the failed sync was reverted from the snapshot taken before it"
            );
        }
        drop_snapshot(&c, s, "the snapshot taken before the sync").await;
        d.pending_snapshot = None;
        if committed {
            d.syncs += 1;
        }
        save(ctx, &d)?;
    }
    if d.worker_attached {
        provision::detach_volume(&c, d.server_id, d.worker_volume)
            .await
            .map_err(api_err)?;
        d.worker_attached = false;
        save(ctx, &d)?;
    }
    if d.resume_uat && crate::state::load(ctx, Role::Test).is_some() {
        tracing::info!(
            instance = d.instance_id,
            "UAT goes on with the synced disks"
        );
        boot_own(&c, ctx, &mut d, Own::Uat).await?;
        d.resume_uat = false;
        save(ctx, &d)?;
    }
    Ok(())
}

/// The delta-mode instance, which must hold a complete sync.
fn synced(ctx: &StepContext) -> AResult<DeltaInstance> {
    match load(ctx) {
        Some(d) if d.syncs > 0 && d.pending_snapshot.is_none() && !d.worker_attached => Ok(d),
        Some(d) if d.worker_attached => Err(AdapterError::transient(format!(
            "instance {} still has the target worker attached: a sync is running or did not end; run a sync again",
            d.instance_id
        ))),
        _ => Err(AdapterError::permanent(
            "no complete sync to boot: run a sync first",
        )),
    }
}

/// Which snapshot a boot of the instance's own disks runs behind.
#[derive(Debug, Clone, Copy)]
enum Own {
    Uat,
    Production,
}

impl Own {
    fn slot(self, d: &mut DeltaInstance) -> &mut Option<i64> {
        match self {
            Own::Uat => &mut d.uat_snapshot,
            Own::Production => &mut d.cutover_snapshot,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Own::Uat => "ferry-uat",
            Own::Production => "ferry-cutover",
        }
    }
}

/// Boots the instance's own disks behind a snapshot, so whatever the boot changes can be
/// undone and the volumes go back to exactly the last synced generation (what the
/// worker's chunk index describes).
async fn boot_own(c: &Client, ctx: &StepContext, d: &mut DeltaInstance, why: Own) -> AResult<()> {
    stop(c, ctx, d.instance_id).await?;
    if why.slot(d).is_none() {
        let s = provision::snapshot(c, d.instance_id, why.name())
            .await
            .map_err(api_err)?;
        *why.slot(d) = Some(s);
        save(ctx, d)?;
    }
    crate::start(c, ctx, d.instance_id).await
}

/// Stops the instance and undoes what its boot changed.
async fn undo_own(c: &Client, ctx: &StepContext, d: &mut DeltaInstance, why: Own) -> AResult<()> {
    let Some(s) = *why.slot(d) else {
        return Ok(());
    };
    stop(c, ctx, d.instance_id).await?;
    provision::revert_snapshot(c, d.instance_id, s)
        .await
        .map_err(api_err)?;
    drop_snapshot(c, s, why.name()).await;
    *why.slot(d) = None;
    save(ctx, d)
}

/// UAT: boots the instance on its own disks on the migration network; `stop_test` undoes
/// what the test changed, so it never reaches the next delta.
pub async fn start_test(ctx: &StepContext) -> AResult<()> {
    let c = client(ctx)?;
    let mut d = synced(ctx)?;
    crate::state::save(
        ctx,
        Role::Test,
        &crate::state::Deployed {
            instance_id: d.instance_id,
            image_id: 0,
        },
    )?;
    boot_own(&c, ctx, &mut d, Own::Uat).await
}

/// Ends UAT: the instance goes back to exactly the last synced generation.
pub async fn stop_test(ctx: &StepContext) -> AResult<()> {
    if let Some(mut d) = load(ctx) {
        let c = client(ctx)?;
        undo_own(&c, ctx, &mut d, Own::Uat).await?;
        if d.resume_uat {
            d.resume_uat = false;
            save(ctx, &d)?;
        }
    }
    crate::state::clear(ctx, Role::Test)
}

/// Cutover: the instance moves to the production network (when it was on the migration
/// network) and boots its own disks, behind a snapshot a rollback reverts to.
pub async fn start_production(ctx: &StepContext) -> AResult<()> {
    let c = client(ctx)?;
    let mut d = synced(ctx)?;
    undo_own(&c, ctx, &mut d, Own::Uat).await?;
    stop(&c, ctx, d.instance_id).await?;
    if ctx.profile.spec.uat.network.is_some() {
        let spec = instance_spec(&c, ctx, Role::Production).await?;
        if let Some((net, ip)) = spec.networks.first() {
            provision::move_to_network(&c, d.instance_id, *net, ip.as_deref())
                .await
                .map_err(api_err)?;
        }
    }
    crate::state::save(
        ctx,
        Role::Production,
        &crate::state::Deployed {
            instance_id: d.instance_id,
            image_id: 0,
        },
    )?;
    boot_own(&c, ctx, &mut d, Own::Production).await
}

/// Rollback: the instance stops, its volumes go back to the last synced generation and
/// it returns to the migration network, so the migration can be tried again with deltas.
pub async fn stop_production(ctx: &StepContext) -> AResult<()> {
    if let Some(mut d) = load(ctx) {
        let c = client(ctx)?;
        undo_own(&c, ctx, &mut d, Own::Production).await?;
        stop(&c, ctx, d.instance_id).await?;
        if ctx.profile.spec.uat.network.is_some() {
            let spec = instance_spec(&c, ctx, Role::Test).await?;
            if let Some((net, ip)) = spec.networks.first() {
                provision::move_to_network(&c, d.instance_id, *net, ip.as_deref())
                    .await
                    .map_err(api_err)?;
            }
        }
    }
    crate::state::clear(ctx, Role::Production)
}
