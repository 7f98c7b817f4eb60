//! Turns protocol requests into broker actions; the server calls [`Service`] and knows nothing of this.
//!
//! Where things are:
//! - `dispatch.rs`: one [`Request`](kontext_broker_protocol::Request)
//!   to its handler ([`Service::call`]), and the cached-token fast path.
//! - `registry.rs`: the profile slots. Each profile has a slot:
//!   its watcher channel plus what is known about it, a running engine, a name
//!   only (the store is locked) or an error (the file could not be read). Engines
//!   are started here and nowhere else.
//! - `watch.rs`: `Watch` streams, which outlive engines, so a watcher
//!   keeps its subscription across lock/unlock and re-login.
//! - `admin.rs`: import, logout, lock, unlock and set-client. They are
//!   serialized by one async mutex; the token path only takes a short
//!   synchronous lock to find the engine.
//! - `status.rs`: `Status` and its pages.

mod admin;
mod dispatch;
mod registry;
mod status;
mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kontext_broker_protocol::BrokerError;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::engine::{EngineConfig, EngineDeps, TokenEndpoint};
use crate::idp::Idp;
use crate::store::{Store, StoreOptions, UnlockThrottle};

pub use watch::WatchStream;

use registry::Registry;

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
    profiles: Registry,
    /// Set by `drain`: from then on no engine starts and no logout runs.
    closing: AtomicBool,
    admin: tokio::sync::Mutex<()>,
    throttle: UnlockThrottle,
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
                profiles: Registry::default(),
                closing: AtomicBool::new(false),
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

    /// Stops every engine after its running refresh has saved. Called at shutdown.
    pub async fn drain(&self) {
        let engines = {
            let profiles = self.inner.profiles.lock();
            // Under the same lock that every engine start takes, so no engine
            // can start after this list is made.
            self.inner.closing.store(true, Ordering::SeqCst);
            registry::engines(&profiles)
        };
        futures::future::join_all(engines.iter().map(|e| e.stop())).await;
    }

    fn closing(&self) -> bool {
        self.inner.closing.load(Ordering::SeqCst)
    }
}

fn unknown(profile: &str) -> BrokerError {
    BrokerError::UnknownProfile {
        profile: profile.to_owned(),
    }
}
