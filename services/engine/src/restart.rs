//! Restart policies and Docker's restart backoff.
//!
//! Docker's rules, kept exactly: the delay before a restart starts at 100 ms and doubles with
//! every restart, up to one minute; a run that lasted at least 10 s resets it. `on-failure`
//! restarts only on a non-zero exit and, with a maximum, only while the restart count is below
//! it. A container stopped by the user (stop, or kill with the stop signal or SIGKILL) is never
//! restarted, whatever its policy. `unless-stopped` differs from `always` only when the engine
//! itself starts: a container the user stopped stays stopped.

use std::time::Duration;

use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as pb;
use serde::{Deserialize, Serialize};

/// The first delay.
pub const INITIAL_DELAY: Duration = Duration::from_millis(100);
/// The longest delay.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// A run at least this long resets the delay.
pub const RESET_AFTER: Duration = Duration::from_secs(10);

/// A container's restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Never restart.
    #[default]
    No,
    /// Always restart (unless stopped by the user).
    Always,
    /// Like `Always`, but a container the user stopped also stays stopped across engine
    /// restarts.
    UnlessStopped,
    /// Restart on a non-zero exit; `max` restarts at most (0 = no limit).
    OnFailure {
        /// Maximum restart count; 0 means unlimited.
        max: u32,
    },
}

impl Policy {
    /// The policy a request carries. A maximum retry count is only valid with on-failure.
    pub fn from_proto(p: Option<&pb::RestartPolicy>) -> Result<Self> {
        let Some(p) = p else { return Ok(Self::No) };
        let name = pb::RestartPolicyName::try_from(p.name).map_err(|_| {
            Error::invalid_argument(format!("invalid restart policy name {}", p.name))
        })?;
        if p.max_retries < 0 {
            return Err(Error::invalid_argument(
                "invalid restart policy: maximum retry count cannot be negative",
            ));
        }
        let policy = match name {
            pb::RestartPolicyName::Unspecified | pb::RestartPolicyName::No => Self::No,
            pb::RestartPolicyName::Always => Self::Always,
            pb::RestartPolicyName::UnlessStopped => Self::UnlessStopped,
            pb::RestartPolicyName::OnFailure => Self::OnFailure {
                max: p.max_retries as u32,
            },
        };
        if p.max_retries > 0 && !matches!(policy, Self::OnFailure { .. }) {
            return Err(Error::invalid_argument(
                "invalid restart policy: maximum retry count can only be used with 'on-failure'",
            ));
        }
        Ok(policy)
    }

    /// Docker's spelling: `no`, `always`, `unless-stopped`, `on-failure`.
    pub fn name(self) -> &'static str {
        match self {
            Self::No => "no",
            Self::Always => "always",
            Self::UnlessStopped => "unless-stopped",
            Self::OnFailure { .. } => "on-failure",
        }
    }

    /// Whether the policy ever restarts anything.
    pub fn is_none(self) -> bool {
        self == Self::No
    }
}

/// What the restart manager remembers about a container, persisted on its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RestartState {
    /// Restarts done by the policy since the last manual start.
    pub count: u32,
    /// The current backoff delay in milliseconds (0 = none yet).
    pub delay_ms: u64,
}

impl RestartState {
    /// A manual start resets everything.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

/// Decides whether a container that exited with `exit_code` after running for `ran_for` is
/// restarted and after which delay. Updates `state` (count and delay) when it is.
pub fn should_restart(
    policy: Policy,
    state: &mut RestartState,
    exit_code: i32,
    manually_stopped: bool,
    ran_for: Duration,
) -> Option<Duration> {
    if policy.is_none() || manually_stopped {
        return None;
    }
    let restart = match policy {
        Policy::No => false,
        Policy::Always | Policy::UnlessStopped => true,
        Policy::OnFailure { max } => exit_code != 0 && (max == 0 || state.count < max),
    };
    if !restart {
        return None;
    }
    let mut delay = Duration::from_millis(state.delay_ms);
    if ran_for >= RESET_AFTER {
        delay = Duration::ZERO;
    }
    delay = if delay.is_zero() {
        INITIAL_DELAY
    } else {
        (delay * 2).min(MAX_DELAY)
    };
    state.delay_ms = delay.as_millis() as u64;
    state.count += 1;
    Some(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(5);

    #[test]
    fn backoff_doubles_up_to_a_minute_and_resets_after_a_long_run() {
        let mut st = RestartState::default();
        let mut delays = Vec::new();
        for _ in 0..12 {
            delays.push(should_restart(Policy::Always, &mut st, 0, false, SHORT).unwrap());
        }
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(
            ms,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200, 60000, 60000
            ]
        );
        assert_eq!(st.count, 12);
        let d = should_restart(Policy::Always, &mut st, 0, false, Duration::from_secs(10));
        assert_eq!(d, Some(INITIAL_DELAY));
        assert_eq!(st.count, 13);
    }

    #[test]
    fn on_failure_honours_the_maximum() {
        let p = Policy::OnFailure { max: 2 };
        let mut st = RestartState::default();
        assert!(
            should_restart(p, &mut st, 0, false, SHORT).is_none(),
            "success"
        );
        assert!(should_restart(p, &mut st, 1, false, SHORT).is_some());
        assert!(should_restart(p, &mut st, 1, false, SHORT).is_some());
        assert!(should_restart(p, &mut st, 1, false, SHORT).is_none());
        assert_eq!(st.count, 2);
        // Unlimited.
        let mut st = RestartState::default();
        for _ in 0..50 {
            assert!(
                should_restart(Policy::OnFailure { max: 0 }, &mut st, 3, false, SHORT).is_some()
            );
        }
    }

    #[test]
    fn no_policy_and_manual_stops_never_restart() {
        let mut st = RestartState::default();
        assert!(should_restart(Policy::No, &mut st, 1, false, SHORT).is_none());
        for p in [
            Policy::Always,
            Policy::UnlessStopped,
            Policy::OnFailure { max: 0 },
        ] {
            assert!(should_restart(p, &mut st, 1, true, SHORT).is_none());
        }
        assert_eq!(st, RestartState::default());
    }

    #[test]
    fn policies_from_the_wire() {
        let p = |name: pb::RestartPolicyName, max| pb::RestartPolicy {
            name: name.into(),
            max_retries: max,
        };
        assert_eq!(Policy::from_proto(None).unwrap(), Policy::No);
        assert_eq!(
            Policy::from_proto(Some(&p(pb::RestartPolicyName::OnFailure, 3))).unwrap(),
            Policy::OnFailure { max: 3 }
        );
        assert!(Policy::from_proto(Some(&p(pb::RestartPolicyName::Always, 3))).is_err());
        assert!(Policy::from_proto(Some(&p(pb::RestartPolicyName::OnFailure, -1))).is_err());
        assert_eq!(
            Policy::from_proto(Some(&p(pb::RestartPolicyName::UnlessStopped, 0)))
                .unwrap()
                .name(),
            "unless-stopped"
        );
    }
}
