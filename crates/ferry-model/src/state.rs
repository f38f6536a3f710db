//! The migration state machine: a pure function from (status, input) to (status, effects).
//!
//! States at rest wait for a command (`ready`, `synced`, `uat`, `failed`); running states
//! each have exactly one step (a durable job) in flight and advance when that step reports
//! success or failure. Terminal states (`completed`, `rolled_back`, `cancelled`) accept
//! nothing. Every refusal names the current state and the commands allowed in it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// In the inventory with a profile; nothing done yet.
    Onboarded,
    /// Pre-flight checks running (source readable, target reachable, placement valid).
    Preflight,
    /// Pre-flight passed; waiting for the initial sync to be started.
    Ready,
    /// The first full copy of every disk is running.
    InitialSync,
    /// The target holds a complete, consistent sync; waiting for a command or schedule.
    Synced,
    /// A delta sync is running.
    DeltaSync,
    /// The test instance is being booted in the isolated migration network.
    UatStarting,
    /// The test instance is up; validation and user acceptance happen now.
    Uat,
    /// A delta sync is running while the test instance stays up.
    UatSync,
    /// The test instance is being torn down.
    UatStopping,
    /// Cutover: the listed source services are being stopped.
    StoppingServices,
    /// Cutover: the last delta sync is running.
    FinalDelta,
    /// Cutover: the source is being shut down.
    ShuttingDownSource,
    /// Cutover: the source is off; a last delta carries what its shutdown wrote, read
    /// from the powered-off disks, so the target equals the source as it stopped.
    ShutdownDelta,
    /// Cutover: the target is being started on the production network.
    StartingTarget,
    /// Cutover: post-cutover actions (re-IP, DNS, hooks) are running.
    PostCutover,
    /// Cutover: final validation checks are running.
    FinalValidation,
    /// Done: the workload runs on the target.
    Completed,
    /// A step failed after its retries; `retry`, `rollback` (or `cancel` early on) decide.
    Failed,
    /// Rolling back: target artefacts removed, the source restarted if it was shut down.
    RollingBack,
    /// Rolled back: the source is the workload again.
    RolledBack,
    /// Cancelled before cutover.
    Cancelled,
}

impl State {
    pub const ALL: [State; 22] = [
        State::Onboarded,
        State::Preflight,
        State::Ready,
        State::InitialSync,
        State::Synced,
        State::DeltaSync,
        State::UatStarting,
        State::Uat,
        State::UatSync,
        State::UatStopping,
        State::StoppingServices,
        State::FinalDelta,
        State::ShuttingDownSource,
        State::ShutdownDelta,
        State::StartingTarget,
        State::PostCutover,
        State::FinalValidation,
        State::Completed,
        State::Failed,
        State::RollingBack,
        State::RolledBack,
        State::Cancelled,
    ];

    /// The step running in this state, if it is a running state.
    pub fn step(self) -> Option<Step> {
        Some(match self {
            State::Preflight => Step::Preflight,
            State::InitialSync => Step::FullSync,
            State::DeltaSync | State::UatSync => Step::DeltaSync,
            State::UatStarting => Step::StartTestInstance,
            State::UatStopping => Step::StopTestInstance,
            State::StoppingServices => Step::StopServices,
            State::FinalDelta => Step::FinalDelta,
            State::ShuttingDownSource => Step::ShutdownSource,
            State::ShutdownDelta => Step::ShutdownDelta,
            State::StartingTarget => Step::StartTarget,
            State::PostCutover => Step::PostCutover,
            State::FinalValidation => Step::FinalValidation,
            State::RollingBack => Step::Rollback,
            _ => return None,
        })
    }

