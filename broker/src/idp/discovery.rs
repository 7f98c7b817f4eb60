//! Endpoint discovery: the OpenID Connect and the RFC 8414 documents, merged.
//!
//! Both documents are read (the kontext backend serves only RFC 8414; servers
//! such as django-oauth-toolkit list `revocation_endpoint` only there). Each is
//! checked on its own (issuer, endpoint schemes); a document that fails its
//! checks is ignored with a warning. The OIDC document is primary: an endpoint
//! it lacks is taken from the RFC 8414 one. Only the endpoints and a few lists
//! are used here; ID token validation during login fetches the full OIDC
//! metadata through openidconnect.

use kontext_broker_protocol::EndpointOverrides;
use serde::Deserialize;
use tracing::warn;
use url::Url;

use super::http::{Http, HttpError};
use super::issuer::{validate_endpoint, validate_issuer};
use crate::store::Endpoints;
use crate::{Error, Result};

/// What the broker uses of an issuer's metadata, merged from both documents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Metadata {
    /// The issuer the document names (checked against the one asked for).
    #[serde(default)]
    pub issuer: String,
    pub token_endpoint: Option<String>,
    pub authorization_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
    pub device_authorization_endpoint: Option<String>,
    pub registration_endpoint: Option<String>,
    pub userinfo_endpoint: Option<String>,
    pub introspection_endpoint: Option<String>,
    pub jwks_uri: Option<String>,
    /// `None` when the server does not say (then any scope may be asked for).
    pub scopes_supported: Option<Vec<String>>,
    pub token_endpoint_auth_methods_supported: Option<Vec<String>>,
    pub revocation_endpoint_auth_methods_supported: Option<Vec<String>>,
    /// RFC 9207 §3: authorization responses carry `iss`; a login then refuses
    /// a callback without it.
    pub authorization_response_iss_parameter_supported: Option<bool>,
}

/// The two well-known documents: OIDC first, RFC 8414 second.
fn candidates(issuer: &Url) -> [Url; 2] {
    let path = issuer.path().trim_end_matches('/');
    let mut oidc = issuer.clone();
    oidc.set_path(&format!("{path}/.well-known/openid-configuration"));
    // RFC 8414 §3.1: the well-known segment goes before the issuer's path.
    let mut rfc8414 = issuer.clone();
    rfc8414.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
    [oidc, rfc8414]
}

/// Discovers `issuer`'s endpoints. See [`discover_metadata`].
pub async fn discover(http: &Http, issuer: &str) -> Result<Endpoints> {
    discover_metadata(http, issuer)
        .await?
        .endpoints(issuer, &EndpointOverrides::default())
}

/// Discovers `issuer`'s endpoints and applies per-profile `overrides` (validated
/// like discovered endpoints). When no metadata document exists at all, the
/// overrides alone do, provided they name a token endpoint.
pub async fn discover_with(
    http: &Http,
    issuer: &str,
    overrides: &EndpointOverrides,
) -> Result<Endpoints> {
    validate_overrides(overrides)?;
    match load(http, issuer).await? {
        Loaded::Metadata(metadata) => metadata.endpoints(issuer, overrides),
        Loaded::Nothing(detail) if overrides.token.is_some() => {
            warn!(issuer, %detail, "no discovery document; using the configured endpoints only");
            Metadata::default().endpoints(issuer, overrides)
        }
        Loaded::Nothing(detail) => Err(Error::Invalid(detail)),
    }
}

/// Reads both well-known documents and merges those that pass their checks.
/// A document whose `issuer` differs from the one asked for is refused (OIDC
/// Discovery §4.3, RFC 8414 §3.3): it could send tokens elsewhere.
pub async fn discover_metadata(http: &Http, issuer: &str) -> Result<Metadata> {
    match load(http, issuer).await? {
        Loaded::Metadata(metadata) => Ok(*metadata),
        Loaded::Nothing(detail) => Err(Error::Invalid(detail)),
    }
}

