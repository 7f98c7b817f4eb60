//! The per-profile actor: owns the record and the phase, runs one job at a time.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use kontext_broker_protocol::codec::EncodedToken;
use kontext_broker_protocol::{
    BrokerError, ClientAuthMethod, ClientCredential, ProfileState, ProfileStatus, Token, WatchEvent,
};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, info, warn};

use super::policy::{self, Backoff};
use super::{
    Command, EngineDeps, EngineHandle, PhaseKind, RefreshError, Refreshed, Reply, Snapshot,
};
use crate::clock::MAX_SLEEP;
use crate::store::{ProfileRecord, StoredAccessToken};

/// Proactive refreshes never follow each other closer than this, whatever
/// lifetime the IdP claims (a lying `expires_in` must not become a busy loop).
const MIN_PROACTIVE_GAP_MS: u64 = 1000;

/// Commands queued per engine before senders wait.
const QUEUE: usize = 256;

/// Starts the engine of a new profile: saves `record` first (the engine is the
/// only writer of a profile's file), then runs it. Nothing runs if the save fails.
pub async fn create(
    record: ProfileRecord,
    deps: EngineDeps,
    events: broadcast::Sender<WatchEvent>,
) -> crate::Result<EngineHandle> {
    save(&deps, record.clone()).await?;
    Ok(spawn(record, deps, events))
}

/// Starts the engine for `record`, already on disk. `events` is the profile's
/// watcher channel; it outlives engines so watchers survive lock/unlock and re-login.
pub fn spawn(
    record: ProfileRecord,
    deps: EngineDeps,
    events: broadcast::Sender<WatchEvent>,
) -> EngineHandle {
    let (tx, rx) = mpsc::channel(QUEUE);
    let last_served_ms = Arc::new(AtomicU64::new(0));
    let backoff = Backoff::new(
        deps.config.backoff_initial,
        deps.config.backoff_max,
        deps.config.backoff_jitter,
    );
    let phase = Phase::of_record(&record);
    let counters = Counters {
        // Why the client was rejected before a restart, until a refresh says otherwise.
        last_error: record.client_rejected.clone(),
        ..Counters::default()
    };
    let mut actor = Actor {
        record,
        durable: true,
        rejected: false,
        phase,
        jitter_draw: rand::random(),
        issued_ms: 0,
        last_job_ms: 0,
        last_call_ms: None,
        dead_save_retry_ms: 0,
        backoff,
        counters,
        forced: Vec::new(),
        deps: deps.clone(),
        events: events.clone(),
        snapshot: watch::Sender::new(placeholder_snapshot()),
        last_served_ms: last_served_ms.clone(),
        published: Published::default(),
    };
    // `published` starts empty, so watchers that outlived a previous engine of
    // this profile (lock/unlock, re-login) get the current token pushed at once.
    let snapshot = actor.snapshot.subscribe();
    actor.publish();
    let handle = EngineHandle {
        name: actor.record.name.clone().into(),
        tx,
        snapshot,
        events,
        last_served_ms,
        clock: deps.clock.clone(),
        reauth_message: deps.config.reauth_message.clone().into(),
    };
    tokio::spawn(actor.run(rx));
    handle
}

/// Whether a token was just issued by the IdP (as opposed to saved again).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fresh {
    Yes,
    No,
}

/// Where the engine is. `Busy` exists exactly while a job runs.
enum Phase {
    /// No job. The token may be valid, due for refresh, or expired.
    Idle,
    /// A job runs; `waiters` get its outcome.
    Busy { waiters: Vec<Reply> },
    /// The last job failed transiently; no new job before `until_ms` unless forced.
    Backoff { until_ms: u64 },
    /// The grant is dead. Terminal until the record is replaced.
    ReauthRequired,
    /// The IdP rejected the client; the grant is kept. Left by a new client
    /// credential, a replacement, or a forced refresh that succeeds.
    ClientRejected,
}

