//! The seed scenario with **Go** sidecars: ten processes of
//! `client-go/examples/heartbeat`, each with its own `TokenSource` and
//! `BearerTransport`, send a heartbeat every 200 ms for 42 s to the backend,
//! which checks every token by introspection at the real `oidc-provider` (5 s
//! access tokens) in Hydra mode: every refresh deletes the previous access
//! token at once. Meanwhile the broker refreshes proactively, is forced to
//! refresh with `broker-ctl refresh`, has its current token deleted under it,
//! and is restarted. No heartbeat may be lost, and every 401 must be followed
//! by exactly one successful retry. Same shape as `sidecar_seed.rs`.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kontext_broker_client::{Token, WatchEvent, WatchStream};
use kontext_broker_tests::backend::{
    delete_access_token, provider_stats, set_hydra_rotation, Backend, Hit, Validator,
};
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess};
use kontext_broker_tests::go_toolchain::{build_heartbeat, go_binary};
use kontext_broker_tests::oidc_provider::{OidcProvider, PUBLIC_CLIENT_ID};
use kontext_broker_tests::scenario::{broker_ctl, connect, import};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

const PROFILE: &str = "default";
const SCOPES: &[&str] = &["openid", "offline_access"];
const TTL_SECS: u64 = 5;
const SIDECARS: u64 = 10;
const BEAT: Duration = Duration::from_millis(200);
const RUN: Duration = Duration::from_secs(42);
/// Safety net for waiting on a push or a report (tokens live 5 s).
const WAIT: Duration = Duration::from_secs(30);

/// What one Go sidecar reports on stdout when its stdin closes.
#[derive(Debug, serde::Deserialize)]
struct Report {
    sent: u64,
    ok: u64,
    failures: Option<Vec<String>>,
}

/// The next pushed token newer than `after`.
async fn next_push(watch: &mut WatchStream, after: u64) -> Token {
    tokio::time::timeout(WAIT, async {
        loop {
            match watch.next().await {
                Some(Ok(WatchEvent::Token { token, .. })) if token.generation > after => {
                    return token
                }
                Some(Ok(_)) => {}
                other => panic!("watch ended: {other:?}"),
            }
        }
    })
    .await
    .expect("no new token pushed in time")
}

/// Per heartbeat (sidecar, seq), the statuses the backend answered, in order.
fn attempts(hits: &[Hit]) -> BTreeMap<(u64, u64), Vec<u16>> {
    let mut map: BTreeMap<(u64, u64), Vec<u16>> = BTreeMap::new();
    for h in hits {
        let key = (
            h.body["sidecar"].as_u64().expect("sidecar id"),
            h.body["seq"].as_u64().expect("seq"),
        );
        map.entry(key).or_default().push(h.status);
    }
    map
}

