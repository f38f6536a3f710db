//! The whole inventory in one PropertyCollector retrieval: a container view over the root
//! folder, a traversal into its `view`, and the properties Ferry needs per type.

use crate::soap::{child, esc, parse, returnval, this, Client, VIM, XSI};
use crate::VsphereError;
use serde::Serialize;
use std::collections::HashMap;

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct VmDisk {
    /// The device key: how vCenter names the disk in calls (QueryChangedDiskAreas).
    pub key: i32,
    pub label: String,
    pub capacity_bytes: u64,
    /// `[datastore] path/disk.vmdk`
    pub file: Option<String>,
    /// `persistent`, `independent_persistent`, …
    pub mode: Option<String>,
    /// The backing's type, e.g. `VirtualDiskFlatVer2BackingInfo` (RDM and others differ).
    pub backing: String,
    pub thin: bool,
    /// Shared between VMs (multi-writer or bus sharing).
    pub sharing: Option<String>,
    /// The datastore the disk's file lives on.
    pub datastore: Option<String>,
    /// Changed block tracking's position of this disk (set on a snapshot's disks).
    pub change_id: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct VmNic {
    pub label: String,
    pub mac: Option<String>,
    /// The network or port group name.
    pub network: Option<String>,
    pub adapter: String,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Vm {
    pub moref: String,
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub power_state: String,
    pub guest_os: Option<String>,
    pub ip: Option<String>,
    pub tools: Option<String>,
    pub firmware: Option<String>,
    /// vSphere's guest OS identifier (`ubuntu64Guest`, `windows2019srv_64Guest`, …).
    pub guest_id: Option<String>,
    /// Encrypted with a key from a key provider (VM encryption).
    pub encrypted: bool,
    pub cbt: bool,
    pub template: bool,
    pub has_snapshots: bool,
    /// Every snapshot of the VM: (moref, name).
    pub snapshots: Vec<(String, String)>,
    /// The datacenter of the VM's first disk's datastore (what datastore file access
    /// names in `dcPath`).
    pub datacenter: Option<String>,
    pub disks: Vec<VmDisk>,
    pub nics: Vec<VmNic>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Inventory {
    pub datacenters: Vec<String>,
    pub clusters: Vec<String>,
    pub hosts: Vec<String>,
    /// (name, capacity, free bytes)
    pub datastores: Vec<(String, u64, u64)>,
    pub networks: Vec<String>,
    pub vms: Vec<Vm>,
}

const TYPES: &[(&str, &[&str])] = &[
    ("Datacenter", &["name", "datastore"]),
    ("ClusterComputeResource", &["name"]),
    ("HostSystem", &["name"]),
    (
        "Datastore",
        &["name", "summary.capacity", "summary.freeSpace"],
    ),
    ("Network", &["name"]),
    (
        "VirtualMachine",
        &[
            "name",
            "config.hardware.numCPU",
            "config.hardware.memoryMB",
            "config.hardware.device",
            "config.firmware",
            "config.changeTrackingEnabled",
            "config.template",
            "config.guestFullName",
            "config.guestId",
            "config.keyId",
            "runtime.powerState",
            "guest.toolsRunningStatus",
            "guest.ipAddress",
            "guest.guestFullName",
            "snapshot",
        ],
    ),
];

/// One object of a retrieval: its type, moref, and properties by path.
struct Object<'a, 'i> {
    kind: String,
    moref: String,
    props: HashMap<String, roxmltree::Node<'a, 'i>>,
}

fn text(n: Option<roxmltree::Node>) -> Option<String> {
    n.and_then(|n| n.text()).map(str::to_string)
}

fn xsi_type(n: roxmltree::Node) -> String {
    n.attribute((XSI, "type")).unwrap_or_default().to_string()
}

impl Client {
    /// Datacenters, clusters, hosts, datastores, networks and VMs, in one retrieval.
    pub async fn inventory(&self) -> Result<Inventory, VsphereError> {
        let types: String = TYPES
            .iter()
            .map(|(t, _)| format!("<type>{t}</type>"))
            .collect();
        let body = format!(
            "{}<container type=\"Folder\">{}</container>{types}<recursive>true</recursive>",
            this("ViewManager", &self.content.view_manager),
            esc(&self.content.root_folder)
        );
        let out = self.call("CreateContainerView", &body).await?;
        let doc = parse("CreateContainerView", &out)?;
        let view = returnval(&doc, "CreateContainerView")?
            .text()
            .unwrap_or_default()
            .to_string();
        let r = self.retrieve_view(&view).await;
        // The view holds server memory until destroyed, whatever happened.
        let _ = self
            .call("DestroyView", &this("ContainerView", &view))
            .await;
        r
    }

    async fn retrieve_view(&self, view: &str) -> Result<Inventory, VsphereError> {
        let props: String = TYPES
            .iter()
            .map(|(t, paths)| {
                let p: String = paths
                    .iter()
                    .map(|p| format!("<pathSet>{p}</pathSet>"))
                    .collect();
                format!("<propSet><type>{t}</type>{p}</propSet>")
            })
            .collect();
        let spec = format!(
            "<specSet>{props}<objectSet><obj type=\"ContainerView\">{}</obj><skip>true</skip><selectSet xsi:type=\"TraversalSpec\"><name>view</name><type>ContainerView</type><path>view</path><skip>false</skip></selectSet></objectSet></specSet>",
            esc(view)
        );
        let mut pages = vec![];
        let first = self
            .call(
                "RetrievePropertiesEx",
                &format!(
                    "{}{spec}<options/>",
                    this("PropertyCollector", &self.content.property_collector)
                ),
            )
            .await?;
        pages.push(first);
        // Large inventories come in pages.
        loop {
            let token = {
                let doc = parse("RetrievePropertiesEx", pages.last().expect("a page"))?;
                doc.descendants()
                    .find(|n| n.has_tag_name((VIM, "token")))
                    .and_then(|n| n.text())
                    .map(str::to_string)
            };
            let Some(token) = token else { break };
            let next = self
                .call(
                    "ContinueRetrievePropertiesEx",
                    &format!(
                        "{}<token>{}</token>",
                        this("PropertyCollector", &self.content.property_collector),
                        esc(&token)
                    ),
                )
                .await?;
            pages.push(next);
        }
        let mut inv = Inventory::default();
        let docs: Vec<roxmltree::Document> = pages
            .iter()
            .map(|p| parse("RetrievePropertiesEx", p))
            .collect::<Result<_, _>>()?;
        let mut objects = vec![];
        for doc in &docs {
            for o in doc
                .descendants()
                .filter(|n| n.has_tag_name((VIM, "objects")))
            {
                let Some(obj) = child(o, "obj") else { continue };
                let mut props = HashMap::new();
                for p in o.children().filter(|c| c.has_tag_name((VIM, "propSet"))) {
                    if let (Some(name), Some(val)) = (text(child(p, "name")), child(p, "val")) {
                        props.insert(name, val);
                    }
                }
                objects.push(Object {
                    kind: obj.attribute("type").unwrap_or_default().to_string(),
                    moref: obj.text().unwrap_or_default().to_string(),
                    props,
                });
            }
        }
        // Port groups by key, for NICs on distributed switches.
        let mut portgroups: HashMap<String, String> = HashMap::new();
        // Datastore moref -> datacenter name, and datastore name -> moref.
        let mut dc_of_datastore: HashMap<String, String> = HashMap::new();
        let mut datastore_ids: HashMap<String, String> = HashMap::new();
        for o in &objects {
            let name = text(o.props.get("name").copied()).unwrap_or_default();
            match o.kind.as_str() {
                "Datacenter" => {
                    if let Some(ds) = o.props.get("datastore") {
                        for m in ds.children().filter(|c| c.is_element()) {
                            if let Some(m) = m.text() {
                                dc_of_datastore.insert(m.to_string(), name.clone());
                            }
                        }
                    }
                    inv.datacenters.push(name)
                }
                "ClusterComputeResource" => inv.clusters.push(name),
                "HostSystem" => inv.hosts.push(name),
                "Datastore" => {
                    let num = |k: &str| {
                        text(o.props.get(k).copied())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0)
                    };
                    datastore_ids.insert(name.clone(), o.moref.clone());
                    inv.datastores
                        .push((name, num("summary.capacity"), num("summary.freeSpace")));
                }
                "Network" | "DistributedVirtualPortgroup" | "OpaqueNetwork" => {
                    portgroups.insert(o.moref.clone(), name.clone());
                    inv.networks.push(name);
                }
                _ => {}
            }
        }
        for o in objects.iter().filter(|o| o.kind == "VirtualMachine") {
            let mut v = vm(o, &portgroups);
            v.datacenter = v
                .disks
                .iter()
                .filter_map(|d| d.datastore.as_ref())
                .filter_map(|ds| datastore_ids.get(ds))
                .find_map(|id| dc_of_datastore.get(id))
                .cloned();
            inv.vms.push(v);
        }
        for v in [
            &mut inv.datacenters,
            &mut inv.clusters,
            &mut inv.hosts,
            &mut inv.networks,
        ] {
            v.sort();
        }
        inv.datastores.sort();
        inv.vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(inv)
    }
}

fn vm(o: &Object, portgroups: &HashMap<String, String>) -> Vm {
    let t = |k: &str| text(o.props.get(k).copied());
    let mut v = Vm {
        moref: o.moref.clone(),
        name: t("name").unwrap_or_default(),
        cpus: t("config.hardware.numCPU")
            .and_then(|x| x.parse().ok())
            .unwrap_or(0),
        memory_mib: t("config.hardware.memoryMB")
            .and_then(|x| x.parse().ok())
            .unwrap_or(0),
        power_state: t("runtime.powerState").unwrap_or_default(),
        guest_os: t("guest.guestFullName").or(t("config.guestFullName")),
        ip: t("guest.ipAddress"),
        tools: t("guest.toolsRunningStatus"),
        firmware: t("config.firmware"),
        guest_id: t("config.guestId"),
        encrypted: o.props.contains_key("config.keyId"),
        cbt: t("config.changeTrackingEnabled").as_deref() == Some("true"),
        template: t("config.template").as_deref() == Some("true"),
        has_snapshots: o
            .props
            .get("snapshot")
            .is_some_and(|s| child(*s, "rootSnapshotList").is_some()),
        snapshots: o
            .props
            .get("snapshot")
            .map(|s| snapshot_list(*s))
            .unwrap_or_default(),
        ..Default::default()
    };
    if let Some(devices) = o.props.get("config.hardware.device") {
        for d in devices.children().filter(|c| c.is_element()) {
            let kind = xsi_type(d);
            if kind == "VirtualDisk" {
                v.disks.push(parse_disk(d));
            } else if child(d, "macAddress").is_some() {
                let label = text(child(d, "deviceInfo").and_then(|i| child(i, "label")))
                    .unwrap_or_default();
                let backing = child(d, "backing");
                let network = backing.and_then(|b| {
                    text(child(b, "deviceName")).or_else(|| {
                        child(b, "port")
                            .and_then(|p| text(child(p, "portgroupKey")))
                            .map(|k| portgroups.get(&k).cloned().unwrap_or(k))
                    })
                });
                v.nics.push(VmNic {
                    label,
                    mac: text(child(d, "macAddress")),
                    network,
                    adapter: kind,
                });
            }
        }
    }
    v
}

/// A `VirtualDisk` device of a VM's or a snapshot's `config.hardware.device`.
pub(crate) fn parse_disk(d: roxmltree::Node) -> VmDisk {
    let backing = child(d, "backing");
    let file = text(backing.and_then(|b| child(b, "fileName")));
    VmDisk {
        key: text(child(d, "key"))
            .and_then(|k| k.parse().ok())
            .unwrap_or(0),
        label: text(child(d, "deviceInfo").and_then(|i| child(i, "label"))).unwrap_or_default(),
        capacity_bytes: text(child(d, "capacityInBytes"))
            .and_then(|x| x.parse().ok())
            .or_else(|| {
                text(child(d, "capacityInKB"))
                    .and_then(|x| x.parse::<u64>().ok())
                    .map(|k| k * 1024)
            })
            .unwrap_or(0),
        datastore: file
            .as_deref()
            .and_then(|f| crate::datastore::DatastorePath::parse(f).ok())
            .map(|p| p.datastore),
        file,
        mode: text(backing.and_then(|b| child(b, "diskMode"))),
        backing: backing.map(xsi_type).unwrap_or_default(),
        thin: text(backing.and_then(|b| child(b, "thinProvisioned"))).as_deref() == Some("true"),
        sharing: text(backing.and_then(|b| child(b, "sharing"))).filter(|s| s != "sharingNone"),
        change_id: text(backing.and_then(|b| child(b, "changeId"))).filter(|c| !c.is_empty()),
    }
}

/// Every snapshot in a `VirtualMachineSnapshotInfo` (the tree, flattened): (moref, name).
pub(crate) fn snapshot_list(info: roxmltree::Node) -> Vec<(String, String)> {
    fn walk(n: roxmltree::Node, out: &mut Vec<(String, String)>) {
        for t in n.children().filter(|c| {
            c.is_element()
                && matches!(
                    c.tag_name().name(),
                    "rootSnapshotList" | "childSnapshotList"
                )
        }) {
            if let (Some(m), Some(name)) = (text(child(t, "snapshot")), text(child(t, "name"))) {
                out.push((m, name));
            }
            walk(t, out);
        }
    }
    let mut out = vec![];
    walk(info, &mut out);
    out
}
