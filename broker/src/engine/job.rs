//! The job runner: the only code that calls a profile's token endpoint, and
//! the engine's writes of the profile's file.
//!
//! A [`Job`] runs on its own task and reports one [`JobResult`] to the actor,
//! which owns every decision; the job only does the I/O. A refresh job saves
//! its answer before reporting it (persist before serve).

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::mpsc;
use tracing::debug;

use super::apply;
use super::{EngineDeps, Persist, RefreshError};
use crate::store::ProfileRecord;

/// Work done off the actor.
pub(super) enum Job {
    /// Wait until `not_before_ms` (the one-call-per-second rule), call the
    /// token endpoint, then save the result.
    Refresh {
        record: ProfileRecord,
        not_before_ms: u64,
    },
    /// Save a record whose save failed (a rotated refresh token, or a dead
    /// grant's record without one). No IdP call.
    Save(ProfileRecord),
}

/// What a job reports. `saved` is the outcome of the job's write.
pub(super) enum JobResult {
    /// The IdP issued a token; `record` carries it.
    Refreshed {
        record: ProfileRecord,
        saved: Result<(), String>,
        /// Precise wall time (ms) the refresh request started.
        started_ms: u64,
    },
    /// A [`Job::Save`] ended.
    Saved { saved: Result<(), String> },
    /// The IdP rejected the grant; `record` no longer holds it.
    Rejected {
        detail: String,
        record: ProfileRecord,
        saved: Result<(), String>,
    },
    /// The IdP rejected the client; `record` says so and keeps the grant.
    ClientRejected {
        detail: String,
        record: ProfileRecord,
        saved: Result<(), String>,
    },
    /// The refresh failed in a way a retry may fix; nothing was written.
    Transient { detail: String },
}

/// Runs `job` on its own task; its result (also after a panic) goes to `done`.
pub(super) fn start(job: Job, deps: EngineDeps, done: mpsc::UnboundedSender<JobResult>) {
    tokio::spawn(async move {
        // A panic must still end the job in a state of the same kind.
        let panicked: fn() -> JobResult = match &job {
            Job::Refresh { .. } => || JobResult::Transient {
                detail: "internal error: refresh task panicked".into(),
            },
            Job::Save(_) => || JobResult::Saved {
                saved: Err("internal error: save task panicked".into()),
            },
        };
        let result = AssertUnwindSafe(run(job, deps))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| panicked());
        let _ = done.send(result);
    });
}

async fn run(job: Job, deps: EngineDeps) -> JobResult {
    match job {
        Job::Save(record) => JobResult::Saved {
            saved: save(&deps, record).await.map_err(|e| e.to_string()),
        },
        Job::Refresh {
            record,
            not_before_ms,
        } => {
            let wait = not_before_ms.saturating_sub(deps.clock.now_ms());
            if wait > 0 {
                deps.clock.sleep(Duration::from_millis(wait)).await;
            }
            // The IdP computes expiry from its clock when it handles the request,
            // in whole seconds. Stamping our copy with the (floored) time the
            // request started keeps our expiry at or before the IdP's.
            let started_ms = deps.clock.now_ms();
            refresh(record, deps, started_ms).await
        }
    }
}

async fn refresh(record: ProfileRecord, deps: EngineDeps, started_ms: u64) -> JobResult {
    match deps.endpoint.refresh(record.clone()).await {
        Ok(refreshed) => {
            // The IdP may have rotated the refresh token: the answer exists
            // only in memory until it is on disk, and a kill -9 now loses
            // the grant (docs/security.md). So nothing (no logging, no
            // publishing, no await) comes between the answer and the save.
            let default_lifetime = deps.config.default_lifetime(&record.name);
            let record = apply::apply(record, refreshed, started_ms / 1000, default_lifetime);
            let saved = save(&deps, record.clone()).await.map_err(|e| e.to_string());
            if let Some(source) = record
                .access_token
                .as_ref()
                .and_then(|a| a.lifetime_source)
                .filter(|s| *s != kontext_broker_protocol::LifetimeSource::ExpiresIn)
            {
                debug!(profile = %record.name, source = source.as_str(), "token response has no expires_in");
            }
            JobResult::Refreshed {
                record,
                saved,
                started_ms,
            }
        }
        Err(RefreshError::Rejected(detail)) => {
            let record = apply::grant_rejected(record);
            let saved = save(&deps, record.clone()).await.map_err(|e| e.to_string());
            JobResult::Rejected {
                detail,
                record,
                saved,
            }
        }
        Err(RefreshError::ClientRejected(detail)) => {
            let record = apply::client_rejected(record, &detail);
            let saved = save(&deps, record.clone()).await.map_err(|e| e.to_string());
            JobResult::ClientRejected {
                detail,
                record,
                saved,
            }
        }
        Err(RefreshError::Transient(detail)) => JobResult::Transient { detail },
    }
}

/// Saves `record` through the engine's [`Persist`], off the runtime.
pub(super) async fn save(deps: &EngineDeps, record: ProfileRecord) -> crate::Result<()> {
    off_runtime(deps, "saving the profile", move |p| p.save(&record)).await
}

/// A record that exists only in memory may hold the only valid refresh
/// token (or a dead one the disk still has): one last try to save it before
/// the engine goes away.
pub(super) async fn last_save(deps: &EngineDeps, record: ProfileRecord) {
    let name = record.name.clone();
    if let Err(e) = save(deps, record).await {
        tracing::error!(
            profile = %name,
            error = %e,
            "stopping with an unsaved record; a new login may be needed"
        );
    }
}

/// Deletes the profile's file through the engine's [`Persist`], off the runtime.
pub(super) async fn delete(deps: &EngineDeps, name: String) -> crate::Result<()> {
    off_runtime(deps, "deleting the profile", move |p| p.delete(&name)).await
}

/// Runs blocking storage work on tokio's blocking pool; `what` names it if that task dies.
async fn off_runtime(
    deps: &EngineDeps,
    what: &str,
    work: impl FnOnce(&dyn Persist) -> crate::Result<()> + Send + 'static,
) -> crate::Result<()> {
    let persist = deps.persist.clone();
    tokio::task::spawn_blocking(move || work(&*persist))
        .await
        .map_err(|e| crate::Error::io(what, std::io::Error::other(e)))?
}
