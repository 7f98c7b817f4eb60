//! BearerLayer with a mock inner service and a mock TokenSource.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use kontext_broker_client::bearer::{BearerBody, BearerLayer, BoxError};
use kontext_broker_client::{Error, Result, Token, TokenSource};
use tower::{service_fn, Layer, ServiceExt};

/// Hands out generation `current`; `invalidate` bumps it and counts calls.
#[derive(Default)]
struct MockSource {
    current: AtomicU64,
    invalidated: Mutex<Vec<u64>>,
    reauth_on_invalidate: bool,
}

fn tok(generation: u64) -> Token {
    Token {
        access_token: format!("tok-{generation}").into(),
        token_type: "Bearer".into(),
        expires_at: u64::MAX / 2,
        issued_at: 0,
        generation,
        scopes: vec![],
    }
}

impl TokenSource for MockSource {
    async fn token(&self) -> Result<Token> {
        Ok(tok(self.current.load(Ordering::SeqCst)))
    }
    async fn invalidate(&self, stale: &Token) -> Result<Token> {
        self.invalidated.lock().unwrap().push(stale.generation);
        if self.reauth_on_invalidate {
            return Err(Error::ReauthRequired {
                profile: "default".into(),
                message: "log in".into(),
            });
        }
        let _ = self.current.compare_exchange(
            stale.generation,
            stale.generation + 1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        Ok(tok(self.current.load(Ordering::SeqCst)))
    }
}

/// What the inner service saw: (authorization header, body).
type Seen = Arc<Mutex<Vec<(String, Bytes)>>>;

/// An inner service that records each request and answers with `script[n]`
/// (the last entry repeats).
fn inner(
    seen: Seen,
    script: Vec<fn() -> Response<Full<Bytes>>>,
) -> impl tower::Service<
    Request<BearerBody>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    let n = Arc::new(AtomicUsize::new(0));
    service_fn(move |req: Request<BearerBody>| {
        let (seen, n, script) = (seen.clone(), n.clone(), script.clone());
        async move {
            let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
            assert!(req.headers()["authorization"].is_sensitive());
            let body = req.into_body().collect().await?.to_bytes();
            seen.lock().unwrap().push((auth, body));
            let i = n.fetch_add(1, Ordering::SeqCst).min(script.len() - 1);
            Ok::<_, BoxError>(script[i]())
        }
    })
}

fn ok() -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from_static(b"fine")))
}
fn unauthorized() -> Response<Full<Bytes>> {
    Response::builder()
        .status(401)
        .body(Full::new(Bytes::from_static(b"no")))
        .unwrap()
}
fn grpc_unauthenticated() -> Response<Full<Bytes>> {
    Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("grpc-status", "16")
        .body(Full::default())
        .unwrap()
}
fn connect_unauthenticated() -> Response<Full<Bytes>> {
    // Status 400 on purpose: detection must come from the body, not the status.
    Response::builder()
        .status(400)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"code":"unauthenticated","message":"token expired"}"#,
        )))
        .unwrap()
}
fn connect_permission_denied() -> Response<Full<Bytes>> {
    Response::builder()
        .status(403)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"code":"permission_denied"}"#,
        )))
        .unwrap()
}

const BODY: &[u8] = b"{\"heartbeat\":42}";

fn post(body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::post("http://backend.test/heartbeat")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

async fn send(
    source: Arc<MockSource>,
    script: Vec<fn() -> Response<Full<Bytes>>>,
    req: Request<Full<Bytes>>,
    max_replay: Option<usize>,
) -> (
    std::result::Result<Response<BearerBody>, BoxError>,
    Vec<(String, Bytes)>,
) {
    let seen = Seen::default();
    let mut layer = BearerLayer::from_arc(source);
    if let Some(m) = max_replay {
        layer = layer.max_replay_body(m);
    }
    let svc = layer.layer(inner(seen.clone(), script));
    let r = svc.oneshot(req).await;
    let seen = seen.lock().unwrap().clone();
    (r, seen)
}

#[tokio::test]
async fn sets_bearer_and_does_not_retry_success() {
    let src = Arc::new(MockSource::default());
    let (r, seen) = send(src.clone(), vec![ok], post(BODY), None).await;
    assert_eq!(r.unwrap().status(), StatusCode::OK);
    assert_eq!(
        seen,
        vec![("Bearer tok-0".to_owned(), Bytes::from_static(BODY))]
    );
    assert!(src.invalidated.lock().unwrap().is_empty());
}

async fn assert_one_retry_with_same_body(reject: fn() -> Response<Full<Bytes>>) {
    let src = Arc::new(MockSource::default());
    let (r, seen) = send(src.clone(), vec![reject, ok], post(BODY), None).await;
    let resp = r.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "fine");
    assert_eq!(
        seen,
        vec![
            ("Bearer tok-0".to_owned(), Bytes::from_static(BODY)),
            ("Bearer tok-1".to_owned(), Bytes::from_static(BODY)),
        ],
        "retried once, with the fresh token and the identical, non-empty body"
    );
    assert_eq!(*src.invalidated.lock().unwrap(), vec![0]);
}

#[tokio::test]
async fn http_401_retries_once_with_same_body() {
    assert_one_retry_with_same_body(unauthorized).await;
}

#[tokio::test]
async fn grpc_status_16_retries_once() {
    assert_one_retry_with_same_body(grpc_unauthenticated).await;
}

#[tokio::test]
async fn connect_unauthenticated_body_retries_once() {
    assert_one_retry_with_same_body(connect_unauthenticated).await;
}

#[tokio::test]
async fn second_401_is_returned_as_is() {
    let src = Arc::new(MockSource::default());
    let (r, seen) = send(src.clone(), vec![unauthorized], post(BODY), None).await;
    let resp = r.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "no");
    assert_eq!(seen.len(), 2, "exactly one retry");
    assert_eq!(*src.invalidated.lock().unwrap(), vec![0]);
}

#[tokio::test]
async fn other_connect_errors_pass_through_with_their_body() {
    let src = Arc::new(MockSource::default());
    let (r, seen) = send(
        src.clone(),
        vec![connect_permission_denied],
        post(BODY),
        None,
    )
    .await;
    let resp = r.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        r#"{"code":"permission_denied"}"#
    );
    assert_eq!(seen.len(), 1);
    assert!(src.invalidated.lock().unwrap().is_empty());
}

#[tokio::test]
async fn body_over_the_cap_is_sent_but_not_retried() {
    let src = Arc::new(MockSource::default());
    let (r, seen) = send(src.clone(), vec![unauthorized, ok], post(BODY), Some(4)).await;
    assert_eq!(r.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        seen,
        vec![("Bearer tok-0".to_owned(), Bytes::from_static(BODY))]
    );
    // Still invalidated, so the next request carries a fresh token.
    assert_eq!(*src.invalidated.lock().unwrap(), vec![0]);
}

#[tokio::test]
async fn reauth_during_retry_is_an_error_not_a_loop() {
    let src = Arc::new(MockSource {
        reauth_on_invalidate: true,
        ..Default::default()
    });
    let (r, seen) = send(src.clone(), vec![unauthorized], post(BODY), None).await;
    let err = r.unwrap_err();
    let err = err.downcast_ref::<Error>().expect("client error");
    assert!(matches!(err, Error::ReauthRequired { .. }));
    assert_eq!(seen.len(), 1);
}
