//! Turns protocol requests into broker actions. The server calls [`Service`];
//! it knows nothing about sockets.
//!
//! Each profile has a [`Slot`]: its watcher channel plus what is known about it
//! ([`Entry`]): a running engine, a name only (the store is locked), or an error
//! (the file could not be read). The slot's channel outlives engines, so a watcher
//! keeps its subscription across lock/unlock and re-login.
//!
//! Admin operations (import, logout, lock, unlock) are serialized by one async
//! mutex; the token path only takes a short synchronous lock to find the engine.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Unbounded};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use futures::stream::{self, BoxStream, StreamExt};
use kontext_broker_protocol::codec::EncodedToken;
use kontext_broker_protocol::paths::is_valid_profile_name;
use kontext_broker_protocol::{
    BrokerError, BrokerStatus, ClientAuthMethod, ClientCredential, ImportRequest, ProfileState,
    ProfileStatus, Request, Response, Secret, SetClientRequest, StatusReport, WatchEvent,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::engine::{self, EngineConfig, EngineDeps, EngineHandle, TokenEndpoint};
use crate::idp::{self, Idp, TokenResponse};
use crate::store::{
    Endpoints, ProfileRecord, Store, StoreOptions, StoredAccessToken, UnlockThrottle,
    PROFILE_FORMAT_VERSION,
};
use crate::Error;

/// Encoded bytes of profile entries in one `status` page, with the broker
/// entry. The rest of the 64 KiB frame is headroom for the envelope (ids,
/// tags, `next_after`); every field of an entry is bounded (see
/// [`crate::bounds`]), so each entry is a few KiB at most.
const STATUS_PAGE_BUDGET: usize = kontext_broker_protocol::MAX_FRAME_LEN - 1024;

/// Bytes `value` takes on the wire.
fn encoded_len<T: serde::Serialize>(value: &T) -> usize {
    kontext_broker_protocol::codec::encode(value).map_or(usize::MAX / 2, |v| v.len())
}

/// Events buffered per profile for slow watchers; a watcher that falls further
/// behind is sent the current state instead of the backlog.
const WATCH_BUFFER: usize = 64;

/// Counters the server updates and `Status` reports.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections open now.
    pub connections: AtomicU64,
    /// Peers rejected because of their uid since start.
    pub rejected_peers: AtomicU64,
    /// Connections closed since start because no complete `Hello` came in time.
    pub handshake_timeouts: AtomicU64,
}

/// Paths the broker was started with, for `Status`.
#[derive(Debug, Clone)]
pub struct ServiceInfo {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
}

/// Pushed events for one `Watch` request.
pub type WatchStream = BoxStream<'static, WatchEvent>;

/// The broker's request handler. Cheap to clone; all clones share state.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    info: ServiceInfo,
    started: Instant,
    stats: Stats,
    shutdown: CancellationToken,
    store: Arc<Store>,
    idp: Idp,
    deps: EngineDeps,
    profiles: Mutex<BTreeMap<String, Slot>>,
    /// Set by `drain`: from then on no engine starts and no logout runs.
    closing: std::sync::atomic::AtomicBool,
    admin: tokio::sync::Mutex<()>,
    throttle: UnlockThrottle,
}

struct Slot {
    events: broadcast::Sender<WatchEvent>,
    entry: Entry,
}

enum Entry {
    /// The profile is loaded and its engine runs.
    Engine(Arc<EngineHandle>),
    /// The store is locked; only the name is known.
    Locked,
    /// The profile file could not be loaded.
    Failed { error: String },
    /// Logged out (or being logged out). The slot stays so watchers keep their
    /// subscription and see the next login of this name, whose generations
    /// continue above `last_generation`.
    Absent { last_generation: u64 },
}

impl Slot {
    fn new(entry: Entry) -> Slot {
        Slot {
            events: broadcast::channel(WATCH_BUFFER).0,
            entry,
        }
    }
}

