//! The target's settings (`config` of a `local` target).

use ferry_adapter::{AResult, AdapterError};
use serde::Deserialize;
use std::path::PathBuf;

/// `{"path": DIR, "kernel": …, "initrd": …, "append": "… ferry.ip={ip}/24", …}`.
///
/// Instances boot the given kernel directly (the guest images Ferry's test bed builds have
/// no boot loader); `{ip}` in `append` becomes the workload's first IPv4 address, so the
/// instance comes up with the source's address.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Where disks and instance run directories live.
    pub path: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub append: Option<String>,
    #[serde(default = "memory")]
    pub memory_mib: u32,
    #[serde(default = "one")]
    pub cpus: u32,
    /// Address of the host side of every network's bridge (gateway), e.g. `10.200.1.1/24`.
    #[serde(default)]
    pub gateway: Option<String>,
    /// Production network (a network namespace) when the workload's NIC names none.
    #[serde(default)]
    pub network: Option<String>,
    /// Seconds an instance may take to boot until its guest agent answers.
    #[serde(default = "boot_timeout")]
    pub boot_timeout_s: u64,
    /// Seconds each validation check is retried for while services come up.
    #[serde(default = "check_timeout")]
    pub check_timeout_s: u64,
}

fn memory() -> u32 {
    512
}
fn one() -> u32 {
    1
}
fn boot_timeout() -> u64 {
    300
}
fn check_timeout() -> u64 {
    120
}

impl LocalConfig {
    pub fn parse(target: &ferry_model::Target) -> AResult<LocalConfig> {
        serde_json::from_value(target.config.clone()).map_err(|e| {
            AdapterError::permanent(format!("local target '{}': bad config: {e}", target.name))
        })
    }
}
