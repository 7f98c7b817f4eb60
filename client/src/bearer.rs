//! Tower middleware that authenticates HTTP requests with a [`TokenSource`].
//!
//! [`BearerLayer`] sets `Authorization: Bearer <token>` on every request. When
//! the server rejects the token (HTTP 401, a gRPC `grpc-status: 16` header, or a
//! Connect error body `{"code":"unauthenticated"}`), it calls
//! [`TokenSource::invalidate`] with the token it used and retries exactly once
//! with the fresh token and the *same* body. A second rejection is returned as is.
//!
//! To replay a body it must be buffered. Bodies whose size hint has an upper
//! bound of at most [`DEFAULT_MAX_REPLAY_BODY`] (configurable) are buffered;
//! larger or unbounded (streaming) bodies are sent as they come, and a rejection
//! of such a request is returned without retry (the token is still invalidated,
//! so the caller's next request gets a fresh one). Request trailers are not
//! replayed.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use tower::{Layer, Service};

use crate::{Token, TokenSource};

/// The error type of [`BearerService`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type the inner service receives and the caller gets back: a boxed
/// body. A named type (rather than an alias of `UnsyncBoxBody<Bytes, BoxError>`)
/// keeps trait-object lifetimes out of `I::Future`, which the compiler otherwise
/// fails to prove `Send` for inside async blocks.
pub struct BearerBody(UnsyncBoxBody<Bytes, BoxError>);

impl std::fmt::Debug for BearerBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerBody")
    }
}

impl Body for BearerBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// Largest request body kept in memory for a replay (1 MiB).
pub const DEFAULT_MAX_REPLAY_BODY: usize = 1 << 20;

/// Largest error body read to look for a Connect `unauthenticated` code.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Adds bearer authentication from a [`TokenSource`]; see the module docs.
pub struct BearerLayer<S> {
    source: Arc<S>,
    max_replay_body: usize,
}

impl<S> Clone for BearerLayer<S> {
    fn clone(&self) -> Self {
        BearerLayer {
            source: self.source.clone(),
            max_replay_body: self.max_replay_body,
        }
    }
}

impl<S: TokenSource> BearerLayer<S> {
    /// A layer taking tokens from `source`.
    pub fn new(source: S) -> Self {
        Self::from_arc(Arc::new(source))
    }

    /// A layer sharing an existing `Arc`'d source.
    pub fn from_arc(source: Arc<S>) -> Self {
        BearerLayer {
            source,
            max_replay_body: DEFAULT_MAX_REPLAY_BODY,
        }
    }

    /// Largest request body buffered for a retry (default 1 MiB).
    pub fn max_replay_body(mut self, bytes: usize) -> Self {
        self.max_replay_body = bytes;
        self
    }
}

impl<S, I> Layer<I> for BearerLayer<S> {
    type Service = BearerService<S, I>;

    fn layer(&self, inner: I) -> Self::Service {
        BearerService {
            source: self.source.clone(),
            inner,
            max_replay_body: self.max_replay_body,
        }
    }
}

/// The service produced by [`BearerLayer`].
pub struct BearerService<S, I> {
    source: Arc<S>,
    inner: I,
    max_replay_body: usize,
}

impl<S, I: Clone> Clone for BearerService<S, I> {
    fn clone(&self) -> Self {
        BearerService {
            source: self.source.clone(),
            inner: self.inner.clone(),
            max_replay_body: self.max_replay_body,
        }
    }
}

fn full(bytes: Bytes) -> BearerBody {
    BearerBody(
        Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync(),
    )
}

fn boxed<B>(body: B) -> BearerBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    BearerBody(body.map_err(Into::into).boxed_unsync())
}

fn authorization(token: &Token) -> Result<HeaderValue, BoxError> {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", token.access_token.expose())).map_err(
        |_| -> BoxError {
            // Never echo the token: just say it cannot be a header value.
            "access token contains characters not allowed in an HTTP header".into()
        },
    )?;
    // Keeps the value out of HPACK tables and `Debug` output of the headers.
    v.set_sensitive(true);
    Ok(v)
}

/// A request with `parts`' head, a fresh `Authorization` and `body`.
fn build(
    parts: &http::request::Parts,
    token: &Token,
    body: BearerBody,
) -> Result<Request<BearerBody>, BoxError> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    *req.extensions_mut() = parts.extensions.clone();
    req.headers_mut()
        .insert(AUTHORIZATION, authorization(token)?);
    Ok(req)
}

/// Whether `resp` rejects the token, and the response with its body intact.
async fn rejected<B>(resp: Response<B>) -> Result<(bool, Response<BearerBody>), BoxError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    if resp.status() == StatusCode::UNAUTHORIZED {
        return Ok((true, resp.map(boxed)));
    }
    if resp.headers().get("grpc-status").is_some_and(|v| v == "16") {
        return Ok((true, resp.map(boxed)));
    }
    let connect_error = !resp.status().is_success()
        && resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json"))
        && resp
            .body()
            .size_hint()
            .upper()
            .is_some_and(|n| n <= MAX_ERROR_BODY as u64);
    if !connect_error {
        return Ok((false, resp.map(boxed)));
    }
    let (parts, body) = resp.into_parts();
    let bytes = Limited::new(body, MAX_ERROR_BODY)
        .collect()
        .await?
        .to_bytes();
    #[derive(serde::Deserialize)]
    struct ConnectError {
        code: Option<String>,
    }
    let unauthenticated = serde_json::from_slice::<ConnectError>(&bytes)
        .ok()
        .and_then(|e| e.code)
        .is_some_and(|c| c == "unauthenticated");
    Ok((unauthenticated, Response::from_parts(parts, full(bytes))))
}

impl<S, I, ReqB, ResB> Service<Request<ReqB>> for BearerService<S, I>
where
    S: TokenSource + 'static,
    I: Service<Request<BearerBody>, Response = Response<ResB>> + Clone + Send + 'static,
    I::Future: Send,
    I::Error: Into<BoxError>,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<BearerBody>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // Take the service that was driven to readiness; leave a clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let source = self.source.clone();
        let max = self.max_replay_body;
        Box::pin(async move {
            let token = source.token().await?;
            let (parts, body) = req.into_parts();
            let replayable = body.size_hint().upper().is_some_and(|n| n <= max as u64);
            let (first, replay) = if replayable {
                let bytes = Limited::new(body, max).collect().await?.to_bytes();
                (full(bytes.clone()), Some(bytes))
            } else {
                (boxed(body), None)
            };
            let resp = inner
                .call(build(&parts, &token, first)?)
                .await
                .map_err(Into::into)?;
            let (reject, resp) = rejected(resp).await?;
            if !reject {
                return Ok(resp);
            }
            tracing::debug!(
                generation = token.generation,
                "token rejected by server; invalidating"
            );
            let fresh = source.invalidate(&token).await?;
            let Some(bytes) = replay else {
                // The body is gone; the caller's next request gets the fresh token.
                return Ok(resp);
            };
            drop(resp);
            futures::future::poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let resp = inner
                .call(build(&parts, &fresh, full(bytes))?)
                .await
                .map_err(Into::into)?;
            Ok(resp.map(boxed))
        })
    }
}
