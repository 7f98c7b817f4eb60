//! A fake OAuth 2.0 / OpenID Connect provider with Ory Hydra's refresh semantics,
//! for fault injection. TEST FIXTURE ONLY.
//!
//! It serves only what the broker uses after login: discovery, the
//! `refresh_token` grant, RFC 7009 revocation, RFC 7662 introspection and
//! userinfo. Grants are created directly with [`FakeIdp::mint`]. Every knob
//! (latency, a hold gate, scripted [`Failure`]s, TTL, revocation) acts on the
//! next token-endpoint calls, and counters report what the IdP saw.
//!
//! Refresh semantics (Hydra, strict rotation):
//! - each success issues a new access token and, when rotation is on, a new
//!   refresh token; the grant's previous access tokens are deleted;
//! - reusing an already-rotated refresh token answers `400 invalid_grant` and
//!   revokes the whole grant, so the newest refresh token dies too;
//! - a refresh of a token whose previous refresh is still in flight answers
//!   `400 invalid_request` (Hydra's concurrent-refresh answer) and leaves the
//!   grant alone;
//! - an unknown or revoked refresh token answers `400 invalid_grant`;
//! - a refresh whose client disconnects while it waits (latency or hold) is
//!   abandoned without rotating: its refresh token is usable again. Use
//!   [`Failure::LoseResponse`] for a refresh that completes but is never answered.
//!
//! Endpoints (under the issuer): `/.well-known/openid-configuration` and/or
//! `/.well-known/oauth-authorization-server`, `/jwks`, `POST /token`
//! (`refresh_token`, plus the login grants of [`oidc`]), `POST /revoke`,
//! `POST /introspect` (no client authentication), `GET /userinfo`, and the
//! login side in [`oidc`]: `GET /authorize` (approves at once and redirects),
//! `POST /device_authorization` (approved at once), signed ID tokens and a
//! hostile mode ([`IdTokenForgery`]).
//!
//! Expiry uses the wall clock ([`SystemTime`]), like `expires_in` does.
//! The server listens on `127.0.0.1:0` and stops when the [`FakeIdp`] is dropped.
//! State lives in the instance, so several fake IdPs can run in one process.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rand::RngCore as _;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

mod keys;
mod oidc;

pub use oidc::{IdTokenForgery, IssParameter, DEVICE_CODE_GRANT};

/// The largest request body the fake accepts (form posts are tiny).
const MAX_BODY: usize = 64 * 1024;

/// Which discovery documents the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovery {
    /// Only `/.well-known/openid-configuration`.
    Oidc,
    /// Only RFC 8414 `/.well-known/oauth-authorization-server` (like the kontext backend).
    Rfc8414Only,
    /// Both documents.
    Both,
}

/// Which discovery documents list the revocation endpoint (the endpoint itself
/// always answers). See [`FakeIdp::list_revocation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RevocationListing {
    /// Every document served lists it.
    #[default]
    Everywhere,
    /// Only the RFC 8414 document (django-oauth-toolkit's layout).
    Rfc8414Only,
    /// No document lists it.
    Nowhere,
}

/// Start-up configuration of a [`FakeIdp`].
#[derive(Debug, Clone)]
pub struct FakeIdpConfig {
    /// Lifetime of issued access tokens, in seconds (`expires_in`). Changeable later with [`FakeIdp::set_ttl`].
    pub access_token_ttl_secs: u64,
    /// Which discovery documents to serve.
    pub discovery: Discovery,
    /// Rotate refresh tokens on every refresh (Hydra's default). When false, a
    /// refresh answers without `refresh_token` and the old one stays valid.
    pub rotate_refresh_tokens: bool,
    /// The only client id the token and revocation endpoints accept.
    pub client_id: String,
    /// When set, the client must authenticate with HTTP Basic (`client_secret_basic`)
    /// using [`FakeIdpConfig::client_id`] and this secret; otherwise it is a public
    /// client that sends `client_id` in the form body.
    pub require_client_secret: Option<String>,
    /// Scope recorded in minted grants and echoed in token responses.
    pub scope: String,
    /// Subject of minted grants, answered by userinfo.
    pub subject: String,
    /// The secret must come as `client_secret` in the form body
    /// (`client_secret_post`); HTTP Basic is refused, and discovery lists only
    /// `client_secret_post`. Needs [`FakeIdpConfig::require_client_secret`].
    pub client_secret_post_only: bool,
    /// Access tokens are JWT-shaped (`header.payload.sig`, unsigned) with an
    /// `exp` claim, like RFC 9068 tokens.
    pub jwt_access_tokens: bool,
    /// Token responses (minted and refreshed) leave `expires_in` out.
    pub omit_expires_in: bool,
}

