//! The HTTP side: login, bearer tokens renewed on expiry, retries with backoff, error
//! mapping, pagination.

use crate::error::MorpheusError;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::Mutex;

/// The OAuth client Morpheus gives API users (`morph-cli` is its own CLI's).
pub const CLIENT_ID: &str = "morph-api";
const ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// How to reach a manager.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `https://vme.example.com` (a path prefix is kept).
    pub url: String,
    /// Extra CA certificates (PEM) to trust, for a manager with a private CA.
    pub ca_bundle: Option<PathBuf>,
    /// Skip certificate verification. Only for a lab: logged as a warning at every start.
    pub insecure: bool,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl ClientOptions {
    pub fn new(url: impl Into<String>) -> Self {
        ClientOptions {
            url: url.into(),
            ca_bundle: None,
            insecure: false,
            timeout: Duration::from_secs(60),
        }
    }
}

/// Login secrets; never printed.
#[derive(Clone)]
pub struct Login {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
}

#[derive(Default)]
struct Session {
    access: Option<String>,
    refresh: Option<String>,
}

/// A logged-in client. Cheap to share behind an `Arc`.
pub struct Client {
    http: reqwest::Client,
    base: url::Url,
    login: Login,
    session: Mutex<Session>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.base.as_str())
            .field("user", &self.login.username)
            .finish_non_exhaustive()
    }
}

/// The `msg` (or `error_description`, or `error`) of an error answer.
fn api_message(body: &str) -> (String, Vec<(String, String)>) {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        let t = body.trim();
        return (
            if t.is_empty() {
                "no message".into()
            } else {
                t.chars().take(300).collect()
            },
            vec![],
        );
    };
    let msg = ["msg", "error_description", "message", "error"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str))
        .unwrap_or("no message")
        .to_string();
    let errors = v
        .get("errors")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, e)| (k.clone(), e.as_str().map_or(e.to_string(), str::to_string)))
                .collect()
        })
        .unwrap_or_default();
    (msg, errors)
}

fn transport_error(call: &str, url: &url::Url, e: &reqwest::Error) -> MorpheusError {
    let mut why = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        why = format!("{why}: {s}");
        src = s.source();
    }
    let lower = why.to_lowercase();
    if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
        return MorpheusError::Tls {
            call: call.into(),
            why,
        };
    }
    MorpheusError::Unreachable {
        call: call.into(),
        url: url.origin().ascii_serialization(),
        why,
    }
}

impl Client {
    /// A client for `opts.url` that logs in as `login` on first use.
    pub fn new(opts: &ClientOptions, login: Login) -> Result<Client, MorpheusError> {
        let mut base =
            url::Url::parse(opts.url.trim_end_matches('/')).map_err(|e| MorpheusError::BadUrl {
                url: opts.url.clone(),
                why: e.to_string(),
            })?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(MorpheusError::BadUrl {
                url: opts.url.clone(),
                why: "use https://HOST".into(),
            });
        }
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let mut b = reqwest::Client::builder()
            .timeout(opts.timeout)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &opts.ca_bundle {
            let pem = std::fs::read(path).map_err(|e| MorpheusError::CaBundle {
                path: path.display().to_string(),
                why: e.to_string(),
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                MorpheusError::CaBundle {
                    path: path.display().to_string(),
                    why: e.to_string(),
                }
            })?;
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        if opts.insecure {
            tracing::warn!(url = %base, "TLS certificate verification is OFF for this manager (--insecure): anyone on the path can read the credentials");
            b = b.danger_accept_invalid_certs(true);
        }
        let http = b.build().map_err(|e| MorpheusError::Invalid {
            what: format!("HTTP client: {e}"),
        })?;
        Ok(Client {
            http,
            base,
            login,
            session: Mutex::new(Session::default()),
            timeout: opts.timeout,
        })
    }

    pub fn url(&self) -> &str {
        self.base.as_str()
    }

