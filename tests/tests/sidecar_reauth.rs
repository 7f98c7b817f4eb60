//! A dead login seen from the sidecar side (contract §8, §9): when the IdP forgets
//! the grant, every `BrokerTokenSource` answers `Error::ReauthRequired` with the
//! broker's message, stickily and without asking the broker again, the IdP sees
//! exactly one more refresh attempt, and the example sidecar logs it once.

use std::process::Stdio;
use std::time::{Duration, Instant};

use kontext_broker_client::{BrokerTokenSource, Error, TokenSource};
use kontext_broker_tests::backend::{provider_stats, Backend, Validator};
use kontext_broker_tests::broker_process::broker_binary;
use kontext_broker_tests::scenario::{provider_with_profile, WithProfile};

const PROFILE: &str = "default";
const REAUTH_MESSAGE: &str = "Session expired, run `kontext login` to re-authenticate";
/// What `client/examples/sidecar.rs` logs when the login is dead.
const EXAMPLE_REAUTH_LINE: &str = "login expired; run `kontext login`";
/// The example's per-beat debug line.
const EXAMPLE_ATTEMPT_LINE: &str = "heartbeat attempt";
/// Safety net for events that take milliseconds.
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// The example binary, built by
/// `cargo build -p kontext-broker-client --examples --features tower`.
fn sidecar_example() -> std::path::PathBuf {
    let path = broker_binary().with_file_name("examples").join("sidecar");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build -p kontext-broker-client --examples --features tower`",
        path.display()
    );
    path
}

fn assert_reauth(result: Result<kontext_broker_client::Token, Error>) {
    match result {
        Err(Error::ReauthRequired { profile, message }) => {
            assert_eq!(profile, PROFILE);
            assert_eq!(message, REAUTH_MESSAGE);
        }
        Err(other) => panic!("expected ReauthRequired, got {other:?}"),
        Ok(t) => panic!("expected ReauthRequired, got generation {}", t.generation),
    }
}

/// Waits until `path` contains `needle` at least `n` times.
async fn wait_for_count(path: &std::path::Path, needle: &str, n: usize) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.matches(needle).count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} of {needle:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `path` contains `needle`; returns the content.
async fn wait_for_log(path: &std::path::Path, needle: &str) -> String {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(Instant::now() < deadline, "{needle:?} never logged:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_grant_makes_every_source_report_reauth_once() {
    let WithProfile {
        mut provider,
        mut broker,
        client,
        imported,
        ..
    } = provider_with_profile(60).await;
    let backend = Backend::start(Validator::introspection(provider.issuer())).await;

    let sources: Vec<BrokerTokenSource> = (0..3)
        .map(|_| BrokerTokenSource::builder().socket(broker.socket()).build())
        .collect();
    for s in &sources {
        assert_eq!(s.token().await.unwrap().generation, imported.generation);
    }

    // The example sidecar, beating every 200 ms, until it is known to succeed.
    let tmp = tempfile::tempdir().unwrap();
    let log_path = tmp.path().join("sidecar.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut example = tokio::process::Command::new(sidecar_example())
        .arg(backend.heartbeat_url())
        .arg("200")
        .arg(PROFILE)
        .env("KONTEXT_BROKER_SOCKET", broker.socket())
        .env("RUST_LOG", "info,sidecar=debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the sidecar example");
    backend
        .wait_until(EVENT_TIMEOUT, |hits| {
            hits.iter()
                .filter(|h| h.status == 200 && h.body.get("beat").is_some())
                .count()
                >= 3
        })
        .await;

    // In-memory storage: a restart kills every grant.
    provider.restart().await;
    assert_reauth(client.refresh(PROFILE).await);

    // The broker pushes the dead login to every source.
    for s in &sources {
        let mut updates = s.updates();
        tokio::time::timeout(EVENT_TIMEOUT, async {
            while s.token().await.is_ok() {
                updates.changed().await.unwrap();
            }
        })
        .await
        .expect("reauth never reached a source");
        assert_reauth(s.token().await);
    }

    // The example logs it once, and not again over the next heartbeats.
    let at_reauth = wait_for_log(&log_path, EXAMPLE_REAUTH_LINE).await;
    let beats_at_reauth = backend.counts().requests;
    // Evidence, not a timer: six more heartbeat attempts are logged after it.
    let attempts = at_reauth.matches(EXAMPLE_ATTEMPT_LINE).count();
    wait_for_count(&log_path, EXAMPLE_ATTEMPT_LINE, attempts + 6).await;
    example.start_kill().unwrap();
    example.wait().await.unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(log.matches(EXAMPLE_REAUTH_LINE).count(), 1, "{log}");
    assert!(log.contains("heartbeats succeed"), "{log}");
    // A dead login sends no more heartbeats with a dead token.
    assert_eq!(backend.counts().requests, beats_at_reauth);

    // Sticky without IPC: with the broker gone, the sources still answer
    // ReauthRequired (a call to the broker would fail differently).
    drop(client);
    broker.sigterm();
    tokio::task::block_in_place(|| broker.wait_exit(Duration::from_secs(10)));
    for s in &sources {
        for _ in 0..100 {
            assert_reauth(s.token().await);
        }
    }

    // The forgotten grant cost exactly one refresh attempt at the IdP.
    let stats = provider_stats(provider.issuer()).await;
    assert_eq!(stats.refresh_token_grants, 1, "{stats:?}");
    assert_eq!(stats.refresh_token_grant_errors, 1, "{stats:?}");
    println!(
        "reauth: 3 sources and the example sidecar saw it; provider grants after its restart: {stats:?}; \
         backend: {:?}",
        backend.counts()
    );
}
