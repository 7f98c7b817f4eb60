//! A blocking facade over [`crate::BrokerClient`] for code without an async runtime.
//!
//! Each client owns a current-thread tokio runtime and drives it only while a
//! call runs. Do not use it from inside an async runtime (tokio panics when a
//! runtime blocks inside another); use the async client there.

use std::path::Path;
use std::time::Duration;

use kontext_broker_protocol::{StatusReport, Token};
use tokio::runtime::Runtime;

use crate::{ClientBuilder, Result};

/// A blocking broker connection. Calls are serialized per value; clone the
/// async client instead if you need concurrency.
pub struct BrokerClient {
    // Dropped before `rt`, so the connection's tasks are aborted first.
    inner: crate::BrokerClient,
    rt: Runtime,
}

impl std::fmt::Debug for BrokerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("blocking::BrokerClient")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl BrokerClient {
    /// Connects to the default socket (contract §1).
    pub fn connect() -> Result<Self> {
        Self::with_builder(ClientBuilder::default())
    }

    /// Connects to the socket at `path`.
    pub fn connect_to(path: impl AsRef<Path>) -> Result<Self> {
        Self::with_builder(ClientBuilder::default().socket(path.as_ref()))
    }

    /// Connects with explicit options.
    pub fn with_builder(builder: ClientBuilder) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let inner = rt.block_on(builder.connect())?;
        Ok(BrokerClient { inner, rt })
    }

    /// See [`crate::BrokerClient::ping`].
    pub fn ping(&self) -> Result<()> {
        self.rt.block_on(self.inner.ping())
    }

    /// See [`crate::BrokerClient::status`].
    pub fn status(&self) -> Result<StatusReport> {
        self.rt.block_on(self.inner.status())
    }

    /// See [`crate::BrokerClient::get_token`].
    pub fn get_token(&self, profile: &str, min_valid: Duration) -> Result<Token> {
        self.rt.block_on(self.inner.get_token(profile, min_valid))
    }

    /// See [`crate::BrokerClient::invalidate`].
    pub fn invalidate(&self, profile: &str, stale: &Token) -> Result<Token> {
        self.rt.block_on(self.inner.invalidate(profile, stale))
    }

    /// See [`crate::BrokerClient::refresh`].
    pub fn refresh(&self, profile: &str) -> Result<Token> {
        self.rt.block_on(self.inner.refresh(profile))
    }
}