impl Default for FakeIdpConfig {
    fn default() -> Self {
        Self {
            access_token_ttl_secs: 3600,
            discovery: Discovery::Both,
            rotate_refresh_tokens: true,
            client_id: "kontext-cli".to_owned(),
            require_client_secret: None,
            scope: "openid offline_access".to_owned(),
            subject: "fake-user".to_owned(),
            client_secret_post_only: false,
            jwt_access_tokens: false,
            omit_expires_in: false,
        }
    }
}

/// A scripted answer for one token-endpoint call, consumed FIFO.
///
/// Unless stated otherwise a failure does not touch any grant: the refresh token
/// sent stays exactly as valid as it was, so a retry can succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// `500` with `{"error":"server_error"}`.
    Status500,
    /// `429` with a `Retry-After` header and `{"error":"temporarily_unavailable"}`.
    TooManyRequests {
        /// Value of the `Retry-After` header, in seconds.
        retry_after_secs: u64,
    },
    /// Wait this long (after the latency), then close the connection without answering.
    Hang(Duration),
    /// Close the connection without answering.
    CloseSocket,
    /// `200` with `Content-Type: application/json` and a truncated JSON body.
    MalformedJson,
    /// Perform the refresh for real (rotating), but leave `expires_in` out of the answer.
    MissingExpiresIn,
    /// `400` with `{"error":"invalid_grant"}`.
    InvalidGrant,
    /// `401` with `{"error":"invalid_client"}` and a `WWW-Authenticate` header.
    InvalidClient,
    /// `400` with `{"error":"unauthorized_client"}`.
    UnauthorizedClient,
    /// `400` with `{"error":"invalid_request"}`.
    InvalidRequest,
    /// `503` with `{"error":"temporarily_unavailable"}`.
    TemporarilyUnavailable,
    /// Perform the refresh for real (rotating), then close the connection instead of
    /// answering: the client never learns the new refresh token, and its old one is
    /// now a rotated one whose reuse revokes the grant.
    LoseResponse,
    /// Answer `status` with this JSON body, verbatim except that every
    /// `{refresh_token}` becomes the refresh token the call presented (a hostile
    /// IdP echoing a secret). The grant is not touched.
    Raw {
        /// HTTP status code.
        status: u16,
        /// The response body (`Content-Type: application/json`).
        body: String,
    },
}

/// A running fake IdP. Stops its server (and open connections) on drop.
pub struct FakeIdp {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeIdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeIdp")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Holds token-endpoint calls (after they are counted and their refresh token is
/// marked in flight) until dropped. See [`FakeIdp::hold_token_calls`].
#[must_use = "token calls are released when the guard is dropped"]
pub struct HoldGuard {
    shared: Arc<Shared>,
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.shared.holds.send_modify(|n| *n -= 1);
    }
}

struct Shared {
    issuer: String,
    config: FakeIdpConfig,
    state: Mutex<State>,
    /// Number of token-endpoint calls received so far (watchable).
    token_calls: watch::Sender<u64>,
    /// Number of live [`HoldGuard`]s.
    holds: watch::Sender<u32>,
}

#[derive(Default)]
struct State {
    ttl_secs: u64,
    latency: Duration,
    failures: VecDeque<Failure>,
    next_grant: u64,
    grants: HashMap<u64, Grant>,
    refresh_tokens: HashMap<String, RefreshEntry>,
    access_tokens: HashMap<String, AccessEntry>,
    refresh_successes: u64,
    revocation_calls: u64,
    userinfo_calls: u64,
    discovery_calls: u64,
    revocation_listing: RevocationListing,
    /// When set, the revocation endpoint answers this status (after counting the call).
    revocation_status: Option<u16>,
    oidc: oidc::OidcState,
    /// Token and revocation calls that carried HTTP Basic credentials.
    basic_auth_calls: u64,
}

