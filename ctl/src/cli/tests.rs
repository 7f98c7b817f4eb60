use std::time::Duration;

use clap::error::ErrorKind;
use kontext_broker_protocol::{
    BrokerError, BrokerStatus, ProfileState, ProfileStatus, StatusReport, WatchEvent,
};
use kontext_broker_testutil::mock_broker::{handler, Action, Mock};
use serde_json::Value;

use super::*;

fn report(profiles: Vec<ProfileStatus>) -> StatusReport {
    StatusReport {
        broker: BrokerStatus {
            version: "0.1.0".into(),
            pid: 42,
            uptime_secs: 3725,
            socket: "/run/user/0/kontext/broker.sock".into(),
            state_dir: "/root/.local/state/kontext/broker".into(),
            locked: false,
            connections: 2,
            rejected_peers: 1,
            handshake_timeouts: 0,
        },
        profiles,
        next_after: None,
    }
}

fn profile(name: &str) -> ProfileStatus {
    ProfileStatus {
        name: name.into(),
        issuer: "https://idp.example".into(),
        client_id: "cli".into(),
        subject: Some("alice@example.com".into()),
        state: ProfileState::ReauthRequired,
        access_token_expires_at: Some(1_700_000_000),
        generation: 7,
        refresh_count: 6,
        refresh_failures: 1,
        last_refresh_at: Some(1_699_999_000),
        next_refresh_at: None,
        last_error: Some("invalid_grant".into()),
        lifetime_source: None,
    }
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    k.sort();
    k
}

#[test]
fn status_json_has_the_spec_schema() {
    let v = status_json(&report(vec![profile("default")]));
    assert_eq!(keys(&v), ["broker", "profiles"]);
    assert_eq!(
        keys(&v["broker"]),
        [
            "connections",
            "handshake_timeouts",
            "locked",
            "pid",
            "rejected_peers",
            "socket",
            "state_dir",
            "uptime_secs",
            "version"
        ]
    );
    assert_eq!(v["broker"]["pid"], 42);
    assert_eq!(v["broker"]["locked"], false);
    assert_eq!(v["broker"]["rejected_peers"], 1);
    let p = &v["profiles"][0];
    assert_eq!(
        keys(p),
        [
            "access_token_expires_at",
            "client_id",
            "generation",
            "issuer",
            "last_error",
            "last_refresh_at",
            "lifetime_source",
            "name",
            "next_refresh_at",
            "refresh_count",
            "refresh_failures",
            "state",
            "subject"
        ]
    );
    assert_eq!(p["state"], "reauth_required");
    assert_eq!(p["access_token_expires_at"], "2023-11-14T22:13:20Z");
    assert_eq!(p["last_refresh_at"], "2023-11-14T21:56:40Z");
    assert_eq!(p["next_refresh_at"], Value::Null);
    assert_eq!(p["generation"], 7);
    assert_eq!(p["last_error"], "invalid_grant");
    assert_eq!(p["lifetime_source"], Value::Null);
    for (source, name) in [
        (
            kontext_broker_protocol::LifetimeSource::ExpiresIn,
            "expires_in",
        ),
        (kontext_broker_protocol::LifetimeSource::JwtExp, "jwt_exp"),
        (kontext_broker_protocol::LifetimeSource::Default, "default"),
    ] {
        let mut with = profile("y");
        with.lifetime_source = Some(source);
        assert_eq!(
            status_json(&report(vec![with.clone()]))["profiles"][0]["lifetime_source"],
            name
        );
        assert!(status_table(&report(vec![with]), 0).contains(name));
    }
    let mut none = profile("x");
    none.subject = None;
    none.last_error = None;
    none.access_token_expires_at = None;
    let v = status_json(&report(vec![none]));
    for k in ["subject", "last_error", "access_token_expires_at"] {
        assert_eq!(v["profiles"][0][k], Value::Null, "{k}");
    }
    // One object, one line.
    assert!(!v.to_string().contains('\n'));
}

#[test]
fn status_table_is_aligned_and_explains_empty() {
    let t = status_table(&report(vec![]), 0);
    assert!(t.contains("no profiles; add one with `broker-ctl login` or `broker-ctl import`"));
    let mut long = profile("a-much-longer-profile-name");
    long.state = ProfileState::Valid;
    let t = status_table(&report(vec![profile("default"), long]), 1_700_000_000 - 250);
    let lines: Vec<&str> = t.lines().filter(|l| l.contains("https://idp")).collect();
    assert_eq!(lines.len(), 2);
    // STATE column starts at the same offset in every row.
    let col = |l: &str, w: &str| l.find(w).unwrap();
    assert_eq!(col(lines[0], "reauth_required"), col(lines[1], "valid"));
    assert!(t.contains("in 4m10s"), "{t}");
    assert!(t.starts_with("broker 0.1.0 (pid 42), up 1h02m"), "{t}");
}

