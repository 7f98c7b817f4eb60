//! ID token validation, written once for the code flow and the device flow
//! (OpenID Connect Core §3.1.3.7, with `at_hash` from §3.1.3.8 and §3.2.2.9).
//!
//! Order: the JWS header (`alg` never `none`, never HMAC without a client
//! secret), the required claims (`iss`, `sub`, `aud`, `exp`, `iat`), `iss`
//! equal to the discovered issuer byte for byte, `aud`/`azp`, then the
//! signature by a key of the discovered `jwks_uri` (openidconnect's verifier,
//! which also checks `exp` and the nonce), then `at_hash` when present. The
//! signature, `exp` and nonce checks are openidconnect's; this module decides
//! which keys to try and names the check that failed.

use std::str::FromStr;

use base64::Engine as _;
use kontext_broker_protocol::Secret;
use openidconnect::core::{
    CoreIdToken, CoreIdTokenClaims, CoreIdTokenVerifier, CoreJsonWebKey, CoreJsonWebKeySet,
    CoreJwsSigningAlgorithm,
};
use openidconnect::{
    AccessToken, AccessTokenHash, ClaimsVerificationError, ClientId, ClientSecret, IssuerUrl,
    JsonWebKey, Nonce, SignatureVerificationError,
};
use serde_json::Value;

use super::id_token_error::{IdTokenError, KeyRefresh};
use super::jwks::{JwksCache, Refresh};
use super::LoginError;
use kontext_broker::idp::sanitize::text as sanitize;

/// What an ID token must match.
#[derive(Debug, Clone, Copy)]
pub struct IdTokenCheck<'a> {
    /// The issuer exactly as the discovery document spells it; `iss` must equal it.
    pub issuer: &'a str,
    /// Expected audience (and `azp`, when present).
    pub client_id: &'a str,
    /// A confidential client's secret; allows HMAC-signed ID tokens.
    pub client_secret: Option<&'a Secret>,
    /// The nonce sent in the authorization request. `None` skips the nonce
    /// check, which is right only for flows that send none (RFC 8628).
    pub nonce: Option<&'a str>,
    /// The access token of the same response, for `at_hash`.
    pub access_token: &'a str,
}

/// Who logged in, from a validated ID token. For display only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `sub`.
    pub subject: String,
    /// `email`, if present.
    pub email: Option<String>,
    /// `preferred_username`, if present.
    pub preferred_username: Option<String>,
}

impl Identity {
    /// The account to show: `email`, else `preferred_username`, else `sub`.
    pub fn account(&self) -> &str {
        self.email
            .as_deref()
            .or(self.preferred_username.as_deref())
            .unwrap_or(&self.subject)
    }
}

/// Validates a compact-serialised ID token against the issuer's keys. When no
/// cached key fits, the keys are fetched once more (rate-limited by the cache)
/// and the token is checked again.
pub async fn verify_id_token(
    raw: &str,
    keys: &JwksCache,
    check: &IdTokenCheck<'_>,
) -> Result<Identity, LoginError> {
    let token = Unverified::parse(raw, check)?;
    if token.hmac {
        // Keyed by the client secret: the provider's JWKS plays no part.
        return token
            .verify(&CoreJsonWebKeySet::new(Vec::new()), check)
            .map_err(|miss| miss.refusal(&token, KeyRefresh::NotNeeded).into());
    }
    let current = keys.current().await?;
    let miss = match token.verify(&current.set, check) {
        Ok(identity) => return Ok(identity),
        Err(miss) => miss,
    };
    if !miss.refetch_may_help(&token) {
        return Err(miss.refusal(&token, KeyRefresh::NotNeeded).into());
    }
    if current.fetched_now {
        return Err(miss.refusal(&token, KeyRefresh::Refreshed).into());
    }
    match keys.refresh_for_unknown_key().await? {
        Refresh::Fetched(set) => token
            .verify(&set, check)
            .map_err(|miss| miss.refusal(&token, KeyRefresh::Refreshed).into()),
        Refresh::RateLimited => Err(miss.refusal(&token, KeyRefresh::RateLimited).into()),
    }
}

