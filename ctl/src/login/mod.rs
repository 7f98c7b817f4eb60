//! Logging in (docs/contract.md §6): run an OAuth flow against the IdP and hand back a
//! token endpoint response ready for the broker's `Import`.
//!
//! Two flows, both through `openidconnect`:
//! - authorization code + PKCE (S256) with a loopback redirect
//!   `http://127.0.0.1:<random port>/callback` (RFC 8252), see [`callback`];
//! - the device authorization grant (RFC 8628), see [`device`].
//!
//! Optionally the client is first registered dynamically (RFC 7591), see
//! [`register_client`]. `offline_access` is requested when the server's
//! `scopes_supported` lists it or is absent (servers such as django-oauth-toolkit
//! refuse scopes they do not know, and issue refresh tokens without it); the
//! code flow sends `prompt=consent`, because providers such as `oidc-provider`
//! drop `offline_access` (and so the refresh token) without it.
//!
//! The flow runs in the caller's process (the CLI), never in the broker: the
//! broker only ever sees the finished token response. Nothing here logs or
//! formats a token; errors carry IdP error codes and descriptions only.
//!
//! Every token response, in both flows, passes `LoginContext::accept`: the ID
//! token checks of `verify` (docs/security.md, "Logging in") and a refresh
//! token. A refused response stores nothing and its tokens are revoked in the
//! background (`discard`).

mod browser;
mod callback;
mod code;
mod context;
mod device;
mod discard;
mod error;
mod id_token_error;
mod jwks;
mod page;
mod register;
mod token;
mod verify;

use std::sync::Arc;
use std::time::Duration;

use kontext_broker_protocol::{ClientAuthMethod, ClientCredential, EndpointOverrides, Secret};
use openidconnect::{ClientId, IssuerUrl, TokenUrl};
use tokio_util::task::TaskTracker;

use kontext_broker::clock::SystemClock;
use kontext_broker::idp::client_auth::{check_client_key, check_method};
use kontext_broker::idp::{discover_metadata, ClientAuth, Http};

pub use discard::REVOKE_TIMEOUT;
pub use id_token_error::{IdTokenError, KeyRefresh};
pub use jwks::{JwksCache, Keys, Refresh, MIN_REFRESH_INTERVAL};
pub use page::{CONTENT_SECURITY_POLICY, HOLD_LIMIT};
pub use register::{register_client, RegisteredClient, DEVICE_CODE_GRANT, REGISTERED_REDIRECT_URI};
pub use token::RawTokenResponse;
pub use verify::{verify_id_token, verify_id_token_with_keys, IdTokenCheck, Identity};

use code::code_flow;
use context::{Discovered, LoginContext};
use error::{client_error, name_scopes, request_failure, token_error};
use token::BareClient;

pub use error::LoginError;

/// Scope that asks for a refresh token; requested unless the server lists
/// scopes without it.
pub const OFFLINE_ACCESS: &str = "offline_access";
/// The OpenID Connect scope; when requested, an ID token is validated.
pub const OPENID: &str = "openid";
/// Default for [`LoginOptions::timeout`]: how long the user has to finish.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Which OAuth flow to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Authorization code + PKCE with a loopback redirect.
    CodePkce {
        /// Start the system browser (`xdg-open` / `open`) on the URL.
        open_browser: bool,
    },
    /// Device authorization grant (RFC 8628); the user opens the URL anywhere.
    Device,
}

