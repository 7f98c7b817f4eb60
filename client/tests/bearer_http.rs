//! End to end over real HTTP: hyper client + BearerLayer + BrokerTokenSource
//! against the mock broker and a hyper backend that accepts only the newest token.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kontext_broker_client::bearer::{BearerBody, BearerLayer};
use kontext_broker_client::BrokerTokenSource;
use kontext_broker_protocol::{Request, Response, WatchEvent};
use kontext_broker_testutil::mock_broker::{handler, token, Action, Mock};
use tower::{Layer, ServiceExt};

const NET: Duration = Duration::from_secs(10);

/// A backend accepting only `Bearer at-{accepted}`; records (auth, body).
async fn backend(accepted: u64, seen: Arc<Mutex<Vec<(String, Bytes)>>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let auth = req
                                .headers()
                                .get("authorization")
                                .map(|v| v.to_str().unwrap().to_owned())
                                .unwrap_or_default();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            seen.lock().unwrap().push((auth.clone(), body));
                            let status = if auth == format!("Bearer at-{accepted}") {
                                200
                            } else {
                                401
                            };
                            Ok::<_, Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(b"ok")))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}/heartbeat")
}

#[tokio::test]
async fn rejected_token_is_invalidated_and_the_post_replayed_over_http() {
    // The broker's cached token is generation 1; the backend already wants 2.
    let mock = Mock::start(handler(|r| async move {
        match r {
            Request::Invalidate { generation: 1, .. } => {
                Action::Reply(Ok(Response::Token(token(2, 3600))))
            }
            _ => Action::Silent,
        }
    }));
    mock.set_initial(vec![WatchEvent::Token {
        profile: "default".into(),
        token: token(1, 3600),
    }]);
    let source = BrokerTokenSource::builder().socket(&mock.path).build();
    let mut updates = source.updates();
    tokio::time::timeout(
        NET,
        updates.wait_for(|_| source.cached_generation() == Some(1)),
    )
    .await
    .unwrap()
    .unwrap();

    let seen = Arc::default();
    let url = backend(2, Arc::clone(&seen)).await;
    let http = Client::builder(TokioExecutor::new()).build_http::<BearerBody>();
    let svc = BearerLayer::new(source.clone()).layer(http);

    let body = Bytes::from(vec![b'x'; 200_000]);
    let req = http::Request::post(&url)
        .body(Full::new(body.clone()))
        .unwrap();
    let resp = tokio::time::timeout(NET, svc.clone().oneshot(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].0, "Bearer at-1");
        assert_eq!(seen[1].0, "Bearer at-2");
        assert_eq!(seen[0].1, body);
        assert_eq!(seen[1].1, body, "the retry carries the same 200 kB body");
    }

    // The next heartbeat uses generation 2 straight from the cache.
    let req = http::Request::post(&url)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let resp = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(seen.lock().unwrap().len(), 3);
    assert_eq!(mock.count(|r| matches!(r, Request::Invalidate { .. })), 1);
    assert_eq!(mock.count(|r| matches!(r, Request::GetToken { .. })), 0);
}