/// [`verify_id_token`] against a fixed key set, without any fetch.
pub fn verify_id_token_with_keys(
    raw: &str,
    keys: &CoreJsonWebKeySet,
    check: &IdTokenCheck<'_>,
) -> Result<Identity, IdTokenError> {
    let token = Unverified::parse(raw, check)?;
    token
        .verify(keys, check)
        .map_err(|miss| miss.refusal(&token, KeyRefresh::NotNeeded))
}

/// A token whose header and claims passed the checks that need no key.
struct Unverified {
    token: CoreIdToken,
    alg: CoreJwsSigningAlgorithm,
    kid: Option<String>,
    hmac: bool,
}

/// Why verifying with a key set failed.
enum Miss {
    /// No key carries the token's `kid` (or, without one, fits its `alg`).
    NoKey,
    /// Keys fit, and none verifies the signature.
    BadSignature,
    /// A check independent of which key is current failed.
    Refused(IdTokenError),
}

impl Miss {
    /// Fetching the keys again is worth it only when the key may be new: an
    /// unknown `kid`, or no `kid` and no key that verifies.
    fn refetch_may_help(&self, token: &Unverified) -> bool {
        match self {
            Miss::NoKey => true,
            Miss::BadSignature => token.kid.is_none(),
            Miss::Refused(_) => false,
        }
    }

    fn refusal(self, token: &Unverified, refresh: KeyRefresh) -> IdTokenError {
        let kid = token.kid.as_deref().map(sanitize);
        match self {
            Miss::NoKey => IdTokenError::UnknownKey { kid, refresh },
            Miss::BadSignature => IdTokenError::BadSignature {
                kid,
                refresh: if token.kid.is_some() {
                    KeyRefresh::NotNeeded
                } else {
                    refresh
                },
            },
            Miss::Refused(e) => e,
        }
    }
}

