//! What one profile file holds, decrypted. Serialized as JSON inside age.

use kontext_broker_protocol::{
    ClientAuthMethod, ClientCredential, ImportRequest, LifetimeSource, Secret, Token,
};
use serde::{Deserialize, Serialize};

/// Current on-disk format version of [`ProfileRecord`].
pub const PROFILE_FORMAT_VERSION: u32 = 1;

/// Endpoints found by discovery (OIDC, or RFC 8414 as a fallback).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Endpoints {
    pub token: String,
    pub authorization: Option<String>,
    pub revocation: Option<String>,
    pub device_authorization: Option<String>,
    pub registration: Option<String>,
    pub userinfo: Option<String>,
    pub introspection: Option<String>,
    pub jwks_uri: Option<String>,
    /// `token_endpoint_auth_methods_supported`; `None` when the server lists nothing.
    #[serde(default)]
    pub token_auth_methods: Option<Vec<String>>,
    /// `revocation_endpoint_auth_methods_supported`; `None` when the server lists nothing.
    #[serde(default)]
    pub revocation_auth_methods: Option<Vec<String>>,
}

/// The cached access token, persisted so a restart need not refresh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAccessToken {
    pub token: Secret,
    pub token_type: String,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
    pub scopes: Vec<String>,
    /// Where the lifetime came from; `None` in files written before it was recorded.
    #[serde(default)]
    pub lifetime_source: Option<LifetimeSource>,
}

/// Everything the broker keeps about one profile.
///
/// Invariant: `refresh_token` is `None` exactly when the profile needs a new
/// login (`reauth_required`); the metadata stays so the login can reuse it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileRecord {
    pub format_version: u32,
    pub name: String,
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    /// PEM private key for `private_key_jwt`; exclusive with `client_secret`.
    #[serde(default)]
    pub client_key: Option<Secret>,
    /// The client authentication method the user chose (`--client-auth`); wins over discovery.
    #[serde(default)]
    pub client_auth: Option<ClientAuthMethod>,
    /// The method found to work when the server listed both secret methods and
    /// the first was refused (auto-detect); tried first from then on.
    #[serde(default)]
    pub client_auth_detected: Option<ClientAuthMethod>,
    /// Set while the IdP rejects the client (not the grant): why, sanitized.
    /// The refresh token stays; the profile is `client_rejected` until the client changes.
    #[serde(default)]
    pub client_rejected: Option<String>,
    pub scopes: Vec<String>,
    pub audience: Option<String>,
    pub endpoints: Endpoints,
    /// Subject or email from the ID token, for display only.
    pub subject: Option<String>,
    pub refresh_token: Option<Secret>,
    pub access_token: Option<StoredAccessToken>,
    /// Generation of `access_token`; +1 for every new token.
    pub generation: u64,
}

/// A token response as an import or login read it: what a new record holds.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub access_token: Secret,
    pub token_type: String,
    pub refresh_token: Secret,
    /// The scopes the IdP says it granted; `None` means "as requested".
    pub granted_scopes: Option<Vec<String>>,
    /// Seconds from `issued_at` to expiry (0 for a token that arrived expired).
    pub lifetime_secs: u64,
    pub lifetime_source: LifetimeSource,
    /// Subject or email from the ID token, for display only.
    pub subject: Option<String>,
}

impl ProfileRecord {
    /// The record of a new profile: `import`'s client and scopes, `token`
    /// obtained at unix time `now_secs`, and the discovered `endpoints`.
    /// Generation 1; an install may raise it above an earlier session's.
    pub fn from_import(
        import: ImportRequest,
        token: IssuedToken,
        endpoints: Endpoints,
        now_secs: u64,
    ) -> ProfileRecord {
        let (client_secret, client_key) = match import.credential {
            ClientCredential::None => (None, None),
            ClientCredential::Secret(secret) => (Some(secret), None),
            ClientCredential::PrivateKey(key) => (None, Some(key)),
        };
        ProfileRecord {
            format_version: PROFILE_FORMAT_VERSION,
            name: import.profile,
            issuer: import.issuer,
            client_id: import.client_id,
            client_secret,
            client_key,
            client_auth: import.client_auth,
            client_auth_detected: None,
            client_rejected: None,
            scopes: import.scopes.clone(),
            audience: None,
            endpoints,
            subject: token.subject,
            refresh_token: Some(token.refresh_token),
            access_token: Some(StoredAccessToken {
                token: token.access_token,
                token_type: token.token_type,
                issued_at: now_secs,
                expires_at: now_secs + token.lifetime_secs,
                scopes: token.granted_scopes.unwrap_or(import.scopes),
                lifetime_source: Some(token.lifetime_source),
            }),
            generation: 1,
        }
    }

    /// The cached access token as served to clients, if any.
    pub fn token(&self) -> Option<Token> {
        self.access_token.as_ref().map(|a| Token {
            access_token: a.token.clone(),
            token_type: a.token_type.clone(),
            expires_at: a.expires_at,
            issued_at: a.issued_at,
            generation: self.generation,
            scopes: a.scopes.clone(),
        })
    }
}
