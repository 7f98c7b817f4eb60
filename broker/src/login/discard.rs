//! Revoking the tokens of a refused token response (RFC 7009), best effort.
//!
//! When a login refuses a response (a bad ID token, no refresh token), its
//! access and refresh tokens are dropped, but they would stay valid at the
//! provider. They are revoked in a background task bounded by
//! [`REVOKE_TIMEOUT`], so the refusal reaches the user at once; the outcome is
//! logged without the tokens.

use std::time::Duration;

use kontext_broker_protocol::Secret;
use tokio_util::task::TaskTracker;

use crate::idp::{validate_endpoint, Http};

/// Upper bound on the whole background revocation.
pub const REVOKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The tokens of a refused response and where to revoke them.
pub(super) struct Discarded {
    /// RFC 7009 revocation endpoint; without one nothing is sent.
    pub endpoint: Option<String>,
    pub client_id: String,
    pub client_secret: Option<Secret>,
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
            let mut form = vec![("token", token.expose()), ("token_type_hint", hint)];
            let secret = self.client_secret.as_ref().map(Secret::expose);
            if secret.is_none() {
                form.push(("client_id", &self.client_id));
            }
            let basic = secret.map(|s| (self.client_id.as_str(), s));
            match http.post_form(endpoint, &form, basic).await {
                Ok(200) => tracing::info!(%endpoint, "revoked the refused login's {hint}"),
                Ok(status) => tracing::warn!(
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