/// Closes the sidecar's stdin and reads its JSON report.
async fn stop(mut child: Child, id: u64) -> Report {
    drop(child.stdin.take());
    let mut out = String::new();
    let mut stdout = child.stdout.take().expect("stdout");
    tokio::time::timeout(WAIT, stdout.read_to_string(&mut out))
        .await
        .unwrap_or_else(|_| panic!("sidecar {id} did not stop"))
        .expect("reading the report");
    let status = child.wait().await.expect("sidecar exit");
    assert!(status.success(), "sidecar {id} exited with {status}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("sidecar {id} report {out:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_go_sidecars_lose_no_heartbeat_across_refreshes_revocations_and_a_restart() {
    let Some(go) = go_binary() else { return };
    let build_dir = tempfile::tempdir().unwrap();
    let heartbeat = tokio::task::block_in_place(|| build_heartbeat(&go, build_dir.path()));

    let provider = OidcProvider::start(TTL_SECS).await;
    let mut broker = BrokerProcess::start(BrokerOptions::default());
    let backend = Backend::start(Validator::introspection(provider.issuer())).await;
    let mut client = connect(broker.socket()).await;
    set_hydra_rotation(provider.issuer(), true).await;
    let minted = provider.mint(PUBLIC_CLIENT_ID, SCOPES).await;
    import(
        &client,
        PROFILE,
        provider.issuer(),
        PUBLIC_CLIENT_ID,
        &minted,
    )
    .await;
    let imported = Instant::now();
    let mut watch = client.watch(PROFILE).await.unwrap();

    let t0 = Instant::now();
    let sidecars: Vec<Child> = (0..SIDECARS)
        .map(|id| {
            Command::new(&heartbeat)
                .arg("-url")
                .arg(backend.heartbeat_url())
                .arg("-interval")
                .arg(format!("{}ms", BEAT.as_millis()))
                .arg("-socket")
                .arg(broker.socket())
                .arg("-id")
                .arg(id.to_string())
                .args(["-stop-on-eof", "-report"])
                .env_remove("KONTEXT_BROKER_SOCKET")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .expect("starting a Go sidecar")
        })
        .collect();

    // ~15 s: a forced refresh; Hydra mode deletes the previous access token.
    tokio::time::sleep_until((t0 + Duration::from_secs(15)).into()).await;
    let previous = client.get_token(PROFILE, Duration::ZERO).await.unwrap();
    let out = broker_ctl(broker.socket(), &["refresh"]).await;
    assert!(
        out.status.success(),
        "broker-ctl refresh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !provider
            .introspect_active(previous.access_token.expose())
            .await
    );

    // ~20 s: right after a push, the IdP deletes the token every sidecar holds.
    tokio::time::sleep_until((t0 + Duration::from_secs(20)).into()).await;
    let current = client.get_token(PROFILE, Duration::ZERO).await.unwrap();
    let pushed = next_push(&mut watch, current.generation).await;
    // Every sidecar first gets a heartbeat through with the pushed token. A
    // heartbeat still carrying the token the push replaced (which the rotation
    // deleted) would otherwise meet the deletion below twice: its 401, then a
    // retry with the pushed token, deleted too.
    backend
        .wait_until_each_accepted_after(SIDECARS, Instant::now(), WAIT)
        .await;
    let unauthorized_before_kill = backend.counts().unauthorized;
    delete_access_token(provider.issuer(), pushed.access_token.expose()).await;
    backend
        .wait_until(Duration::from_secs(10), |hits| {
            hits.iter().filter(|h| h.status == 401).count() as u64 > unauthorized_before_kill
        })
        .await;

    // ~25 s: right after a push, restart the broker on the same dirs.
    tokio::time::sleep_until((t0 + Duration::from_secs(25)).into()).await;
    let current = client.get_token(PROFILE, Duration::ZERO).await.unwrap();
    next_push(&mut watch, current.generation).await;
    drop(watch);
    drop(client);
    let restart_started = Instant::now();
    tokio::task::block_in_place(|| broker.restart());
    let downtime = restart_started.elapsed();
    client = connect(broker.socket()).await;

    tokio::time::sleep_until((t0 + RUN).into()).await;
    let mut reports = Vec::new();
    for (id, child) in sidecars.into_iter().enumerate() {
        reports.push(stop(child, id as u64).await);
    }
    let stats = provider_stats(provider.issuer()).await;
    let since_import = imported.elapsed();
    let status = client.status().await.unwrap();
    let counts = backend.counts();
    let per_beat = attempts(&backend.hits());
    let sent: u64 = reports.iter().map(|r| r.sent).sum();
    let ok: u64 = reports.iter().map(|r| r.ok).sum();
    let retried = per_beat.values().filter(|v| v.len() > 1).count();
    println!(
        "Go seed scenario over {:?}: {sent} heartbeats sent by {SIDECARS} Go sidecars, {ok} ok; \
         backend: {} requests, {} accepted, {} answered 401 ({unauthorized_before_kill} before the \
         deletion of the current token), {} other; {retried} heartbeats retried; provider: {} \
         refresh_token grants ({} failed) in {since_import:?}; broker restart took {downtime:?}; \
         status after restart: {:?}",
        t0.elapsed(),
        counts.requests,
        counts.accepted,
        counts.unauthorized,
        counts.other,
        stats.refresh_token_grants,
        stats.refresh_token_grant_errors,
        status
            .profiles
            .first()
            .map(|p| (&p.state, p.generation, p.refresh_count)),
    );

    for (id, r) in reports.iter().enumerate() {
        let failures = r.failures.as_deref().unwrap_or_default();
        assert!(failures.is_empty(), "sidecar {id}: {failures:?}");
        assert_eq!(r.ok, r.sent, "sidecar {id}");
        assert!(
            r.sent as u128 >= RUN.as_millis() / BEAT.as_millis() / 2,
            "sidecar {id} sent only {} heartbeats",
            r.sent
        );
    }
    assert_eq!(
        per_beat.len() as u64,
        sent,
        "heartbeats seen by the backend"
    );
    for (key, statuses) in &per_beat {
        assert!(
            statuses == &[200] || statuses == &[401, 200],
            "heartbeat {key:?} got {statuses:?}"
        );
    }
    assert_eq!(counts.other, 0);
    assert_eq!(retried as u64, counts.unauthorized, "one retry per 401");
    assert!(
        counts.unauthorized > unauthorized_before_kill,
        "the deleted current token must have been met"
    );
    let bound = (since_import.as_secs_f64() / (0.75 * TTL_SECS as f64)) as u64 + 3;
    assert!(
        stats.refresh_token_grants <= bound,
        "{} refresh grants in {since_import:?} (bound {bound})",
        stats.refresh_token_grants
    );
    assert!(stats.refresh_token_grants >= 8, "{stats:?}");
    assert_eq!(stats.refresh_token_grant_errors, 0);
}
