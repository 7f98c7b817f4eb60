//! Process lifecycle of the real broker binary: single instance, socket
//! directory checks, stale sockets, stop by signal or request, socket activation.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use kontext_broker_protocol::{Request, Response};
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess, Closed, RawClient};

/// contract §1: exit within 5 s of SIGTERM.
const STOP_DEADLINE: Duration = Duration::from_secs(5);
/// Safety net for a broker that is expected to refuse to start.
const FAIL_TIMEOUT: Duration = Duration::from_secs(60);

fn private_dir(path: &Path) {
    std::fs::DirBuilder::new().mode(0o700).create(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).unwrap();
}

fn is_root(why: &str) -> bool {
    kontext_broker_testutil::root(why)
}

#[tokio::test]
async fn second_broker_on_same_state_dir_says_already_running() {
    let first = BrokerProcess::start(BrokerOptions::default());
    let other = tempfile::tempdir().unwrap();
    let mut second = BrokerProcess::spawn(BrokerOptions {
        state_dir: Some(first.state_dir().to_path_buf()),
        socket: Some(other.path().join("run/broker.sock")),
        ..Default::default()
    });
    let status = second.wait_exit(FAIL_TIMEOUT);
    assert!(!status.success(), "second broker exited with {status}");
    let want = format!("already running (pid {})", first.pid());
    assert!(
        second.stderr().contains(&want),
        "stderr: {}",
        second.stderr()
    );
    // The first one is unaffected.
    first.client().await.ping(1).await;
}

#[tokio::test]
async fn group_readable_socket_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut broker = BrokerProcess::spawn(BrokerOptions {
        socket: Some(dir.join("broker.sock")),
        ..Default::default()
    });
    assert!(!broker.wait_exit(FAIL_TIMEOUT).success());
    let err = broker.stderr();
    assert!(
        err.contains(&dir.display().to_string())
            && err.contains("0755")
            && err.contains("chmod 700"),
        "stderr: {err}"
    );
    assert!(!dir.join("broker.sock").exists());
}

#[tokio::test]
async fn socket_dir_owned_by_another_user_is_refused() {
    if !is_root("create a directory owned by another uid") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    private_dir(&dir);
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let mut broker = BrokerProcess::spawn(BrokerOptions {
        socket: Some(dir.join("broker.sock")),
        ..Default::default()
    });
    assert!(!broker.wait_exit(FAIL_TIMEOUT).success());
    let err = broker.stderr();
    assert!(
        err.contains(&dir.display().to_string()) && err.contains("owned by uid 65534"),
        "stderr: {err}"
    );
}

#[tokio::test]
async fn stale_socket_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    private_dir(&dir);
    let path = dir.join("broker.sock");
    // Bound and closed: the file stays, nobody listens (a crashed broker's leftover).
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let broker = BrokerProcess::start(BrokerOptions {
        socket: Some(path.clone()),
        ..Default::default()
    });
    broker.client().await.ping(1).await;
    assert!(broker.stderr().contains("replacing stale socket"));
}

#[tokio::test]
async fn live_socket_is_not_stolen() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    private_dir(&dir);
    let path = dir.join("broker.sock");
    let _someone = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut broker = BrokerProcess::spawn(BrokerOptions {
        socket: Some(path.clone()),
        ..Default::default()
    });
    assert!(!broker.wait_exit(FAIL_TIMEOUT).success());
    let err = broker.stderr();
    assert!(err.contains("another broker is serving"), "stderr: {err}");
    assert!(path.exists(), "the other listener's socket must stay");
}

#[tokio::test]
async fn socket_and_lock_are_private() {
    use std::os::unix::fs::MetadataExt;
    let broker = BrokerProcess::start(BrokerOptions::default());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(broker.socket()), 0o600);
    assert_eq!(mode(broker.socket().parent().unwrap()), 0o700);
    assert_eq!(mode(broker.state_dir()), 0o700);
    let lock = broker.state_dir().join("broker.lock");
    assert_eq!(mode(&lock), 0o600);
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap().trim(),
        broker.pid().to_string()
    );
}

