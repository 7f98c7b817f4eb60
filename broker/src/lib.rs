//! kontext-broker: one process per user login that holds OAuth refresh tokens,
//! encrypted on disk with age, and serves short-lived access tokens over a
//! uid-checked Unix socket.
//!
//! Layout, from the edge inward:
//! - [`server`]: the socket listener, peer checks and per-connection handlers.
//! - [`service`]: turns protocol requests into calls on profiles and the store.
//! - [`engine`]: one token engine per profile; the only code that refreshes.
//! - [`idp`]: discovery and token-endpoint calls (openidconnect over rustls).
//! - [`store`]: age-encrypted profile files and identities.
//! - [`bounds`]: length caps and token charset checked at import and refresh.
//! - [`config`], [`clock`], [`hardening`], [`daemon`]: process plumbing.
//! - [`ctl`]: the `broker-ctl` command line.

pub mod bounds;
pub mod clock;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod engine;
mod error;
pub mod hardening;
pub mod idp;
pub mod login;
pub mod server;
pub mod service;
pub mod store;

pub use error::{Error, Result};