#[test]
fn exit_codes_follow_the_spec() {
    let cases: Vec<(ClientError, u8)> = vec![
        (ClientError::BrokerNotRunning { path: "/s".into() }, 3),
        (
            ClientError::PeerRejected {
                path: "/s".into(),
                reason: "r".into(),
            },
            3,
        ),
        (ClientError::Timeout, 3),
        (ClientError::Disconnected, 3),
        (
            ClientError::ReauthRequired {
                profile: "p".into(),
                message: "m".into(),
            },
            4,
        ),
        (
            ClientError::Unavailable {
                retry_after: Duration::from_secs(1),
                detail: "d".into(),
            },
            5,
        ),
        (
            ClientError::UnknownProfile {
                profile: "p".into(),
            },
            6,
        ),
        (ClientError::Locked, 7),
        (ClientError::BadRequest { detail: "d".into() }, 1),
        (ClientError::Internal { detail: "d".into() }, 1),
        (
            ClientError::VersionMismatch {
                broker: 2,
                client: 1,
            },
            1,
        ),
        (ClientError::Io(std::io::Error::other("x")), 3),
        (
            ClientError::Protocol(kontext_broker_protocol::Error::Decode("x".into())),
            1,
        ),
    ];
    for (e, code) in cases {
        assert_eq!(exit_code(&e), code, "{e:?}");
        let f = Failure::from(e);
        assert!(!f.message.contains('\n'));
    }
}

