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

/// The manager's state.
#[derive(Debug, Default)]
pub struct State {
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
fn permission(template: &str) -> &'static str {
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
        "instance-types" | "library" => "provisioning",
        _ => "admin-appliance",
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
    let code = permission(c.template);
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
            let new = User {
                id: s.id(),
                username,
                email: u["email"].as_str().unwrap_or_default().into(),
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
            if let Some(p) = b.pointer("/user/password").and_then(Value::as_str) {
                u.password = p.into();
            }
            if let Some(roles) = b.pointer("/user/roles").and_then(Value::as_array) {
                u.role_ids = roles.iter().filter_map(|r| r["id"].as_i64()).collect();
            }
            let u = u.clone();
            (200, json!({"success": true, "user": user_json(s, &u)}))
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
