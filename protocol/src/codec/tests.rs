use std::time::Duration;

use proptest::prelude::*;
use tokio::io::AsyncWriteExt;

use super::*;
use crate::message::*;
use crate::{BrokerError, Secret};

fn token() -> Token {
    Token {
        access_token: Secret::from("at"),
        token_type: "Bearer".into(),
        expires_at: 1_700_000_600,
        issued_at: 1_700_000_000,
        generation: 3,
        scopes: vec!["openid".into()],
    }
}

fn profile_status() -> ProfileStatus {
    ProfileStatus {
        name: "p".into(),
        issuer: "https://i".into(),
        client_id: "c".into(),
        subject: Some("s".into()),
        state: ProfileState::Valid,
        access_token_expires_at: Some(9),
        generation: 1,
        refresh_count: 2,
        refresh_failures: 0,
        last_refresh_at: None,
        next_refresh_at: Some(8),
        last_error: None,
        lifetime_source: Some(LifetimeSource::JwtExp),
    }
}

fn req(id: u64, request: Request) -> ClientMessage {
    ClientMessage::Request(RequestFrame { id, request })
}

fn resp(id: u64, result: Result<Response, BrokerError>) -> ServerMessage {
    ServerMessage::Response(ResponseFrame { id, result })
}

/// One sample of every message kind, with its pinned encoding in hex.
/// A change here is a wire-format change: bump PROTOCOL_VERSION and update WIRE.md.
fn client_golden() -> Vec<(ClientMessage, &'static str)> {
    let p = || "p".to_string();
    vec![
        (
            ClientMessage::Hello(Hello {
                protocol_version: 1,
                client_name: "c".into(),
                client_version: "1".into(),
            }),
            "0000000001000000010000000000000063010000000000000031"
        ),
        (req(1, Request::GetToken { profile: p(), min_valid_secs: 60 }), "010000000100000000000000000000000100000000000000703c00000000000000"),
        (req(2, Request::Invalidate { profile: p(), generation: 3 }), "010000000200000000000000010000000100000000000000700300000000000000"),
        (req(3, Request::Watch { profile: p() }), "01000000030000000000000002000000010000000000000070"),
        (req(4, Request::Status), "01000000040000000000000003000000"),
        (
            req(
                5,
                Request::Import(ImportRequest {
                    profile: p(),
                    issuer: "https://i".into(),
                    client_id: "c".into(),
                    credential: ClientCredential::Secret(Secret::from("s")),
                    client_auth: Some(ClientAuthMethod::ClientSecretPost),
                    scopes: vec!["openid".into()],
                    endpoints: EndpointOverrides {
                        token: None,
                        revocation: Some("r".into()),
                        device_authorization: None,
                    },
                    token_response: Secret::from("{}"),
                }),
            ),
            "01000000050000000000000004000000010000000000000070090000000000000068747470733a2f2f69010000000000000063010000000100000000000000730102000000010000000000000006000000000000006f70656e696400010100000000000000720002000000000000007b7d",
        ),
        (req(6, Request::Logout { profile: p(), revoke: true }), "0100000006000000000000000500000001000000000000007001"),
        (req(7, Request::Refresh { profile: p() }), "01000000070000000000000006000000010000000000000070"),
        (req(8, Request::Unlock { passphrase: Secret::from("pw") }), "0100000008000000000000000700000002000000000000007077"),
        (req(9, Request::Lock), "01000000090000000000000008000000"),
        (req(10, Request::Shutdown), "010000000a0000000000000009000000"),
        (req(11, Request::Ping), "010000000b000000000000000a000000"),
        (
            req(
                12,
                Request::SetClient(SetClientRequest {
                    profile: p(),
                    credential: ClientCredential::PrivateKey(Secret::from("k")),
                    client_auth: None,
                }),
            ),
            "010000000c000000000000000b0000000100000000000000700200000001000000000000006b00",
        ),
        (req(13, Request::StatusPage { after: p() }), "010000000d000000000000000c000000010000000000000070"),
    ]
}

