//! Client for the kontext token broker.
//!
//! - [`BrokerClient`]: one uid-checked, multiplexed connection to the broker.
//! - [`TokenSource`] and [`BrokerTokenSource`]: the current access token, served
//!   from memory and kept fresh by pushes from the broker.
//! - Feature `tower`: [`bearer::BearerLayer`], which adds `Authorization: Bearer`
//!   and retries once after a 401 / gRPC `unauthenticated`.
//! - Feature `blocking`: [`blocking::BrokerClient`] for code without a runtime.
//!
//! No token is ever logged or put into an error by this crate.

#![warn(missing_docs)]

#[cfg(feature = "tower")]
pub mod bearer;
#[cfg(feature = "blocking")]
pub mod blocking;
mod conn;
mod error;
mod source;

pub use conn::{
    BrokerClient, ClientBuilder, LogoutOutcome, WatchStream, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
};
pub use error::{Error, Result};
pub use kontext_broker_protocol::{
    BrokerStatus, ImportRequest, ProfileState, ProfileStatus, Request, Response, Secret,
    StatusReport, Token, WatchEvent, Welcome, DEFAULT_PROFILE,
};
pub use source::{BrokerTokenSource, TokenSource, TokenSourceBuilder};
