//! The token engine end to end: the real broker binary against the fake IdP,
//! which counts token-endpoint calls and injects faults (Hydra semantics).

use std::time::{Duration, Instant};

use futures::future::join_all;
use kontext_broker::config::IdentityKind;
use kontext_broker::store::{Store, StoreOptions};
use kontext_broker_client::{BrokerClient, Error};
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess};
use kontext_broker_tests::fake_idp::{Failure, FakeIdp, FakeIdpConfig};
use kontext_broker_tests::scenario::{broker_ctl, connect, import, import_fake};
use rand::Rng;
use serde_json::Value;

const PROFILE: &str = "default";

async fn fake() -> FakeIdp {
    FakeIdp::start(FakeIdpConfig::default()).await
}

/// A minted grant whose access token lives the shortest lifetime the broker
/// believes (1 s); see [`import_expired`].
fn expired(mut response: Value) -> Value {
    response["expires_in"] = 0.into();
    response
}

/// Imports an [`expired`] grant and waits for the known instant its access
/// token expires (a lifetime below 1 s counts as 1 s), so the next request refreshes.
async fn import_expired(client: &BrokerClient, profile: &str, idp: &FakeIdp) {
    let status = import(
        client,
        profile,
        &idp.issuer(),
        idp.client_id(),
        &expired(idp.mint()),
    )
    .await;
    let expires_ms = status.access_token_expires_at.expect("a token") * 1000;
    loop {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        if now_ms >= expires_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis(expires_ms - now_ms)).await;
    }
}

fn broker() -> BrokerProcess {
    BrokerProcess::start(BrokerOptions::default())
}

/// Whether the imported grant's access token is still valid.
enum Grant {
    Fresh,
    /// Already expired: the first request refreshes.
    Expired,
}

/// A fake IdP, a broker, a connected client, and one grant imported as `PROFILE`.
async fn imported(grant: Grant) -> (FakeIdp, BrokerProcess, BrokerClient) {
    let idp = fake().await;
    let broker = broker();
    let client = connect(broker.socket()).await;
    match grant {
        Grant::Fresh => {
            import_fake(&client, PROFILE, &idp).await;
        }
        Grant::Expired => import_expired(&client, PROFILE, &idp).await,
    }
    (idp, broker, client)
}

