//! Reading an RFC 6749 §5.1 token response handed to the broker (import, login).

use base64::Engine;
use kontext_broker_protocol::Secret;
use serde::Deserialize;

use super::sanitize::{self, Secrets};
use crate::{Error, Result};

/// The fields of a token endpoint response that the broker keeps.
#[derive(Debug, Deserialize)]
pub struct TokenResponse {
    pub access_token: Secret,
    #[serde(default = "bearer")]
    pub token_type: String,
    #[serde(default, deserialize_with = "lenient_u64")]
    pub expires_in: Option<u64>,
    pub refresh_token: Option<Secret>,
    pub scope: Option<String>,
    pub id_token: Option<String>,
}

fn bearer() -> String {
    "Bearer".into()
}

/// Some IdPs send `expires_in` as a string; accept both.
fn lenient_u64<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<u64>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match value {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    })
}

impl TokenResponse {
    /// Parses the JSON. Errors never echo the input, which holds tokens.
    pub fn parse(json: &str) -> Result<TokenResponse> {
        let response: TokenResponse = serde_json::from_str(json).map_err(|e| {
            let what = if e.is_data() {
                "lacks a required field or has a field of the wrong type (access_token must be a string)"
            } else {
                "is not valid JSON"
            };
            Error::Invalid(format!(
                "the token response {what} (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        if response.access_token.is_empty() {
            return Err(Error::Invalid(
                "the token response has an empty access_token".into(),
            ));
        }
        check_tokens(
            response.access_token.expose(),
            response.refresh_token.as_ref().map(|t| t.expose()),
        )
        .map_err(Error::Invalid)?;
        Ok(response)
    }

    /// Granted scopes, if the response listed them (bounded, see
    /// [`crate::bounds::granted_scopes`]).
    pub fn scopes(&self) -> Option<Vec<String>> {
        self.scope
            .as_ref()
            .map(|s| crate::bounds::granted_scopes(s.split_whitespace()))
    }
}

/// Checks that both tokens are RFC 6750 `b64token`s, so no token the broker
/// serves can carry a CR/LF into an HTTP header or an ESC into a terminal.
/// The error names the field, never the value.
pub fn check_tokens(access: &str, refresh: Option<&str>) -> std::result::Result<(), String> {
    let bad = |field: &str| {
        format!("the token response's {field} has characters outside RFC 6750 b64token ([A-Za-z0-9._~+/-]+=*)")
    };
    if !crate::bounds::is_b64token(access) {
        return Err(bad("access_token"));
    }
    if refresh.is_some_and(|r| !crate::bounds::is_b64token(r)) {
        return Err(bad("refresh_token"));
    }
    Ok(())
}

/// The `email` (else `sub`) claim of an ID token, for display only, passed
/// through [`sanitize::text_with`] with `secrets` (it is IdP text).
///
/// The signature is not checked here: this value is never used for a security
/// decision. Login validates ID tokens fully through openidconnect.
pub fn subject_from_id_token(id_token: &str, secrets: &Secrets) -> Option<String> {
    let payload = id_token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims
        .get("email")
        .or_else(|| claims.get("sub"))
        .and_then(|v| v.as_str())
        .map(|s| sanitize::text_with(s, secrets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_standard_and_lenient_responses() {
        let r = TokenResponse::parse(
            r#"{"access_token":"AT-SECRET","token_type":"Bearer","expires_in":"3600","refresh_token":"RT-SECRET","scope":"openid offline_access"}"#,
        )
        .unwrap();
        assert_eq!(r.expires_in, Some(3600));
        assert_eq!(r.refresh_token.unwrap().expose(), "RT-SECRET");
        assert_eq!(r.scope.as_deref(), Some("openid offline_access"));
    }

    #[test]
    fn tokens_outside_b64token_are_refused() {
        for bad in [
            r#"{"access_token":"AT\r\nX-Evil: 1","refresh_token":"RT"}"#,
            r#"{"access_token":"AT\u001b[2J","refresh_token":"RT"}"#,
            r#"{"access_token":"AT","refresh_token":"R T"}"#,
        ] {
            let err = TokenResponse::parse(bad).unwrap_err().to_string();
            assert!(err.contains("b64token"), "{err}");
            assert!(!err.contains("Evil") && !err.contains("[2J") && !err.contains("R T"));
        }
        assert!(
            TokenResponse::parse(r#"{"access_token":"eyJ.x-y_z~+/==","refresh_token":"RT"}"#)
                .is_ok()
        );
    }

    #[test]
    fn errors_never_echo_tokens() {
        for bad in [
            r#"{"access_token":12,"refresh_token":"RT-SECRET"}"#,
            r#"{"refresh_token":"RT-SECRET"}"#,
            r#"{"access_token":"AT-SECRET", "refresh_token": RT-SECRET}"#,
            r#"RT-SECRET"#,
        ] {
            let err = TokenResponse::parse(bad).unwrap_err().to_string();
            assert!(!err.contains("SECRET"), "{err}");
        }
    }

    #[test]
    fn subject_prefers_email() {
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let token = format!(
            "{}.{}.sig",
            enc("{}"),
            enc(r#"{"sub":"u1","email":"a@b.c"}"#)
        );
        assert_eq!(
            subject_from_id_token(&token, &Secrets::none()).as_deref(),
            Some("a@b.c")
        );
        let token = format!("{}.{}.sig", enc("{}"), enc(r#"{"sub":"u1"}"#));
        assert_eq!(
            subject_from_id_token(&token, &Secrets::none()).as_deref(),
            Some("u1")
        );
        assert_eq!(subject_from_id_token("garbage", &Secrets::none()), None);
        let token = format!(
            "{}.{}.sig",
            enc("{}"),
            enc(r#"{"sub":"u\u001b[2J\u0007 AT-SECRET"}"#)
        );
        let mut secrets = Secrets::none();
        secrets.add("AT-SECRET");
        assert_eq!(
            subject_from_id_token(&token, &secrets).as_deref(),
            Some("u[2J [redacted]")
        );
    }
}
