//! A test double of a Morpheus (VM Essentials) manager: stateful, in-process, and strict.
//! Every request is checked against the official OpenAPI document before it is
//! handled and every answer after; a mismatch either way is recorded as a violation (and
//! a bad request is answered 400 quoting it), so a test fails on any drift between Ferry
//! and the API it claims to speak.
//!
//! It holds users (an administrator to start with), roles with feature permissions that
//! it enforces, OAuth tokens that can be expired on demand, and a small VME inventory
//! (clouds, groups, clusters, hosts, datastores, networks, plans, instance types,
//! layouts). Faults can be injected per path: error statuses and hangs.

mod handlers;
mod seed;

use ferry_openapi::{Request, Spec};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use handlers::{Role, State, User};

/// A fault the next matching requests get instead of an answer.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer `status` (with a Morpheus error body) `times` times.
    Status {
        method: String,
        path_prefix: String,
        status: u16,
        times: u32,
    },
    /// Hold the request for `delay` before handling it, `times` times.
    Hang {
        path_prefix: String,
        delay: Duration,
        times: u32,
    },
}

/// What the double saw.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Requests checked against the document (all requests).
    pub requests: u64,
    /// Answers checked against the document.
    pub responses: u64,
    /// Every mismatch, request or answer, as `METHOD path: violation`.
    pub violations: Vec<String>,
    /// `METHOD /path` of every request, in order.
    pub calls: Vec<String>,
}

struct Shared {
    spec: Arc<Spec>,
    state: Mutex<State>,
    stats: Mutex<Stats>,
    faults: Mutex<Vec<Fault>>,
}

/// A running double. Stops when dropped.
pub struct Double {
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Double {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Double {
    /// Starts on a free loopback port with administrator `admin_user` / `admin_password`.
    pub async fn start(spec: Arc<Spec>, admin_user: &str, admin_password: &str) -> Double {
        let shared = Arc::new(Shared {
            spec,
            state: Mutex::new(State::seeded(admin_user, admin_password)),
            stats: Mutex::new(Stats::default()),
            faults: Mutex::new(vec![]),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr: SocketAddr = listener.local_addr().expect("local addr");
        let s = shared.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let s = s.clone();
            async move { serve(s, req).await }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Double {
            url: format!("http://{addr}"),
            shared,
            task,
        }
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats.lock().expect("stats").clone()
    }

    /// Inspect or change the manager's state.
    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().expect("state")
    }

    pub fn inject(&self, f: Fault) {
        self.shared.faults.lock().expect("faults").push(f);
    }

    /// Every access token stops working (as after its expiry); refresh tokens still work
    /// unless `refresh_too`.
    pub fn expire_tokens(&self, refresh_too: bool) {
        let mut st = self.state();
        st.tokens.clear();
        if refresh_too {
            st.refresh_tokens.clear();
        }
    }

    /// Panics with every violation; returns how many requests were validated.
    pub fn assert_conforming(&self) -> u64 {
        let s = self.stats();
        assert!(
            s.violations.is_empty(),
            "{} request(s)/answer(s) do not match the Morpheus API document:\n{}",
            s.violations.len(),
            s.violations.join("\n")
        );
        s.requests
    }
}

fn error_body(msg: &str) -> Value {
    serde_json::json!({"success": false, "msg": msg})
}

async fn serve(s: Arc<Shared>, req: axum::extract::Request) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 30)
        .await
        .unwrap_or_default();
    let method = parts.method.as_str().to_string();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header("content-type");
    let authorization = header("authorization");
    let call = format!("{method} {path}");
    {
        let mut st = s.stats.lock().expect("stats");
        st.requests += 1;
        st.calls.push(call.clone());
    }
    let checked = s.spec.validate_request(&Request {
        method: &method,
        path: &path,
        query: query.as_deref(),
        content_type: content_type.as_deref(),
        authorization: authorization.as_deref(),
        body: &bytes,
    });
    let op = match checked {
        Ok(op) => op,
        Err(v) => {
            let text = v.to_string();
            s.stats
                .lock()
                .expect("stats")
                .violations
                .push(format!("request {call}: {text}"));
            return (
                axum::http::StatusCode::BAD_REQUEST,
                axum::Json(error_body(&format!(
                    "request does not match the API document: {text}"
                ))),
            )
                .into_response();
        }
    };

    // Injected faults.
    let mut delay = None;
    let mut fail = None;
    {
        let mut faults = s.faults.lock().expect("faults");
        for f in faults.iter_mut() {
            match f {
                Fault::Status {
                    method: m,
                    path_prefix,
                    status,
                    times,
                } if *times > 0 && *m == method && path.starts_with(path_prefix.as_str()) => {
                    *times -= 1;
                    fail = Some(*status);
                    break;
                }
                Fault::Hang {
                    path_prefix,
                    delay: d,
                    times,
                } if *times > 0 && path.starts_with(path_prefix.as_str()) => {
                    *times -= 1;
                    delay = Some(*d);
                }
                _ => {}
            }
        }
        faults.retain(|f| match f {
            Fault::Status { times, .. } | Fault::Hang { times, .. } => *times > 0,
        });
    }
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let (status, answer) = match fail {
        Some(code) => (code, error_body("injected failure")),
        None => {
            let params: HashMap<String, String> = query
                .as_deref()
                .map(|q| {
                    url::form_urlencoded::parse(q.as_bytes())
                        .into_owned()
                        .collect()
                })
                .unwrap_or_default();
            let mut st = s.state.lock().expect("state");
            handlers::handle(
                &mut st,
                &handlers::Call {
                    method: &method,
                    template: &op.template,
                    path_params: &op.path_params,
                    query: &params,
                    authorization: authorization.as_deref(),
                    content_type: content_type.as_deref(),
                    body: &bytes,
                },
            )
        }
    };
    let out = serde_json::to_vec(&answer).unwrap_or_default();
    {
        let mut st = s.stats.lock().expect("stats");
        st.responses += 1;
        if let Err(v) = s
            .spec
            .validate_response(&op, status, Some("application/json"), &out)
        {
            st.violations
                .push(format!("answer to {call} ({status}): {v}"));
        }
    }
    axum::response::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(out))
        .expect("response")
}
