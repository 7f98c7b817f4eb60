//! The token engine end to end against the real certified OpenID Provider
//! (`oidc-provider`), with 5 s access tokens and rotating refresh tokens.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use kontext_broker_client::{Error, WatchEvent};
use kontext_broker_tests::scenario::{broker_ctl, connect, provider_with_profile, WithProfile};

const PROFILE: &str = "default";

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_every_200ms_for_30s_never_sees_an_expired_token() {
    let WithProfile {
        provider,
        broker,
        client,
        ..
    } = provider_with_profile(5).await;

    // A watcher records when each new token arrived, to show refreshes are proactive.
    let mut watch = client.watch(PROFILE).await.unwrap();
    let arrivals = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(Ok(event)) = watch.next().await {
            if let WatchEvent::Token { token, .. } = event {
                eprintln!(
                    "token event: at {} ms, generation {}, issued_at {}, expires_at {}",
                    unix_ms(),
                    token.generation,
                    token.issued_at,
                    token.expires_at
                );
                seen.push((unix_ms(), token.generation, token.expires_at));
            }
        }
        seen
    });

    let started = Instant::now();
    let (mut beats, mut rejected) = (0, 0);
    let mut generations = std::collections::BTreeSet::new();
    while started.elapsed() < Duration::from_secs(30) {
        let token = client.get_token(PROFILE, Duration::ZERO).await.unwrap();
        generations.insert(token.generation);
        let status = provider.userinfo_status(token.access_token.expose()).await;
        if status != 200 {
            rejected += 1;
            eprintln!(
                "heartbeat {beats}: userinfo answered {status} for generation {}",
                token.generation
            );
        }
        beats += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(rejected, 0, "no heartbeat may be rejected ({beats} sent)");
    assert!(beats >= 100, "{beats} heartbeats");
    // 30 s of 5 s tokens refreshed at about 80%: at least 6 new generations.
    assert!(generations.len() >= 7, "generations seen: {generations:?}");

    drop(client);
    let status_client = connect(broker.socket()).await;
    let status = status_client.status().await.unwrap();
    let profile = &status.profiles[0];
    assert!(profile.refresh_count >= 6, "{profile:?}");
    // Token-endpoint calls stay at about one per 0.8 × TTL.
    assert!(
        profile.refresh_count <= 30 * 10 / (8 * 5) + 3,
        "{profile:?}"
    );
    drop(status_client);
    let arrivals = tokio::time::timeout(Duration::from_secs(10), async {
        broker.sigterm();
        arrivals.await.unwrap()
    })
    .await
    .unwrap_or_default();
    // Every new token arrived while its predecessor was still valid.
    for pair in arrivals.windows(2) {
        let (arrived_ms, generation, _) = pair[1];
        let previous_expiry_ms = pair[0].2 * 1000;
        assert!(
            arrived_ms < previous_expiry_ms,
            "generation {generation} arrived {} ms after its predecessor expired",
            arrived_ms - previous_expiry_ms
        );
    }
    println!(
        "heartbeats: {beats}, generations: {}, refreshes: {}",
        generations.len(),
        profile.refresh_count
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_latency_against_the_real_provider() {
    let WithProfile {
        provider,
        broker: _broker,
        client,
        ..
    } = provider_with_profile(60).await;
    let mut samples = Vec::new();
    let mut last = 0;
    for _ in 0..20 {
        let started = Instant::now();
        let token = client.refresh(PROFILE).await.unwrap();
        samples.push(started.elapsed());
        assert!(token.generation > last, "every forced refresh rotates");
        last = token.generation;
        assert_eq!(
            provider.userinfo_status(token.access_token.expose()).await,
            200
        );
    }
    samples.sort();
    println!(
        "forced refresh round trip via the broker (real provider, rotation, save): median {:?}, max {:?}",
        samples[samples.len() / 2],
        samples[samples.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_token_the_provider_forgot_means_reauth_required() {
    let WithProfile {
        mut provider,
        broker,
        client,
        ..
    } = provider_with_profile(60).await;
    // In-memory storage: a restart kills every grant.
    provider.restart().await;
    let err = client.refresh(PROFILE).await.unwrap_err();
    let Error::ReauthRequired { message, .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!(
        message,
        "Session expired, run `kontext login` to re-authenticate"
    );
    let out = broker_ctl(broker.socket(), &["token"]).await;
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("kontext login"), "{stderr}");
    // The broker logged the dead grant once, at warn.
    let log = broker.stderr();
    assert_eq!(log.matches("a new login is required").count(), 1, "{log}");
}
