//! The engine's states: one enum, [`Phase`], whose variants own their data.
//!
//! The actor (`actor.rs`) holds exactly one `Phase`; every transition consumes
//! the old one and returns the next. What readers see ([`PhaseKind`], and from
//! it the status `state`) is derived from the phase alone.

use super::{PhaseKind, Reply};
use crate::store::ProfileRecord;

/// Callers waiting on the running job.
#[derive(Default)]
pub(super) struct Waiters {
    /// Get the job's outcome; while the client is rejected they are still
    /// served the old token as long as it is unexpired.
    pub plain: Vec<Reply>,
    /// Callers of a forced refresh (`Refresh`, `SetClient`): unlike `plain`
    /// they learn that the client was rejected even while the old token is valid.
    pub forced: Vec<Reply>,
}

impl Waiters {
    /// One plain waiter.
    pub fn plain(reply: Reply) -> Self {
        Waiters {
            plain: vec![reply],
            forced: Vec::new(),
        }
    }

    /// One forced waiter.
    pub fn forced(reply: Reply) -> Self {
        Waiters {
            plain: Vec::new(),
            forced: vec![reply],
        }
    }
}

/// Where the save of an [`Phase::Unsaved`] record stands.
pub(super) enum Save {
    /// The last save failed; the next one starts at this wall time (ms).
    RetryAt(u64),
    /// A save job runs; these callers get its outcome.
    Running(Waiters),
}

/// Where the deletion of a dead grant's refresh token from disk stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Delete {
    /// The disk holds no refresh token for this profile.
    Done,
    /// Writing the dead record failed; retry at this wall time (ms).
    RetryAt(u64),
    /// A job writing the dead record runs.
    Running,
}

/// Where one profile's engine is. Invariants hold between actor turns.
pub(super) enum Phase {
    /// No job runs. The record is on disk and holds a refresh token; the
    /// client is not known to be rejected. The token may be valid, due for a
    /// proactive refresh, expired, or withheld because a client rejected its
    /// generation.
    Ready,
    /// A refresh job runs: it waits out the one-call-per-second gap, calls the
    /// token endpoint, then saves the answer. The record it started from is on
    /// disk; callers needing a newer token are in `waiters`. If the record
    /// says `client_rejected`, this is a forced retry of a rejected client.
    Refreshing { waiters: Waiters },
    /// The last refresh failed transiently. The record is on disk; its token
    /// is served while unexpired; no job starts before `until_ms` unless forced.
    Backoff { until_ms: u64 },
    /// The record in memory holds a rotated refresh token that the disk lacks
    /// (its save failed). Its access token is withheld and the IdP is not
    /// called; only a save job runs, until one succeeds.
    Unsaved { save: Save },
    /// The IdP rejected the client (not the grant). The record says
    /// `client_rejected` and keeps its refresh token. No job starts until a
    /// new client credential, a replacement, or a forced refresh.
    ClientRejected,
    /// The IdP rejected the grant: the record holds no refresh token (the
    /// only phase where that is so). Every token request answers "reauth";
    /// terminal until the record is replaced. `delete` says whether the
    /// dead token is gone from disk too.
    Dead { delete: Delete },
}

impl Phase {
    /// The phase a loaded (or replacing) record starts in; the record is on disk.
    pub fn of_record(record: &ProfileRecord) -> Phase {
        if record.refresh_token.is_none() {
            Phase::Dead {
                delete: Delete::Done,
            }
        } else if record.client_rejected.is_some() {
            Phase::ClientRejected
        } else {
            Phase::Ready
        }
    }

    /// A backoff whose time has come is over, whether or not its timer fired yet.
    pub fn settle(self, now_ms: u64) -> Phase {
        match self {
            Phase::Backoff { until_ms } if now_ms >= until_ms => Phase::Ready,
            other => other,
        }
    }

    /// The coarse kind readers see. A save retry shows as `Backoff` (waiting)
    /// or `Busy` (running); a dead grant is `ReauthRequired` whatever its delete does.
    pub fn kind(&self) -> PhaseKind {
        match self {
            Phase::Ready => PhaseKind::Idle,
            Phase::Refreshing { .. }
            | Phase::Unsaved {
                save: Save::Running(_),
            } => PhaseKind::Busy,
            Phase::Backoff { until_ms }
            | Phase::Unsaved {
                save: Save::RetryAt(until_ms),
            } => PhaseKind::Backoff {
                until_ms: *until_ms,
            },
            Phase::ClientRejected => PhaseKind::ClientRejected,
            Phase::Dead { .. } => PhaseKind::ReauthRequired,
        }
    }

    /// True while a job runs (exactly one, or none).
    pub fn job_running(&self) -> bool {
        matches!(
            self,
            Phase::Refreshing { .. }
                | Phase::Unsaved {
                    save: Save::Running(_)
                }
                | Phase::Dead {
                    delete: Delete::Running
                }
        )
    }

    /// True when the record in memory is also on disk.
    pub fn on_disk(&self) -> bool {
        !matches!(
            self,
            Phase::Unsaved { .. }
                | Phase::Dead {
                    delete: Delete::RetryAt(_) | Delete::Running
                }
        )
    }

    /// Adds a forced caller to the running refresh or save; hands the caller
    /// back when no such job runs.
    pub fn join_forced(&mut self, reply: Reply) -> Result<(), Reply> {
        match self {
            Phase::Refreshing { waiters }
            | Phase::Unsaved {
                save: Save::Running(waiters),
            } => {
                waiters.forced.push(reply);
                Ok(())
            }
            _ => Err(reply),
        }
    }

    /// Ends the phase, handing over the callers waiting on its job.
    pub fn into_waiters(self) -> Waiters {
        match self {
            Phase::Refreshing { waiters }
            | Phase::Unsaved {
                save: Save::Running(waiters),
            } => waiters,
            _ => Waiters::default(),
        }
    }

    /// When a retry or a backoff ends (wall ms), if the phase waits for one.
    pub fn retry_at(&self) -> Option<u64> {
        match self {
            Phase::Backoff { until_ms }
            | Phase::Unsaved {
                save: Save::RetryAt(until_ms),
            }
            | Phase::Dead {
                delete: Delete::RetryAt(until_ms),
            } => Some(*until_ms),
            _ => None,
        }
    }
}
