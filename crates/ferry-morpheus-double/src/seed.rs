//! A small VM Essentials estate: one HVM cloud with a cluster of two hosts, Ceph and NFS
//! datastores, a production and a migration VLAN, plans, and the generic VM instance
//! type with its layout.

use serde_json::{json, Value};
use std::collections::BTreeMap;

pub fn inventory() -> BTreeMap<&'static str, Vec<Value>> {
    let zone = json!({"id": 1, "name": "vme-prod"});
    let mut m = BTreeMap::new();
    m.insert(
        "zones",
        vec![json!({"id": 1, "name": "vme-prod", "code": "vme-prod", "zoneType": {"id": 1, "code": "mvm", "name": "HPE VM"}, "enabled": true, "status": "ok"})],
    );
    m.insert(
        "groups",
        vec![json!({"id": 1, "name": "migrations", "code": "migrations", "location": null})],
    );
    m.insert(
        "clusters",
        vec![json!({"id": 1, "name": "hvm-cluster-a", "zone": zone, "status": "ok", "enabled": true})],
    );
    m.insert(
        "servers",
        vec![
            json!({"id": 1, "name": "hvm-host-1", "zone": zone, "powerState": "on", "status": "provisioned"}),
            json!({"id": 2, "name": "hvm-host-2", "zone": zone, "powerState": "on", "status": "provisioned"}),
        ],
    );
    m.insert(
        "datastores",
        vec![
            json!({"id": 1, "name": "ceph-rbd", "type": "ceph", "zone": zone, "freeSpace": 8_000_000_000_000u64, "storageSize": 10_000_000_000_000u64, "active": true}),
            json!({"id": 2, "name": "nfs-templates", "type": "nfs", "zone": zone, "freeSpace": 500_000_000_000u64, "storageSize": 1_000_000_000_000u64, "active": true}),
        ],
    );
    m.insert(
        "networks",
        vec![
            json!({"id": 1, "name": "VLAN-120-prod", "zone": zone, "vlanId": 120, "cidr": "10.20.120.0/24"}),
            json!({"id": 2, "name": "VLAN-900-migration", "zone": zone, "vlanId": 900, "cidr": "10.99.0.0/24"}),
        ],
    );
    // As on a real manager, plans and layouts of other provision types come first and
    // share names with the VM ones: a client must choose by instance and provision type.
    let mvm = json!({"id": 10, "code": "mvm", "name": "HPE VM"});
    let docker = json!({"id": 11, "code": "docker", "name": "Docker"});
    m.insert(
        "servicePlans",
        vec![
            json!({"id": 7, "name": "2 CPU, 4GB Memory", "code": "container-2-4", "maxCores": 2, "maxMemory": 4_294_967_296u64, "provisionType": docker}),
            json!({"id": 1, "name": "2 CPU, 4GB Memory", "code": "mvm-2-4", "maxCores": 2, "maxMemory": 4_294_967_296u64, "provisionType": mvm}),
            json!({"id": 2, "name": "4 CPU, 8GB Memory", "code": "mvm-4-8", "maxCores": 4, "maxMemory": 8_589_934_592u64, "provisionType": mvm}),
        ],
    );
    m.insert(
        "instanceTypes",
        vec![
            json!({"id": 2, "name": "Linux Container", "code": "docker", "active": true}),
            json!({"id": 1, "name": "HPE VM", "code": "mvm", "active": true}),
        ],
    );
    m.insert(
        "instanceTypeLayouts",
        vec![
            json!({"id": 5, "name": "Docker Host", "code": "docker-1.0-single", "instanceType": {"id": 2, "code": "docker"}, "provisionType": docker}),
            json!({"id": 1, "name": "Single HPE VM", "code": "mvm-1.0-single", "instanceType": {"id": 1, "code": "mvm"}, "provisionType": mvm}),
        ],
    );
    m
}