impl Service {
    /// Opens the store in `info.state_dir`, loads every profile and starts engines.
    pub async fn open(config: Config, info: ServiceInfo) -> crate::Result<Service> {
        let store = Arc::new(Store::open(
            &info.state_dir,
            StoreOptions {
                identity: config.identity,
                scrypt_work_factor: config.scrypt_work_factor,
            },
        )?);
        // The daemon holds the instance lock by now, so no other broker is mid-write.
        match store.remove_stale_temp_files() {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "removed temp files left by an earlier crash"),
            Err(e) => warn!(error = %e, "could not remove stale temp files"),
        }
        let idp = Idp::new(&config)?;
        let endpoint: Arc<dyn TokenEndpoint> = Arc::new(idp.clone());
        Self::with_parts(config, info, store, idp, endpoint, Arc::new(SystemClock)).await
    }

    /// A service from explicit parts (tests inject a clock or token endpoint).
    pub async fn with_parts(
        config: Config,
        info: ServiceInfo,
        store: Arc<Store>,
        idp: Idp,
        endpoint: Arc<dyn TokenEndpoint>,
        clock: Arc<dyn Clock>,
    ) -> crate::Result<Service> {
        let deps = EngineDeps {
            clock,
            endpoint,
            persist: store.clone(),
            config: EngineConfig::from_config(&config),
        };
        let service = Service {
            inner: Arc::new(Inner {
                config,
                info,
                started: Instant::now(),
                stats: Stats::default(),
                shutdown: CancellationToken::new(),
                store,
                idp,
                deps,
                profiles: Mutex::new(BTreeMap::new()),
                closing: std::sync::atomic::AtomicBool::new(false),
                admin: tokio::sync::Mutex::new(()),
                throttle: UnlockThrottle::default(),
            }),
        };
        service.load_profiles().await?;
        Ok(service)
    }

    /// The broker's configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Counters shared with the server.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Cancelled when the broker should stop (a `Shutdown` request or a signal).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Handles every request except `Watch`.
    pub async fn call(&self, request: Request) -> Result<Response, BrokerError> {
        match request {
            Request::GetToken {
                profile,
                min_valid_secs,
            } => {
                let result = self.engine(&profile)?.get_token(min_valid_secs).await;
                self.explain_gone(&profile, result).map(Response::Token)
            }
            Request::Invalidate {
                profile,
                generation,
            } => {
                let result = self.engine(&profile)?.invalidate(generation).await;
                self.explain_gone(&profile, result).map(Response::Token)
            }
            Request::Refresh { profile } => {
                let result = self.engine(&profile)?.refresh().await;
                self.explain_gone(&profile, result).map(Response::Token)
            }
            Request::Status => Ok(Response::Status(self.status(None))),
            Request::StatusPage { after } => Ok(Response::Status(self.status(Some(&after)))),
            Request::Import(import) => self.import(import).await.map(Response::Imported),
            Request::Logout { profile, revoke } => self.logout(&profile, revoke).await,
            Request::Unlock { passphrase } => {
                self.unlock(passphrase).await.map(|()| Response::Done)
            }
            Request::Lock => self.lock().await.map(|()| Response::Done),
            Request::Shutdown => {
                info!("shutdown requested by a client");
                self.inner.shutdown.cancel();
                Ok(Response::Done)
            }
            Request::Ping => Ok(Response::Pong),
            Request::SetClient(set) => self.set_client(set).await.map(Response::Token),
            Request::Watch { .. } => Err(BrokerError::bad_request(
                "Watch is a subscription; the connection handler serves it",
            )),
        }
    }

    /// The ready answer frame of a `GetToken` that the profile's cached token
    /// serves, found without waiting or allocating. `None` means "ask [`Service::call`]",
    /// which also produces every error.
    pub fn cached_token_frame(
        &self,
        profile: &str,
        min_valid_secs: u64,
    ) -> Option<Arc<EncodedToken>> {
        let engine = match &self.lock_profiles().get(profile)?.entry {
            Entry::Engine(engine) => engine.clone(),
            _ => return None,
        };
        engine.cached_frame(min_valid_secs)
    }

    /// Subscribes to `profile`'s tokens and state changes. The stream starts with
    /// the current state and lives on through logout and a later login of the
    /// same name, so a long-running watcher never has to notice either.
    pub fn watch(&self, profile: &str) -> Result<WatchStream, BrokerError> {
        let (initial, rx) = {
            let profiles = self.lock_profiles();
            let slot = profiles.get(profile).ok_or_else(|| unknown(profile))?;
            let rx = slot.events.subscribe();
            (self.current_events(profile, &slot.entry), rx)
        };
        let service = self.clone();
        let name = profile.to_owned();
        let live = stream::unfold(Some(rx), move |rx| {
            let service = service.clone();
            let name = name.clone();
            async move {
                let mut rx = rx?;
                match rx.recv().await {
                    Ok(event) => Some((vec![event], Some(rx))),
                    // Too slow for the backlog: send where things stand now.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        Some((service.events_now(&name), Some(rx)))
                    }
                    Err(broadcast::error::RecvError::Closed) => None,
                }
            }
        })
        .flat_map(stream::iter);
        Ok(stream::iter(initial).chain(live).boxed())
    }

    /// Stops every engine after its running refresh has saved. Called at shutdown.
    pub async fn drain(&self) {
        let engines: Vec<_> = {
            let profiles = self.lock_profiles();
            // Under the same lock that every engine start takes, so no engine
            // can start after this list is made.
            self.inner.closing.store(true, Ordering::SeqCst);
            profiles
                .values()
                .filter_map(|slot| match &slot.entry {
                    Entry::Engine(engine) => Some(engine.clone()),
                    _ => None,
                })
                .collect()
        };
        futures::future::join_all(engines.iter().map(|e| e.stop())).await;
    }

    fn closing(&self) -> bool {
        self.inner.closing.load(Ordering::SeqCst)
    }

    fn lock_profiles(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Slot>> {
        self.inner
            .profiles
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The watcher channel of `profile`: the existing one, so watchers carry
    /// over to a new engine, or a new one.
    fn events_of(&self, profile: &str) -> broadcast::Sender<WatchEvent> {
        self.lock_profiles()
            .get(profile)
            .map(|s| s.events.clone())
            .unwrap_or_else(|| broadcast::channel(WATCH_BUFFER).0)
    }

    fn engine(&self, profile: &str) -> Result<Arc<EngineHandle>, BrokerError> {
        match self.lock_profiles().get(profile).map(|s| &s.entry) {
            Some(Entry::Engine(engine)) => Ok(engine.clone()),
            Some(Entry::Locked) => Err(BrokerError::Locked),
            Some(Entry::Failed { error }) => Err(BrokerError::internal(format!(
                "profile `{profile}` is unusable: {error}"
            ))),
            Some(Entry::Absent { .. }) | None => Err(unknown(profile)),
        }
    }

    /// An engine that stopped under a request (lock, logout, shutdown) answers
    /// "unknown profile"; say what really happened instead.
    fn explain_gone<T>(
        &self,
        profile: &str,
        result: Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        match result {
            Err(BrokerError::UnknownProfile { .. }) => match self.engine(profile) {
                Err(now) => Err(now),
                Ok(_) => Err(BrokerError::internal(
                    "the profile's engine stopped during the request (shutdown or re-login); retry",
                )),
            },
            other => other,
        }
    }

    fn events_now(&self, profile: &str) -> Vec<WatchEvent> {
        self.lock_profiles()
            .get(profile)
            .map(|slot| self.current_events(profile, &slot.entry))
            .unwrap_or_default()
    }

    fn current_events(&self, profile: &str, entry: &Entry) -> Vec<WatchEvent> {
        let state = match entry {
            Entry::Engine(engine) => return engine.current_events(),
            Entry::Locked => ProfileState::Locked,
            Entry::Failed { .. } => ProfileState::Error,
            Entry::Absent { .. } => {
                return vec![WatchEvent::Removed {
                    profile: profile.to_owned(),
                }]
            }
        };
        vec![WatchEvent::State {
            profile: profile.to_owned(),
            state,
            generation: 0,
            expires_at: None,
        }]
    }

    /// Fills the slots from the store: engines when unlocked, names when locked.
    async fn load_profiles(&self) -> crate::Result<()> {
        let store = self.inner.store.clone();
        let loaded = tokio::task::spawn_blocking(move || -> crate::Result<Vec<_>> {
            let names = store.profile_names()?;
            if store.is_locked() {
                return Ok(names.into_iter().map(|n| (n, Err(Error::Locked))).collect());
            }
            Ok(names
                .into_iter()
                .map(|n| {
                    let record = store.load(&n);
                    (n, record)
                })
                .collect())
        })
        .await
        .map_err(|e| Error::io("loading profiles", std::io::Error::other(e)))??;
        let mut profiles = self.lock_profiles();
        if self.closing() {
            return Err(Error::Invalid("the broker is shutting down".into()));
        }
        for (name, record) in loaded {
            if matches!(
                profiles.get(&name).map(|s| &s.entry),
                Some(Entry::Engine(_))
            ) {
                // Imported meanwhile; that engine is newer than the file we read.
                continue;
            }
            let entry = match record {
                Ok(mut record) => {
                    if let Some(table) = self.inner.config.profiles.get(&name) {
                        table.apply_to(&mut record.endpoints);
                    }
                    let events = profiles
                        .get(&name)
                        .map(|s| s.events.clone())
                        .unwrap_or_else(|| broadcast::channel(WATCH_BUFFER).0);
                    Entry::Engine(Arc::new(engine::spawn(
                        record,
                        self.inner.deps.clone(),
                        events,
                    )))
                }
                Err(Error::Locked) => Entry::Locked,
                Err(e) => {
                    warn!(profile = %name, error = %e, "profile could not be loaded");
                    Entry::Failed {
                        error: e.to_string(),
                    }
                }
            };
            match profiles.get_mut(&name) {
                Some(slot) => slot.entry = entry,
                None => {
                    let slot = match entry {
                        Entry::Engine(ref engine) => Slot {
                            events: engine.events().clone(),
                            entry,
                        },
                        other => Slot::new(other),
                    };
                    profiles.insert(name, slot);
                }
            }
        }
        Ok(())
    }

    /// One page of `status`: the profiles whose names sort after `after` (all
    /// from the first when `None`), as many as fit [`STATUS_PAGE_BUDGET`]
    /// encoded bytes; `next_after` names the last one when more follow.
    fn status(&self, after: Option<&str>) -> StatusReport {
        let broker = self.broker_status();
        let budget = STATUS_PAGE_BUDGET.saturating_sub(encoded_len(&broker));
        let mut used = 0;
        let mut profiles = Vec::new();
        let mut next_after = None;
        let slots = self.lock_profiles();
        let range = match after {
            Some(after) => slots.range::<str, _>((Excluded(after), Unbounded)),
            None => slots.range::<str, _>(..),
        };
        for (name, slot) in range {
            let status = match &slot.entry {
                Entry::Engine(engine) => engine.status(),
                Entry::Locked => bare_status(name, ProfileState::Locked, None),
                Entry::Failed { error } => {
                    bare_status(name, ProfileState::Error, Some(error.clone()))
                }
                Entry::Absent { .. } => continue,
            };
            let size = encoded_len(&status);
            if !profiles.is_empty() && used + size > budget {
                next_after = profiles.last().map(|p: &ProfileStatus| p.name.clone());
                break;
            }
            used += size;
            profiles.push(status);
        }
        StatusReport {
            broker,
            profiles,
            next_after,
        }
    }

    fn broker_status(&self) -> BrokerStatus {
        let stats = &self.inner.stats;
        BrokerStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            uptime_secs: self.inner.started.elapsed().as_secs(),
            socket: self.inner.info.socket.display().to_string(),
            state_dir: self.inner.info.state_dir.display().to_string(),
            locked: self.inner.store.is_locked(),
            connections: stats.connections.load(Ordering::Relaxed),
            rejected_peers: stats.rejected_peers.load(Ordering::Relaxed),
            handshake_timeouts: stats.handshake_timeouts.load(Ordering::Relaxed),
        }
    }

    /// `SetClient`: checks the new credential, then lets the profile's engine
    /// swap it in and refresh at once (the way out of `client_rejected`).
    async fn set_client(
        &self,
        set: SetClientRequest,
    ) -> Result<kontext_broker_protocol::Token, BrokerError> {
        check_credential(&set.credential, set.client_auth).map_err(|e| e.to_wire())?;
        let engine = self.engine(&set.profile)?;
        let result = engine.set_client(set.credential, set.client_auth).await;
        self.explain_gone(&set.profile, result)
    }

    async fn import(&self, import: ImportRequest) -> Result<ProfileStatus, BrokerError> {
        let record = self
            .record_from_import(import)
            .await
            .map_err(|e| e.to_wire())?;
        self.install(record).await.map_err(|e| e.to_wire())
    }

    /// Builds the record for an import: checks the name and response, discovers endpoints.
    async fn record_from_import(&self, import: ImportRequest) -> crate::Result<ProfileRecord> {
        if !is_valid_profile_name(&import.profile) {
            return Err(Error::InvalidProfileName(import.profile));
        }
        crate::bounds::check_import(&import)?;
        let response = TokenResponse::parse(import.token_response.expose())?;
        let Some(refresh_token) = response.refresh_token.clone() else {
            return Err(Error::Invalid(
                "the token response has no refresh_token; the broker needs one to keep the \
                 session alive (request the offline_access scope)"
                    .into(),
            ));
        };
        check_credential(&import.credential, import.client_auth)?;
        idp::validate_issuer(&import.issuer)?;
        let overrides = self
            .inner
            .config
            .merged_overrides(&import.profile, &import.endpoints);
        let endpoints =
            idp::discover_with(self.inner.idp.http(), &import.issuer, &overrides).await?;
        let default_lifetime = self
            .inner
            .config
            .default_token_lifetime_for(&import.profile);
        Ok(record_from_response(
            import,
            response,
            refresh_token,
            endpoints,
            self.inner.deps.clock.now_secs(),
            default_lifetime,
        ))
    }

    /// Saves `record` and starts (or updates) its engine. Watchers learn at once.
    pub async fn install(&self, record: ProfileRecord) -> crate::Result<ProfileStatus> {
        let _admin = self.inner.admin.lock().await;
        if self.inner.store.is_locked() {
            return Err(Error::Locked);
        }
        let name = record.name.clone();
        let existing = self
            .lock_profiles()
            .get(&name)
            .and_then(|s| match &s.entry {
                Entry::Engine(engine) => Some(engine.clone()),
                _ => None,
            });
        let status = match existing {
            Some(engine) => engine.replace(record).await?,
            None => {
                let mut record = record;
                if let Some(Entry::Absent { last_generation }) =
                    self.lock_profiles().get(&name).map(|s| &s.entry)
                {
                    // A stale client of the old session must not hit a live generation.
                    record.generation = record.generation.max(last_generation + 1);
                }
                let events = self.events_of(&name);
                // The engine saves the new profile before it runs (only an
                // engine writes a profile's file).
                let engine = Arc::new(
                    engine::create(record, self.inner.deps.clone(), events.clone()).await?,
                );
                let mut profiles = self.lock_profiles();
                if self.closing() {
                    return Err(Error::Invalid("the broker is shutting down".into()));
                }
                let status = engine.status();
                profiles.insert(
                    name.clone(),
                    Slot {
                        events,
                        entry: Entry::Engine(engine),
                    },
                );
                status
            }
        };
        info!(profile = %name, generation = status.generation, "profile imported");
        Ok(status)
    }

    async fn logout(&self, profile: &str, revoke: bool) -> Result<Response, BrokerError> {
        let _admin = self.inner.admin.lock().await;
        if self.closing() {
            return Err(BrokerError::bad_request(
                "the broker is shutting down; log out after it restarts",
            ));
        }
        // Hide the profile first, so nothing is served while it is revoked.
        let previous = {
            let mut profiles = self.lock_profiles();
            let slot = profiles.get_mut(profile).ok_or_else(|| unknown(profile))?;
            match &slot.entry {
                Entry::Locked => return Err(BrokerError::Locked),
                Entry::Absent { .. } => return Err(unknown(profile)),
                Entry::Engine(engine) => {
                    let last_generation = engine.status().generation;
                    std::mem::replace(&mut slot.entry, Entry::Absent { last_generation })
                }
                Entry::Failed { .. } => {
                    std::mem::replace(&mut slot.entry, Entry::Absent { last_generation: 0 })
                }
            }
        };
        // Delete first, through the engine (the only writer of the file); the
        // grant is revoked after, from the record the engine hands back. A
        // failed delete changes nothing: the profile is put back as it was.
        let record = match &previous {
            Entry::Engine(engine) => match engine.remove().await {
                Ok(record) => Some(record),
                Err(e) => return Err(self.restore(profile, previous, e)),
            },
            // An unreadable file has no engine; logout deletes it itself.
            _ => {
                let store = self.inner.store.clone();
                let name = profile.to_owned();
                match tokio::task::spawn_blocking(move || store.delete(&name)).await {
                    Ok(Ok(())) | Ok(Err(Error::UnknownProfile(_))) => None,
                    Ok(Err(e)) => return Err(self.restore(profile, previous, e)),
                    Err(e) => return Err(BrokerError::internal(e.to_string())),
                }
            }
        };
        let (revoked, revoke_error) = match (&record, revoke) {
            (_, false) => (false, Some("revocation skipped (--no-revoke)".to_owned())),
            (None, true) => (
                false,
                Some("the profile could not be read, so its refresh token is unknown".to_owned()),
            ),
            // The grant is already dead at the IdP: nothing to revoke, nothing failed.
            (Some(r), true) if r.refresh_token.is_none() => (false, None),
            (Some(r), true) => match self.revocation_target(r).await {
                None => (
                    false,
                    Some(
                        "the issuer advertises no revocation endpoint in either discovery document"
                            .to_owned(),
                    ),
                ),
                Some(target) => match idp::revoke(
                    self.inner.idp.http(),
                    &self.inner.idp.client_auth(&target),
                    &target,
                )
                .await
                {
                    Ok(()) => (true, None),
                    Err(e) => {
                        warn!(profile, error = %e, "revocation failed; the profile is deleted, its grant stays valid at the IdP");
                        (false, Some(e.to_string()))
                    }
                },
            },
        };
        if let Some(slot) = self.lock_profiles().get(profile) {
            let _ = slot.events.send(WatchEvent::Removed {
                profile: profile.to_owned(),
            });
        }
        info!(profile, revoked, "profile logged out");
        Ok(Response::LoggedOut {
            revoked,
            revoke_error,
        })
    }

    /// Puts a profile hidden by a logout back as it was, after its file could
    /// not be deleted; returns the error for the caller.
    fn restore(&self, profile: &str, previous: Entry, e: Error) -> BrokerError {
        warn!(profile, error = %e, "logout could not delete the profile; it stays");
        if let Some(slot) = self.lock_profiles().get_mut(profile) {
            slot.entry = previous;
        }
        e.to_wire()
    }

    /// `record` with a revocation endpoint, if one can be found. A profile saved
    /// before the broker read both discovery documents may lack one the issuer
    /// has: discovery runs again (best effort) in that case.
    async fn revocation_target(&self, record: &ProfileRecord) -> Option<ProfileRecord> {
        if record.endpoints.revocation.is_some() {
            return Some(record.clone());
        }
        let overrides = self.inner.config.endpoint_overrides(&record.name);
        match idp::discover_with(self.inner.idp.http(), &record.issuer, &overrides).await {
            Ok(endpoints) => endpoints.revocation.map(|revocation| {
                let mut target = record.clone();
                target.endpoints.revocation = Some(revocation);
                target
            }),
            Err(e) => {
                warn!(profile = %record.name, error = %e, "discovery for revocation failed");
                None
            }
        }
    }

    async fn unlock(&self, passphrase: Secret) -> Result<(), BrokerError> {
        // The throttle's penalty must not hold the admin lock (it would stall
        // imports and logouts). An import that slips in before the load below is
        // safe: `load_profiles` never replaces a running engine.
        self.inner
            .throttle
            .unlock(self.inner.store.clone(), passphrase)
            .await
            .map_err(|e| e.to_wire())?;
        let _admin = self.inner.admin.lock().await;
        let needs_load = self
            .lock_profiles()
            .values()
            .any(|s| matches!(s.entry, Entry::Locked));
        if needs_load {
            self.load_profiles().await.map_err(|e| e.to_wire())?;
        }
        info!("broker unlocked");
        Ok(())
    }

    async fn lock(&self) -> Result<(), BrokerError> {
        let _admin = self.inner.admin.lock().await;
        self.inner.store.lock();
        if !self.inner.store.is_locked() {
            return Err(BrokerError::bad_request(
                "this broker's identity cannot be locked; use identity = \"passphrase\" in the config",
            ));
        }
        let engines: Vec<(String, Arc<EngineHandle>)> = {
            let mut profiles = self.lock_profiles();
            profiles
                .iter_mut()
                .filter_map(|(name, slot)| {
                    match std::mem::replace(&mut slot.entry, Entry::Locked) {
                        Entry::Engine(engine) => Some((name.clone(), engine)),
                        other => {
                            slot.entry = other;
                            None
                        }
                    }
                })
                .collect()
        };
        // Each engine finishes (and saves) its running refresh, then drops its secrets.
        for (name, engine) in engines {
            engine.stop().await;
            let _ = engine.events().send(WatchEvent::State {
                profile: name,
                state: ProfileState::Locked,
                generation: 0,
                expires_at: None,
            });
        }
        info!("broker locked");
        Ok(())
    }
}

