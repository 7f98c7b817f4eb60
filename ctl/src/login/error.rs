//! Why a login failed ([`LoginError`]) and how IdP answers become one: token
//! endpoint errors, transport failures and client rejections, sanitized.

use std::time::Duration;

use kontext_broker::idp::sanitize::text as sanitize;
use openidconnect::core::CoreErrorResponseType;
use openidconnect::{RequestTokenError, StandardErrorResponse};

use super::{IdTokenError, OFFLINE_ACCESS};

/// Why a login failed. Never holds a token, code or secret.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The options are incomplete or contradictory.
    #[error("{0}")]
    Usage(String),
    /// The issuer lacks something the chosen flow needs.
    #[error("{0}")]
    Unsupported(String),
    /// Discovery or URL validation failed.
    #[error(transparent)]
    Discovery(kontext_broker::Error),
    /// The loopback listener for the redirect could not be opened.
    #[error("cannot listen on 127.0.0.1 for the login callback: {0}")]
    Listener(std::io::Error),
    /// Nobody finished the login in time.
    #[error("login timed out after {}: {what}; run the login again", humantime::format_duration(*.after))]
    TimedOut {
        /// The configured timeout.
        after: Duration,
        /// What was being waited for.
        what: &'static str,
    },
    /// The callback's `state` did not match: a forged or stale redirect. No code was redeemed.
    #[error("the login callback carried the wrong state (forged or stale redirect); no tokens were requested; run the login again")]
    StateMismatch,
    /// The callback named a different issuer (RFC 9207 mix-up defence).
    #[error(
        "the login callback came from issuer `{0}`, not the one asked (RFC 9207 `iss`); no tokens were requested; check the issuer URL, or report the problem to the provider"
    )]
    IssuerMismatch(String),
    /// The provider promises an `iss` on the callback (RFC 9207) and sent none.
    #[error(
        "the login callback carried no `iss` although the provider promises one (RFC 9207); no tokens were requested; report the problem to the provider"
    )]
    IssuerMissing,
    /// The user or the IdP refused the authorization.
    #[error("the identity provider refused the login: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Denied {
        /// OAuth error code, e.g. `access_denied`.
        error: String,
        /// The IdP's `error_description`, sanitised and shortened.
        description: Option<String>,
    },
    /// The device code expired before the user approved it.
    #[error("the device code expired before the login was approved; run the login again")]
    DeviceCodeExpired,
    /// Dynamic client registration failed.
    #[error("client registration failed: {0}")]
    Registration(String),
    /// The server refused the scopes asked for (`invalid_scope`).
    #[error("the identity provider refused the requested scopes `{requested}` (invalid_scope{}); ask only for scopes it supports with --scope S (repeatable){}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default(), if requested.split(' ').any(|s| s == OFFLINE_ACCESS) { "; `offline_access` was added because the server lists it or lists no scopes, so pass --scope offline_access only if it is meant" } else { "" })]
    InvalidScope {
        /// The scopes that were requested, space-separated.
        requested: String,
        /// The IdP's `error_description`, sanitised and shortened.
        description: Option<String>,
    },
    /// The token or device endpoint refused the request.
    #[error("the identity provider rejected the token request: {0}")]
    Token(String),
    /// The IdP refused the client's credential (`invalid_client`, `unauthorized_client`).
    #[error("the identity provider {issuer} rejected client `{client_id}` ({detail}); check the client secret or key file and --client-auth, then log in again")]
    ClientRejected {
        /// The issuer asked.
        issuer: String,
        /// The client id used.
        client_id: String,
        /// The OAuth error code and the IdP's description, sanitised.
        detail: String,
    },
    /// The IdP could not be reached or failed transiently.
    #[error("identity provider unavailable: {0}")]
    IdpUnavailable(String),
    /// The ID token failed validation; its tokens were discarded.
    #[error(transparent)]
    IdToken(#[from] IdTokenError),
    /// The IdP issued no refresh token, so the broker could not renew access.
    #[error("the identity provider issued no refresh token; allow the refresh_token grant and offline_access for this client")]
    NoRefreshToken,
}

impl LoginError {
    /// True when retrying later may succeed without changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            LoginError::IdpUnavailable(_)
                | LoginError::Discovery(kontext_broker::Error::IdpTransient(_))
        )
    }
}

/// An `invalid_scope` refusal (at the authorization, device or token
/// endpoint), with the scopes that were asked for.
pub(super) fn name_scopes(e: LoginError, scopes: &[String]) -> LoginError {
    match e {
        LoginError::Denied { error, description } if error == "invalid_scope" => {
            LoginError::InvalidScope {
                requested: scopes.join(" "),
                description,
            }
        }
        LoginError::InvalidScope { description, .. } => LoginError::InvalidScope {
            requested: scopes.join(" "),
            description,
        },
        e => e,
    }
}

/// Gives a client rejection the wording that names the issuer and the client.
pub(super) fn client_error(e: LoginError, issuer: &str, client_id: &str) -> LoginError {
    match e {
        LoginError::Token(detail)
            if detail.starts_with("invalid_client")
                || detail.starts_with("unauthorized_client") =>
        {
            LoginError::ClientRejected {
                issuer: issuer.to_owned(),
                client_id: client_id.to_owned(),
                detail,
            }
        }
        other => other,
    }
}

/// Describes a failed token-endpoint call without echoing any body.
pub(super) fn token_error<RE: std::error::Error + 'static>(
    e: RequestTokenError<RE, StandardErrorResponse<CoreErrorResponseType>>,
) -> LoginError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let code = kontext_broker::idp::sanitize::code(
                r.error().as_ref(),
                &kontext_broker::idp::sanitize::Secrets::none(),
            );
            let description = r.error_description().map(|d| sanitize(d));
            if matches!(
                r.error(),
                CoreErrorResponseType::Extension(ext) if ext == "temporarily_unavailable" || ext == "server_error"
            ) {
                return LoginError::IdpUnavailable(code);
            }
            if code == "invalid_scope" {
                // The caller names the scopes (see `name_scopes`).
                return LoginError::InvalidScope {
                    requested: String::new(),
                    description,
                };
            }
            if code == "access_denied" {
                return LoginError::Denied {
                    error: code,
                    description,
                };
            }
            LoginError::Token(match description {
                Some(d) => format!("{code}: {d}"),
                None => code,
            })
        }
        other => request_failure(other),
    }
}

/// Transport, parse and other failures of any openidconnect request.
pub(super) fn request_failure<RE: std::error::Error + 'static, TE: openidconnect::ErrorResponse>(
    e: RequestTokenError<RE, TE>,
) -> LoginError {
    match e {
        RequestTokenError::ServerResponse(_) => {
            LoginError::Token("unexpected error response".into())
        }
        RequestTokenError::Request(e) => LoginError::IdpUnavailable(format!(
            "request failed: {}",
            kontext_broker::idp::error_chain(&e)
        )),
        RequestTokenError::Parse(e, _body) => {
            LoginError::Token(format!("unreadable response (at `{}`)", e.path()))
        }
        RequestTokenError::Other(detail) => {
            LoginError::Token(format!("unexpected response: {}", sanitize(&detail)))
        }
    }
}
