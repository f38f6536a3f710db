//! One sync of a VM's disks: a snapshot, an nbdkit export of each of the snapshot's disks,
//! the changed areas since the last committed sync, and the snapshot's removal.

use std::collections::BTreeMap;
use std::path::Path;

use ferry_adapter::{AResult, AdapterError, SourceDisk, StepContext};
use ferry_nbd::{Nbdkit, NbdkitOptions};
use ferry_vsphere::{flat_extent, Client, DatastorePath, Vm, VmDisk, VsphereError};

use crate::err;

/// Every snapshot Ferry takes is named so; one left behind is Ferry's to remove.
pub(crate) const SNAPSHOT_PREFIX: &str = "ferry-sync";
/// The change id of each disk (by device key) at the last committed sync, in the
/// migration's work directory.
const CHANGE_IDS: &str = "vsphere-change-ids.json";
/// A descriptor is a few hundred bytes; anything much bigger is not one.
const DESCRIPTOR_MAX: usize = 64 * 1024;

/// A sync between `open_disks` and `close_disks`.
pub(crate) struct OpenSync {
    snapshot: String,
    /// The change id of each disk in the snapshot: committed when the sync is.
    change_ids: BTreeMap<i32, String>,
    exports: Vec<Nbdkit>,
}

/// Removes snapshots an earlier sync left behind (vCenter unreachable at its end, the
/// appliance killed).
pub(crate) async fn remove_stale_snapshots(c: &Client, vm: &Vm) -> AResult<()> {
    for (moref, name) in vm
        .snapshots
        .iter()
        .filter(|(_, n)| n.starts_with(SNAPSHOT_PREFIX))
    {
        tracing::warn!(vm = %vm.name, snapshot = %name, "removing a snapshot an earlier sync left behind");
        c.remove_snapshot(moref).await.map_err(|e| {
            err(e).context(format!(
                "removing snapshot '{name}' of VM '{}' left by an earlier sync",
                vm.name
            ))
        })?;
    }
    Ok(())
}

pub(crate) async fn open(
    c: &Client,
    vm: &Vm,
    ctx: &StepContext,
    full: bool,
) -> AResult<(Vec<SourceDisk>, OpenSync)> {
    remove_stale_snapshots(c, vm).await?;
    let config = &ctx
        .source
        .as_ref()
        .expect("a vsphere workload has a source")
        .config;
    let quiesce = vm.tools.as_deref() == Some("guestToolsRunning")
        && config.get("quiesce").and_then(|v| v.as_bool()) != Some(false);
    let name = format!("{SNAPSHOT_PREFIX}-{}", ctx.migration.id.simple());
    let description = format!(
        "Taken by Ferry to copy '{}'; removed when the copy ends",
        vm.name
    );
    let snapshot = match c
        .create_snapshot(&vm.moref, &name, &description, quiesce)
        .await
    {
        Ok(s) => s,
        Err(e) if quiesce => {
            tracing::warn!(vm = %vm.name, error = %e, "a quiesced snapshot failed: taking a crash-consistent one");
            c.create_snapshot(&vm.moref, &name, &description, false)
                .await
                .map_err(err)?
        }
        Err(e) => return Err(err(e)),
    };
    // From here on the snapshot goes again, whatever happens.
    match read_snapshot(c, vm, &snapshot, ctx, full).await {
        Ok((disks, change_ids, exports)) => Ok((
            disks,
            OpenSync {
                snapshot,
                change_ids,
                exports,
            },
        )),
        Err(e) => {
            if let Err(r) = c.remove_snapshot(&snapshot).await {
                tracing::error!(vm = %vm.name, error = %r, "the snapshot could not be removed; the next sync or pre-flight removes it");
            }
            Err(e)
        }
    }
}

type Opened = (Vec<SourceDisk>, BTreeMap<i32, String>, Vec<Nbdkit>);

async fn read_snapshot(
    c: &Client,
    vm: &Vm,
    snapshot: &str,
    ctx: &StepContext,
    full: bool,
) -> AResult<Opened> {
    let disks = c.snapshot_disks(snapshot).await.map_err(err)?;
    let committed = if full {
        BTreeMap::new()
    } else {
        committed_change_ids(&ctx.work_dir)
    };
    let dc = vm.datacenter.clone().ok_or_else(|| {
        AdapterError::permanent(format!(
            "cannot tell the datacenter of VM '{}' (its disks' datastores belong to none Ferry saw)",
            vm.name
        ))
    })?;
    let (mut out, mut ids, mut exports) = (vec![], BTreeMap::new(), vec![]);
    for d in &disks {
        let export = export(c, vm, snapshot, &dc, d, ctx).await?;
        let changed = match (committed.get(&d.key), &d.change_id) {
            (Some(since), Some(_)) if vm.cbt => {
                match c
                    .changed_disk_areas(&vm.moref, snapshot, d.key, d.capacity_bytes, since)
                    .await
                {
                    Ok(areas) => Some(areas),
                    Err(e @ VsphereError::ChangeIdInvalid { .. }) => {
                        tracing::warn!(vm = %vm.name, disk = %d.label, error = %e, "changed block tracking was reset: comparing hashes of the whole disk instead");
                        None
                    }
                    Err(e) => return Err(err(e)),
                }
            }
            (Some(_), _) => {
                // A delta without CBT reads every byte: say so before it starts.
                let source = ctx
                    .source
                    .as_ref()
                    .map(|s| s.name.as_str())
                    .unwrap_or("SOURCE");
                tracing::warn!(
                    vm = %vm.name,
                    disk = %d.label,
                    "changed block tracking is off (or not started) on this VM: this delta reads and compares the whole disk; enable it with `ferry source fix {source} enable-cbt {}`",
                    vm.name
                );
                None
            }
            _ => None,
        };
        if let Some(id) = &d.change_id {
            ids.insert(d.key, id.clone());
        }
        out.push(SourceDisk {
            name: d.label.clone(),
            spec: export.uri(),
            size_bytes: d.capacity_bytes,
            format: Some("raw".into()),
            dirty_bitmap: None,
            changed_areas: changed,
        });
        exports.push(export);
    }
    Ok((out, ids, exports))
}

