//! Delivery and lifecycle on the target: virtual images (create, upload), instances
//! (create, power, status, delete), and waiting for a final state with a timeout.

use crate::client::Client;
use crate::error::MorpheusError;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// Creates a qcow2 virtual image record (no file yet); its id.
pub async fn create_image(c: &Client, name: &str) -> Result<i64, MorpheusError> {
    let v = c
        .post(
            "api/virtual-images",
            &json!({"virtualImage": {
                "name": name,
                "imageType": "qcow2",
                "isCloudInit": false,
                "installAgent": false,
            }}),
        )
        .await?;
    v.pointer("/virtualImage/id")
        .and_then(Value::as_i64)
        .ok_or_else(|| MorpheusError::BadAnswer {
            call: "POST /api/virtual-images".into(),
            why: "no virtualImage.id in the answer".into(),
        })
}

/// Streams `file` as the image's content (`filename` is what the manager stores it as).
pub async fn upload_image(
    c: &Client,
    image: i64,
    file: &Path,
    filename: &str,
) -> Result<u64, MorpheusError> {
    c.upload_file(
        &format!("api/virtual-images/{image}/upload"),
        &[("filename", filename.to_string())],
        file,
    )
    .await
}

/// Where and how an instance is created.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceSpec {
    pub name: String,
    pub cloud_id: i64,
    pub group_id: i64,
    pub plan_id: i64,
    pub layout_id: i64,
    pub instance_type: String,
    /// `pool-N` or a cluster's resource pool id.
    pub resource_pool: Option<String>,
    pub image_id: Option<i64>,
    /// (size in GiB, datastore id) per volume; the first is the root volume.
    pub volumes: Vec<(u64, Option<i64>)>,
    /// (network id, static IPv4 address or None for DHCP) per interface.
    pub networks: Vec<(i64, Option<String>)>,
    pub powered_off: bool,
}

/// The request body of `POST /api/instances` for an HVM (VME) instance.
pub fn instance_body(s: &InstanceSpec) -> Value {
    let volumes: Vec<Value> = s
        .volumes
        .iter()
        .enumerate()
        .map(|(i, (gib, ds))| {
            let mut v = json!({
                "rootVolume": i == 0,
                "name": if i == 0 { "root".to_string() } else { format!("data-{i}") },
                "size": gib,
            });
            if let Some(d) = ds {
                v["datastoreId"] = json!(d);
            }
            v
        })
        .collect();
    let nics: Vec<Value> = s
        .networks
        .iter()
        .map(|(id, ip)| match ip {
            Some(ip) => json!({"network": {"id": format!("network-{id}")}, "ipMode": "static", "ipAddress": ip}),
            None => json!({"network": {"id": format!("network-{id}")}, "ipMode": "dhcp"}),
        })
        .collect();
    let mut config = json!({
        "poolProviderType": "mvm",
        "provisionPoweredOff": s.powered_off,
        "noAgent": true,
        "createUser": false,
    });
    if let Some(p) = &s.resource_pool {
        config["resourcePoolId"] = json!(p);
    }
    if let Some(i) = s.image_id {
        config["imageId"] = json!(i);
    }
    json!({
        "zoneId": s.cloud_id,
        "instance": {
            "name": s.name,
            "site": {"id": s.group_id},
            "instanceType": {"code": s.instance_type},
            "layout": {"id": s.layout_id},
            "plan": {"id": s.plan_id},
        },
        "config": config,
        "volumes": volumes,
        "networkInterfaces": nics,
    })
}

/// Creates an instance; its id.
pub async fn create_instance(c: &Client, s: &InstanceSpec) -> Result<i64, MorpheusError> {
    let v = c.post("api/instances", &instance_body(s)).await?;
    if v.get("success").and_then(Value::as_bool) == Some(false) {
        return Err(MorpheusError::Rejected {
            call: "POST /api/instances".into(),
            status: 200,
            msg: v
                .get("msg")
                .and_then(Value::as_str)
                .unwrap_or("instance not created")
                .into(),
            errors: vec![],
        });
    }
    v.pointer("/instance/id")
        .and_then(Value::as_i64)
        .ok_or_else(|| MorpheusError::BadAnswer {
            call: "POST /api/instances".into(),
            why: "no instance.id in the answer".into(),
        })
}