impl Unverified {
    /// The checks that need no key: header, required claims, `iss`, `aud`, `azp`.
    fn parse(raw: &str, check: &IdTokenCheck<'_>) -> Result<Unverified, IdTokenError> {
        let parts: Vec<&str> = raw.split('.').collect();
        match parts.len() {
            3 => {}
            5 => {
                return Err(IdTokenError::Malformed(
                    "it is encrypted (JWE), which this client does not support".into(),
                ))
            }
            _ => {
                return Err(IdTokenError::Malformed(
                    "not a signed JWT in compact form".into(),
                ))
            }
        }
        let header = decode_json(parts[0], "header")?;
        let alg = match header.get("alg") {
            Some(Value::String(alg)) => alg.clone(),
            _ => return Err(IdTokenError::Malformed("header `alg` is missing".into())),
        };
        if alg.eq_ignore_ascii_case("none") {
            return Err(IdTokenError::Unsigned);
        }
        let hmac = alg.starts_with("HS");
        if hmac && check.client_secret.is_none() {
            return Err(IdTokenError::SymmetricForPublicClient {
                alg: sanitize(&alg),
            });
        }
        let allowed = ["RS256"]
            .iter()
            .chain(if check.client_secret.is_some() {
                ["HS256", "HS384", "HS512"].iter()
            } else {
                [].iter()
            })
            .any(|a| *a == alg);
        if !allowed {
            return Err(IdTokenError::DisallowedAlg {
                alg: sanitize(&alg),
            });
        }
        let kid = match header.get("kid") {
            None | Some(Value::Null) => None,
            Some(Value::String(kid)) => Some(kid.clone()),
            Some(_) => {
                return Err(IdTokenError::Malformed(
                    "header `kid` is not a string".into(),
                ))
            }
        };

        let claims = decode_json(parts[1], "payload")?;
        let string = |claim: &'static str| match claims.get(claim) {
            None | Some(Value::Null) => Err(IdTokenError::MissingClaim(claim)),
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(_) => Err(IdTokenError::InvalidClaim {
                claim,
                expected: "a string",
            }),
        };
        let number = |claim: &'static str| match claims.get(claim) {
            None | Some(Value::Null) => Err(IdTokenError::MissingClaim(claim)),
            Some(Value::Number(_)) => Ok(()),
            Some(_) => Err(IdTokenError::InvalidClaim {
                claim,
                expected: "a number",
            }),
        };
        let iss = string("iss")?;
        if string("sub")?.is_empty() {
            return Err(IdTokenError::MissingClaim("sub"));
        }
        let audiences: Vec<&str> = match claims.get("aud") {
            None | Some(Value::Null) => return Err(IdTokenError::MissingClaim("aud")),
            Some(Value::String(a)) => vec![a.as_str()],
            Some(Value::Array(list)) => list
                .iter()
                .map(Value::as_str)
                .collect::<Option<Vec<&str>>>()
                .ok_or(IdTokenError::InvalidClaim {
                    claim: "aud",
                    expected: "a string or an array of strings",
                })?,
            Some(_) => {
                return Err(IdTokenError::InvalidClaim {
                    claim: "aud",
                    expected: "a string or an array of strings",
                })
            }
        };
        number("exp")?;
        number("iat")?;
        // Core §3.1.3.7 step 2: an exact match, no normalisation.
        if iss != check.issuer {
            return Err(IdTokenError::IssuerMismatch {
                expected: check.issuer.to_owned(),
                found: sanitize(iss),
            });
        }
        // Steps 3 to 5: the client is an audience, no other party is, and `azp`
        // (when present) is the client.
        if !audiences.contains(&check.client_id) {
            return Err(IdTokenError::AudienceMismatch {
                client_id: check.client_id.to_owned(),
            });
        }
        if let Some(other) = audiences.iter().find(|a| **a != check.client_id) {
            return Err(IdTokenError::UntrustedAudience {
                audience: sanitize(other),
            });
        }
        match claims.get("azp") {
            None | Some(Value::Null) => {}
            Some(Value::String(azp)) if azp == check.client_id => {}
            Some(_) => {
                return Err(IdTokenError::AzpMismatch {
                    client_id: check.client_id.to_owned(),
                })
            }
        }

        let token = CoreIdToken::from_str(raw)
            .map_err(|e| IdTokenError::Malformed(sanitize(&e.to_string())))?;
        let alg = token
            .signing_alg()
            .map_err(|e| IdTokenError::Malformed(sanitize(&e.to_string())))?
            .clone();
        Ok(Unverified {
            token,
            alg,
            kid,
            hmac,
        })
    }

    /// Verifies the signature with each key that may have made it (the one
    /// named by `kid`; without `kid`, each key of the right type), then `exp`,
    /// the nonce and `at_hash`.
    fn verify(&self, keys: &CoreJsonWebKeySet, check: &IdTokenCheck<'_>) -> Result<Identity, Miss> {
        if self.hmac {
            let secret = check.client_secret.map(|s| s.expose().as_bytes().to_vec());
            let key = CoreJsonWebKey::new_symmetric(secret.unwrap_or_default());
            return match self.run_verifier(CoreJsonWebKeySet::new(Vec::new()), check) {
                Ok(claims) => self.finish(claims, &key, check),
                Err(e) => Err(classify(e)),
            };
        }
        let mut any_fit = false;
        let candidates = keys.keys().iter().filter(|key| match &self.kid {
            Some(kid) => key.key_id().is_some_and(|id| id.as_str() == kid),
            None => true,
        });
        for key in candidates {
            match self.run_verifier(CoreJsonWebKeySet::new(vec![key.clone()]), check) {
                Ok(claims) => return self.finish(claims, key, check),
                Err(e) => match classify(e) {
                    // This key's type or use does not fit the `alg`.
                    Miss::NoKey => {}
                    Miss::BadSignature => any_fit = true,
                    refused @ Miss::Refused(_) => return Err(refused),
                },
            }
        }
        Err(if any_fit {
            Miss::BadSignature
        } else {
            Miss::NoKey
        })
    }

    fn run_verifier(
        &self,
        keys: CoreJsonWebKeySet,
        check: &IdTokenCheck<'_>,
    ) -> Result<CoreIdTokenClaims, ClaimsVerificationError> {
        let issuer = IssuerUrl::new(check.issuer.to_owned())
            .map_err(|e| ClaimsVerificationError::Other(format!("issuer URL: {e}")))?;
        let client_id = ClientId::new(check.client_id.to_owned());
        let verifier = match check.client_secret {
            Some(secret) => CoreIdTokenVerifier::new_confidential_client(
                client_id,
                ClientSecret::new(secret.expose().to_owned()),
                issuer,
                keys,
            )
            .set_allowed_algs([
                CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
                CoreJwsSigningAlgorithm::HmacSha256,
                CoreJwsSigningAlgorithm::HmacSha384,
                CoreJwsSigningAlgorithm::HmacSha512,
            ]),
            None => CoreIdTokenVerifier::new_public_client(client_id, issuer, keys),
        };
        match check.nonce {
            Some(expected) => self
                .token
                .claims(&verifier, &Nonce::new(expected.to_owned()))
                .cloned(),
            None => self
                .token
                .claims(&verifier, |_: Option<&Nonce>| Ok(()))
                .cloned(),
        }
    }

    /// `at_hash` (when present), then the identity to display.
    fn finish(
        &self,
        claims: CoreIdTokenClaims,
        key: &CoreJsonWebKey,
        check: &IdTokenCheck<'_>,
    ) -> Result<Identity, Miss> {
        if let Some(claimed) = claims.access_token_hash() {
            let access_token = AccessToken::new(check.access_token.to_owned());
            let matches = AccessTokenHash::from_token(&access_token, &self.alg, key)
                .is_ok_and(|computed| computed == *claimed);
            if !matches {
                return Err(Miss::Refused(IdTokenError::AtHashMismatch));
            }
        }
        Ok(Identity {
            subject: claims.subject().as_str().to_owned(),
            email: claims.email().map(|e| e.as_str().to_owned()),
            preferred_username: claims.preferred_username().map(|u| u.as_str().to_owned()),
        })
    }
}

