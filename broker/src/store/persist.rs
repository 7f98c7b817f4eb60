//! The store as the engine's storage port ([`Persist`]): the port lives in
//! `engine`, this adapter in `store`.

use crate::engine::Persist;
use crate::store::{ProfileRecord, Store};
use crate::Result;

impl Persist for Store {
    fn save(&self, record: &ProfileRecord) -> Result<()> {
        Store::save(self, record)
    }
    fn delete(&self, name: &str) -> Result<()> {
        Store::delete(self, name)
    }
}
