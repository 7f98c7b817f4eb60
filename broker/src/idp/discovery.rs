//! Endpoint discovery: OpenID Connect Discovery first, RFC 8414 second.
//!
//! The kontext backend serves only RFC 8414 metadata, so both are needed. Only
//! the endpoints are used here; ID token validation during login fetches the
//! full OIDC metadata through openidconnect.

use serde::Deserialize;
use url::Url;

use super::http::{Http, HttpError};
use super::issuer::{validate_endpoint, validate_issuer};
use crate::store::Endpoints;
use crate::{Error, Result};

#[derive(Deserialize)]
struct Metadata {
    issuer: String,
    token_endpoint: Option<String>,
    authorization_endpoint: Option<String>,
    revocation_endpoint: Option<String>,
    device_authorization_endpoint: Option<String>,
    registration_endpoint: Option<String>,
    userinfo_endpoint: Option<String>,
    introspection_endpoint: Option<String>,
    jwks_uri: Option<String>,
}

/// The two well-known documents, in the order they are tried.
fn candidates(issuer: &Url) -> [Url; 2] {
    let path = issuer.path().trim_end_matches('/');
    let mut oidc = issuer.clone();
    oidc.set_path(&format!("{path}/.well-known/openid-configuration"));
    // RFC 8414 §3.1: the well-known segment goes before the issuer's path.
    let mut rfc8414 = issuer.clone();
    rfc8414.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
    [oidc, rfc8414]
}

/// Discovers `issuer`'s endpoints. A document whose `issuer` differs from the one
/// asked for is refused (OIDC Discovery §4.3, RFC 8414 §3.3): it could send
/// tokens elsewhere.
pub async fn discover(http: &Http, issuer: &str) -> Result<Endpoints> {
    let issuer_url = validate_issuer(issuer)?;
    let mut failures = Vec::new();
    let mut transient = false;
    for url in candidates(&issuer_url) {
        match fetch(http, &url).await {
            Ok(doc) => return endpoints(issuer, doc),
            Err(Fetch::Transient(e)) => {
                transient = true;
                failures.push(format!("{url}: {e}"));
            }
            Err(Fetch::Absent(e)) => failures.push(format!("{url}: {e}")),
        }
    }
    let detail = format!(
        "discovery failed for issuer {issuer} ({})",
        failures.join("; ")
    );
    Err(if transient {
        Error::IdpTransient(detail)
    } else {
        Error::Invalid(detail)
    })
}

enum Fetch {
    /// The IdP may answer later (network, timeout, 5xx).
    Transient(String),
    /// This document does not exist or is not metadata.
    Absent(String),
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
        .map_err(|e| Fetch::Absent(format!("not a metadata document: {e}")))
}

fn endpoints(issuer: &str, doc: Metadata) -> Result<Endpoints> {
    if doc.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err(Error::Invalid(format!(
            "discovery document names issuer `{}`, not `{issuer}`; refusing it",
            doc.issuer
        )));
    }
    let token = doc
        .token_endpoint
        .ok_or_else(|| Error::Invalid(format!("issuer {issuer} advertises no token_endpoint")))?;
    let check = |what: &str, v: Option<String>| -> Result<Option<String>> {
        v.map(|u| validate_endpoint(what, &u).map(|_| u))
            .transpose()
    };
    validate_endpoint("token_endpoint", &token)?;
    Ok(Endpoints {
        token,
        authorization: check("authorization_endpoint", doc.authorization_endpoint)?,
        revocation: check("revocation_endpoint", doc.revocation_endpoint)?,
        device_authorization: check(
            "device_authorization_endpoint",
            doc.device_authorization_endpoint,
        )?,
        registration: check("registration_endpoint", doc.registration_endpoint)?,
        userinfo: check("userinfo_endpoint", doc.userinfo_endpoint)?,
        introspection: check("introspection_endpoint", doc.introspection_endpoint)?,
        jwks_uri: check("jwks_uri", doc.jwks_uri)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_locations() {
        let [oidc, rfc] = candidates(&Url::parse("https://idp.example").unwrap());
        assert_eq!(
            oidc.as_str(),
            "https://idp.example/.well-known/openid-configuration"
        );
        assert_eq!(
            rfc.as_str(),
            "https://idp.example/.well-known/oauth-authorization-server"
        );
        let [oidc, rfc] = candidates(&Url::parse("https://idp.example/tenant/a/").unwrap());
        assert_eq!(
            oidc.as_str(),
            "https://idp.example/tenant/a/.well-known/openid-configuration"
        );
        assert_eq!(
            rfc.as_str(),
            "https://idp.example/.well-known/oauth-authorization-server/tenant/a"
        );
    }

    fn doc(issuer: &str, token: &str) -> Metadata {
        Metadata {
            issuer: issuer.into(),
            token_endpoint: Some(token.into()),
            authorization_endpoint: None,
            revocation_endpoint: None,
            device_authorization_endpoint: None,
            registration_endpoint: None,
            userinfo_endpoint: None,
            introspection_endpoint: None,
            jwks_uri: None,
        }
    }

    #[test]
    fn issuer_mismatch_and_downgrades_are_refused() {
        assert!(endpoints(
            "https://a.example",
            doc("https://a.example/", "https://a.example/t")
        )
        .is_ok());
        assert!(endpoints(
            "https://a.example",
            doc("https://evil.example", "https://a.example/t")
        )
        .is_err());
        assert!(endpoints(
            "https://a.example",
            doc("https://a.example", "http://a.example/t")
        )
        .is_err());
    }
}
