//! Malformed and hostile input against the real broker (contract §3): each bad
//! connection gets its specified treatment while a well-behaved client on
//! another connection keeps being served.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kontext_broker_protocol::{
    codec, BrokerError, ClientMessage, Hello, Request, RequestFrame, Response, ServerMessage,
    MAX_FRAME_LEN, PROTOCOL_VERSION, STALL_TIMEOUT,
};
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess, RawClient};
use tokio::sync::Mutex;

/// The broker's write timeout (`kontext_broker::server::WRITE_TIMEOUT`).
const WRITE_TIMEOUT: Duration = kontext_broker::server::WRITE_TIMEOUT;

/// Safety net for closes that should be immediate.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A frame with `payload` and a correct length prefix.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn is_bad_request(msg: &Option<ServerMessage>) -> bool {
    matches!(
        msg,
        Some(ServerMessage::Error(BrokerError::BadRequest { .. }))
    )
}

/// The well-behaved client, shared by the concurrent checks.
struct Good {
    client: Mutex<RawClient>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Good {
    async fn ping(&self) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.client.lock().await.ping(id).await;
    }
}

/// Sends `bytes` on a fresh connection (after a handshake when `greet`), pings
/// the good client meanwhile, then expects `BadRequest` and a close.
async fn expect_bad_request(broker: &BrokerProcess, good: &Good, greet: bool, bytes: &[u8]) {
    let mut bad = if greet {
        broker.client().await
    } else {
        RawClient::connect_raw(broker.socket()).await
    };
    bad.send_raw(bytes).await;
    good.ping().await;
    let answer = bad.recv().await;
    assert!(
        is_bad_request(&answer),
        "expected BadRequest, got {answer:?}"
    );
    bad.expect_closed(CLOSE_TIMEOUT).await;
    good.ping().await;
}

async fn expect_version_mismatch(broker: &BrokerProcess, good: &Good, payload: &[u8], client: u32) {
    let mut bad = RawClient::connect_raw(broker.socket()).await;
    bad.send_raw(&frame(payload)).await;
    good.ping().await;
    assert_eq!(
        bad.recv().await,
        Some(ServerMessage::Error(BrokerError::VersionMismatch {
            broker: PROTOCOL_VERSION,
            client,
        }))
    );
    bad.expect_closed(CLOSE_TIMEOUT).await;
    good.ping().await;
}

/// A partial frame that stops arriving: closed without a byte after the stall timeout.
async fn expect_stall_close(broker: &BrokerProcess, good: &Good, greet: bool) {
    let mut bad = if greet {
        broker.client().await
    } else {
        RawClient::connect_raw(broker.socket()).await
    };
    let started = Instant::now();
    // Announces 100 bytes, sends 10.
    let mut half = 100u32.to_be_bytes().to_vec();
    half.extend_from_slice(&[0u8; 10]);
    bad.send_raw(&half).await;
    // Served normally while the stall is pending.
    good.ping().await;
    bad.expect_closed(STALL_TIMEOUT * 3).await;
    let waited = started.elapsed();
    println!("stalled connection (greeted: {greet}) closed after {waited:?}");
    assert!(
        waited >= STALL_TIMEOUT - Duration::from_millis(500),
        "closed after {waited:?}, before the stall timeout"
    );
    good.ping().await;
}