/// Sorts openidconnect's verdict into key trouble and refusals.
fn classify(e: ClaimsVerificationError) -> Miss {
    use SignatureVerificationError as S;
    let refused = match e {
        ClaimsVerificationError::SignatureVerification(s) => match s {
            S::NoMatchingKey | S::InvalidKey(_) | S::AmbiguousKeyId(_) => return Miss::NoKey,
            S::CryptoError(_) => return Miss::BadSignature,
            S::NoSignature => IdTokenError::Unsigned,
            S::DisallowedAlg(d) | S::UnsupportedAlg(d) => {
                IdTokenError::DisallowedAlg { alg: sanitize(&d) }
            }
            other => IdTokenError::Malformed(sanitize(&other.to_string())),
        },
        ClaimsVerificationError::Expired(d) => IdTokenError::Expired(sanitize(&d)),
        ClaimsVerificationError::InvalidNonce(d) if d.contains("missing") => {
            IdTokenError::NonceMissing
        }
        ClaimsVerificationError::InvalidNonce(_) => IdTokenError::NonceMismatch,
        other => IdTokenError::Malformed(sanitize(&other.to_string())),
    };
    Miss::Refused(refused)
}

/// Decodes one base64url JWT segment holding a JSON object.
fn decode_json(segment: &str, what: &str) -> Result<Value, IdTokenError> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .map_err(|_| IdTokenError::Malformed(format!("the {what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(value @ Value::Object(_)) => Ok(value),
        _ => Err(IdTokenError::Malformed(format!(
            "the {what} is not a JSON object"
        ))),
    }
}
