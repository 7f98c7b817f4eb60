//! The refresh-token grant and revocation, through openidconnect.

use futures::future::BoxFuture;
use kontext_broker_protocol::Secret;
use openidconnect::core::{CoreClient, CoreErrorResponseType};
use openidconnect::{
    ClientId, ClientSecret, IssuerUrl, JsonWebKeySet, OAuth2TokenResponse, RefreshToken,
    RequestTokenError, StandardErrorResponse, TokenType, TokenUrl,
};

use super::sanitize::{self, Secrets};
use super::{Http, Idp};
use crate::engine::{RefreshError, Refreshed, TokenEndpoint};
use crate::store::ProfileRecord;
use crate::{Error, Result};

impl TokenEndpoint for Idp {
    fn refresh(
        &self,
        record: ProfileRecord,
    ) -> BoxFuture<'static, std::result::Result<Refreshed, RefreshError>> {
        let http = self.http.clone();
        Box::pin(async move {
            // Every detail leaves here sanitized: it reaches the warn log,
            // `last_error`, watchers and terminals.
            refresh_grant(&http, &record).await.map_err(|e| {
                let secrets = Secrets::of_record(&record);
                match e {
                    RefreshError::Rejected(d) => {
                        RefreshError::Rejected(sanitize::composed(&d, &secrets))
                    }
                    RefreshError::Transient(d) => {
                        RefreshError::Transient(sanitize::composed(&d, &secrets))
                    }
                }
            })
        })
    }
}

fn base_client(record: &ProfileRecord) -> Result<CoreClient> {
    let issuer = IssuerUrl::new(record.issuer.clone())
        .map_err(|e| Error::Invalid(format!("issuer URL: {e}")))?;
    let mut client = CoreClient::new(
        ClientId::new(record.client_id.clone()),
        issuer,
        JsonWebKeySet::default(),
    );
    if let Some(secret) = &record.client_secret {
        // openidconnect keeps its own copy; its Debug is redacted too.
        client = client.set_client_secret(ClientSecret::new(secret.expose().to_owned()));
    }
    Ok(client)
}

async fn refresh_grant(
    http: &Http,
    record: &ProfileRecord,
) -> std::result::Result<Refreshed, RefreshError> {
    let refresh_token = record
        .refresh_token
        .as_ref()
        .ok_or_else(|| RefreshError::Rejected("no refresh token stored".into()))?;
    let token_url = TokenUrl::new(record.endpoints.token.clone())
        .map_err(|e| RefreshError::Transient(format!("token endpoint URL: {e}")))?;
    let client = base_client(record)
        .map_err(|e| RefreshError::Transient(e.to_string()))?
        .set_token_uri(token_url);
    let refresh_token = RefreshToken::new(refresh_token.expose().to_owned());
    let mut request = client.exchange_refresh_token(&refresh_token);
    if let Some(audience) = &record.audience {
        // RFC 8707 resource indicator.
        request = request.add_extra_param("resource", audience.clone());
    }
    let response = match request.request_async(http).await {
        Ok(response) => response,
        Err(RequestTokenError::Parse(e, mut body)) => {
            // oauth2's parser is strict (e.g. `expires_in` must be a number). The
            // IdP may already have rotated the refresh token, so throwing this
            // answer away would cost the user a login: read it leniently.
            let rescued = rescue(&body).ok_or_else(|| match error_code(&body) {
                // An error body oauth2 could not parse still names its error.
                Some(code) => {
                    classify_code(&code, sanitize::code(&code, &Secrets::of_record(record)))
                }
                None => RefreshError::Transient(format!(
                    "unreadable token response (at `{}`)",
                    e.path()
                )),
            });
            zeroize::Zeroize::zeroize(&mut body);
            return rescued;
        }
        Err(e) => return Err(classify_error(e, &Secrets::of_record(record))),
    };
    super::token_response::check_tokens(
        response.access_token().secret(),
        response.refresh_token().map(|rt| rt.secret().as_str()),
    )
    .map_err(|e| RefreshError::Transient(format!("garbage token response: {e}")))?;
    Ok(Refreshed {
        access_token: Secret::new(response.access_token().secret().clone()),
        token_type: token_type_name(response.token_type()),
        expires_in: response.expires_in(),
        refresh_token: response
            .refresh_token()
            .map(|rt| Secret::new(rt.secret().clone())),
        scopes: response
            .scopes()
            .map(|s| crate::bounds::granted_scopes(s.iter().map(|scope| scope.as_str()))),
    })
}

/// A token response that oauth2 could not parse, read with the broker's own
/// lenient parser. `None` unless it has an access token.
fn rescue(body: &[u8]) -> Option<Refreshed> {
    let text = std::str::from_utf8(body).ok()?;
    let response = super::TokenResponse::parse(text).ok()?;
    let scopes = response.scopes();
    let token_type = if response.token_type.eq_ignore_ascii_case("bearer") {
        "Bearer".to_owned()
    } else {
        response.token_type
    };
    Some(Refreshed {
        access_token: response.access_token,
        token_type,
        expires_in: response.expires_in.map(std::time::Duration::from_secs),
        refresh_token: response.refresh_token,
        scopes,
    })
}

