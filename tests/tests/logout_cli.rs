//! `broker-ctl logout` and the endpoint overrides of `broker-ctl import`,
//! against a real broker process and the fake IdP: revocation through an
//! endpoint found in either discovery document, given on the command line or
//! in the config file, and exit 9 ("logged out locally; not revoked at the
//! IdP") when revocation was impossible or failed. Needs the broker binaries
//! (`cargo build --workspace --bins`).

use std::process::{Output, Stdio};

use kontext_broker_client::BrokerClient;
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess};
use kontext_broker_tests::fake_idp::{Failure, FakeIdp, FakeIdpConfig, RevocationListing};
use kontext_broker_tests::scenario::{broker_ctl, broker_ctl_binary, connect, import};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// `logout` deleted locally but could not revoke at the IdP.
const NOT_REVOKED: i32 = 9;

struct Setup {
    idp: FakeIdp,
    broker: BrokerProcess,
    client: BrokerClient,
}

async fn setup(listing: RevocationListing, config_toml: impl FnOnce(&str) -> String) -> Setup {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    idp.list_revocation(listing);
    let broker = BrokerProcess::start(BrokerOptions {
        config_toml: config_toml(&idp.issuer()),
        ..Default::default()
    });
    let client = connect(broker.socket()).await;
    Setup {
        idp,
        broker,
        client,
    }
}

/// Imports a fresh grant as `default` and returns its refresh token.
async fn imported(s: &Setup) -> String {
    let minted = s.idp.mint();
    import(
        &s.client,
        "default",
        &s.idp.issuer(),
        s.idp.client_id(),
        &minted,
    )
    .await;
    minted["refresh_token"].as_str().unwrap().to_owned()
}

