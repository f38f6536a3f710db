//! Tasks: the long-running calls (`…_Task`) answer with a Task whose `info` tells its
//! state, progress, result and error.

use std::time::{Duration, Instant};

use crate::props::{prop, prop_text};
use crate::soap::{child, parse, returnval, Client, XSI};
use crate::VsphereError;

impl Client {
    /// Calls a `…_Task` method and waits for its task; the task's result (e.g. the
    /// moref a CreateSnapshot_Task made), if any.
    pub(crate) async fn run_task(
        &self,
        method: &str,
        inner: &str,
        timeout: Duration,
    ) -> Result<Option<String>, VsphereError> {
        let out = self.call(method, inner).await?;
        let doc = parse(method, &out)?;
        let task = returnval(&doc, method)?
            .text()
            .unwrap_or_default()
            .to_string();
        self.wait_task(method, &task, timeout).await
    }

    /// Waits until `task` succeeds or fails, at most `timeout`.
    pub(crate) async fn wait_task(
        &self,
        method: &str,
        task: &str,
        timeout: Duration,
    ) -> Result<Option<String>, VsphereError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let out = self
                .properties("Task", task, &["info.state", "info.error", "info.result"])
                .await?;
            let doc = parse(method, &out)?;
            match prop_text(&doc, "info.state").as_deref() {
                Some("success") => return Ok(prop_text(&doc, "info.result")),
                Some("error") => {
                    let e = prop(&doc, "info.error");
                    let fault = e
                        .and_then(|e| child(e, "fault"))
                        .and_then(|f| f.attribute((XSI, "type")))
                        .unwrap_or("unknown")
                        .to_string();
                    let msg = e
                        .and_then(|e| child(e, "localizedMessage"))
                        .and_then(|m| m.text())
                        .filter(|m| !m.is_empty())
                        .unwrap_or("no message")
                        .to_string();
                    return Err(VsphereError::Fault {
                        call: method.into(),
                        fault,
                        msg,
                    });
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(VsphereError::TaskTimeout {
                    call: method.into(),
                    task: task.into(),
                    secs: timeout.as_secs(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}
