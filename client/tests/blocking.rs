//! The blocking client, driven from a plain thread against the mock broker.

mod common;

use std::time::Duration;

use common::{handler, token, Action, Mock};
use kontext_broker_client::blocking::BrokerClient;
use kontext_broker_protocol::{Request, Response};

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