/// An instance's status (`provisioning`, `running`, `stopped`, `failed`, …).
pub async fn instance_status(c: &Client, id: i64) -> Result<String, MorpheusError> {
    let v: Value = c.get(&format!("api/instances/{id}"), &[]).await?;
    Ok(v.pointer("/instance/status")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string())
}

pub async fn start_instance(c: &Client, id: i64) -> Result<(), MorpheusError> {
    // No body: the API declares none for power operations.
    c.call(
        reqwest::Method::PUT,
        &format!("api/instances/{id}/start"),
        &[],
        None,
    )
    .await
    .map(drop)
}

pub async fn stop_instance(c: &Client, id: i64) -> Result<(), MorpheusError> {
    // No body: the API declares none for power operations.
    c.call(
        reqwest::Method::PUT,
        &format!("api/instances/{id}/stop"),
        &[],
        None,
    )
    .await
    .map(drop)
}

pub async fn delete_instance(c: &Client, id: i64) -> Result<(), MorpheusError> {
    c.delete(&format!("api/instances/{id}")).await.map(drop)
}

/// Polls the instance until its status is `want`; a `failed` status or the timeout is an
/// error naming the last status seen.
pub async fn wait_status(
    c: &Client,
    id: i64,
    want: &str,
    timeout: Duration,
) -> Result<(), MorpheusError> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(200);
    loop {
        let s = instance_status(c, id).await?;
        if s == want {
            return Ok(());
        }
        if s == "failed" || s == "warning" {
            return Err(MorpheusError::Rejected {
                call: format!("GET /api/instances/{id}"),
                status: 200,
                msg: format!("the instance went to status '{s}' while Ferry waited for '{want}': see its history in the manager"),
                errors: vec![],
            });
        }
        if Instant::now() >= deadline {
            return Err(MorpheusError::Stuck {
                call: format!("instance {id} reaching '{want}'"),
                secs: timeout.as_secs(),
                status: s,
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_body_for_hvm() {
        let b = instance_body(&InstanceSpec {
            name: "web01".into(),
            cloud_id: 1,
            group_id: 2,
            plan_id: 3,
            layout_id: 4,
            instance_type: "mvm".into(),
            resource_pool: Some("pool-7".into()),
            image_id: Some(9),
            volumes: vec![(20, Some(5)), (100, None)],
            networks: vec![(6, Some("10.20.120.15".into()))],
            powered_off: true,
        });
        assert_eq!(b["zoneId"], 1);
        assert_eq!(b["config"]["poolProviderType"], "mvm");
        assert_eq!(b["config"]["imageId"], 9);
        assert_eq!(b["config"]["provisionPoweredOff"], true);
        assert_eq!(b["volumes"][0]["rootVolume"], true);
        assert_eq!(b["volumes"][1]["rootVolume"], false);
        assert_eq!(b["networkInterfaces"][0]["network"]["id"], "network-6");
        assert_eq!(b["networkInterfaces"][0]["ipAddress"], "10.20.120.15");
    }
}

/// The ids of the instances called exactly `name`.
pub async fn instances_named(c: &Client, name: &str) -> Result<Vec<i64>, MorpheusError> {
    named(c, "api/instances", "instances", name).await
}

/// The ids of the virtual images called exactly `name`.
pub async fn images_named(c: &Client, name: &str) -> Result<Vec<i64>, MorpheusError> {
    named(c, "api/virtual-images", "virtualImages", name).await
}

async fn named(c: &Client, path: &str, key: &str, name: &str) -> Result<Vec<i64>, MorpheusError> {
    let items: Vec<Value> = c.list_all(path, key, &[("name", name.to_string())]).await?;
    Ok(items
        .iter()
        .filter(|v| v["name"].as_str() == Some(name))
        .filter_map(|v| v["id"].as_i64())
        .collect())
}

/// Deletes a virtual image (clean-up of a delivery that did not finish).
pub async fn delete_image(c: &Client, id: i64) -> Result<(), MorpheusError> {
    c.delete(&format!("api/virtual-images/{id}"))
        .await
        .map(drop)
}

/// What image mode delivered.
#[derive(Debug, Clone, Serialize)]
pub struct Delivered {
    pub image_id: i64,
    pub instance_id: i64,
    /// The qcow2 Ferry made from the synced disk and uploaded.
    pub qcow2: std::path::PathBuf,
    pub uploaded_bytes: u64,
}

/// Image mode: the synced disk is converted to a standalone qcow2 v3 image (`compat=1.1`,
/// what VME's incremental backups with dirty bitmaps need) in `work_dir`, uploaded as a
/// virtual image, and an instance is created from it, powered off. On failure what was
/// already created is removed, or the error names it.
///
/// `format` is the synced disk's format (`raw`, or `qcow2` for a converted overlay):
/// stated, because the guest controls every byte of a raw disk and could make it look
/// like an image with a backing file on this machine.
/// How long converting the disk at `path` may take: ten minutes, plus a minute per
/// GiB it occupies (far slower than any local disk copies).
async fn convert_timeout(path: &Path) -> std::time::Duration {
    let bytes = tokio::fs::metadata(path)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    std::time::Duration::from_secs(600 + 60 * bytes.div_ceil(1 << 30))
}

pub async fn deliver_image_mode(
    c: &Client,
    synced_disk: &Path,
    format: &str,
    work_dir: &Path,
    spec: &InstanceSpec,
) -> Result<Delivered, MorpheusError> {
    if !matches!(format, "raw" | "qcow2") {
        return Err(MorpheusError::Invalid {
            what: format!("disk format {format:?} is not one Ferry delivers (raw or qcow2)"),
        });
    }
    let qcow2 = work_dir.join(format!("{}.qcow2", spec.name));
    let _ = tokio::fs::remove_file(&qcow2).await;
    let out = tokio::process::Command::new("qemu-img")
        .args([
            "convert",
            "-q",
            "-f",
            format,
            "-O",
            "qcow2",
            "-o",
            "compat=1.1",
        ])
        .arg("--")
        .arg(synced_disk)
        .arg(&qcow2)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let limit = convert_timeout(synced_disk).await;
    let out = tokio::time::timeout(limit, out)
        .await
        .map_err(|_| MorpheusError::Invalid {
            what: format!(
                "converting {} to qcow2 did not finish within {} s and was stopped: is the work directory's storage answering?",
                synced_disk.display(),
                limit.as_secs()
            ),
        })?
        .map_err(|e| MorpheusError::Invalid {
            what: format!("cannot run qemu-img ({e}): install qemu-utils"),
        })?;
    if !out.status.success() {
        return Err(MorpheusError::Invalid {
            what: format!(
                "converting {} to qcow2: {}",
                synced_disk.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let image_id = create_image(c, &spec.name).await?;
    let undo_image = |e: MorpheusError| async move {
        match delete_image(c, image_id).await {
            Ok(()) => e,
            Err(d) => MorpheusError::Invalid {
                what: format!("{e}; virtual image {image_id} was left behind (deleting it failed: {d}): delete it in the manager"),
            },
        }
    };
    let uploaded_bytes =
        match upload_image(c, image_id, &qcow2, &format!("{}.qcow2", spec.name)).await {
            Ok(n) => n,
            Err(e) => return Err(undo_image(e).await),
        };
    let mut s = spec.clone();
    s.image_id = Some(image_id);
    s.powered_off = true;
    let instance_id = match create_instance(c, &s).await {
        Ok(id) => id,
        Err(e) => return Err(undo_image(e).await),
    };
    wait_status(c, instance_id, "stopped", Duration::from_secs(1800)).await?;
    Ok(Delivered {
        image_id,
        instance_id,
        qcow2,
        uploaded_bytes,
    })
}

/// Takes a snapshot of the instance's volumes named `name`; its id.
pub async fn snapshot(c: &Client, id: i64, name: &str) -> Result<i64, MorpheusError> {
    c.put(
        &format!("api/instances/{id}/snapshot"),
        &json!({"snapshot": {"name": name, "description": "taken by Ferry before changing the instance"}}),
    )
    .await?;
    snapshots(c, id)
        .await?
        .into_iter()
        .find(|(_, n)| n == name)
        .map(|(sid, _)| sid)
        .ok_or_else(|| MorpheusError::BadAnswer {
            call: format!("GET /api/instances/{id}/snapshots"),
            why: format!("the snapshot '{name}' just taken is not listed"),
        })
}

/// (id, name) of the instance's snapshots.
pub async fn snapshots(c: &Client, id: i64) -> Result<Vec<(i64, String)>, MorpheusError> {
    let v: Value = c.get(&format!("api/instances/{id}/snapshots"), &[]).await?;
    Ok(v.get("snapshots")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s.get("id")?.as_i64()?, s.get("name")?.as_str()?.to_string())))
        .collect())
}

/// Puts the instance's volumes back as they were in the snapshot.
pub async fn revert_snapshot(c: &Client, id: i64, snapshot: i64) -> Result<(), MorpheusError> {
    c.call(
        reqwest::Method::PUT,
        &format!("api/instances/{id}/revert-snapshot/{snapshot}"),
        &[],
        None,
    )
    .await
    .map(drop)
}

/// Deletes a snapshot (its id from [`snapshot`]).
pub async fn delete_snapshot(c: &Client, snapshot: i64) -> Result<(), MorpheusError> {
    c.delete(&format!("api/snapshots/{snapshot}"))
        .await
        .map(drop)
}

/// A volume attached to an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedVolume {
    pub id: i64,
    pub name: String,
    pub root: bool,
    pub size_gib: u64,
    pub controller_id: Option<i64>,
}

/// What Ferry needs to know of an existing instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceDetails {
    pub id: i64,
    pub status: String,
    /// The VM behind it, which volume calls address.
    pub server_id: i64,
    /// Attached volumes in display order.
    pub volumes: Vec<AttachedVolume>,
    /// Its first address, as the manager reports it.
    pub ip: Option<String>,
}

pub async fn instance_details(c: &Client, id: i64) -> Result<InstanceDetails, MorpheusError> {
    let call = format!("GET /api/instances/{id}");
    let v: Value = c.get(&format!("api/instances/{id}"), &[]).await?;
    let i = v.get("instance").ok_or_else(|| MorpheusError::BadAnswer {
        call: call.clone(),
        why: "no instance in the answer".into(),
    })?;
    let server_id = i
        .pointer("/servers/0")
        .and_then(Value::as_i64)
        .ok_or_else(|| MorpheusError::BadAnswer {
            call: call.clone(),
            why: "the instance has no server (VM) yet".into(),
        })?;
    let mut volumes: Vec<(i64, AttachedVolume)> = i
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| {
            Some((
                v.get("displayOrder").and_then(Value::as_i64).unwrap_or(0),
                AttachedVolume {
                    id: v.get("id")?.as_i64()?,
                    name: v.get("name").and_then(Value::as_str).unwrap_or("").into(),
                    root: v.get("rootVolume").and_then(Value::as_bool) == Some(true),
                    size_gib: v.get("size").and_then(Value::as_u64).unwrap_or(0),
                    controller_id: v.get("controllerId").and_then(Value::as_i64),
                },
            ))
        })
        .collect();
    volumes.sort_by_key(|(order, v)| (!v.root, *order));
    Ok(InstanceDetails {
        id,
        status: i
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .into(),
        server_id,
        volumes: volumes.into_iter().map(|(_, v)| v).collect(),
        ip: i
            .pointer("/connectionInfo/0/ip")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// Attaches a detached volume to a (stopped) instance's server, as its root volume (the
/// one it boots) or after the others.
pub async fn attach_volume(
    c: &Client,
    server: i64,
    volume: &AttachedVolume,
    root: bool,
    unit: usize,
) -> Result<(), MorpheusError> {
    c.put(
        &format!("api/servers/{server}/volumes/{}/attach", volume.id),
        &json!({
            "mountPoint": {"controller": {"id": volume.controller_id.unwrap_or(1)}, "unitNumber": unit.to_string()},
            "rootVolume": root,
        }),
    )
    .await
    .map(drop)
}

/// Detaches a volume from a (stopped) instance's server; it stays, to be attached again.
pub async fn detach_volume(c: &Client, server: i64, volume: i64) -> Result<(), MorpheusError> {
    c.call(
        reqwest::Method::PUT,
        &format!("api/servers/{server}/volumes/{volume}/detach"),
        &[],
        None,
    )
    .await
    .map(drop)
}

/// Moves the instance's (first) interface to another network, keeping or setting its
/// address: from the migration network to production at cutover, and back.
pub async fn move_to_network(
    c: &Client,
    id: i64,
    network: i64,
    ip: Option<&str>,
) -> Result<(), MorpheusError> {
    let nic = match ip {
        Some(ip) => {
            json!({"network": {"id": format!("network-{network}")}, "ipMode": "static", "ipAddress": ip})
        }
        None => json!({"network": {"id": format!("network-{network}")}, "ipMode": "dhcp"}),
    };
    c.put(
        &format!("api/instances/{id}/resize"),
        &json!({ "networkInterfaces": [nic] }),
    )
    .await
    .map(drop)
}
