//! IdP edges against the fake IdP and the real broker binary: a server that
//! allows only `client_secret_post`, `unauthorized_client` (the grant is kept),
//! and token responses without `expires_in` (a JWT's `exp`, else the configured
//! default lifetime).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use kontext_broker::config::IdentityKind;
use kontext_broker::store::{ProfileRecord, Store, StoreOptions};
use kontext_broker_client::{BrokerClient, Error, ImportRequest, Secret};
use kontext_broker_protocol::{ClientCredential, LifetimeSource, ProfileState};
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess};
use kontext_broker_tests::fake_idp::{Failure, FakeIdp, FakeIdpConfig};
use kontext_broker_tests::scenario::connect;
use serde_json::Value;

const PROFILE: &str = "default";
const SECRET: &str = "fake-client-secret-0123456789";
/// Safety net for loops that end on an observed condition.
const NET: Duration = Duration::from_secs(30);

async fn import(client: &BrokerClient, idp: &FakeIdp, credential: ClientCredential) {
    let minted = idp.mint();
    client
        .import(ImportRequest {
            profile: PROFILE.into(),
            issuer: idp.issuer(),
            client_id: idp.client_id().into(),
            credential,
            client_auth: None,
            scopes: vec!["openid".into(), "offline_access".into()],
            endpoints: Default::default(),
            token_response: Secret::new(minted.to_string()),
        })
        .await
        .expect("import");
}

fn load(broker: &BrokerProcess) -> ProfileRecord {
    Store::open(
        broker.state_dir(),
        StoreOptions {
            identity: IdentityKind::File,
            scrypt_work_factor: None,
        },
    )
    .unwrap()
    .load(PROFILE)
    .expect("the profile loads")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_allows_only_client_secret_post_gets_it_everywhere() {
    let idp = FakeIdp::start(FakeIdpConfig {
        require_client_secret: Some(SECRET.into()),
        client_secret_post_only: true,
        ..FakeIdpConfig::default()
    })
    .await;
    let broker = BrokerProcess::start(BrokerOptions::default());
    let client = connect(broker.socket()).await;
    import(&client, &idp, ClientCredential::Secret(SECRET.into())).await;
    let first = client
        .refresh(PROFILE)
        .await
        .expect("refresh with client_secret_post");
    let second = client.refresh(PROFILE).await.expect("and again");
    assert!(second.generation > first.generation);
    assert_eq!(idp.refresh_successes(), 2);
    let logout = client.logout(PROFILE, true).await.expect("logout");
    assert!(logout.revoked, "{:?}", logout.revoke_error);
    assert_eq!(idp.revocation_calls(), 1);
    assert_eq!(idp.basic_auth_calls(), 0, "Basic was never tried");
    assert!(!broker.stderr().contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_client_keeps_the_grant_and_serves_the_valid_token() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let broker = BrokerProcess::start(BrokerOptions::default());
    let client = connect(broker.socket()).await;
    import(&client, &idp, ClientCredential::None).await;
    let kept = load(&broker).refresh_token.unwrap().expose().to_owned();
    idp.push_failure(Failure::UnauthorizedClient);
    match client.refresh(PROFILE).await {
        Err(Error::ClientRejected { profile, message }) => {
            assert_eq!(profile, PROFILE);
            assert!(message.contains(&idp.issuer()), "{message}");
            assert!(message.contains("unauthorized_client"), "{message}");
            assert!(message.contains("broker-ctl client"), "{message}");
        }
        other => panic!("expected ClientRejected, got {other:?}"),
    }
    let calls = idp.token_calls();
    // The hour-long access token is still served; the IdP is not called.
    for _ in 0..20 {
        client
            .get_token(PROFILE, Duration::ZERO)
            .await
            .expect("valid token served");
    }
    assert_eq!(idp.token_calls(), calls);
    let record = load(&broker);
    assert_eq!(
        record.refresh_token.unwrap().expose(),
        kept,
        "the refresh token stays"
    );
    assert!(idp.grant_alive(&kept));
    let status = client.status().await.unwrap();
    assert_eq!(status.profiles[0].state, ProfileState::ClientRejected);
    // `broker-ctl refresh` tries again, and this time the IdP answers.
    client
        .refresh(PROFILE)
        .await
        .expect("a forced refresh recovers");
    let status = client.status().await.unwrap();
    assert_eq!(status.profiles[0].state, ProfileState::Valid);
}

/// The `exp` claim of a JWT, read the way a test may: without verification.
fn exp_of(jwt: &str) -> u64 {
    let payload = jwt.split('.').nth(1).expect("a JWT");
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    claims["exp"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_expires_in_a_jwt_access_token_is_never_believed_past_its_exp() {
    let idp = FakeIdp::start(FakeIdpConfig {
        access_token_ttl_secs: 2,
        jwt_access_tokens: true,
        omit_expires_in: true,
        ..FakeIdpConfig::default()
    })
    .await;
    // A default far from 2 s, so a token living 2 s can only come from `exp`.
    let broker = BrokerProcess::start(BrokerOptions {
        config_toml: "default_token_lifetime = 600\n".into(),
        ..BrokerOptions::default()
    });
    let client = connect(broker.socket()).await;
    import(&client, &idp, ClientCredential::None).await;
    let status = client.status().await.unwrap();
    assert_eq!(
        status.profiles[0].lifetime_source,
        Some(LifetimeSource::JwtExp)
    );
    // Ask until the broker has refreshed twice: every token it hands out
    // expires, by its own account, no later than the token's `exp`.
    let deadline = std::time::Instant::now() + NET;
    let mut generations = std::collections::BTreeSet::new();
    while generations.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "saw {generations:?}");
        let token = client.get_token(PROFILE, Duration::ZERO).await.unwrap();
        let exp = exp_of(token.access_token.expose());
        assert!(
            token.expires_at <= exp,
            "served until {} past exp {exp}",
            token.expires_at
        );
        assert!(
            exp - token.issued_at <= 3,
            "lifetime {} s",
            exp - token.issued_at
        );
        generations.insert(token.generation);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = client.status().await.unwrap();
    assert_eq!(
        status.profiles[0].lifetime_source,
        Some(LifetimeSource::JwtExp)
    );
    assert!(idp.refresh_successes() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_expires_in_an_opaque_access_token_lives_the_default_lifetime() {
    let idp = FakeIdp::start(FakeIdpConfig {
        omit_expires_in: true,
        ..FakeIdpConfig::default()
    })
    .await;
    let broker = BrokerProcess::start(BrokerOptions {
        config_toml: "default_token_lifetime = 7\n".into(),
        ..BrokerOptions::default()
    });
    let client = connect(broker.socket()).await;
    import(&client, &idp, ClientCredential::None).await;
    let before = now();
    let token = client.refresh(PROFILE).await.unwrap();
    assert_eq!(token.expires_at - token.issued_at, 7);
    assert!(token.issued_at + 1 >= before);
    let status = client.status().await.unwrap();
    assert_eq!(
        status.profiles[0].lifetime_source,
        Some(LifetimeSource::Default)
    );
    let out =
        kontext_broker_tests::scenario::broker_ctl(broker.socket(), &["status", "--json"]).await;
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["profiles"][0]["lifetime_source"], "default");
}