/// What [`load`] found.
enum Loaded {
    /// At least one document passed its checks.
    Metadata(Box<Metadata>),
    /// Neither document exists (not a transient failure, not a refusal).
    Nothing(String),
}

/// Fetches both documents at once and merges the usable ones.
async fn load(http: &Http, issuer: &str) -> Result<Loaded> {
    let issuer_url = validate_issuer(issuer)?;
    let [oidc, rfc8414] = candidates(&issuer_url);
    let (first, second) = futures::join!(fetch(http, &oidc), fetch(http, &rfc8414));
    let mut failures = Vec::new();
    let mut refusals = Vec::new();
    let mut transient = false;
    let mut usable = Vec::new();
    for (url, fetched) in [(oidc, first), (rfc8414, second)] {
        match fetched.and_then(|doc| checked(issuer, doc).map_err(Fetch::Refused)) {
            Ok(doc) => usable.push(doc),
            Err(Fetch::Transient(e)) => {
                transient = true;
                failures.push(format!("{url}: {e}"));
            }
            Err(Fetch::Absent(e)) => failures.push(format!("{url}: {e}")),
            Err(Fetch::Refused(e)) => refusals.push(format!("{url}: {e}")),
        }
    }
    let mut docs = usable.into_iter();
    let Some(primary) = docs.next() else {
        if !refusals.is_empty() {
            return Err(Error::Invalid(format!(
                "discovery for issuer {issuer} refused every document ({})",
                refusals.join("; ")
            )));
        }
        let detail = format!(
            "discovery failed for issuer {issuer} ({})",
            failures.join("; ")
        );
        return if transient {
            Err(Error::IdpTransient(detail))
        } else {
            Ok(Loaded::Nothing(detail))
        };
    };
    for refusal in &refusals {
        warn!(issuer, refusal = %refusal, "ignoring a discovery document that failed its checks");
    }
    Ok(Loaded::Metadata(Box::new(match docs.next() {
        Some(secondary) => primary.merge(secondary),
        None => primary,
    })))
}

impl Metadata {
    /// Fills every field this document lacks from `other`.
    fn merge(self, other: Metadata) -> Metadata {
        Metadata {
            issuer: self.issuer,
            token_endpoint: self.token_endpoint.or(other.token_endpoint),
            authorization_endpoint: self.authorization_endpoint.or(other.authorization_endpoint),
            revocation_endpoint: self.revocation_endpoint.or(other.revocation_endpoint),
            device_authorization_endpoint: self
                .device_authorization_endpoint
                .or(other.device_authorization_endpoint),
            registration_endpoint: self.registration_endpoint.or(other.registration_endpoint),
            userinfo_endpoint: self.userinfo_endpoint.or(other.userinfo_endpoint),
            introspection_endpoint: self.introspection_endpoint.or(other.introspection_endpoint),
            jwks_uri: self.jwks_uri.or(other.jwks_uri),
            scopes_supported: self.scopes_supported.or(other.scopes_supported),
            token_endpoint_auth_methods_supported: self
                .token_endpoint_auth_methods_supported
                .or(other.token_endpoint_auth_methods_supported),
            revocation_endpoint_auth_methods_supported: self
                .revocation_endpoint_auth_methods_supported
                .or(other.revocation_endpoint_auth_methods_supported),
            authorization_response_iss_parameter_supported: self
                .authorization_response_iss_parameter_supported
                .or(other.authorization_response_iss_parameter_supported),
        }
    }