    pub fn username(&self) -> &str {
        &self.login.username
    }

    fn endpoint(&self, path: &str) -> url::Url {
        self.base
            .join(path.trim_start_matches('/'))
            .expect("API paths are relative URLs")
    }

    /// Password grant: a fresh access token (and refresh token).
    pub async fn log_in(&self) -> Result<(), MorpheusError> {
        let form = [
            ("username", self.login.username.as_str()),
            ("password", self.login.password.as_str()),
        ];
        let t = self.token_call("password", &form).await?;
        let mut s = self.session.lock().await;
        s.access = Some(t.access_token);
        s.refresh = t.refresh_token;
        Ok(())
    }

    /// Renews the access token with the refresh token; falls back to logging in again.
    async fn renew(&self) -> Result<(), MorpheusError> {
        let refresh = self.session.lock().await.refresh.clone();
        if let Some(r) = refresh {
            match self
                .token_call("refresh_token", &[("refresh_token", r.as_str())])
                .await
            {
                Ok(t) => {
                    let mut s = self.session.lock().await;
                    s.access = Some(t.access_token);
                    s.refresh = t.refresh_token.or(Some(r));
                    tracing::debug!("access token renewed");
                    return Ok(());
                }
                Err(e) => tracing::debug!("refresh refused ({e}); logging in again"),
            }
        }
        self.log_in().await
    }