async fn many_clients(broker: &BrokerProcess, n: usize) -> Vec<BrokerClient> {
    join_all((0..n).map(|_| connect(broker.socket()))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_on_an_expired_token_cause_one_refresh() {
    let (idp, broker, _admin) = imported(Grant::Expired).await;
    let clients = many_clients(&broker, 200).await;

    // Hold the single refresh until every request had the chance to arrive.
    let hold = idp.hold_token_calls();
    let requests = tokio::spawn(async move {
        join_all(clients.iter().map(|c| c.get_token(PROFILE, Duration::ZERO))).await
    });
    idp.wait_for_token_calls(1).await;
    drop(hold);
    let tokens = requests.await.unwrap();
    assert_eq!(idp.token_calls(), 1, "exactly one refresh");
    for token in &tokens {
        let token = token.as_ref().expect("every client gets a token");
        assert_eq!(token.generation, 2);
        assert!(idp.access_token_valid(token.access_token.expose()));
    }
    println!(
        "IdP token calls for 200 concurrent GetToken: {}",
        idp.token_calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_invalidations_cause_one_refresh_and_stale_ones_none() {
    let (idp, broker, admin) = imported(Grant::Fresh).await;
    let stale = admin.get_token(PROFILE, Duration::ZERO).await.unwrap();
    let clients = many_clients(&broker, 200).await;
    let results = join_all(clients.iter().map(|c| c.invalidate(PROFILE, &stale))).await;
    assert_eq!(idp.token_calls(), 1, "one refresh for 200 invalidations");
    let fresh = results[0].as_ref().unwrap().clone();
    assert!(results
        .iter()
        .all(|r| r.as_ref().unwrap().generation == stale.generation + 1));
    // The same stale generation again: served from cache.
    let again = join_all(clients.iter().map(|c| c.invalidate(PROFILE, &stale))).await;
    assert_eq!(idp.token_calls(), 1, "no call for an old generation");
    assert!(again
        .iter()
        .all(|r| r.as_ref().unwrap().access_token == fresh.access_token));
    println!(
        "IdP token calls for 200+200 invalidations: {}",
        idp.token_calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_refresh_token_means_reauth_at_once_and_no_more_calls() {
    let (idp, broker, client) = imported(Grant::Expired).await;
    idp.revoke_all();
    let err = client.get_token(PROFILE, Duration::ZERO).await.unwrap_err();
    let Error::ReauthRequired { message, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        message,
        "Session expired, run `kontext login` to re-authenticate"
    );
    assert_eq!(idp.token_calls(), 1);
    for _ in 0..20 {
        assert!(matches!(
            client.get_token(PROFILE, Duration::ZERO).await,
            Err(Error::ReauthRequired { .. })
        ));
        assert!(matches!(
            client.refresh(PROFILE).await,
            Err(Error::ReauthRequired { .. })
        ));
    }
    let out = broker_ctl(broker.socket(), &["token"]).await;
    assert_eq!(out.status.code(), Some(4), "exit code 4: reauth required");
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Session expired, run `kontext login` to re-authenticate"),
        "{stderr}"
    );
    assert_eq!(idp.token_calls(), 1, "the IdP is never called again");
    let status = client.status().await.unwrap();
    assert_eq!(status.profiles[0].state.as_str(), "reauth_required");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_keep_serving_the_valid_token_and_fail_fast_after_expiry() {
    let idp = fake().await;
    let broker = broker();
    let client = connect(broker.socket()).await;

    // Valid token, IdP failing: a forced refresh fails, the token is still served.
    import_fake(&client, PROFILE, &idp).await;
    let before = client.get_token(PROFILE, Duration::ZERO).await.unwrap();
    idp.push_failure(Failure::Status500);
    let during = client.refresh(PROFILE).await.unwrap();
    assert_eq!(
        during.generation, before.generation,
        "still the valid token"
    );
    assert_eq!(
        client.status().await.unwrap().profiles[0].state.as_str(),
        "backoff"
    );

    // Expired token, IdP failing: IdpUnavailable at once, never a hang.
    import_expired(&client, "other", &idp).await;
    idp.push_failure(Failure::TemporarilyUnavailable);
    let started = Instant::now();
    let err = client.get_token("other", Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    let err = client.get_token("other", Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered, not hung"
    );
    let out = broker_ctl(broker.socket(), &["token", "--profile", "other"]).await;
    assert_eq!(out.status.code(), Some(5), "exit code 5: IdP unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_lying_responses_are_transient_and_harm_nothing() {
    let (idp, _broker, client) = imported(Grant::Fresh).await;
    for failure in [
        Failure::MalformedJson,
        Failure::CloseSocket,
        Failure::InvalidRequest,
        Failure::TooManyRequests {
            retry_after_secs: 1,
        },
    ] {
        idp.push_failure(failure.clone());
        let token = client.refresh(PROFILE).await.unwrap();
        assert_eq!(token.generation, 1, "{failure:?}: the valid token is kept");
        let status = client.status().await.unwrap();
        assert_eq!(status.profiles[0].state.as_str(), "backoff", "{failure:?}");
        // A forced refresh bypasses the backoff; let the next one succeed.
    }
    let token = client.refresh(PROFILE).await.unwrap();
    assert_eq!(token.generation, 2);
    assert!(idp.access_token_valid(token.access_token.expose()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_profiles_and_does_not_refresh_a_valid_token() {
    let (idp, mut broker, client) = imported(Grant::Fresh).await;
    let before = client.get_token(PROFILE, Duration::ZERO).await.unwrap();
    drop(client);
    broker.restart();
    let client = connect(broker.socket()).await;
    let after = client.get_token(PROFILE, Duration::ZERO).await.unwrap();
    assert_eq!(after.access_token, before.access_token);
    assert_eq!(after.generation, before.generation);
    assert_eq!(idp.token_calls(), 0);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_ever_reaches_the_disk_in_plaintext() {
    use base64::Engine;
    let idp = fake().await;
    let broker = broker();
    let client = connect(broker.socket()).await;
    let minted = idp.mint();
    import(&client, PROFILE, &idp.issuer(), idp.client_id(), &minted).await;
    let first_rt = minted["refresh_token"].as_str().unwrap().to_owned();
    let mut secrets = vec![
        minted["access_token"].as_str().unwrap().to_owned(),
        first_rt.clone(),
    ];
    for _ in 0..5 {
        let token = client.refresh(PROFILE).await.unwrap();
        secrets.push(token.access_token.expose().to_owned());
        secrets.push(idp.current_refresh_token(&first_rt).unwrap());
    }
    let mut files = 0;
    let mut stack = vec![broker.state_dir().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            files += 1;
            let bytes = std::fs::read(&path).unwrap();
            for secret in &secrets {
                let forms = [
                    secret.as_bytes().to_vec(),
                    base64::engine::general_purpose::STANDARD
                        .encode(secret)
                        .into_bytes(),
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(secret)
                        .into_bytes(),
                    hex::encode(secret).into_bytes(),
                ];
                for form in forms {
                    assert!(!contains(&bytes, &form), "a token is in {}", path.display());
                }
            }
        }
    }
    assert!(files >= 2, "scanned the identity and the profile");
    // The broker's own log never names a token either.
    let log = broker.stderr();
    assert!(secrets.iter().all(|s| !log.contains(s.as_str())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_refreshes_never_tears_the_store() {
    let idp = fake().await;
    idp.set_latency(Duration::from_millis(5));
    let mut broker = broker();
    let state_dir = broker.state_dir().to_path_buf();
    let mut first_rt = String::new();
    let (mut continued, mut lost_rotation) = (0, 0);
    let mut need_grant = true;
    for _ in 0..20 {
        let client = connect(broker.socket()).await;
        if need_grant {
            need_grant = false;
            let minted = idp.mint();
            first_rt = minted["refresh_token"].as_str().unwrap().to_owned();
            import(&client, PROFILE, &idp.issuer(), idp.client_id(), &minted).await;
        }
        let churn = tokio::spawn(async move {
            loop {
                if client.refresh(PROFILE).await.is_err() {
                    return;
                }
            }
        });
        let delay = rand::rng().random_range(5..60);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        broker.sigkill();
        let _ = churn.await;
        let _ = broker.wait_exit(Duration::from_secs(5));

        // The store loads, whole, after every kill.
        let store = Store::open(
            &state_dir,
            StoreOptions {
                identity: IdentityKind::File,
                scrypt_work_factor: None,
            },
        )
        .unwrap();
        let record = store.load(PROFILE).expect("the store loads after SIGKILL");
        let persisted = record
            .refresh_token
            .expect("a refresh token")
            .expose()
            .to_owned();
        let current = idp.current_refresh_token(&first_rt).unwrap();
        broker.restart();
        if persisted == current {
            // The broker continues with the newest persisted token.
            let client = connect(broker.socket()).await;
            client
                .refresh(PROFILE)
                .await
                .expect("refresh after restart");
            continued += 1;
        } else {
            // Killed after the IdP rotated but before the save finished: the IdP
            // holds a newer token than any disk can. The next refresh would reuse the
            // old one, and the IdP would (rightly) revoke the grant: start a new one.
            lost_rotation += 1;
            need_grant = true;
        }
    }
    println!(
        "after SIGKILL: {continued} rounds continued, {lost_rotation} lost an in-flight rotation"
    );
    assert!(continued > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_never_blocks_another_on_the_same_connection() {
    let (idp, _broker, client) = imported(Grant::Expired).await;
    let hold = idp.hold_token_calls();
    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.get_token(PROFILE, Duration::ZERO).await }
    });
    idp.wait_for_token_calls(1).await;
    // The GetToken waits on the held refresh; the same connection still answers.
    for _ in 0..10 {
        client.ping().await.unwrap();
        client.status().await.unwrap();
    }
    assert!(!slow.is_finished(), "the refresh is still held");
    drop(hold);
    assert_eq!(slow.await.unwrap().unwrap().generation, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rfc8414_only_issuer_is_discovered_and_refreshed() {
    // The kontext backend serves only /.well-known/oauth-authorization-server.
    let idp = FakeIdp::start(FakeIdpConfig {
        discovery: kontext_broker_tests::fake_idp::Discovery::Rfc8414Only,
        ..FakeIdpConfig::default()
    })
    .await;
    let broker = broker();
    let client = connect(broker.socket()).await;
    import_expired(&client, PROFILE, &idp).await;
    let token = client.get_token(PROFILE, Duration::ZERO).await.unwrap();
    assert_eq!(token.generation, 2);
    assert!(idp.access_token_valid(token.access_token.expose()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_client_blames_the_client_and_keeps_the_grant() {
    let (idp, _broker, client) = imported(Grant::Expired).await;
    idp.push_failure(Failure::InvalidClient);
    let err = client.get_token(PROFILE, Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, Error::ClientRejected { .. }), "{err:?}");
    // No further IdP call for requests...
    let err = client.get_token(PROFILE, Duration::ZERO).await.unwrap_err();
    assert!(matches!(err, Error::ClientRejected { .. }), "{err:?}");
    assert_eq!(idp.token_calls(), 1);
    // ...but a forced refresh tries once more, and the kept grant still works.
    let token = client.refresh(PROFILE).await.expect("the grant was kept");
    assert_eq!(idp.token_calls(), 2);
    assert!(idp.access_token_valid(token.access_token.expose()));
}
