//! The blocking client, driven from a plain thread against the mock broker.

use std::time::Duration;

use kontext_broker_client::blocking::BrokerClient;
use kontext_broker_protocol::{Request, Response};
use kontext_broker_testutil::mock_broker::{handler, token, Action, Mock};

#[test]
fn blocking_calls_work_without_a_runtime() {
    // The mock needs a runtime of its own, on another thread.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mock = rt.block_on(async {
        Mock::start(handler(|r| async move {
            match r {
                Request::Ping => Action::Reply(Ok(Response::Pong)),
                Request::GetToken { .. } => Action::Reply(Ok(Response::Token(token(3, 60)))),
                Request::Invalidate { generation, .. } => {
                    Action::Reply(Ok(Response::Token(token(generation + 1, 60))))
                }
                _ => Action::Silent,
            }
        }))
    });
    let c = BrokerClient::connect_to(&mock.path).unwrap();
    c.ping().unwrap();
    let t = c.get_token("default", Duration::from_secs(10)).unwrap();
    assert_eq!(t.generation, 3);
    assert_eq!(c.invalidate("default", &t).unwrap().generation, 4);
    drop(c);
    drop(mock);
}

#[test]
fn a_request_sent_with_the_handshake_is_answered() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mock = rt.block_on(async {
        Mock::start(handler(|r| async move {
            match r {
                Request::GetToken { .. } => Action::Reply(Ok(Response::Token(token(7, 60)))),
                _ => Action::Silent,
            }
        }))
    });
    let builder = kontext_broker_client::ClientBuilder::default().socket(&mock.path);
    let answer = kontext_broker_client::blocking::request_once(
        &builder,
        Request::GetToken {
            profile: "default".into(),
            min_valid_secs: 0,
        },
    )
    .unwrap();
    let Response::Token(t) = answer else {
        panic!("expected a token, got {answer:?}");
    };
    assert_eq!(t.generation, 7);
    assert_eq!(mock.hellos(), 1);
    drop(mock);
}

#[test]
fn a_missing_broker_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let err = BrokerClient::connect_to(dir.path().join("none.sock")).unwrap_err();
    assert!(
        matches!(err, kontext_broker_client::Error::BrokerNotRunning { .. }),
        "{err:?}"
    );
}