fn server_golden() -> Vec<(ServerMessage, &'static str)> {
    let p = || "p".to_string();
    vec![
        (
            ServerMessage::Welcome(Welcome {
                protocol_version: 1,
                broker_version: "0".into(),
                pid: 7,
            }),
            "000000000100000001000000000000003007000000",
        ),
        (resp(1, Ok(Response::Token(token()))), "010000000100000000000000000000000000000002000000000000006174060000000000000042656172657258f353650000000000f15365000000000300000000000000010000000000000006000000000000006f70656e6964"),
        (resp(2, Ok(Response::Watching)), "0100000002000000000000000000000001000000"),
        (
            resp(
                3,
                Ok(Response::Status(StatusReport {
                    broker: BrokerStatus {
                        version: "0".into(),
                        pid: 7,
                        uptime_secs: 5,
                        socket: "/s".into(),
                        state_dir: "/d".into(),
                        locked: false,
                        connections: 1,
                        rejected_peers: 0,
                        handshake_timeouts: 2,
                    },
                    profiles: vec![profile_status()],
                    next_after: Some("p".into()),
                })),
            ),
            "010000000300000000000000000000000200000001000000000000003007000000050000000000000002000000000000002f7302000000000000002f64000100000000000000000000000000000002000000000000000100000000000000010000000000000070090000000000000068747470733a2f2f6901000000000000006301010000000000000073000000000109000000000000000100000000000000020000000000000000000000000000000001080000000000000000010100000001010000000000000070",
        ),
        (resp(4, Ok(Response::Imported(profile_status()))), "0100000004000000000000000000000003000000010000000000000070090000000000000068747470733a2f2f69010000000000000063010100000000000000730000000001090000000000000001000000000000000200000000000000000000000000000000010800000000000000000101000000"),
        (
            resp(5, Ok(Response::LoggedOut { revoked: false, revoke_error: Some("x".into()) })),
            "01000000050000000000000000000000040000000001010000000000000078",
        ),
        (resp(6, Ok(Response::Done)), "0100000006000000000000000000000005000000"),
        (resp(7, Ok(Response::Pong)), "0100000007000000000000000000000006000000"),
        (
            resp(8, Err(BrokerError::ReauthRequired { profile: p(), message: "m".into() })),
            "010000000800000000000000010000000000000001000000000000007001000000000000006d",
        ),
        (resp(9, Err(BrokerError::UnknownProfile { profile: p() })), "0100000009000000000000000100000001000000010000000000000070"),
        (
            resp(10, Err(BrokerError::IdpUnavailable { retry_after_secs: 4, detail: "d".into() })),
            "010000000a0000000000000001000000020000000400000000000000010000000000000064",
        ),
        (resp(11, Err(BrokerError::Locked)), "010000000b000000000000000100000003000000"),
        (resp(12, Err(BrokerError::bad_request("b"))), "010000000c000000000000000100000004000000010000000000000062"),
        (
            ServerMessage::Error(BrokerError::VersionMismatch { broker: 1, client: 2 }),
            "03000000050000000100000002000000",
        ),
        (resp(13, Err(BrokerError::internal("i"))), "010000000d000000000000000100000006000000010000000000000069"),
        (ServerMessage::Event { id: 3, event: WatchEvent::Token { profile: p(), token: token() } }, "0200000003000000000000000000000001000000000000007002000000000000006174060000000000000042656172657258f353650000000000f15365000000000300000000000000010000000000000006000000000000006f70656e6964"),
        (
            ServerMessage::Event {
                id: 3,
                event: WatchEvent::State {
                    profile: p(),
                    state: ProfileState::Backoff,
                    generation: 3,
                    expires_at: None,
                },
            },
            "0200000003000000000000000100000001000000000000007002000000030000000000000000",
        ),
        (
            ServerMessage::Event {
                id: 3,
                event: WatchEvent::ReauthRequired { profile: p(), message: "m".into() },
            },
            "0200000003000000000000000200000001000000000000007001000000000000006d",
        ),
        (ServerMessage::Event { id: 3, event: WatchEvent::Removed { profile: p() } }, "02000000030000000000000003000000010000000000000070"),
        (
            resp(14, Err(BrokerError::ClientRejected { profile: p(), message: "m".into() })),
            "010000000e00000000000000010000000700000001000000000000007001000000000000006d",
        ),
        (
            ServerMessage::Event {
                id: 3,
                event: WatchEvent::ClientRejected { profile: p(), message: "m".into() },
            },
            "0200000003000000000000000400000001000000000000007001000000000000006d",
        ),
    ]
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_golden<T>(cases: Vec<(T, &'static str)>)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut failures = Vec::new();
    for (msg, want) in cases {
        let got = to_hex(&encode(&msg).unwrap());
        if got != want {
            failures.push(format!("{msg:?}\n    got  {got}\n    want {want}"));
        }
        let back: T = decode(&encode(&msg).unwrap()).unwrap();
        assert_eq!(back, msg);
    }
    assert!(
        failures.is_empty(),
        "wire bytes changed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn golden_client_messages() {
    check_golden(client_golden());
}

#[test]
fn golden_server_messages() {
    check_golden(server_golden());
}

#[test]
fn hello_version_is_readable_from_any_hello() {
    let hello = encode(&ClientMessage::Hello(Hello {
        protocol_version: 99,
        client_name: "future".into(),
        client_version: "9".into(),
    }))
    .unwrap();
    assert_eq!(peek_hello_version(&hello), Some(99));
    // A future Hello with extra fields still yields its version.
    let mut longer = hello.clone();
    longer.extend_from_slice(&[1, 2, 3]);
    assert_eq!(peek_hello_version(&longer), Some(99));
    let request = encode(&req(1, Request::Ping)).unwrap();
    assert_eq!(peek_hello_version(&request), None);
    assert_eq!(peek_hello_version(&[0, 0]), None);
}

#[test]
fn trailing_bytes_and_unknown_variants_are_rejected() {
    let mut ping = encode(&req(1, Request::Ping)).unwrap();
    ping.push(0);
    assert!(matches!(
        decode::<ClientMessage>(&ping),
        Err(Error::Decode(_))
    ));
    let unknown = encode(&req(1, Request::Ping)).unwrap();
    let mut unknown = unknown;
    unknown[12] = 200; // request variant index
    assert!(matches!(
        decode::<ClientMessage>(&unknown),
        Err(Error::Decode(_))
    ));
}

#[test]
fn huge_announced_lengths_do_not_allocate() {
    // A string length of u64::MAX inside a small frame must fail, not allocate.
    let mut bytes = encode(&req(
        1,
        Request::Watch {
            profile: "p".into(),
        },
    ))
    .unwrap();
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(decode::<ClientMessage>(&bytes).is_err());
}

#[test]
fn encoding_over_the_frame_cap_fails() {
    let msg = req(
        1,
        Request::Watch {
            profile: "x".repeat(MAX_FRAME_LEN),
        },
    );
    assert!(matches!(encode(&msg), Err(Error::Encode(_))));
}

fn arb_string() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn arb_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (arb_string(), any::<u64>()).prop_map(|(profile, min_valid_secs)| Request::GetToken {
            profile,
            min_valid_secs
        }),
        (arb_string(), any::<u64>()).prop_map(|(profile, generation)| Request::Invalidate {
            profile,
            generation
        }),
        arb_string().prop_map(|profile| Request::Watch { profile }),
        (
            arb_string(),
            arb_string(),
            proptest::option::of(arb_string()),
            proptest::collection::vec(arb_string(), 0..4)
        )
            .prop_map(|(issuer, client_id, secret, scopes)| Request::Import(
                ImportRequest {
                    profile: "p".into(),
                    issuer,
                    client_id,
                    credential: secret
                        .map(|s| ClientCredential::Secret(Secret::new(s)))
                        .unwrap_or(ClientCredential::None),
                    client_auth: None,
                    scopes,
                    endpoints: EndpointOverrides::default(),
                    token_response: Secret::from("{}"),
                }
            )),
        (arb_string(), any::<bool>())
            .prop_map(|(profile, revoke)| Request::Logout { profile, revoke }),
        arb_string().prop_map(|p| Request::Unlock {
            passphrase: Secret::new(p)
        }),
        Just(Request::Status),
        arb_string().prop_map(|after| Request::StatusPage { after }),
        Just(Request::Ping),
    ]
}

fn arb_error() -> impl Strategy<Value = BrokerError> {
    prop_oneof![
        (arb_string(), arb_string())
            .prop_map(|(profile, message)| BrokerError::ReauthRequired { profile, message }),
        (any::<u64>(), arb_string()).prop_map(|(retry_after_secs, detail)| {
            BrokerError::IdpUnavailable {
                retry_after_secs,
                detail,
            }
        }),
        Just(BrokerError::Locked),
        arb_string().prop_map(BrokerError::internal),
        (arb_string(), arb_string())
            .prop_map(|(profile, message)| BrokerError::ClientRejected { profile, message }),
    ]
}

fn arb_token() -> impl Strategy<Value = Token> {
    (arb_string(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(at, e, i, g)| Token {
        access_token: Secret::new(at),
        token_type: "Bearer".into(),
        expires_at: e,
        issued_at: i,
        generation: g,
        scopes: vec![],
    })
}

proptest! {
    #[test]
    fn client_messages_round_trip(id in any::<u64>(), request in arb_request()) {
        let msg = req(id, request);
        prop_assert_eq!(decode::<ClientMessage>(&encode(&msg).unwrap()).unwrap(), msg);
    }

    #[test]
    fn server_messages_round_trip(id in any::<u64>(), token in arb_token(), err in arb_error()) {
        for msg in [
            resp(id, Ok(Response::Token(token.clone()))),
            resp(id, Err(err.clone())),
            ServerMessage::Event { id, event: WatchEvent::Token { profile: "p".into(), token: token.clone() } },
        ] {
            prop_assert_eq!(decode::<ServerMessage>(&encode(&msg).unwrap()).unwrap(), msg);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<ClientMessage>(&bytes);
        let _ = decode::<ServerMessage>(&bytes);
        let _ = peek_hello_version(&bytes);
    }
}

#[tokio::test]
async fn reader_and_writer_round_trip_several_frames() {
    let (a, b) = tokio::io::duplex(1024);
    let mut writer = FrameWriter::new(a);
    let mut reader = FrameReader::new(b);
    for id in 0..5 {
        writer.write_message(&req(id, Request::Ping)).await.unwrap();
    }
    writer.shutdown().await.unwrap();
    for id in 0..5 {
        let msg: ClientMessage = reader.read_message().await.unwrap().unwrap();
        assert_eq!(msg, req(id, Request::Ping));
    }
    assert!(reader
        .read_message::<ClientMessage>()
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn oversized_length_prefix_is_refused_before_reading_the_body() {
    let (mut a, b) = tokio::io::duplex(64);
    let mut reader = FrameReader::new(b);
    a.write_all(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes())
        .await
        .unwrap();
    match reader.read_frame().await {
        Err(Error::FrameTooLarge { len, max }) => {
            assert_eq!(len, MAX_FRAME_LEN + 1);
            assert_eq!(max, MAX_FRAME_LEN);
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
}

#[tokio::test]
async fn a_frame_of_exactly_the_cap_is_accepted() {
    let (mut a, b) = tokio::io::duplex(MAX_FRAME_LEN + 8);
    let mut reader = FrameReader::new(b);
    a.write_all(&(MAX_FRAME_LEN as u32).to_be_bytes())
        .await
        .unwrap();
    a.write_all(&vec![7u8; MAX_FRAME_LEN]).await.unwrap();
    let frame = reader.read_frame().await.unwrap().unwrap();
    assert_eq!(frame.len(), MAX_FRAME_LEN);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_partial_frame_times_out_but_idle_does_not() {
    let (mut a, b) = tokio::io::duplex(64);
    let mut reader = FrameReader::with_stall_timeout(b, Duration::from_secs(10));
    // Idle: no byte at all. With paused time, a pending read for an hour is still pending.
    let idle = tokio::time::timeout(Duration::from_secs(3600), reader.read_frame()).await;
    assert!(idle.is_err(), "an idle reader must keep waiting");
    // Half a frame, then nothing.
    a.write_all(&[0, 0, 0, 10, 1, 2]).await.unwrap();
    let started = tokio::time::Instant::now();
    match reader.read_frame().await {
        Err(Error::Stalled) => {}
        other => panic!("expected Stalled, got {other:?}"),
    }
    assert_eq!(started.elapsed(), Duration::from_secs(10));
}

#[tokio::test]
async fn eof_inside_a_frame_is_truncation() {
    let (mut a, b) = tokio::io::duplex(64);
    let mut reader = FrameReader::new(b);
    a.write_all(&[0, 0, 0, 10, 1, 2]).await.unwrap();
    drop(a);
    assert!(matches!(reader.read_frame().await, Err(Error::Truncated)));
}
