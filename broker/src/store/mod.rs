//! The encrypted profile store (SPEC §4).

mod record;

pub use record::*;