impl Phase {
    /// The phase a loaded (or replacing) record starts in.
    fn of_record(record: &ProfileRecord) -> Phase {
        if record.refresh_token.is_none() {
            Phase::ReauthRequired
        } else if record.client_rejected.is_some() {
            Phase::ClientRejected
        } else {
            Phase::Idle
        }
    }

    fn kind(&self) -> PhaseKind {
        match self {
            Phase::Idle => PhaseKind::Idle,
            Phase::Busy { .. } => PhaseKind::Busy,
            Phase::Backoff { until_ms } => PhaseKind::Backoff {
                until_ms: *until_ms,
            },
            Phase::ReauthRequired => PhaseKind::ReauthRequired,
            Phase::ClientRejected => PhaseKind::ClientRejected,
        }
    }
}

/// Work done off the actor.
enum Job {
    /// Wait until `not_before_ms` (the one-call-per-second rule), call the
    /// token endpoint, then save the result.
    Refresh {
        record: ProfileRecord,
        not_before_ms: u64,
    },
    /// Retry saving a record whose save failed (it holds a rotated refresh token).
    Save(ProfileRecord),
}

enum JobResult {
    Refreshed {
        record: ProfileRecord,
        saved: Result<(), String>,
        /// Precise wall time (ms) the refresh request started.
        started_ms: u64,
    },
    Saved {
        saved: Result<(), String>,
    },
    Rejected {
        detail: String,
        record: ProfileRecord,
        saved: Result<(), String>,
    },
    ClientRejected {
        detail: String,
        record: ProfileRecord,
        saved: Result<(), String>,
    },
    Transient {
        detail: String,
    },
}

#[derive(Default)]
struct Counters {
    refresh_count: u64,
    refresh_failures: u64,
    last_refresh_at: Option<u64>,
    last_error: Option<String>,
}

/// What watchers were last told, so every change is pushed exactly once.
#[derive(Default)]
struct Published {
    state: Option<ProfileState>,
    token_generation: u64,
}

