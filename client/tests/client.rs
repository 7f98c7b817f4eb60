//! BrokerClient against the in-test mock broker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kontext_broker_client::{BrokerClient, Error, ProfileState};
use kontext_broker_protocol::{BrokerError, Request, Response, WatchEvent};
use kontext_broker_testutil::mock_broker::{handler, token, Action, Handler, Mock};
use tokio::sync::oneshot;

/// Safety net only: every wait below ends on a real event.
const NET: Duration = Duration::from_secs(10);

fn pong() -> Handler {
    handler(|r| async move {
        match r {
            Request::Ping => Action::Reply(Ok(Response::Pong)),
            _ => Action::Reply(Err(BrokerError::bad_request("unscripted"))),
        }
    })
}

#[tokio::test]
async fn handshake_then_ping() {
    let mock = Mock::start(pong());
    let c = BrokerClient::connect_to(&mock.path).await.unwrap();
    assert_eq!(c.welcome().broker_version, "mock");
    c.ping().await.unwrap();
    assert_eq!(mock.hellos(), 1);
    assert_eq!(c.pending_routes(), 0);
}

#[tokio::test]
async fn version_mismatch_is_typed() {
    let dir = tempfile::tempdir().unwrap();
    let mock = Mock::start_at(&dir.path().join("s.sock"), pong(), None);
    let err = BrokerClient::connect_to(&mock.path).await.unwrap_err();
    assert!(matches!(err, Error::VersionMismatch { .. }), "{err:?}");
}

#[tokio::test]
async fn missing_or_stale_socket_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("none.sock");
    let err = BrokerClient::connect_to(&path).await.unwrap_err();
    assert!(matches!(err, Error::BrokerNotRunning { .. }), "{err:?}");
    assert!(err.to_string().contains("start it with `kontext-broker`"));
    // A socket file nobody listens on (ECONNREFUSED).
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let err = BrokerClient::connect_to(&path).await.unwrap_err();
    assert!(matches!(err, Error::BrokerNotRunning { .. }), "{err:?}");
}

#[tokio::test]
async fn socket_owned_by_another_uid_is_refused_before_any_byte() {
    if !kontext_broker_testutil::root("chown the socket to another uid") {
        return;
    }
    let mock = Mock::start(pong());
    std::os::unix::fs::chown(&mock.path, Some(65534), Some(65534)).unwrap();
    let err = BrokerClient::connect_to(&mock.path).await.unwrap_err();
    match &err {
        Error::PeerRejected { reason, .. } => {
            assert!(
                reason.contains("owned by uid 65534, not you (uid 0)"),
                "{reason}"
            )
        }
        other => panic!("expected PeerRejected, got {other:?}"),
    }
    assert!(err.to_string().ends_with("refusing to send credentials"));
    // Give the mock a chance to have seen a Hello if one had been sent: a ping on
    // a fresh, owned socket proves the accept loop is live and counts in order.
    std::os::unix::fs::chown(&mock.path, Some(0), Some(0)).unwrap();
    let c = BrokerClient::connect_to(&mock.path).await.unwrap();
    c.ping().await.unwrap();
    assert_eq!(
        mock.hellos(),
        1,
        "the refused attempt must not send a Hello"
    );
}

/// N calls in flight on one connection, answered in reverse order: each caller
/// gets its own answer, and the mock could only answer once all N had arrived.
#[tokio::test]
async fn many_concurrent_calls_resolved_out_of_order() {
    const N: usize = 50;
    // turn[i] is released when call i may answer; call i then releases i-1.
    let turns: Arc<Mutex<Vec<Option<oneshot::Receiver<()>>>>> = Arc::default();
    let signals: Arc<Mutex<Vec<Option<oneshot::Sender<()>>>>> = Arc::default();
    for _ in 0..N {
        let (tx, rx) = oneshot::channel();
        turns.lock().unwrap().push(Some(rx));
        signals.lock().unwrap().push(Some(tx));
    }
    let arrived = Arc::new(AtomicUsize::new(0));
    let order = Arc::new(Mutex::new(Vec::new()));
    let (t, s, a, o) = (
        turns.clone(),
        signals.clone(),
        arrived.clone(),
        order.clone(),
    );
    let mock = Mock::start(handler(move |r| {
        let (t, s, a, o) = (t.clone(), s.clone(), a.clone(), o.clone());
        async move {
            let Request::GetToken { profile, .. } = r else {
                return Action::Silent;
            };
            let i: usize = profile[1..].parse().unwrap();
            if a.fetch_add(1, Ordering::SeqCst) + 1 == N {
                // Everyone is here: let the last one start the chain.
                s.lock().unwrap()[N - 1].take().unwrap().send(()).unwrap();
            }
            let my_turn = t.lock().unwrap()[i].take().unwrap();
            my_turn.await.unwrap();
            o.lock().unwrap().push(i);
            let next = if i > 0 {
                s.lock().unwrap()[i - 1].take()
            } else {
                None
            };
            let reply = Ok(Response::Token(token(i as u64, 3600)));
            match next {
                Some(next) => Action::ReplyThen(reply, next),
                None => Action::Reply(reply),
            }
        }
    }));
    let c = BrokerClient::connect_to(&mock.path).await.unwrap();
    let calls = (0..N).map(|i| {
        let c = c.clone();
        async move { (i, c.get_token(&format!("p{i}"), Duration::ZERO).await) }
    });
    let results = tokio::time::timeout(NET, futures::future::join_all(calls))
        .await
        .expect("calls were not all in flight at once");
    for (i, r) in results {
        assert_eq!(r.unwrap().generation, i as u64);
    }
    assert_eq!(
        *order.lock().unwrap(),
        (0..N).rev().collect::<Vec<_>>(),
        "answers left the mock in reverse order"
    );
    assert_eq!(mock.hellos(), 1, "one connection");
    assert_eq!(c.pending_routes(), 0);
}

