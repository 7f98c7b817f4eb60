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
mod device;
mod discard;
mod id_token_error;
mod jwks;
mod page;
mod register;
mod token;
mod verify;

use std::sync::Arc;
use std::time::Duration;

use kontext_broker_protocol::{ClientAuthMethod, ClientCredential, EndpointOverrides, Secret};
use openidconnect::core::{CoreAuthPrompt, CoreAuthenticationFlow, CoreErrorResponseType};
use openidconnect::{
    AuthUrl, AuthorizationCode, ClientId, CsrfToken, EndpointState, IssuerUrl, Nonce,
    OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RequestTokenError,
    Scope, StandardErrorResponse, TokenUrl,
};
use tokio_util::task::TaskTracker;

use kontext_broker::clock::SystemClock;
use kontext_broker::idp::client_auth::{check_client_key, check_method, Prepared};
use kontext_broker::idp::{discover_metadata, ClientAuth, EndpointKind, Http};
use kontext_broker::store::Endpoints;

pub use discard::REVOKE_TIMEOUT;
pub use id_token_error::{IdTokenError, KeyRefresh};
pub use jwks::{JwksCache, Keys, Refresh, MIN_REFRESH_INTERVAL};
pub use page::{CONTENT_SECURITY_POLICY, HOLD_LIMIT};
pub use register::{register_client, RegisteredClient, DEVICE_CODE_GRANT, REGISTERED_REDIRECT_URI};
pub use token::RawTokenResponse;
pub use verify::{verify_id_token, verify_id_token_with_keys, IdTokenCheck, Identity};

use page::Page;
use token::{BareClient, LoginClient};

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

/// IdP text on its way to the terminal: see [`kontext_broker::idp::sanitize`].
pub(crate) use kontext_broker::idp::sanitize::text as sanitize;

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

/// What a login knows of the issuer after discovery.
struct Discovered {
    /// Discovered endpoints, with the caller's overrides applied.
    endpoints: Endpoints,
    /// The issuer exactly as the discovery document names it; the ID token's
    /// `iss` and the redirect's RFC 9207 `iss` must equal it byte for byte.
    issuer: String,
    /// `authorization_response_iss_parameter_supported` (RFC 9207 §3).
    iss_parameter_supported: bool,
}

/// Everything a flow needs once discovery and registration are done.
struct LoginContext<'a> {
    http: &'a Http,
    opts: &'a LoginOptions,
    discovered: &'a Discovered,
    /// The scopes asked for (the profile's scopes).
    scopes: Vec<String>,
    client_id: String,
    /// How the client authenticates (its credential too); set per request.
    auth: ClientAuth,
    /// The secret method found to work after the first one listed was refused.
    detected: std::sync::Mutex<Option<ClientAuthMethod>>,
    /// The issuer's keys, when an ID token is expected.
    keys: Option<JwksCache>,
}