struct Actor {
    /// Newest known record. Ahead of the disk exactly when `durable` is false.
    record: ProfileRecord,
    durable: bool,
    /// A client reported the current generation rejected; do not serve it again.
    rejected: bool,
    phase: Phase,
    /// Drawn once per token so its deadline does not move between checks.
    jitter_draw: f64,
    /// Precise time the current token was requested; its `issued_at` is floored.
    issued_ms: u64,
    /// When the last job finished (ms), to space proactive refreshes.
    last_job_ms: u64,
    /// When the last token-endpoint call started (or will start), ms; the next
    /// one starts at least [`policy::MIN_CALL_GAP_MS`] later.
    last_call_ms: Option<u64>,
    /// When to retry deleting a dead grant's refresh token whose deletion failed.
    dead_save_retry_ms: u64,
    backoff: Backoff,
    counters: Counters,
    /// Callers of a forced refresh (`Refresh`, `SetClient`) waiting on the job:
    /// unlike other waiters they learn that the client was rejected even while
    /// the old token is still valid.
    forced: Vec<Reply>,
    deps: EngineDeps,
    events: broadcast::Sender<WatchEvent>,
    snapshot: watch::Sender<Snapshot>,
    last_served_ms: Arc<AtomicU64>,
    published: Published,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<JobResult>();
        loop {
            // Deadlines are evaluated on every turn, not only when a timer fires,
            // so a deadline that passed while the actor was busy (or not yet
            // running) is never missed.
            if let Some(job) = self.on_wake() {
                self.start(job, done_tx.clone());
                self.publish();
            }
            let sleep = self.deps.clock.sleep(self.next_wake_in());
            let job = tokio::select! {
                Some(result) = done_rx.recv() => {
                    self.finish(result);
                    None
                }
                command = rx.recv() => match command {
                    None => break,
                    Some(Command::Stop { reply }) => {
                        self.wait_for_job(&mut done_rx).await;
                        self.last_save_before_stop().await;
                        let _ = reply.send(self.record.clone());
                        break;
                    }
                    Some(Command::Remove { reply }) => {
                        self.wait_for_job(&mut done_rx).await;
                        match delete(&self.deps, self.record.name.clone()).await {
                            Ok(()) => {
                                // A handle that outlives the profile serves nothing.
                                self.snapshot.send_modify(|snap| {
                                    snap.token = None;
                                    snap.wire = None;
                                });
                                let _ = reply.send(Ok(self.record.clone()));
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
                    Some(command) => self.handle(command),
                },
                () = sleep => None,
            };
            if let Some(job) = job {
                self.start(job, done_tx.clone());
            }
            self.publish();
        }
        debug!(profile = %self.record.name, "engine stopped");
    }

    fn now(&self) -> u64 {
        self.deps.clock.now_ms()
    }

    /// The current token if it may be served at all (durable, not rejected).
    fn serveable(&self) -> Option<Token> {
        (self.durable && !self.rejected)
            .then(|| self.record.token())
            .flatten()
    }

    fn reauth_error(&self) -> BrokerError {
        BrokerError::ReauthRequired {
            profile: self.record.name.clone(),
            message: self.deps.config.reauth_message.clone(),
        }
    }

    /// What callers get while the IdP rejects the client: who, and the fix.
    fn client_rejected_error(&self) -> BrokerError {
        BrokerError::ClientRejected {
            profile: self.record.name.clone(),
            message: self.client_rejected_message(),
        }
    }

    fn client_rejected_message(&self) -> String {
        let r = &self.record;
        let why = r.client_rejected.as_deref().unwrap_or("invalid_client");
        let fix = if r.client_key.is_some() {
            "--client-key-file F"
        } else {
            "--client-secret-file F"
        };
        format!(
            "the identity provider {} rejected client `{}` ({why}); the session is kept: \
             give the client's current credential with `broker-ctl client --profile {} {fix}` \
             (add `--client-auth METHOD` if the server requires another method), and it refreshes at once",
            r.issuer, r.client_id, r.name
        )
    }

    fn unavailable(&self, until_ms: u64) -> BrokerError {
        let wait_ms = until_ms.saturating_sub(self.now());
        BrokerError::IdpUnavailable {
            retry_after_secs: wait_ms.div_ceil(1000).max(1),
            detail: self
                .counters
                .last_error
                .clone()
                .unwrap_or_else(|| "refresh failed".into()),
        }
    }

    /// True when the record holds no refresh token: the grant is dead, whatever
    /// job (such as retrying the deletion of the dead token) is running.
    fn grant_dead(&self) -> bool {
        self.record.refresh_token.is_none()
    }

    fn handle(&mut self, command: Command) -> Option<Job> {
        self.end_backoff_if_due();
        if self.grant_dead() {
            if let Command::GetToken { reply, .. }
            | Command::Invalidate { reply, .. }
            | Command::Refresh { reply } = command
            {
                let _ = reply.send(Err(self.reauth_error()));
                return None;
            }
        }
        match command {
            Command::GetToken {
                min_valid_secs,
                reply,
            } => self.on_get(min_valid_secs, reply),
            Command::Invalidate { generation, reply } => self.on_invalidate(generation, reply),
            Command::Refresh { reply } => match &mut self.phase {
                Phase::ReauthRequired => {
                    let _ = reply.send(Err(self.reauth_error()));
                    None
                }
                Phase::Busy { .. } => {
                    self.forced.push(reply);
                    None
                }
                // A user asked explicitly, so this may cut a backoff short, and
                // tries a rejected client once more.
                Phase::Idle | Phase::Backoff { .. } | Phase::ClientRejected => {
                    self.forced.push(reply);
                    Some(self.begin(Vec::new()))
                }
            },
            Command::Nudge => self.on_wake(),
            Command::Replace { .. }
            | Command::Stop { .. }
            | Command::Remove { .. }
            | Command::SetClient { .. } => {
                unreachable!("handled in run")
            }
        }
    }

    fn on_get(&mut self, min_valid_secs: u64, reply: Reply) -> Option<Job> {
        let now = self.now();
        let token = self.serveable();
        let good = token
            .as_ref()
            .filter(|t| policy::serves(t, now, min_valid_secs));
        if let (Some(token), false) = (good, matches!(self.phase, Phase::ReauthRequired)) {
            let _ = reply.send(Ok(token.clone()));
            return None;
        }
        match &mut self.phase {
            Phase::ReauthRequired => {
                let _ = reply.send(Err(self.reauth_error()));
                None
            }
            Phase::Busy { waiters } => {
                waiters.push(reply);
                None
            }
            Phase::ClientRejected => {
                // The current token is served while valid; no IdP call.
                let answer = match token.filter(|t| policy::unexpired(t, now)) {
                    Some(t) => Ok(t),
                    None => Err(self.client_rejected_error()),
                };
                let _ = reply.send(answer);
                None
            }
            Phase::Backoff { until_ms } => {
                // Serve whatever validity is left rather than nothing (contract §5).
                let until_ms = *until_ms;
                let answer = match token.filter(|t| policy::unexpired(t, now)) {
                    Some(t) => Ok(t),
                    None => Err(self.unavailable(until_ms)),
                };
                let _ = reply.send(answer);
                None
            }
            Phase::Idle => Some(self.begin(vec![reply])),
        }
    }

    fn on_invalidate(&mut self, generation: u64, reply: Reply) -> Option<Job> {
        if generation != self.record.generation {
            // An older token: the current one is already newer, no IdP call.
            return self.on_get(0, reply);
        }
        match &mut self.phase {
            Phase::ReauthRequired => {
                let _ = reply.send(Err(self.reauth_error()));
                None
            }
            Phase::Busy { waiters } => {
                self.rejected = true;
                waiters.push(reply);
                None
            }
            Phase::Backoff { until_ms } => {
                let until_ms = *until_ms;
                self.rejected = true;
                let _ = reply.send(Err(self.unavailable(until_ms)));
                None
            }
            Phase::ClientRejected => {
                self.rejected = true;
                let _ = reply.send(Err(self.client_rejected_error()));
                None
            }
            Phase::Idle => {
                self.rejected = true;
                Some(self.begin(vec![reply]))
            }
        }
    }

    /// A backoff whose time has come is over, whether or not its timer fired yet.
    fn end_backoff_if_due(&mut self) {
        if let Phase::Backoff { until_ms } = self.phase {
            if self.now() >= until_ms {
                self.phase = Phase::Idle;
            }
        }
    }

    /// Every turn and on a nudge: retry a failed save, or refresh proactively.
    fn on_wake(&mut self) -> Option<Job> {
        let now = self.now();
        self.end_backoff_if_due();
        if matches!(self.phase, Phase::ReauthRequired) && !self.durable {
            // Deleting the dead refresh token failed: keep trying, or the next
            // start would present it to the IdP again.
            return (now >= self.dead_save_retry_ms).then(|| self.begin(Vec::new()));
        }
        if !matches!(self.phase, Phase::Idle) {
            return None;
        }
        if !self.durable {
            return Some(self.begin(Vec::new()));
        }
        // `last_job_ms` later than now means the clock went back: ignore it.
        let spaced = self.last_job_ms > now || now >= self.last_job_ms + MIN_PROACTIVE_GAP_MS;
        let due = self.refresh_due_ms().is_some_and(|due| now >= due) && spaced;
        (due && self.in_use(now)).then(|| self.begin(Vec::new()))
    }

    /// Proactive refresh runs only while someone uses the profile (contract §5).
    fn in_use(&self, now: u64) -> bool {
        if self.events.receiver_count() > 0 {
            return true;
        }
        let last = self.last_served_ms.load(Ordering::Relaxed);
        let lifetime = self.record.token().map_or(0, |t| policy::lifetime_ms(&t));
        last > 0 && last + lifetime > now
    }

    fn refresh_due_ms(&self) -> Option<u64> {
        let cfg = &self.deps.config;
        self.record.token().map(|t| {
            policy::refresh_due_ms(
                &t,
                self.issued_ms,
                cfg.refresh_at,
                cfg.refresh_jitter,
                self.jitter_draw,
            )
        })
    }

    fn next_wake_in(&self) -> Duration {
        let now = self.now();
        let target = match self.phase {
            Phase::Backoff { until_ms } => Some(until_ms),
            Phase::Idle => {
                let expiry = self
                    .record
                    .token()
                    .map(|t| t.expires_at.saturating_mul(1000));
                let spacing = Some(self.last_job_ms + MIN_PROACTIVE_GAP_MS);
                [self.refresh_due_ms(), expiry, spacing]
                    .into_iter()
                    .flatten()
                    .filter(|&t| t > now)
                    .min()
            }
            Phase::ReauthRequired if !self.durable => Some(self.dead_save_retry_ms),
            Phase::Busy { .. } | Phase::ReauthRequired | Phase::ClientRejected => None,
        };
        target.map_or(MAX_SLEEP, |t| {
            Duration::from_millis(t.saturating_sub(now)).min(MAX_SLEEP)
        })
    }

    fn begin(&mut self, waiters: Vec<Reply>) -> Job {
        self.phase = Phase::Busy { waiters };
        if self.durable {
            // The job waits out the gap itself, as `Busy`: requests keep
            // joining it, so the gap never turns into extra calls.
            let not_before_ms = policy::next_call_ms(self.last_call_ms, self.now());
            self.last_call_ms = Some(not_before_ms);
            Job::Refresh {
                record: self.record.clone(),
                not_before_ms,
            }
        } else {
            Job::Save(self.record.clone())
        }
    }

    fn start(&self, job: Job, done: mpsc::UnboundedSender<JobResult>) {
        let deps = self.deps.clone();
        tokio::spawn(async move {
            let result = AssertUnwindSafe(run_job(job, deps))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| JobResult::Transient {
                    detail: "internal error: refresh task panicked".into(),
                });
            let _ = done.send(result);
        });
    }

    async fn wait_for_job(&mut self, done_rx: &mut mpsc::UnboundedReceiver<JobResult>) {
        if matches!(self.phase, Phase::Busy { .. }) {
            if let Some(result) = done_rx.recv().await {
                self.finish(result);
            }
        }
    }

    fn take_waiters(&mut self) -> Vec<Reply> {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Busy { waiters } => waiters,
            other => {
                self.phase = other;
                Vec::new()
            }
        }
    }

