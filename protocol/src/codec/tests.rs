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

/// One sample message, named after its file in `protocol/testdata/`.
enum Sample {
    Client(&'static str, ClientMessage),
    Server(&'static str, ServerMessage),
}

/// One sample of every message kind (and of every v2 addition), each pinned by
/// `protocol/testdata/<name>.hex`. The Go client's tests read the same files.
/// A change to the bytes is a wire-format change: bump PROTOCOL_VERSION and
/// update WIRE.md.
fn samples() -> Vec<Sample> {
    use Sample::{Client as C, Server as S};
    let p = || "p".to_string();
    vec![
        C(
            "hello",
            ClientMessage::Hello(Hello {
                protocol_version: 2,
                client_name: "c".into(),
                client_version: "1".into(),
            }),
        ),
        C(
            "request_get_token",
            req(
                1,
                Request::GetToken {
                    profile: p(),
                    min_valid_secs: 60,
                },
            ),
        ),
        C(
            "request_invalidate",
            req(
                2,
                Request::Invalidate {
                    profile: p(),
                    generation: 3,
                },
            ),
        ),
        C("request_watch", req(3, Request::Watch { profile: p() })),
        C("request_status", req(4, Request::Status)),
        C(
            "request_import",
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
        ),
        C(
            "request_import_public",
            req(
                14,
                Request::Import(ImportRequest {
                    profile: p(),
                    issuer: "https://i".into(),
                    client_id: "c".into(),
                    credential: ClientCredential::None,
                    client_auth: Some(ClientAuthMethod::None),
                    scopes: vec![],
                    endpoints: EndpointOverrides {
                        token: Some("t".into()),
                        revocation: None,
                        device_authorization: Some("d".into()),
                    },
                    token_response: Secret::from("{}"),
                }),
            ),
        ),
        C(
            "request_logout",
            req(
                6,
                Request::Logout {
                    profile: p(),
                    revoke: true,
                },
            ),
        ),
        C("request_refresh", req(7, Request::Refresh { profile: p() })),
        C(
            "request_unlock",
            req(
                8,
                Request::Unlock {
                    passphrase: Secret::from("pw"),
                },
            ),
        ),
        C("request_lock", req(9, Request::Lock)),
        C("request_shutdown", req(10, Request::Shutdown)),
        C("request_ping", req(11, Request::Ping)),
        C(
            "request_set_client",
            req(
                12,
                Request::SetClient(SetClientRequest {
                    profile: p(),
                    credential: ClientCredential::PrivateKey(Secret::from("k")),
                    client_auth: None,
                }),
            ),
        ),
        C(
            "request_set_client_basic",
            req(
                15,
                Request::SetClient(SetClientRequest {
                    profile: p(),
                    credential: ClientCredential::Secret(Secret::from("s")),
                    client_auth: Some(ClientAuthMethod::ClientSecretBasic),
                }),
            ),
        ),
        C(
            "request_status_page",
            req(13, Request::StatusPage { after: p() }),
        ),
        S(
            "welcome",
            ServerMessage::Welcome(Welcome {
                protocol_version: 2,
                broker_version: "0".into(),
                pid: 7,
            }),
        ),
        S("response_token", resp(1, Ok(Response::Token(token())))),
        S("response_watching", resp(2, Ok(Response::Watching))),
        S(
            "response_status",
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
        ),
        S(
            "response_status_last_page",
            resp(
                16,
                Ok(Response::Status(StatusReport {
                    broker: BrokerStatus {
                        version: "0".into(),
                        pid: 7,
                        uptime_secs: 5,
                        socket: "/s".into(),
                        state_dir: "/d".into(),
                        locked: true,
                        connections: 1,
                        rejected_peers: 3,
                        handshake_timeouts: 0,
                    },
                    profiles: vec![
                        ProfileStatus {
                            state: ProfileState::ClientRejected,
                            subject: None,
                            lifetime_source: Some(LifetimeSource::Default),
                            last_error: Some("e".into()),
                            ..profile_status()
                        },
                        ProfileStatus {
                            name: "q".into(),
                            state: ProfileState::Error,
                            lifetime_source: Some(LifetimeSource::ExpiresIn),
                            ..profile_status()
                        },
                        ProfileStatus {
                            name: "r".into(),
                            state: ProfileState::Locked,
                            access_token_expires_at: None,
                            lifetime_source: None,
                            ..profile_status()
                        },
                    ],
                    next_after: None,
                })),
            ),
        ),
        S(
            "response_imported",
            resp(4, Ok(Response::Imported(profile_status()))),
        ),
        S(
            "response_logged_out",
            resp(
                5,
                Ok(Response::LoggedOut {
                    revoked: false,
                    revoke_error: Some("x".into()),
                }),
            ),
        ),
        S("response_done", resp(6, Ok(Response::Done))),
        S("response_pong", resp(7, Ok(Response::Pong))),
        S(
            "error_reauth_required",
            resp(
                8,
                Err(BrokerError::ReauthRequired {
                    profile: p(),
                    message: "m".into(),
                }),
            ),
        ),
        S(
            "error_unknown_profile",
            resp(9, Err(BrokerError::UnknownProfile { profile: p() })),
        ),
        S(
            "error_idp_unavailable",
            resp(
                10,
                Err(BrokerError::IdpUnavailable {
                    retry_after_secs: 4,
                    detail: "d".into(),
                }),
            ),
        ),
        S("error_locked", resp(11, Err(BrokerError::Locked))),
        S(
            "error_bad_request",
            resp(12, Err(BrokerError::bad_request("b"))),
        ),
        S("error_internal", resp(13, Err(BrokerError::internal("i")))),
        S(
            "error_client_rejected",
            resp(
                14,
                Err(BrokerError::ClientRejected {
                    profile: p(),
                    message: "m".into(),
                }),
            ),
        ),
        S(
            "error_version_mismatch_in_response",
            resp(
                15,
                Err(BrokerError::VersionMismatch {
                    broker: 2,
                    client: 1,
                }),
            ),
        ),
        S(
            "connection_error_version_mismatch",
            ServerMessage::Error(BrokerError::VersionMismatch {
                broker: 1,
                client: 2,
            }),
        ),
        S(
            "connection_error_bad_request",
            ServerMessage::Error(BrokerError::bad_request("malformed Hello")),
        ),
        S(
            "event_token",
            ServerMessage::Event {
                id: 3,
                event: WatchEvent::Token {
                    profile: p(),
                    token: token(),
                },
            },
        ),
        S(
            "event_state",
            ServerMessage::Event {
                id: 3,
                event: WatchEvent::State {
                    profile: p(),
                    state: ProfileState::Backoff,
                    generation: 3,
                    expires_at: None,
                },
            },
        ),
        S(
            "event_state_client_rejected",
            ServerMessage::Event {
                id: 3,
                event: WatchEvent::State {
                    profile: p(),
                    state: ProfileState::ClientRejected,
                    generation: 4,
                    expires_at: Some(9),
                },
            },
        ),
        S(
            "event_reauth_required",
            ServerMessage::Event {
                id: 3,
                event: WatchEvent::ReauthRequired {
                    profile: p(),
                    message: "m".into(),
                },
            },
        ),
        S(
            "event_removed",
            ServerMessage::Event {
                id: 3,
                event: WatchEvent::Removed { profile: p() },
            },
        ),
        S(
            "event_client_rejected",
            ServerMessage::Event {
                id: 3,
                event: WatchEvent::ClientRejected {
                    profile: p(),
                    message: "m".into(),
                },
            },
        ),
    ]
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn testdata() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

/// The bytes of a `.hex` file: `#` starts a comment, whitespace is ignored.
fn parse_hex_file(text: &str) -> Vec<u8> {
    let digits: String = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    assert!(digits.len().is_multiple_of(2), "odd number of hex digits");
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// The file a sample is pinned by: its Debug form as a comment, then the
/// length prefix on its own line, then the payload, 16 bytes per line.
fn render_hex_file(debug: &str, frame: &[u8]) -> String {
    let mut out =
        format!("# {debug}\n# length prefix (u32, big-endian), then the bincode payload\n");
    out.push_str(&to_hex(&frame[..4]));
    out.push('\n');
    for chunk in frame[4..].chunks(16) {
        out.push_str(&to_hex(chunk));
        out.push('\n');
    }
    out
}

fn check_sample<T>(name: &str, msg: &T, failures: &mut Vec<String>)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let frame = encode_frame(msg).unwrap();
    let path = testdata().join(format!("{name}.hex"));
    if std::env::var_os("KONTEXT_BLESS_GOLDEN").is_some() {
        std::fs::write(&path, render_hex_file(&format!("{msg:?}"), &frame)).unwrap();
    }
    let want = match std::fs::read_to_string(&path) {
        Ok(text) => parse_hex_file(&text),
        Err(e) => {
            failures.push(format!("{name}: cannot read {}: {e}", path.display()));
            return;
        }
    };
    if frame != want {
        failures.push(format!(
            "{name}: {msg:?}\n    got  {}\n    want {}",
            to_hex(&frame),
            to_hex(&want)
        ));
    }
    let back: T = decode(&want[4..]).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(&back, msg, "{name} decodes to a different message");
}

#[test]
fn golden_frames_match_testdata() {
    let mut failures = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for sample in samples() {
        let name = match &sample {
            Sample::Client(name, msg) => {
                check_sample(name, msg, &mut failures);
                name
            }
            Sample::Server(name, msg) => {
                check_sample(name, msg, &mut failures);
                name
            }
        };
        assert!(names.insert(name.to_string()), "duplicate sample {name}");
    }
    assert!(
        failures.is_empty(),
        "wire bytes changed (rerun with KONTEXT_BLESS_GOLDEN=1 only for a deliberate protocol version bump):\n{}",
        failures.join("\n")
    );
    // No orphan file: every .hex in testdata is a sample here.
    for entry in std::fs::read_dir(testdata()).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        if let Some(name) = file.strip_suffix(".hex") {
            assert!(names.contains(name), "testdata/{file} has no sample");
        }
    }
}

/// Every byte example in WIRE.md is a fenced `hex` block right after a
/// `<!-- golden: NAME -->` marker, and its bytes equal `testdata/NAME.hex`.
/// On each line of a block, the bytes are the text before the first run of
/// two spaces; the rest is an annotation.
#[test]
fn wire_md_byte_examples_match_testdata() {
    let doc_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("WIRE.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap();
    let lines: Vec<&str> = doc.lines().collect();
    let mut checked = 0;
    let mut pending: Option<String> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if let Some(rest) = line.strip_prefix("<!-- golden:") {
            let name = rest.trim_end_matches("-->").trim().to_string();
            assert!(
                pending.is_none(),
                "WIRE.md line {}: marker without a hex block",
                i + 1
            );
            pending = Some(name);
        } else if line.starts_with("```") {
            let fence = line.trim_start_matches('`');
            let start = i;
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() && !lines[i].trim().starts_with("```") {
                body.push(lines[i]);
                i += 1;
            }
            match (fence, pending.take()) {
                ("hex", Some(name)) => {
                    let digits: String = body
                        .iter()
                        .map(|l| l.split("  ").next().unwrap_or(""))
                        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
                        .collect();
                    let got = parse_hex_file(&digits);
                    let want = parse_hex_file(
                        &std::fs::read_to_string(testdata().join(format!("{name}.hex")))
                            .unwrap_or_else(|e| panic!("WIRE.md example {name}: {e}")),
                    );
                    assert_eq!(
                        to_hex(&got),
                        to_hex(&want),
                        "WIRE.md line {}: example `{name}` differs from testdata/{name}.hex",
                        start + 1
                    );
                    checked += 1;
                }
                ("hex", None) => panic!(
                    "WIRE.md line {}: hex block without a golden marker",
                    start + 1
                ),
                (_, Some(name)) => panic!(
                    "WIRE.md line {}: marker `{name}` is not followed by a hex block",
                    start + 1
                ),
                (_, None) => {}
            }
        }
        i += 1;
    }
    assert!(
        pending.is_none(),
        "WIRE.md ends with a dangling golden marker"
    );
    assert!(
        checked >= 3,
        "WIRE.md should show byte examples; found {checked}"
    );
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
        let _ = peek_get_token(&bytes);
    }

    /// The fast path reads exactly the `GetToken`s the general decoder reads.
    #[test]
    fn peek_get_token_agrees_with_decode(id in any::<u64>(), request in arb_request()) {
        let bytes = encode(&req(id, request.clone())).unwrap();
        let peeked = peek_get_token(&bytes);
        match request {
            Request::GetToken { profile, min_valid_secs } => {
                prop_assert_eq!(peeked, Some(GetTokenRef { id, profile: &profile, min_valid_secs }));
            }
            _ => prop_assert_eq!(peeked, None),
        }
    }

    /// Whatever bytes the fast path accepts, the general decoder accepts as the same request.
    #[test]
    fn peek_get_token_accepts_nothing_decode_refuses(
        profile in arb_string(),
        cut in 0usize..64,
        noise in proptest::collection::vec(any::<u8>(), 0..8),
    ) {
        let mut bytes = encode(&req(7, Request::GetToken { profile, min_valid_secs: 5 })).unwrap();
        bytes.truncate(bytes.len().saturating_sub(cut));
        bytes.extend_from_slice(&noise);
        if let Some(r) = peek_get_token(&bytes) {
            let decoded = decode::<ClientMessage>(&bytes).unwrap();
            prop_assert_eq!(decoded, req(r.id, Request::GetToken {
                profile: r.profile.to_owned(),
                min_valid_secs: r.min_valid_secs,
            }));
        }
    }

    /// A pre-encoded answer stamped with an id is byte for byte the general encoding.
    #[test]
    fn encoded_token_frames_match_the_general_codec(id in any::<u64>(), token in arb_token()) {
        let encoded = EncodedToken::new(&token).unwrap();
        let mut fast = Vec::new();
        encoded.write_frame(id, &mut fast);
        let general = encode_frame(&resp(id, Ok(Response::Token(token.clone())))).unwrap();
        prop_assert_eq!(&fast, &general);
        prop_assert_eq!(encoded.frame_len(), general.len());
        prop_assert_eq!(encoded.generation(), token.generation);
    }
}

#[test]
fn peek_get_token_refuses_invalid_utf8_and_other_requests() {
    let mut bytes = encode(&req(
        1,
        Request::GetToken {
            profile: "p".into(),
            min_valid_secs: 0,
        },
    ))
    .unwrap();
    assert!(peek_get_token(&bytes).is_some());
    // The profile's single byte sits after tag (4), id (8), request tag (4), length (8).
    bytes[24] = 0xff;
    assert_eq!(peek_get_token(&bytes), None);
    assert!(decode::<ClientMessage>(&bytes).is_err());
    let hello = encode(&ClientMessage::Hello(Hello {
        protocol_version: 2,
        client_name: "c".into(),
        client_version: "1".into(),
    }))
    .unwrap();
    assert_eq!(peek_get_token(&hello), None);
}

#[test]
fn encoded_token_debug_is_redacted() {
    let mut t = token();
    t.access_token = Secret::from("secret-marker-xyz");
    let shown = format!("{:?}", EncodedToken::new(&t).unwrap());
    assert!(!shown.contains("secret-marker-xyz"), "{shown}");
}

#[test]
fn encode_frame_into_reuses_the_buffer() {
    let mut buf = Vec::with_capacity(256);
    let cap = buf.capacity();
    encode_frame_into(&req(9, Request::Ping), &mut buf).unwrap();
    assert_eq!(buf.capacity(), cap, "no reallocation for a small frame");
    assert_eq!(buf, encode_frame(&req(9, Request::Ping)).unwrap());
    let too_big = req(
        1,
        Request::Watch {
            profile: "x".repeat(MAX_FRAME_LEN),
        },
    );
    assert!(encode_frame_into(&too_big, &mut buf).is_err());
    assert!(buf.is_empty(), "nothing half-encoded is left behind");
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
