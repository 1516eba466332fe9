//! The state machines of containers and container requests.
//!
//! Container: `Queued -> Locked -> Running -> Complete`, with `Locked ->
//! Queued` (unlock), `Queued | Locked | Running -> Cancelled` and `Complete ->
//! Cancelled` (an administrator invalidating a result for reuse). `Cancelled`
//! is terminal.
//!
//! Request: `Uncommitted -> Committed -> Final`. `Final` is terminal.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A change of state that the state machine forbids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid state transition for {kind}: cannot change state from {from} to {to}")]
pub struct TransitionError {
    pub kind: &'static str,
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ContainerState {
    Queued,
    Locked,
    Running,
    Complete,
    Cancelled,
}

impl ContainerState {
    pub const ALL: [ContainerState; 5] = [
        ContainerState::Queued,
        ContainerState::Locked,
        ContainerState::Running,
        ContainerState::Complete,
        ContainerState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ContainerState::Queued => "Queued",
            ContainerState::Locked => "Locked",
            ContainerState::Running => "Running",
            ContainerState::Complete => "Complete",
            ContainerState::Cancelled => "Cancelled",
        }
    }

    /// True for `Complete` and `Cancelled`: the container will not run again.
    pub fn is_final(self) -> bool {
        matches!(self, ContainerState::Complete | ContainerState::Cancelled)
    }

    /// True while a dispatcher holds the container (`Locked` or `Running`).
    pub fn is_locked(self) -> bool {
        matches!(self, ContainerState::Locked | ContainerState::Running)
    }

    pub fn can_transition_to(self, to: ContainerState) -> bool {
        use ContainerState::*;
        matches!(
            (self, to),
            (Queued, Locked)
                | (Queued, Cancelled)
                | (Locked, Queued)
                | (Locked, Running)
                | (Locked, Cancelled)
                | (Running, Complete)
                | (Running, Cancelled)
                | (Complete, Cancelled)
        )
    }

    /// Checks a change of state; staying in the same state is not a change
    /// and always passes.
    pub fn check_transition(self, to: ContainerState) -> Result<(), TransitionError> {
        if self == to || self.can_transition_to(to) {
            Ok(())
        } else {
            Err(TransitionError {
                kind: "container",
                from: self.to_string(),
                to: to.to_string(),
            })
        }
    }
}

impl fmt::Display for ContainerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ContainerState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ContainerState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                format!("invalid container state {s:?}: expected one of Queued, Locked, Running, Complete, Cancelled")
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RequestState {
    Uncommitted,
    Committed,
    Final,
}

impl RequestState {
    pub const ALL: [RequestState; 3] = [
        RequestState::Uncommitted,
        RequestState::Committed,
        RequestState::Final,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Uncommitted => "Uncommitted",
            RequestState::Committed => "Committed",
            RequestState::Final => "Final",
        }
    }

    pub fn can_transition_to(self, to: RequestState) -> bool {
        use RequestState::*;
        matches!((self, to), (Uncommitted, Committed) | (Committed, Final))
    }

    /// Checks a change of state; staying in the same state always passes.
    pub fn check_transition(self, to: RequestState) -> Result<(), TransitionError> {
        if self == to || self.can_transition_to(to) {
            Ok(())
        } else {
            Err(TransitionError {
                kind: "container request",
                from: self.to_string(),
                to: to.to_string(),
            })
        }
    }
}

impl fmt::Display for RequestState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RequestState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RequestState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                format!("invalid container request state {s:?}: expected one of Uncommitted, Committed, Final")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pair of container states, with whether the change is allowed.
    #[test]
    fn container_transition_table() {
        use ContainerState::*;
        let allowed = [
            (Queued, Locked),
            (Queued, Cancelled),
            (Locked, Queued),
            (Locked, Running),
            (Locked, Cancelled),
            (Running, Complete),
            (Running, Cancelled),
            (Complete, Cancelled),
        ];
        for from in ContainerState::ALL {
            for to in ContainerState::ALL {
                let expected = from == to || allowed.contains(&(from, to));
                assert_eq!(
                    from.check_transition(to).is_ok(),
                    expected,
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn request_transition_table() {
        use RequestState::*;
        let allowed = [(Uncommitted, Committed), (Committed, Final)];
        for from in RequestState::ALL {
            for to in RequestState::ALL {
                let expected = from == to || allowed.contains(&(from, to));
                assert_eq!(
                    from.check_transition(to).is_ok(),
                    expected,
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn transition_error_names_both_states() {
        let err = ContainerState::Complete
            .check_transition(ContainerState::Running)
            .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("from Complete"), "{message}");
        assert!(message.contains("to Running"), "{message}");
    }

    #[test]
    fn states_parse_from_their_names() {
        for state in ContainerState::ALL {
            assert_eq!(state.as_str().parse::<ContainerState>(), Ok(state));
        }
        for state in RequestState::ALL {
            assert_eq!(state.as_str().parse::<RequestState>(), Ok(state));
        }
        assert!("queued".parse::<ContainerState>().is_err());
    }
}
