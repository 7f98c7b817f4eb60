//! ID token validation (OIDC Core §3.1.3.7) through openidconnect's verifier:
//! signature against the issuer's JWKS, `iss`, `aud`/`azp`, `exp`, `iat`, and
//! the `nonce` sent with the authorization request.

use std::str::FromStr;

use kontext_broker_protocol::Secret;
use openidconnect::core::{CoreIdToken, CoreIdTokenVerifier, CoreJsonWebKeySet};
use openidconnect::{ClientId, ClientSecret, DiscoveryError, IssuerUrl, JsonWebKeySetUrl, Nonce};

use super::{sanitize, LoginError};
use crate::idp::{validate_endpoint, Http};

/// What an ID token must match.
#[derive(Debug, Clone, Copy)]
pub struct IdTokenCheck<'a> {
    /// Expected `iss`, exactly as discovered.
    pub issuer: &'a str,
    /// Expected audience (and `azp` when several audiences are present).
    pub client_id: &'a str,
    /// A confidential client's secret; allows HMAC-signed ID tokens.
    pub client_secret: Option<&'a Secret>,
    /// The nonce sent in the authorization request. `None` skips the nonce
    /// check, which is right only for flows that send none (RFC 8628).
    pub nonce: Option<&'a str>,
}

/// Fetches the issuer's JSON Web Key Set from `jwks_uri`.
pub async fn fetch_jwks(http: &Http, jwks_uri: &str) -> Result<CoreJsonWebKeySet, LoginError> {
    // The same https-or-loopback rule as every other endpoint.
    validate_endpoint("jwks_uri", jwks_uri).map_err(LoginError::Discovery)?;
    let url = JsonWebKeySetUrl::new(jwks_uri.to_owned())
        .map_err(|e| LoginError::Unsupported(format!("jwks_uri `{jwks_uri}`: {e}")))?;
    CoreJsonWebKeySet::fetch_async(&url, http)
        .await
        .map_err(|e| match e {
            DiscoveryError::Request(e) => {
                LoginError::IdpUnavailable(format!("fetching the JWKS at {jwks_uri}: {e}"))
            }
            DiscoveryError::Response(status, _body, _) => LoginError::IdpUnavailable(format!(
                "fetching the JWKS at {jwks_uri}: HTTP {status}"
            )),
            DiscoveryError::Parse(e) => LoginError::IdToken(format!(
                "the JWKS at {jwks_uri} is unreadable (at `{}`)",
                e.path()
            )),
            other => LoginError::IdToken(format!(
                "the JWKS at {jwks_uri} is unusable: {}",
                sanitize(&other.to_string())
            )),
        })
}

/// Validates a compact-serialised ID token and returns the subject for
/// display (`email` claim, else `sub`). Any failure is [`LoginError::IdToken`].
pub fn verify_id_token(
    raw: &str,
    jwks: &CoreJsonWebKeySet,
    check: &IdTokenCheck<'_>,
) -> Result<Option<String>, LoginError> {
    let token = CoreIdToken::from_str(raw)
        .map_err(|e| LoginError::IdToken(format!("not a JWT: {}", sanitize(&e.to_string()))))?;
    // Discovery already accepted a document whose issuer differs from the
    // configured one by a trailing slash at most; the token carries the
    // document's spelling, which the verifier compares byte for byte.
    let claimed = unverified_issuer(raw);
    let expected = match &claimed {
        Some(iss) if iss.trim_end_matches('/') == check.issuer.trim_end_matches('/') => iss,
        _ => check.issuer,
    };
    let issuer = IssuerUrl::new(expected.to_owned())
        .map_err(|e| LoginError::IdToken(format!("issuer URL: {e}")))?;
    let client_id = ClientId::new(check.client_id.to_owned());
    let verifier = match check.client_secret {
        Some(secret) => CoreIdTokenVerifier::new_confidential_client(
            client_id,
            ClientSecret::new(secret.expose().to_owned()),
            issuer,
            jwks.clone(),
        ),
        None => CoreIdTokenVerifier::new_public_client(client_id, issuer, jwks.clone()),
    };
    let verified = match check.nonce {
        Some(expected) => token.claims(&verifier, &Nonce::new(expected.to_owned())),
        None => token.claims(&verifier, |_: Option<&Nonce>| Ok(())),
    };
    let claims =
        verified.map_err(|e| LoginError::IdToken(sanitize(&crate::idp::error_chain(&e))))?;
    Ok(Some(
        claims
            .email()
            .map(|e| e.as_str().to_owned())
            .unwrap_or_else(|| claims.subject().as_str().to_owned()),
    ))
}

/// The `iss` claim, read without any check; only used to pick the spelling
/// of the expected issuer above.
fn unverified_issuer(raw: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = raw.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}
