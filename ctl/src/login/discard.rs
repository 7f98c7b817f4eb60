//! Revoking the tokens of a refused token response (RFC 7009), best effort.
//!
//! When a login refuses a response (a bad ID token, no refresh token), its
//! access and refresh tokens are dropped, but they would stay valid at the
//! provider. They are revoked in a background task bounded by
//! [`REVOKE_TIMEOUT`], so the refusal reaches the user at once; the outcome is
//! logged without the tokens.

use std::time::Duration;

use kontext_broker_protocol::{ClientAuthMethod, Secret};
use tokio_util::task::TaskTracker;

use kontext_broker::idp::{validate_endpoint, ClientAuth, Http};

/// Upper bound on the whole background revocation.
pub const REVOKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The tokens of a refused response and where to revoke them.
pub(super) struct Discarded {
    /// RFC 7009 revocation endpoint; without one nothing is sent.
    pub endpoint: Option<String>,
    /// The token endpoint: the `aud` of a client assertion.
    pub audience: String,
    /// The client, and the method to authenticate it with (`None`: none known).
    pub auth: ClientAuth,
    pub method: Option<ClientAuthMethod>,
    pub access_token: Secret,
    pub refresh_token: Option<Secret>,
}

impl Discarded {
    /// Starts the revocation on `tasks` and returns at once.
    pub(super) fn revoke_in_background(self, http: &Http, tasks: &TaskTracker) {
        let Some(endpoint) = self.endpoint.clone() else {
            tracing::info!(
                "the refused login's tokens stay valid until they expire: the provider advertises no revocation endpoint"
            );
            return;
        };
        let http = http.clone();
        tasks.spawn(async move {
            match tokio::time::timeout(REVOKE_TIMEOUT, self.revoke(&http, &endpoint)).await {
                Ok(()) => {}
                Err(_) => tracing::warn!(
                    %endpoint,
                    "revoking the refused login's tokens timed out after {}s",
                    REVOKE_TIMEOUT.as_secs()
                ),
            }
        });
    }

    async fn revoke(&self, http: &Http, endpoint: &str) {
        if let Err(e) = validate_endpoint("revocation_endpoint", endpoint) {
            tracing::warn!("not revoking the refused login's tokens: {e}");
            return;
        }
        // The refresh token first: at most providers it takes the grant with it.
        let tokens = self
            .refresh_token
            .iter()
            .map(|t| (t, "refresh_token"))
            .chain(std::iter::once((&self.access_token, "access_token")));
        for (token, hint) in tokens {
            let Some(method) = self.method else {
                tracing::warn!(
                    "not revoking the refused login's tokens: no client authentication method fits"
                );
                return;
            };
            // A fresh assertion per request: a `jti` is single use.
            let prepared = match self.auth.prepare(method, &self.audience) {
                Ok(prepared) => prepared,
                Err(e) => {
                    tracing::warn!("not revoking the refused login's tokens: {e}");
                    return;
                }
            };
            let mut form = vec![("token", token.expose()), ("token_type_hint", hint)];
            form.extend(prepared.form_fields());
            match http.post_form(endpoint, &form, prepared.basic()).await {
                Ok((200, _)) => tracing::info!(%endpoint, "revoked the refused login's {hint}"),
                Ok((status, _)) => tracing::warn!(
                    %endpoint,
                    "the provider refused to revoke the refused login's {hint}: HTTP {status}"
                ),
                Err(e) => tracing::warn!(
                    %endpoint,
                    "could not revoke the refused login's {hint}: {e}"
                ),
            }
        }
    }
}
