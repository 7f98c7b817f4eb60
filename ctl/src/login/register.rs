//! Dynamic client registration (RFC 7591) of a public native client.
//!
//! A plain JSON POST rather than openidconnect's typed registration: the
//! response carries many provider-specific fields, and only `client_id`,
//! `client_secret` and `grant_types` matter here.

use kontext_broker_protocol::Secret;
use openidconnect::AsyncHttpClient;
use serde::Deserialize;

use super::LoginError;
use kontext_broker::idp::sanitize::text as sanitize;

fn code(code: &str) -> String {
    kontext_broker::idp::sanitize::code(code, &kontext_broker::idp::sanitize::Secrets::none())
}
use kontext_broker::idp::{validate_endpoint, Http};

/// The RFC 8628 grant type.
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// The redirect URI registered. Native clients may use any port on it at
/// login time (RFC 8252 §7.3), which is how the random listener port works.
pub const REGISTERED_REDIRECT_URI: &str = "http://127.0.0.1/callback";

/// A client the IdP just registered.
#[derive(Debug, Clone)]
pub struct RegisteredClient {
    /// The issued `client_id`.
    pub client_id: String,
    /// The issued secret, if the IdP made the client confidential anyway.
    pub client_secret: Option<Secret>,
    /// Grant types the IdP granted (echoed in the response, RFC 7591 §3.2.1).
    pub grant_types: Vec<String>,
}

#[derive(Deserialize)]
struct RegistrationResponse {
    client_id: String,
    client_secret: Option<Secret>,
    #[serde(default)]
    grant_types: Vec<String>,
}

#[derive(Deserialize)]
struct RegistrationError {
    error: String,
    error_description: Option<String>,
}

/// Registers a native public client at `endpoint` with the authorization
/// code and refresh token grants (plus the device grant with `device`).
pub async fn register_client(
    http: &Http,
    endpoint: &str,
    device: bool,
) -> Result<RegisteredClient, LoginError> {
    validate_endpoint("registration_endpoint", endpoint).map_err(LoginError::Discovery)?;
    let mut grant_types = vec!["authorization_code", "refresh_token"];
    if device {
        grant_types.push(DEVICE_CODE_GRANT);
    }
    let body = serde_json::json!({
        "client_name": "kontext-broker",
        "application_type": "native",
        "token_endpoint_auth_method": "none",
        "grant_types": grant_types,
        "response_types": ["code"],
        "redirect_uris": [REGISTERED_REDIRECT_URI],
    });
    let request = http::Request::post(endpoint)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json")
        .body(body.to_string().into_bytes())
        .map_err(|e| LoginError::Registration(format!("bad request: {e}")))?;
    let response = http
        .call(request)
        .await
        .map_err(|e| LoginError::IdpUnavailable(format!("registration at {endpoint}: {e}")))?;
    let status = response.status();
    if status.is_server_error() || status.as_u16() == 429 {
        return Err(LoginError::IdpUnavailable(format!(
            "registration at {endpoint}: HTTP {status}"
        )));
    }
    if !status.is_success() {
        let detail = match serde_json::from_slice::<RegistrationError>(response.body()) {
            Ok(e) => match e.error_description {
                Some(d) => format!("{}: {}", code(&e.error), sanitize(&d)),
                None => code(&e.error),
            },
            Err(_) => format!("HTTP {status}"),
        };
        return Err(LoginError::Registration(detail));
    }
    // The response may hold a registration_access_token; it is never kept.
    let parsed: RegistrationResponse = serde_json::from_slice(response.body()).map_err(|e| {
        LoginError::Registration(format!(
            "unreadable response (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    if parsed.client_id.is_empty() {
        return Err(LoginError::Registration("empty client_id".into()));
    }
    Ok(RegisteredClient {
        client_id: parsed.client_id,
        client_secret: parsed.client_secret.filter(|s| !s.is_empty()),
        grant_types: parsed.grant_types,
    })
}