impl LoginContext<'_> {
    /// The client authentication methods to try at `kind`, in order.
    fn attempts(&self, kind: EndpointKind) -> Vec<ClientAuthMethod> {
        self.auth.attempts(&self.discovered.endpoints, kind)
    }

    /// The request parts for `method` (a fresh assertion for `private_key_jwt`).
    fn prepare(&self, method: ClientAuthMethod) -> Result<Prepared, LoginError> {
        self.auth
            .prepare(method, &self.discovered.endpoints.token)
            .map_err(|e| LoginError::Usage(e.to_string()))
    }

    /// Notes that `method` worked after the first choice was refused, so the
    /// profile keeps it.
    fn detected(&self, method: ClientAuthMethod) {
        *self.detected.lock().unwrap_or_else(|e| e.into_inner()) = Some(method);
    }

    /// Gives a client rejection the wording that names the issuer and the client.
    fn client_error(&self, e: LoginError) -> LoginError {
        client_error(e, &self.discovered.issuer, &self.client_id)
    }

    /// The checks every token response passes, in both flows: the ID token
    /// (nonce only when one was sent) and a refresh token. A refused response
    /// has its tokens revoked in the background and nothing is returned.
    async fn accept(
        &self,
        response: RawTokenResponse,
        nonce: Option<&Nonce>,
    ) -> Result<LoginOutcome, LoginError> {
        let checked = self.check(&response, nonce).await;
        let identity = match checked {
            Ok(identity) => identity,
            Err(e) => {
                let detected = *self.detected.lock().unwrap_or_else(|e| e.into_inner());
                discard::Discarded {
                    endpoint: self.discovered.endpoints.revocation.clone(),
                    audience: self.discovered.endpoints.token.clone(),
                    method: detected
                        .or_else(|| self.attempts(EndpointKind::Revocation).first().copied()),
                    auth: self.auth.clone(),
                    access_token: Secret::new(response.access_token().secret().clone()),
                    refresh_token: response
                        .refresh_token()
                        .map(|t| Secret::new(t.secret().clone())),
                }
                .revoke_in_background(self.http, &self.opts.tasks);
                return Err(e);
            }
        };
        let json = serde_json::to_string(&response)
            .map_err(|e| LoginError::Token(format!("cannot re-encode the token response: {e}")))?;
        let (client_secret, client_key) = match &self.auth.credential {
            ClientCredential::Secret(secret) => (Some(secret.clone()), None),
            ClientCredential::PrivateKey(key) => (None, Some(key.clone())),
            ClientCredential::None => (None, None),
        };
        let detected = *self.detected.lock().unwrap_or_else(|e| e.into_inner());
        Ok(LoginOutcome {
            client_id: self.client_id.clone(),
            client_secret,
            client_key,
            client_auth: self.auth.configured.or(detected),
            scopes: self.scopes.clone(),
            token_response: Secret::new(json),
            subject: identity.map(|i| i.account().to_owned()),
            issuer: self.discovered.issuer.clone(),
        })
    }

    async fn check(
        &self,
        response: &RawTokenResponse,
        nonce: Option<&Nonce>,
    ) -> Result<Option<Identity>, LoginError> {
        let identity = match (response.raw_id_token(), &self.keys) {
            // Not asked for, so not trusted for anything.
            (Some(_), None) => None,
            (Some(raw), Some(keys)) => {
                let check = IdTokenCheck {
                    issuer: &self.discovered.issuer,
                    client_id: &self.client_id,
                    client_secret: match &self.auth.credential {
                        ClientCredential::Secret(secret) => Some(secret),
                        _ => None,
                    },
                    nonce: nonce.map(|n| n.secret().as_str()),
                    access_token: response.access_token().secret(),
                };
                Some(verify_id_token(raw, keys, &check).await?)
            }
            // OIDC Core §3.1.3.3: the code flow's token response must carry one.
            (None, Some(_)) if nonce.is_some() => return Err(IdTokenError::Missing.into()),
            (None, _) => None,
        };
        if response.refresh_token().is_none() {
            return Err(LoginError::NoRefreshToken);
        }
        Ok(identity)
    }

    /// The browser's page for the outcome of the code flow.
    fn page(&self, result: &Result<LoginOutcome, LoginError>) -> Page {
        match result {
            Ok(outcome) => Page::success(
                outcome.subject.as_deref(),
                &self.discovered.issuer,
                self.opts.profile.as_deref(),
            ),
            Err(e) => Page::failure(&e.to_string()),
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

/// An `invalid_scope` refusal (at the authorization, device or token
/// endpoint), with the scopes that were asked for.
fn name_scopes(e: LoginError, scopes: &[String]) -> LoginError {
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

async fn code_flow(
    ctx: &LoginContext<'_>,
    client: LoginClient,
    open_browser: bool,
    ui: &mut dyn LoginUi,
) -> Result<LoginOutcome, LoginError> {
    let auth_url = ctx
        .discovered
        .endpoints
        .authorization
        .clone()
        .unwrap_or_default();
    let auth_url = AuthUrl::new(auth_url)
        .map_err(|e| LoginError::Unsupported(format!("authorization endpoint URL: {e}")))?;
    // Bound before the URL exists, so the port in the URL is ours. Dropped on
    // every return path (and when this future is dropped): no leaked port.
    let listener = callback::CallbackListener::bind()
        .await
        .map_err(LoginError::Listener)?;
    let redirect = RedirectUrl::new(listener.redirect_uri())
        .map_err(|e| LoginError::Usage(format!("redirect URI: {e}")))?;
    let client = client.set_auth_uri(auth_url).set_redirect_uri(redirect);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, state, nonce) = client
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .add_scopes(ctx.scopes.iter().cloned().map(Scope::new))
        .set_pkce_challenge(challenge)
        .add_prompt(CoreAuthPrompt::Consent)
        .url();
    ui.show_url(url.as_str());
    if open_browser {
        if let Err(e) = browser::open(url.as_str()) {
            ui.notice(&format!(
                "could not start a browser ({e}); open the URL above yourself"
            ));
        }
    }
    let expected = callback::ExpectedIssuer {
        issuer: &ctx.discovered.issuer,
        required: ctx.discovered.iss_parameter_supported,
    };
    let timeout = ctx.opts.timeout;
    let (code, reply) =
        tokio::time::timeout(timeout, listener.wait(&state, expected, &ctx.opts.tasks))
            .await
            .map_err(|_| LoginError::TimedOut {
                after: timeout,
                what: "no redirect reached the loopback listener",
            })??;
    drop(listener);
    // The browser waits (at most `HOLD_LIMIT`) for the outcome of this part.
    let result = async {
        let response = exchange_code(ctx, &client, &code, &verifier).await?;
        ctx.accept(response, Some(&nonce)).await
    }
    .await;
    reply.finish(ctx.page(&result));
    result
}

/// Redeems the authorization code, with each client authentication method to
/// try. The server refuses a client before it looks at the code, so after an
/// `invalid_client` the code is still good for the other method.
async fn exchange_code(
    ctx: &LoginContext<'_>,
    client: &LoginClient<openidconnect::EndpointSet>,
    code: &Secret,
    verifier: &PkceCodeVerifier,
) -> Result<RawTokenResponse, LoginError> {
    let attempts = ctx.attempts(EndpointKind::Token);
    for (i, method) in attempts.iter().enumerate() {
        let prepared = ctx.prepare(*method)?;
        let configured = with_client_auth(&prepared, client.clone());
        let mut request = configured
            .exchange_code(AuthorizationCode::new(code.expose().to_owned()))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier.secret().clone()));
        for (name, value) in prepared.extra_params() {
            request = request.add_extra_param(name, value);
        }
        match request.request_async(ctx.http).await {
            Ok(response) => {
                if i > 0 {
                    ctx.detected(*method);
                }
                return Ok(response);
            }
            Err(RequestTokenError::ServerResponse(r))
                if r.error().as_ref() == "invalid_client" && i + 1 < attempts.len() => {}
            Err(e) => return Err(ctx.client_error(token_error(e))),
        }
    }
    Err(LoginError::Usage(
        "no client authentication method to try".into(),
    ))
}

/// Sets `prepared`'s secret and auth style on a login client.
fn with_client_auth<A: EndpointState, D: EndpointState, T: EndpointState>(
    prepared: &Prepared,
    client: LoginClient<A, D, T>,
) -> LoginClient<A, D, T> {
    match prepared.secret_and_style() {
        Some((secret, style)) => client.set_client_secret(secret).set_auth_type(style),
        None => client,
    }
}

/// Gives a client rejection the wording that names the issuer and the client.
pub(crate) fn client_error(e: LoginError, issuer: &str, client_id: &str) -> LoginError {
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
fn token_error<RE: std::error::Error + 'static>(
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
pub(crate) fn request_failure<RE: std::error::Error + 'static, TE: openidconnect::ErrorResponse>(
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
