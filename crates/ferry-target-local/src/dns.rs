//! The `dns` post-cutover action (see `ferry_dns::action`), with this crate's errors.

use ferry_adapter::{AResult, AdapterError, Secrets};
use ferry_model::PostCutoverAction;
use serde_json::Value;

fn adapt(e: ferry_dns::action::ActionError) -> AdapterError {
    AdapterError {
        message: e.message,
        retryable: e.retryable,
    }
}

/// Runs one `dns` action; returns its undo record.
pub async fn update(
    a: &PostCutoverAction,
    workload: &str,
    ip: Option<&str>,
    secrets: &Secrets,
) -> AResult<Value> {
    let lookup = |r: &str| secrets.get(r).map(str::to_string);
    ferry_dns::action::update(&a.params, workload, ip, &lookup)
        .await
        .map_err(adapt)
}

/// Puts back what `update` replaced.
pub async fn undo(u: &Value, secrets: &Secrets) -> AResult<()> {
    let lookup = |r: &str| secrets.get(r).map(str::to_string);
    ferry_dns::action::undo(u, &lookup).await.map_err(adapt)
}
