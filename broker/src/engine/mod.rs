//! The token engine: one actor task per profile, the only code that calls that
//! profile's token endpoint (contract §5).
//!
//! Where a refresh happens, and what triggers it:
//! - `trigger.rs`: the complete table of reasons a job starts (a request that
//!   no token serves, a client invalidating the current generation, a forced
//!   refresh, a new client credential, the proactive deadline, a write retry).
//! - `actor.rs`: the transitions; jobs start only in `Core::begin`.
//!   `state.rs`: what the actor owns besides its phase, and how it starts.
//! - `phase.rs`: the states, one `Phase` enum whose variants own their data.
//! - `job.rs`: the job runner, the only caller of [`TokenEndpoint::refresh`]
//!   and the engine's writes through [`Persist`].
//! - `publish.rs`: the [`Snapshot`] and watch events derived from the phase.
//! - `apply.rs`: how a job's outcome changes the record. `policy.rs`: pure timing rules.
//!
//! Invariants:
//! - At most one job (a token-endpoint call or a write retry) runs per profile,
//!   exactly while the phase says so (`Refreshing`, or a running save or
//!   delete). Every caller that needs its result waits on it (single-flight).
//! - All writes of a profile's file happen inside that profile's jobs or the actor
//!   itself (its first save in [`create`], its delete in [`EngineHandle::remove`]),
//!   so they are serialized; a replacement (import/login) waits for the running
//!   job to finish first.
//! - A rotated refresh token is saved before the new access token is served: a
//!   token whose record is not durable (`Unsaved`) is never handed out.
//! - After the IdP rejects the grant the phase is `Dead` and no refresh
//!   starts again until the record is replaced.
//! - After the IdP rejects the client (not the grant) the phase is
//!   `ClientRejected`: the refresh token stays on disk, and only a new client
//!   credential, a replacement or a forced refresh calls the IdP again.
//!
//! The fast path ([`EngineHandle::get_token`]) reads a published [`Snapshot`] and
//! does not touch the actor while the cached token is good enough.

mod actor;
mod apply;
mod job;
pub mod lifetime;
mod phase;
pub mod policy;
mod publish;
mod state;
mod trigger;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kontext_broker_protocol::codec::EncodedToken;
use kontext_broker_protocol::{
    BrokerError, ClientAuthMethod, ClientCredential, ProfileState, ProfileStatus, Secret, Token,
    WatchEvent,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::clock::Clock;
use crate::config::Config;
use crate::store::ProfileRecord;

pub use state::{create, spawn};

/// Tuning of the engines, from [`Config`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Fraction of the lifetime at which to refresh proactively.
    pub refresh_at: f64,
    /// Largest fraction of the lifetime by which a deadline is moved earlier.
    pub refresh_jitter: f64,
    /// First retry delay after a transient failure.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Randomize backoff delays (off only in tests that assert exact schedules).
    pub backoff_jitter: bool,
    /// "Session expired, run `…` to re-authenticate".
    pub reauth_message: String,
    /// Lifetime assumed for a token that states none (config `default_token_lifetime`), seconds.
    pub default_token_lifetime: u64,
    /// Per-profile overrides of `default_token_lifetime`.
    pub profile_token_lifetimes: std::collections::BTreeMap<String, u64>,
}

impl EngineConfig {
    /// Engine settings from the broker config.
    pub fn from_config(config: &Config) -> Self {
        EngineConfig {
            refresh_at: config.refresh_at,
            refresh_jitter: config.refresh_jitter,
            backoff_initial: Duration::from_secs(config.backoff_initial_secs),
            backoff_max: Duration::from_secs(config.backoff_max_secs),
            backoff_jitter: true,
            reauth_message: config.reauth_message(),
            default_token_lifetime: config.default_token_lifetime,
            profile_token_lifetimes: config
                .profiles
                .iter()
                .filter_map(|(name, p)| Some((name.clone(), p.default_token_lifetime?)))
                .collect(),
        }
    }

