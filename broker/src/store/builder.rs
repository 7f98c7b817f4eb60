//! A builder for [`ProfileRecord`]: the fields every profile has up front,
//! the optional ones by name, so a new field does not touch every caller.

use kontext_broker_protocol::{ClientAuthMethod, Secret};

use super::record::{Endpoints, ProfileRecord, StoredAccessToken, PROFILE_FORMAT_VERSION};

impl ProfileRecord {
    /// A record of profile `name` for `client_id` at `issuer`, whose token
    /// endpoint is `token_endpoint`. Every other field starts empty: no
    /// credential, scopes or tokens, generation 0.
    pub fn builder(
        name: impl Into<String>,
        issuer: impl Into<String>,
        client_id: impl Into<String>,
        token_endpoint: impl Into<String>,
    ) -> ProfileRecordBuilder {
        ProfileRecordBuilder(ProfileRecord {
            format_version: PROFILE_FORMAT_VERSION,
            name: name.into(),
            issuer: issuer.into(),
            client_id: client_id.into(),
            client_secret: None,
            client_key: None,
            client_auth: None,
            client_auth_detected: None,
            client_rejected: None,
            scopes: Vec::new(),
            audience: None,
            endpoints: Endpoints {
                token: token_endpoint.into(),
                ..Endpoints::default()
            },
            subject: None,
            refresh_token: None,
            access_token: None,
            generation: 0,
        })
    }
}

/// Builds a [`ProfileRecord`]; start with [`ProfileRecord::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ProfileRecordBuilder(ProfileRecord);

impl ProfileRecordBuilder {
    /// The client's secret (confidential client).
    pub fn client_secret(mut self, secret: impl Into<Secret>) -> Self {
        self.0.client_secret = Some(secret.into());
        self
    }

    /// The client's PEM private key (`private_key_jwt`).
    pub fn client_key(mut self, key: impl Into<Secret>) -> Self {
        self.0.client_key = Some(key.into());
        self
    }

    /// The configured client authentication method.
    pub fn client_auth(mut self, method: ClientAuthMethod) -> Self {
        self.0.client_auth = Some(method);
        self
    }

    /// The client authentication method found to work.
    pub fn client_auth_detected(mut self, method: ClientAuthMethod) -> Self {
        self.0.client_auth_detected = Some(method);
        self
    }

    /// The granted scopes.
    pub fn scopes<S: Into<String>>(mut self, scopes: impl IntoIterator<Item = S>) -> Self {
        self.0.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// The audience (resource) the tokens are for.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.0.audience = Some(audience.into());
        self
    }

    /// The revocation endpoint.
    pub fn revocation(mut self, endpoint: impl Into<String>) -> Self {
        self.0.endpoints.revocation = Some(endpoint.into());
        self
    }

    /// Every endpoint at once (replaces the token endpoint given at the start).
    pub fn endpoints(mut self, endpoints: Endpoints) -> Self {
        self.0.endpoints = endpoints;
        self
    }

    /// The account the ID token named.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.0.subject = Some(subject.into());
        self
    }

    /// The refresh token.
    pub fn refresh_token(mut self, token: impl Into<Secret>) -> Self {
        self.0.refresh_token = Some(token.into());
        self
    }

    /// The cached access token.
    pub fn access_token(mut self, token: StoredAccessToken) -> Self {
        self.0.access_token = Some(token);
        self
    }

    /// The token generation.
    pub fn generation(mut self, generation: u64) -> Self {
        self.0.generation = generation;
        self
    }

    /// The record.
    pub fn build(self) -> ProfileRecord {
        self.0
    }
}

impl StoredAccessToken {
    /// A `Bearer` token valid from `issued_at` to `expires_at` (Unix seconds)
    /// for `scopes`, with no recorded lifetime source.
    pub fn bearer<S: Into<String>>(
        token: impl Into<Secret>,
        issued_at: u64,
        expires_at: u64,
        scopes: impl IntoIterator<Item = S>,
    ) -> StoredAccessToken {
        StoredAccessToken {
            token: token.into(),
            token_type: "Bearer".into(),
            issued_at,
            expires_at,
            scopes: scopes.into_iter().map(Into::into).collect(),
            lifetime_source: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_sets_what_it_is_given_and_leaves_the_rest_empty() {
        let bare = ProfileRecord::builder("p", "https://i", "c", "https://i/token").build();
        assert_eq!(bare.format_version, PROFILE_FORMAT_VERSION);
        assert_eq!(bare.endpoints.token, "https://i/token");
        assert_eq!(bare.endpoints.revocation, None);
        assert!(bare.refresh_token.is_none() && bare.access_token.is_none());
        assert_eq!(bare.generation, 0);

        let full = ProfileRecord::builder("p", "https://i", "c", "https://i/token")
            .client_secret("s")
            .scopes(["openid"])
            .revocation("https://i/revoke")
            .refresh_token("rt")
            .access_token(StoredAccessToken::bearer("at", 1, 2, ["openid"]))
            .generation(3)
            .build();
        assert_eq!(full.client_secret.as_ref().map(Secret::expose), Some("s"));
        assert_eq!(full.scopes, vec!["openid".to_owned()]);
        assert_eq!(
            full.endpoints.revocation.as_deref(),
            Some("https://i/revoke")
        );
        assert_eq!(full.refresh_token.as_ref().map(Secret::expose), Some("rt"));
        let at = full.access_token.unwrap();
        assert_eq!(
            (at.token.expose(), at.token_type.as_str()),
            ("at", "Bearer")
        );
        assert_eq!((at.issued_at, at.expires_at), (1, 2));
        assert_eq!(full.generation, 3);
    }
}
