//! The manager's behaviour: login, roles and users with enforced feature permissions,
//! and the inventory lists.

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone)]
pub struct Role {
    pub id: i64,
    pub authority: String,
    pub description: Option<String>,
    /// code → access
    pub permissions: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub email: String,
    pub password: String,
    pub role_ids: Vec<i64>,
    /// Administrators may do anything.
    pub admin: bool,
}

/// A virtual image; `file` once uploaded.
#[derive(Debug, Clone)]
pub struct Image {
    pub id: i64,
    pub name: String,
    pub file: Option<std::path::PathBuf>,
    pub size: u64,
}

/// An instance: its volumes are qcow2 files, and it runs as a QEMU process when the
/// double has a boot configuration.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: i64,
    pub name: String,
    pub status: String,
    pub image_id: Option<i64>,
    /// The VM behind the instance (what `/api/servers/{id}/volumes/...` name).
    pub server_id: i64,
    /// Attached volumes in controller order: the first is the root volume, the one that
    /// boots.
    pub volumes: Vec<Volume>,
    /// Volumes detached from it, kept until the instance goes.
    pub detached: Vec<Volume>,
    /// (network id, static address) per interface.
    pub nics: Vec<(String, Option<String>)>,
    pub plan_id: i64,
    pub cloud_id: i64,
    /// The request body it was created with.
    pub body: Value,
    /// (id, name, copy of each volume by volume id)
    pub snapshots: Vec<(i64, String, VolumeCopies)>,
}

/// (volume id, the file its copy is in) of every volume a snapshot holds.
pub type VolumeCopies = Vec<(i64, std::path::PathBuf)>;

/// A storage volume: a qcow2 file.
#[derive(Debug, Clone)]
pub struct Volume {
    pub id: i64,
    pub name: String,
    pub path: std::path::PathBuf,
    pub size_gib: u64,
}

/// Work to do outside the state lock (it takes time).
#[derive(Debug, Clone)]
pub enum Effect {
    Boot(i64),
    Halt(i64),
    /// Halt, then remove the instance's files (it was deleted).
    Purge(i64),
}

/// The manager's state.
#[derive(Debug, Default)]
pub struct State {
    /// Where images and volumes are kept.
    pub data_dir: std::path::PathBuf,
    pub images: Vec<Image>,
    pub instances: Vec<Instance>,
    pub effects: Vec<Effect>,
    pub next_id: i64,
    pub users: Vec<User>,
    pub roles: Vec<Role>,
    /// access token → user id
    pub tokens: HashMap<String, i64>,
    /// refresh token → user id
    pub refresh_tokens: HashMap<String, i64>,
    /// Inventory lists by API collection key (`zones`, `groups`, …), plus
    /// `datastores` entries carrying their zone id.
    pub inventory: BTreeMap<&'static str, Vec<Value>>,
    /// Calls that changed something, `METHOD template`.
    pub mutations: Vec<String>,
    /// What each non-administrator called, and the permission the call needed:
    /// `(username, "METHOD template", permission code)`.
    pub permission_checks: std::collections::BTreeSet<(String, String, String)>,
}

pub struct Call<'a> {
    pub method: &'a str,
    pub template: &'a str,
    pub path_params: &'a BTreeMap<String, String>,
    pub query: &'a HashMap<String, String>,
    pub authorization: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
}

type Answer = (u16, Value);

fn err(status: u16, msg: &str) -> Answer {
    (status, json!({"success": false, "msg": msg}))
}

impl State {
    pub fn seeded(admin_user: &str, admin_password: &str) -> State {
        let mut s = State {
            next_id: 100,
            ..Default::default()
        };
        s.users.push(User {
            id: 1,
            username: admin_user.into(),
            email: "admin@example.com".into(),
            password: admin_password.into(),
            role_ids: vec![],
            admin: true,
        });
        s.inventory = crate::seed::inventory();
        s
    }