    /// The lifetime assumed for `profile`'s tokens that state none, seconds.
    pub fn default_lifetime(&self, profile: &str) -> u64 {
        self.profile_token_lifetimes
            .get(profile)
            .copied()
            .unwrap_or(self.default_token_lifetime)
    }
}

/// A successful token-endpoint answer.
#[derive(Debug)]
pub struct Refreshed {
    pub access_token: Secret,
    pub token_type: String,
    /// `None` when the IdP omitted `expires_in`.
    pub expires_in: Option<Duration>,
    /// `Some` when the IdP rotated the refresh token.
    pub refresh_token: Option<Secret>,
    /// `Some` when the IdP said which scopes were granted.
    pub scopes: Option<Vec<String>>,
    /// `Some` when client authentication had to fall back to the other secret
    /// method, which worked: remember it in the profile.
    pub client_auth_detected: Option<ClientAuthMethod>,
}

/// Why a refresh failed, classified as contract §5 requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshError {
    /// `invalid_grant`: the grant is dead.
    Rejected(String),
    /// `invalid_client` or `unauthorized_client`: the client is at fault; the grant is kept.
    ClientRejected(String),
    /// Anything else: network, timeout, 5xx, 429, `invalid_request`, garbage.
    Transient(String),
}

/// Calls a profile's token endpoint. The real one is [`crate::idp::Idp`].
pub trait TokenEndpoint: Send + Sync + 'static {
    /// Runs the refresh-token grant with `record`'s refresh token and client.
    fn refresh(&self, record: ProfileRecord)
        -> BoxFuture<'static, Result<Refreshed, RefreshError>>;
}

/// Durable storage of profile records. The real one is [`crate::store::Store`]
/// (its adapter is in `store/persist.rs`).
pub trait Persist: Send + Sync + 'static {
    /// Atomically replaces the record's file. Blocking; engines call it off the runtime.
    fn save(&self, record: &ProfileRecord) -> crate::Result<()>;
    /// Deletes the profile's file (durably). Blocking, like `save`.
    fn delete(&self, name: &str) -> crate::Result<()>;
}

/// What an engine needs from the outside world.
#[derive(Clone)]
pub struct EngineDeps {
    pub clock: Arc<dyn Clock>,
    pub endpoint: Arc<dyn TokenEndpoint>,
    pub persist: Arc<dyn Persist>,
    pub config: EngineConfig,
}

/// What the actor publishes for readers after every change.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The current token, only if durable and not reported rejected.
    pub token: Option<Token>,
    /// `token` as a ready `GetToken` answer frame, encoded once per publish.
    pub wire: Option<Arc<EncodedToken>>,
    /// Coarse phase, for the fast path and status.
    pub phase: PhaseKind,
    /// When a proactive refresh is due (wall ms), if a token exists.
    pub refresh_due_ms: Option<u64>,
    /// Status fields except the time-derived state.
    pub status: ProfileStatus,
    /// While the IdP rejects the client: the message for callers and watchers.
    pub client_rejected: Option<String>,
}

/// The coarse kind of the engine's `Phase` (`phase.rs`), derived from it alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseKind {
    /// `Ready`: no job; the token decides between valid and expired.
    Idle,
    /// A refresh or a save retry runs.
    Busy,
    /// A backoff, or an unsaved record waiting for its save retry, until `until_ms`.
    Backoff { until_ms: u64 },
    /// `Dead`: the grant is gone.
    ReauthRequired,
    /// The IdP rejects the client; the grant is kept.
    ClientRejected,
}

impl Snapshot {
    /// The profile's state at `now_ms`, as `status` shows it.
    pub fn state(&self, now_ms: u64) -> ProfileState {
        match self.phase {
            PhaseKind::Busy => ProfileState::Refreshing,
            PhaseKind::Backoff { .. } => ProfileState::Backoff,
            PhaseKind::ReauthRequired => ProfileState::ReauthRequired,
            PhaseKind::ClientRejected => ProfileState::ClientRejected,
            PhaseKind::Idle => match &self.token {
                Some(t) if policy::unexpired(t, now_ms) => ProfileState::Valid,
                _ => ProfileState::Expired,
            },
        }
    }
}