fn unknown(profile: &str) -> BrokerError {
    BrokerError::UnknownProfile {
        profile: profile.to_owned(),
    }
}

fn bare_status(name: &str, state: ProfileState, last_error: Option<String>) -> ProfileStatus {
    ProfileStatus {
        name: name.to_owned(),
        issuer: String::new(),
        client_id: String::new(),
        subject: None,
        state,
        access_token_expires_at: None,
        generation: 0,
        refresh_count: 0,
        refresh_failures: 0,
        last_refresh_at: None,
        next_refresh_at: None,
        last_error,
        lifetime_source: None,
    }
}

/// Checks a client credential (and method) sent with `Import` or `SetClient`:
/// an unusable key or a method that does not fit is refused before anything is saved.
fn check_credential(
    credential: &ClientCredential,
    method: Option<ClientAuthMethod>,
) -> crate::Result<()> {
    if let ClientCredential::Secret(s) | ClientCredential::PrivateKey(s) = credential {
        if s.is_empty() {
            return Err(Error::Invalid("the client credential is empty".into()));
        }
    }
    if let ClientCredential::PrivateKey(key) = credential {
        idp::client_auth::check_client_key(key)?;
    }
    if let Some(method) = method {
        idp::client_auth::check_method(credential, method)?;
    }
    Ok(())
}

