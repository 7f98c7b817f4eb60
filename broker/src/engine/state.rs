//! The actor's state besides its phase ([`Core`]: the record and its
//! bookkeeping), how an engine starts ([`create`], [`spawn`]), and the
//! read-only questions the transitions in `actor.rs` ask: what may be served,
//! what callers are told, and when the next turn is due.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kontext_broker_protocol::{BrokerError, Token, WatchEvent};
use tokio::sync::{broadcast, mpsc, watch};

use super::actor::Actor;
use super::job;
use super::phase::Phase;
use super::policy::{self, Backoff};
use super::publish::{placeholder_snapshot, Counters, Published};
use super::{EngineDeps, EngineHandle, Snapshot};
use crate::clock::MAX_SLEEP;
use crate::store::ProfileRecord;

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
    job::save(&deps, record.clone()).await?;
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
    let counters = Counters {
        // Why the client was rejected before a restart, until a refresh says otherwise.
        last_error: record.client_rejected.clone(),
        ..Counters::default()
    };
    let mut actor = Actor {
        phase: Phase::of_record(&record),
        core: Core {
            record,
            rejected_generation: None,
            jitter_draw: rand::random(),
            issued_ms: 0,
            last_job_ms: 0,
            last_call_ms: None,
            backoff,
            counters,
            deps: deps.clone(),
            events: events.clone(),
            snapshot: watch::Sender::new(placeholder_snapshot()),
            last_served_ms: last_served_ms.clone(),
            published: Published::default(),
        },
    };
    // `published` starts empty, so watchers that outlived a previous engine of
    // this profile (lock/unlock, re-login) get the current token pushed at once.
    let snapshot = actor.core.snapshot.subscribe();
    actor.publish();
    let handle = EngineHandle {
        name: actor.core.record.name.clone().into(),
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

/// Everything an actor owns besides its phase. Transitions get it by `&mut`
/// and the phase by value, so no code can read a phase that is being replaced.
pub(super) struct Core {
    /// Newest known record; ahead of the disk exactly when the phase is not
    /// [`Phase::on_disk`].
    pub record: ProfileRecord,
    /// A generation a client reported rejected: never served again. A fact
    /// about tokens, not a phase; generations only grow, so it never needs a reset.
    pub rejected_generation: Option<u64>,
    /// Drawn once per token so its deadline does not move between checks.
    pub jitter_draw: f64,
    /// Precise time the current token was requested; its `issued_at` is floored.
    pub issued_ms: u64,
    /// When the last job finished (ms), to space proactive refreshes.
    pub last_job_ms: u64,
    /// When the last token-endpoint call started (or will start), ms; the next
    /// one starts at least [`policy::MIN_CALL_GAP_MS`] later.
    pub last_call_ms: Option<u64>,
    /// Delays after transient failures and failed writes; reset by success.
    pub backoff: Backoff,
    /// Refresh counters shown in `status`.
    pub counters: Counters,
    /// Clock, token endpoint, storage and tuning.
    pub deps: EngineDeps,
    /// The profile's watcher channel (outlives the engine).
    pub events: broadcast::Sender<WatchEvent>,
    /// Where [`Core::publish`] puts what readers see.
    pub snapshot: watch::Sender<Snapshot>,
    /// When the fast path or the actor last served a token (ms), for "in use".
    pub last_served_ms: Arc<AtomicU64>,
    /// What watchers were last told.
    pub published: Published,
}

impl Core {
    /// The clock's wall time, ms.
    pub(super) fn now(&self) -> u64 {
        self.deps.clock.now_ms()
    }

    /// The current token if `phase` lets it be served at all: it is on disk,
    /// and no client reported its generation rejected.
    pub(super) fn serveable(&self, phase: &Phase) -> Option<Token> {
        if !phase.on_disk() || self.rejected_generation == Some(self.record.generation) {
            return None;
        }
        self.record.token()
    }

    /// What callers get once the grant is dead.
    pub(super) fn reauth_error(&self) -> BrokerError {
        BrokerError::ReauthRequired {
            profile: self.record.name.clone(),
            message: self.deps.config.reauth_message.clone(),
        }
    }

    /// What callers get while the IdP rejects the client: who, and the fix.
    pub(super) fn client_rejected_error(&self) -> BrokerError {
        BrokerError::ClientRejected {
            profile: self.record.name.clone(),
            message: self.client_rejected_message(),
        }
    }

    /// Who rejected which client, and the command that fixes it.
    pub(super) fn client_rejected_message(&self) -> String {
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

    /// What callers get while no token can be had before `until_ms`.
    pub(super) fn unavailable(&self, until_ms: u64) -> BrokerError {
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

    /// The current token if it is unexpired, else `otherwise`.
    pub(super) fn unexpired_or(
        &self,
        phase: &Phase,
        otherwise: BrokerError,
    ) -> Result<Token, BrokerError> {
        let now = self.now();
        self.serveable(phase)
            .filter(|t| policy::unexpired(t, now))
            .ok_or(otherwise)
    }

    /// The deadline passed, the last job is far enough back, and someone uses the profile.
    pub(super) fn proactive_due(&self, now: u64) -> bool {
        // `last_job_ms` later than now means the clock went back: ignore it.
        let spaced = self.last_job_ms > now || now >= self.last_job_ms + MIN_PROACTIVE_GAP_MS;
        let due = self.refresh_due_ms().is_some_and(|due| now >= due);
        spaced && due && self.in_use(now)
    }

    /// Proactive refresh runs only while someone uses the profile (contract §5).
    pub(super) fn in_use(&self, now: u64) -> bool {
        if self.events.receiver_count() > 0 {
            return true;
        }
        let last = self.last_served_ms.load(Ordering::Relaxed);
        let lifetime = self.record.token().map_or(0, |t| policy::lifetime_ms(&t));
        last > 0 && last + lifetime > now
    }

    /// When the current token is due for a proactive refresh (wall ms).
    pub(super) fn refresh_due_ms(&self) -> Option<u64> {
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

    /// How long the actor may sleep before its next turn in `phase`.
    pub(super) fn next_wake_in(&self, phase: &Phase) -> Duration {
        let now = self.now();
        let target = match phase {
            Phase::Ready => {
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
            other => other.retry_at(),
        };
        target.map_or(MAX_SLEEP, |t| {
            Duration::from_millis(t.saturating_sub(now)).min(MAX_SLEEP)
        })
    }
}