/// `broker-ctl import ARGS...` with `response` on stdin.
async fn ctl_import(s: &Setup, args: &[&str], response: &Value) -> Output {
    let mut child = tokio::process::Command::new(broker_ctl_binary())
        .arg("--socket")
        .arg(s.broker.socket())
        .arg("import")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running broker-ctl import");
    let mut stdin = child.stdin.take().unwrap();
    // broker-ctl may exit before reading stdin (a refusal); its exit status and stderr
    // then tell the test why, so a broken pipe here is not itself a failure.
    if let Err(e) = stdin.write_all(response.to_string().as_bytes()).await {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe,
            "writing stdin: {e}"
        );
    }
    drop(stdin);
    child.wait_with_output().await.unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn profile_file_exists(s: &Setup) -> bool {
    s.broker.state_dir().join("profiles/default.age").exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_without_any_revocation_endpoint_deletes_locally_and_exits_9() {
    let s = setup(RevocationListing::Nowhere, |_| String::new()).await;
    let refresh_token = imported(&s).await;

    let out = broker_ctl(s.broker.socket(), &["logout"]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(NOT_REVOKED), "{stderr}");
    assert!(text(&out.stdout).contains("logged out `default` locally"));
    for part in [
        "NOT revoked",
        "no revocation endpoint",
        &format!(
            "client `{}` at issuer {}",
            s.idp.client_id(),
            s.idp.issuer()
        ),
        "--revocation-endpoint",
        "revocation_endpoint in [profiles.default]",
    ] {
        assert!(stderr.contains(part), "`{part}` in {stderr}");
    }
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains(&refresh_token), "no token on stderr");
    assert_eq!(s.idp.revocation_calls(), 0);
    assert!(s.idp.grant_alive(&refresh_token), "nothing revoked it");
    assert!(!profile_file_exists(&s), "deleted locally all the same");
    let out = broker_ctl(s.broker.socket(), &["token"]).await;
    assert_eq!(out.status.code(), Some(6), "unknown profile after logout");

    // --no-revoke asked for exactly this: success.
    let refresh_token = imported(&s).await;
    let out = broker_ctl(s.broker.socket(), &["logout", "--no-revoke"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("--no-revoke"));
    assert!(s.idp.grant_alive(&refresh_token));
    assert!(!profile_file_exists(&s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_when_the_revocation_endpoint_answers_500_exits_9() {
    let s = setup(RevocationListing::Everywhere, |_| String::new()).await;
    let refresh_token = imported(&s).await;
    s.idp.fail_revocations(Some(500));

    let out = broker_ctl(s.broker.socket(), &["logout"]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(NOT_REVOKED), "{stderr}");
    assert!(stderr.contains("NOT revoked"), "{stderr}");
    assert!(stderr.contains("HTTP 500"), "{stderr}");
    assert_eq!(s.idp.revocation_calls(), 1);
    assert!(s.idp.grant_alive(&refresh_token));
    assert!(!profile_file_exists(&s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_endpoint_listed_only_in_the_rfc8414_document_is_used() {
    // django-oauth-toolkit's layout: the OIDC document lacks it.
    let s = setup(RevocationListing::Rfc8414Only, |_| String::new()).await;
    let refresh_token = imported(&s).await;

    let out = broker_ctl(s.broker.socket(), &["logout"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("refresh token revoked"));
    assert_eq!(s.idp.revocation_calls(), 1);
    assert!(!s.idp.grant_alive(&refresh_token), "revoked at the IdP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_endpoint_given_to_import_is_used() {
    let s = setup(RevocationListing::Nowhere, |_| String::new()).await;
    let minted = s.idp.mint();
    let issuer = s.idp.issuer();
    let revoke = format!("{issuer}/revoke");
    let out = ctl_import(
        &s,
        &[
            "--issuer",
            &issuer,
            "--client-id",
            s.idp.client_id(),
            "--revocation-endpoint",
            &revoke,
        ],
        &minted,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let out = broker_ctl(s.broker.socket(), &["logout"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(s.idp.revocation_calls(), 1);
    assert!(!s.idp.grant_alive(minted["refresh_token"].as_str().unwrap()));

    // A remote plain-http endpoint is refused before anything is sent.
    let out = ctl_import(
        &s,
        &[
            "--issuer",
            &issuer,
            "--client-id",
            s.idp.client_id(),
            "--revocation-endpoint",
            "http://idp.example/revoke",
        ],
        &s.idp.mint(),
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("plain http"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_endpoint_from_the_profile_config_table_is_used() {
    let s = setup(RevocationListing::Nowhere, |issuer| {
        format!("[profiles.default]\nrevocation_endpoint = \"{issuer}/revoke\"\n")
    })
    .await;
    let refresh_token = imported(&s).await;
    let out = broker_ctl(s.broker.socket(), &["logout"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(s.idp.revocation_calls(), 1);
    assert!(!s.idp.grant_alive(&refresh_token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_saved_without_a_revocation_endpoint_finds_it_at_logout() {
    // Imported while no document listed it (as every broker before the merge
    // saw django-oauth-toolkit); the issuer lists it by logout time.
    let s = setup(RevocationListing::Nowhere, |_| String::new()).await;
    let refresh_token = imported(&s).await;
    s.idp.list_revocation(RevocationListing::Rfc8414Only);
    let out = broker_ctl(s.broker.socket(), &["logout"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!s.idp.grant_alive(&refresh_token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_of_a_dead_grant_has_nothing_to_revoke_and_exits_0() {
    let s = setup(RevocationListing::Everywhere, |_| String::new()).await;
    imported(&s).await;
    s.idp.push_failure(Failure::InvalidGrant);
    let out = broker_ctl(s.broker.socket(), &["refresh"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));

    let out = broker_ctl(s.broker.socket(), &["logout"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("nothing needed revoking"));
    assert_eq!(s.idp.revocation_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_given_to_import_is_the_one_refreshes_use() {
    let s = setup(RevocationListing::Everywhere, |_| String::new()).await;
    let other = FakeIdp::start(FakeIdpConfig::default()).await;
    let token = format!("{}/token", other.issuer());
    let out = ctl_import(
        &s,
        &[
            "--issuer",
            &s.idp.issuer(),
            "--client-id",
            s.idp.client_id(),
            "--token-endpoint",
            &token,
        ],
        &s.idp.mint(),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // The other server does not know the grant: its invalid_grant proves it was asked.
    let out = broker_ctl(s.broker.socket(), &["refresh"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert_eq!(other.token_calls(), 1);
    assert_eq!(s.idp.token_calls(), 0);
}