    pub fn is_running(self) -> bool {
        self.step().is_some()
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Completed | State::RolledBack | State::Cancelled
        )
    }

    /// Part of the cutover sequence (services stopped or later, before completion).
    pub fn is_cutover(self) -> bool {
        matches!(
            self,
            State::StoppingServices
                | State::FinalDelta
                | State::ShuttingDownSource
                | State::ShutdownDelta
                | State::StartingTarget
                | State::PostCutover
                | State::FinalValidation
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Onboarded => "onboarded",
            State::Preflight => "preflight",
            State::Ready => "ready",
            State::InitialSync => "initial_sync",
            State::Synced => "synced",
            State::DeltaSync => "delta_sync",
            State::UatStarting => "uat_starting",
            State::Uat => "uat",
            State::UatSync => "uat_sync",
            State::UatStopping => "uat_stopping",
            State::StoppingServices => "stopping_services",
            State::FinalDelta => "final_delta",
            State::ShuttingDownSource => "shutting_down_source",
            State::ShutdownDelta => "shutdown_delta",
            State::StartingTarget => "starting_target",
            State::PostCutover => "post_cutover",
            State::FinalValidation => "final_validation",
            State::Completed => "completed",
            State::Failed => "failed",
            State::RollingBack => "rolling_back",
            State::RolledBack => "rolled_back",
            State::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.iter().copied().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A unit of durable work: one job in the queue, run through the adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Preflight,
    FullSync,
    DeltaSync,
    StartTestInstance,
    StopTestInstance,
    StopServices,
    FinalDelta,
    ShutdownSource,
    /// The last delta, of what the source's shutdown wrote (its disks read powered off).
    ShutdownDelta,
    StartTarget,
    PostCutover,
    FinalValidation,
    Rollback,
}

impl Step {
    pub const ALL: [Step; 13] = [
        Step::Preflight,
        Step::FullSync,
        Step::DeltaSync,
        Step::StartTestInstance,
        Step::StopTestInstance,
        Step::StopServices,
        Step::FinalDelta,
        Step::ShutdownSource,
        Step::ShutdownDelta,
        Step::StartTarget,
        Step::PostCutover,
        Step::FinalValidation,
        Step::Rollback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Preflight => "preflight",
            Step::FullSync => "full_sync",
            Step::DeltaSync => "delta_sync",
            Step::StartTestInstance => "start_test_instance",
            Step::StopTestInstance => "stop_test_instance",
            Step::StopServices => "stop_services",
            Step::FinalDelta => "final_delta",
            Step::ShutdownSource => "shutdown_source",
            Step::ShutdownDelta => "shutdown_delta",
            Step::StartTarget => "start_target",
            Step::PostCutover => "post_cutover",
            Step::FinalValidation => "final_validation",
            Step::Rollback => "rollback",
        }
    }

    pub fn parse(s: &str) -> Option<Step> {
        Step::ALL.iter().copied().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an operator (or the scheduler) asks of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Run pre-flight checks only (onboarded → ready).
    Preflight,
    /// Pre-flight if needed, then the initial full sync.
    Start,
    /// A delta sync now.
    Sync,
    UatStart,
    UatStop,
    UatPass,
    UatFail,
    Cutover,
    Rollback,
    /// Re-run the step that failed.
    Retry,
    Cancel,
}

impl Command {
    pub const ALL: [Command; 11] = [
        Command::Preflight,
        Command::Start,
        Command::Sync,
        Command::UatStart,
        Command::UatStop,
        Command::UatPass,
        Command::UatFail,
        Command::Cutover,
        Command::Rollback,
        Command::Retry,
        Command::Cancel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Preflight => "preflight",
            Command::Start => "start",
            Command::Sync => "sync",
            Command::UatStart => "uat_start",
            Command::UatStop => "uat_stop",
            Command::UatPass => "uat_pass",
            Command::UatFail => "uat_fail",
            Command::Cutover => "cutover",
            Command::Rollback => "rollback",
            Command::Retry => "retry",
            Command::Cancel => "cancel",
        }
    }

    pub fn parse(s: &str) -> Option<Command> {
        Command::ALL.iter().copied().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of a UAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum UatVerdict {
    Passed,
    Failed,
}

/// Everything the state machine needs to decide; persisted with the migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Status {
    pub state: State,
    /// The running state whose step failed, while `state` is `failed`.
    pub failed_state: Option<State>,
    /// The source has been shut down by the cutover (rollback must restart it).
    pub source_down: bool,
    pub uat_verdict: Option<UatVerdict>,
    /// Cutover is refused until a UAT passed.
    pub require_uat_pass: bool,
    /// Go on to the initial sync after pre-flight passes.
    pub autostart: bool,
    /// Complete syncs so far (full and deltas).
    pub generation: u32,
}

impl Status {
    pub fn new(require_uat_pass: bool) -> Status {
        Status {
            state: State::Onboarded,
            failed_state: None,
            source_down: false,
            uat_verdict: None,
            require_uat_pass,
            autostart: false,
            generation: 0,
        }
    }

    /// The step that should be running now, if any.
    pub fn running_step(&self) -> Option<Step> {
        self.state.step()
    }

    /// Checks the invariants every reachable status keeps; `Err` names the broken one.
    pub fn check_invariants(&self) -> Result<(), String> {
        if (self.state == State::Failed) != self.failed_state.is_some() {
            return Err("failed_state is set exactly when the state is failed".into());
        }
        if let Some(fs) = self.failed_state {
            if !fs.is_running() {
                return Err(format!("failed_state {fs} is not a running state"));
            }
        }
        let may_be_down = matches!(
            self.state,
            State::ShutdownDelta
                | State::StartingTarget
                | State::PostCutover
                | State::FinalValidation
                | State::Completed
                | State::Failed
                | State::RollingBack
        );
        if self.source_down && !may_be_down {
            return Err(format!("source is down in state {}", self.state));
        }
        if self.state == State::Completed {
            if !self.source_down {
                return Err("completed without the source shut down".into());
            }
            if self.require_uat_pass && self.uat_verdict != Some(UatVerdict::Passed) {
                return Err("completed without the required UAT pass".into());
            }
        }
        if self.generation == 0
            && matches!(
                self.state,
                State::Synced | State::Uat | State::UatStarting | State::Completed
            )
        {
            return Err(format!("state {} without a complete sync", self.state));
        }
        Ok(())
    }
}

/// What drives the machine: a command, or a step's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "step")]
pub enum Input {
    Command(Command),
    StepSucceeded(Step),
    StepFailed(Step),
}

/// What the caller must do after a transition (in the same transaction as the new status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// Enqueue this step as a job.
    Run(Step),
    /// Cancel the job currently queued or running for this migration.
    CancelRunning,
}