    async fn token_call(
        &self,
        grant: &str,
        form: &[(&str, &str)],
    ) -> Result<TokenAnswer, MorpheusError> {
        let call = "POST /oauth/token";
        let mut url = self.endpoint("oauth/token");
        url.query_pairs_mut()
            .append_pair("client_id", CLIENT_ID)
            .append_pair("grant_type", grant)
            .append_pair("scope", "write");
        let r = self
            .http
            .post(url.clone())
            .form(form)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    MorpheusError::Timeout {
                        call: call.into(),
                        secs: self.timeout.as_secs(),
                        attempts: 1,
                    }
                } else {
                    transport_error(call, &url, &e)
                }
            })?;
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        match status {
            200..=299 => serde_json::from_str(&body).map_err(|e| MorpheusError::BadAnswer {
                call: call.into(),
                why: format!("token answer: {e}"),
            }),
            400 | 401 | 403 => Err(MorpheusError::BadCredentials {
                call: call.into(),
                msg: api_message(&body).0,
            }),
            s if s >= 500 => Err(MorpheusError::Server {
                call: call.into(),
                status: s,
                msg: api_message(&body).0,
                attempts: 1,
            }),
            s => Err(MorpheusError::Rejected {
                call: call.into(),
                status: s,
                msg: api_message(&body).0,
                errors: vec![],
            }),
        }
    }

    /// One API call with JSON in and out. Retries 5xx answers and timeouts with backoff
    /// (a POST only when nothing reached the manager, so nothing is created twice), and
    /// renews the token once on a 401.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, MorpheusError> {
        let route = path.split('?').next().unwrap_or(path);
        let call = format!("{method} /{}", route.trim_start_matches('/'));
        if self.session.lock().await.access.is_none() {
            self.log_in().await?;
        }
        let idempotent = method != reqwest::Method::POST;
        let mut renewed = false;
        let mut attempt = 0;
        let mut backoff = FIRST_BACKOFF;
        loop {
            attempt += 1;
            let token = self.session.lock().await.access.clone().unwrap_or_default();
            let mut url = self.endpoint(path);
            if !query.is_empty() {
                let mut q = url.query_pairs_mut();
                for (k, v) in query {
                    q.append_pair(k, v);
                }
            }
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .bearer_auth(&token);
            if let Some(b) = body {
                req = req.json(b);
            }
            tracing::debug!(%call, attempt, "Morpheus API call");
            let r = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    let retry = attempt < ATTEMPTS && (idempotent || e.is_connect());
                    if retry {
                        tracing::warn!(%call, attempt, "no answer ({e}); retrying in {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                        continue;
                    }
                    if e.is_timeout() {
                        return Err(MorpheusError::Timeout {
                            call,
                            secs: self.timeout.as_secs(),
                            attempts: attempt,
                        });
                    }
                    return Err(transport_error(&call, &url, &e));
                }
            };
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            match status {
                200..=299 => {
                    if text.trim().is_empty() {
                        return Ok(Value::Null);
                    }
                    return serde_json::from_str(&text).map_err(|e| MorpheusError::BadAnswer {
                        call,
                        why: format!("not JSON: {e}"),
                    });
                }
                401 if !renewed => {
                    renewed = true;
                    self.renew().await.map_err(|e| match e {
                        MorpheusError::BadCredentials { msg, .. } => MorpheusError::Unauthorized {
                            call: call.clone(),
                            msg,
                        },
                        other => other,
                    })?;
                    continue;
                }
                s if s >= 500 && attempt < ATTEMPTS && idempotent => {
                    tracing::warn!(%call, status = s, attempt, "manager error; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    continue;
                }
                s => {
                    let (msg, errors) = api_message(&text);
                    return Err(match s {
                        401 => MorpheusError::Unauthorized { call, msg },
                        403 => MorpheusError::Forbidden { call, msg },
                        404 => MorpheusError::NotFound { call, msg },
                        s if s >= 500 => MorpheusError::Server {
                            call,
                            status: s,
                            msg,
                            attempts: attempt,
                        },
                        s => MorpheusError::Rejected {
                            call,
                            status: s,
                            msg,
                            errors,
                        },
                    });
                }
            }
        }
    }

    /// POSTs a file as `application/octet-stream`, streamed from disk (images are
    /// gigabytes). Renews an expired token once (reopening the file); never retried
    /// otherwise: a failed upload is reported and the caller decides. Bytes sent.
    pub async fn upload_file(
        &self,
        path: &str,
        query: &[(&str, String)],
        file: &std::path::Path,
    ) -> Result<u64, MorpheusError> {
        let call = format!("POST /{}", path.trim_start_matches('/'));
        if self.session.lock().await.access.is_none() {
            self.log_in().await?;
        }
        let mut renewed = false;
        loop {
            let f = tokio::fs::File::open(file)
                .await
                .map_err(|e| MorpheusError::Invalid {
                    what: format!("cannot read {}: {e}", file.display()),
                })?;
            let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
            let token = self.session.lock().await.access.clone().unwrap_or_default();
            let mut url = self.endpoint(path);
            {
                let mut q = url.query_pairs_mut();
                for (k, v) in query {
                    q.append_pair(k, v);
                }
            }
            let r = self
                .http
                .post(url.clone())
                .bearer_auth(&token)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .header(reqwest::header::CONTENT_LENGTH, len)
                // Large files take longer than one API call may.
                .timeout(self.timeout.max(Duration::from_secs(3600)))
                .body(reqwest::Body::from(f))
                .send()
                .await
                .map_err(|e| transport_error(&call, &url, &e))?;
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            match status {
                200..=299 => return Ok(len),
                401 if !renewed => {
                    renewed = true;
                    self.renew().await?;
                }
                s => {
                    let (msg, errors) = api_message(&text);
                    return Err(match s {
                        403 => MorpheusError::Forbidden { call, msg },
                        404 => MorpheusError::NotFound { call, msg },
                        s if s >= 500 => MorpheusError::Server {
                            call,
                            status: s,
                            msg,
                            attempts: 1,
                        },
                        s => MorpheusError::Rejected {
                            call,
                            status: s,
                            msg,
                            errors,
                        },
                    });
                }
            }
        }
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, MorpheusError> {
        let v = self.call(reqwest::Method::GET, path, query, None).await?;
        decode(&format!("GET {path}"), v)
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, MorpheusError> {
        self.call(reqwest::Method::POST, path, &[], Some(body))
            .await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<Value, MorpheusError> {
        self.call(reqwest::Method::PUT, path, &[], Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, MorpheusError> {
        self.call(reqwest::Method::DELETE, path, &[], None).await
    }

    /// Every item of a paginated list (`{KEY: [...], "meta": {"total": N}}`), following
    /// `offset`/`max`.
    pub async fn list_all<T: DeserializeOwned>(
        &self,
        path: &str,
        key: &str,
        filter: &[(&str, String)],
    ) -> Result<Vec<T>, MorpheusError> {
        self.list_paged(path, key, filter, Paging::MaxOffset).await
    }

    /// Like [`Client::list_all`] for a list whose operation documents fewer paging
    /// parameters: only what the API document lists for it is sent.
    pub async fn list_paged<T: DeserializeOwned>(
        &self,
        path: &str,
        key: &str,
        filter: &[(&str, String)],
        paging: Paging,
    ) -> Result<Vec<T>, MorpheusError> {
        const PAGE: usize = 100;
        let mut out: Vec<T> = vec![];
        loop {
            let mut q: Vec<(&str, String)> = filter.to_vec();
            match paging {
                Paging::MaxOffset => {
                    q.push(("max", PAGE.to_string()));
                    q.push(("offset", out.len().to_string()));
                }
                Paging::MaxOnly => q.push(("max", MAX_ONLY.to_string())),
                Paging::None => {}
            }
            let v = self.call(reqwest::Method::GET, path, &q, None).await?;
            let call = format!("GET {path}");
            let items = v
                .get(key)
                .cloned()
                .ok_or_else(|| MorpheusError::BadAnswer {
                    call: call.clone(),
                    why: format!("no '{key}' list in the answer"),
                })?;
            let page: Vec<T> = decode(&call, items)?;
            let n = page.len();
            out.extend(page);
            if paging != Paging::MaxOffset {
                // One answer is all there is: without `offset` the next page cannot be
                // asked for.
                if paging == Paging::MaxOnly && n >= MAX_ONLY {
                    tracing::warn!(%call, n, "the list may be cut at its first {MAX_ONLY} items: the API offers no offset for it");
                }
                return Ok(out);
            }
            let total = v
                .pointer("/meta/total")
                .and_then(Value::as_u64)
                .map(|t| t as usize);
            if n == 0 || n < PAGE || total.is_some_and(|t| out.len() >= t) {
                return Ok(out);
            }
        }
    }
}

/// Which paging parameters a list operation documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paging {
    /// `max` and `offset`: pages of 100 until the list ends.
    MaxOffset,
    /// `max` only (datastores of a cloud): one request for up to [`MAX_ONLY`] items.
    MaxOnly,
    /// Neither (networks): one request, the manager's own page.
    None,
}

/// The `max` of a list that has no `offset`.
pub const MAX_ONLY: usize = 1000;

pub(crate) fn decode<T: DeserializeOwned>(call: &str, v: Value) -> Result<T, MorpheusError> {
    serde_json::from_value(v).map_err(|e| MorpheusError::BadAnswer {
        call: call.into(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_messages_are_quoted() {
        let (m, e) = api_message(
            r#"{"success":false,"msg":"Name must be unique","errors":{"name":"taken"}}"#,
        );
        assert_eq!(m, "Name must be unique");
        assert_eq!(e, vec![("name".to_string(), "taken".to_string())]);
        assert_eq!(
            api_message(r#"{"error":"invalid_grant","error_description":"Bad credentials"}"#).0,
            "Bad credentials"
        );
        assert_eq!(api_message("<html>502</html>").0, "<html>502</html>");
    }

    #[test]
    fn login_debug_hides_the_password() {
        let l = Login {
            username: "admin".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{l:?}").contains("s3cret"));
    }
}
