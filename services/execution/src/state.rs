//! The execution and step lifecycles as explicit transition tables. Anything not listed is illegal
//! and refused; each illegal transition has a test.

use meshflow_proto::execution::v1::{ExecutionStatus, StepStatus};

/// Whether an execution status is terminal.
pub fn is_terminal(status: ExecutionStatus) -> bool {
    use ExecutionStatus as E;
    matches!(
        status,
        E::Completed | E::Failed | E::Cancelled | E::TimedOut
    )
}

/// Whether an execution may move `from` → `to`.
///
/// PENDING → RUNNING ⇄ WAITING → COMPLETED | FAILED | CANCELLED | TIMED_OUT; a PENDING execution may
/// also be cancelled, fail (e.g. its version vanished) or time out before it runs.
pub fn execution_may(from: ExecutionStatus, to: ExecutionStatus) -> bool {
    use ExecutionStatus as E;
    matches!(
        (from, to),
        (E::Pending, E::Running)
            | (E::Pending, E::Failed | E::Cancelled | E::TimedOut)
            | (E::Running, E::Waiting)
            | (E::Waiting, E::Running)
            | (
                E::Running | E::Waiting,
                E::Completed | E::Failed | E::Cancelled | E::TimedOut
            )
    )
}

/// Whether a step status is final for its step path (no further attempt will follow).
pub fn step_is_final(status: StepStatus) -> bool {
    use StepStatus as S;
    matches!(status, S::Succeeded | S::Failed | S::Skipped | S::Cancelled)
}

/// Whether one attempt of a step may move `from` → `to`.
///
/// PENDING → RUNNING → SUCCEEDED | FAILED | WAITING; WAITING → RUNNING | SUCCEEDED | FAILED; PENDING →
/// SKIPPED; any non-final → CANCELLED. A retry is a new attempt, not a transition back.
pub fn step_may(from: StepStatus, to: StepStatus) -> bool {
    use StepStatus as S;
    matches!(
        (from, to),
        (S::Pending, S::Running | S::Skipped | S::Waiting)
            | (S::Running, S::Succeeded | S::Failed | S::Waiting)
            | (S::Waiting, S::Running | S::Succeeded | S::Failed)
            | (S::Pending | S::Running | S::Waiting, S::Cancelled)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ExecutionStatus as E;
    use StepStatus as S;

    const EXECUTION: [E; 7] = [
        E::Pending,
        E::Running,
        E::Waiting,
        E::Completed,
        E::Failed,
        E::Cancelled,
        E::TimedOut,
    ];
    const STEP: [S; 7] = [
        S::Pending,
        S::Running,
        S::Waiting,
        S::Succeeded,
        S::Failed,
        S::Skipped,
        S::Cancelled,
    ];

    #[test]
    fn execution_transitions_are_exactly_the_table() {
        let legal = [
            (E::Pending, E::Running),
            (E::Pending, E::Failed),
            (E::Pending, E::Cancelled),
            (E::Pending, E::TimedOut),
            (E::Running, E::Waiting),
            (E::Waiting, E::Running),
            (E::Running, E::Completed),
            (E::Running, E::Failed),
            (E::Running, E::Cancelled),
            (E::Running, E::TimedOut),
            (E::Waiting, E::Completed),
            (E::Waiting, E::Failed),
            (E::Waiting, E::Cancelled),
            (E::Waiting, E::TimedOut),
        ];
        for from in EXECUTION {
            for to in EXECUTION {
                assert_eq!(
                    execution_may(from, to),
                    legal.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
    }

    #[test]
    fn terminal_executions_never_move() {
        for from in EXECUTION.into_iter().filter(|s| is_terminal(*s)) {
            for to in EXECUTION {
                assert!(!execution_may(from, to), "{from:?} -> {to:?}");
            }
        }
        assert!(
            !execution_may(E::Pending, E::Completed),
            "nothing completes without running"
        );
        assert!(!execution_may(E::Pending, E::Waiting));
    }

    #[test]
    fn step_transitions_are_exactly_the_table() {
        let legal = [
            (S::Pending, S::Running),
            (S::Pending, S::Skipped),
            (S::Pending, S::Waiting),
            (S::Running, S::Succeeded),
            (S::Running, S::Failed),
            (S::Running, S::Waiting),
            (S::Waiting, S::Running),
            (S::Waiting, S::Succeeded),
            (S::Waiting, S::Failed),
            (S::Pending, S::Cancelled),
            (S::Running, S::Cancelled),
            (S::Waiting, S::Cancelled),
        ];
        for from in STEP {
            for to in STEP {
                assert_eq!(
                    step_may(from, to),
                    legal.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
        for s in STEP {
            assert_eq!(
                step_is_final(s),
                !matches!(s, S::Pending | S::Running | S::Waiting)
            );
        }
    }
}
