//! Turns protocol requests into broker actions. The server calls [`Service`];
//! it knows nothing about sockets.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::stream::BoxStream;
use kontext_broker_protocol::{
    BrokerError, BrokerStatus, Request, Response, StatusReport, WatchEvent,
};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Counters the server updates and `Status` reports.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections open now.
    pub connections: AtomicU64,
    /// Peers rejected because of their uid since start.
    pub rejected_peers: AtomicU64,
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
}

impl Service {
    /// A service for a broker started with `config` at `info`'s paths.
    pub fn new(config: Config, info: ServiceInfo) -> Self {
        Service {
            inner: Arc::new(Inner {
                config,
                info,
                started: Instant::now(),
                stats: Stats::default(),
                shutdown: CancellationToken::new(),
            }),
        }
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
            Request::Ping => Ok(Response::Pong),
            Request::Status => Ok(Response::Status(self.status())),
            Request::Shutdown => {
                self.inner.shutdown.cancel();
                Ok(Response::Done)
            }
            Request::Watch { .. } => Err(BrokerError::bad_request(
                "Watch is a subscription; the connection handler serves it",
            )),
            other => Err(BrokerError::bad_request(format!(
                "{} is not supported by this broker yet",
                request_name(&other)
            ))),
        }
    }

    /// Subscribes to `profile`'s tokens and state changes.
    pub fn watch(&self, profile: &str) -> Result<WatchStream, BrokerError> {
        Err(BrokerError::UnknownProfile {
            profile: profile.to_owned(),
        })
    }

    /// Waits until in-flight refreshes have persisted their results. Called at shutdown.
    pub async fn drain(&self) {}

    fn status(&self) -> StatusReport {
        let stats = &self.inner.stats;
        StatusReport {
            broker: BrokerStatus {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
                uptime_secs: self.inner.started.elapsed().as_secs(),
                socket: self.inner.info.socket.display().to_string(),
                state_dir: self.inner.info.state_dir.display().to_string(),
                locked: false,
                connections: stats.connections.load(Ordering::Relaxed),
                rejected_peers: stats.rejected_peers.load(Ordering::Relaxed),
            },
            profiles: Vec::new(),
        }
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
    }
}
