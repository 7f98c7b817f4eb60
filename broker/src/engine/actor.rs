//! The per-profile actor: the transitions of the engine's state machine.
//!
//! One task per profile owns a [`Phase`] and a [`Core`] (the record and its
//! bookkeeping). Each command, job result or timer tick is one transition:
//! it consumes the old phase and returns the next one, in [`Actor::step`].
//! Jobs start only in [`Core::begin`], from a [`Trigger`] (see `trigger.rs`).

use kontext_broker_protocol::{
    BrokerError, ClientAuthMethod, ClientCredential, ProfileStatus, Token,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::job::{self, Job, JobResult};
use super::phase::{Delete, Phase, Save, Waiters};
use super::policy;
use super::state::Core;
use super::trigger::{self, Trigger, Work};
use super::{apply, Command, Reply};
use crate::store::ProfileRecord;

/// Whether a token was just issued by the IdP (as opposed to saved again).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fresh {
    Yes,
    No,
}

/// A transition's outcome: the next phase and the job it started, if any.
type Next = (Phase, Option<Job>);

/// One profile's engine task (started by `state::spawn`).
pub(super) struct Actor {
    /// The one source of truth about where the engine is.
    pub phase: Phase,
    pub core: Core,
}

impl Actor {
    /// Runs the engine until it is stopped, removed, or every handle is gone.
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<JobResult>();
        loop {
            // Deadlines are evaluated on every turn, not only when a timer fires,
            // so a deadline that passed while the actor was busy (or not yet
            // running) is never missed.
            if let Some(job) = self.step(|phase, core| core.on_wake(phase)) {
                job::start(job, self.core.deps.clone(), done_tx.clone());
                self.publish();
            }
            let sleep = self
                .core
                .deps
                .clock
                .sleep(self.core.next_wake_in(&self.phase));
            let job = tokio::select! {
                Some(result) = done_rx.recv() => {
                    self.finish(result);
                    None
                }
                command = rx.recv() => match command {
                    None => break,
                    Some(Command::GetToken { min_valid_secs, reply }) => {
                        self.step(|p, core| core.on_get(p, min_valid_secs, reply, Trigger::Get))
                    }
                    Some(Command::Invalidate { generation, reply }) => {
                        self.step(|p, core| core.on_invalidate(p, generation, reply))
                    }
                    Some(Command::Refresh { reply }) => self.step(|p, core| core.on_refresh(p, reply)),
                    Some(Command::Nudge) => self.step(|p, core| core.on_wake(p)),
                    Some(Command::Stop { reply }) => {
                        self.wait_for_job(&mut done_rx).await;
                        if !self.phase.on_disk() {
                            job::last_save(&self.core.deps, self.core.record.clone()).await;
                        }
                        let _ = reply.send(self.core.record.clone());
                        break;
                    }
                    Some(Command::Remove { reply }) => {
                        self.wait_for_job(&mut done_rx).await;
                        match job::delete(&self.core.deps, self.core.record.name.clone()).await {
                            Ok(()) => {
                                // A handle that outlives the profile serves nothing.
                                self.core.snapshot.send_modify(|snap| {
                                    snap.token = None;
                                    snap.wire = None;
                                });
                                let _ = reply.send(Ok(self.core.record.clone()));
                                break;
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e));
                                None
                            }
                        }
                    }
                    Some(Command::Replace { record, reply }) => {
                        self.wait_for_job(&mut done_rx).await;
                        let _ = reply.send(self.replace(*record).await);
                        None
                    }
                    Some(Command::SetClient { credential, client_auth, reply }) => {
                        self.wait_for_job(&mut done_rx).await;
                        self.set_client(credential, client_auth, reply).await
                    }
                },
                () = sleep => None,
            };
            if let Some(job) = job {
                job::start(job, self.core.deps.clone(), done_tx.clone());
            }
            self.publish();
        }
        debug!(profile = %self.core.record.name, "engine stopped");
    }

    /// The one place the phase changes: `transition` consumes the old phase
    /// and returns the next one (and the job it started, if any).
    fn step(&mut self, transition: impl FnOnce(Phase, &mut Core) -> Next) -> Option<Job> {
        // `Core` cannot see `self.phase`, so the stand-in is never observed.
        let old = std::mem::replace(&mut self.phase, Phase::Ready);
        let (next, job) = transition(old, &mut self.core);
        self.phase = next;
        job
    }

    pub(super) fn publish(&mut self) {
        self.core.publish(&self.phase);
    }

    fn finish(&mut self, result: JobResult) {
        self.step(|phase, core| (core.finish(phase, result), None));
    }

    async fn wait_for_job(&mut self, done_rx: &mut mpsc::UnboundedReceiver<JobResult>) {
        if self.phase.job_running() {
            if let Some(result) = done_rx.recv().await {
                self.finish(result);
            }
        }
    }

    /// `SetClient`: new credential and method, the same grant, and a refresh at
    /// once whose outcome is the answer. Runs with no job in flight.
    async fn set_client(
        &mut self,
        credential: ClientCredential,
        client_auth: Option<ClientAuthMethod>,
        reply: Reply,
    ) -> Option<Job> {
        if let Phase::Dead { .. } = self.phase {
            let _ = reply.send(Err(self.core.reauth_error()));
            return None;
        }
        let record = apply::with_client(self.core.record.clone(), credential, client_auth);
        if let Err(e) = job::save(&self.core.deps, record.clone()).await {
            let _ = reply.send(Err(e.to_wire()));
            return None;
        }
        info!(profile = %record.name, "client credential replaced; refreshing");
        self.step(|_saved_over, core| {
            core.record = record;
            core.backoff.reset();
            core.counters.last_error = None;
            core.begin(Trigger::SetClient, Waiters::forced(reply))
        })
    }

    /// `Replace` (import or login): saves the new record, then starts over
    /// from it. Runs with no job in flight.
    async fn replace(&mut self, record: ProfileRecord) -> crate::Result<ProfileStatus> {
        let record = apply::replacing(record, &self.core.record);
        job::save(&self.core.deps, record.clone()).await?;
        self.step(|_replaced, core| {
            core.record = record;
            core.issued_ms = 0;
            core.jitter_draw = rand::random();
            core.backoff.reset();
            core.counters.last_error = None;
            (Phase::of_record(&core.record), None)
        });
        self.publish();
        Ok(self.core.snapshot.borrow().status.clone())
    }
}

