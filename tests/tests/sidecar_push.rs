//! Push delivery to `BrokerTokenSource`s (contract §8): every subscribed source
//! holds each new token soon after a refresh, without asking the broker for it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kontext_broker_client::{BrokerTokenSource, TokenSource};
use kontext_broker_tests::backend::provider_stats;
use kontext_broker_tests::broker_process::BrokerProcess;
use kontext_broker_tests::scenario::{connect, provider_with_profile, WithProfile};

const PROFILE: &str = "default";
const SOURCES: usize = 10;
const REFRESHES: usize = 20;
/// Generous bound on one push's delay; the 50 ms budget is for benchmarks.
const PUSH_BOUND: Duration = Duration::from_secs(2);

/// The generations one source came to hold, with when it held each.
type Held = Arc<Mutex<Vec<(u64, Instant)>>>;

/// Waits until `source` caches generation `at_least` or newer.
async fn wait_generation(source: &BrokerTokenSource, at_least: u64) {
    let mut updates = source.updates();
    tokio::time::timeout(Duration::from_secs(20), async {
        while source.cached_generation().is_none_or(|g| g < at_least) {
            updates.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("source never held generation {at_least}"));
}

/// Lines of the broker's debug log naming `request`, once the log has caught
/// up with a `Ping` sent after everything the caller wants counted.
async fn requests_logged(broker: &BrokerProcess, request: &str) -> usize {
    let pings = |log: &str| log.matches("request=\"Ping\"").count();
    let before = pings(&broker.stderr());
    connect(broker.socket()).await.ping().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pings(&broker.stderr()) <= before {
        assert!(
            Instant::now() < deadline,
            "the broker never logged the Ping"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    broker
        .stderr()
        .matches(&format!("request=\"{request}\""))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_source_gets_every_refreshed_token_pushed() {
    // 60 s tokens: no proactive refresh, and no source ever holds a stale token.
    let WithProfile {
        provider,
        broker,
        client,
        imported,
        ..
    } = provider_with_profile(60).await;

    let sources: Vec<BrokerTokenSource> = (0..SOURCES)
        .map(|_| BrokerTokenSource::builder().socket(broker.socket()).build())
        .collect();
    for s in &sources {
        wait_generation(s, imported.generation).await;
    }

    // One recorder per source: every generation it came to hold, and when,
    // up to the last one (each forced refresh adds one generation).
    let last_generation = imported.generation + REFRESHES as u64;
    let seen: Vec<Held> = (0..SOURCES).map(|_| Arc::default()).collect();
    let recorders: Vec<_> = sources
        .iter()
        .zip(&seen)
        .map(|(source, seen)| {
            let (source, seen) = (source.clone(), seen.clone());
            let mut updates = source.updates();
            tokio::spawn(async move {
                let mut last = source.cached_generation().unwrap();
                while last < last_generation && updates.changed().await.is_ok() {
                    let now = Instant::now();
                    match source.cached_generation() {
                        Some(g) if g > last => {
                            seen.lock().unwrap().push((g, now));
                            last = g;
                        }
                        _ => {}
                    }
                }
            })
        })
        .collect();

    let mut refreshed = Vec::new();
    let mut round_trips = Vec::new();
    for _ in 0..REFRESHES {
        let sent = Instant::now();
        let token = client.refresh(PROFILE).await.unwrap();
        let answered = Instant::now();
        round_trips.push(answered - sent);
        for s in &sources {
            wait_generation(s, token.generation).await;
        }
        refreshed.push((token.generation, answered));
    }
    for r in recorders {
        tokio::time::timeout(Duration::from_secs(20), r)
            .await
            .expect("a recorder never saw the last generation")
            .unwrap();
    }

    // Each source held each generation, in order (the next refresh started only
    // after every source had the previous one, so no update was coalesced).
    let generations: Vec<u64> = refreshed.iter().map(|(g, _)| *g).collect();
    let mut delays = Vec::new();
    let mut before_answer = 0;
    for (i, seen) in seen.iter().enumerate() {
        let seen = seen.lock().unwrap();
        let held: Vec<u64> = seen.iter().map(|(g, _)| *g).collect();
        assert_eq!(held, generations, "source {i}");
        for ((_, at), (_, answered)) in seen.iter().zip(&refreshed) {
            // A push may beat the refresh's own answer; that counts as zero.
            if at < answered {
                before_answer += 1;
            }
            delays.push(at.saturating_duration_since(*answered));
        }
    }
    // And `token()` serves the newest from memory.
    for s in &sources {
        assert_eq!(
            s.token().await.unwrap().generation,
            *generations.last().unwrap()
        );
    }
    // No source ever asked the broker for a token: everything came by push.
    assert_eq!(requests_logged(&broker, "GetToken").await, 0);
    assert_eq!(requests_logged(&broker, "Invalidate").await, 0);
    assert_eq!(
        provider_stats(provider.issuer()).await.refresh_token_grants,
        REFRESHES as u64
    );

    delays.sort();
    round_trips.sort();
    let p50 = delays[delays.len() / 2];
    let p99 = delays[(delays.len() * 99).div_ceil(100) - 1];
    println!(
        "push to {SOURCES} sources after each of {REFRESHES} refreshes: p50 {p50:?}, p99 {p99:?}, \
         max {:?}; {before_answer} of {} pushes arrived before the refresh answer \
         (refresh round trip p50 {:?})",
        delays.last().unwrap(),
        delays.len(),
        round_trips[round_trips.len() / 2]
    );
    assert!(
        *delays.last().unwrap() <= PUSH_BOUND,
        "slowest push {:?}",
        delays.last()
    );
}

/// A source asked for a token before its first push falls back to `GetToken`,
/// and must not make the broker refresh a token it would itself consider fresh.
///
/// Guards a fixed bug: the source used to ask for `max_margin` (30 s) of
/// validity, which the broker caps at `lifetime - margin`, so every token
/// living under 5 min was refreshed on a cold start. It now asks for nothing
/// when cold (the broker's margin is the source's) and for its own margin when
/// its cached token is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_source_does_not_force_a_refresh() {
    let WithProfile {
        provider,
        broker,
        imported,
        ..
    } = provider_with_profile(5).await;
    // The condition under test: a token past a tenth of its lifetime, far
    // from the broker's 80% refresh point.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let source = BrokerTokenSource::builder().socket(broker.socket()).build();
    let token = source.token().await.unwrap();
    assert_eq!(token.generation, imported.generation);
    assert_eq!(
        provider_stats(provider.issuer()).await.refresh_token_grants,
        0
    );
}
