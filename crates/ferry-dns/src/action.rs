//! The `dns` post-cutover action, the same for every target: point the workload's A
//! record at the new instance (RFC 2136 update signed with TSIG), remembering the old
//! record so a rollback can put it back. Parameters: `server` (HOST:PORT of the primary),
//! `zone`, `name` (default: the workload's name), `address` (default: the workload's
//! address), `ttl` (default 60), `tsig_credential` (a credential holding
//! `algorithm:name:base64secret`).

use crate::{DnsServer, RecordSet, TsigKey};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

/// Why an action failed, and whether trying again may help.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ActionError {
    pub message: String,
    pub retryable: bool,
}

impl ActionError {
    fn transient(message: String) -> ActionError {
        ActionError {
            message,
            retryable: true,
        }
    }
}

/// Looks a credential up by the name a parameter gives (decrypted by the caller).
pub type SecretLookup<'a> = &'a (dyn Fn(&str) -> Option<String> + Send + Sync);

type AResult<T> = Result<T, ActionError>;

fn perm(m: String) -> ActionError {
    ActionError {
        message: format!("dns action: {m}"),
        retryable: false,
    }
}

fn server(params: &BTreeMap<String, String>, secrets: SecretLookup<'_>) -> AResult<DnsServer> {
    let addr: SocketAddr = params
        .get("server")
        .ok_or_else(|| perm("needs server (HOST:PORT of the primary DNS server)".into()))?
        .parse()
        .map_err(|e| perm(format!("server: {e}")))?;
    let zone = crate::parse_name(
        params
            .get("zone")
            .ok_or_else(|| perm("needs zone".into()))?,
    )
    .map_err(|e| perm(e.to_string()))?;
    let mut s = DnsServer::new(addr, zone);
    if let Some(r) = params.get("tsig_credential") {
        let spec = secrets(r).ok_or_else(|| perm(format!("credential '{r}' is not available")))?;
        s = s.with_key(TsigKey::parse(&spec).map_err(|e| perm(format!("credential '{r}': {e}")))?);
    }
    Ok(s)
}

fn record_name(params: &BTreeMap<String, String>, default: &str) -> AResult<crate::Name> {
    let zone = params.get("zone").map(String::as_str).unwrap_or("");
    let name = params.get("name").map(String::as_str).unwrap_or(default);
    let fqdn = if name.ends_with('.') || name.ends_with(zone.trim_end_matches('.')) {
        name.to_string()
    } else {
        format!("{name}.{zone}")
    };
    crate::parse_name(&fqdn).map_err(|e| perm(e.to_string()))
}

/// Runs one `dns` action; returns its undo record.
pub async fn update(
    params: &BTreeMap<String, String>,
    workload: &str,
    ip: Option<&str>,
    secrets: SecretLookup<'_>,
) -> AResult<Value> {
    let s = server(params, secrets)?;
    let name = record_name(params, workload)?;
    let addr: Ipv4Addr = params
        .get("address")
        .map(String::as_str)
        .or(ip)
        .ok_or_else(|| perm("no address given and the workload has no known IPv4 address".into()))?
        .parse()
        .map_err(|e| perm(format!("address: {e}")))?;
    let ttl: u32 = params
        .get("ttl")
        .map(|t| t.parse().map_err(|e| perm(format!("ttl: {e}"))))
        .transpose()?
        .unwrap_or(60);
    let previous = s
        .query_a(&name)
        .await
        .map_err(|e| ActionError::transient(format!("dns action: {e}")))?;
    s.replace_a(&name, &[addr], ttl)
        .await
        .map_err(|e| ActionError::transient(format!("dns action: {e}")))?;
    tracing::info!(%name, %addr, ttl, "DNS record updated");
    Ok(json!({
        "kind": "dns",
        "params": params,
        "name": name.to_string(),
        "previous": {"ttl": previous.ttl, "addrs": previous.addrs},
    }))
}

/// Puts back what `update` replaced.
pub async fn undo(u: &Value, secrets: SecretLookup<'_>) -> AResult<()> {
    let params: BTreeMap<String, String> =
        serde_json::from_value(u["params"].clone()).map_err(|e| perm(e.to_string()))?;
    let s = server(&params, secrets)?;
    let name = crate::parse_name(u["name"].as_str().unwrap_or_default())
        .map_err(|e| perm(e.to_string()))?;
    let addrs: Vec<Ipv4Addr> =
        serde_json::from_value(u["previous"]["addrs"].clone()).unwrap_or_default();
    let prev = RecordSet {
        name: name.clone(),
        ttl: u["previous"]["ttl"].as_u64().unwrap_or(60) as u32,
        addrs,
    };
    s.restore(&prev)
        .await
        .map_err(|e| ActionError::transient(format!("reverting DNS record {name}: {e}")))?;
    tracing::info!(%name, "DNS record reverted");
    Ok(())
}
