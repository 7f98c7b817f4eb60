//! BrokerTokenSource against the in-test mock broker.

use std::time::Duration;

use kontext_broker_client::{BrokerTokenSource, Error, TokenSource};
use kontext_broker_protocol::{BrokerError, Request, Response, Token, WatchEvent};
use kontext_broker_testutil::mock_broker::{handler, token, Action, Handler, Mock};

/// Safety net only: every wait below ends on a real event.
const NET: Duration = Duration::from_secs(10);

fn push_token(generation: u64, lifetime: u64) -> WatchEvent {
    WatchEvent::Token {
        profile: "default".into(),
        token: token(generation, lifetime),
    }
}

fn is_get(r: &Request) -> bool {
    matches!(r, Request::GetToken { .. })
}

/// Answers GetToken and Invalidate with `generation`.
fn serving(generation: u64) -> Handler {
    handler(move |r| async move {
        match r {
            Request::GetToken { .. } => Action::Reply(Ok(Response::Token(token(generation, 3600)))),
            Request::Invalidate { .. } => {
                Action::Reply(Ok(Response::Token(token(generation, 3600))))
            }
            _ => Action::Reply(Ok(Response::Pong)),
        }
    })
}

fn source(mock: &Mock) -> BrokerTokenSource {
    BrokerTokenSource::builder().socket(&mock.path).build()
}

/// Waits until `cond` holds for the source, woken by each cache change.
async fn until(src: &BrokerTokenSource, cond: impl Fn(&BrokerTokenSource) -> bool) {
    let mut rx = src.updates();
    tokio::time::timeout(NET, rx.wait_for(|_| cond(src)))
        .await
        .expect("condition not reached")
        .unwrap();
}

#[tokio::test]
async fn fresh_token_is_served_without_ipc_and_swapped_on_push() {
    let mock = Mock::start(serving(99));
    mock.set_initial(vec![push_token(1, 3600)]);
    let src = source(&mock);
    until(&src, |s| s.cached_generation() == Some(1)).await;
    let before = mock.requests().len();
    for _ in 0..1000 {
        assert_eq!(src.token().await.unwrap().generation, 1);
    }
    assert_eq!(
        mock.requests().len(),
        before,
        "no request reached the broker"
    );
    assert_eq!(mock.count(is_get), 0);

    assert_eq!(mock.push(push_token(2, 3600)), 1);
    until(&src, |s| s.cached_generation() == Some(2)).await;
    let t = src.token().await.unwrap();
    assert_eq!((t.generation, t.access_token.expose()), (2, "at-2"));
    assert_eq!(mock.count(is_get), 0);
}

#[tokio::test]
async fn stale_cache_falls_back_to_get_token_once() {
    let mock = Mock::start(serving(5));
    // Valid for 1 more second of a 101 s lifetime: inside the 10 s margin.
    let mut stale = token(1, 1);
    stale.issued_at -= 100;
    mock.set_initial(vec![WatchEvent::Token {
        profile: "default".into(),
        token: stale,
    }]);
    let src = source(&mock);
    until(&src, |s| s.cached_generation() == Some(1)).await;
    assert_eq!(src.token().await.unwrap().generation, 5);
    assert_eq!(src.token().await.unwrap().generation, 5);
    assert_eq!(mock.count(is_get), 1, "the fallback answer is cached");
    // It asked for exactly the source's own margin (10 s of a 101 s lifetime),
    // so the broker refreshes when the source would, no sooner and no later.
    let asked: Vec<u64> = mock
        .requests()
        .iter()
        .filter_map(|r| match r {
            Request::GetToken { min_valid_secs, .. } => Some(*min_valid_secs),
            _ => None,
        })
        .collect();
    assert_eq!(asked, [11]);
}

#[tokio::test]
async fn reauth_pushed_is_sticky_until_a_new_token() {
    let mock = Mock::start(serving(7));
    mock.set_initial(vec![WatchEvent::ReauthRequired {
        profile: "default".into(),
        message: "Session expired, run `kontext login` to re-authenticate".into(),
    }]);
    let src = source(&mock);
    let mut rx = src.updates();
    tokio::time::timeout(NET, rx.wait_for(|n| *n >= 1))
        .await
        .unwrap()
        .unwrap();
    for _ in 0..10 {
        let err = src.token().await.unwrap_err();
        assert!(
            matches!(err, Error::ReauthRequired { ref message, .. } if message.contains("kontext login")),
            "{err:?}"
        );
    }
    assert_eq!(mock.count(is_get), 0, "sticky reauth costs no IPC");
    mock.push(push_token(8, 3600));
    until(&src, |s| s.cached_generation() == Some(8)).await;
    assert_eq!(src.token().await.unwrap().generation, 8);
}

fn client_rejected() -> WatchEvent {
    WatchEvent::ClientRejected {
        profile: "default".into(),
        message: "the identity provider rejected client `cli`; run `broker-ctl client`".into(),
    }
}