    fn id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }

    fn token(&mut self, user: i64) -> Value {
        let n = self.id();
        let access = format!("access-{user}-{n}");
        let refresh = format!("refresh-{user}-{n}");
        self.tokens.insert(access.clone(), user);
        self.refresh_tokens.insert(refresh.clone(), user);
        json!({"access_token": access, "refresh_token": refresh, "expires_in": 3600, "token_type": "bearer", "scope": "write"})
    }

    pub fn role_by_name(&self, name: &str) -> Option<&Role> {
        self.roles.iter().find(|r| r.authority == name)
    }

    pub fn user_by_name(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.username == name)
    }

    fn allowed(&self, user: &User, code: &str, write: bool) -> bool {
        if user.admin {
            return true;
        }
        user.role_ids.iter().any(|id| {
            self.roles
                .iter()
                .find(|r| r.id == *id)
                .and_then(|r| r.permissions.get(code))
                .is_some_and(|a| a == "full" || (!write && a == "read"))
        })
    }
}

/// The feature permission a route needs.
fn permission(method: &str, template: &str) -> &'static str {
    match (method, template) {
        ("POST", "/api/instances") => return "provisioning-add",
        ("DELETE", "/api/instances/{id}") => return "provisioning-delete",
        ("PUT", t) if t.ends_with("/start") || t.ends_with("/stop") => return "provisioning-power",
        ("DELETE", "/api/snapshots/{id}")
        | ("GET", "/api/instances/{id}/snapshots")
        | ("PUT", "/api/instances/{id}/snapshot")
        | ("PUT", "/api/instances/{id}/revert-snapshot/{snapshotId}") => return "snapshots",
        ("PUT", "/api/instances/{id}/resize") => return "provisioning-reconfigure",
        ("GET", "/api/zones/{zoneId}/data-stores") => return "infrastructure-storage",
        ("PUT", "/api/servers/{id}/volumes/{volumeId}/attach") => {
            return "provisioning-reconfigure-add-disk"
        }
        ("PUT", "/api/servers/{id}/volumes/{volumeId}/detach") => {
            return "provisioning-reconfigure-remove-disk"
        }
        ("POST", "/api/virtual-images/{virtualImageId}/upload") => {
            return "provisioning-import-image"
        }
        _ => {}
    }
    let t = template.trim_start_matches("/api/");
    match t.split('/').next().unwrap_or("") {
        "roles" => "admin-roles",
        "users" => "admin-users",
        "zones" => "admin-zones",
        "groups" => "admin-groups",
        "clusters" => "infrastructure-cluster",
        "servers" => "admin-servers",
        "networks" => "infrastructure-networks",
        "service-plans" => "admin-servicePlans",
        "instance-types" => "provisioning",
        "library" => "library-templates",
        "virtual-images" => "virtual-images",
        "instances" => "provisioning",
        _ => "admin-appliance",
    }
}

/// What a real manager accepts as an e-mail address (it refuses `name@localhost`).
fn valid_email(e: &str) -> Result<(), &'static str> {
    match e.split_once('@') {
        Some((local, domain))
            if !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !e.contains(char::is_whitespace) =>
        {
            Ok(())
        }
        _ => Err("Not a valid e-mail address"),
    }
}

fn role_json(r: &Role) -> Value {
    json!({"id": r.id, "name": r.authority, "authority": r.authority, "description": r.description, "roleType": "user", "multitenant": false, "multitenantLocked": false})
}

fn user_json(s: &State, u: &User) -> Value {
    let roles: Vec<Value> = u
        .role_ids
        .iter()
        .filter_map(|id| s.roles.iter().find(|r| r.id == *id))
        .map(|r| json!({"id": r.id, "authority": r.authority, "description": r.description}))
        .collect();
    json!({"id": u.id, "accountId": 1, "username": u.username, "email": u.email, "firstName": "", "lastName": "", "enabled": true, "roles": roles})
}

/// A page of `items` under `key`, with Morpheus's `meta`, filtered by `phrase`.
fn page(key: &str, items: Vec<Value>, q: &HashMap<String, String>) -> Answer {
    let phrase = q.get("phrase").map(|p| p.to_lowercase());
    let items: Vec<Value> = items
        .into_iter()
        .filter(|v| match &phrase {
            None => true,
            Some(p) => ["name", "authority", "username"].iter().any(|k| {
                v.get(*k)
                    .and_then(Value::as_str)
                    .is_some_and(|s| s.to_lowercase().contains(p))
            }),
        })
        .collect();
    let max: usize = q.get("max").and_then(|m| m.parse().ok()).unwrap_or(25);
    let offset: usize = q.get("offset").and_then(|m| m.parse().ok()).unwrap_or(0);
    let total = items.len();
    let slice: Vec<Value> = items.into_iter().skip(offset).take(max).collect();
    (
        200,
        json!({key: slice, "meta": {"offset": offset, "max": max, "size": slice.len(), "total": total}}),
    )
}