#[test]
fn usage_errors_exit_2_and_cli_is_consistent() {
    Cli::command().debug_assert();
    let e = Cli::try_parse_from(["broker-ctl", "invalidate"]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
    assert_eq!(e.exit_code(), exit::USAGE as i32);
    let e = Cli::try_parse_from(["broker-ctl", "frobnicate"]).unwrap_err();
    assert_eq!(e.exit_code(), exit::USAGE as i32);
    let e = Cli::try_parse_from(["broker-ctl", "token", "--profile", "../etc"]).unwrap_err();
    assert_eq!(e.exit_code(), exit::USAGE as i32);
    let cli = Cli::try_parse_from(["broker-ctl", "token"]).unwrap();
    assert!(
        matches!(cli.command, Command::Token { ref profile, min_valid: 0 } if profile == "default")
    );
}

#[test]
fn watch_json_has_required_keys_and_no_token() {
    let ev = WatchEvent::Token {
        profile: "default".into(),
        token: Token {
            access_token: "SECRET-ACCESS-TOKEN".into(),
            token_type: "Bearer".into(),
            expires_at: 1_700_000_000,
            issued_at: 1_699_999_000,
            generation: 3,
            scopes: vec!["openid".into()],
        },
    };
    let events = [
        ev.clone(),
        WatchEvent::State {
            profile: "default".into(),
            state: ProfileState::Backoff,
            generation: 3,
            expires_at: None,
        },
        WatchEvent::ReauthRequired {
            profile: "default".into(),
            message: "log in".into(),
        },
        WatchEvent::Removed {
            profile: "default".into(),
        },
    ];
    for e in &events {
        let v = watch_json(e);
        for k in ["profile", "event", "generation", "expires_at"] {
            assert!(v.get(k).is_some(), "{k} missing in {v}");
        }
        assert!(!v.to_string().contains("SECRET"));
        assert!(!watch_line(e, 0).contains("SECRET"));
    }
    let v = watch_json(&ev);
    assert_eq!(v["event"], "token");
    assert_eq!(v["generation"], 3);
    assert_eq!(v["expires_at"], "2023-11-14T22:13:20Z");
    assert_eq!(watch_json(&events[1])["state"], "backoff");
}

#[test]
fn import_refuses_a_response_without_refresh_token() {
    let mut input: &[u8] =
        br#"{"access_token":"AT-SECRET","token_type":"Bearer","expires_in":300}"#;
    let f = read_token_response(&mut input).unwrap_err();
    assert!(f.message.contains("no refresh_token"), "{}", f.message);
    assert!(!f.message.contains("AT-SECRET"));
    let mut input: &[u8] = br#"{"access_token":"AT-SECRET", "#;
    let f = read_token_response(&mut input).unwrap_err();
    assert!(f.message.contains("not a token endpoint response"));
    assert!(!f.message.contains("AT-SECRET"));
    let body = r#"{"access_token":"a","refresh_token":"r","token_type":"Bearer"}"#;
    let mut input = body.as_bytes();
    assert_eq!(read_token_response(&mut input).unwrap().expose(), body);
}

#[test]
fn passphrase_fd_reads_first_line() {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(b"correct horse\nignored\n").unwrap();
    use std::io::Seek;
    f.rewind().unwrap();
    use std::os::fd::AsRawFd;
    let p = read_passphrase_fd(f.as_raw_fd()).unwrap();
    assert_eq!(p.expose(), "correct horse");
}

/// The shared mock broker, answering each request with `answer`.
fn mock(answer: fn(&Request) -> Result<Response, BrokerError>) -> Mock {
    Mock::start(handler(move |r| async move { Action::Reply(answer(&r)) }))
}

async fn run_args(args: &[&str], stdin: &[u8]) -> (Result<(), Failure>, String) {
    let cli = Cli::try_parse_from(args).unwrap();
    let mut out = Vec::new();
    let mut input = stdin;
    let r = run(cli, &mut input, &mut out).await;
    (r, String::from_utf8(out).unwrap())
}

/// The token the `token` tests expect printed.
fn printed_token() -> Token {
    Token {
        access_token: "eyJ.token.sig".into(),
        token_type: "Bearer".into(),
        expires_at: 2_000_000_000,
        issued_at: 1_999_999_000,
        generation: 1,
        scopes: vec![],
    }
}

#[tokio::test]
async fn token_prints_only_the_token() {
    let mock = mock(|r| match r {
        Request::GetToken {
            min_valid_secs: 60, ..
        } => Ok(Response::Token(printed_token())),
        _ => Err(BrokerError::bad_request("unexpected")),
    });
    let p = mock.path.to_str().unwrap();
    let (r, out) = run_args(
        &["broker-ctl", "--socket", p, "token", "--min-valid", "60"],
        b"",
    )
    .await;
    r.unwrap();
    assert_eq!(out, "eyJ.token.sig\n");
}

#[tokio::test]
async fn broker_errors_become_exit_codes_with_one_line() {
    let mock = mock(|_| {
        Err(BrokerError::ReauthRequired {
            profile: "default".into(),
            message: "Session expired, run `kontext login` to re-authenticate".into(),
        })
    });
    let p = mock.path.to_str().unwrap();
    let (r, out) = run_args(&["broker-ctl", "--socket", p, "token"], b"").await;
    let f = r.unwrap_err();
    assert_eq!(f.code, exit::REAUTH_REQUIRED);
    assert_eq!(
        f.message,
        "Session expired, run `kontext login` to re-authenticate"
    );
    assert_eq!(out, "");
}

#[tokio::test]
async fn not_running_exits_3_naming_path_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nobody.sock");
    let (r, _) = run_args(
        &["broker-ctl", "--socket", p.to_str().unwrap(), "ping"],
        b"",
    )
    .await;
    let f = r.unwrap_err();
    assert_eq!(f.code, exit::UNREACHABLE);
    assert_eq!(
        f.message,
        format!(
            "broker not running at {}; start it with `kontext-broker`",
            p.display()
        )
    );
}

#[tokio::test]
async fn status_json_end_to_end_is_one_object() {
    let mock = mock(|r| match r {
        Request::Status => Ok(Response::Status(StatusReport {
            broker: BrokerStatus {
                version: "9".into(),
                pid: 5,
                uptime_secs: 1,
                socket: "/s".into(),
                state_dir: "/d".into(),
                locked: true,
                connections: 1,
                rejected_peers: 0,
                handshake_timeouts: 0,
            },
            profiles: vec![],
            next_after: None,
        })),
        _ => Err(BrokerError::bad_request("unexpected")),
    });
    let p = mock.path.to_str().unwrap();
    let (r, out) = run_args(&["broker-ctl", "--socket", p, "status", "--json"], b"").await;
    r.unwrap();
    assert_eq!(out.lines().count(), 1);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["broker"]["locked"], true);
    assert_eq!(v["profiles"], Value::Array(vec![]));
}