#[tokio::test]
async fn a_rejected_client_keeps_serving_the_valid_token_without_ipc() {
    let mock = Mock::start(serving(7));
    mock.set_initial(vec![push_token(1, 3600), client_rejected()]);
    let src = source(&mock);
    let mut rx = src.updates();
    tokio::time::timeout(NET, rx.wait_for(|n| *n >= 2))
        .await
        .unwrap()
        .unwrap();
    for _ in 0..10 {
        assert_eq!(src.token().await.unwrap().generation, 1);
    }
    assert_eq!(mock.count(is_get), 0);
}

#[tokio::test]
async fn a_rejected_client_without_a_valid_token_is_an_error_until_a_new_token() {
    let mock = Mock::start(serving(7));
    // A token that has already expired, then the rejection.
    mock.set_initial(vec![push_token(1, 0), client_rejected()]);
    let src = source(&mock);
    let mut rx = src.updates();
    tokio::time::timeout(NET, rx.wait_for(|n| *n >= 2))
        .await
        .unwrap()
        .unwrap();
    for _ in 0..10 {
        let err = src.token().await.unwrap_err();
        assert!(
            matches!(err, Error::ClientRejected { ref message, .. } if message.contains("broker-ctl client")),
            "{err:?}"
        );
    }
    assert_eq!(
        mock.count(is_get),
        0,
        "the rejection is sticky and costs no IPC"
    );
    // `broker-ctl client` fixed it: the broker pushes the new token.
    mock.push(push_token(2, 3600));
    until(&src, |s| s.cached_generation() == Some(2)).await;
    assert_eq!(src.token().await.unwrap().generation, 2);
}

#[tokio::test]
async fn reauth_from_get_token_is_sticky_too() {
    let mock = Mock::start(handler(|r| async move {
        match r {
            Request::GetToken { profile, .. } => Action::Reply(Err(BrokerError::ReauthRequired {
                profile,
                message: "log in again".into(),
            })),
            _ => Action::Silent,
        }
    }));
    let src = source(&mock);
    for _ in 0..5 {
        assert!(matches!(
            src.token().await,
            Err(Error::ReauthRequired { .. })
        ));
    }
    assert_eq!(mock.count(is_get), 1);
}

#[tokio::test]
async fn reconnects_and_resubscribes_after_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.sock");
    let mock = Mock::start_at(
        &path,
        serving(99),
        Some(kontext_broker_protocol::PROTOCOL_VERSION),
    );
    mock.set_initial(vec![push_token(1, 3600)]);
    let src = BrokerTokenSource::builder().socket(&path).build();
    until(&src, |s| s.cached_generation() == Some(1)).await;

    let path = mock.stop();
    // The cached token stays usable while the broker is away.
    assert_eq!(src.token().await.unwrap().generation, 1);
    let mock2 = Mock::start_at(
        &path,
        serving(99),
        Some(kontext_broker_protocol::PROTOCOL_VERSION),
    );
    mock2.set_initial(vec![push_token(2, 3600)]);
    until(&src, |s| s.cached_generation() == Some(2)).await;
    assert_eq!(src.token().await.unwrap().generation, 2);
    assert_eq!(mock2.watchers(), 1, "re-subscribed on the new broker");
    assert_eq!(mock2.count(is_get), 0);
}

#[tokio::test]
async fn falls_back_to_get_token_while_watch_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.sock");
    // No broker yet: the first call fails clearly.
    let src = BrokerTokenSource::builder().socket(&path).build();
    assert!(matches!(
        src.token().await,
        Err(Error::BrokerNotRunning { .. })
    ));
    // The broker appears with no token to push: GetToken answers.
    let mock = Mock::start_at(
        &path,
        serving(3),
        Some(kontext_broker_protocol::PROTOCOL_VERSION),
    );
    assert_eq!(src.token().await.unwrap().generation, 3);
    assert_eq!(mock.count(is_get), 1);
}

#[tokio::test]
async fn invalidate_sends_stale_generation_and_caches_the_answer() {
    let mock = Mock::start(serving(2));
    mock.set_initial(vec![push_token(1, 3600)]);
    let src = source(&mock);
    until(&src, |s| s.cached_generation() == Some(1)).await;
    let t1: Token = src.token().await.unwrap();
    let t2 = src.invalidate(&t1).await.unwrap();
    assert_eq!(t2.generation, 2);
    assert_eq!(
        mock.count(|r| matches!(r, Request::Invalidate { generation: 1, .. })),
        1
    );
    assert_eq!(src.token().await.unwrap().generation, 2);
    assert_eq!(mock.count(is_get), 0);
}

#[tokio::test]
async fn shared_across_tasks() {
    let mock = Mock::start(serving(99));
    mock.set_initial(vec![push_token(4, 3600)]);
    let src = source(&mock);
    until(&src, |s| s.cached_generation() == Some(4)).await;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let s = src.clone();
            tokio::spawn(async move { s.token().await.map(|t| t.generation) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 4);
    }
    assert_eq!(mock.count(is_get), 0);
}
