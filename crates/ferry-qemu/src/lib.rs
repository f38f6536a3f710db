//! Drives QEMU for Ferry: the agentless KVM/QEMU source and the local target.
//!
//! - [`qmp`]: the QMP client (commands, events, typed errors);
//! - [`qga`]: the guest agent client (exec, fsfreeze, shutdown, file read);
//! - [`accel`]: KVM where it really works, TCG otherwise;
//! - [`vm`]: VMs that run detached from their caller and can be attached again;
//! - [`view`]: point-in-time NBD views of a running disk with dirty-bitmap deltas;
//! - [`testbed`]: the test guest image, built by the repository's recipe and cached.

pub mod accel;
pub mod qga;
pub mod qmp;
pub mod testbed;
pub mod view;
pub mod vm;

pub use accel::{detect as detect_accel, Accel, AccelVerdict, DetectOptions};
pub use qga::{ExecResult, Qga, QgaError, ShutdownMode};
pub use qmp::{BlockInfo, BlockNode, DirtyBitmap, Qmp, QmpError, QmpEvent, VmStatus};
pub use view::{cleanup_stale, View, ViewError};
pub use vm::{Hardware, NicBackend, PowerdownOutcome, Vm, VmDisk, VmError, VmNic, VmSpec};
