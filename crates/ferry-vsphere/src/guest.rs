//! Guest operations through VMware Tools: running a program in the guest and waiting for
//! its exit code (how cutover stops services without an agent of Ferry's own).

use std::time::{Duration, Instant};

use crate::props::prop_text;
use crate::soap::{child, esc, parse, returnval, this, Client, VIM};
use crate::VsphereError;

/// A guest account for guest operations.
#[derive(Clone)]
pub struct GuestAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for GuestAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestAuth")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl GuestAuth {
    fn xml(&self) -> String {
        format!(
            "<auth xsi:type=\"NamePasswordAuthentication\"><interactiveSession>false</interactiveSession><username>{}</username><password>{}</password></auth>",
            esc(&self.username),
            esc(&self.password)
        )
    }
}

impl Client {
    async fn process_manager(&self) -> Result<String, VsphereError> {
        let out = self
            .properties(
                "GuestOperationsManager",
                &self.content.guest_operations_manager,
                &["processManager"],
            )
            .await?;
        let doc = parse("RetrievePropertiesEx", &out)?;
        prop_text(&doc, "processManager").ok_or_else(|| VsphereError::BadAnswer {
            call: "RetrievePropertiesEx".into(),
            why: "vCenter has no guest process manager".into(),
        })
    }

    /// Runs `program arguments` in the guest and waits (at most `timeout`) for its exit
    /// code.
    pub async fn run_in_guest(
        &self,
        vm: &str,
        auth: &GuestAuth,
        program: &str,
        arguments: &str,
        timeout: Duration,
    ) -> Result<i32, VsphereError> {
        let pm = self.process_manager().await?;
        let body = format!(
            "{}<vm type=\"VirtualMachine\">{}</vm>{}<spec xsi:type=\"GuestProgramSpec\"><programPath>{}</programPath><arguments>{}</arguments></spec>",
            this("GuestProcessManager", &pm),
            esc(vm),
            auth.xml(),
            esc(program),
            esc(arguments)
        );
        let out = self.call("StartProgramInGuest", &body).await?;
        let doc = parse("StartProgramInGuest", &out)?;
        let pid = returnval(&doc, "StartProgramInGuest")?
            .text()
            .unwrap_or_default()
            .trim()
            .to_string();
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(100);
        loop {
            let body = format!(
                "{}<vm type=\"VirtualMachine\">{}</vm>{}<pids>{}</pids>",
                this("GuestProcessManager", &pm),
                esc(vm),
                auth.xml(),
                esc(&pid)
            );
            let out = self.call("ListProcessesInGuest", &body).await?;
            let doc = parse("ListProcessesInGuest", &out)?;
            let info = doc
                .descendants()
                .filter(|n| n.has_tag_name((VIM, "returnval")))
                .find(|r| {
                    child(*r, "pid").and_then(|p| p.text()).map(str::trim) == Some(pid.as_str())
                });
            if let Some(info) = info {
                if child(info, "endTime").is_some() {
                    return Ok(child(info, "exitCode")
                        .and_then(|c| c.text())
                        .and_then(|c| c.trim().parse().ok())
                        .unwrap_or(0));
                }
            }
            if Instant::now() >= deadline {
                return Err(VsphereError::Invalid {
                    what: format!(
                        "`{program} {arguments}` in the guest did not finish within {} s",
                        timeout.as_secs()
                    ),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}
