//! A tiny HTTP backend for the sidecar end-to-end tests, plus the provider
//! hooks those tests need (refresh counters, token revocation).
//!
//! The backend serves `POST /heartbeat` with a JSON body. It accepts a request
//! only when the real IdP says its bearer token is active right now (RFC 7662
//! introspection as the confidential client, or the userinfo endpoint), answers
//! 401 otherwise, and records every request with its body and answer, so a test
//! can check what each heartbeat went through.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header::AUTHORIZATION, HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::oidc_provider::{http_client, CONFIDENTIAL_CLIENT_ID, CONFIDENTIAL_CLIENT_SECRET};

/// How the backend decides whether a bearer token is good.
#[derive(Debug, Clone)]
pub enum Validator {
    /// RFC 7662 introspection with client credentials: `active` must be true.
    Introspection {
        /// The introspection endpoint.
        endpoint: String,
        /// The introspecting (confidential) client.
        client_id: String,
        /// Its secret (a fixed test value).
        client_secret: String,
    },
    /// `GET` userinfo with the token: 200 means accepted.
    Userinfo {
        /// The userinfo endpoint.
        endpoint: String,
    },
}

impl Validator {
    /// Introspection at the test provider `issuer`, as its confidential client.
    pub fn introspection(issuer: &str) -> Validator {
        Validator::Introspection {
            endpoint: format!("{issuer}/token/introspection"),
            client_id: CONFIDENTIAL_CLIENT_ID.into(),
            client_secret: CONFIDENTIAL_CLIENT_SECRET.into(),
        }
    }

    /// Userinfo (`/me`) at the test provider `issuer`.
    pub fn userinfo(issuer: &str) -> Validator {
        Validator::Userinfo {
            endpoint: format!("{issuer}/me"),
        }
    }
}

/// One request the backend answered.
#[derive(Debug, Clone)]
pub struct Hit {
    /// The JSON body (`Value::Null` if it was not JSON).
    pub body: Value,
    /// The status the backend answered.
    pub status: u16,
    /// When the answer was decided.
    pub at: Instant,
}

/// Totals over all hits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Every request.
    pub requests: u64,
    /// Answered 2xx.
    pub accepted: u64,
    /// Answered 401 (no, malformed, inactive or rejected token).
    pub unauthorized: u64,
    /// Anything else (bad body, validator unreachable).
    pub other: u64,
}

struct Shared {
    validator: Validator,
    http: reqwest::Client,
    hits: Mutex<Vec<Hit>>,
    /// The number of hits so far; lets tests wait for requests without polling.
    seen: watch::Sender<usize>,
    /// Validator requests sent again after a transport error of the harness's
    /// own (not a product failure; counted apart, see [`Backend::validator_retries`]).
    retries: std::sync::atomic::AtomicU64,
}

