//! What starts a job: the complete list of reasons the engine calls the token
//! endpoint or retries a write.
//!
//! Every job starts in `Core::begin` in `actor.rs`, which takes a [`Trigger`].
//! Requests that arrive while a job runs join it; nothing else starts one.
//!
//! | trigger | from phase | job | decided in |
//! |---|---|---|---|
//! | `Get` | `Ready` | refresh | `on_get`: no token serves `min_valid` (none, expired, too short, or a generation a client rejected) |
//! | `Invalidate` | `Ready` | refresh | `on_invalidate`: a client says the *current* generation was rejected (older ones are answered with the current token) |
//! | `Forced` | `Ready`, `Backoff`, `ClientRejected` | refresh | `on_refresh` (`broker-ctl refresh`): cuts a backoff short, tries a rejected client once |
//! | `SetClient` | any but `Dead` | refresh | `set_client`, after the new client credential is saved |
//! | `Proactive` | `Ready` | refresh | [`on_wake`]: the refresh deadline passed, the last job ended at least 1 s ago, and the profile is in use |
//! | `SaveRetry` | `Unsaved` | save | [`on_wake`] once its retry time came; `on_get`/`on_invalidate` after it; `on_refresh` at once |
//! | `DeleteRetry` | `Dead` | save of the dead record | [`on_wake`] once its retry time came |
//!
//! [`on_wake`] runs on every actor turn (a command, a job's end, or the timer
//! from `next_wake_in`) and on a `Nudge`, which the fast path sends when it
//! served a token past its refresh deadline.

use super::phase::{Delete, Phase, Save};

/// Why the actor starts a job. See the module table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trigger {
    /// A `GetToken` found no token that serves it.
    Get,
    /// A client reported the current generation rejected.
    Invalidate,
    /// A user asked for a refresh.
    Forced,
    /// A new client credential was saved.
    SetClient,
    /// The proactive deadline passed while the profile is in use.
    Proactive,
    /// A rotated refresh token still has to reach the disk.
    SaveRetry,
    /// A dead grant's refresh token still has to leave the disk.
    DeleteRetry,
}

/// The work a trigger starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Work {
    /// Call the token endpoint, then save the answer.
    Refresh,
    /// Save the unsaved record again (no IdP call).
    Save,
    /// Save the dead record again, removing its refresh token from disk.
    Delete,
}

impl Trigger {
    /// The job this trigger starts.
    pub fn work(self) -> Work {
        match self {
            Trigger::Get
            | Trigger::Invalidate
            | Trigger::Forced
            | Trigger::SetClient
            | Trigger::Proactive => Work::Refresh,
            Trigger::SaveRetry => Work::Save,
            Trigger::DeleteRetry => Work::Delete,
        }
    }
}

/// The job a turn of the actor starts on its own at `now_ms`, if any.
/// `proactive` says whether a proactive refresh is due (deadline, spacing, in use).
pub(super) fn on_wake(
    phase: &Phase,
    now_ms: u64,
    proactive: impl FnOnce() -> bool,
) -> Option<Trigger> {
    match phase {
        Phase::Dead {
            delete: Delete::RetryAt(at),
        } => (now_ms >= *at).then_some(Trigger::DeleteRetry),
        Phase::Unsaved {
            save: Save::RetryAt(at),
        } => (now_ms >= *at).then_some(Trigger::SaveRetry),
        Phase::Ready => proactive().then_some(Trigger::Proactive),
        Phase::Refreshing { .. }
        | Phase::Backoff { .. }
        | Phase::Unsaved {
            save: Save::Running(_),
        }
        | Phase::ClientRejected
        | Phase::Dead { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::phase::Waiters;

    #[test]
    fn a_turn_retries_writes_when_due_and_refreshes_only_when_ready() {
        let due = |phase: &Phase, now| on_wake(phase, now, || true);
        let unsaved = Phase::Unsaved {
            save: Save::RetryAt(10),
        };
        assert_eq!(due(&unsaved, 9), None);
        assert_eq!(due(&unsaved, 10), Some(Trigger::SaveRetry));
        let dead = Phase::Dead {
            delete: Delete::RetryAt(10),
        };
        assert_eq!(due(&dead, 9), None);
        assert_eq!(due(&dead, 10), Some(Trigger::DeleteRetry));
        let done = Phase::Dead {
            delete: Delete::Done,
        };
        assert_eq!(due(&done, u64::MAX), None);
        assert_eq!(due(&Phase::Ready, 0), Some(Trigger::Proactive));
        assert_eq!(on_wake(&Phase::Ready, 0, || false), None);
        for quiet in [
            Phase::Backoff { until_ms: 0 },
            Phase::ClientRejected,
            Phase::Refreshing {
                waiters: Waiters::default(),
            },
        ] {
            assert_eq!(due(&quiet, u64::MAX), None);
        }
    }
}
