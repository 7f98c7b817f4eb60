//! The store as the engine's storage port ([`Persist`]), and the one way
//! async code runs blocking store work.

use crate::engine::Persist;
use crate::store::{ProfileRecord, Store};
use crate::{Error, Result};

impl Persist for Store {
    fn save(&self, record: &ProfileRecord) -> Result<()> {
        Store::save(self, record)
    }
    fn delete(&self, name: &str) -> Result<()> {
        Store::delete(self, name)
    }
}

/// Runs blocking store work off the async runtime; `what` (e.g. "saving the
/// profile") names it if the blocking task dies.
pub async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::io(what, std::io::Error::other(e)))?
}