/// The items whose name is the query's `name`, when it has one.
fn by_name(items: Vec<Value>, q: &HashMap<String, String>) -> Vec<Value> {
    match q.get("name") {
        None => items,
        Some(n) => items
            .into_iter()
            .filter(|v| v["name"].as_str() == Some(n.as_str()))
            .collect(),
    }
}

fn image_json(i: &Image) -> Value {
    json!({"id": i.id, "name": i.name, "imageType": "qcow2", "status": if i.file.is_some() { "Active" } else { "Queued" }, "rawSize": i.size})
}

fn instance_json(i: &Instance) -> Value {
    let volumes: Vec<Value> = i
        .volumes
        .iter()
        .enumerate()
        .map(|(k, v)| json!({"id": v.id, "name": v.name, "rootVolume": k == 0, "size": v.size_gib, "displayOrder": k, "controllerId": 1}))
        .collect();
    let connection: Vec<Value> = i
        .nics
        .iter()
        .filter_map(|(_, ip)| ip.as_ref())
        .map(|ip| json!({"ip": ip, "port": 22}))
        .collect();
    json!({"id": i.id, "name": i.name, "status": i.status, "cloud": {"id": i.cloud_id}, "plan": {"id": i.plan_id},
        "servers": [i.server_id], "volumes": volumes, "connectionInfo": connection})
}

fn exists(s: &State, key: &str, id: i64) -> bool {
    find(s, key, id).is_some()
}

/// Why a NIC's static address `ip` is refused on network `net`, if it is: outside the
/// network's range (a network without a range takes any).
fn address_refused(net: &Value, ip: Option<&str>) -> Option<String> {
    let (ip, cidr) = (ip?, net["cidr"].as_str()?);
    (!in_cidr(ip, cidr)).then(|| {
        format!(
            "{ip} is not an address of network {} ({cidr})",
            net["name"].as_str().unwrap_or_default()
        )
    })
}

/// Whether IPv4 `ip` lies in `cidr`; anything that does not parse is outside.
fn in_cidr(ip: &str, cidr: &str) -> bool {
    let parse = |a: &str| a.parse::<std::net::Ipv4Addr>().ok().map(u32::from);
    let Some((net, len)) = cidr.split_once('/') else {
        return false;
    };
    match (parse(ip), parse(net), len.parse::<u32>()) {
        (Some(a), Some(b), Ok(len)) if len <= 32 => {
            len == 0 || (a >> (32 - len)) == (b >> (32 - len))
        }
        _ => false,
    }
}

fn find(s: &State, key: &str, id: i64) -> Option<Value> {
    s.inventory
        .get(key)?
        .iter()
        .find(|v| v["id"].as_i64() == Some(id))
        .cloned()
}

