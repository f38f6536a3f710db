//! Ferry's domain: what is migrated (inventory), how (profiles), in which waves (move
//! groups) and where each migration stands (the state machine).
//!
//! Invariant: no I/O here — no SQL, no HTTP, no files, no clock. Times are passed in as
//! Unix milliseconds by the caller.

pub mod cron;
pub mod entities;
pub mod state;

pub use cron::{CronError, CronSchedule};
pub use entities::*;
pub use state::{
    allowed_commands, transition, Command, Effect, Input, Refusal, State, Status, Step, UatVerdict,
};
