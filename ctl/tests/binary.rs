//! The `broker-ctl` binary itself (as linked, fast path included) against the
//! shared mock broker. Having an integration test also makes `cargo test
//! --workspace` build the binary that the end-to-end tests in `tests/` run.

use std::process::Command;

use kontext_broker_protocol::{BrokerError, Request, Response};
use kontext_broker_testutil::mock_broker::{handler, token, Action, Mock};

fn broker_ctl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_broker-ctl"))
}

#[test]
fn token_prints_the_token_and_a_missing_broker_exits_3() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mock = rt.block_on(async {
        Mock::start(handler(|r| async move {
            match r {
                Request::GetToken { profile, .. } if profile == "work" => {
                    Action::Reply(Ok(Response::Token(token(4, 3600))))
                }
                _ => Action::Reply(Err(BrokerError::bad_request("unexpected"))),
            }
        }))
    });
    let out = broker_ctl()
        .arg("--socket")
        .arg(&mock.path)
        .args(["token", "--profile", "work"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "at-4\n");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    for args in [&["ping"][..], &["token"]] {
        let out = broker_ctl()
            .arg("--socket")
            .arg(&missing)
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{args:?}: {out:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains("none.sock"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}
