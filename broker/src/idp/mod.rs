//! Talking to the identity provider: discovery, the refresh grant, revocation.
//!
//! Client authentication (secret methods with auto-detection, `private_key_jwt`)
//! is [`client_auth`]'s job; every token, revocation and device call goes through it.
//!
//! All HTTP goes through one rustls client ([`http::Http`]) with the timeouts of
//! contract §4 and a cap on response size, so a slow or lying IdP costs bounded time
//! and memory. OAuth itself is the `openidconnect` crate's job; this module only
//! builds its clients and classifies its answers.

pub mod client_auth;
mod discovery;
mod http;
mod issuer;
mod refresh;
pub mod sanitize;
mod token_response;

use std::time::Duration;

pub use discovery::{discover, discover_metadata, discover_with, validate_overrides, Metadata};
pub use http::error_chain;
pub use http::{Http, HttpError};
pub use issuer::{is_loopback_http, validate_endpoint, validate_issuer};
pub use refresh::{classify_error, revoke};
pub use token_response::{subject_from_id_token, TokenResponse};

use kontext_broker_protocol::ClientAuthMethod;

pub use client_auth::{ClientAuth, EndpointKind};

use crate::config::Config;
use crate::store::ProfileRecord;
use crate::Result;

/// The broker's IdP access: an HTTP client plus the settings it was built from.
#[derive(Clone)]
pub struct Idp {
    http: Http,
    /// Client authentication methods set per profile in the config file.
    client_auth: std::sync::Arc<std::collections::BTreeMap<String, ClientAuthMethod>>,
}

impl Idp {
    /// An IdP client with the timeouts and extra root CAs from `config`.
    pub fn new(config: &Config) -> Result<Idp> {
        Ok(Idp {
            http: Http::new(
                Duration::from_secs(config.http_connect_timeout_secs),
                Duration::from_secs(config.http_timeout_secs),
                &config.extra_root_certs,
            )?,
            client_auth: std::sync::Arc::new(
                config
                    .profiles
                    .iter()
                    .filter_map(|(name, p)| Some((name.clone(), p.client_auth?)))
                    .collect(),
            ),
        })
    }

    /// The client of `record` with the config file's method for its profile.
    pub fn client_auth(&self, record: &ProfileRecord) -> ClientAuth {
        ClientAuth::of_record(record, self.client_auth.get(&record.name).copied())
    }

    /// The underlying HTTP client.
    pub fn http(&self) -> &Http {
        &self.http
    }
}