#[tokio::test]
async fn sigterm_removes_socket_and_exits_zero() {
    let mut broker = BrokerProcess::start(BrokerOptions::default());
    let mut idle = broker.client().await;
    let started = Instant::now();
    broker.sigterm();
    let status = broker.wait_exit(STOP_DEADLINE);
    println!("exit after SIGTERM took {:?}", started.elapsed());
    assert!(status.success(), "exit status {status}");
    assert!(!broker.socket().exists(), "socket not removed");
    // Open connections are closed, not left hanging.
    assert_eq!(
        idle.expect_closed(Duration::from_secs(5)).await,
        Closed::Eof
    );

    // Same dirs again: the lock was released and the socket path is free.
    broker.restart();
    broker.client().await.ping(2).await;
    broker.signal(nix::sys::signal::Signal::SIGINT);
    assert!(broker.wait_exit(STOP_DEADLINE).success());
    assert!(!broker.socket().exists());
}

#[tokio::test]
async fn shutdown_request_answers_then_exits_zero() {
    let mut broker = BrokerProcess::start(BrokerOptions::default());
    let mut client = broker.client().await;
    assert_eq!(client.call(7, Request::Shutdown).await, Ok(Response::Done));
    assert_eq!(
        client.expect_closed(Duration::from_secs(5)).await,
        Closed::Eof
    );
    let status = broker.wait_exit(STOP_DEADLINE);
    assert!(status.success(), "exit status {status}");
    assert!(!broker.socket().exists(), "socket not removed");
}

#[tokio::test]
async fn systemd_socket_activation() {
    let Some(activate) =
        kontext_broker_testutil::tool("systemd-socket-activate", "test socket activation")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    private_dir(&dir);
    let path = dir.join("broker.sock");
    let mut broker = BrokerProcess::start(BrokerOptions {
        socket: Some(path.clone()),
        launcher: vec![activate.into(), "-l".into(), path.clone().into()],
        ..Default::default()
    });
    let mut client = RawClient::connect(&path).await;
    let status = client.status(1).await;
    assert_eq!(status.broker.pid, broker.pid());
    assert!(broker
        .stderr()
        .contains("using the socket passed by systemd"));
    broker.sigterm();
    assert!(broker.wait_exit(STOP_DEADLINE).success());
    // The socket belongs to the service manager: the broker must leave it.
    assert!(path.exists());
}

#[tokio::test]
async fn paths_from_environment_and_json_logs() {
    let broker = BrokerProcess::start(BrokerOptions {
        paths_via_env: true,
        args: vec!["--log-format".into(), "json".into()],
        ..Default::default()
    });
    let status = broker.client().await.status(1).await;
    assert_eq!(status.broker.socket, broker.socket().display().to_string());
    assert_eq!(
        status.broker.state_dir,
        broker.state_dir().display().to_string()
    );
    assert!(broker.state_dir().join("broker.lock").exists());
    let log = broker.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("listening"))
        .unwrap_or_else(|| panic!("no listening line in {log}"));
    let json: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!(json["level"], "INFO");
}

#[tokio::test]
async fn invalid_config_is_reported_in_one_line() {
    let mut broker = BrokerProcess::spawn(BrokerOptions {
        // Through KONTEXT_BROKER_CONFIG, so this also shows the variable is read.
        paths_via_env: true,
        config_toml: "max_connections = 0\n".into(),
        ..Default::default()
    });
    assert!(!broker.wait_exit(FAIL_TIMEOUT).success());
    let err = broker.stderr();
    assert!(
        err.lines()
            .any(|l| l.starts_with("kontext-broker: invalid config")
                && l.contains("max_connections")),
        "stderr: {err}"
    );
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn process_is_hardened() {
    let broker = BrokerProcess::start(BrokerOptions::default());
    let proc_file =
        |name: &str| std::fs::read_to_string(format!("/proc/{}/{name}", broker.pid())).unwrap();
    let status = proc_file("status");
    assert!(status.lines().any(|l| l == "Umask:\t0077"), "{status}");
    let limits = proc_file("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = nofile.split_whitespace().collect();
    assert_eq!(
        fields[3], fields[4],
        "soft NOFILE not raised to hard: {nofile}"
    );
}