    fn finish(&mut self, result: JobResult) {
        let waiters = self.take_waiters();
        let forced = std::mem::take(&mut self.forced);
        let now = self.now();
        self.last_job_ms = now;
        let mut forced_answer = None;
        let answer: Result<Token, BrokerError> = match result {
            JobResult::Refreshed {
                record,
                saved,
                started_ms,
            } => {
                self.record = record;
                self.issued_ms = started_ms;
                self.rejected = false;
                self.jitter_draw = rand::random();
                self.counters.refresh_count += 1;
                self.counters.last_refresh_at = Some(now / 1000);
                info!(
                    profile = %self.record.name,
                    generation = self.record.generation,
                    "access token refreshed"
                );
                self.after_save(saved, Fresh::Yes)
            }
            JobResult::Saved { saved } => self.after_save(saved, Fresh::No),
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
                self.durable = saved.is_ok();
                if let Err(e) = saved {
                    warn!(profile = %self.record.name, error = %e, "could not delete the dead refresh token from disk");
                }
                self.counters.refresh_failures += 1;
                self.counters.last_error = Some(detail);
                self.phase = Phase::ReauthRequired;
                Err(self.reauth_error())
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
                self.phase = Phase::ClientRejected;
                forced_answer = Some(Err(self.client_rejected_error()));
                match self.serveable().filter(|t| policy::unexpired(t, now)) {
                    Some(t) => Ok(t),
                    None => Err(self.client_rejected_error()),
                }
            }
            JobResult::Transient { detail } if self.record.client_rejected.is_some() => {
                // A forced retry of a rejected client that did not get an answer:
                // still rejected as far as anyone knows; no automatic retries.
                self.counters.refresh_failures += 1;
                self.counters.last_error = Some(detail.clone());
                warn!(profile = %self.record.name, error = %detail, "retrying the rejected client failed");
                self.phase = Phase::ClientRejected;
                let detail_error = BrokerError::IdpUnavailable {
                    retry_after_secs: 1,
                    detail,
                };
                forced_answer = Some(Err(detail_error.clone()));
                match self.serveable().filter(|t| policy::unexpired(t, now)) {
                    Some(t) => Ok(t),
                    None => Err(self.client_rejected_error()),
                }
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
                self.phase = Phase::Backoff { until_ms };
                match self.serveable().filter(|t| policy::unexpired(t, now)) {
                    Some(t) => Ok(t),
                    None => Err(self.unavailable(until_ms)),
                }
            }
        };
        for waiter in waiters {
            let _ = waiter.send(answer.clone());
        }
        let forced_answer = forced_answer.unwrap_or(answer);
        for waiter in forced {
            let _ = waiter.send(forced_answer.clone());
        }
    }

    /// Common tail of a refresh or save: serve the token only once it is durable.
    /// A `fresh` token (just issued) goes to the waiters whatever its lifetime:
    /// it is the best the IdP gives, and refusing it would only make them ask
    /// again (contract §5).
    fn after_save(
        &mut self,
        saved: Result<(), String>,
        fresh: Fresh,
    ) -> Result<Token, BrokerError> {
        match saved {
            Ok(()) if self.record.refresh_token.is_none() => {
                // The saved record is a dead grant's: reauth stays terminal.
                self.durable = true;
                self.phase = Phase::ReauthRequired;
                Err(self.reauth_error())
            }
            Ok(()) => {
                self.durable = true;
                self.backoff.reset();
                self.counters.last_error = None;
                self.phase = Phase::Idle;
                let now = self.now();
                match self.record.token() {
                    Some(t) if fresh == Fresh::Yes || policy::unexpired(&t, now) => Ok(t),
                    // A token saved earlier that expired before its save succeeded.
                    Some(_) => Err(BrokerError::IdpUnavailable {
                        retry_after_secs: 1,
                        detail: "the token expired before it could be saved; the next request refreshes it".into(),
                    }),
                    None => Err(BrokerError::internal("the IdP returned no access token")),
                }
            }
            Err(e) if self.record.refresh_token.is_none() => {
                // Deleting a dead grant's token failed: still reauth for every
                // caller; retry the save on its own timer.
                self.durable = false;
                warn!(profile = %self.record.name, error = %e, "could not delete the dead refresh token; will retry");
                self.dead_save_retry_ms = self.now() + self.backoff.next_delay().as_millis() as u64;
                self.phase = Phase::ReauthRequired;
                Err(self.reauth_error())
            }
            Err(e) => {
                // The rotated refresh token exists only in memory now. Keep it,
                // never serve its access token until it is on disk, retry the save.
                self.durable = false;
                self.counters.refresh_failures += 1;
                let detail = format!("cannot save the rotated refresh token: {e}");
                warn!(profile = %self.record.name, error = %e, "saving the profile failed; will retry");
                self.counters.last_error = Some(detail.clone());
                let until_ms = self.now() + self.backoff.next_delay().as_millis() as u64;
                self.phase = Phase::Backoff { until_ms };
                Err(BrokerError::internal(detail))
            }
        }
    }

    /// A record that exists only in memory holds the only valid refresh token:
    /// one last try to save it before the engine goes away.
    async fn last_save_before_stop(&mut self) {
        if self.durable {
            return;
        }
        match save(&self.deps, self.record.clone()).await {
            Ok(()) => self.durable = true,
            Err(e) => tracing::error!(
                profile = %self.record.name,
                error = %e,
                "stopping with an unsaved rotated refresh token; a new login will be needed"
            ),
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
        if self.grant_dead() {
            let _ = reply.send(Err(self.reauth_error()));
            return None;
        }
        let mut record = self.record.clone();
        (record.client_secret, record.client_key) = match credential {
            ClientCredential::None => (None, None),
            ClientCredential::Secret(s) => (Some(s), None),
            ClientCredential::PrivateKey(k) => (None, Some(k)),
        };
        record.client_auth = client_auth;
        record.client_rejected = None;
        if let Err(e) = save(&self.deps, record.clone()).await {
            let _ = reply.send(Err(e.to_wire()));
            return None;
        }
        info!(profile = %record.name, "client credential replaced; refreshing");
        self.record = record;
        self.durable = true;
        self.backoff.reset();
        self.counters.last_error = None;
        self.forced.push(reply);
        Some(self.begin(Vec::new()))
    }

    async fn replace(&mut self, mut record: ProfileRecord) -> crate::Result<ProfileStatus> {
        // Generations only grow, so watchers always see a re-login as a new token.
        record.generation = record.generation.max(self.record.generation + 1);
        save(&self.deps, record.clone()).await?;
        self.phase = Phase::of_record(&record);
        self.record = record;
        self.issued_ms = 0;
        self.durable = true;
        self.rejected = false;
        self.jitter_draw = rand::random();
        self.backoff.reset();
        self.counters.last_error = None;
        self.publish();
        Ok(self.snapshot.borrow().status.clone())
    }

    /// Publishes the snapshot and pushes what changed to watchers.
    fn publish(&mut self) {
        let now = self.now();
        let token = self.serveable();
        let snapshot = Snapshot {
            // Encoded here, once per change, so cached answers cost a copy only.
            wire: token
                .as_ref()
                .and_then(|t| EncodedToken::new(t).ok())
                .map(Arc::new),
            token: token.clone(),
            // What callers see follows the record: a dead grant reads as
            // reauth_required even while its deletion is being retried.
            phase: if self.grant_dead() {
                PhaseKind::ReauthRequired
            } else {
                self.phase.kind()
            },
            refresh_due_ms: self.refresh_due_ms(),
            status: self.status(),
            client_rejected: matches!(self.phase, Phase::ClientRejected)
                .then(|| self.client_rejected_message()),
        };
        let state = snapshot.state(now);
        let mut status = snapshot.status.clone();
        status.state = state;
        self.snapshot.send_replace(Snapshot { status, ..snapshot });

        let profile = self.record.name.clone();
        let event = match token {
            Some(token)
                if token.generation != self.published.token_generation
                    && policy::unexpired(&token, now) =>
            {
                self.published.token_generation = token.generation;
                Some(WatchEvent::Token { profile, token })
            }
            _ if self.published.state == Some(state) => None,
            _ if state == ProfileState::ReauthRequired => Some(WatchEvent::ReauthRequired {
                profile,
                message: self.deps.config.reauth_message.clone(),
            }),
            _ if state == ProfileState::ClientRejected => Some(WatchEvent::ClientRejected {
                profile,
                message: self.client_rejected_message(),
            }),
            _ => Some(WatchEvent::State {
                profile,
                state,
                generation: self.record.generation,
                expires_at: self.record.access_token.as_ref().map(|a| a.expires_at),
            }),
        };
        self.published.state = Some(state);
        if let Some(event) = event {
            // No receivers is fine: nobody is watching.
            let _ = self.events.send(event);
        }
    }

    fn status(&self) -> ProfileStatus {
        let r = &self.record;
        let next_refresh_at = match self.phase {
            Phase::Backoff { until_ms } => Some(until_ms / 1000),
            Phase::Idle => self.refresh_due_ms().map(|ms| ms / 1000),
            Phase::Busy { .. } | Phase::ReauthRequired | Phase::ClientRejected => None,
        };
        ProfileStatus {
            name: r.name.clone(),
            issuer: r.issuer.clone(),
            client_id: r.client_id.clone(),
            subject: r.subject.clone(),
            state: ProfileState::Valid,
            access_token_expires_at: r.access_token.as_ref().map(|a| a.expires_at),
            generation: r.generation,
            refresh_count: self.counters.refresh_count,
            refresh_failures: self.counters.refresh_failures,
            last_refresh_at: self.counters.last_refresh_at,
            next_refresh_at,
            last_error: self.counters.last_error.clone(),
            lifetime_source: r.access_token.as_ref().and_then(|a| a.lifetime_source),
        }
    }
}

