//! contract §2: a peer with another uid is closed before any byte is read or
//! written, and counted in `rejected_peers`.
//!
//! Needs root (CI runs as root): the foreign peer is a child that drops to uid
//! 65534 but keeps `dac_override`, so it can reach the 0700 socket directory and
//! the broker's own peer check is what refuses it.

use std::path::{Path, PathBuf};
use std::process::Command;

use kontext_broker_protocol::codec;
use kontext_broker_tests::broker_process::{hello, BrokerOptions, BrokerProcess};
use kontext_broker_testutil as prereq;

/// Connects, sends a Hello, reads until one whole frame arrived or the broker
/// closes; prints `<bytes received> <how it ended> <euid>`.
const PEER_SCRIPT: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.settimeout(30)
try:
    s.sendall(bytes.fromhex(sys.argv[2]))
except OSError:
    pass
got = b""
how = "eof"
try:
    while True:
        d = s.recv(4096)
        if not d:
            break
        got += d
        if len(got) >= 4 and len(got) >= 4 + int.from_bytes(got[:4], "big"):
            how = "frame"
            break
except ConnectionResetError:
    how = "reset"
except socket.timeout:
    how = "timeout"
print(len(got), how, os.geteuid())
"#;

/// The tools the foreign peer needs: `setpriv` and `python3`.
struct Tools {
    setpriv: PathBuf,
    python: PathBuf,
}

/// Runs the peer script, optionally through setpriv as uid 65534.
fn run_peer(tools: &Tools, socket: &Path, foreign: bool) -> (usize, String, u32) {
    let hello = hex::encode(codec::encode_frame(&hello()).unwrap());
    let mut cmd = if foreign {
        let mut cmd = Command::new(&tools.setpriv);
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=+dac_override",
            "--ambient-caps=+dac_override",
        ]);
        cmd.arg(&tools.python);
        cmd
    } else {
        Command::new(&tools.python)
    };
    let out = cmd
        .arg("-c")
        .arg(PEER_SCRIPT)
        .arg(socket)
        .arg(hello)
        .output()
        .expect("running the peer");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "peer failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut it = stdout.split_whitespace();
    let bytes = it.next().unwrap().parse().unwrap();
    let how = it.next().unwrap().to_owned();
    let euid = it.next().unwrap().parse().unwrap();
    (bytes, how, euid)
}

#[tokio::test]
async fn foreign_uid_is_rejected_without_a_byte() {
    let why = "run a peer under another uid";
    if !prereq::root(why) {
        return;
    }
    let (Some(setpriv), Some(python)) =
        (prereq::tool("setpriv", why), prereq::tool("python3", why))
    else {
        return;
    };
    let tools = Tools { setpriv, python };
    let broker = BrokerProcess::start(BrokerOptions::default());

    // Control: the same script under our own uid is answered, so the zero
    // bytes below come from the broker's peer check and nothing else.
    let (bytes, how, _) = run_peer(&tools, broker.socket(), false);
    assert_eq!(how, "frame", "own-uid control got {bytes} bytes, {how}");

    let (bytes, how, euid) = run_peer(&tools, broker.socket(), true);
    assert_eq!(euid, 65534, "the peer did not drop privileges");
    assert_eq!(bytes, 0, "a foreign peer received {bytes} bytes");
    assert!(
        how == "eof" || how == "reset",
        "peer saw {how}, not a close"
    );

    let mut client = broker.client().await;
    let status = client.status(1).await;
    assert_eq!(
        status.broker.rejected_peers, 1,
        "only the foreign peer is counted"
    );
    // The control peer has exited; the broker notices its close asynchronously.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut id = 2;
    while client.status(id).await.broker.connections != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "connection count stuck"
        );
        id += 1;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let log = broker.stderr();
    assert!(
        log.contains("rejected connection from another user") && log.contains("uid=65534"),
        "{log}"
    );
}