struct Grant {
    alive: bool,
    /// The grant's newest refresh token.
    current_refresh: String,
}

/// Lifecycle of one refresh token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefreshState {
    /// Usable.
    Current,
    /// A refresh with this token is being processed.
    InFlight,
    /// Exchanged already; using it again is reuse and revokes the grant.
    Rotated,
}

struct RefreshEntry {
    grant: u64,
    state: RefreshState,
}

struct AccessEntry {
    grant: u64,
    expires_at: SystemTime,
}

/// What the handler sends back; `Close` drops the connection without a response.
enum Reply {
    Http(Response<Full<Bytes>>),
    Close,
}

/// The error a service returns to make hyper close the connection unanswered.
#[derive(Debug)]
struct CloseConnection;

impl std::fmt::Display for CloseConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fake IdP closes the connection without answering")
    }
}

impl std::error::Error for CloseConnection {}

impl FakeIdp {
    /// Binds `127.0.0.1:0` and starts serving on the current tokio runtime.
    pub async fn start(config: FakeIdpConfig) -> FakeIdp {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake IdP on 127.0.0.1:0");
        let addr = listener.local_addr().expect("fake IdP local addr");
        let shared = Arc::new(Shared {
            issuer: format!("http://{addr}"),
            state: Mutex::new(State {
                ttl_secs: config.access_token_ttl_secs,
                ..State::default()
            }),
            config,
            token_calls: watch::Sender::new(0),
            holds: watch::Sender::new(0),
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        FakeIdp {
            addr,
            shared,
            server,
        }
    }

    /// The issuer URL, `http://127.0.0.1:PORT` (no trailing slash).
    pub fn issuer(&self) -> String {
        self.shared.issuer.clone()
    }

    /// The client id the fake accepts.
    pub fn client_id(&self) -> &str {
        &self.shared.config.client_id
    }

    /// Creates a new grant and returns its RFC 6749 §5.1 token response
    /// (`access_token`, `token_type` "Bearer", `expires_in`, `refresh_token`, `scope`).
    pub fn mint(&self) -> Value {
        let mut st = self.shared.lock();
        let grant = st.next_grant;
        st.next_grant += 1;
        let refresh = new_token("rt");
        st.grants.insert(
            grant,
            Grant {
                alive: true,
                current_refresh: refresh.clone(),
            },
        );
        st.refresh_tokens.insert(
            refresh.clone(),
            RefreshEntry {
                grant,
                state: RefreshState::Current,
            },
        );
        let (access, ttl) = st.issue_access_token(grant, self.shared.config.jwt_access_tokens);
        let mut body = json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ttl,
            "refresh_token": refresh,
            "scope": self.shared.config.scope,
        });
        if self.shared.config.omit_expires_in {
            body.as_object_mut().map(|o| o.remove("expires_in"));
        }
        body
    }

    /// Token and revocation calls that carried HTTP Basic credentials.
    pub fn basic_auth_calls(&self) -> u64 {
        self.shared.lock().basic_auth_calls
    }

    /// Token-endpoint calls received so far, counted on arrival: every call counts,
    /// failed, scripted, held and unanswered ones too.
    pub fn token_calls(&self) -> u64 {
        *self.shared.token_calls.borrow()
    }

    /// Waits until at least `n` token-endpoint calls have arrived. Wrap it in a
    /// timeout: it waits forever if the calls never come.
    pub async fn wait_for_token_calls(&self, n: u64) {
        let mut rx = self.shared.token_calls.subscribe();
        rx.wait_for(|calls| *calls >= n)
            .await
            .expect("fake IdP state outlives its receivers");
    }

    /// Refreshes that succeeded (a new access token was issued).
    pub fn refresh_successes(&self) -> u64 {
        self.shared.lock().refresh_successes
    }

    /// Which discovery documents list the revocation endpoint from now on.
    pub fn list_revocation(&self, listing: RevocationListing) {
        self.shared.lock().revocation_listing = listing;
    }

