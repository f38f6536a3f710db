//! Property: whatever sequence of commands and step outcomes arrives, the machine only
//! moves between valid statuses, refusals change nothing, and effects match the state.

use ferry_model::{allowed_commands, transition, Command, Effect, Input, State, Status, Step};
use proptest::prelude::*;

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        proptest::sample::select(Command::ALL.to_vec()).prop_map(Input::Command),
        proptest::sample::select(Step::ALL.to_vec()).prop_map(Input::StepSucceeded),
        proptest::sample::select(Step::ALL.to_vec()).prop_map(Input::StepFailed),
    ]
}

/// Biased towards the input that applies now, so long runs go deep into the machine.
fn biased(status: &Status, raw: Input, pick_current: bool, succeed: bool) -> Input {
    match (pick_current, status.state.step()) {
        (true, Some(step)) if succeed => Input::StepSucceeded(step),
        (true, Some(step)) => Input::StepFailed(step),
        _ => raw,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_keep_invariants(
        require_uat in any::<bool>(),
        seq in proptest::collection::vec((input(), any::<bool>(), proptest::bool::weighted(0.9)), 0..80),
    ) {
        let mut status = Status::new(require_uat);
        for (raw, pick, succeed) in seq {
            let inp = biased(&status, raw, pick, succeed);
            match transition(&status, inp) {
                Ok((next, effects)) => {
                    prop_assert!(next.check_invariants().is_ok(),
                        "{:?} --{:?}--> {:?}: {}", status, inp, next, next.check_invariants().unwrap_err());
                    // A Run effect always names the step of the new state, at most one.
                    let runs: Vec<Step> = effects.iter().filter_map(|e| match e { Effect::Run(s) => Some(*s), _ => None }).collect();
                    prop_assert!(runs.len() <= 1);
                    if let Some(s) = runs.first() {
                        prop_assert_eq!(Some(*s), next.state.step());
                    }
                    // Entering a running state from elsewhere always enqueues its step.
                    if next.state.is_running() && next.state != status.state {
                        prop_assert_eq!(runs.len(), 1);
                    }
                    // Leaving a running state by command cancels its job.
                    if status.state.is_running() && matches!(inp, Input::Command(_)) {
                        prop_assert!(effects.contains(&Effect::CancelRunning));
                    }
                    // Terminal states are absorbing, but for rolling back a completed one.
                    prop_assert!(
                        !status.state.is_terminal()
                            || (status.state == State::Completed
                                && inp == Input::Command(Command::Rollback))
                    );
                    status = next;
                }
                Err(refusal) => {
                    prop_assert_eq!(refusal.state, status.state);
                    prop_assert!(refusal.message.contains(status.state.as_str()));
                    if let Input::Command(c) = inp {
                        prop_assert!(!allowed_commands(&status).contains(&c));
                    }
                }
            }
        }
    }

    #[test]
    fn completed_only_through_the_whole_cutover(
        seq in proptest::collection::vec((input(), any::<bool>(), proptest::bool::weighted(0.95)), 0..120),
    ) {
        let mut status = Status::new(false);
        let mut seen = vec![status.state];
        for (raw, pick, succeed) in seq {
            let inp = biased(&status, raw, pick, succeed);
            if let Ok((next, _)) = transition(&status, inp) {
                status = next;
                seen.push(status.state);
            }
        }
        if status.state == State::Completed {
            for needed in [State::InitialSync, State::StoppingServices, State::FinalDelta,
                           State::ShuttingDownSource, State::ShutdownDelta, State::StartingTarget, State::PostCutover,
                           State::FinalValidation] {
                prop_assert!(seen.contains(&needed), "completed without passing {needed}");
            }
        }
    }
}