pub(crate) type Reply = oneshot::Sender<Result<Token, BrokerError>>;

/// Messages to the actor.
pub(crate) enum Command {
    GetToken {
        min_valid_secs: u64,
        reply: Reply,
    },
    Invalidate {
        generation: u64,
        reply: Reply,
    },
    Refresh {
        reply: Reply,
    },
    /// The fast path served a token past its refresh deadline: re-evaluate.
    Nudge,
    /// Replace the record (import or login); saved by the actor before use.
    Replace {
        record: Box<ProfileRecord>,
        reply: oneshot::Sender<crate::Result<ProfileStatus>>,
    },
    /// Replace the client credential, keep the grant, and refresh at once.
    SetClient {
        credential: ClientCredential,
        client_auth: Option<ClientAuthMethod>,
        reply: Reply,
    },
    /// Finish the running job, then stop and hand back the final record.
    Stop {
        reply: oneshot::Sender<ProfileRecord>,
    },
    /// Delete the profile's file after the running job; on success the actor
    /// hands back its last record and ends, on failure it keeps serving.
    Remove {
        reply: oneshot::Sender<crate::Result<ProfileRecord>>,
    },
}

/// A handle to one profile's engine. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    name: Arc<str>,
    tx: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Snapshot>,
    events: broadcast::Sender<WatchEvent>,
    last_served_ms: Arc<AtomicU64>,
    clock: Arc<dyn Clock>,
    reauth_message: Arc<str>,
}

impl EngineHandle {
    /// The profile name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A token valid for at least `min_valid_secs` (capped as contract §5 says).
    pub async fn get_token(&self, min_valid_secs: u64) -> Result<Token, BrokerError> {
        if let Some(token) = self.cached(min_valid_secs, |snap| snap.token.clone()) {
            return Ok(token);
        }
        self.ask(|reply| Command::GetToken {
            min_valid_secs,
            reply,
        })
        .await
    }

    /// The answer frame of a `GetToken` for `min_valid_secs` when the cached
    /// token serves it, without waiting or allocating; `None` means only the
    /// actor can answer ([`EngineHandle::get_token`]).
    pub fn cached_frame(&self, min_valid_secs: u64) -> Option<Arc<EncodedToken>> {
        self.cached(min_valid_secs, |snap| snap.wire.clone())
    }

    /// `pick(snapshot)` when the cached token serves `min_valid_secs` now.
    /// Synchronous: the snapshot's read lock is never held across an await.
    fn cached<T>(
        &self,
        min_valid_secs: u64,
        pick: impl FnOnce(&Snapshot) -> Option<T>,
    ) -> Option<T> {
        let now = self.clock.now_ms();
        let snap = self.snapshot.borrow();
        let token = snap.token.as_ref()?;
        if snap.phase == PhaseKind::ReauthRequired || !policy::serves(token, now, min_valid_secs) {
            return None;
        }
        let picked = pick(&snap)?;
        self.last_served_ms.store(now, Ordering::Relaxed);
        if snap.phase == PhaseKind::Idle && snap.refresh_due_ms.is_some_and(|d| now >= d) {
            // Past the proactive deadline: let the actor decide. A full
            // queue means it already has work, so dropping is fine.
            let _ = self.tx.try_send(Command::Nudge);
        }
        Some(picked)
    }

    /// A client says the token of `generation` was rejected.
    pub async fn invalidate(&self, generation: u64) -> Result<Token, BrokerError> {
        self.ask(|reply| Command::Invalidate { generation, reply })
            .await
    }

    /// Refreshes now, or joins the refresh already running.
    pub async fn refresh(&self) -> Result<Token, BrokerError> {
        self.ask(|reply| Command::Refresh { reply }).await
    }