    /// Makes the revocation endpoint answer `status` with `{"error":"server_error"}`
    /// (no token is revoked); `None` restores normal answers.
    pub fn fail_revocations(&self, status: Option<u16>) {
        self.shared.lock().revocation_status = status;
    }

    /// Calls received at the revocation endpoint.
    pub fn revocation_calls(&self) -> u64 {
        self.shared.lock().revocation_calls
    }

    /// Calls received at the userinfo endpoint.
    pub fn userinfo_calls(&self) -> u64 {
        self.shared.lock().userinfo_calls
    }

    /// Discovery documents served (both well-known paths, and the JWKS).
    pub fn discovery_calls(&self) -> u64 {
        self.shared.lock().discovery_calls
    }

    /// Delay applied to every later token-endpoint call before it is answered.
    /// A refresh token stays "in flight" during this delay.
    pub fn set_latency(&self, d: Duration) {
        self.shared.lock().latency = d;
    }

    /// Holds every token-endpoint call, after it is counted and its refresh token
    /// marked in flight, until the guard is dropped. Deterministic alternative to
    /// [`FakeIdp::set_latency`] for concurrency tests.
    pub fn hold_token_calls(&self) -> HoldGuard {
        self.shared.holds.send_modify(|n| *n += 1);
        HoldGuard {
            shared: self.shared.clone(),
        }
    }

    /// Scripts the answer of a later token-endpoint call (FIFO, one call each).
    pub fn push_failure(&self, f: Failure) {
        self.shared.lock().failures.push_back(f);
    }

    /// Scripted failures not consumed yet.
    pub fn pending_failures(&self) -> usize {
        self.shared.lock().failures.len()
    }

    /// Revokes every grant: later refreshes answer `invalid_grant`, and every
    /// access token stops being valid.
    pub fn revoke_all(&self) {
        let mut st = self.shared.lock();
        let ids: Vec<u64> = st.grants.keys().copied().collect();
        for id in ids {
            st.kill_grant(id);
        }
    }

    /// Whether `token` is an access token that userinfo/introspection would
    /// accept: the grant's current one, unexpired, its grant alive.
    pub fn access_token_valid(&self, token: &str) -> bool {
        self.shared.lock().access_token_valid(token)
    }

    /// The newest refresh token of the grant that `any_refresh_token` (current or
    /// rotated) belongs to, or `None` if that grant is revoked or unknown.
    pub fn current_refresh_token(&self, any_refresh_token: &str) -> Option<String> {
        let st = self.shared.lock();
        let entry = st.refresh_tokens.get(any_refresh_token)?;
        let grant = st.grants.get(&entry.grant)?;
        grant.alive.then(|| grant.current_refresh.clone())
    }

    /// Whether the grant of this refresh token (current or rotated) is still alive.
    pub fn grant_alive(&self, any_refresh_token: &str) -> bool {
        self.current_refresh_token(any_refresh_token).is_some()
    }

    /// Refresh calls currently in flight (arrived, not answered, not abandoned).
    pub fn in_flight_refreshes(&self) -> usize {
        self.shared
            .lock()
            .refresh_tokens
            .values()
            .filter(|e| e.state == RefreshState::InFlight)
            .count()
    }

    /// Number of grants not revoked.
    pub fn live_grants(&self) -> usize {
        self.shared
            .lock()
            .grants
            .values()
            .filter(|g| g.alive)
            .count()
    }

    /// Lifetime of access tokens issued from now on, in seconds.
    pub fn set_ttl(&self, secs: u64) {
        self.shared.lock().ttl_secs = secs;
    }
}

impl Drop for FakeIdp {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection.
        self.server.abort();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not make every later assertion panic too.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn wait_latency_and_holds(&self) {
        let latency = self.lock().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut rx = self.holds.subscribe();
        // The sender lives in `self`, so this cannot fail.
        let _ = rx.wait_for(|holds| *holds == 0).await;
    }
}

impl State {
    fn issue_access_token(&mut self, grant: u64, jwt: bool) -> (String, u64) {
        let ttl = self.ttl_secs;
        let token = if jwt {
            jwt_token(SystemTime::now() + Duration::from_secs(ttl))
        } else {
            new_token("at")
        };
        self.access_tokens.insert(
            token.clone(),
            AccessEntry {
                grant,
                expires_at: SystemTime::now() + Duration::from_secs(ttl),
            },
        );
        (token, ttl)
    }