/// Why an input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub state: State,
    pub allowed: Vec<Command>,
    pub message: String,
}

fn allowed_list(allowed: &[Command]) -> String {
    if allowed.is_empty() {
        "none (the migration is finished)".to_string()
    } else {
        allowed
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The commands accepted in this status.
pub fn allowed_commands(status: &Status) -> Vec<Command> {
    Command::ALL
        .iter()
        .copied()
        .filter(|c| apply(status, Input::Command(*c)).is_ok())
        .collect()
}

/// The state machine. Pure: no clock, no I/O.
pub fn transition(status: &Status, input: Input) -> Result<(Status, Vec<Effect>), Refusal> {
    apply(status, input).map_err(|reason| {
        let allowed = allowed_commands(status);
        let what = match input {
            Input::Command(c) => format!("cannot {c}"),
            Input::StepSucceeded(s) => format!("result of step {s} does not apply"),
            Input::StepFailed(s) => format!("failure of step {s} does not apply"),
        };
        let reason = if reason.is_empty() {
            String::new()
        } else {
            format!(" ({reason})")
        };
        Refusal {
            state: status.state,
            message: format!(
                "{what}: the migration is in state '{}'{reason}; allowed now: {}",
                status.state,
                allowed_list(&allowed)
            ),
            allowed,
        }
    })
}

fn run(mut next: Status, state: State) -> (Status, Vec<Effect>) {
    next.state = state;
    let effects = state.step().map(Effect::Run).into_iter().collect();
    (next, effects)
}

fn apply(status: &Status, input: Input) -> Result<(Status, Vec<Effect>), String> {
    use State as S;
    let st = status.state;
    let mut next = status.clone();
    // A completed migration can still be rolled back (a problem found the morning after):
    // the one way out of a terminal state.
    if st == S::Completed && input == Input::Command(Command::Rollback) {
        return Ok(run(next, S::RollingBack));
    }
    if st.is_terminal() {
        return Err(String::new());
    }
    match input {
        Input::StepSucceeded(step) | Input::StepFailed(step) if st.step() != Some(step) => {
            Err(match st.step() {
                Some(cur) => format!("the running step is {cur}"),
                None => "no step is running".to_string(),
            })
        }
        Input::StepFailed(_) => {
            next.failed_state = Some(st);
            next.state = S::Failed;
            Ok((next, vec![]))
        }
        Input::StepSucceeded(_) => Ok(match st {
            S::Preflight if status.autostart => run(next, S::InitialSync),
            S::Preflight => run(next, S::Ready),
            S::InitialSync | S::DeltaSync => {
                next.generation += 1;
                run(next, S::Synced)
            }
            S::UatStarting => run(next, S::Uat),
            S::UatSync => {
                next.generation += 1;
                run(next, S::Uat)
            }
            S::UatStopping => run(next, S::Synced),
            S::StoppingServices => run(next, S::FinalDelta),
            S::FinalDelta => {
                next.generation += 1;
                run(next, S::ShuttingDownSource)
            }
            S::ShuttingDownSource => {
                next.source_down = true;
                run(next, S::ShutdownDelta)
            }
            S::ShutdownDelta => {
                next.generation += 1;
                run(next, S::StartingTarget)
            }
            S::StartingTarget => run(next, S::PostCutover),
            S::PostCutover => run(next, S::FinalValidation),
            S::FinalValidation => run(next, S::Completed),
            S::RollingBack => {
                next.source_down = false;
                run(next, S::RolledBack)
            }
            _ => unreachable!("every running state is listed"),
        }),
        Input::Command(cmd) => command(status, next, cmd),
    }
}

fn command(
    status: &Status,
    mut next: Status,
    cmd: Command,
) -> Result<(Status, Vec<Effect>), String> {
    use Command as C;
    use State as S;
    let st = status.state;
    let rollback = |mut next: Status| {
        let mut effects = vec![];
        if st.is_running() {
            effects.push(Effect::CancelRunning);
        }
        next.failed_state = None;
        let (n, mut run_effects) = run(next, S::RollingBack);
        effects.append(&mut run_effects);
        (n, effects)
    };
    match (st, cmd) {
        (S::Onboarded, C::Start) => {
            next.autostart = true;
            Ok(run(next, S::Preflight))
        }
        (S::Onboarded | S::Ready, C::Preflight) => {
            next.autostart = false;
            Ok(run(next, S::Preflight))
        }
        (S::Ready, C::Start | C::Sync) => Ok(run(next, S::InitialSync)),
        (S::Onboarded | S::Ready | S::Synced, C::Cancel) => Ok((
            Status {
                state: S::Cancelled,
                ..next
            },
            vec![],
        )),
        (S::Preflight | S::InitialSync | S::DeltaSync, C::Cancel) => Ok((
            Status {
                state: S::Cancelled,
                ..next
            },
            vec![Effect::CancelRunning],
        )),
        (S::Synced, C::Sync) => Ok(run(next, S::DeltaSync)),
        (S::Synced, C::UatStart) => {
            next.uat_verdict = None;
            Ok(run(next, S::UatStarting))
        }
        (S::Synced, C::Cutover) => {
            if status.require_uat_pass && status.uat_verdict != Some(UatVerdict::Passed) {
                Err("the profile requires a passed UAT before cutover".into())
            } else {
                Ok(run(next, S::StoppingServices))
            }
        }
        (S::Uat, C::Sync) => Ok(run(next, S::UatSync)),
        (S::Uat, C::UatStop) => Ok(run(next, S::UatStopping)),
        (S::Uat, C::UatPass) => {
            next.uat_verdict = Some(UatVerdict::Passed);
            Ok(run(next, S::UatStopping))
        }
        (S::Uat, C::UatFail) => {
            next.uat_verdict = Some(UatVerdict::Failed);
            Ok(run(next, S::UatStopping))
        }
        (S::Failed, C::Retry) => {
            let again = status
                .failed_state
                .ok_or_else(|| "no failed step is recorded".to_string())?;
            next.failed_state = None;
            Ok(run(next, again))
        }
        (S::Failed, C::Rollback) if status.failed_state == Some(S::RollingBack) => {
            Err("the rollback itself failed: retry it".into())
        }
        (S::Failed, C::Cancel)
            if !status.source_down
                && matches!(
                    status.failed_state,
                    Some(S::Preflight | S::InitialSync | S::DeltaSync)
                ) =>
        {
            next.failed_state = None;
            Ok((
                Status {
                    state: S::Cancelled,
                    ..next
                },
                vec![],
            ))
        }
        (S::Failed, C::Rollback) => Ok(rollback(next)),
        (
            S::Synced
            | S::DeltaSync
            | S::InitialSync
            | S::UatStarting
            | S::Uat
            | S::UatSync
            | S::UatStopping
            | S::StoppingServices
            | S::FinalDelta
            | S::ShuttingDownSource
            | S::ShutdownDelta
            | S::StartingTarget
            | S::PostCutover
            | S::FinalValidation,
            C::Rollback,
        ) => Ok(rollback(next)),
        (s, _) if s.is_running() => Err(format!("step {} is running", s.step().unwrap())),
        _ => Err(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(status: &mut Status, inputs: &[Input]) {
        for i in inputs {
            let (n, _) = transition(status, *i).unwrap_or_else(|e| panic!("{i:?}: {e}"));
            *status = n;
        }
    }

    #[test]
    fn happy_path_reaches_completed() {
        let mut s = Status::new(true);
        use Input::*;
        drive(
            &mut s,
            &[
                Command(super::Command::Start),
                StepSucceeded(Step::Preflight),
                StepSucceeded(Step::FullSync),
                Command(super::Command::Sync),
                StepSucceeded(Step::DeltaSync),
                Command(super::Command::UatStart),
                StepSucceeded(Step::StartTestInstance),
                Command(super::Command::UatPass),
                StepSucceeded(Step::StopTestInstance),
                Command(super::Command::Cutover),
                StepSucceeded(Step::StopServices),
                StepSucceeded(Step::FinalDelta),
                StepSucceeded(Step::ShutdownSource),
                StepSucceeded(Step::ShutdownDelta),
                StepSucceeded(Step::StartTarget),
                StepSucceeded(Step::PostCutover),
                StepSucceeded(Step::FinalValidation),
            ],
        );
        assert_eq!(s.state, State::Completed);
        // Full sync, delta, final delta, shutdown delta.
        assert_eq!(s.generation, 4);
        s.check_invariants().unwrap();
    }

    #[test]
    fn refusal_names_state_and_allowed_commands() {
        let s = Status::new(false);
        let err = transition(&s, Input::Command(Command::Cutover)).unwrap_err();
        assert_eq!(err.state, State::Onboarded);
        assert!(err.message.contains("'onboarded'"), "{}", err.message);
        assert!(
            err.message
                .contains("allowed now: preflight, start, cancel"),
            "{}",
            err.message
        );
    }

    #[test]
    fn cutover_requires_uat_when_profile_says_so() {
        let mut s = Status::new(true);
        drive(
            &mut s,
            &[
                Input::Command(Command::Start),
                Input::StepSucceeded(Step::Preflight),
                Input::StepSucceeded(Step::FullSync),
            ],
        );
        let err = transition(&s, Input::Command(Command::Cutover)).unwrap_err();
        assert!(
            err.message.contains("requires a passed UAT"),
            "{}",
            err.message
        );
    }

    #[test]
    fn failure_then_retry_reruns_same_step() {
        let mut s = Status::new(false);
        drive(
            &mut s,
            &[
                Input::Command(Command::Start),
                Input::StepSucceeded(Step::Preflight),
                Input::StepFailed(Step::FullSync),
            ],
        );
        assert_eq!(s.state, State::Failed);
        let (n, eff) = transition(&s, Input::Command(Command::Retry)).unwrap();
        assert_eq!(n.state, State::InitialSync);
        assert_eq!(eff, vec![Effect::Run(Step::FullSync)]);
    }

    #[test]
    fn rollback_after_source_shutdown_restarts_it() {
        let mut s = Status::new(false);
        drive(
            &mut s,
            &[
                Input::Command(Command::Start),
                Input::StepSucceeded(Step::Preflight),
                Input::StepSucceeded(Step::FullSync),
                Input::Command(Command::Cutover),
                Input::StepSucceeded(Step::StopServices),
                Input::StepSucceeded(Step::FinalDelta),
                Input::StepSucceeded(Step::ShutdownSource),
            ],
        );
        assert!(s.source_down);
        let (n, eff) = transition(&s, Input::Command(Command::Rollback)).unwrap();
        assert_eq!(n.state, State::RollingBack);
        assert_eq!(
            eff,
            vec![Effect::CancelRunning, Effect::Run(Step::Rollback)]
        );
        let (n, _) = transition(&n, Input::StepSucceeded(Step::Rollback)).unwrap();
        assert_eq!(n.state, State::RolledBack);
        assert!(!n.source_down);
    }

    #[test]
    fn stale_step_results_are_refused() {
        let s = Status::new(false);
        let err = transition(&s, Input::StepSucceeded(Step::FullSync)).unwrap_err();
        assert!(
            err.message.contains("no step is running"),
            "{}",
            err.message
        );
    }

    #[test]
    fn names_round_trip() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        for s in Step::ALL {
            assert_eq!(Step::parse(s.as_str()), Some(s));
        }
        for c in Command::ALL {
            assert_eq!(Command::parse(c.as_str()), Some(c));
        }
    }
}