/// The contract §5 classes by OAuth error code: only a dead grant or client is final.
fn classify_code(code: &str, detail: String) -> RefreshError {
    match code {
        "invalid_grant" | "invalid_client" | "unauthorized_client" => {
            RefreshError::Rejected(detail)
        }
        _ => RefreshError::Transient(detail),
    }
}

/// The `error` member of a JSON error body, if it is a plain OAuth error code.
fn error_code(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = value.get("error")?.as_str()?;
    code.bytes()
        .all(|b| b.is_ascii_lowercase() || b == b'_')
        .then(|| code.to_owned())
}

fn token_type_name<T: TokenType>(t: &T) -> String {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::String(s)) if s.eq_ignore_ascii_case("bearer") => "Bearer".into(),
        Ok(serde_json::Value::String(s)) => s,
        _ => "Bearer".into(),
    }
}

/// Sorts a failed token request into the two classes of contract §5.
///
/// Only an explicit `invalid_grant`, `invalid_client` or `unauthorized_client`
/// means the grant is dead; everything else, including an IdP that answers with
/// garbage, is transient. Details never include response bodies, and the IdP's
/// code and description pass [`sanitize`] with the profile's `secrets`.
pub fn classify_error<RE: std::error::Error + 'static>(
    e: RequestTokenError<RE, StandardErrorResponse<CoreErrorResponseType>>,
    secrets: &Secrets,
) -> RefreshError {
    match e {
        RequestTokenError::ServerResponse(response) => {
            let code = response.error();
            let mut detail = sanitize::code(code.as_ref(), secrets);
            if let Some(description) = response.error_description() {
                detail.push_str(": ");
                detail.push_str(&sanitize::text_with(description, secrets));
            }
            classify_code(code.as_ref(), detail)
        }
        RequestTokenError::Request(e) => RefreshError::Transient(format!(
            "request failed: {}",
            sanitize::composed(&super::http::error_chain(&e), secrets)
        )),
        RequestTokenError::Parse(e, _body) => {
            RefreshError::Transient(format!("unreadable token response (at `{}`)", e.path()))
        }
        RequestTokenError::Other(detail) => RefreshError::Transient(format!(
            "unexpected token response: {}",
            sanitize::text_with(&detail, secrets)
        )),
    }
}

/// Revokes `record`'s refresh token at its revocation endpoint (RFC 7009 §2.1).
///
/// This is the one request built by hand: oauth2 5 refuses non-HTTPS revocation
/// URLs, but the broker allows `http://` on loopback (development IdPs, tests).
/// It is a single form POST, so one code path serves both and stays tested.
pub async fn revoke(http: &Http, record: &ProfileRecord) -> Result<()> {
    let Some(endpoint) = &record.endpoints.revocation else {
        return Err(Error::Invalid(
            "the issuer advertises no revocation endpoint".into(),
        ));
    };
    let Some(refresh_token) = &record.refresh_token else {
        return Err(Error::Invalid("no refresh token to revoke".into()));
    };
    super::validate_endpoint("revocation_endpoint", endpoint)?;
    let mut form = vec![
        ("token", refresh_token.expose()),
        ("token_type_hint", "refresh_token"),
    ];
    let secret = record.client_secret.as_ref().map(|s| s.expose());
    if secret.is_none() {
        form.push(("client_id", &record.client_id));
    }
    let status = http
        .post_form(
            endpoint,
            &form,
            secret.map(|s| (record.client_id.as_str(), s)),
        )
        .await
        .map_err(|e| {
            let detail = sanitize::composed(&e.to_string(), &Secrets::of_record(record));
            Error::IdpTransient(format!("revocation failed: {detail}"))
        })?;
    match status {
        // RFC 7009 §2.2: 200 whether or not the token was valid.
        200 => Ok(()),
        503 | 500..=599 | 429 => Err(Error::IdpTransient(format!(
            "revocation failed: HTTP {status}"
        ))),
        other => Err(Error::Invalid(format!(
            "the IdP refused the revocation: HTTP {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_oauth2_refuses_is_rescued_when_it_is_readable() {
        let body = br#"{"access_token":"AT","token_type":"bearer","expires_in":"3599","refresh_token":"RT2","scope":"openid"}"#;
        let r = rescue(body).expect("readable");
        assert_eq!(r.access_token.expose(), "AT");
        assert_eq!(r.expires_in, Some(std::time::Duration::from_secs(3599)));
        assert_eq!(r.refresh_token.unwrap().expose(), "RT2");
        assert_eq!(r.scopes.unwrap(), ["openid"]);
        assert_eq!(r.token_type, "Bearer");
        assert!(rescue(b"<html>502</html>").is_none());
        assert!(rescue(br#"{"error":"invalid_grant"}"#).is_none());
    }

    #[test]
    fn odd_error_bodies_are_still_classified_by_their_code() {
        let odd = br#"{"error":"invalid_grant","error_description":{"nested":true}}"#;
        assert_eq!(error_code(odd).as_deref(), Some("invalid_grant"));
        assert!(matches!(
            classify_code("invalid_grant", String::new()),
            RefreshError::Rejected(_)
        ));
        assert!(matches!(
            classify_code("invalid_request", String::new()),
            RefreshError::Transient(_)
        ));
        assert_eq!(error_code(b"<html>"), None);
        assert_eq!(error_code(br#"{"error":"RT-SECRET-looking value"}"#), None);
    }
}