fn create_instance(s: &mut State, b: Value) -> Answer {
    let bad = |field: &str, msg: &str| {
        (
            400,
            json!({"success": false, "msg": "Unable to create instance", "errors": {field: msg}}),
        )
    };
    let name = b
        .pointer("/instance/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if s.instances.iter().any(|i| i.name == name) {
        return bad("name", "an instance with this name exists");
    }
    let cloud = b["zoneId"].as_i64().unwrap_or(0);
    if !exists(s, "zones", cloud) {
        return bad("zoneId", "no such cloud");
    }
    let group = b
        .pointer("/instance/site/id")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if !exists(s, "groups", group) {
        return bad("site", "no such group");
    }
    let plan = b
        .pointer("/instance/plan/id")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if !exists(s, "servicePlans", plan) {
        return bad("plan", "no such service plan");
    }
    let layout = b
        .pointer("/instance/layout/id")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let Some(layout) = find(s, "instanceTypeLayouts", layout) else {
        return bad("layout", "no such layout");
    };
    // A layout belongs to one instance type, a plan to one provision type: the manager
    // refuses a mix.
    let itype = b
        .pointer("/instance/instanceType/code")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if layout.pointer("/instanceType/code").and_then(Value::as_str) != Some(itype) {
        return bad(
            "layout",
            &format!("the layout is not one of instance type {itype}"),
        );
    }
    let plan_type = find(s, "servicePlans", plan).and_then(|p| {
        p.pointer("/provisionType/code")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    let layout_type = layout
        .pointer("/provisionType/code")
        .and_then(Value::as_str);
    if plan_type.is_some() && plan_type.as_deref() != layout_type {
        return bad(
            "plan",
            "the plan is not available for the layout's provision type",
        );
    }
    let image_id = b.pointer("/config/imageId").and_then(Value::as_i64);
    let image = match image_id {
        Some(i) => match s.images.iter().find(|x| x.id == i) {
            Some(Image { file: Some(f), .. }) => Some(f.clone()),
            Some(_) => return bad("imageId", "the image has no uploaded file"),
            None => return bad("imageId", "no such image"),
        },
        None => None,
    };
    let mut nics = vec![];
    for n in b["networkInterfaces"].as_array().into_iter().flatten() {
        let id = n
            .pointer("/network/id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let num: i64 = id.trim_start_matches("network-").parse().unwrap_or(0);
        let Some(net) = find(s, "networks", num) else {
            return bad("networkInterfaces", &format!("no such network {id}"));
        };
        // A static address must lie in the network's range.
        if let Some(why) = address_refused(&net, n["ipAddress"].as_str()) {
            return bad("networkInterfaces", &why);
        }
        nics.push((id.to_string(), n["ipAddress"].as_str().map(str::to_string)));
    }
    let id = s.id();
    let server_id = s.id();
    let dir = s.data_dir.join(format!("instance-{id}"));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return err(500, &format!("storage: {e}"));
    }
    let mut volumes = vec![];
    for (k, v) in b["volumes"].as_array().into_iter().flatten().enumerate() {
        let gib = v["size"].as_u64().unwrap_or(10);
        let path = dir.join(format!("vol{k}.qcow2"));
        let made = if let (0, Some(img)) = (k, image.as_ref()) {
            // The root volume starts as a copy of the image, grown to its size.
            std::fs::copy(img, &path).map(drop).and_then(|_| {
                run(
                    "qemu-img",
                    &[
                        "resize",
                        "-q",
                        "-f",
                        "qcow2",
                        &path.to_string_lossy(),
                        &format!("{gib}G"),
                    ],
                )
            })
        } else {
            run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    &path.to_string_lossy(),
                    &format!("{gib}G"),
                ],
            )
        };
        if let Err(e) = made {
            return err(500, &format!("creating volume {k}: {e}"));
        }
        volumes.push(Volume {
            id: s.id(),
            name: v["name"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("data-{k}")),
            path,
            size_gib: gib,
        });
    }
    let powered_off = b
        .pointer("/config/provisionPoweredOff")
        .and_then(Value::as_bool)
        == Some(true);
    let inst = Instance {
        id,
        name,
        status: if powered_off {
            "stopped".into()
        } else {
            "provisioning".into()
        },
        image_id,
        server_id,
        volumes,
        detached: vec![],
        nics,
        plan_id: plan,
        cloud_id: cloud,
        body: b,
        snapshots: vec![],
    };
    if !powered_off {
        s.effects.push(Effect::Boot(id));
    }
    let out = json!({"success": true, "instance": instance_json(&inst)});
    s.instances.push(inst);
    (200, out)
}

fn run(program: &str, args: &[&str]) -> std::io::Result<()> {
    let o = std::process::Command::new(program).args(args).output()?;
    if o.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(
            String::from_utf8_lossy(&o.stderr).trim().to_string(),
        ))
    }
}

fn json_body(c: &Call) -> Result<Value, Answer> {
    serde_json::from_slice(c.body).map_err(|e| err(400, &format!("invalid JSON: {e}")))
}

