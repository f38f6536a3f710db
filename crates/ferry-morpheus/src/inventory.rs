//! Discovery of what a profile places workloads on: clouds (zones), groups, clusters,
//! hosts, datastores, networks, service plans and instance types, and the layouts of one
//! instance type ([`Inventory::layouts_of`]). Profiles name
//! these objects; [`Inventory::check_placement`] turns a name that does not exist into an
//! error naming it, before any data moves.

use crate::client::{Client, Paging};
use crate::error::MorpheusError;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Any named object of the manager.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Named {
    pub id: i64,
    #[serde(default)]
    pub name: String,
    /// The cloud (zone) it belongs to, when the API says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_id: Option<i64>,
    /// Its code (instance types: `mvm`), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The provision type it is for (plans and layouts: `mvm`), when the API says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provision_type: Option<String>,
    /// Its address range (networks: `10.20.120.0/24`), when the API says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
}

/// Whether `ip` lies in `cidr` (`10.20.120.0/24`, `fd00::/64`); `None` when either
/// does not parse.
pub fn in_cidr(ip: &str, cidr: &str) -> Option<bool> {
    let ip: std::net::IpAddr = ip.split('/').next()?.parse().ok()?;
    let (net, len) = cidr.split_once('/')?;
    let net: std::net::IpAddr = net.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    let (a, b, bits) = match (ip, net) {
        (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => {
            (u32::from(a) as u128, u32::from(b) as u128, 32)
        }
        (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return Some(false),
    };
    if len > bits {
        return None;
    }
    let shift = bits - len;
    Some(len == 0 || (a >> shift) == (b >> shift))
}

fn named(v: &Value) -> Option<Named> {
    Some(Named {
        id: v.get("id")?.as_i64()?,
        name: v
            .get("name")
            .or_else(|| v.get("authority"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        zone_id: v
            .pointer("/zone/id")
            .or_else(|| v.pointer("/cloud/id"))
            .or_else(|| v.get("zoneId"))
            .and_then(Value::as_i64),
        code: v.get("code").and_then(Value::as_str).map(str::to_string),
        provision_type: v
            .pointer("/provisionType/code")
            .and_then(Value::as_str)
            .map(str::to_string),
        cidr: v.get("cidr").and_then(Value::as_str).map(str::to_string),
    })
}

/// Everything placement can refer to.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Inventory {
    pub clouds: Vec<Named>,
    pub groups: Vec<Named>,
    pub clusters: Vec<Named>,
    pub hosts: Vec<Named>,
    pub datastores: Vec<Named>,
    pub networks: Vec<Named>,
    pub service_plans: Vec<Named>,
    pub instance_types: Vec<Named>,
}

/// A profile's placement, by name.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Placement {
    #[serde(default)]
    pub cloud: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub plan: Option<String>,
    #[serde(default)]
    pub datastore: Option<String>,
    /// Networks the workload's NICs are mapped to.
    #[serde(default)]
    pub networks: Vec<String>,
}

async fn list(c: &Client, path: &str, key: &str) -> Result<Vec<Named>, MorpheusError> {
    list_with(c, path, key, Paging::MaxOffset).await
}

async fn list_with(
    c: &Client,
    path: &str,
    key: &str,
    paging: Paging,
) -> Result<Vec<Named>, MorpheusError> {
    let items: Vec<Value> = c.list_paged(path, key, &[], paging).await?;
    Ok(items.iter().filter_map(named).collect())
}

impl Inventory {
    pub async fn discover(c: &Client) -> Result<Inventory, MorpheusError> {
        let mut inv = Inventory {
            clouds: list(c, "api/zones", "zones").await?,
            groups: list(c, "api/groups", "groups").await?,
            clusters: list(c, "api/clusters", "clusters").await?,
            hosts: list(c, "api/servers", "servers").await?,
            // The API documents no paging for networks, and only `max` for datastores.
            networks: list_with(c, "api/networks", "networks", Paging::None).await?,
            service_plans: list(c, "api/service-plans", "servicePlans").await?,
            instance_types: list(c, "api/instance-types", "instanceTypes").await?,
            datastores: vec![],
        };
        for z in inv.clouds.clone() {
            let path = format!("api/zones/{}/data-stores", z.id);
            let mut ds = list_with(c, &path, "datastores", Paging::MaxOnly).await?;
            for d in &mut ds {
                d.zone_id.get_or_insert(z.id);
            }
            inv.datastores.extend(ds);
        }
        Ok(inv)
    }

    /// The layouts of one instance type (not every layout of the library: those of other
    /// instance types are refused with it).
    pub async fn layouts_of(c: &Client, instance_type: i64) -> Result<Vec<Named>, MorpheusError> {
        list(
            c,
            &format!("api/library/instance-types/{instance_type}/layouts"),
            "instanceTypeLayouts",
        )
        .await
    }

    /// Every object `p` names must exist (in its cloud, when one is given); the error
    /// lists all that are missing, with what exists.
    pub fn check_placement(&self, p: &Placement) -> Result<(), MorpheusError> {
        let mut missing = vec![];
        let cloud = match &p.cloud {
            Some(name) => match find(&self.clouds, name, None) {
                Some(c) => Some(c.id),
                None => {
                    missing.push(describe("cloud", name, &self.clouds));
                    None
                }
            },
            None => None,
        };
        let mut check = |kind: &str, name: &Option<String>, list: &[Named], scoped: bool| {
            if let Some(n) = name {
                if find(list, n, if scoped { cloud } else { None }).is_none() {
                    missing.push(describe(kind, n, list));
                }
            }
        };
        check("group", &p.group, &self.groups, false);
        check("cluster", &p.cluster, &self.clusters, true);
        check("service plan", &p.plan, &self.service_plans, false);
        check("datastore", &p.datastore, &self.datastores, true);
        for n in &p.networks {
            check("network", &Some(n.clone()), &self.networks, true);
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(MorpheusError::Invalid {
                what: format!(
                    "the profile's placement names objects the manager does not have: {}",
                    missing.join("; ")
                ),
            })
        }
    }
}

fn find<'a>(list: &'a [Named], name: &str, zone: Option<i64>) -> Option<&'a Named> {
    list.iter().find(|x| {
        (x.name == name || x.id.to_string() == name)
            && (zone.is_none() || x.zone_id.is_none() || x.zone_id == zone)
    })
}