#[tokio::test]
async fn timed_out_call_is_cleaned_up_and_connection_survives() {
    let mock = Mock::start(handler(|r| async move {
        match r {
            Request::Ping => Action::Reply(Ok(Response::Pong)),
            _ => Action::Silent,
        }
    }));
    let c = BrokerClient::builder()
        .socket(&mock.path)
        .request_timeout(Duration::from_millis(200))
        .connect()
        .await
        .unwrap();
    let err = c.get_token("default", Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err:?}");
    assert_eq!(c.pending_routes(), 0, "the timed-out slot is removed");
    c.ping().await.unwrap();
}

#[tokio::test]
async fn disconnect_wakes_every_pending_call() {
    const N: usize = 10;
    let arrived = Arc::new(tokio::sync::Semaphore::new(0));
    let a = arrived.clone();
    let mock = Mock::start(handler(move |r| {
        let a = a.clone();
        async move {
            match r {
                Request::Ping => Action::Disconnect,
                _ => {
                    a.add_permits(1);
                    Action::Silent
                }
            }
        }
    }));
    let c = BrokerClient::connect_to(&mock.path).await.unwrap();
    let pending: Vec<_> = (0..N)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.get_token("default", Duration::ZERO).await })
        })
        .collect();
    let mut w = c.watch("default").await.unwrap();
    // Wait until the mock holds all N calls, then make it hang up.
    tokio::time::timeout(NET, arrived.acquire_many(N as u32))
        .await
        .unwrap()
        .unwrap()
        .forget();
    let err = c.ping().await.unwrap_err();
    assert!(matches!(err, Error::Disconnected), "{err:?}");
    for p in pending {
        let r = tokio::time::timeout(NET, p).await.unwrap().unwrap();
        assert!(matches!(r, Err(Error::Disconnected)), "{r:?}");
    }
    let ev = tokio::time::timeout(NET, w.next()).await.unwrap();
    assert!(matches!(ev, Some(Err(Error::Disconnected))), "{ev:?}");
    assert!(
        w.next().await.is_none(),
        "the stream ends after Disconnected"
    );
    assert!(c.is_closed());
    let err = c.ping().await.unwrap_err();
    assert!(
        matches!(err, Error::Disconnected),
        "later calls fail at once"
    );
}

#[tokio::test]
async fn watch_events_are_routed_by_subscription() {
    let mock = Mock::start(pong());
    mock.set_initial(vec![WatchEvent::Token {
        profile: "a".into(),
        token: token(1, 3600),
    }]);
    let c = BrokerClient::connect_to(&mock.path).await.unwrap();
    let mut a = c.watch("a").await.unwrap();
    let mut b = c.watch("b").await.unwrap();
    let first = tokio::time::timeout(NET, a.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(first, WatchEvent::Token { ref token, .. } if token.generation == 1));

    assert_eq!(
        mock.push(WatchEvent::State {
            profile: "b".into(),
            state: ProfileState::Refreshing,
            generation: 1,
            expires_at: None,
        }),
        1
    );
    assert_eq!(
        mock.push(WatchEvent::Token {
            profile: "a".into(),
            token: token(2, 3600),
        }),
        1
    );
    let ev = tokio::time::timeout(NET, b.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        ev,
        WatchEvent::State {
            state: ProfileState::Refreshing,
            ..
        }
    ));
    let ev = tokio::time::timeout(NET, a.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(ev, WatchEvent::Token { ref token, .. } if token.generation == 2));

    // Dropping a stream stops routing to it; the other keeps working.
    assert_eq!(c.pending_routes(), 2);
    drop(a);
    assert_eq!(c.pending_routes(), 1);
    mock.push(WatchEvent::Removed {
        profile: "a".into(),
    });
    mock.push(WatchEvent::Removed {
        profile: "b".into(),
    });
    let ev = tokio::time::timeout(NET, b.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        ev,
        WatchEvent::Removed {
            profile: "b".into()
        }
    );
    c.ping().await.unwrap();

    mock.drop_connections();
    let ev = tokio::time::timeout(NET, b.next()).await.unwrap();
    assert!(matches!(ev, Some(Err(Error::Disconnected))), "{ev:?}");
}