    fn kill_grant(&mut self, grant: u64) {
        if let Some(g) = self.grants.get_mut(&grant) {
            g.alive = false;
        }
        self.access_tokens.retain(|_, at| at.grant != grant);
    }

    fn grant_alive(&self, grant: u64) -> bool {
        self.grants.get(&grant).is_some_and(|g| g.alive)
    }

    fn access_token_valid(&self, token: &str) -> bool {
        self.access_tokens
            .get(token)
            .is_some_and(|at| self.grant_alive(at.grant) && SystemTime::now() < at.expires_at)
    }
}

/// An unsigned JWT-shaped access token whose `exp` is `expires` (whole seconds,
/// rounded down, as IdPs compute it), with a random `jti`.
fn jwt_token(expires: SystemTime) -> String {
    let enc = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let exp = expires
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{}.{}.fake-signature",
        enc(json!({ "alg": "RS256", "typ": "at+jwt" })),
        enc(json!({ "sub": "fake-user", "exp": exp, "jti": new_token("jti") }))
    )
}

fn new_token(kind: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "fake_{kind}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move {
                            match handle(&shared, req).await {
                                Reply::Http(resp) => Ok(resp),
                                Reply::Close => Err(CloseConnection),
                            }
                        }
                    });
                    // Errors here are the scripted closes or clients going away.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Reply {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let discovery = shared.config.discovery;
    match (method, path.as_str()) {
        (Method::GET, "/.well-known/openid-configuration")
            if matches!(discovery, Discovery::Oidc | Discovery::Both) =>
        {
            let revocation = {
                let mut st = shared.lock();
                st.discovery_calls += 1;
                st.revocation_listing == RevocationListing::Everywhere
            };
            json_reply(StatusCode::OK, metadata(shared, revocation))
        }
        (Method::GET, "/.well-known/oauth-authorization-server")
            if matches!(discovery, Discovery::Rfc8414Only | Discovery::Both) =>
        {
            let revocation = {
                let mut st = shared.lock();
                st.discovery_calls += 1;
                st.revocation_listing != RevocationListing::Nowhere
            };
            json_reply(StatusCode::OK, metadata(shared, revocation))
        }
        (Method::GET, "/jwks") => oidc::jwks(shared),
        (Method::GET, "/authorize") => oidc::authorize(shared, &req),
        (Method::POST, "/device_authorization") => oidc::device_authorization(shared, req).await,
        (Method::POST, "/token") => token_endpoint(shared, req).await,
        (Method::POST, "/revoke") => revocation_endpoint(shared, req).await,
        (Method::POST, "/introspect") => introspection_endpoint(shared, req).await,
        (Method::GET | Method::POST, "/userinfo") => userinfo_endpoint(shared, &req),
        _ => json_reply(StatusCode::NOT_FOUND, json!({ "error": "not_found" })),
    }
}

/// The discovery document: what openidconnect's `CoreProviderMetadata` requires
/// (issuer, authorization_endpoint, jwks_uri, response_types_supported,
/// subject_types_supported, id_token_signing_alg_values_supported) plus the
/// endpoints the broker uses.
fn metadata(shared: &Shared, with_revocation: bool) -> Value {
    let issuer = &shared.issuer;
    let auth_methods = if shared.config.client_secret_post_only {
        json!(["client_secret_post"])
    } else {
        json!(["none", "client_secret_basic"])
    };
    let mut doc = json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "revocation_endpoint": format!("{issuer}/revoke"),
        "introspection_endpoint": format!("{issuer}/introspect"),
        "userinfo_endpoint": format!("{issuer}/userinfo"),
        "jwks_uri": format!("{issuer}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_methods_supported": auth_methods,
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": ["openid", "offline_access"],
    });
    if !with_revocation {
        doc.as_object_mut()
            .expect("an object")
            .remove("revocation_endpoint");
    }
    oidc::extend_metadata(shared, &mut doc);
    doc
}

