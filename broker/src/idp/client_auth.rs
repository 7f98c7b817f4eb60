//! Client authentication at the token, revocation and device-authorization
//! endpoints (RFC 6749 §2.3, RFC 8414 §2, RFC 7523 §2.2, OpenID Connect Core §9).
//!
//! Which method a call uses:
//! - a client key means `private_key_jwt`; no credential means `none`;
//! - with a secret, the profile's own setting (`--client-auth`, or config) wins;
//! - otherwise the first of `client_secret_basic`, `client_secret_post` that the
//!   server lists for that endpoint, and `client_secret_basic` when it lists
//!   neither (RFC 8414's default);
//! - when it lists both, the other one is tried once after an `invalid_client`,
//!   and the one that worked is remembered in the profile (like golang.org/x/oauth2's
//!   `AuthStyleAutoDetect`), so it is tried first from then on.
//!
//! A `private_key_jwt` assertion is made fresh for every request: `iss` = `sub` =
//! the client id, `aud` the token endpoint, a random `jti`, and a 60 s lifetime.
//! Signing is jsonwebtoken's (pure-Rust backend); nothing here does crypto itself.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use kontext_broker_protocol::{ClientAuthMethod, ClientCredential, Secret};
use openidconnect::core::CoreClient;
use openidconnect::{AuthType, ClientSecret, EndpointState};
use rand::RngCore as _;
use serde::Serialize;

use crate::store::{Endpoints, ProfileRecord};
use crate::{Error, Result};

/// RFC 7523 §2.2 `client_assertion_type`.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Lifetime of one client assertion, in seconds (the brief asks for at most 60).
pub const ASSERTION_LIFETIME_SECS: u64 = 60;

/// Which endpoint a call goes to; each may list its own methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointKind {
    /// The token endpoint (refresh, code exchange, device-code polling).
    Token,
    /// RFC 7009 revocation.
    Revocation,
    /// RFC 8628 device authorization (uses the token endpoint's methods).
    DeviceAuthorization,
}

/// A profile's client as the IdP sees it: id, credential and method choices.
#[derive(Clone)]
pub struct ClientAuth {
    /// The OAuth client id.
    pub client_id: String,
    /// What the client proves itself with.
    pub credential: ClientCredential,
    /// The method the user chose; wins over discovery when it fits the credential.
    pub configured: Option<ClientAuthMethod>,
    /// The secret method auto-detection found to work.
    pub remembered: Option<ClientAuthMethod>,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // ClientCredential's secrets print as [redacted] already; say which kind only.
        f.debug_struct("ClientAuth")
            .field("client_id", &self.client_id)
            .field("credential", &credential_kind(&self.credential))
            .field("configured", &self.configured)
            .field("remembered", &self.remembered)
            .finish()
    }
}

fn credential_kind(c: &ClientCredential) -> &'static str {
    match c {
        ClientCredential::None => "none",
        ClientCredential::Secret(_) => "secret",
        ClientCredential::PrivateKey(_) => "private key",
    }
}

/// The credential a record holds.
pub fn record_credential(record: &ProfileRecord) -> ClientCredential {
    match (&record.client_key, &record.client_secret) {
        (Some(key), _) => ClientCredential::PrivateKey(key.clone()),
        (None, Some(secret)) => ClientCredential::Secret(secret.clone()),
        (None, None) => ClientCredential::None,
    }
}

/// Checks that `method` can be used with `credential`; the error names the fix.
pub fn check_method(credential: &ClientCredential, method: ClientAuthMethod) -> Result<()> {
    let fits = matches!(
        (credential, method),
        (ClientCredential::None, ClientAuthMethod::None)
            | (
                ClientCredential::Secret(_),
                ClientAuthMethod::ClientSecretBasic | ClientAuthMethod::ClientSecretPost
            )
            | (
                ClientCredential::PrivateKey(_),
                ClientAuthMethod::PrivateKeyJwt
            )
    );
    if fits {
        return Ok(());
    }
    let needs = match method {
        ClientAuthMethod::None => {
            "no client credential (drop --client-secret-file/--client-key-file)"
        }
        ClientAuthMethod::ClientSecretBasic | ClientAuthMethod::ClientSecretPost => {
            "a client secret (--client-secret-file)"
        }
        ClientAuthMethod::PrivateKeyJwt => "a private key (--client-key-file)",
    };
    Err(Error::Invalid(format!(
        "client authentication `{}` needs {needs}, but the profile has {}",
        method.as_str(),
        match credential {
            ClientCredential::None => "no client credential",
            ClientCredential::Secret(_) => "a client secret",
            ClientCredential::PrivateKey(_) => "a private key",
        }
    )))
}

