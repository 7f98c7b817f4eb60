//! The token endpoint's answer during a login, with the ID token kept raw.
//!
//! openidconnect's own token response parses the ID token's claims while it
//! reads the JSON, so a token without `sub` or `iat` made the whole response
//! "unreadable" and hid which claim was wrong. Here the ID token stays a string
//! until [`super::verify`] checks it and names the claim that fails.

use std::time::Duration;

use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreErrorResponseType, CoreGenderClaim, CoreJsonWebKey,
    CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm, CoreRevocableToken,
    CoreRevocationErrorResponse, CoreTokenIntrospectionResponse, CoreTokenType,
};
use openidconnect::{
    AccessToken, EmptyAdditionalClaims, EndpointNotSet, EndpointSet, ExtraTokenFields, IdToken,
    OAuth2TokenResponse, RefreshToken, Scope, StandardErrorResponse, StandardTokenResponse,
};
use serde::{Deserialize, Serialize};

/// The fields of a token response beyond RFC 6749 §5.1 that a login reads.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct RawIdToken {
    /// The compact-serialised ID token, unparsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
}

impl std::fmt::Debug for RawIdToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawIdToken")
            .field("id_token", &self.id_token.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl ExtraTokenFields for RawIdToken {}

/// A token endpoint response whose ID token is still unchecked text.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawTokenResponse(StandardTokenResponse<RawIdToken, CoreTokenType>);

impl RawTokenResponse {
    /// The raw ID token, if the response has one.
    pub fn raw_id_token(&self) -> Option<&str> {
        self.0.extra_fields().id_token.as_deref()
    }
}

impl OAuth2TokenResponse for RawTokenResponse {
    type TokenType = CoreTokenType;

    fn access_token(&self) -> &AccessToken {
        self.0.access_token()
    }
    fn token_type(&self) -> &CoreTokenType {
        self.0.token_type()
    }
    fn expires_in(&self) -> Option<Duration> {
        self.0.expires_in()
    }
    fn refresh_token(&self) -> Option<&RefreshToken> {
        self.0.refresh_token()
    }
    fn scopes(&self) -> Option<&Vec<Scope>> {
        self.0.scopes()
    }
}

impl
    openidconnect::TokenResponse<
        EmptyAdditionalClaims,
        CoreGenderClaim,
        CoreJweContentEncryptionAlgorithm,
        CoreJwsSigningAlgorithm,
    > for RawTokenResponse
{
    /// Always `None`: the ID token is read with [`RawTokenResponse::raw_id_token`]
    /// and checked by this crate, never parsed on the way in.
    fn id_token(
        &self,
    ) -> Option<
        &IdToken<
            EmptyAdditionalClaims,
            CoreGenderClaim,
            CoreJweContentEncryptionAlgorithm,
            CoreJwsSigningAlgorithm,
        >,
    > {
        None
    }
}

/// openidconnect's core client, reading token responses as [`RawTokenResponse`].
pub type LoginClient<
    HasAuthUrl = EndpointNotSet,
    HasDeviceAuthUrl = EndpointNotSet,
    HasTokenUrl = EndpointSet,
> = openidconnect::Client<
    EmptyAdditionalClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    RawTokenResponse,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    HasAuthUrl,
    HasDeviceAuthUrl,
    EndpointNotSet,
    EndpointNotSet,
    HasTokenUrl,
    EndpointNotSet,
>;

/// A [`LoginClient`] before any endpoint is set.
pub type BareClient = LoginClient<EndpointNotSet, EndpointNotSet, EndpointNotSet>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_not_parsed_on_the_way_in_and_survive_re_encoding() {
        // An ID token without `sub` or `iat` used to make the response unreadable.
        let body = r#"{"access_token":"at","token_type":"bearer","expires_in":60,"refresh_token":"rt","id_token":"h.e30.s","scope":"openid"}"#;
        let r: RawTokenResponse = serde_json::from_str(body).unwrap();
        assert_eq!(r.raw_id_token(), Some("h.e30.s"));
        assert_eq!(r.refresh_token().unwrap().secret(), "rt");
        let back: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(back["id_token"], "h.e30.s");
        assert!(!format!("{r:?}").contains("h.e30.s"));
    }
}
