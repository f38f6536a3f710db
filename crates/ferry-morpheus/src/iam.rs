//! Step 1 of the workflow: the `ferry-migration` role with only what migration needs, and
//! a service user bound to it. Idempotent: what already matches is left alone, so a
//! second run makes no call that changes anything.

use crate::client::Client;
use crate::error::MorpheusError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The role Ferry's service user holds.
pub const ROLE: &str = "ferry-migration";

/// Every call the service user makes (`METHOD template` as the API document writes it),
/// with the feature permission and access it needs. The role is made from this table
/// ([`permissions`]); the suite checks that every call the client made against the test
/// double has its row.
pub const CALLS: &[(&str, &str, &str)] = &[
    // Placement discovery: clouds, groups, clusters, hosts, plans, networks, storage,
    // instance types and their layouts.
    ("GET /api/zones", "admin-zones", "read"),
    ("GET /api/groups", "admin-groups", "read"),
    ("GET /api/clusters", "infrastructure-cluster", "read"),
    ("GET /api/servers", "admin-servers", "read"),
    ("GET /api/service-plans", "admin-servicePlans", "read"),
    ("GET /api/networks", "infrastructure-networks", "read"),
    (
        "GET /api/zones/{zoneId}/data-stores",
        "infrastructure-storage",
        "read",
    ),
    ("GET /api/instance-types", "provisioning", "read"),
    (
        "GET /api/library/instance-types/{instanceTypeId}/layouts",
        "library-templates",
        "read",
    ),
    // Virtual images and their upload (image mode, the target worker image).
    ("GET /api/virtual-images", "virtual-images", "full"),
    ("POST /api/virtual-images", "virtual-images", "full"),
    (
        "DELETE /api/virtual-images/{virtualImageId}",
        "virtual-images",
        "full",
    ),
    (
        "POST /api/virtual-images/{virtualImageId}/upload",
        "provisioning-import-image",
        "full",
    ),
    // Instances: create, follow, power, resize, attach and detach disks, delete.
    ("GET /api/instances", "provisioning", "full"),
    ("POST /api/instances", "provisioning-add", "full"),
    ("GET /api/instances/{id}", "provisioning", "full"),
    (
        "PUT /api/instances/{id}/start",
        "provisioning-power",
        "full",
    ),
    ("PUT /api/instances/{id}/stop", "provisioning-power", "full"),
    (
        "PUT /api/instances/{id}/resize",
        "provisioning-reconfigure",
        "full",
    ),
    ("DELETE /api/instances/{id}", "provisioning-delete", "full"),
    (
        "PUT /api/servers/{id}/volumes/{volumeId}/attach",
        "provisioning-reconfigure-add-disk",
        "full",
    ),
    (
        "PUT /api/servers/{id}/volumes/{volumeId}/detach",
        "provisioning-reconfigure-remove-disk",
        "full",
    ),
    // Snapshots: taken before each delta, reverted on failure and rollback.
    ("PUT /api/instances/{id}/snapshot", "snapshots", "full"),
    ("GET /api/instances/{id}/snapshots", "snapshots", "full"),
    (
        "PUT /api/instances/{id}/revert-snapshot/{snapshotId}",
        "snapshots",
        "full",
    ),
    ("DELETE /api/snapshots/{id}", "snapshots", "full"),
];

/// The role's feature permissions, from [`CALLS`]: each code once, with the highest
/// access a call needs. Everything else stays `none`.
pub fn permissions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&'static str, &'static str)> = vec![];
    for (_, code, access) in CALLS {
        match out.iter_mut().find(|(c, _)| c == code) {
            Some(have) if have.1 == "full" || *access == "read" => {}
            Some(have) => have.1 = access,
            None => out.push((code, access)),
        }
    }
    out
}

/// What to set up.
#[derive(Debug, Clone)]
pub struct IamRequest {
    pub service_user: String,
    /// The address a new service user gets.
    pub email: String,
    /// Also give an existing service user this address (it was asked for).
    pub set_email: bool,
    /// Set as the service user's password when the user is created, or reset when
    /// `reset_password` (the appliance lost or never had it).
    pub password: String,
    pub reset_password: bool,
    /// Only read and report what would change.
    pub dry_run: bool,
}

/// One call that changes something, done or (with `dry_run`) only planned.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub call: String,
    pub what: String,
    /// The request body with secrets replaced by `<redacted>`.
    pub body: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct IamReport {
    pub role_id: Option<i64>,
    pub user_id: Option<i64>,
    /// Changes made (or, with `dry_run`, that would be made). Empty: all was in place.
    pub changes: Vec<Change>,
    /// The password in the request is now the service user's.
    pub password_set: bool,
    pub dry_run: bool,
}

#[derive(Deserialize)]
struct RoleRef {
    id: i64,
    #[serde(default)]
    authority: Option<String>,
}