impl Core {
    /// `GetToken` (and the tail of `Invalidate`, whose `trigger` it passes):
    /// answer from the token, join the running job, or start one.
    fn on_get(
        &mut self,
        phase: Phase,
        min_valid_secs: u64,
        reply: Reply,
        trigger: Trigger,
    ) -> Next {
        let now = self.now();
        let mut phase = phase.settle(now);
        let good = self
            .serveable(&phase)
            .filter(|t| policy::serves(t, now, min_valid_secs));
        if let (Some(token), false) = (good, matches!(phase, Phase::Dead { .. })) {
            let _ = reply.send(Ok(token));
            return (phase, None);
        }
        let answer = match &mut phase {
            Phase::Dead { .. } => Err(self.reauth_error()),
            Phase::Ready => return self.begin(trigger, Waiters::plain(reply)),
            Phase::Refreshing { waiters }
            | Phase::Unsaved {
                save: Save::Running(waiters),
            } => {
                waiters.plain.push(reply);
                return (phase, None);
            }
            Phase::Unsaved {
                save: Save::RetryAt(at),
            } if now >= *at => return self.begin(Trigger::SaveRetry, Waiters::plain(reply)),
            Phase::Unsaved {
                save: Save::RetryAt(at),
            } => Err(self.unavailable(*at)),
            // Serve whatever validity is left rather than nothing (contract §5).
            Phase::Backoff { until_ms } => {
                let until_ms = *until_ms;
                self.unexpired_or(&phase, self.unavailable(until_ms))
            }
            // The current token is served while valid; no IdP call.
            Phase::ClientRejected => self.unexpired_or(&phase, self.client_rejected_error()),
        };
        let _ = reply.send(answer);
        (phase, None)
    }

    /// `Invalidate`: a client says the token of `generation` was rejected.
    fn on_invalidate(&mut self, phase: Phase, generation: u64, reply: Reply) -> Next {
        if generation != self.record.generation {
            // An older token: the current one is already newer, no IdP call.
            return self.on_get(phase, 0, reply, Trigger::Get);
        }
        if !matches!(phase, Phase::Dead { .. }) {
            self.rejected_generation = Some(generation);
        }
        self.on_get(phase, 0, reply, Trigger::Invalidate)
    }