    /// Replaces the record (after import or login), saving it first.
    pub async fn replace(&self, record: ProfileRecord) -> crate::Result<ProfileStatus> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Replace {
                record: Box::new(record),
                reply,
            })
            .await
            .map_err(|_| self.gone_internal())?;
        rx.await.map_err(|_| self.gone_internal())?
    }

    /// Replaces the client credential and method, keeps the grant, and refreshes
    /// at once; answers with the new token (or why there is none).
    pub async fn set_client(
        &self,
        credential: ClientCredential,
        client_auth: Option<ClientAuthMethod>,
    ) -> Result<Token, BrokerError> {
        self.ask(|reply| Command::SetClient {
            credential,
            client_auth,
            reply,
        })
        .await
    }

    /// Stops the engine after its running job (if any) has saved its result.
    /// Returns the final record, or `None` if the actor was already gone.
    pub async fn stop(&self) -> Option<ProfileRecord> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Stop { reply }).await.ok()?;
        rx.await.ok()
    }

    /// Logout's half of the engine: deletes the profile's file (after the
    /// running job, if any), then stops and returns the last record so its
    /// grant can be revoked. If the delete fails the engine keeps serving.
    pub async fn remove(&self) -> crate::Result<ProfileRecord> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Remove { reply })
            .await
            .map_err(|_| self.gone_internal())?;
        rx.await.map_err(|_| self.gone_internal())?
    }

    /// The profile's status at the current time.
    pub fn status(&self) -> ProfileStatus {
        let snap = self.snapshot.borrow();
        let mut status = snap.status.clone();
        status.state = snap.state(self.clock.now_ms());
        status
    }

    /// Subscribes to events, starting with the current state.
    pub fn subscribe(&self) -> (Vec<WatchEvent>, broadcast::Receiver<WatchEvent>) {
        // Subscribe before reading the snapshot so no change falls in between.
        let rx = self.events.subscribe();
        (self.current_events(), rx)
    }

    /// The events that describe the current state to a new (or lagging) watcher.
    pub fn current_events(&self) -> Vec<WatchEvent> {
        let snap = self.snapshot.borrow();
        let profile = self.name.to_string();
        let now = self.clock.now_ms();
        match (&snap.phase, &snap.token) {
            (PhaseKind::ReauthRequired, _) => vec![WatchEvent::ReauthRequired {
                profile,
                message: self.reauth_message.to_string(),
            }],
            (PhaseKind::ClientRejected, token) => {
                // The current token is still served while valid: say both.
                let mut events: Vec<WatchEvent> = token
                    .iter()
                    .filter(|t| policy::unexpired(t, now))
                    .map(|t| WatchEvent::Token {
                        profile: profile.clone(),
                        token: t.clone(),
                    })
                    .collect();
                events.push(WatchEvent::ClientRejected {
                    profile,
                    message: snap.client_rejected.clone().unwrap_or_default(),
                });
                events
            }
            (_, Some(token)) if policy::unexpired(token, now) => vec![WatchEvent::Token {
                profile,
                token: token.clone(),
            }],
            _ => vec![WatchEvent::State {
                profile,
                state: snap.state(now),
                generation: snap.status.generation,
                expires_at: snap.status.access_token_expires_at,
            }],
        }
    }

    /// The sender watchers subscribe to (the service also sends `Removed` on it).
    pub fn events(&self) -> &broadcast::Sender<WatchEvent> {
        &self.events
    }

    async fn ask(&self, make: impl FnOnce(Reply) -> Command) -> Result<Token, BrokerError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| self.gone())?;
        let result = rx.await.map_err(|_| self.gone())?;
        if result.is_ok() {
            self.last_served_ms
                .store(self.clock.now_ms(), Ordering::Relaxed);
        }
        result
    }

    /// What a caller hears when the actor is gone: the engine stopped under
    /// the request (shutdown, logout, lock or re-login), said as such.
    fn gone(&self) -> BrokerError {
        self.gone_internal().to_wire()
    }

    fn gone_internal(&self) -> crate::Error {
        crate::Error::EngineStopped(self.name.to_string())
    }
}

#[cfg(test)]
mod chaos_tests;
#[cfg(test)]
mod tests;
