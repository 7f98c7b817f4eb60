//! The state a login flow carries once discovery and registration are done,
//! and the checks every token response passes before it is handed back.

use kontext_broker::idp::client_auth::Prepared;
use kontext_broker::idp::{ClientAuth, EndpointKind, Http};
use kontext_broker::store::Endpoints;
use kontext_broker_protocol::{ClientAuthMethod, ClientCredential, Secret};
use openidconnect::{Nonce, OAuth2TokenResponse};

use super::page::Page;
use super::token::RawTokenResponse;
use super::{
    client_error, discard, verify_id_token, IdTokenCheck, IdTokenError, Identity, JwksCache,
    LoginError, LoginOptions, LoginOutcome,
};

/// What a login knows of the issuer after discovery.
pub(super) struct Discovered {
    /// Discovered endpoints, with the caller's overrides applied.
    pub(super) endpoints: Endpoints,
    /// The issuer exactly as the discovery document names it; the ID token's
    /// `iss` and the redirect's RFC 9207 `iss` must equal it byte for byte.
    pub(super) issuer: String,
    /// `authorization_response_iss_parameter_supported` (RFC 9207 §3).
    pub(super) iss_parameter_supported: bool,
}

/// Everything a flow needs once discovery and registration are done.
pub(super) struct LoginContext<'a> {
    pub(super) http: &'a Http,
    pub(super) opts: &'a LoginOptions,
    pub(super) discovered: &'a Discovered,
    /// The scopes asked for (the profile's scopes).
    pub(super) scopes: Vec<String>,
    pub(super) client_id: String,
    /// How the client authenticates (its credential too); set per request.
    pub(super) auth: ClientAuth,
    /// The secret method found to work after the first one listed was refused.
    pub(super) detected: std::sync::Mutex<Option<ClientAuthMethod>>,
    /// The issuer's keys, when an ID token is expected.
    pub(super) keys: Option<JwksCache>,
}

impl LoginContext<'_> {
    /// The client authentication methods to try at `kind`, in order.
    pub(super) fn attempts(&self, kind: EndpointKind) -> Vec<ClientAuthMethod> {
        self.auth.attempts(&self.discovered.endpoints, kind)
    }

    /// The request parts for `method` (a fresh assertion for `private_key_jwt`).
    pub(super) fn prepare(&self, method: ClientAuthMethod) -> Result<Prepared, LoginError> {
        self.auth
            .prepare(method, &self.discovered.endpoints.token)
            .map_err(|e| LoginError::Usage(e.to_string()))
    }

    /// Notes that `method` worked after the first choice was refused, so the
    /// profile keeps it.
    pub(super) fn detected(&self, method: ClientAuthMethod) {
        *self.detected.lock().unwrap_or_else(|e| e.into_inner()) = Some(method);
    }

    /// Gives a client rejection the wording that names the issuer and the client.
    pub(super) fn client_error(&self, e: LoginError) -> LoginError {
        client_error(e, &self.discovered.issuer, &self.client_id)
    }

    /// The checks every token response passes, in both flows: the ID token
    /// (nonce only when one was sent) and a refresh token. A refused response
    /// has its tokens revoked in the background and nothing is returned.
    pub(super) async fn accept(
        &self,
        response: RawTokenResponse,
        nonce: Option<&Nonce>,
    ) -> Result<LoginOutcome, LoginError> {
        let checked = self.check(&response, nonce).await;
        let identity = match checked {
            Ok(identity) => identity,
            Err(e) => {
                let detected = *self.detected.lock().unwrap_or_else(|e| e.into_inner());
                discard::Discarded {
                    endpoint: self.discovered.endpoints.revocation.clone(),
                    audience: self.discovered.endpoints.token.clone(),
                    method: detected
                        .or_else(|| self.attempts(EndpointKind::Revocation).first().copied()),
                    auth: self.auth.clone(),
                    access_token: Secret::new(response.access_token().secret().clone()),
                    refresh_token: response
                        .refresh_token()
                        .map(|t| Secret::new(t.secret().clone())),
                }
                .revoke_in_background(self.http, &self.opts.tasks);
                return Err(e);
            }
        };
        let json = serde_json::to_string(&response)
            .map_err(|e| LoginError::Token(format!("cannot re-encode the token response: {e}")))?;
        let (client_secret, client_key) = match &self.auth.credential {
            ClientCredential::Secret(secret) => (Some(secret.clone()), None),
            ClientCredential::PrivateKey(key) => (None, Some(key.clone())),
            ClientCredential::None => (None, None),
        };
        let detected = *self.detected.lock().unwrap_or_else(|e| e.into_inner());
        Ok(LoginOutcome {
            client_id: self.client_id.clone(),
            client_secret,
            client_key,
            client_auth: self.auth.configured.or(detected),
            scopes: self.scopes.clone(),
            token_response: Secret::new(json),
            subject: identity.map(|i| i.account().to_owned()),
            issuer: self.discovered.issuer.clone(),
        })
    }

    pub(super) async fn check(
        &self,
        response: &RawTokenResponse,
        nonce: Option<&Nonce>,
    ) -> Result<Option<Identity>, LoginError> {
        let identity = match (response.raw_id_token(), &self.keys) {
            // Not asked for, so not trusted for anything.
            (Some(_), None) => None,
            (Some(raw), Some(keys)) => {
                let check = IdTokenCheck {
                    issuer: &self.discovered.issuer,
                    client_id: &self.client_id,
                    client_secret: match &self.auth.credential {
                        ClientCredential::Secret(secret) => Some(secret),
                        _ => None,
                    },
                    nonce: nonce.map(|n| n.secret().as_str()),
                    access_token: response.access_token().secret(),
                };
                Some(verify_id_token(raw, keys, &check).await?)
            }
            // OIDC Core §3.1.3.3: the code flow's token response must carry one.
            (None, Some(_)) if nonce.is_some() => return Err(IdTokenError::Missing.into()),
            (None, _) => None,
        };
        if response.refresh_token().is_none() {
            return Err(LoginError::NoRefreshToken);
        }
        Ok(identity)
    }

    /// The browser's page for the outcome of the code flow.
    pub(super) fn page(&self, result: &Result<LoginOutcome, LoginError>) -> Page {
        match result {
            Ok(outcome) => Page::success(
                outcome.subject.as_deref(),
                &self.discovered.issuer,
                self.opts.profile.as_deref(),
            ),
            Err(e) => Page::failure(&e.to_string()),
        }
    }
}