/// The record for a token response obtained at `now_secs` (import or login).
/// Without `expires_in`, the lifetime is the access token's JWT `exp`, else
/// `default_lifetime_secs`.
pub fn record_from_response(
    import: ImportRequest,
    response: TokenResponse,
    refresh_token: Secret,
    endpoints: Endpoints,
    now_secs: u64,
    default_lifetime_secs: u64,
) -> ProfileRecord {
    let granted = response.scopes();
    let (lifetime, lifetime_source) = engine::lifetime::lifetime(
        response.expires_in,
        response.access_token.expose(),
        now_secs,
        default_lifetime_secs,
    );
    // An import may carry an already expired token (`expires_in: 0`): keep 0, so
    // the first request refreshes it instead of serving it for a second.
    let lifetime = if response.expires_in == Some(0) {
        0
    } else {
        lifetime
    };
    let mut secrets = idp::sanitize::Secrets::none();
    secrets.add(response.access_token.expose());
    secrets.add(refresh_token.expose());
    let subject = response
        .id_token
        .as_deref()
        .and_then(|t| idp::subject_from_id_token(t, &secrets));
    ProfileRecord {
        format_version: PROFILE_FORMAT_VERSION,
        name: import.profile,
        issuer: import.issuer,
        client_id: import.client_id,
        client_secret: match &import.credential {
            ClientCredential::Secret(secret) => Some(secret.clone()),
            ClientCredential::None | ClientCredential::PrivateKey(_) => None,
        },
        client_key: match import.credential {
            ClientCredential::PrivateKey(key) => Some(key),
            ClientCredential::None | ClientCredential::Secret(_) => None,
        },
        client_auth: import.client_auth,
        client_auth_detected: None,
        client_rejected: None,
        scopes: import.scopes.clone(),
        audience: None,
        endpoints,
        subject,
        refresh_token: Some(refresh_token),
        access_token: Some(StoredAccessToken {
            token: response.access_token,
            token_type: response.token_type,
            issued_at: now_secs,
            expires_at: now_secs + lifetime,
            scopes: granted.unwrap_or(import.scopes),
            lifetime_source: Some(lifetime_source),
        }),
        generation: 1,
    }
}

/// The request's name, for logs and errors. Never includes arguments.
pub fn request_name(request: &Request) -> &'static str {
    match request {
        Request::GetToken { .. } => "GetToken",
        Request::Invalidate { .. } => "Invalidate",
        Request::Watch { .. } => "Watch",
        Request::Status => "Status",
        Request::Import(_) => "Import",
        Request::Logout { .. } => "Logout",
        Request::Refresh { .. } => "Refresh",
        Request::Unlock { .. } => "Unlock",
        Request::Lock => "Lock",
        Request::Shutdown => "Shutdown",
        Request::Ping => "Ping",
        Request::SetClient(_) => "SetClient",
        Request::StatusPage { .. } => "StatusPage",
    }
}