/// A peer that sends requests but never reads its answers: once the socket
/// buffers fill, the broker's write times out and it closes the connection.
async fn expect_slow_reader_closed(broker: &BrokerProcess, good: &Good) {
    let client = broker.client().await;
    let (_read_half_unused, mut writer) = client.into_parts();
    let batch: Vec<u8> = (0..256u64)
        .flat_map(|id| {
            codec::encode_frame(&ClientMessage::Request(RequestFrame {
                id,
                request: Request::Ping,
            }))
            .unwrap()
        })
        .collect();
    let started = Instant::now();
    let flood = async {
        // Our writes block once the broker stops reading; they fail once it closes.
        loop {
            if writer.write_raw(&batch).await.is_err() {
                return started.elapsed();
            }
        }
    };
    let waited = tokio::time::timeout(WRITE_TIMEOUT * 4, flood)
        .await
        .expect("a peer that never reads was not disconnected");
    println!("non-reading peer disconnected after {waited:?}");
    assert!(
        waited >= WRITE_TIMEOUT - Duration::from_millis(500),
        "disconnected after {waited:?}, before the write timeout"
    );
    good.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_and_closed_while_others_are_served() {
    let mut broker = BrokerProcess::start(BrokerOptions::default());
    let good = Arc::new(Good {
        client: Mutex::new(broker.client().await),
        next_id: 1.into(),
    });
    let b = &broker;
    let g = &*good;

    let request_first = frame(
        &codec::encode(&ClientMessage::Request(RequestFrame {
            id: 1,
            request: Request::Ping,
        }))
        .unwrap(),
    );
    let empty_frame = frame(&[]);
    let mut future_hello = 0u32.to_le_bytes().to_vec();
    future_hello.extend_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
    future_hello.extend_from_slice(b"fields a later Hello may have");
    let old_hello = codec::encode(&ClientMessage::Hello(Hello {
        protocol_version: 99,
        client_name: "old".into(),
        client_version: "0".into(),
    }))
    .unwrap();
    let oversized = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
    let garbage_frame = frame(b"\xde\xad\xbe\xef garbage");
    let second_hello =
        frame(&codec::encode(&kontext_broker_tests::broker_process::hello()).unwrap());

    tokio::join!(
        // Before the handshake.
        expect_bad_request(b, g, false, &garbage_frame),
        expect_bad_request(b, g, false, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        expect_bad_request(b, g, false, &oversized),
        expect_bad_request(b, g, false, &request_first),
        expect_bad_request(b, g, false, &empty_frame),
        expect_version_mismatch(b, g, &old_hello, 99),
        expect_version_mismatch(b, g, &future_hello, PROTOCOL_VERSION + 1),
        // After the handshake.
        expect_bad_request(b, g, true, &garbage_frame),
        expect_bad_request(b, g, true, &oversized),
        expect_bad_request(b, g, true, &[0xff; 4]),
        expect_bad_request(b, g, true, &second_hello),
        expect_stall_close(b, g, false),
        expect_stall_close(b, g, true),
        expect_slow_reader_closed(b, g),
    );

    // Still the same process, still serving, and no connection leaked.
    good.ping().await;
    assert!(broker.try_exit().is_none(), "broker exited");
    let status = good.client.lock().await.status(1000).await;
    assert_eq!(status.broker.connections, 1, "only the good client is open");
}

#[tokio::test]
async fn many_requests_in_flight_on_one_connection() {
    let broker = BrokerProcess::start(BrokerOptions::default());
    let mut client = broker.client().await;
    // More than the per-connection in-flight cap, all written before reading.
    let n = 200u64;
    let request = |id: u64| match id % 3 {
        0 => Request::Ping,
        1 => Request::Status,
        _ => Request::GetToken {
            profile: "nobody".into(),
            min_valid_secs: 0,
        },
    };
    let mut bytes = Vec::new();
    for id in 0..n {
        let msg = ClientMessage::Request(RequestFrame {
            id: 10_000 + id,
            request: request(id),
        });
        bytes.extend_from_slice(&codec::encode_frame(&msg).unwrap());
    }
    client.send_raw(&bytes).await;
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let r = client.recv_response().await;
        let id = r.id - 10_000;
        assert!(seen.insert(id), "id {} answered twice", r.id);
        match request(id) {
            Request::Ping => assert_eq!(r.result, Ok(Response::Pong)),
            Request::Status => assert!(matches!(r.result, Ok(Response::Status(_)))),
            // Whatever the service says about an unknown profile, it is an error.
            _ => assert!(r.result.is_err(), "{:?}", r.result),
        }
    }
    assert_eq!(seen, (0..n).collect());
    client.ping(1).await;
}

#[tokio::test]
async fn connections_past_the_cap_wait_instead_of_failing() {
    let broker = BrokerProcess::start(BrokerOptions {
        config_toml: "max_connections = 2\n".into(),
        ..Default::default()
    });
    let mut first = broker.client().await;
    let mut second = broker.client().await;
    // The third connect succeeds (kernel backlog) but is not served yet.
    let mut third = RawClient::connect_raw(broker.socket()).await;
    third
        .send(&kontext_broker_tests::broker_process::hello())
        .await;
    // The broker is alive and has processed later input on other connections...
    let status = second.status(1).await;
    assert_eq!(status.broker.connections, 2);
    first.ping(2).await;
    // ...and still has not answered the third.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), third.recv())
            .await
            .is_err(),
        "third connection served past the cap"
    );
    // A slot frees up: the waiting client is served.
    drop(first);
    match third.recv().await {
        Some(ServerMessage::Welcome(_)) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    third.ping(3).await;
}