/// What to log in to, and how.
#[derive(Debug, Clone)]
pub struct LoginOptions {
    /// Issuer URL (`https://`, or `http://` on loopback only).
    pub issuer: String,
    /// Client to log in as. Required unless `register` is set.
    pub client_id: Option<String>,
    /// Secret of a confidential client.
    pub client_secret: Option<Secret>,
    /// PEM private key of a `private_key_jwt` client (exclusive with the secret).
    pub client_key: Option<Secret>,
    /// Client authentication method; `None` chooses from the server's metadata.
    pub client_auth: Option<ClientAuthMethod>,
    /// Scopes to ask for. Empty means `openid` (when the issuer publishes a
    /// JWKS). `offline_access` is added unless the server's `scopes_supported`
    /// lists scopes without it.
    pub scopes: Vec<String>,
    /// Endpoints that win over discovery (token, device authorization; the
    /// revocation one only matters to the broker).
    pub endpoints: EndpointOverrides,
    /// The flow to run.
    pub flow: Flow,
    /// Register a new public client first (RFC 7591) and log in as it.
    pub register: bool,
    /// How long to wait for the user (browser callback or device approval).
    pub timeout: Duration,
    /// Name of the profile being logged in, shown on the browser's result page.
    pub profile: Option<String>,
    /// Where the login leaves work that outlives it: the browser's answer page
    /// and the revocation of refused tokens. A process that exits after the
    /// login should `close()` it and `wait()` (bounded) before it exits.
    pub tasks: TaskTracker,
}

impl LoginOptions {
    /// Options for `issuer` with every other field at its default: no client
    /// (set one, or `register`), default scopes, code flow with a browser,
    /// [`DEFAULT_TIMEOUT`].
    pub fn new(issuer: impl Into<String>) -> LoginOptions {
        LoginOptions {
            issuer: issuer.into(),
            client_id: None,
            client_secret: None,
            client_key: None,
            client_auth: None,
            scopes: Vec::new(),
            endpoints: EndpointOverrides::default(),
            flow: Flow::CodePkce { open_browser: true },
            register: false,
            timeout: DEFAULT_TIMEOUT,
            profile: None,
            tasks: TaskTracker::new(),
        }
    }
}

/// A finished login: everything the broker's `Import` request needs.
#[derive(Debug)]
pub struct LoginOutcome {
    /// The client logged in as (the registered one with `register`).
    pub client_id: String,
    /// Its secret, if it has one.
    pub client_secret: Option<Secret>,
    /// Its private key, for `private_key_jwt`.
    pub client_key: Option<Secret>,
    /// The method to keep for the profile: the one asked for, or the one found
    /// to work when the first the server listed was refused.
    pub client_auth: Option<ClientAuthMethod>,
    /// The scopes that were requested (the profile's scopes).
    pub scopes: Vec<String>,
    /// The token endpoint's answer as RFC 6749 §5.1 JSON; always has a `refresh_token`.
    pub token_response: Secret,
    /// The account from the validated ID token (`email`, else
    /// `preferred_username`, else `sub`), for display.
    pub subject: Option<String>,
    /// The issuer exactly as its discovery document names it.
    pub issuer: String,
}

/// How a login talks to the user. Implementations print; tests capture.
pub trait LoginUi: Send {
    /// The authorization URL of the code flow; to be shown on a line of its own.
    fn show_url(&mut self, url: &str);
    /// The device flow's instructions (RFC 8628 §3.3).
    fn show_device_code(
        &mut self,
        verification_uri: &str,
        user_code: &str,
        complete_uri: Option<&str>,
    );
    /// A remark that needs no action, such as "could not start a browser".
    fn notice(&mut self, _message: &str) {}
}

