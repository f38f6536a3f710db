//! Cutover on the VM: services stopped with guest operations, the guest shut down through
//! VMware Tools (then powered off if it does not go in time), and powered on for rollback.

use std::time::{Duration, Instant};

use ferry_adapter::{AResult, AdapterError, StepContext, GUEST_PASSWORD, GUEST_USERNAME};
use ferry_vsphere::{Client, GuestAuth, Vm, VsphereError};

use crate::err;

const SERVICE_STOP_TIMEOUT: Duration = Duration::from_secs(180);

fn tools_running(vm: &Vm) -> bool {
    vm.tools.as_deref() == Some("guestToolsRunning")
}

fn auth(ctx: &StepContext, vm: &Vm) -> AResult<GuestAuth> {
    match (ctx.secrets.get(GUEST_USERNAME), ctx.secrets.get(GUEST_PASSWORD)) {
        (Some(u), Some(p)) => Ok(GuestAuth {
            username: u.into(),
            password: p.into(),
        }),
        _ => Err(AdapterError::permanent(format!(
            "no guest account to run commands in VM '{}': create a credential for a guest user and set the source's config.guest_credential_id",
            vm.name
        ))),
    }
}

fn guest_err(vm: &Vm, e: VsphereError) -> AdapterError {
    match &e {
        VsphereError::Fault { fault, .. } if fault == "InvalidGuestLogin" => {
            AdapterError::permanent(format!(
                "VM '{}' refused the guest account ({e}): check the credential in the source's config.guest_credential_id",
                vm.name
            ))
        }
        VsphereError::Fault { fault, .. } if fault == "GuestOperationsUnavailable" => {
            AdapterError::transient(format!(
                "guest operations are unavailable in VM '{}' ({e}): VMware Tools must be running",
                vm.name
            ))
        }
        _ => err(e),
    }
}

/// Runs a command line in the guest; its exit code.
async fn run(c: &Client, vm: &Vm, ctx: &StepContext, program: &str, args: &str) -> AResult<i32> {
    if !tools_running(vm) {
        return Err(AdapterError::permanent(format!(
            "VMware Tools are not running in VM '{}': cannot run `{program} {args}` in it",
            vm.name
        )));
    }
    let auth = auth(ctx, vm)?;
    c.run_in_guest(&vm.moref, &auth, program, args, SERVICE_STOP_TIMEOUT)
        .await
        .map_err(|e| guest_err(vm, e))
}

fn windows(vm: &Vm) -> bool {
    vm.guest_os
        .as_deref()
        .is_some_and(|o| o.to_lowercase().contains("windows"))
}

pub(crate) async fn stop_services(
    c: &Client,
    vm: &Vm,
    ctx: &StepContext,
    services: &[String],
) -> AResult<()> {
    for s in services {
        let (program, args) = if windows(vm) {
            (r"C:\Windows\System32\net.exe", format!("stop \"{s}\""))
        } else {
            ("/usr/bin/systemctl", format!("stop {s}"))
        };
        let code = run(c, vm, ctx, program, &args).await?;
        if code != 0 {
            return Err(AdapterError::permanent(format!(
                "stopping service '{s}' in VM '{}' failed: `{program} {args}` exited with {code}",
                vm.name
            )));
        }
        tracing::info!(vm = %vm.name, service = %s, "service stopped");
    }
    Ok(())
}

/// Guest operations give an exit code, not the output: success is an empty answer.
pub(crate) async fn guest_command(
    c: &Client,
    vm: &Vm,
    ctx: &StepContext,
    command: &str,
) -> AResult<String> {
    let code = if windows(vm) {
        run(
            c,
            vm,
            ctx,
            r"C:\Windows\System32\cmd.exe",
            &format!("/c {command}"),
        )
        .await?
    } else {
        run(
            c,
            vm,
            ctx,
            "/bin/sh",
            &format!("-c '{}'", command.replace('\'', r"'\''")),
        )
        .await?
    };
    if code != 0 {
        return Err(AdapterError::permanent(format!(
            "`{command}` in VM '{}' exited with {code}",
            vm.name
        )));
    }
    Ok(String::new())
}

pub(crate) async fn shutdown(c: &Client, vm: &Vm, ctx: &StepContext) -> AResult<()> {
    let timeout = Duration::from_secs(
        ctx.source
            .as_ref()
            .and_then(|s| s.config.get("shutdown_timeout_s"))
            .and_then(|v| v.as_u64())
            .unwrap_or(300),
    );
    let (state, tools) = c.power_and_tools(&vm.moref).await.map_err(err)?;
    if state == "poweredOff" {
        return Ok(());
    }
    if tools.as_deref() == Some("guestToolsRunning") {
        c.shutdown_guest(&vm.moref).await.map_err(err)?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if c.power_and_tools(&vm.moref).await.map_err(err)?.0 == "poweredOff" {
                tracing::info!(vm = %vm.name, "the guest shut down");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tracing::warn!(vm = %vm.name, secs = timeout.as_secs(), "the guest did not shut down in time: powering it off");
    } else {
        tracing::warn!(vm = %vm.name, "VMware Tools are not running: powering the VM off");
    }
    c.power_off(&vm.moref).await.map_err(err)
}