    /// `Refresh`: a user asked explicitly, so this may cut a backoff short,
    /// and tries a rejected client once more.
    fn on_refresh(&mut self, phase: Phase, reply: Reply) -> Next {
        let mut phase = phase.settle(self.now());
        let Err(reply) = phase.join_forced(reply) else {
            return (phase, None);
        };
        let trigger = match &phase {
            Phase::Ready | Phase::Backoff { .. } | Phase::ClientRejected => Trigger::Forced,
            // The newest refresh token is not on disk: save it, never call the IdP.
            Phase::Unsaved {
                save: Save::RetryAt(_),
            } => Trigger::SaveRetry,
            // A dead grant (a running refresh or save took the caller above).
            Phase::Dead { .. } | Phase::Refreshing { .. } | Phase::Unsaved { .. } => {
                let _ = reply.send(Err(self.reauth_error()));
                return (phase, None);
            }
        };
        self.begin(trigger, Waiters::forced(reply))
    }

    /// Every turn and on a nudge: retry a failed write, or refresh proactively.
    fn on_wake(&mut self, phase: Phase) -> Next {
        let now = self.now();
        let phase = phase.settle(now);
        match trigger::on_wake(&phase, now, || self.proactive_due(now)) {
            Some(trigger) => self.begin(trigger, Waiters::default()),
            None => (phase, None),
        }
    }

    /// The only place a job starts: the phase it runs in, and the job.
    fn begin(&mut self, trigger: Trigger, waiters: Waiters) -> Next {
        debug!(profile = %self.record.name, ?trigger, "starting a job");
        let record = self.record.clone();
        match trigger.work() {
            Work::Refresh => {
                // The job waits out the gap itself, while `Refreshing`: requests
                // keep joining it, so the gap never turns into extra calls.
                let not_before_ms = policy::next_call_ms(self.last_call_ms, self.now());
                self.last_call_ms = Some(not_before_ms);
                let job = Job::Refresh {
                    record,
                    not_before_ms,
                };
                (Phase::Refreshing { waiters }, Some(job))
            }
            Work::Save => (
                Phase::Unsaved {
                    save: Save::Running(waiters),
                },
                Some(Job::Save(record)),
            ),
            // Nobody waits on a dead grant: every caller was told "reauth".
            Work::Delete => (
                Phase::Dead {
                    delete: Delete::Running,
                },
                Some(Job::Save(record)),
            ),
        }
    }

    /// A job ended: the next phase, and every waiter gets its answer.
    fn finish(&mut self, phase: Phase, result: JobResult) -> Phase {
        let waiters = phase.into_waiters();
        let now = self.now();
        self.last_job_ms = now;
        let (next, answer, forced_answer) = match result {
            JobResult::Refreshed {
                record,
                saved,
                started_ms,
            } => {
                self.record = record;
                self.issued_ms = started_ms;
                self.jitter_draw = rand::random();
                self.counters.refresh_count += 1;
                self.counters.last_refresh_at = Some(now / 1000);
                info!(
                    profile = %self.record.name,
                    generation = self.record.generation,
                    "access token refreshed"
                );
                let (next, answer) = self.after_save(saved, Fresh::Yes);
                (next, answer, None)
            }
            JobResult::Saved { saved } => {
                let (next, answer) = self.after_save(saved, Fresh::No);
                (next, answer, None)
            }
            JobResult::Rejected {
                detail,
                record,
                saved,
            } => {
                warn!(
                    profile = %self.record.name,
                    reason = %detail,
                    "the identity provider rejected the refresh token; a new login is required"
                );
                self.record = record;
                let delete = match saved {
                    Ok(()) => Delete::Done,
                    Err(e) => {
                        warn!(profile = %self.record.name, error = %e, "could not delete the dead refresh token from disk");
                        // Retried on the next turn, then with backoff.
                        Delete::RetryAt(now)
                    }
                };
                self.counters.refresh_failures += 1;
                self.counters.last_error = Some(detail);
                (Phase::Dead { delete }, Err(self.reauth_error()), None)
            }
            JobResult::ClientRejected {
                detail,
                record,
                saved,
            } => {
                let already = self.record.client_rejected.is_some();
                self.record = record;
                if !already {
                    // Once per rejection, not per forced retry.
                    warn!(
                        profile = %self.record.name,
                        issuer = %self.record.issuer,
                        client_id = %self.record.client_id,
                        reason = %detail,
                        "the identity provider rejected the client (not the grant); the refresh token is kept; fix it with `broker-ctl client`"
                    );
                }
                if let Err(e) = saved {
                    // The refresh token on disk is unchanged; only the state flag is
                    // missing, so a restart would try the IdP once more.
                    warn!(profile = %self.record.name, error = %e, "could not record the client rejection on disk");
                }
                self.counters.refresh_failures += 1;
                self.counters.last_error = Some(detail);
                let next = Phase::ClientRejected;
                let answer = self.unexpired_or(&next, self.client_rejected_error());
                (next, answer, Some(Err(self.client_rejected_error())))
            }
            JobResult::Transient { detail } if self.record.client_rejected.is_some() => {
                // A forced retry of a rejected client that did not get an answer:
                // still rejected as far as anyone knows; no automatic retries.
                self.counters.refresh_failures += 1;
                self.counters.last_error = Some(detail.clone());
                warn!(profile = %self.record.name, error = %detail, "retrying the rejected client failed");
                let next = Phase::ClientRejected;
                let answer = self.unexpired_or(&next, self.client_rejected_error());
                let forced = BrokerError::IdpUnavailable {
                    retry_after_secs: 1,
                    detail,
                };
                (next, answer, Some(Err(forced)))
            }
            JobResult::Transient { detail } => {
                self.counters.refresh_failures += 1;
                self.counters.last_error = Some(detail.clone());
                let delay = self.backoff.next_delay();
                let until_ms = now + delay.as_millis() as u64;
                warn!(
                    profile = %self.record.name,
                    error = %detail,
                    retry_in_ms = delay.as_millis() as u64,
                    "token refresh failed; backing off"
                );
                let next = Phase::Backoff { until_ms };
                let answer = self.unexpired_or(&next, self.unavailable(until_ms));
                (next, answer, None)
            }
        };
        for waiter in waiters.plain {
            let _ = waiter.send(answer.clone());
        }
        let forced_answer = forced_answer.unwrap_or(answer);
        for waiter in waiters.forced {
            let _ = waiter.send(forced_answer.clone());
        }
        next
    }

