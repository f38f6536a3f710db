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

use handlers::Effect;
pub use handlers::{Image, Instance, Role, State, User, Volume};
use std::path::PathBuf;

/// How the double boots an instance's root volume as a real QEMU guest. Real VME boots
/// the disk's own boot loader; test guests without one are booted from this kernel.
#[derive(Debug, Clone)]
pub struct Boot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel command line; `{ip}` becomes the first interface's static address.
    pub append: String,
    /// Every instance's interfaces are taps on this network.
    pub network: ferry_net::Network,
    pub memory_mib: u32,
}

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
    /// Answers that fail the document only because of a defect in the document itself
    /// (see [`KNOWN_DEFECTS`]).
    pub tolerated: Vec<String>,
}

/// Defects of the API document (8.1.2) that no correct answer can avoid, as
/// (operationId, text of the violation, why). Only answers are ever excused, never requests.
pub const KNOWN_DEFECTS: &[(&str, &str, &str)] = &[
    (
        "addInstance",
        "more than one of the schemas listed in the 'oneOf'",
        "the 200 answer is oneOf instanceCreateSuccess / successError, and successError accepts any object, so every successful answer matches both",
    ),
    (
        "resizeInstance",
        "more than one of the schemas listed in the 'oneOf'",
        "the 200 answer is oneOf instanceUpdateSuccess / successError, and successError accepts any object, so every successful answer matches both",
    ),
];

fn known_defect(operation: Option<&str>, violation: &str) -> Option<&'static str> {
    KNOWN_DEFECTS
        .iter()
        .find(|(op, text, _)| Some(*op) == operation && violation.contains(text))
        .map(|(_, _, why)| *why)
}

struct Shared {
    spec: Arc<Spec>,
    state: Mutex<State>,
    stats: Mutex<Stats>,
    faults: Mutex<Vec<Fault>>,
    boot: Mutex<Option<Boot>>,
    data_dir: PathBuf,
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
        // Instances are detached QEMU processes: end every one still on disk (deleted
        // ones too, whose clean-up may not have run), with the double.
        let ids: Vec<i64> = std::fs::read_dir(&self.shared.data_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("instance-")?
                    .parse()
                    .ok()
            })
            .collect();
        for id in ids {
            halt_now(&self.shared, id);
        }
        let _ = std::fs::remove_dir_all(&self.shared.data_dir);
    }
}