/// Runs a login to completion: discovery, optional registration, the flow,
/// and the checks of the token response. Dropping the future cancels it and
/// closes the loopback listener. On a refusal nothing is returned to store,
/// and the response's tokens are revoked in the background (see [`REVOKE_TIMEOUT`]).
pub async fn login(
    http: &Http,
    opts: LoginOptions,
    ui: &mut dyn LoginUi,
) -> Result<LoginOutcome, LoginError> {
    if !opts.register && opts.client_id.as_deref().is_none_or(str::is_empty) {
        return Err(LoginError::Usage(
            "a client id is required unless the client is registered dynamically (--register)"
                .into(),
        ));
    }
    let metadata = discover_metadata(http, &opts.issuer)
        .await
        .map_err(LoginError::Discovery)?;
    let discovered = Discovered {
        endpoints: metadata
            .endpoints(&opts.issuer, &opts.endpoints)
            .map_err(LoginError::Discovery)?,
        // Exactly as the document spells it: only the typed URL was normalised.
        issuer: metadata.issuer.clone(),
        iss_parameter_supported: metadata.authorization_response_iss_parameter_supported
            == Some(true),
    };
    let endpoints = &discovered.endpoints;
    let scopes = requested_scopes(
        &opts.scopes,
        endpoints.jwks_uri.is_some(),
        metadata.scopes_supported.as_deref(),
    );
    let wants_id_token = scopes.iter().any(|s| s == OPENID);
    // Fail on missing endpoints before anything reaches the user or the IdP.
    match opts.flow {
        Flow::CodePkce { .. } if endpoints.authorization.is_none() => {
            return Err(LoginError::Unsupported(format!(
                "issuer {} advertises no authorization_endpoint; try --device",
                opts.issuer
            )))
        }
        Flow::Device if endpoints.device_authorization.is_none() => {
            return Err(LoginError::Unsupported(format!(
                "issuer {} advertises no device_authorization_endpoint; pass --device-authorization-endpoint URL if it has one, or drop --device",
                opts.issuer
            )))
        }
        _ => {}
    }
    let keys = match (&endpoints.jwks_uri, wants_id_token) {
        (Some(uri), true) => {
            let keys = JwksCache::new(http.clone(), uri, Arc::new(SystemClock))?;
            // Fetched now, so a broken JWKS fails before the user does anything.
            keys.current().await?;
            Some(keys)
        }
        (None, true) => {
            return Err(LoginError::Unsupported(format!(
            "issuer {} publishes no jwks_uri, so an ID token cannot be validated; drop the `openid` scope",
            opts.issuer
        )))
        }
        (_, false) => None,
    };

    let (client_id, client_secret) = if opts.register {
        let endpoint = endpoints.registration.as_deref().ok_or_else(|| {
            LoginError::Unsupported(format!(
                "issuer {} advertises no registration_endpoint; pass --client-id instead of --register",
                opts.issuer
            ))
        })?;
        let registered = register_client(http, endpoint, opts.flow == Flow::Device).await?;
        (registered.client_id, registered.client_secret)
    } else {
        // Checked above.
        let id = opts.client_id.clone().unwrap_or_default();
        (id, opts.client_secret.clone())
    };

    let issuer = IssuerUrl::new(discovered.issuer.clone())
        .map_err(|e| LoginError::Usage(format!("issuer URL: {e}")))?;
    let token_url = TokenUrl::new(endpoints.token.clone())
        .map_err(|e| LoginError::Unsupported(format!("token endpoint URL: {e}")))?;
    // The client's own key set stays empty: ID tokens are checked by `verify`.
    // The client's credential is set per request (see `ClientAuth`).
    let client = BareClient::new(ClientId::new(client_id.clone()), issuer, Default::default())
        .set_token_uri(token_url)
        // The scope list is ours to decide (see `requested_scopes`).
        .disable_openid_scope();
    let credential = match (&opts.client_key, &client_secret) {
        (Some(key), _) if !opts.register => ClientCredential::PrivateKey(key.clone()),
        (_, Some(secret)) => ClientCredential::Secret(secret.clone()),
        _ => ClientCredential::None,
    };
    if let ClientCredential::PrivateKey(key) = &credential {
        check_client_key(key).map_err(|e| LoginError::Usage(e.to_string()))?;
    }
    if let Some(method) = opts.client_auth {
        check_method(&credential, method).map_err(|e| LoginError::Usage(e.to_string()))?;
    }
    let auth = ClientAuth {
        client_id: client_id.clone(),
        credential,
        configured: opts.client_auth,
        remembered: None,
    };

    let ctx = LoginContext {
        http,
        opts: &opts,
        discovered: &discovered,
        scopes,
        client_id,
        auth,
        detected: std::sync::Mutex::new(None),
        keys,
    };
    match opts.flow {
        Flow::CodePkce { open_browser } => code_flow(&ctx, client, open_browser, ui)
            .await
            .map_err(|e| name_scopes(e, &ctx.scopes)),
        Flow::Device => {
            let response = device::device_flow(&ctx, client, ui)
                .await
                .map_err(|e| name_scopes(e, &ctx.scopes))
                .map_err(|e| ctx.client_error(e))?;
            ctx.accept(response, None).await
        }
    }
}
/// The scopes to ask for: the caller's (or a default), plus `offline_access`
/// when the server lists it or lists no scopes at all.
fn requested_scopes(asked: &[String], oidc: bool, supported: Option<&[String]>) -> Vec<String> {
    let mut scopes: Vec<String> = if asked.is_empty() && oidc {
        vec![OPENID.to_owned()]
    } else {
        Vec::new()
    };
    for s in asked.iter().flat_map(|s| s.split_whitespace()) {
        if !scopes.iter().any(|have| have == s) {
            scopes.push(s.to_owned());
        }
    }
    let offered = supported.is_none_or(|list| list.iter().any(|s| s == OFFLINE_ACCESS));
    if offered && !scopes.iter().any(|s| s == OFFLINE_ACCESS) {
        scopes.push(OFFLINE_ACCESS.to_owned());
    }
    scopes
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejected_client_at_the_code_exchange_is_named_with_its_fix() {
        let e = client_error(
            LoginError::Token("invalid_client: client authentication failed".into()),
            "https://idp.example",
            "cli",
        );
        assert!(matches!(e, LoginError::ClientRejected { .. }), "{e:?}");
        let text = e.to_string();
        for needle in [
            "https://idp.example",
            "`cli`",
            "invalid_client",
            "--client-auth",
        ] {
            assert!(text.contains(needle), "{needle:?} missing: {text}");
        }
        let other = client_error(LoginError::Token("invalid_grant".into()), "i", "c");
        assert!(matches!(other, LoginError::Token(_)));
        let unauthorized = client_error(LoginError::Token("unauthorized_client".into()), "i", "c");
        assert!(matches!(unauthorized, LoginError::ClientRejected { .. }));
    }

    #[test]
    fn offline_access_is_requested_once_when_the_server_lists_it_or_lists_nothing() {
        assert_eq!(
            requested_scopes(&[], true, None),
            ["openid", "offline_access"]
        );
        assert_eq!(requested_scopes(&[], false, None), ["offline_access"]);
        assert_eq!(
            requested_scopes(&["email openid".into(), "email".into()], true, None),
            ["email", "openid", "offline_access"]
        );
        assert_eq!(
            requested_scopes(&["offline_access".into(), "api".into()], false, None),
            ["offline_access", "api"]
        );
        let oidc_provider: Vec<String> = ["openid", "email", "offline_access"]
            .map(String::from)
            .into();
        assert_eq!(
            requested_scopes(&[], true, Some(&oidc_provider)),
            ["openid", "offline_access"]
        );
        // django-oauth-toolkit: `offline_access` is unknown there, so not asked for.
        let dot: Vec<String> = ["openid", "read", "write"].map(String::from).into();
        assert_eq!(requested_scopes(&[], true, Some(&dot)), ["openid"]);
        assert_eq!(
            requested_scopes(&["read".into()], true, Some(&dot)),
            ["read"]
        );
        // Asked for explicitly: asked for, whatever the server lists.
        assert_eq!(
            requested_scopes(&["read offline_access".into()], false, Some(&dot)),
            ["read", "offline_access"]
        );
    }

    #[test]
    fn invalid_scope_names_the_scopes_and_the_fix() {
        let scopes: Vec<String> = vec!["openid".into(), "offline_access".into()];
        let from_callback = LoginError::Denied {
            error: "invalid_scope".into(),
            description: Some("offline_access is unknown".into()),
        };
        let from_token = LoginError::InvalidScope {
            requested: String::new(),
            description: None,
        };
        for e in [from_callback, from_token] {
            let text = name_scopes(e, &scopes).to_string();
            assert!(text.contains("`openid offline_access`"), "{text}");
            assert!(text.contains("--scope"), "{text}");
            assert!(text.contains("invalid_scope"), "{text}");
        }
        let text = name_scopes(
            LoginError::InvalidScope {
                requested: String::new(),
                description: None,
            },
            &["read".into()],
        )
        .to_string();
        assert!(!text.contains("offline_access"), "{text}");
        // Other refusals pass through untouched.
        let denied = LoginError::Denied {
            error: "access_denied".into(),
            description: None,
        };
        assert!(matches!(
            name_scopes(denied, &scopes),
            LoginError::Denied { .. }
        ));
    }
}