    /// Common tail of a refresh or save: serve the token only once it is durable.
    /// A `fresh` token (just issued) goes to the waiters whatever its lifetime:
    /// it is the best the IdP gives, and refusing it would only make them ask
    /// again (contract §5).
    fn after_save(
        &mut self,
        saved: Result<(), String>,
        fresh: Fresh,
    ) -> (Phase, Result<Token, BrokerError>) {
        let dead = self.record.refresh_token.is_none();
        match saved {
            // The saved record is a dead grant's: reauth stays terminal.
            Ok(()) if dead => (
                Phase::Dead {
                    delete: Delete::Done,
                },
                Err(self.reauth_error()),
            ),
            Ok(()) => {
                self.backoff.reset();
                self.counters.last_error = None;
                let now = self.now();
                let answer = match self.record.token() {
                    Some(t) if fresh == Fresh::Yes || policy::unexpired(&t, now) => Ok(t),
                    // A token saved earlier that expired before its save succeeded.
                    Some(_) => Err(BrokerError::IdpUnavailable {
                        retry_after_secs: 1,
                        detail: "the token expired before it could be saved; the next request refreshes it".into(),
                    }),
                    None => Err(BrokerError::internal("the IdP returned no access token")),
                };
                (Phase::Ready, answer)
            }
            Err(e) if dead => {
                // Deleting a dead grant's token failed: still reauth for every
                // caller; retry on its own timer, or the next start would
                // present the dead token to the IdP again.
                warn!(profile = %self.record.name, error = %e, "could not delete the dead refresh token; will retry");
                let at = self.now() + self.backoff.next_delay().as_millis() as u64;
                (
                    Phase::Dead {
                        delete: Delete::RetryAt(at),
                    },
                    Err(self.reauth_error()),
                )
            }
            Err(e) => {
                // The rotated refresh token exists only in memory now. Keep it,
                // never serve its access token until it is on disk, retry the save.
                self.counters.refresh_failures += 1;
                let detail = format!("cannot save the rotated refresh token: {e}");
                warn!(profile = %self.record.name, error = %e, "saving the profile failed; will retry");
                self.counters.last_error = Some(detail.clone());
                let at = self.now() + self.backoff.next_delay().as_millis() as u64;
                (
                    Phase::Unsaved {
                        save: Save::RetryAt(at),
                    },
                    Err(BrokerError::internal(detail)),
                )
            }
        }
    }
}
