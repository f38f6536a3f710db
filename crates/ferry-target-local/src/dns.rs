//! The `dns` post-cutover action: point the workload's A record at the instance (RFC 2136
//! update signed with TSIG), remembering the old record so a rollback can put it back.

use ferry_adapter::{AResult, AdapterError, Secrets};
use ferry_dns::{DnsServer, RecordSet, TsigKey};
use ferry_model::PostCutoverAction;
use serde_json::{json, Value};
use std::net::{Ipv4Addr, SocketAddr};

fn perm(m: String) -> AdapterError {
    AdapterError::permanent(format!("dns action: {m}"))
}

fn server(
    params: &std::collections::BTreeMap<String, String>,
    secrets: &Secrets,
) -> AResult<DnsServer> {
    let addr: SocketAddr = params
        .get("server")
        .ok_or_else(|| perm("needs server (HOST:PORT of the primary DNS server)".into()))?
        .parse()
        .map_err(|e| perm(format!("server: {e}")))?;
    let zone = ferry_dns::parse_name(
        params
            .get("zone")
            .ok_or_else(|| perm("needs zone".into()))?,
    )
    .map_err(|e| perm(e.to_string()))?;
    let mut s = DnsServer::new(addr, zone);
    if let Some(r) = params.get("tsig_credential") {
        let spec = secrets
            .get(r)
            .ok_or_else(|| perm(format!("credential '{r}' is not available")))?;
        s = s.with_key(TsigKey::parse(spec).map_err(|e| perm(format!("credential '{r}': {e}")))?);
    }
    Ok(s)
}

fn record_name(
    params: &std::collections::BTreeMap<String, String>,
    default: &str,
) -> AResult<ferry_dns::Name> {
    let zone = params.get("zone").map(String::as_str).unwrap_or("");
    let name = params.get("name").map(String::as_str).unwrap_or(default);
    let fqdn = if name.ends_with('.') || name.ends_with(zone.trim_end_matches('.')) {
        name.to_string()
    } else {
        format!("{name}.{zone}")
    };
    ferry_dns::parse_name(&fqdn).map_err(|e| perm(e.to_string()))
}

/// Runs one `dns` action; returns its undo record.
pub async fn update(
    a: &PostCutoverAction,
    workload: &str,
    ip: Option<&str>,
    secrets: &Secrets,
) -> AResult<Value> {
    let s = server(&a.params, secrets)?;
    let name = record_name(&a.params, workload)?;
    let addr: Ipv4Addr = a
        .params
        .get("address")
        .map(String::as_str)
        .or(ip)
        .ok_or_else(|| perm("no address given and the workload has no known IPv4 address".into()))?
        .parse()
        .map_err(|e| perm(format!("address: {e}")))?;
    let ttl: u32 = a
        .params
        .get("ttl")
        .map(|t| t.parse().map_err(|e| perm(format!("ttl: {e}"))))
        .transpose()?
        .unwrap_or(60);
    let previous = s
        .query_a(&name)
        .await
        .map_err(|e| AdapterError::transient(format!("dns action: {e}")))?;
    s.replace_a(&name, &[addr], ttl)
        .await
        .map_err(|e| AdapterError::transient(format!("dns action: {e}")))?;
    tracing::info!(%name, %addr, ttl, "DNS record updated");
    Ok(json!({
        "kind": "dns",
        "params": a.params,
        "name": name.to_string(),
        "previous": {"ttl": previous.ttl, "addrs": previous.addrs},
    }))
}

/// Puts back what `update` replaced.
pub async fn undo(u: &Value, secrets: &Secrets) -> AResult<()> {
    let params: std::collections::BTreeMap<String, String> =
        serde_json::from_value(u["params"].clone()).map_err(|e| perm(e.to_string()))?;
    let s = server(&params, secrets)?;
    let name = ferry_dns::parse_name(u["name"].as_str().unwrap_or_default())
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
        .map_err(|e| AdapterError::transient(format!("reverting DNS record {name}: {e}")))?;
    tracing::info!(%name, "DNS record reverted");
    Ok(())
}