pub fn handle(s: &mut State, c: &Call) -> Answer {
    if c.template == "/oauth/token" {
        return token(s, c);
    }
    let user = c
        .authorization
        .and_then(|a| a.strip_prefix("Bearer "))
        .and_then(|t| s.tokens.get(t).copied())
        .and_then(|id| s.users.iter().find(|u| u.id == id).cloned());
    let Some(user) = user else {
        return err(401, "Unauthorized: invalid or expired access token");
    };
    let write = c.method != "GET";
    let code = permission(c.method, c.template);
    if !user.admin {
        s.permission_checks.insert((
            user.username.clone(),
            format!("{} {}", c.method, c.template),
            code.to_string(),
        ));
    }
    if !s.allowed(&user, code, write) {
        return err(
            403,
            &format!("You do not have permission to access this resource ({code})"),
        );
    }
    if write {
        s.mutations.push(format!("{} {}", c.method, c.template));
    }
    let id = |name: &str| -> Option<i64> { c.path_params.get(name).and_then(|v| v.parse().ok()) };
    match (c.method, c.template) {
        ("GET", "/api/roles") => {
            let items = s.roles.iter().map(role_json).collect();
            page("roles", items, c.query)
        }
        ("POST", "/api/roles") => {
            let b = match json_body(c) {
                Ok(b) => b,
                Err(e) => return e,
            };
            let authority = b
                .pointer("/role/authority")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if s.role_by_name(&authority).is_some() {
                return (
                    400,
                    json!({"success": false, "msg": "Unable to save role", "errors": {"authority": "must be unique"}}),
                );
            }
            let permissions = b
                .pointer("/role/featurePermissions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p.get("code")?.as_str()?.to_string(),
                        p.get("access")?.as_str()?.to_string(),
                    ))
                })
                .collect();
            let r = Role {
                id: s.id(),
                authority,
                description: b
                    .pointer("/role/description")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                permissions,
            };
            let out = json!({"success": true, "role": role_json(&r)});
            s.roles.push(r);
            (200, out)
        }
        ("GET", "/api/roles/{id}") => match s.roles.iter().find(|r| Some(r.id) == id("id")) {
            None => err(404, "Role not found"),
            Some(r) => {
                let perms: Vec<Value> = r
                    .permissions
                    .iter()
                    .enumerate()
                    .map(|(i, (code, access))| json!({"id": i as i64 + 1, "code": code, "name": code, "access": access}))
                    .collect();
                (
                    200,
                    json!({"role": role_json(r), "featurePermissions": perms}),
                )
            }
        },
        ("PUT", "/api/roles/{id}/update-permission") => {
            let b = match json_body(c) {
                Ok(b) => b,
                Err(e) => return e,
            };
            let rid = id("id");
            let Some(r) = s.roles.iter_mut().find(|r| Some(r.id) == rid) else {
                return err(404, "Role not found");
            };
            let code = b["permissionCode"].as_str().unwrap_or_default().to_string();
            let access = b["access"].as_str().unwrap_or("none").to_string();
            r.permissions.insert(code, access.clone());
            (200, json!({"success": true, "access": access}))
        }
        ("GET", "/api/users") => {
            let items = s.users.iter().map(|u| user_json(s, u)).collect();
            page("users", items, c.query)
        }
        ("POST", "/api/users") => {
            let b = match json_body(c) {
                Ok(b) => b,
                Err(e) => return e,
            };
            let u = &b["user"];
            let username = u["username"].as_str().unwrap_or_default().to_string();
            if s.user_by_name(&username).is_some() {
                return (
                    400,
                    json!({"success": false, "msg": "Unable to save user", "errors": {"username": "must be unique"}}),
                );
            }
            let role_ids: Vec<i64> = u["roles"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["id"].as_i64())
                .collect();
            if role_ids
                .iter()
                .any(|id| !s.roles.iter().any(|r| r.id == *id))
            {
                return (
                    400,
                    json!({"success": false, "msg": "Unable to save user", "errors": {"roles": "unknown role"}}),
                );
            }
            let email = u["email"].as_str().unwrap_or_default();
            if let Err(e) = valid_email(email) {
                return (
                    400,
                    json!({"success": false, "msg": "Unable to save user", "errors": {"email": e}}),
                );
            }
            let new = User {
                id: s.id(),
                username,
                email: email.into(),
                password: u["password"].as_str().unwrap_or_default().into(),
                role_ids,
                admin: false,
            };
            let out = json!({"success": true, "user": user_json(s, &new)});
            s.users.push(new);
            (200, out)
        }
        ("GET", "/api/users/{id}") => match s.users.iter().find(|u| Some(u.id) == id("id")) {
            None => err(404, "User not found"),
            Some(u) => (200, json!({"user": user_json(s, u)})),
        },
        ("PUT", "/api/users/{id}") => {
            let b = match json_body(c) {
                Ok(b) => b,
                Err(e) => return e,
            };
            let uid = id("id");
            let Some(u) = s.users.iter_mut().find(|u| Some(u.id) == uid) else {
                return err(404, "User not found");
            };
            if let Some(e) = b.pointer("/user/email").and_then(Value::as_str) {
                if let Err(why) = valid_email(e) {
                    return (
                        400,
                        json!({"success": false, "msg": "Unable to save user", "errors": {"email": why}}),
                    );
                }
                u.email = e.into();
            }
            if let Some(p) = b.pointer("/user/password").and_then(Value::as_str) {
                u.password = p.into();
            }
            if let Some(roles) = b.pointer("/user/roles").and_then(Value::as_array) {
                u.role_ids = roles.iter().filter_map(|r| r["id"].as_i64()).collect();
            }
            let u = u.clone();
            (200, json!({"success": true, "user": user_json(s, &u)}))
        }
        ("GET", "/api/virtual-images") => {
            let items = s.images.iter().map(image_json).collect();
            page("virtualImages", by_name(items, c.query), c.query)
        }
        ("GET", "/api/instances") => {
            let items = s.instances.iter().map(instance_json).collect();
            page("instances", by_name(items, c.query), c.query)
        }
        ("POST", "/api/virtual-images") => {
            let b = match json_body(c) {
                Ok(b) => b,
                Err(e) => return e,
            };
            let name = b
                .pointer("/virtualImage/name")
                .and_then(Value::as_str)
                .unwrap_or("image");
            if s.images.iter().any(|i| i.name == name) {
                return (
                    400,
                    json!({"success": false, "msg": "Virtual image name must be unique", "errors": {"name": "must be unique"}}),
                );
            }
            let img = Image {
                id: s.id(),
                name: b
                    .pointer("/virtualImage/name")
                    .and_then(Value::as_str)
                    .unwrap_or("image")
                    .into(),
                file: None,
                size: 0,
            };
            let out = json!({"success": true, "virtualImage": image_json(&img)});
            s.images.push(img);
            (200, out)
        }
        ("GET", "/api/virtual-images/{virtualImageId}") => {
            match s.images.iter().find(|i| Some(i.id) == id("virtualImageId")) {
                None => err(404, "Virtual image not found"),
                Some(i) => (200, json!({"virtualImage": image_json(i)})),
            }
        }
        ("DELETE", "/api/virtual-images/{virtualImageId}") => {
            let vid = id("virtualImageId");
            let Some(k) = s.images.iter().position(|i| Some(i.id) == vid) else {
                return err(404, "Virtual image not found");
            };
            let img = s.images.remove(k);
            if let Some(f) = img.file {
                let _ = std::fs::remove_file(f);
            }
            (200, json!({"success": true}))
        }
        ("POST", "/api/virtual-images/{virtualImageId}/upload") => {
            let vid = id("virtualImageId");
            let dir = s.data_dir.join("images");
            let Some(i) = s.images.iter_mut().find(|i| Some(i.id) == vid) else {
                return err(404, "Virtual image not found");
            };
            let name = c
                .query
                .get("filename")
                .cloned()
                .unwrap_or_else(|| format!("{}.qcow2", i.id));
            let path = dir.join(format!("{}-{}", i.id, name.replace('/', "_")));
            if let Err(e) =
                std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, c.body))
            {
                return err(500, &format!("storing the upload: {e}"));
            }
            i.file = Some(path);
            i.size = c.body.len() as u64;
            (200, json!({"success": true}))
        }
        ("POST", "/api/instances") => match json_body(c) {
            Ok(b) => create_instance(s, b),
            Err(e) => e,
        },
        ("GET", "/api/instances/{id}") => match s.instances.iter().find(|i| Some(i.id) == id("id"))
        {
            None => err(404, "Instance not found"),
            Some(i) => (200, json!({"instance": instance_json(i)})),
        },
        ("PUT", "/api/instances/{id}/start") | ("PUT", "/api/instances/{id}/stop") => {
            let start = c.template.ends_with("start");
            let iid = id("id");
            let Some(i) = s.instances.iter_mut().find(|i| Some(i.id) == iid) else {
                return err(404, "Instance not found");
            };
            let effect = if start {
                if i.status == "running" {
                    None
                } else {
                    i.status = "starting".into();
                    Some(Effect::Boot(i.id))
                }
            } else if i.status == "stopped" {
                None
            } else {
                i.status = "stopping".into();
                Some(Effect::Halt(i.id))
            };
            if let Some(e) = effect {
                s.effects.push(e);
            }
            (200, json!({"success": true, "results": {}}))
        }
        ("PUT", "/api/instances/{id}/snapshot") => {
            let b = match json_body(c) {
                Ok(b) => b,
                Err(e) => return e,
            };
            let sid = s.id();
            let iid = id("id");
            let Some(i) = s.instances.iter_mut().find(|i| Some(i.id) == iid) else {
                return err(404, "Instance not found");
            };
            if i.status != "stopped" {
                // The double copies volume files: only consistent while nothing writes.
                return err(
                    400,
                    "the test double snapshots stopped instances only: stop it first",
                );
            }
            let name = b
                .pointer("/snapshot/name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| format!("{}.{sid}", i.name));
            let mut copies = vec![];
            for v in i.volumes.iter().chain(&i.detached) {
                let to = v
                    .path
                    .with_file_name(format!("snap{sid}-vol{}.qcow2", v.id));
                if let Err(e) = std::fs::copy(&v.path, &to) {
                    return err(500, &format!("snapshot: {e}"));
                }
                copies.push((v.id, to));
            }
            i.snapshots.push((sid, name, copies));
            (200, json!({"success": true, "processIds": [sid]}))
        }
        ("GET", "/api/instances/{id}/snapshots") => {
            match s.instances.iter().find(|i| Some(i.id) == id("id")) {
                None => err(404, "Instance not found"),
                Some(i) => (
                    200,
                    json!({"snapshots": i.snapshots.iter().map(|(sid, name, _)| json!({"id": sid, "name": name, "status": "complete"})).collect::<Vec<_>>()}),
                ),
            }
        }
        ("PUT", "/api/instances/{id}/revert-snapshot/{snapshotId}") => {
            let (iid, sid) = (id("id"), id("snapshotId"));
            let Some(i) = s.instances.iter_mut().find(|i| Some(i.id) == iid) else {
                return err(404, "Instance not found");
            };
            if i.status != "stopped" {
                return err(400, "stop the instance before reverting it to a snapshot");
            }
            let Some((_, _, copies)) = i.snapshots.iter().find(|(x, _, _)| Some(*x) == sid) else {
                return err(404, "Snapshot not found");
            };
            for (vid, from) in copies {
                let Some(to) = i.volumes.iter().chain(&i.detached).find(|v| v.id == *vid) else {
                    continue;
                };
                if let Err(e) = std::fs::copy(from, &to.path) {
                    return err(500, &format!("revert: {e}"));
                }
            }
            (200, json!({"success": true}))
        }
        ("DELETE", "/api/snapshots/{id}") => {
            let sid = id("id");
            for i in &mut s.instances {
                if let Some(k) = i.snapshots.iter().position(|(x, _, _)| Some(*x) == sid) {
                    let (_, _, copies) = i.snapshots.remove(k);
                    for (_, f) in copies {
                        let _ = std::fs::remove_file(f);
                    }
                    return (200, json!({"success": true}));
                }
            }
            err(404, "Snapshot not found")
        }
        ("PUT", "/api/servers/{id}/volumes/{volumeId}/attach")
        | ("PUT", "/api/servers/{id}/volumes/{volumeId}/detach") => {
            let attach = c.template.ends_with("attach") && !c.template.ends_with("detach");
            let root = if attach {
                match json_body(c) {
                    Ok(b) => b["rootVolume"].as_bool() == Some(true),
                    Err(e) => return e,
                }
            } else {
                false
            };
            let (sid, vid) = (id("id"), id("volumeId"));
            let Some(i) = s.instances.iter_mut().find(|i| Some(i.server_id) == sid) else {
                return err(404, "Server not found");
            };
            if i.status != "stopped" {
                // What the double boots is decided at boot: changing it under a running
                // guest would silently mean nothing.
                return err(
                    400,
                    "stop the instance before attaching or detaching volumes",
                );
            }
            let (from, to) = if attach {
                (&mut i.detached, &mut i.volumes)
            } else {
                (&mut i.volumes, &mut i.detached)
            };
            let Some(k) = from.iter().position(|v| Some(v.id) == vid) else {
                return err(
                    404,
                    if attach {
                        "Volume not found among the server's detached volumes"
                    } else {
                        "Volume not attached to this server"
                    },
                );
            };
            let v = from.remove(k);
            if root {
                to.insert(0, v);
            } else {
                to.push(v);
            }
            (200, json!({"success": true}))
        }
        ("PUT", "/api/instances/{id}/resize") => {
            let b = match json_body(c) {
                Ok(b) => b,
                Err(e) => return e,
            };
            let mut nics = vec![];
            for n in b["networkInterfaces"].as_array().into_iter().flatten() {
                let nid = n
                    .pointer("/network/id")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let num: i64 = nid.trim_start_matches("network-").parse().unwrap_or(0);
                let Some(net) = find(s, "networks", num) else {
                    return (
                        400,
                        json!({"success": false, "msg": "Unable to resize instance", "errors": {"networkInterfaces": format!("no such network {nid}")}}),
                    );
                };
                if let Some(why) = address_refused(&net, n["ipAddress"].as_str()) {
                    return (
                        400,
                        json!({"success": false, "msg": "Unable to resize instance", "errors": {"networkInterfaces": why}}),
                    );
                }
                nics.push((nid.to_string(), n["ipAddress"].as_str().map(str::to_string)));
            }
            let iid = id("id");
            let Some(i) = s.instances.iter_mut().find(|i| Some(i.id) == iid) else {
                return err(404, "Instance not found");
            };
            if !nics.is_empty() {
                i.nics = nics;
            }
            let out = json!({"success": true, "instance": instance_json(i), "zoneId": i.cloud_id, "config": {}});
            (200, out)
        }
        ("DELETE", "/api/instances/{id}") => {
            let iid = id("id");
            let Some(k) = s.instances.iter().position(|i| Some(i.id) == iid) else {
                return err(404, "Instance not found");
            };
            let i = s.instances.remove(k);
            // Halting needs the run directory: the files go after the guest is gone.
            s.effects.push(Effect::Purge(i.id));
            (200, json!({"success": true}))
        }
        ("GET", "/api/library/instance-types/{instanceTypeId}/layouts") => {
            let it = id("instanceTypeId");
            let items = s
                .inventory
                .get("instanceTypeLayouts")
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|l| l.pointer("/instanceType/id").and_then(Value::as_i64) == it)
                .collect();
            page("instanceTypeLayouts", items, c.query)
        }
        ("GET", "/api/zones/{zoneId}/data-stores") => {
            let zone = id("zoneId");
            let items = s
                .inventory
                .get("datastores")
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|d| d.pointer("/zone/id").and_then(Value::as_i64) == zone)
                .collect();
            page("datastores", items, c.query)
        }
        ("GET", t) => {
            let key = match t {
                "/api/zones" => "zones",
                "/api/groups" => "groups",
                "/api/clusters" => "clusters",
                "/api/servers" => "servers",
                "/api/networks" => "networks",
                "/api/service-plans" => "servicePlans",
                "/api/instance-types" => "instanceTypes",
                "/api/library/layouts" => "instanceTypeLayouts",
                _ => return err(404, &format!("{t} is not implemented by the test double")),
            };
            let items = s.inventory.get(key).cloned().unwrap_or_default();
            page(key, items, c.query)
        }
        (m, t) => err(
            404,
            &format!("{m} {t} is not implemented by the test double"),
        ),
    }
}

fn token(s: &mut State, c: &Call) -> Answer {
    let form: HashMap<String, String> = url::form_urlencoded::parse(c.body).into_owned().collect();
    let _ = c.content_type;
    match c.query.get("grant_type").map(String::as_str) {
        Some("password") => {
            let user = form.get("username").cloned().unwrap_or_default();
            let pass = form.get("password").cloned().unwrap_or_default();
            match s
                .users
                .iter()
                .find(|u| u.username == user && u.password == pass)
                .map(|u| u.id)
            {
                Some(id) => (200, s.token(id)),
                None => (
                    400,
                    json!({"success": false, "msg": "invalid_grant: Bad credentials"}),
                ),
            }
        }
        Some("refresh_token") => {
            let r = form.get("refresh_token").cloned().unwrap_or_default();
            match s.refresh_tokens.remove(&r) {
                Some(id) => (200, s.token(id)),
                None => (
                    400,
                    json!({"success": false, "msg": "invalid_grant: Invalid refresh token"}),
                ),
            }
        }
        _ => err(400, "unsupported grant_type"),
    }
}