fn json_reply(status: StatusCode, body: Value) -> Reply {
    Reply::Http(json_response(status, body))
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

fn oauth_error(status: StatusCode, error: &str) -> Response<Full<Bytes>> {
    let mut resp = json_response(status, json!({ "error": error }));
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"fake-idp\""),
        );
    }
    resp
}

/// Reads a form-encoded body; `None` when it is unreadable or too large.
async fn read_form(
    req: Request<Incoming>,
) -> (http::request::Parts, Option<HashMap<String, String>>) {
    let (parts, body) = req.into_parts();
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return (parts, None),
    };
    let form = url::form_urlencoded::parse(&bytes).into_owned().collect();
    (parts, Some(form))
}

/// Checks client authentication: HTTP Basic with the configured secret when one is
/// required, else a matching `client_id` in the body (or in Basic, without secret).
fn client_authenticated(
    config: &FakeIdpConfig,
    parts: &http::request::Parts,
    form: &HashMap<String, String>,
) -> bool {
    let basic = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|s| {
            let (id, secret) = s.split_once(':')?;
            // RFC 6749 §2.3.1: both parts are form-urlencoded before base64.
            Some((form_decode(id), form_decode(secret)))
        });
    match &config.require_client_secret {
        Some(expected) if config.client_secret_post_only => {
            basic.is_none()
                && form.get("client_id") == Some(&config.client_id)
                && form
                    .get("client_secret")
                    .is_some_and(|s| constant_time_eq(s.as_bytes(), expected.as_bytes()))
        }
        Some(expected) => basic.is_some_and(|(id, secret)| {
            id == config.client_id && constant_time_eq(secret.as_bytes(), expected.as_bytes())
        }),
        None => match (&basic, form.get("client_id")) {
            (Some((id, _)), _) => *id == config.client_id,
            (None, Some(id)) => *id == config.client_id,
            (None, None) => false,
        },
    }
}

fn form_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("v={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What was decided for a token call on arrival.
enum TokenPlan {
    /// Answer this after the latency/hold, without touching state.
    Answer(Response<Full<Bytes>>),
    /// Answer with a scripted failure after the latency/hold.
    Scripted(Failure),
    /// The refresh token (now marked in flight) gets exchanged after the latency/hold.
    Refresh {
        token: String,
        /// `MissingExpiresIn` / `LoseResponse` shape the answer of a real refresh.
        shape: Option<Failure>,
    },
}

async fn token_endpoint(shared: &Arc<Shared>, req: Request<Incoming>) -> Reply {
    shared.token_calls.send_modify(|n| *n += 1);
    let (parts, form) = read_form(req).await;
    let plan = plan_token_call(shared, &parts, form);
    // Armed while a refresh token is marked in flight: if hyper drops this future
    // (the connection died), the token must not stay in flight forever.
    let guard = match &plan {
        TokenPlan::Refresh { token, .. } => Some(InFlightGuard {
            shared: shared.clone(),
            token: token.clone(),
        }),
        _ => None,
    };
    shared.wait_latency_and_holds().await;
    let reply = match plan {
        TokenPlan::Answer(resp) => Reply::Http(resp),
        TokenPlan::Scripted(failure) => scripted_reply(failure).await,
        TokenPlan::Refresh { token, shape } => {
            let resp = finish_refresh(shared, &token, shape != Some(Failure::MissingExpiresIn));
            match shape {
                Some(Failure::LoseResponse) => Reply::Close,
                _ => Reply::Http(resp),
            }
        }
    };
    // After `finish_refresh` the token is no longer in flight, so this is a no-op.
    drop(guard);
    reply
}

/// Puts an in-flight refresh token back to `Current` when its call is abandoned.
struct InFlightGuard {
    shared: Arc<Shared>,
    token: String,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if let Some(e) = st.refresh_tokens.get_mut(&self.token) {
            if e.state == RefreshState::InFlight {
                e.state = RefreshState::Current;
            }
        }
    }
}

