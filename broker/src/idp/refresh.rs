//! The refresh-token grant and revocation, through openidconnect, with the
//! client authentication of [`super::client_auth`].

use futures::future::BoxFuture;
use kontext_broker_protocol::{ClientAuthMethod, Secret};
use openidconnect::core::{CoreClient, CoreErrorResponseType};
use openidconnect::{
    ClientId, IssuerUrl, JsonWebKeySet, OAuth2TokenResponse, RefreshToken, RequestTokenError,
    StandardErrorResponse, TokenType, TokenUrl,
};

use super::client_auth::{ClientAuth, EndpointKind, Prepared};
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
        let auth = self.client_auth(&record);
        Box::pin(async move {
            // Every detail leaves here sanitized: it reaches the warn log,
            // `last_error`, watchers and terminals.
            refresh_grant(&http, &auth, &record).await.map_err(|e| {
                let secrets = Secrets::of_record(&record);
                match e {
                    RefreshError::Rejected(d) => {
                        RefreshError::Rejected(sanitize::composed(&d, &secrets))
                    }
                    RefreshError::ClientRejected(d) => {
                        RefreshError::ClientRejected(sanitize::composed(&d, &secrets))
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
    Ok(CoreClient::new(
        ClientId::new(record.client_id.clone()),
        issuer,
        JsonWebKeySet::default(),
    ))
}

/// True for an `invalid_client` answer: the one that makes auto-detection
/// try the other secret method.
fn is_invalid_client(e: &RefreshError) -> bool {
    matches!(e, RefreshError::ClientRejected(d) if d.starts_with("invalid_client"))
}

/// Runs the refresh grant with each client authentication method to try, in
/// order, moving on only after `invalid_client`. A method that worked after a
/// fallback is reported so the engine remembers it.
async fn refresh_grant(
    http: &Http,
    auth: &ClientAuth,
    record: &ProfileRecord,
) -> std::result::Result<Refreshed, RefreshError> {
    let attempts = auth.attempts(&record.endpoints, EndpointKind::Token);
    let mut result = Err(RefreshError::Transient(
        "no client authentication method".into(),
    ));
    for (i, method) in attempts.iter().enumerate() {
        result = refresh_once(http, auth, *method, record).await;
        match &mut result {
            Ok(refreshed) => {
                if i > 0 {
                    tracing::info!(
                        profile = %record.name,
                        method = method.as_str(),
                        "the identity provider accepts this client authentication method; remembering it"
                    );
                    refreshed.client_auth_detected = Some(*method);
                }
                return result;
            }
            Err(e) if is_invalid_client(e) && i + 1 < attempts.len() => {
                tracing::debug!(
                    profile = %record.name,
                    method = method.as_str(),
                    "invalid_client; trying the other client authentication method"
                );
            }
            Err(_) => break,
        }
    }
    match result {
        Err(RefreshError::ClientRejected(detail)) if attempts.len() > 1 => {
            Err(RefreshError::ClientRejected(format!(
                "{detail} (tried {})",
                attempts
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(" and ")
            )))
        }
        other => other,
    }
}

async fn refresh_once(
    http: &Http,
    auth: &ClientAuth,
    method: ClientAuthMethod,
    record: &ProfileRecord,
) -> std::result::Result<Refreshed, RefreshError> {
    let refresh_token = record
        .refresh_token
        .as_ref()
        .ok_or_else(|| RefreshError::Rejected("no refresh token stored".into()))?;
    let token_url = TokenUrl::new(record.endpoints.token.clone())
        .map_err(|e| RefreshError::Transient(format!("token endpoint URL: {e}")))?;
    // A client key that cannot sign is the client's fault, like invalid_client.
    let prepared: Prepared = auth
        .prepare(method, &record.endpoints.token)
        .map_err(|e| RefreshError::ClientRejected(e.to_string()))?;
    let client = prepared.configure(
        base_client(record)
            .map_err(|e| RefreshError::Transient(e.to_string()))?
            .set_token_uri(token_url),
    );
    let refresh_token = RefreshToken::new(refresh_token.expose().to_owned());
    let mut request = client.exchange_refresh_token(&refresh_token);
    for (name, value) in prepared.extra_params() {
        request = request.add_extra_param(name, value);
    }
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
                    json_path(&e.path().to_string())
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
        client_auth_detected: None,
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
        client_auth_detected: None,
    })
}

/// The classes of docs/architecture.md by OAuth error code: a dead grant and a
/// rejected client are final (in different ways); everything else is transient.
fn classify_code(code: &str, detail: String) -> RefreshError {
    match code {
        "invalid_grant" => RefreshError::Rejected(detail),
        "invalid_client" | "unauthorized_client" => RefreshError::ClientRejected(detail),
        _ => RefreshError::Transient(detail),
    }
}

/// The `error` member of a JSON error body, if it is a plain OAuth error code.
fn error_code(body: &[u8]) -> Option<String> {
    super::http::oauth_error_code(body)
}

/// Longest JSON path quoted in an error.
const MAX_PATH_CHARS: usize = 64;

/// The JSON path of a parse error, fit for a log line. Its member names come
/// from the IdP (found by fuzzing: a DEL character reached `last_error`), so
/// only path characters are kept, and at most [`MAX_PATH_CHARS`] of them.
fn json_path(path: &str) -> String {
    path.chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-[]?".contains(*c))
        .take(MAX_PATH_CHARS)
        .collect()
}

fn token_type_name<T: TokenType>(t: &T) -> String {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::String(s)) if s.eq_ignore_ascii_case("bearer") => "Bearer".into(),
        Ok(serde_json::Value::String(s)) => s,
        _ => "Bearer".into(),
    }
}

/// Sorts a failed token request into the classes of docs/architecture.md.
///
/// Only an explicit `invalid_grant` means the grant is dead; `invalid_client` and
/// `unauthorized_client` blame the client; everything else, including an IdP
/// that answers with garbage, is transient. Details never include response
/// bodies, and the IdP's code and description pass [`sanitize`] with the
/// profile's `secrets`.
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
        RequestTokenError::Parse(e, _body) => RefreshError::Transient(format!(
            "unreadable token response (at `{}`)",
            json_path(&e.path().to_string())
        )),
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
pub async fn revoke(http: &Http, auth: &ClientAuth, record: &ProfileRecord) -> Result<()> {
    let Some(endpoint) = &record.endpoints.revocation else {
        return Err(Error::Invalid(
            "the issuer advertises no revocation endpoint".into(),
        ));
    };
    let Some(refresh_token) = &record.refresh_token else {
        return Err(Error::Invalid("no refresh token to revoke".into()));
    };
    super::validate_endpoint("revocation_endpoint", endpoint)?;
    let attempts = auth.attempts(&record.endpoints, EndpointKind::Revocation);
    let mut answer = (0, None);
    for (i, method) in attempts.iter().enumerate() {
        let prepared = auth.prepare(*method, &record.endpoints.token)?;
        let mut form = vec![
            ("token", refresh_token.expose()),
            ("token_type_hint", "refresh_token"),
        ];
        form.extend(prepared.form_fields());
        answer = http
            .post_form(endpoint, &form, prepared.basic())
            .await
            .map_err(|e| {
                let detail = sanitize::composed(&e.to_string(), &Secrets::of_record(record));
                Error::IdpTransient(format!("revocation failed: {detail}"))
            })?;
        let invalid_client = answer.1.as_deref() == Some("invalid_client");
        if !(invalid_client && i + 1 < attempts.len()) {
            break;
        }
    }
    let (status, code) = answer;
    if let Some(code @ ("invalid_client" | "unauthorized_client")) = code.as_deref() {
        return Err(Error::Invalid(format!(
            "the IdP refused client `{}` at the revocation endpoint ({code}); fix the client with `broker-ctl client`",
            record.client_id
        )));
    }
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
    fn json_paths_from_the_idp_keep_only_path_characters() {
        assert_eq!(json_path("err\u{7f}r"), "errr");
        assert_eq!(json_path("a.b[0].c_d"), "a.b[0].c_d");
        assert_eq!(json_path("x\u{1b}[2J\ny\r\u{7}"), "x[2Jy");
        assert_eq!(json_path(&"k".repeat(500)).len(), MAX_PATH_CHARS);
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