fn placeholder_snapshot() -> Snapshot {
    Snapshot {
        token: None,
        wire: None,
        phase: PhaseKind::Idle,
        refresh_due_ms: None,
        status: ProfileStatus {
            name: String::new(),
            issuer: String::new(),
            client_id: String::new(),
            subject: None,
            state: ProfileState::Expired,
            access_token_expires_at: None,
            generation: 0,
            refresh_count: 0,
            refresh_failures: 0,
            last_refresh_at: None,
            next_refresh_at: None,
            last_error: None,
            lifetime_source: None,
        },
        client_rejected: None,
    }
}

async fn run_job(job: Job, deps: EngineDeps) -> JobResult {
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
            refresh_job(record, deps, started_ms).await
        }
    }
}

async fn refresh_job(record: ProfileRecord, deps: EngineDeps, started_ms: u64) -> JobResult {
    {
        match deps.endpoint.refresh(record.clone()).await {
            Ok(refreshed) => {
                // The IdP may have rotated the refresh token: the answer exists
                // only in memory until it is on disk, and a kill -9 now loses
                // the grant (docs/security.md). So nothing (no logging, no
                // publishing, no await) comes between the answer and the save.
                let default_lifetime = deps.config.default_lifetime(&record.name);
                let record = apply(record, refreshed, started_ms / 1000, default_lifetime);
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
                // The dead refresh token (and its access token) leave memory and
                // disk; the metadata stays so a new login can reuse it.
                let mut record = record;
                record.refresh_token = None;
                record.access_token = None;
                record.client_rejected = None;
                let saved = save(&deps, record.clone()).await.map_err(|e| e.to_string());
                JobResult::Rejected {
                    detail,
                    record,
                    saved,
                }
            }
            Err(RefreshError::ClientRejected(detail)) => {
                // The client is at fault: the grant (and the refresh token on
                // disk) stays; the state survives a restart.
                let mut record = record;
                record.client_rejected = Some(detail.clone());
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
}

/// The record after a successful refresh at `now_secs`.
fn apply(
    mut record: ProfileRecord,
    refreshed: Refreshed,
    now_secs: u64,
    default_lifetime_secs: u64,
) -> ProfileRecord {
    let (lifetime, source) = super::lifetime::lifetime(
        refreshed.expires_in.map(|d| d.as_secs()),
        refreshed.access_token.expose(),
        now_secs,
        default_lifetime_secs,
    );
    let scopes = refreshed.scopes.unwrap_or_else(|| {
        record
            .access_token
            .as_ref()
            .map_or_else(|| record.scopes.clone(), |a| a.scopes.clone())
    });
    record.access_token = Some(StoredAccessToken {
        token: refreshed.access_token,
        token_type: refreshed.token_type,
        issued_at: now_secs,
        expires_at: now_secs + lifetime,
        scopes,
        lifetime_source: Some(source),
    });
    if let Some(rotated) = refreshed.refresh_token {
        record.refresh_token = Some(rotated);
    }
    if let Some(method) = refreshed.client_auth_detected {
        record.client_auth_detected = Some(method);
    }
    record.client_rejected = None;
    record.generation += 1;
    record
}

async fn delete(deps: &EngineDeps, name: String) -> crate::Result<()> {
    let persist = deps.persist.clone();
    tokio::task::spawn_blocking(move || persist.delete(&name))
        .await
        .map_err(|e| crate::Error::io("deleting the profile", std::io::Error::other(e)))?
}

async fn save(deps: &EngineDeps, record: ProfileRecord) -> crate::Result<()> {
    let persist = deps.persist.clone();
    tokio::task::spawn_blocking(move || persist.save(&record))
        .await
        .map_err(|e| crate::Error::io("saving the profile", std::io::Error::other(e)))?
}
