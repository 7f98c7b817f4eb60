//! kontext-broker: one process per user login that holds OAuth refresh tokens,
//! encrypted on disk with age, and serves short-lived access tokens over a
//! uid-checked Unix socket.
//!
//! Layout, from the edge inward (every module):
//! - [`server`]: the socket listener, peer checks and per-connection handlers.
//! - [`service`]: turns protocol requests into calls on profiles and the store
//!   (dispatch, profile registry, watch streams, admin operations, status).
//! - [`engine`]: one token engine per profile; the only code that refreshes.
//! - [`idp`]: discovery, token-endpoint calls, revocation and client
//!   authentication (openidconnect over rustls).
//! - [`store`]: age-encrypted profile files, their records and identities.
//! - [`bounds`]: length caps and token charset checked at import and refresh.
//! - [`config`]: the optional TOML config file.
//! - [`clock`]: wall-clock time, injectable for tests.
//! - [`hardening`]: process hardening applied before anything else runs.
//! - [`daemon`]: the `kontext-broker` process: startup, lock, signals, shutdown.
//! - `error`: the crate's one [`Error`] type.
//!
//! The `broker-ctl` command line and its login flows live in the
//! `kontext-broker-ctl` crate (`ctl/`).

pub mod bounds;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod engine;
mod error;
pub mod hardening;
pub mod idp;
pub mod server;
pub mod service;
pub mod store;

pub use error::{Error, Result};
