//! What can go wrong talking to a Morpheus manager, each with the call it happened on and
//! what to do about it.

/// An error of one API call. `call` is `METHOD /path` (never the query: it may carry
/// credentials).
#[derive(Debug, thiserror::Error)]
pub enum MorpheusError {
    #[error("{call}: the manager refused the login: {msg} (check the username and password; a sub-tenant user is written TENANT\\username)")]
    BadCredentials { call: String, msg: String },
    #[error(
        "{call}: the session is no longer valid ({msg}) and could not be renewed: log in again"
    )]
    Unauthorized { call: String, msg: String },
    #[error("{call}: forbidden: {msg}. The account lacks a permission this call needs: re-run `ferry target setup-iam` with an administrator to give the ferry-migration role what it needs")]
    Forbidden { call: String, msg: String },
    #[error("{call}: not found: {msg}")]
    NotFound { call: String, msg: String },
    #[error(
        "{call}: the manager rejected the request ({status}): {msg}{}",
        fields(errors)
    )]
    Rejected {
        call: String,
        status: u16,
        msg: String,
        errors: Vec<(String, String)>,
    },
    #[error("{call}: the manager failed ({status}) {attempts} time(s): {msg}; check its health (Administration > Health) and retry")]
    Server {
        call: String,
        status: u16,
        msg: String,
        attempts: u32,
    },
    #[error("{call}: no answer within {secs}s after {attempts} attempt(s): is the manager overloaded or the network slow?")]
    Timeout {
        call: String,
        secs: u64,
        attempts: u32,
    },
    #[error("{call}: cannot reach {url}: {why} (check the URL, DNS and firewall)")]
    Unreachable {
        call: String,
        url: String,
        why: String,
    },
    #[error("{call}: TLS: {why} (set the target's config key ca_bundle to the manager's CA certificate, a PEM file on the appliance, or \"insecure\": true to skip verification; `ferry target setup-iam` also takes --ca-bundle / --insecure)")]
    Tls { call: String, why: String },
    #[error("{call}: the answer is not what the API describes: {why}")]
    BadAnswer { call: String, why: String },
    #[error("{call} did not reach a final state within {secs}s (last status: {status})")]
    Stuck {
        call: String,
        secs: u64,
        status: String,
    },
    #[error("invalid manager URL {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("cannot read the CA bundle {path}: {why}")]
    CaBundle { path: String, why: String },
    #[error("{what}")]
    Invalid { what: String },
    #[error("{done}, then: {source}. Fix that and run `ferry target setup-iam` again: it keeps what was done and goes on")]
    HalfDone {
        done: String,
        source: Box<MorpheusError>,
    },
}

fn fields(errors: &[(String, String)]) -> String {
    if errors.is_empty() {
        return String::new();
    }
    let list: Vec<String> = errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(" [{}]", list.join("; "))
}

impl MorpheusError {
    /// Whether repeating the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            MorpheusError::Server { .. }
                | MorpheusError::Timeout { .. }
                | MorpheusError::Unreachable { .. }
                | MorpheusError::Stuck { .. }
        )
    }
}