impl ClientAuth {
    /// The client of `record`; `config_method` is the config file's setting for
    /// the profile, used when the record has none of its own.
    pub fn of_record(
        record: &ProfileRecord,
        config_method: Option<ClientAuthMethod>,
    ) -> ClientAuth {
        ClientAuth {
            client_id: record.client_id.clone(),
            credential: record_credential(record),
            configured: record.client_auth.or(config_method),
            remembered: record.client_auth_detected,
        }
    }

    /// The methods to try at `kind`, in order: one, or two while auto-detecting.
    pub fn attempts(&self, endpoints: &Endpoints, kind: EndpointKind) -> Vec<ClientAuthMethod> {
        use ClientAuthMethod::{ClientSecretBasic as Basic, ClientSecretPost as Post};
        match &self.credential {
            ClientCredential::None => vec![ClientAuthMethod::None],
            ClientCredential::PrivateKey(_) => vec![ClientAuthMethod::PrivateKeyJwt],
            ClientCredential::Secret(_) => {
                if let Some(m) = self
                    .configured
                    .filter(|m| check_method(&self.credential, *m).is_ok())
                {
                    return vec![m];
                }
                let listed = match kind {
                    EndpointKind::Revocation => endpoints
                        .revocation_auth_methods
                        .as_ref()
                        .or(endpoints.token_auth_methods.as_ref()),
                    EndpointKind::Token | EndpointKind::DeviceAuthorization => {
                        endpoints.token_auth_methods.as_ref()
                    }
                };
                let has =
                    |m: ClientAuthMethod| listed.is_some_and(|l| l.iter().any(|x| x == m.as_str()));
                match (has(Basic), has(Post)) {
                    (true, true) => {
                        let first = self
                            .remembered
                            .filter(|m| matches!(m, Basic | Post))
                            .unwrap_or(Basic);
                        let other = if first == Basic { Post } else { Basic };
                        vec![first, other]
                    }
                    (false, true) => vec![Post],
                    _ => vec![Basic],
                }
            }
        }
    }

    /// The request parts for one attempt with `method`; `audience` is the token
    /// endpoint (the `aud` of a client assertion).
    pub fn prepare(&self, method: ClientAuthMethod, audience: &str) -> Result<Prepared> {
        check_method(&self.credential, method)?;
        let id = self.client_id.clone();
        Ok(match (&self.credential, method) {
            (ClientCredential::Secret(secret), ClientAuthMethod::ClientSecretBasic) => {
                Prepared::Basic {
                    id,
                    secret: secret.clone(),
                }
            }
            (ClientCredential::Secret(secret), _) => Prepared::Post {
                id,
                secret: secret.clone(),
            },
            (ClientCredential::PrivateKey(key), _) => {
                let jwt = assertion(&self.client_id, key, audience, now_secs())?;
                Prepared::Assertion { id, jwt }
            }
            (ClientCredential::None, _) => Prepared::Public { id },
        })
    }
}

/// How one request authenticates its client.
pub enum Prepared {
    /// Only `client_id` in the body.
    Public { id: String },
    /// RFC 6749 §2.3.1 HTTP Basic.
    Basic { id: String, secret: Secret },
    /// RFC 6749 §2.3.1 body fields.
    Post { id: String, secret: Secret },
    /// RFC 7523 §2.2 `client_assertion`, plus `client_id` in the body.
    Assertion { id: String, jwt: Secret },
}

impl Prepared {
    /// Sets the secret and auth style on an openidconnect client. Use
    /// [`Prepared::extra_params`] on the request as well.
    pub fn configure<A, B, C, D, E, F>(
        &self,
        client: CoreClient<A, B, C, D, E, F>,
    ) -> CoreClient<A, B, C, D, E, F>
    where
        A: EndpointState,
        B: EndpointState,
        C: EndpointState,
        D: EndpointState,
        E: EndpointState,
        F: EndpointState,
    {
        match self.secret_and_style() {
            Some((secret, style)) => client.set_client_secret(secret).set_auth_type(style),
            None => client,
        }
    }

    /// The secret and where it goes, for an openidconnect client of any shape;
    /// `None` sends only `client_id` in the body (public clients, assertions).
    pub fn secret_and_style(&self) -> Option<(ClientSecret, AuthType)> {
        match self {
            Prepared::Public { .. } | Prepared::Assertion { .. } => None,
            Prepared::Basic { secret, .. } => Some((
                ClientSecret::new(secret.expose().to_owned()),
                AuthType::BasicAuth,
            )),
            Prepared::Post { secret, .. } => Some((
                ClientSecret::new(secret.expose().to_owned()),
                AuthType::RequestBody,
            )),
        }
    }