fn plan_token_call(
    shared: &Shared,
    parts: &http::request::Parts,
    form: Option<HashMap<String, String>>,
) -> TokenPlan {
    let mut st = shared.lock();
    let shape = match st.failures.pop_front() {
        Some(f @ (Failure::MissingExpiresIn | Failure::LoseResponse)) => Some(f),
        Some(Failure::Raw { status, body }) => {
            let presented = form
                .as_ref()
                .and_then(|f| f.get("refresh_token"))
                .map_or("", String::as_str);
            return TokenPlan::Answer(
                Response::builder()
                    .status(status)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(
                        body.replace("{refresh_token}", presented),
                    )))
                    .expect("a scripted raw response is valid"),
            );
        }
        Some(other) => return TokenPlan::Scripted(other),
        None => None,
    };
    let Some(form) = form else {
        return TokenPlan::Answer(oauth_error(StatusCode::BAD_REQUEST, "invalid_request"));
    };
    if parts.headers.contains_key(header::AUTHORIZATION) {
        st.basic_auth_calls += 1;
    }
    if !client_authenticated(&shared.config, parts, &form) {
        return TokenPlan::Answer(oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"));
    }
    match form.get("grant_type").map(String::as_str) {
        Some("refresh_token") => {}
        Some("authorization_code") => {
            return TokenPlan::Answer(oidc::code_grant(shared, &mut st, &form))
        }
        Some(DEVICE_CODE_GRANT) => {
            return TokenPlan::Answer(oidc::device_grant(shared, &mut st, &form))
        }
        Some(_) => {
            return TokenPlan::Answer(oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
            ))
        }
        None => return TokenPlan::Answer(oauth_error(StatusCode::BAD_REQUEST, "invalid_request")),
    }
    let Some(token) = form.get("refresh_token").cloned() else {
        return TokenPlan::Answer(oauth_error(StatusCode::BAD_REQUEST, "invalid_request"));
    };
    let Some(entry) = st.refresh_tokens.get(&token) else {
        return TokenPlan::Answer(oauth_error(StatusCode::BAD_REQUEST, "invalid_grant"));
    };
    let (grant, state) = (entry.grant, entry.state);
    if !st.grant_alive(grant) {
        return TokenPlan::Answer(oauth_error(StatusCode::BAD_REQUEST, "invalid_grant"));
    }
    match state {
        RefreshState::Rotated => {
            // Reuse of a rotated token: treat the grant as stolen.
            st.kill_grant(grant);
            TokenPlan::Answer(oauth_error(StatusCode::BAD_REQUEST, "invalid_grant"))
        }
        RefreshState::InFlight => {
            TokenPlan::Answer(oauth_error(StatusCode::BAD_REQUEST, "invalid_request"))
        }
        RefreshState::Current => {
            if let Some(e) = st.refresh_tokens.get_mut(&token) {
                e.state = RefreshState::InFlight;
            }
            TokenPlan::Refresh { token, shape }
        }
    }
}

fn finish_refresh(shared: &Shared, token: &str, with_expires_in: bool) -> Response<Full<Bytes>> {
    let rotate = shared.config.rotate_refresh_tokens;
    let mut st = shared.lock();
    let Some(entry) = st.refresh_tokens.get_mut(token) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    };
    let grant = entry.grant;
    entry.state = if rotate {
        RefreshState::Rotated
    } else {
        RefreshState::Current
    };
    // The grant may have been revoked while this call was in flight.
    if !st.grant_alive(grant) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
    }
    st.access_tokens.retain(|_, at| at.grant != grant);
    let (access, ttl) = st.issue_access_token(grant, shared.config.jwt_access_tokens);
    st.refresh_successes += 1;
    let mut body = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": ttl,
        "scope": shared.config.scope,
    });
    if rotate {
        let refresh = new_token("rt");
        st.refresh_tokens.insert(
            refresh.clone(),
            RefreshEntry {
                grant,
                state: RefreshState::Current,
            },
        );
        if let Some(g) = st.grants.get_mut(&grant) {
            g.current_refresh = refresh.clone();
        }
        body["refresh_token"] = Value::String(refresh);
    }
    if !with_expires_in || shared.config.omit_expires_in {
        if let Some(obj) = body.as_object_mut() {
            obj.remove("expires_in");
        }
    }
    json_response(StatusCode::OK, body)
}

