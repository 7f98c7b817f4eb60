//! The encrypted store through the running broker: passphrase lock/unlock,
//! corrupt files, and logout with revocation.

use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use kontext_broker_client::{Error, WatchEvent};
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess};
use kontext_broker_tests::fake_idp::{FakeIdp, FakeIdpConfig};
use kontext_broker_tests::oidc_provider::PUBLIC_CLIENT_ID;
use kontext_broker_tests::scenario::{
    broker_ctl, broker_ctl_binary, connect, import, import_fake, provider_with_profile, WithProfile,
};
use tokio::io::AsyncWriteExt;

const PASSPHRASE_CONFIG: &str = "identity = \"passphrase\"\nscrypt_work_factor = 10\n";

/// `broker-ctl unlock --passphrase-fd 0` with `passphrase` on stdin.
async fn unlock(broker: &BrokerProcess, passphrase: &str) -> std::process::Output {
    let mut child = tokio::process::Command::new(broker_ctl_binary())
        .arg("--socket")
        .arg(broker.socket())
        .args(["unlock", "--passphrase-fd", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{passphrase}\n").as_bytes())
        .await
        .unwrap();
    drop(stdin);
    child.wait_with_output().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passphrase_broker_starts_locked_and_lock_unlock_work_end_to_end() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let mut broker = BrokerProcess::start(BrokerOptions {
        config_toml: PASSPHRASE_CONFIG.into(),
        ..BrokerOptions::default()
    });
    let client = connect(broker.socket()).await;
    assert!(client.status().await.unwrap().broker.locked);

    // The first unlock sets the passphrase.
    let out = unlock(&broker, "correct horse").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    import_fake(&client, "default", &idp).await;
    let before = client.get_token("default", Duration::ZERO).await.unwrap();

    // A watcher stays subscribed across lock and unlock.
    let mut watch = client.watch("default").await.unwrap();
    assert!(matches!(
        watch.next().await,
        Some(Ok(WatchEvent::Token { .. }))
    ));

    let out = broker_ctl(broker.socket(), &["lock"]).await;
    assert!(out.status.success());
    assert!(matches!(
        client.get_token("default", Duration::ZERO).await,
        Err(Error::Locked)
    ));
    let out = broker_ctl(broker.socket(), &["token"]).await;
    assert_eq!(out.status.code(), Some(7), "exit 7 while locked");
    let status = client.status().await.unwrap();
    assert!(status.broker.locked);
    assert_eq!(status.profiles[0].state.as_str(), "locked");
    let locked_event = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap();
    assert!(
        matches!(&locked_event, Some(Ok(WatchEvent::State { state, .. })) if state.as_str() == "locked"),
        "{locked_event:?}"
    );

    // A wrong passphrase is refused (exit 1); the right one restores the same token.
    let out = unlock(&broker, "wrong").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));
    let out = unlock(&broker, "correct horse").await;
    assert!(out.status.success());
    let after = client.get_token("default", Duration::ZERO).await.unwrap();
    assert_eq!(after.access_token, before.access_token);
    assert_eq!(
        idp.token_calls(),
        0,
        "unlocking does not refresh a valid token"
    );
    let pushed = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap();
    assert!(
        matches!(pushed, Some(Ok(WatchEvent::Token { .. }))),
        "{pushed:?}"
    );

    // After a restart the broker is locked again and knows the profile by name only.
    drop(watch);
    drop(client);
    broker.restart();
    let client = connect(broker.socket()).await;
    let status = client.status().await.unwrap();
    assert!(status.broker.locked);
    assert_eq!(status.profiles[0].name, "default");
    assert_eq!(status.profiles[0].state.as_str(), "locked");
    assert!(unlock(&broker, "correct horse").await.status.success());
    assert_eq!(
        client
            .get_token("default", Duration::ZERO)
            .await
            .unwrap()
            .access_token,
        before.access_token
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_profile_is_isolated_reported_and_kept() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let mut broker = BrokerProcess::start(BrokerOptions::default());
    let client = connect(broker.socket()).await;
    import_fake(&client, "good", &idp).await;
    import_fake(&client, "bad", &idp).await;
    drop(client);
    broker.sigterm();
    assert!(broker.wait_exit(Duration::from_secs(5)).success());
    let bad = broker.state_dir().join("profiles/bad.age");
    std::fs::write(&bad, b"age-encryption.org/v1\n-> garbage\n").unwrap();
    broker.restart();

    let client = connect(broker.socket()).await;
    let status = client.status().await.unwrap();
    let by_name = |n: &str| {
        status
            .profiles
            .iter()
            .find(|p| p.name == n)
            .unwrap()
            .clone()
    };
    assert_eq!(by_name("good").state.as_str(), "valid");
    let bad_status = by_name("bad");
    assert_eq!(bad_status.state.as_str(), "error");
    assert!(
        bad_status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("kept"),
        "{bad_status:?}"
    );
    assert!(client.get_token("good", Duration::ZERO).await.is_ok());
    assert!(client.get_token("bad", Duration::ZERO).await.is_err());
    let kept: Vec<_> = std::fs::read_dir(broker.state_dir().join("profiles"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("bad.age.corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "the bad file is kept, renamed");
    // A new import replaces the broken profile.
    import_fake(&client, "bad", &idp).await;
    assert!(client.get_token("bad", Duration::ZERO).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_revokes_at_the_provider_deletes_the_file_and_tells_watchers() {
    let WithProfile {
        provider,
        broker,
        client,
        minted,
        ..
    } = provider_with_profile(60).await;
    let refresh_token = minted["refresh_token"].as_str().unwrap();
    assert!(provider.introspect_active(refresh_token).await);
    let mut watch = client.watch("default").await.unwrap();
    assert!(matches!(
        watch.next().await,
        Some(Ok(WatchEvent::Token { .. }))
    ));

    let out = broker_ctl(broker.socket(), &["logout"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "logout: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !provider.introspect_active(refresh_token).await,
        "revoked at the IdP"
    );
    assert!(!broker.state_dir().join("profiles/default.age").exists());
    let removed = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap();
    assert!(
        matches!(removed, Some(Ok(WatchEvent::Removed { .. }))),
        "{removed:?}"
    );
    let out = broker_ctl(broker.socket(), &["token"]).await;
    assert_eq!(out.status.code(), Some(6), "unknown profile after logout");

    // --no-revoke deletes locally and leaves the grant alone.
    let minted = provider
        .mint(PUBLIC_CLIENT_ID, &["openid", "offline_access"])
        .await;
    import(
        &client,
        "default",
        provider.issuer(),
        PUBLIC_CLIENT_ID,
        &minted,
    )
    .await;
    // The same watcher, still subscribed, sees the new login, with a generation
    // above the old session's (a stale client cannot hit a live generation).
    let next = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap();
    assert!(
        matches!(&next, Some(Ok(WatchEvent::Token { token, .. })) if token.generation > 1),
        "{next:?}"
    );
    let out = broker_ctl(broker.socket(), &["logout", "--no-revoke"]).await;
    assert!(out.status.success());
    assert!(
        provider
            .introspect_active(minted["refresh_token"].as_str().unwrap())
            .await
    );
    assert!(!broker.state_dir().join("profiles/default.age").exists());
}