    /// Body parameters openidconnect does not add by itself (the assertion).
    pub fn extra_params(&self) -> Vec<(&'static str, String)> {
        match self {
            Prepared::Assertion { jwt, .. } => vec![
                ("client_assertion_type", ASSERTION_TYPE.to_owned()),
                ("client_assertion", jwt.expose().to_owned()),
            ],
            _ => Vec::new(),
        }
    }

    /// Body fields for a hand-built form request (revocation).
    pub fn form_fields(&self) -> Vec<(&'static str, &str)> {
        match self {
            Prepared::Public { id } => vec![("client_id", id)],
            Prepared::Basic { .. } => Vec::new(),
            Prepared::Post { id, secret } => {
                vec![("client_id", id), ("client_secret", secret.expose())]
            }
            Prepared::Assertion { id, jwt } => vec![
                ("client_id", id),
                ("client_assertion_type", ASSERTION_TYPE),
                ("client_assertion", jwt.expose()),
            ],
        }
    }

    /// Id and secret for HTTP Basic, when this is `client_secret_basic`.
    pub fn basic(&self) -> Option<(&str, &str)> {
        match self {
            Prepared::Basic { id, secret } => Some((id, secret.expose())),
            _ => None,
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    iat: u64,
    exp: u64,
}

/// A signed client assertion for `client_id` at `audience`, issued at `now`.
pub fn assertion(client_id: &str, key_pem: &Secret, audience: &str, now: u64) -> Result<Secret> {
    let (key, alg) = signing_key(key_pem)?;
    let mut jti = [0u8; 16];
    rand::rng().fill_bytes(&mut jti);
    let claims = AssertionClaims {
        iss: client_id,
        sub: client_id,
        aud: audience,
        jti: hex_lower(&jti),
        iat: now,
        exp: now + ASSERTION_LIFETIME_SECS,
    };
    jsonwebtoken::encode(&Header::new(alg), &claims, &key)
        .map(Secret::new)
        .map_err(|e| {
            Error::Invalid(format!(
                "cannot sign a client assertion with the client key ({e}); use an RSA or EC P-256 private key"
            ))
        })
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks that `key_pem` is a usable client key by signing a throwaway
/// assertion; returns the JWS algorithm it signs with. Errors never echo the key.
pub fn check_client_key(key_pem: &Secret) -> Result<&'static str> {
    let (_, alg) = signing_key(key_pem)?;
    assertion("check", key_pem, "https://check.invalid/token", 0)?;
    Ok(match alg {
        Algorithm::ES256 => "ES256",
        _ => "RS256",
    })
}

/// The signing key and algorithm of a PEM private key: RSA (PKCS#1 or PKCS#8)
/// signs RS256, EC P-256 (SEC1 or PKCS#8) signs ES256.
fn signing_key(key_pem: &Secret) -> Result<(EncodingKey, Algorithm)> {
    let pem = key_pem.expose();
    let label = pem
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .unwrap_or("");
    let bad = |what: &str| {
        Error::Invalid(format!(
            "the client key is {what}; give a PEM private key, RSA or EC P-256 (`-----BEGIN PRIVATE KEY-----`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`)"
        ))
    };
    match label {
        "RSA PRIVATE KEY" => EncodingKey::from_rsa_pem(pem.as_bytes())
            .map(|k| (k, Algorithm::RS256))
            .map_err(|_| bad("not a readable RSA key")),
        "EC PRIVATE KEY" => {
            use p256::pkcs8::EncodePrivateKey as _;
            let secret = p256::SecretKey::from_sec1_pem(pem)
                .map_err(|_| bad("not a readable EC P-256 key"))?;
            let der = secret
                .to_pkcs8_der()
                .map_err(|_| bad("not a readable EC P-256 key"))?;
            Ok((EncodingKey::from_ec_der(der.as_bytes()), Algorithm::ES256))
        }
        "PRIVATE KEY" => EncodingKey::from_rsa_pem(pem.as_bytes())
            .map(|k| (k, Algorithm::RS256))
            .or_else(|_| EncodingKey::from_ec_pem(pem.as_bytes()).map(|k| (k, Algorithm::ES256)))
            .map_err(|_| bad("a PKCS#8 key that is neither RSA nor EC")),
        "ENCRYPTED PRIVATE KEY" => Err(Error::Invalid(
            "the client key is encrypted; the broker keeps it encrypted itself, so store it unencrypted (`openssl pkcs8 -in KEY -nocrypt -out KEY.plain`)".into(),
        )),
        _ => Err(bad("not a PEM private key")),
    }
}

#[cfg(test)]
mod tests;