async fn scripted_reply(failure: Failure) -> Reply {
    match failure {
        Failure::Status500 => Reply::Http(oauth_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
        )),
        Failure::TooManyRequests { retry_after_secs } => {
            let mut resp = oauth_error(StatusCode::TOO_MANY_REQUESTS, "temporarily_unavailable");
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(retry_after_secs),
            );
            Reply::Http(resp)
        }
        Failure::Hang(d) => {
            tokio::time::sleep(d).await;
            Reply::Close
        }
        Failure::CloseSocket => Reply::Close,
        Failure::MalformedJson => Reply::Http(
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from_static(
                    b"{\"access_token\": \"truncat",
                )))
                .expect("static response parts are valid"),
        ),
        Failure::InvalidGrant => Reply::Http(oauth_error(StatusCode::BAD_REQUEST, "invalid_grant")),
        Failure::InvalidClient => {
            Reply::Http(oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"))
        }
        Failure::UnauthorizedClient => {
            Reply::Http(oauth_error(StatusCode::BAD_REQUEST, "unauthorized_client"))
        }
        Failure::InvalidRequest => {
            Reply::Http(oauth_error(StatusCode::BAD_REQUEST, "invalid_request"))
        }
        Failure::TemporarilyUnavailable => Reply::Http(oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
        )),
        // Shapes of real refreshes and raw answers; handled in `plan_token_call`.
        Failure::MissingExpiresIn | Failure::LoseResponse | Failure::Raw { .. } => {
            unreachable!("shaping failures never reach scripted_reply")
        }
    }
}

async fn revocation_endpoint(shared: &Shared, req: Request<Incoming>) -> Reply {
    let scripted = {
        let mut st = shared.lock();
        st.revocation_calls += 1;
        st.revocation_status
    };
    if let Some(status) = scripted {
        let status = StatusCode::from_u16(status).expect("a valid scripted status");
        return json_reply(status, json!({ "error": "server_error" }));
    }
    let (parts, form) = read_form(req).await;
    if parts.headers.contains_key(header::AUTHORIZATION) {
        shared.lock().basic_auth_calls += 1;
    }
    let Some(form) = form else {
        return json_reply(
            StatusCode::BAD_REQUEST,
            json!({ "error": "invalid_request" }),
        );
    };
    if !client_authenticated(&shared.config, &parts, &form) {
        return Reply::Http(oauth_error(StatusCode::UNAUTHORIZED, "invalid_client"));
    }
    let Some(token) = form.get("token") else {
        return json_reply(
            StatusCode::BAD_REQUEST,
            json!({ "error": "invalid_request" }),
        );
    };
    let mut st = shared.lock();
    if let Some(grant) = st.refresh_tokens.get(token).map(|e| e.grant) {
        st.kill_grant(grant);
    } else {
        st.access_tokens.remove(token);
    }
    // RFC 7009 §2.2: 200 also for unknown or already revoked tokens.
    Reply::Http(
        Response::builder()
            .status(StatusCode::OK)
            .body(Full::new(Bytes::new()))
            .expect("static response parts are valid"),
    )
}

async fn introspection_endpoint(shared: &Shared, req: Request<Incoming>) -> Reply {
    let (_parts, form) = read_form(req).await;
    let token = form.and_then(|mut f| f.remove("token")).unwrap_or_default();
    let st = shared.lock();
    let active = st.access_token_valid(&token)
        || st
            .refresh_tokens
            .get(&token)
            .is_some_and(|e| e.state != RefreshState::Rotated && st.grant_alive(e.grant));
    let body = if active {
        json!({
            "active": true,
            "client_id": shared.config.client_id,
            "sub": shared.config.subject,
            "scope": shared.config.scope,
        })
    } else {
        json!({ "active": false })
    };
    json_reply(StatusCode::OK, body)
}

fn userinfo_endpoint(shared: &Shared, req: &Request<Incoming>) -> Reply {
    let mut st = shared.lock();
    st.userinfo_calls += 1;
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if token.is_some_and(|t| st.access_token_valid(t)) {
        json_reply(StatusCode::OK, json!({ "sub": shared.config.subject }))
    } else {
        let mut resp = json_response(
            StatusCode::UNAUTHORIZED,
            json!({ "error": "invalid_token" }),
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        Reply::Http(resp)
    }
}