fn describe(kind: &str, name: &str, list: &[Named]) -> String {
    let mut have: Vec<&str> = list.iter().map(|x| x.name.as_str()).collect();
    have.truncate(10);
    if have.is_empty() {
        format!("no {kind} '{name}' (the manager has none)")
    } else {
        format!("no {kind} '{name}' (it has: {})", have.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: i64, name: &str, zone: Option<i64>) -> Named {
        Named {
            id,
            name: name.into(),
            zone_id: zone,
            code: None,
            provision_type: None,
            cidr: None,
        }
    }

    #[test]
    fn addresses_in_a_range() {
        assert_eq!(in_cidr("10.20.120.15", "10.20.120.0/24"), Some(true));
        assert_eq!(in_cidr("10.20.121.15", "10.20.120.0/24"), Some(false));
        assert_eq!(in_cidr("10.20.120.15/24", "10.20.120.0/24"), Some(true));
        assert_eq!(in_cidr("fd00::5", "fd00::/64"), Some(true));
        assert_eq!(in_cidr("10.0.0.1", "fd00::/64"), Some(false));
        assert_eq!(in_cidr("10.0.0.1", "0.0.0.0/0"), Some(true));
        assert_eq!(in_cidr("nonsense", "10.0.0.0/8"), None);
        assert_eq!(in_cidr("10.0.0.1", "10.0.0.0/40"), None);
    }

    #[test]
    fn missing_placement_objects_are_named_with_what_exists() {
        let inv = Inventory {
            clouds: vec![n(1, "vme-prod", None), n(2, "vme-lab", None)],
            groups: vec![n(3, "migrations", None)],
            clusters: vec![n(4, "hvm-a", Some(1)), n(5, "hvm-lab", Some(2))],
            networks: vec![n(6, "VLAN-120", Some(1))],
            datastores: vec![n(7, "ceph-rbd", Some(1))],
            ..Default::default()
        };
        let ok = Placement {
            cloud: Some("vme-prod".into()),
            group: Some("migrations".into()),
            cluster: Some("hvm-a".into()),
            datastore: Some("ceph-rbd".into()),
            networks: vec!["VLAN-120".into()],
            ..Default::default()
        };
        inv.check_placement(&ok).unwrap();
        let bad = Placement {
            cluster: Some("hvm-lab".into()), // in the other cloud
            networks: vec!["VLAN-999".into()],
            ..ok
        };
        let e = inv.check_placement(&bad).unwrap_err().to_string();
        assert!(e.contains("no cluster 'hvm-lab'"), "{e}");
        assert!(
            e.contains("no network 'VLAN-999' (it has: VLAN-120)"),
            "{e}"
        );
    }
}