#[tokio::test]
async fn broker_errors_become_typed_client_errors() {
    let mock = Mock::start(handler(|r| async move {
        let Request::GetToken { profile, .. } = r else {
            return Action::Silent;
        };
        Action::Reply(Err(match profile.as_str() {
            "reauth" => BrokerError::ReauthRequired {
                profile,
                message: "Session expired, run `kontext login` to re-authenticate".into(),
            },
            "unknown" => BrokerError::UnknownProfile { profile },
            "locked" => BrokerError::Locked,
            _ => BrokerError::IdpUnavailable {
                retry_after_secs: 4,
                detail: "connect timeout".into(),
            },
        }))
    }));
    let c = BrokerClient::connect_to(&mock.path).await.unwrap();
    let get = |p: &'static str| {
        let c = c.clone();
        async move { c.get_token(p, Duration::ZERO).await.unwrap_err() }
    };
    assert!(
        matches!(get("reauth").await, Error::ReauthRequired { ref message, .. } if message.contains("kontext login"))
    );
    assert!(
        matches!(get("unknown").await, Error::UnknownProfile { ref profile } if profile == "unknown")
    );
    assert!(matches!(get("locked").await, Error::Locked));
    assert!(
        matches!(get("idp").await, Error::Unavailable { retry_after, .. } if retry_after == Duration::from_secs(4))
    );
}

#[tokio::test]
async fn token_never_appears_in_debug_output() {
    let t = token(1, 60);
    assert!(!format!("{t:?}").contains("at-1"));
}

/// Child half of `peer_running_as_another_uid_is_refused`: when the test binary is
/// re-executed with this variable set (already running as uid 65534), listen on
/// the given path, accept one connection and report how many bytes arrived.
#[test]
fn foreign_peer_child() {
    let Some(path) = std::env::var_os("KONTEXT_TEST_FOREIGN_PEER") else {
        return; // Not the child: nothing to do.
    };
    use std::io::{Read, Write};
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    println!("ready");
    std::io::stdout().flush().unwrap();
    let (mut s, _) = listener.accept().unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    println!("received {}", buf.len());
}

/// The socket file is ours, but the process listening on it runs as another
/// uid: the client must refuse after `peer_cred`, before writing anything.
#[tokio::test]
async fn peer_running_as_another_uid_is_refused() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !kontext_broker_testutil::root("start a peer under another uid") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The child (uid 65534) must be able to create its socket here.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let path = dir.path().join("planted.sock");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args([
            "--exact",
            "foreign_peer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KONTEXT_TEST_FOREIGN_PEER", &path)
        .stdout(std::process::Stdio::piped());
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        child.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    /// Kills the child on every exit path, so a failing test cannot hang.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = KillOnDrop(child.spawn().unwrap());
    let stdout = child.0.stdout.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let mut next_line_with = async |needle: &str| loop {
        let line = tokio::time::timeout(NET, lines.recv())
            .await
            .expect("child is silent")
            .expect("child exited early");
        // The harness prints "test foreign_peer_child ... " before our output.
        if line.contains(needle) {
            return line;
        }
    };
    next_line_with("ready").await;
    // Make the planted socket look like ours; only the peer check can catch it.
    std::os::unix::fs::chown(&path, Some(0), Some(0)).unwrap();
    let err = BrokerClient::connect_to(&path).await.unwrap_err();
    match &err {
        Error::PeerRejected { reason, .. } => {
            assert!(reason.contains("runs as uid 65534"), "{reason}")
        }
        other => panic!("expected PeerRejected, got {other:?}"),
    }
    let line = next_line_with("received").await;
    assert!(line.ends_with("received 0"), "nothing may be sent: {line}");
    drop(child);
}

/// Frames far larger than the socket buffer, from many callers at once: what
/// the socket does not take at once is finished by the writer task, in order,
/// also for callers that gave up half-way, so every frame arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_frames_arrive_whole_even_when_callers_give_up() {
    let mock = Mock::start(handler(|r| async move {
        match r {
            Request::Ping => Action::Reply(Ok(Response::Pong)),
            Request::Unlock { passphrase } => {
                // The mock decodes every frame, so a torn one would end the test.
                assert!(passphrase.expose().bytes().all(|b| b == b'x'));
                Action::Reply(Ok(Response::Done))
            }
            _ => Action::Silent,
        }
    }));
    let c = BrokerClient::connect_to(&mock.path).await.unwrap();
    let big = || kontext_broker_protocol::Secret::new("x".repeat(60_000));
    // Forty 60 kB frames at once: megabytes, several times any socket buffer.
    let calls = (0..40).map(|i| {
        let c = c.clone();
        let pass = big();
        async move {
            if i % 4 == 0 {
                // Give up right away: the frame may be half on the wire.
                let _ = tokio::time::timeout(Duration::ZERO, c.unlock(pass)).await;
                None
            } else {
                Some(c.unlock(pass).await)
            }
        }
    });
    let results = tokio::time::timeout(NET, futures::future::join_all(calls))
        .await
        .expect("big frames were not all written");
    for r in results.into_iter().flatten() {
        r.expect("unlock answered");
    }
    // The stream is still in frame sync.
    tokio::time::timeout(NET, c.ping())
        .await
        .expect("ping after big frames")
        .unwrap();
    assert!(!c.is_closed());
}