#[derive(Deserialize)]
struct FeaturePermission {
    code: String,
    #[serde(default)]
    access: Option<String>,
}

#[derive(Deserialize)]
struct UserRef {
    id: i64,
    username: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    roles: Vec<RoleRef>,
}

fn change(call: &str, what: String, body: Value) -> Change {
    Change {
        call: call.into(),
        what,
        body,
    }
}

/// Whether `email` is an address a manager that validates them accepts: one `@`, a
/// local part, a domain with a dot, no spaces. The error says what is wrong.
pub fn check_email(email: &str) -> Result<(), String> {
    let Some((local, domain)) = email.split_once('@') else {
        return Err("an e-mail address needs an @".into());
    };
    if local.is_empty() || domain.contains('@') || email.chars().any(char::is_whitespace) {
        return Err("not an e-mail address (name@example.com)".into());
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 || labels.iter().any(|l| l.is_empty()) {
        return Err(format!(
            "its domain {domain:?} has no dot: managers refuse it; give one such as ferry-migration@example.com"
        ));
    }
    Ok(())
}

/// `ferry-migration@HOST` for a manager at `https://HOST…`, when HOST is a name with a
/// dot (not an address, not `localhost`).
pub fn default_email(base: &str) -> Option<String> {
    let host = url::Url::parse(base).ok()?.host_str()?.to_string();
    let is_name = host.parse::<std::net::IpAddr>().is_err() && !host.starts_with('[');
    let email = format!("ferry-migration@{host}");
    (is_name && check_email(&email).is_ok()).then_some(email)
}

/// Brings the role and the service user to what Ferry needs. A failure after the role
/// was created says so: the role stays (the API cannot delete roles), and a second run
/// keeps it and goes on with the user.
pub async fn setup(c: &Client, req: &IamRequest) -> Result<IamReport, MorpheusError> {
    check_email(&req.email).map_err(|m| MorpheusError::Invalid {
        what: format!("e-mail {:?}: {m}", req.email),
    })?;
    let mut created_role = None;
    let r = setup_steps(c, req, &mut created_role).await;
    match (r, created_role) {
        (Err(e), Some(id)) if !req.dry_run => Err(MorpheusError::HalfDone {
            done: format!("role {ROLE} was created (id {id})"),
            source: Box::new(e),
        }),
        (r, _) => r,
    }
}

async fn setup_steps(
    c: &Client,
    req: &IamRequest,
    created_role: &mut Option<i64>,
) -> Result<IamReport, MorpheusError> {
    let mut rep = IamReport {
        role_id: None,
        user_id: None,
        changes: vec![],
        password_set: false,
        dry_run: req.dry_run,
    };

    // The role.
    let wanted_permissions = permissions();
    let roles: Vec<RoleRef> = c
        .list_all("api/roles", "roles", &[("phrase", ROLE.to_string())])
        .await?;
    let role = roles
        .into_iter()
        .find(|r| r.authority.as_deref() == Some(ROLE));
    match role {
        None => {
            let body = json!({"role": {
                "authority": ROLE,
                "description": "Ferry workload migration service account: images, instances, power, reconfigure, snapshots; read-only placement",
                "roleType": "user",
                "featurePermissions": wanted_permissions.iter().map(|(code, access)| json!({"code": code, "access": access})).collect::<Vec<_>>(),
            }});
            rep.changes.push(change(
                "POST /api/roles",
                format!(
                    "create role {ROLE} with {} permissions",
                    wanted_permissions.len()
                ),
                body.clone(),
            ));
            if !req.dry_run {
                let v = c.post("api/roles", &body).await?;
                rep.role_id = v.pointer("/role/id").and_then(Value::as_i64);
                *created_role = rep.role_id;
                if rep.role_id.is_none() {
                    return Err(MorpheusError::BadAnswer {
                        call: "POST /api/roles".into(),
                        why: "no role.id in the answer".into(),
                    });
                }
            }
        }
        Some(r) => {
            rep.role_id = Some(r.id);
            let path = format!("api/roles/{}", r.id);
            let v: Value = c.get(&path, &[]).await?;
            let have: Vec<FeaturePermission> = crate::client::decode(
                &format!("GET /{path}"),
                v.get("featurePermissions").cloned().unwrap_or(json!([])),
            )?;
            let current = |code: &str| {
                have.iter()
                    .find(|p| p.code == code)
                    .and_then(|p| p.access.clone())
                    .unwrap_or_else(|| "none".into())
            };
            let mut wanted: Vec<(String, String)> = wanted_permissions
                .iter()
                .map(|(c, a)| (c.to_string(), a.to_string()))
                .collect();
            // Anything else granted is more than migration needs.
            for p in &have {
                let granted = p.access.as_deref().is_some_and(|a| a != "none");
                if granted && !wanted_permissions.iter().any(|(c, _)| *c == p.code) {
                    wanted.push((p.code.clone(), "none".into()));
                }
            }
            for (code, access) in wanted {
                let now = current(&code);
                if now == access {
                    continue;
                }
                let body = json!({"permissionCode": code, "access": access});
                let call = format!("PUT /api/roles/{}/update-permission", r.id);
                rep.changes.push(change(
                    &call,
                    format!("set {code} from {now} to {access}"),
                    body.clone(),
                ));
                if !req.dry_run {
                    c.put(&format!("api/roles/{}/update-permission", r.id), &body)
                        .await?;
                }
            }
        }
    }

    // The service user.
    let users: Vec<UserRef> = c
        .list_all(
            "api/users",
            "users",
            &[("phrase", req.service_user.clone())],
        )
        .await?;
    let user = users.into_iter().find(|u| u.username == req.service_user);
    let role_ref = json!([{"id": rep.role_id.unwrap_or(0)}]);
    match user {
        None => {
            let body = |password: &str| {
                json!({"user": {
                    "username": req.service_user,
                    "email": req.email,
                    "firstName": "Ferry",
                    "lastName": "Migration",
                    "password": password,
                    "roles": role_ref,
                    "receiveNotifications": false,
                }})
            };
            rep.changes.push(change(
                "POST /api/users",
                format!("create service user {} with role {ROLE}", req.service_user),
                body("<redacted>"),
            ));
            if !req.dry_run {
                let v = c.post("api/users", &body(&req.password)).await?;
                rep.user_id = v.pointer("/user/id").and_then(Value::as_i64);
                rep.password_set = true;
            }
        }
        Some(u) => {
            rep.user_id = Some(u.id);
            let bound_only = u.roles.len() == 1 && Some(u.roles[0].id) == rep.role_id;
            let mut user = serde_json::Map::new();
            let mut what = vec![];
            if !bound_only {
                user.insert("roles".into(), role_ref.clone());
                what.push(format!("bind to role {ROLE} only"));
            }
            if req.set_email && u.email.as_deref() != Some(req.email.as_str()) {
                user.insert("email".into(), json!(req.email));
                what.push(format!(
                    "e-mail {} -> {}",
                    u.email.as_deref().unwrap_or("none"),
                    req.email
                ));
            }
            if req.reset_password {
                user.insert("password".into(), json!(req.password));
                what.push("set a new password (the appliance holds none for it)".into());
            }
            if !user.is_empty() {
                let call = format!("PUT /api/users/{}", u.id);
                let mut shown = user.clone();
                if shown.contains_key("password") {
                    shown.insert("password".into(), json!("<redacted>"));
                }
                rep.changes.push(change(
                    &call,
                    format!("service user {}: {}", u.username, what.join(", ")),
                    json!({ "user": shown }),
                ));
                if !req.dry_run {
                    c.put(&format!("api/users/{}", u.id), &json!({ "user": user }))
                        .await?;
                    rep.password_set = req.reset_password;
                }
            }
        }
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e_mail_addresses_a_manager_accepts() {
        assert!(check_email("ferry@example.com").is_ok());
        assert!(check_email("ferry-migration@vme.corp.example").is_ok());
        for bad in [
            "ferry",
            "@example.com",
            "ferry@localhost",
            "a@b@c.d",
            "a b@c.d",
            "a@.d",
            "a@c.",
        ] {
            assert!(check_email(bad).is_err(), "{bad}");
        }
        assert!(check_email("ferry-migration@localhost")
            .unwrap_err()
            .contains("has no dot"));
    }

    #[test]
    fn the_default_address_comes_from_the_managers_host_name() {
        assert_eq!(
            default_email("https://vme.corp.example:8443/").as_deref(),
            Some("ferry-migration@vme.corp.example")
        );
        assert_eq!(default_email("https://10.0.0.5"), None);
        assert_eq!(default_email("http://127.0.0.1:4000"), None);
        assert_eq!(default_email("https://[::1]/"), None);
        assert_eq!(default_email("https://vme-manager/"), None);
    }
}

#[cfg(test)]
mod permission_tests {
    use super::*;

    #[test]
    fn the_role_holds_each_permission_its_calls_need_once_at_the_highest_access() {
        let p = permissions();
        for (call, code, access) in CALLS {
            let have = p.iter().find(|(c, _)| c == code).map(|(_, a)| *a);
            assert!(
                have == Some("full") || have == Some(*access),
                "{call}: {code} {access}, role has {have:?}"
            );
        }
        let mut codes: Vec<_> = p.iter().map(|(c, _)| *c).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), p.len(), "each code once");
        assert!(p.contains(&("library-templates", "read")));
        assert!(p.contains(&("snapshots", "full")));
    }
}
