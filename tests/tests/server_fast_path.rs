//! The connection's fast path against the real broker: a cached `GetToken` is
//! answered inline, yet one slow request never blocks another on the same
//! connection, and a connection stops reading at its in-flight cap.

use std::collections::BTreeSet;
use std::time::Duration;

use kontext_broker::server::MAX_IN_FLIGHT;
use kontext_broker_protocol::{codec, ClientMessage, Request, RequestFrame, Response};
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess};
use kontext_broker_tests::fake_idp::{FakeIdp, FakeIdpConfig};
use kontext_broker_tests::scenario::{connect, import_fake};

/// Safety net for IdP calls that must arrive; never a budget.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(30);

fn get_token() -> Request {
    Request::GetToken {
        profile: "default".into(),
        min_valid_secs: 0,
    }
}

fn refresh() -> Request {
    Request::Refresh {
        profile: "default".into(),
    }
}

async fn broker_with_profile() -> (FakeIdp, BrokerProcess, String) {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let broker = BrokerProcess::start(BrokerOptions::default());
    let client = connect(broker.socket()).await;
    import_fake(&client, "default", &idp).await;
    let token = client
        .get_token("default", Duration::ZERO)
        .await
        .expect("token");
    (idp, broker, token.access_token.expose().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_pass_a_refresh_waiting_on_the_same_connection() {
    let (idp, broker, cached) = broker_with_profile().await;
    let mut conn = broker.client().await;
    let hold = idp.hold_token_calls();
    conn.send_request(1, refresh()).await;
    tokio::time::timeout(ARRIVAL_TIMEOUT, idp.wait_for_token_calls(1))
        .await
        .expect("the refresh never reached the IdP");
    // The refresh is stuck at the IdP; these are answered anyway, in order of arrival.
    conn.send_request(2, get_token()).await;
    conn.send_request(3, Request::Ping).await;
    conn.send_request(4, get_token()).await;
    let mut seen = BTreeSet::new();
    for _ in 0..3 {
        let r = conn.recv_response().await;
        match r.id {
            2 | 4 => match r.result {
                Ok(Response::Token(t)) => assert_eq!(t.access_token.expose(), cached),
                other => panic!("expected the cached token, got {other:?}"),
            },
            3 => assert_eq!(r.result, Ok(Response::Pong)),
            other => panic!("answer {other} came while the refresh was held"),
        }
        seen.insert(r.id);
    }
    assert_eq!(seen, BTreeSet::from([2, 3, 4]));
    drop(hold);
    let r = conn.recv_response().await;
    assert_eq!(r.id, 1);
    match r.result {
        Ok(Response::Token(t)) => assert_ne!(t.access_token.expose(), cached),
        other => panic!("expected a new token, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reads_nothing_past_its_in_flight_cap() {
    let (idp, broker, _) = broker_with_profile().await;
    let mut conn = broker.client().await;
    let hold = idp.hold_token_calls();
    // The cap's worth of requests that all wait for the one held refresh, then
    // a request that can only be read once one of them has answered.
    let cap = MAX_IN_FLIGHT as u64;
    let mut bytes = Vec::new();
    for id in 1..=cap {
        bytes.extend(
            codec::encode_frame(&ClientMessage::Request(RequestFrame {
                id,
                request: refresh(),
            }))
            .unwrap(),
        );
    }
    let late = cap + 1;
    bytes.extend(
        codec::encode_frame(&ClientMessage::Request(RequestFrame {
            id: late,
            request: Request::Ping,
        }))
        .unwrap(),
    );
    conn.send_raw(&bytes).await;
    tokio::time::timeout(ARRIVAL_TIMEOUT, idp.wait_for_token_calls(1))
        .await
        .expect("the refresh never reached the IdP");
    // Another connection's round trip: the broker is running and reading.
    broker.client().await.ping(1).await;
    drop(hold);
    // Had the broker read the Ping, it would have answered it while the refresh
    // was held, ahead of every refresh. It may read it only after an answer.
    let first = conn.recv_response().await;
    assert_ne!(
        first.id, late,
        "the request past the cap was read and answered first"
    );
    let mut seen = BTreeSet::from([first.id]);
    for _ in 0..cap {
        seen.insert(conn.recv_response().await.id);
    }
    assert_eq!(seen, (1..=late).collect());
    assert_eq!(idp.token_calls(), 1, "one refresh for all waiters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_pipelined_cached_requests_are_all_answered() {
    let (_idp, broker, cached) = broker_with_profile().await;
    let (mut reader, mut writer) = broker.client().await.into_parts();
    // Enough answers to fill the socket buffers, so inline answers also queue
    // behind a pending write and the connection stops and resumes reading.
    let n = 20_000u64;
    let mut bytes = Vec::new();
    for id in 0..n {
        let request = if id % 1000 == 999 {
            Request::Ping
        } else {
            get_token()
        };
        bytes.extend(
            codec::encode_frame(&ClientMessage::Request(RequestFrame { id, request })).unwrap(),
        );
    }
    let send = tokio::spawn(async move {
        writer.write_raw(&bytes).await.expect("send");
        writer
    });
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let msg = tokio::time::timeout(Duration::from_secs(60), reader.read_message())
            .await
            .expect("answers stopped")
            .expect("read")
            .expect("open");
        let kontext_broker_protocol::ServerMessage::Response(r) = msg else {
            panic!("expected a response, got {msg:?}");
        };
        match r.result {
            Ok(Response::Token(t)) => assert_eq!(t.access_token.expose(), cached),
            Ok(Response::Pong) => assert_eq!(r.id % 1000, 999),
            other => panic!("unexpected {other:?}"),
        }
        assert!(seen.insert(r.id), "id {} answered twice", r.id);
    }
    assert_eq!(seen.len() as u64, n);
    send.await.expect("sender");
}