    /// The profile's endpoints: `overrides` first, then this metadata. Fails
    /// clearly when no token endpoint is known.
    pub fn endpoints(&self, issuer: &str, overrides: &EndpointOverrides) -> Result<Endpoints> {
        validate_overrides(overrides)?;
        let token = overrides
            .token
            .clone()
            .or_else(|| self.token_endpoint.clone())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "issuer {issuer} advertises no token_endpoint; set one with --token-endpoint URL \
                     or `token_endpoint` in the profile's config table"
                ))
            })?;
        Ok(Endpoints {
            token,
            authorization: self.authorization_endpoint.clone(),
            revocation: overrides
                .revocation
                .clone()
                .or_else(|| self.revocation_endpoint.clone()),
            device_authorization: overrides
                .device_authorization
                .clone()
                .or_else(|| self.device_authorization_endpoint.clone()),
            registration: self.registration_endpoint.clone(),
            userinfo: self.userinfo_endpoint.clone(),
            introspection: self.introspection_endpoint.clone(),
            jwks_uri: self.jwks_uri.clone(),
            token_auth_methods: method_list(&self.token_endpoint_auth_methods_supported),
            revocation_auth_methods: method_list(&self.revocation_endpoint_auth_methods_supported),
        })
    }
}

/// An `*_auth_methods_supported` list as kept in the profile (client
/// authentication reads it): bounded in length and count. `None` (not listed)
/// makes the broker fall back to RFC 8414's default, `client_secret_basic`.
fn method_list(list: &Option<Vec<String>>) -> Option<Vec<String>> {
    list.as_ref().map(|l| {
        l.iter()
            .filter(|m| m.len() <= 64)
            .take(32)
            .cloned()
            .collect()
    })
}

/// Checks per-profile endpoint overrides by the rule for issuers: https, or
/// http on loopback only.
pub fn validate_overrides(overrides: &EndpointOverrides) -> Result<()> {
    for (what, url) in [
        ("token endpoint override", &overrides.token),
        ("revocation endpoint override", &overrides.revocation),
        (
            "device authorization endpoint override",
            &overrides.device_authorization,
        ),
    ] {
        if let Some(url) = url {
            validate_endpoint(what, url)?;
        }
    }
    Ok(())
}

enum Fetch {
    /// The IdP may answer later (network, timeout, 5xx).
    Transient(String),
    /// This document does not exist or is not metadata.
    Absent(String),
    /// The document loaded but failed a check (issuer, endpoint scheme).
    Refused(String),
}

async fn fetch(http: &Http, url: &Url) -> std::result::Result<Metadata, Fetch> {
    let response = http.get(url.as_str()).await.map_err(|e| match e {
        HttpError::Transport(t) => Fetch::Transient(t),
        HttpError::TooLarge => Fetch::Absent(e.to_string()),
    })?;
    let status = response.status();
    if status.is_server_error() || status.as_u16() == 429 {
        return Err(Fetch::Transient(format!("HTTP {status}")));
    }
    if !status.is_success() {
        return Err(Fetch::Absent(format!("HTTP {status}")));
    }
    serde_json::from_slice(response.body())
        // serde_json quotes offending values: IdP text.
        .map_err(|e| {
            Fetch::Absent(format!(
                "not a metadata document: {}",
                super::sanitize::text(&e.to_string())
            ))
        })
}

/// The document, if it names `issuer` and every endpoint in it is allowed.
fn checked(issuer: &str, doc: Metadata) -> std::result::Result<Metadata, String> {
    if doc.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err(format!(
            "the document names issuer `{}`, not `{issuer}`",
            super::sanitize::text(&doc.issuer)
        ));
    }
    for (what, url) in [
        ("token_endpoint", &doc.token_endpoint),
        ("authorization_endpoint", &doc.authorization_endpoint),
        ("revocation_endpoint", &doc.revocation_endpoint),
        (
            "device_authorization_endpoint",
            &doc.device_authorization_endpoint,
        ),
        ("registration_endpoint", &doc.registration_endpoint),
        ("userinfo_endpoint", &doc.userinfo_endpoint),
        ("introspection_endpoint", &doc.introspection_endpoint),
        ("jwks_uri", &doc.jwks_uri),
    ] {
        if let Some(url) = url {
            validate_endpoint(what, url).map_err(|e| super::sanitize::text(&e.to_string()))?;
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests;