#[tokio::test]
async fn import_without_refresh_token_sends_nothing() {
    // No broker at all: the local check must fail first, with exit 1, not 3.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nobody.sock");
    let (r, _) = run_args(
        &[
            "broker-ctl",
            "--socket",
            p.to_str().unwrap(),
            "import",
            "--issuer",
            "https://idp.example",
            "--client-id",
            "cli",
        ],
        br#"{"access_token":"a","token_type":"Bearer"}"#,
    )
    .await;
    let f = r.unwrap_err();
    assert_eq!(f.code, exit::OTHER);
    assert!(f.message.contains("no refresh_token"));
}

/// A mock that answers a `Watch` with `Watching`, pushes `events`, then hangs up.
fn watch_mock(events: Vec<WatchEvent>) -> Mock {
    let mock = mock(|_| Err(BrokerError::bad_request("unexpected")));
    mock.set_initial(events);
    mock.hang_up_after_initial();
    mock
}

#[tokio::test]
async fn watch_json_streams_lines_then_exits_3_when_the_broker_goes() {
    let mock = watch_mock(vec![
        WatchEvent::Token {
            profile: "work".into(),
            token: Token {
                access_token: "SECRET-AT".into(),
                token_type: "Bearer".into(),
                expires_at: 1_700_000_000,
                issued_at: 1_699_999_000,
                generation: 9,
                scopes: vec![],
            },
        },
        WatchEvent::ReauthRequired {
            profile: "work".into(),
            message: "log in".into(),
        },
    ]);
    let p = mock.path.to_str().unwrap();
    let (r, out) = run_args(
        &[
            "broker-ctl",
            "--socket",
            p,
            "watch",
            "--profile",
            "work",
            "--json",
        ],
        b"",
    )
    .await;
    assert_eq!(r.unwrap_err().code, exit::UNREACHABLE);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0]["event"], "token");
    assert_eq!(lines[0]["generation"], 9);
    assert_eq!(lines[1]["event"], "reauth_required");
    assert!(!out.contains("SECRET"));
    assert!(
        matches!(&mock.requests()[..], [Request::Watch { profile }] if profile == "work"),
        "{:?}",
        mock.requests()
    );
}

/// `broker-ctl token` through the fast path (no runtime on the caller's side):
/// the same output and exit codes as the clap path.
#[test]
fn fast_token_path_prints_only_the_token_and_keeps_exit_codes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer: fn(&Request) -> Result<Response, BrokerError> = |r| match r {
        Request::GetToken {
            profile,
            min_valid_secs: 60,
        } if profile == "work" => Ok(Response::Token(printed_token())),
        Request::GetToken { profile, .. } => Err(BrokerError::UnknownProfile {
            profile: profile.clone(),
        }),
        _ => Err(BrokerError::bad_request("unexpected")),
    };
    let args = |p: &str, rest: &[&str]| {
        let mut v: Vec<std::ffi::OsString> = vec!["--socket".into(), p.into(), "token".into()];
        v.extend(rest.iter().map(Into::into));
        fast::parse_token(&v).expect("a token command line")
    };

    let work = rt.block_on(async { mock(answer) });
    let mut out = Vec::new();
    fast::token(
        &args(
            work.path.to_str().unwrap(),
            &["--profile", "work", "--min-valid", "60"],
        ),
        &mut out,
    )
    .unwrap();
    assert_eq!(out, b"eyJ.token.sig\n");

    let nope = rt.block_on(async { mock(answer) });
    let mut out = Vec::new();
    let f = fast::token(
        &args(nope.path.to_str().unwrap(), &["--profile", "nope"]),
        &mut out,
    )
    .unwrap_err();
    assert_eq!(f.code, exit::UNKNOWN_PROFILE);
    assert!(out.is_empty());

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let f = fast::token(&args(missing.to_str().unwrap(), &[]), &mut Vec::new()).unwrap_err();
    assert_eq!(f.code, exit::UNREACHABLE);
    assert!(f.message.contains("none.sock"), "{}", f.message);
}

#[test]
fn import_takes_a_client_id_that_starts_with_a_hyphen() {
    // oidc-provider's generated ids are base64url, so some start with '-'.
    let cli = Cli::try_parse_from([
        "broker-ctl",
        "import",
        "--issuer",
        "https://idp.example",
        "--client-id",
        "-dX4q",
    ])
    .unwrap();
    match cli.command {
        Command::Import { client_id, .. } => assert_eq!(client_id, "-dX4q"),
        other => panic!("parsed as {other:?}"),
    }
}
