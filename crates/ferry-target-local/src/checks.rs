//! Validation checks against an instance: from inside its network (the namespace the
//! instance is attached to) and through its guest agent.

use ferry_adapter::{AResult, AdapterError, CheckPhase, CutoverFacts};
use ferry_model::ValidationCheck;
use ferry_qemu::Vm;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Where checks run: the instance and the namespace of its network.
pub struct Subject<'a> {
    pub vm: &'a Vm,
    pub netns: &'a str,
    /// The instance's address (the workload's first IPv4 address).
    pub ip: Option<&'a str>,
    pub boot_timeout: Duration,
    pub check_timeout: Duration,
}

use ferry_adapter::checks::{param, retry};

impl Subject<'_> {
    fn host(&self, c: &ValidationCheck) -> AResult<String> {
        param(c, "host")
            .or(self.ip)
            .map(str::to_string)
            .ok_or_else(|| {
                AdapterError::permanent(format!(
                    "{} check: no host given and the workload has no known IP address",
                    c.kind
                ))
            })
    }

    /// Waits until the guest agent answers: the instance booted.
    pub async fn wait_boot(&self) -> AResult<Duration> {
        let t = Instant::now();
        retry(self.boot_timeout, || async {
            let mut q = self
                .vm
                .qga(Duration::from_secs(5))
                .await
                .map_err(|e| AdapterError::transient(e.to_string()))?;
            q.ping()
                .await
                .map_err(|e| AdapterError::transient(e.to_string()))
        })
        .await
        .map_err(|e| {
            AdapterError::transient(format!(
                "instance '{}' did not boot within {} s (its guest agent never answered: {}); see {}",
                self.vm.name(),
                self.boot_timeout.as_secs(),
                e.message,
                self.vm.serial_log().display()
            ))
        })?;
        Ok(t.elapsed())
    }

    async fn shell(&self, command: &str) -> AResult<(i32, String, String)> {
        let mut q = self
            .vm
            .qga(Duration::from_secs(10))
            .await
            .map_err(|e| AdapterError::transient(e.to_string()))?;
        let r = q
            .shell(command, Duration::from_secs(60))
            .await
            .map_err(|e| AdapterError::transient(e.to_string()))?;
        Ok((r.exit_code, r.stdout_lossy(), r.stderr_lossy()))
    }

    /// Waits (up to the check timeout) until `addr` (`10.0.0.5/24`) is on an interface
    /// of the instance that is up. `addr` comes from the guest's own configuration, so it
    /// is checked for shape before it reaches a command line.
    pub async fn address_is_up(&self, addr: &str) -> AResult<()> {
        let ip = addr.split('/').next().unwrap_or("");
        let ip: std::net::IpAddr = ip.parse().map_err(|_| {
            AdapterError::permanent(format!("static address {addr:?} is not an IP address"))
        })?;
        let cmd = format!("ip -o addr show up | grep -qF ' {ip}/'");
        retry(self.check_timeout, || async {
            match self.shell(&cmd).await? {
                (0, ..) => Ok(()),
                _ => Err(AdapterError::transient(format!(
                    "the source's static address {addr} is not up on instance '{}' (a NIC that lost its name after conversion keeps no address)",
                    self.vm.name()
                ))),
            }
        })
        .await
    }

    /// Runs one check; `Ok(None)` when it does not apply in this phase.
    pub async fn run(
        &self,
        index: usize,
        c: &ValidationCheck,
        phase: CheckPhase,
        facts: &CutoverFacts,
    ) -> AResult<Option<String>> {
        let fail = |m: String| AdapterError::permanent(format!("check {index} ({}): {m}", c.kind));
        // `phase: uat|final` limits a check to one of the two (e.g. "the test instance
        // cannot reach production" only means something in UAT).
        match (param(c, "phase"), phase) {
            (None, _) | (Some("uat"), CheckPhase::Uat) | (Some("final"), CheckPhase::Final) => {}
            (Some("uat" | "final"), _) => return Ok(None),
            (Some(other), _) => {
                return Err(fail(format!("phase must be uat or final, not '{other}'")))
            }
        }
        match c.kind.as_str() {
            "boot" => Ok(Some("guest agent answers".into())),
            "tcp" => {
                let port = param(c, "port").unwrap_or("22");
                let addr: SocketAddr = format!("{}:{port}", self.host(c)?)
                    .parse()
                    .map_err(|e| fail(format!("bad address: {e}")))?;
                let ns = self.netns.to_string();
                let took = retry(self.check_timeout, || {
                    let ns = ns.clone();
                    async move {
                        ferry_net::tcp_check_async(&ns, addr, Duration::from_secs(3))
                            .await
                            .map_err(|e| AdapterError::transient(e.to_string()))
                    }
                })
                .await
                .map_err(|e| fail(format!("{addr} does not accept connections: {}", e.message)))?;
                Ok(Some(format!(
                    "{addr} accepts connections ({} ms)",
                    took.as_millis()
                )))
            }
            "http" => {
                let url = match param(c, "url") {
                    Some(u) => u.to_string(),
                    None => format!(
                        "http://{}:{}{}",
                        self.host(c)?,
                        param(c, "port").unwrap_or("80"),
                        param(c, "path").unwrap_or("/")
                    ),
                };
                let want: u16 = param(c, "status").unwrap_or("200").parse().unwrap_or(200);
                let contains = param(c, "contains").map(str::to_string);
                let ns = self.netns.to_string();
                let body = retry(self.check_timeout, || {
                    let (ns, url, contains) = (ns.clone(), url.clone(), contains.clone());
                    async move {
                        let r = ferry_net::http_get_async(&ns, &url, Duration::from_secs(5))
                            .await
                            .map_err(|e| AdapterError::transient(e.to_string()))?;
                        if r.status != want {
                            return Err(AdapterError::transient(format!(
                                "status {} (expected {want})",
                                r.status
                            )));
                        }
                        let body = r.body_text();
                        if let Some(s) = &contains {
                            if !body.contains(s.as_str()) {
                                return Err(AdapterError::transient(format!(
                                    "the body does not contain {s:?}"
                                )));
                            }
                        }
                        Ok(body)
                    }
                })
                .await
                .map_err(|e| fail(format!("GET {url}: {}", e.message)))?;
                Ok(Some(format!("GET {url}: {want}, {} bytes", body.len())))
            }
            "command" => {
                let cmd = param(c, "command").ok_or_else(|| fail("needs a command".into()))?;
                let expect = param(c, "expect");
                let out = retry(self.check_timeout, || async {
                    let (code, out, err) = self.shell(cmd).await?;
                    if code != 0 {
                        return Err(AdapterError::transient(format!(
                            "exit status {code}: {}",
                            err.trim()
                        )));
                    }
                    if let Some(e) = expect {
                        if !out.contains(e) {
                            return Err(AdapterError::transient(format!(
                                "output {:?} does not contain {e:?}",
                                out.trim()
                            )));
                        }
                    }
                    Ok(out)
                })
                .await
                .map_err(|e| fail(format!("`{cmd}` in the instance: {}", e.message)))?;
                Ok(Some(format!("`{cmd}`: {}", out.trim())))
            }
            "data" => {
                // A data check compares what the source held when its services stopped
                // with what the target holds: only meaningful after the final delta.
                let (Some(verify), CheckPhase::Final) = (param(c, "verify"), phase) else {
                    return Ok(None);
                };
                let value = facts.captured.get(&index).ok_or_else(|| {
                    fail("nothing was captured on the source when its services stopped".into())
                })?;
                let cmd = verify.replace("{value}", value);
                let (code, out, err) = self.shell(&cmd).await?;
                if code != 0 {
                    return Err(fail(format!(
                        "the target does not hold what the source had ({value}): `{cmd}` exited {code}: {} {}",
                        out.trim(),
                        err.trim()
                    )));
                }
                Ok(Some(format!("source had {value}; `{cmd}`: {}", out.trim())))
            }
            other => Err(fail(format!("unknown check kind '{other}'"))),
        }
    }
}