/// A running backend on `127.0.0.1:<random port>`; stopped on drop.
pub struct Backend {
    url: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start(validator: Validator) -> Backend {
        let (seen, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            validator,
            http: http_client(),
            hits: Mutex::new(Vec::new()),
            seen,
            retries: Default::default(),
        });
        let app = Router::new()
            .route("/heartbeat", post(heartbeat))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the backend");
        let addr = listener.local_addr().expect("backend address");
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("backend serve");
        });
        Backend {
            url: format!("http://{addr}/heartbeat"),
            shared,
            task,
        }
    }

    /// How often a validator request was sent again after a transport error
    /// (the harness's own hiccup on a loaded machine, not the broker's).
    pub fn validator_retries(&self) -> u64 {
        self.shared
            .retries
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `http://127.0.0.1:PORT/heartbeat`.
    pub fn heartbeat_url(&self) -> &str {
        &self.url
    }

    /// Every hit so far, in the order the answers were decided.
    pub fn hits(&self) -> Vec<Hit> {
        self.shared.hits.lock().unwrap().clone()
    }

    /// Totals so far.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for h in self.shared.hits.lock().unwrap().iter() {
            c.requests += 1;
            match h.status {
                200..=299 => c.accepted += 1,
                401 => c.unauthorized += 1,
                _ => c.other += 1,
            }
        }
        c
    }

    /// Waits until `done(hits)` holds, re-checking on every new hit; panics
    /// after `timeout` (a safety net, not a budget).
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&[Hit]) -> bool) {
        let mut seen = self.shared.seen.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                if done(&self.shared.hits.lock().unwrap()) {
                    return;
                }
                seen.changed().await.expect("backend alive");
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "backend condition not met within {timeout:?}; counts {:?}",
            self.counts()
        );
    }

    /// Waits until each of the sidecars `0..sidecars` (the `sidecar` member of
    /// a heartbeat's body) has a heartbeat accepted after `after`. When a push
    /// is `after`, every sidecar then holds the pushed token (the one it
    /// replaced is inactive by then under rotation), so no heartbeat still
    /// carrying the replaced token is left in flight.
    pub async fn wait_until_each_accepted_after(
        &self,
        sidecars: u64,
        after: Instant,
        timeout: Duration,
    ) {
        self.wait_until(timeout, |hits| {
            (0..sidecars).all(|id| {
                hits.iter().any(|h| {
                    h.at > after
                        && (200..300).contains(&h.status)
                        && h.body["sidecar"].as_u64() == Some(id)
                })
            })
        })
        .await;
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn heartbeat(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let status = if body.is_null() {
        StatusCode::BAD_REQUEST
    } else {
        match bearer(&headers) {
            None => StatusCode::UNAUTHORIZED,
            Some(token) => match shared.validate(token).await {
                Ok(true) => StatusCode::OK,
                Ok(false) => StatusCode::UNAUTHORIZED,
                Err(e) => {
                    eprintln!("[backend] validating a token failed: {e}");
                    StatusCode::BAD_GATEWAY
                }
            },
        }
    };
    shared.hits.lock().unwrap().push(Hit {
        body,
        status: status.as_u16(),
        at: Instant::now(),
    });
    shared.seen.send_modify(|n| *n += 1);
    status
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl Shared {
    /// Sends the request `build` makes, up to three times while the send itself
    /// fails (connect or transport error on loopback); an HTTP answer, whatever
    /// its status, is returned as is.
    async fn send_with_retries(
        &self,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> reqwest::Result<reqwest::Response> {
        let mut attempt = 1;
        loop {
            match build().send().await {
                Err(e) if attempt < 3 && (e.is_connect() || e.is_request()) => {
                    attempt += 1;
                    self.retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                other => return other,
            }
        }
    }

    /// Whether the IdP considers `token` active now. `Err` when it cannot tell.
    async fn validate(&self, token: &str) -> Result<bool, String> {
        match &self.validator {
            Validator::Introspection {
                endpoint,
                client_id,
                client_secret,
            } => {
                let resp = self
                    .send_with_retries(|| {
                        self.http
                            .post(endpoint)
                            .basic_auth(client_id, Some(client_secret))
                            .form(&[("token", token)])
                    })
                    .await
                    .map_err(|e| format!("introspection request: {e}"))?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(format!("introspection answered {status}"));
                }
                let body: Value = resp
                    .json()
                    .await
                    .map_err(|e| format!("introspection body: {e}"))?;
                Ok(body["active"].as_bool().unwrap_or(false))
            }
            Validator::Userinfo { endpoint } => {
                let resp = self
                    .send_with_retries(|| self.http.get(endpoint).bearer_auth(token))
                    .await
                    .map_err(|e| format!("userinfo request: {e}"))?;
                match resp.status().as_u16() {
                    200 => Ok(true),
                    401 => Ok(false),
                    other => Err(format!("userinfo answered {other}")),
                }
            }
        }
    }
}

/// The test provider's counters (`GET /test/stats` in `tests/idp/provider.mjs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub struct ProviderStats {
    /// `grant_type=refresh_token` requests at the token endpoint, failed ones included.
    pub refresh_token_grants: u64,
    /// Those that failed.
    pub refresh_token_grant_errors: u64,
    /// Refresh grants presenting a refresh token an earlier refresh had rotated.
    pub refresh_token_replays: u64,
    /// Old access tokens deleted by [`set_hydra_rotation`] mode.
    pub access_tokens_deleted_on_rotation: u64,
}

/// Switches the provider's Hydra mode: when on, every successful refresh
/// deletes the grant's previous access token before answering, as Ory Hydra
/// does, so requests still carrying it get 401.
pub async fn set_hydra_rotation(issuer: &str, enabled: bool) {
    let resp = http_client()
        .post(format!("{issuer}/test/hydra-rotation"))
        .form(&[("enabled", if enabled { "true" } else { "false" })])
        .send()
        .await
        .expect("POST /test/hydra-rotation");
    assert_eq!(resp.status().as_u16(), 204, "switching Hydra mode");
}

/// Reads the provider's counters; they restart at zero with the provider.
pub async fn provider_stats(issuer: &str) -> ProviderStats {
    let resp = http_client()
        .get(format!("{issuer}/test/stats"))
        .send()
        .await
        .expect("GET /test/stats");
    assert!(resp.status().is_success(), "stats: {}", resp.status());
    resp.json().await.expect("stats answer JSON")
}

/// Deletes one access token at the provider and nothing else, as Hydra deletes
/// the old access token when it rotates (test-only route
/// `POST /test/delete-access-token`). RFC 7009 revocation would not do: this
/// provider revokes every token of the grant, the refresh token included, when
/// one access token is revoked. Panics unless the token existed.
pub async fn delete_access_token(issuer: &str, token: &str) {
    let resp = http_client()
        .post(format!("{issuer}/test/delete-access-token"))
        .form(&[("token", token)])
        .send()
        .await
        .expect("POST /test/delete-access-token");
    assert_eq!(resp.status().as_u16(), 204, "deleting the access token");
}