impl Double {
    /// Starts on a free loopback port with administrator `admin_user` / `admin_password`.
    pub async fn start(spec: Arc<Spec>, admin_user: &str, admin_password: &str) -> Double {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let data_dir = std::env::temp_dir().join(format!(
            "ferry-morpheus-double-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir).expect("double data dir");
        let mut state = State::seeded(admin_user, admin_password);
        state.data_dir = data_dir.clone();
        let shared = Arc::new(Shared {
            spec,
            state: Mutex::new(state),
            stats: Mutex::new(Stats::default()),
            faults: Mutex::new(vec![]),
            boot: Mutex::new(None),
            data_dir,
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

    /// Every call a non-administrator made, with the permission the manager checked for
    /// it: `("METHOD template", code)`.
    pub fn service_calls(&self) -> Vec<(String, String)> {
        let st = self.state();
        let mut out: Vec<(String, String)> = st
            .permission_checks
            .iter()
            .map(|(_, call, code)| (call.clone(), code.clone()))
            .collect();
        out.dedup();
        out
    }

    /// Inspect or change the manager's state.
    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().expect("state")
    }

    /// Boot instances as QEMU guests from now on.
    pub fn set_boot(&self, b: Boot) {
        *self.shared.boot.lock().expect("boot") = Some(b);
    }

    /// Boot no more instances as QEMU guests: they only change status, as for a disk
    /// that is not meant to boot.
    pub fn clear_boot(&self) {
        *self.shared.boot.lock().expect("boot") = None;
    }

    /// The QEMU run directory of an instance (serial.log is there).
    pub fn run_dir(&self, instance: i64) -> PathBuf {
        run_dir(&self.shared, instance)
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
    let effects: Vec<Effect> = std::mem::take(&mut s.state.lock().expect("state").effects);
    for e in effects {
        let s = s.clone();
        tokio::spawn(async move {
            match e {
                Effect::Boot(id) => boot(&s, id).await,
                Effect::Halt(id) => {
                    let s2 = s.clone();
                    let _ = tokio::task::spawn_blocking(move || halt_now(&s2, id)).await;
                }
                Effect::Purge(id) => {
                    let s2 = s.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        halt_now(&s2, id);
                        let _ = std::fs::remove_dir_all(s2.data_dir.join(format!("instance-{id}")));
                    })
                    .await;
                }
            }
        });
    }
    let out = serde_json::to_vec(&answer).unwrap_or_default();
    {
        let mut st = s.stats.lock().expect("stats");
        st.responses += 1;
        if let Err(v) = s
            .spec
            .validate_response(&op, status, Some("application/json"), &out)
        {
            let text = v.to_string();
            match known_defect(op.operation_id.as_deref(), &text) {
                Some(why) => st.tolerated.push(format!("answer to {call}: {why}")),
                None => st
                    .violations
                    .push(format!("answer to {call} ({status}): {text}")),
            }
        }
    }
    axum::response::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(out))
        .expect("response")
}

fn run_dir(s: &Shared, id: i64) -> PathBuf {
    s.data_dir.join(format!("instance-{id}")).join("run")
}

fn set_status(s: &Shared, id: i64, status: &str) {
    if let Some(i) = s
        .state
        .lock()
        .expect("state")
        .instances
        .iter_mut()
        .find(|i| i.id == id)
    {
        i.status = status.into();
    }
}

/// Starts an instance: a QEMU guest when a boot configuration is set, else only its status.
async fn boot(s: &Shared, id: i64) {
    let inst = s
        .state
        .lock()
        .expect("state")
        .instances
        .iter()
        .find(|i| i.id == id)
        .cloned();
    let Some(inst) = inst else { return };
    let cfg = s.boot.lock().expect("boot").clone();
    let Some(cfg) = cfg else {
        set_status(s, id, "running");
        return;
    };
    let rd = run_dir(s, id);
    if ferry_qemu::Vm::attach(&rd).is_ok() {
        set_status(s, id, "running");
        return;
    }
    let tap_name = format!("fmd{id}");
    let net = cfg.network.clone();
    let tap = tokio::task::spawn_blocking(move || net.add_tap(&tap_name)).await;
    let tap = match tap {
        Ok(Ok(t)) => t,
        other => {
            tracing::error!(instance = id, "tap for the instance: {other:?}");
            set_status(s, id, "failed");
            return;
        }
    };
    let accel = ferry_qemu::detect_accel().await;
    let mut spec = ferry_qemu::VmSpec::new(&format!("vme-{}", inst.name), &rd, accel);
    spec.memory_mib = cfg.memory_mib;
    // Two vCPUs: a target worker verifies and decompresses on several threads, and
    // under software emulation each vCPU is a host thread.
    spec.cpus = 2;
    spec.kernel = Some(cfg.kernel.clone());
    spec.initrd = Some(cfg.initrd.clone());
    let ip = inst
        .nics
        .first()
        .and_then(|(_, ip)| ip.clone())
        .unwrap_or_else(|| "0.0.0.0".into());
    spec.append = Some(cfg.append.replace("{ip}", &ip));
    spec.disks = inst
        .volumes
        .iter()
        .enumerate()
        .map(|(k, v)| ferry_qemu::VmDisk {
            path: v.path.clone(),
            format: "qcow2".into(),
            node_name: format!("vol{k}"),
            read_only: false,
        })
        .collect();
    spec.nics = vec![ferry_qemu::VmNic {
        backend: ferry_qemu::NicBackend::Tap {
            ifname: tap.ifname.clone(),
        },
        mac: None,
    }];
    spec.netns = Some(cfg.network.namespace.clone());
    match ferry_qemu::Vm::launch(&spec).await {
        Ok(_) => set_status(s, id, "running"),
        Err(e) => {
            tracing::error!(instance = id, "booting the instance: {e}");
            set_status(s, id, "failed");
        }
    }
}

/// Stops an instance's QEMU guest, if any (blocking).
fn halt_now(s: &Shared, id: i64) {
    let rd = run_dir(s, id);
    if let Ok(vm) = ferry_qemu::Vm::attach(&rd) {
        // Its own thread and runtime: this runs from Drop too, possibly inside a runtime.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = rt.block_on(vm.kill());
            }
        })
        .join();
    }
    if let Some(b) = s.boot.lock().expect("boot").clone() {
        let _ = b.network.remove_tap(&format!("fmd{id}"));
    }
    set_status(s, id, "stopped");
}
