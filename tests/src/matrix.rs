//! One end-to-end test matrix, two real authorization servers: [`Server`]
//! hides what differs between oidc-provider and django-oauth-toolkit (clients,
//! scopes, counters, how an administrator kills a grant, how a user clicks
//! through the pages), so each case in `tests/tests/interop_matrix.rs` is
//! written once.

use serde_json::Value;
use url::Url;

use crate::dot::{self, DotServer};
use crate::oidc_provider::{self, http_client, OidcProvider};

/// Which server a matrix case runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `oidc-provider` on Node (tests/idp).
    OidcProvider,
    /// django-oauth-toolkit on Python (tests/dot).
    Dot,
}

/// Refresh counters at the server's token endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdpStats {
    /// `grant_type=refresh_token` requests, failed ones included.
    pub refresh_grants: u64,
    /// Those that failed.
    pub refresh_errors: u64,
    /// Refresh grants presenting a refresh token that had already been rotated.
    pub replays: u64,
}

/// A running server of either kind.
#[derive(Debug)]
pub enum Server {
    /// oidc-provider.
    OidcProvider(OidcProvider),
    /// django-oauth-toolkit.
    Dot(DotServer),
}

impl Server {
    /// Starts a server of `kind` with `ttl`-second access tokens. `None` only for
    /// DOT without python3 outside CI (see [`crate::dot`]).
    pub async fn start(kind: Kind, ttl: u64) -> Option<Server> {
        match kind {
            Kind::OidcProvider => Some(Server::OidcProvider(OidcProvider::start(ttl).await)),
            Kind::Dot => DotServer::start(ttl).await.map(Server::Dot),
        }
    }

    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Server::OidcProvider(_) => "oidc-provider",
            Server::Dot(_) => "django-oauth-toolkit",
        }
    }

    /// The issuer URL.
    pub fn issuer(&self) -> &str {
        match self {
            Server::OidcProvider(p) => p.issuer(),
            Server::Dot(d) => d.issuer(),
        }
    }

    /// The public client for the authorization code flow.
    pub fn public_client(&self) -> &'static str {
        match self {
            Server::OidcProvider(_) => oidc_provider::PUBLIC_CLIENT_ID,
            Server::Dot(_) => dot::PUBLIC_CLIENT_ID,
        }
    }

    /// The public client for the device flow.
    pub fn device_client(&self) -> &'static str {
        match self {
            Server::OidcProvider(_) => oidc_provider::PUBLIC_CLIENT_ID,
            Server::Dot(_) => dot::DEVICE_CLIENT_ID,
        }
    }

    /// The confidential client and its secret.
    pub fn confidential_client(&self) -> (&'static str, &'static str) {
        match self {
            Server::OidcProvider(_) => (
                oidc_provider::CONFIDENTIAL_CLIENT_ID,
                oidc_provider::CONFIDENTIAL_CLIENT_SECRET,
            ),
            Server::Dot(_) => (dot::CONFIDENTIAL_CLIENT_ID, dot::CONFIDENTIAL_CLIENT_SECRET),
        }
    }

    /// The scopes a minted grant carries (and an import records).
    pub fn grant_scopes(&self) -> &'static [&'static str] {
        match self {
            Server::OidcProvider(_) => &["openid", "offline_access"],
            Server::Dot(_) => dot::DEFAULT_SCOPES,
        }
    }

    /// `broker-ctl login` flags this server needs beyond issuer and client:
    /// DOT advertises no device authorization endpoint, so the device flow
    /// names it.
    pub fn login_flags(&self, device: bool) -> Vec<String> {
        match self {
            Server::Dot(d) if device => vec![
                "--device-authorization-endpoint".into(),
                d.device_authorization_endpoint(),
            ],
            _ => Vec::new(),
        }
    }

    /// Mints a grant for `client_id` without a login; returns its token response.
    pub async fn mint(&self, client_id: &str) -> Value {
        match self {
            Server::OidcProvider(p) => p.mint(client_id, self.grant_scopes()).await,
            Server::Dot(d) => d.mint(client_id, self.grant_scopes()).await,
        }
    }

    /// The token endpoint counters since the server started.
    pub async fn stats(&self) -> IdpStats {
        match self {
            Server::OidcProvider(p) => {
                let s = crate::backend::provider_stats(p.issuer()).await;
                IdpStats {
                    refresh_grants: s.refresh_token_grants,
                    refresh_errors: s.refresh_token_grant_errors,
                    replays: s.refresh_token_replays,
                }
            }
            Server::Dot(d) => {
                let s = d.stats().await;
                IdpStats {
                    refresh_grants: s.refresh_token_grants,
                    refresh_errors: s.refresh_token_grant_errors,
                    replays: s.refresh_token_replays,
                }
            }
        }
    }

    /// Whether the server would accept `token` (access or refresh) now.
    pub async fn token_active(&self, token: &str) -> bool {
        match self {
            Server::OidcProvider(p) => p.introspect_active(token).await,
            Server::Dot(d) => d.token_active(token).await,
        }
    }

    /// Kills the grant behind `access_token` (of the public client) as an
    /// administrator would. oidc-provider: revoking an access token revokes its
    /// whole grant. DOT: every token of the client and user is deleted.
    pub async fn admin_revoke(&self, client_id: &str, access_token: &str) {
        match self {
            Server::OidcProvider(p) => {
                let resp = http_client()
                    .post(format!("{}/token/revocation", p.issuer()))
                    .form(&[("token", access_token), ("client_id", client_id)])
                    .send()
                    .await
                    .expect("POST /token/revocation");
                assert!(resp.status().is_success(), "revocation: {}", resp.status());
            }
            Server::Dot(d) => {
                let deleted = d.revoke_grant(client_id).await;
                assert!(deleted >= 1, "no refresh token of {client_id} to delete");
            }
        }
    }

    /// Plays the user on the server's login and consent pages from
    /// `authorization_url`; returns the redirect to the client (not requested).
    pub async fn complete_login(&self, authorization_url: &str) -> anyhow::Result<Url> {
        match self {
            Server::OidcProvider(_) => crate::html_form::complete_login(authorization_url).await,
            Server::Dot(_) => dot::complete_login(authorization_url).await,
        }
    }

    /// Plays the user approving a device login, given the complete verification
    /// URI the CLI printed.
    pub async fn approve_device(&self, printed: &Url) -> anyhow::Result<()> {
        let code = printed
            .query_pairs()
            .find(|(k, _)| k == "user_code")
            .map(|(_, v)| v.into_owned())
            .ok_or_else(|| anyhow::anyhow!("{printed} carries no user_code"))?;
        match self {
            Server::OidcProvider(p) => {
                crate::html_form::approve_device_code(p.issuer(), &code).await
            }
            Server::Dot(_) => dot::approve_device(printed, &code).await,
        }
    }
}