/// An nbdkit serving one of the snapshot's disks: VDDK when the source names its
/// libraries, else the flat extent over the datastore's HTTPS file access.
async fn export(
    c: &Client,
    vm: &Vm,
    snapshot: &str,
    dc: &str,
    disk: &VmDisk,
    ctx: &StepContext,
) -> AResult<Nbdkit> {
    let source = ctx
        .source
        .as_ref()
        .expect("a vsphere workload has a source");
    let file = disk.file.as_deref().ok_or_else(|| {
        AdapterError::permanent(format!(
            "{} of VM '{}' has no backing file",
            disk.label, vm.name
        ))
    })?;
    let path = DatastorePath::parse(file).map_err(err)?;
    let what = format!("{} of VM '{}' ({path})", disk.label, vm.name);
    let opts = if let Some(libdir) = source.config.get("vddk_libdir").and_then(|v| v.as_str()) {
        vddk(c, source, vm, snapshot, &path, libdir, ctx)?
    } else {
        let descriptor = c
            .datastore_read(dc, &path, DESCRIPTOR_MAX)
            .await
            .map_err(err)?;
        let flat = flat_extent(&String::from_utf8_lossy(&descriptor))
            .map_err(|why| AdapterError::permanent(format!("cannot read {what}: {why}")))?;
        let url = c.datastore_url(dc, &path.sibling(&flat)).map_err(err)?;
        let cookie = c.session_cookie().ok_or_else(|| {
            AdapterError::permanent("no vCenter session cookie to read the datastore with")
        })?;
        let mut params = vec![
            format!("url={url}"),
            "cookie=-3".into(),
            "timeout=120".into(),
        ];
        if let Some(ca) = &c.options().ca_bundle {
            params.push(format!("cainfo={}", ca.display()));
        }
        if c.options().insecure {
            params.push("sslverify=false".into());
        }
        NbdkitOptions {
            plugin: "curl".into(),
            params,
            read_only: true,
            secret: Some(cookie.into_bytes()),
            ..Default::default()
        }
    };
    Nbdkit::start(&opts, &what)
        .await
        .map_err(|e| AdapterError::transient(format!("cannot export {what}: {e}")))
}

/// nbdkit's `vddk` plugin (VMware's Virtual Disk Development Kit, installed by the user
/// under `libdir`): faster than HTTPS, and reads sparse and delta disks too.
fn vddk(
    c: &Client,
    source: &ferry_model::Source,
    vm: &Vm,
    snapshot: &str,
    path: &DatastorePath,
    libdir: &str,
    ctx: &StepContext,
) -> AResult<NbdkitOptions> {
    let thumbprint = source
        .config
        .get("thumbprint")
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            AdapterError::permanent(
                "VDDK needs vCenter's SHA-1 certificate thumbprint in the source's config.thumbprint (openssl x509 -in cert.pem -noout -fingerprint -sha1)",
            )
        })?;
    let host = reqwest_host(c.base_url());
    let (Some(user), Some(password)) = (
        ctx.secrets.get(ferry_adapter::SOURCE_USERNAME),
        ctx.secrets.get(ferry_adapter::SOURCE_PASSWORD),
    ) else {
        return Err(AdapterError::permanent(
            "VDDK needs the source's credential",
        ));
    };
    Ok(NbdkitOptions {
        plugin: "vddk".into(),
        params: vec![
            format!("libdir={libdir}"),
            format!("server={host}"),
            format!("user={user}"),
            "password=-3".into(),
            format!("thumbprint={thumbprint}"),
            format!("vm=moref={}", vm.moref),
            format!("snapshot={snapshot}"),
            format!("file={path}"),
            "transports=nbdssl:nbd".into(),
        ],
        read_only: true,
        secret: Some(password.as_bytes().to_vec()),
        ..Default::default()
    })
}

fn reqwest_host(base: &str) -> String {
    base.split("://")
        .nth(1)
        .unwrap_or(base)
        .split(['/', ':'])
        .next()
        .unwrap_or_default()
        .to_string()
}

pub(crate) async fn close(
    c: &Client,
    open: OpenSync,
    ctx: &StepContext,
    committed: bool,
) -> AResult<()> {
    for e in open.exports {
        if let Err(e) = e.stop().await {
            tracing::warn!(error = %e, "nbdkit did not stop cleanly");
        }
    }
    if committed {
        // The target now holds the snapshot's contents: the next delta starts here.
        store_change_ids(&ctx.work_dir, &open.change_ids)?;
    }
    c.remove_snapshot(&open.snapshot).await.map_err(|e| {
        err(e).context(
            "the sync's snapshot could not be removed (the next sync or pre-flight removes it)",
        )
    })
}

fn committed_change_ids(work_dir: &Path) -> BTreeMap<i32, String> {
    std::fs::read(work_dir.join(CHANGE_IDS))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Written to a temporary file, synced, then renamed: a crash leaves the old ids or the
/// new ones, never half of each.
fn store_change_ids(work_dir: &Path, ids: &BTreeMap<i32, String>) -> AResult<()> {
    use std::io::Write;
    std::fs::create_dir_all(work_dir)?;
    let tmp = work_dir.join(format!("{CHANGE_IDS}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(ids).expect("ids serialise"))?;
    f.sync_all()?;
    std::fs::rename(&tmp, work_dir.join(CHANGE_IDS))?;
    Ok(())
}
