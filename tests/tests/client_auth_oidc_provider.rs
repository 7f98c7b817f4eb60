//! Client authentication and client rejection against the real `oidc-provider`
//! (docs/architecture.md, "Client authentication"), driven through `broker-ctl`:
//! - a client fixed to `client_secret_post` while discovery lists both secret
//!   methods: auto-detection costs one Basic attempt, ever, across a restart;
//! - `private_key_jwt` clients (RSA PKCS#1 and EC P-256 SEC1 keys made here,
//!   their JWKS registered with RFC 7591): import, refresh, revocation;
//! - a client secret rotated at the IdP: exit 8, the grant kept on disk and
//!   across a restart, then recovery with `broker-ctl client` and no new login.
//!
//! Counts come from the provider itself (`/test/stats`), not from the broker.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kontext_broker::config::IdentityKind;
use kontext_broker::store::{ProfileRecord, Store, StoreOptions};
use kontext_broker_protocol::ClientAuthMethod;
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess};
use kontext_broker_tests::oidc_provider::{
    OidcProvider, CONFIDENTIAL_CLIENT_SECRET, POST_CLIENT_ID,
};
use kontext_broker_tests::scenario::{broker_ctl, broker_ctl_binary};
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

const PROFILE: &str = "default";
const SCOPES: &[&str] = &["openid", "offline_access"];

/// Runs `broker-ctl` with `stdin` piped in.
async fn broker_ctl_stdin(socket: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = tokio::process::Command::new(broker_ctl_binary())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn broker-ctl");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    child.wait_with_output().await.expect("broker-ctl output")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: stdout {} stderr {}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Writes `content` to a 0600 file in `dir`.
fn private_file(dir: &Path, name: &str, content: &str) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, content.as_bytes()).unwrap();
    path
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

async fn status_profile(broker: &BrokerProcess) -> Value {
    let out = broker_ctl(broker.socket(), &["status", "--json"]).await;
    assert_exit(&out, 0, "status");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["profiles"][0].clone()
}

async fn import(
    broker: &BrokerProcess,
    issuer: &str,
    client_id: &str,
    cred: &[&str],
    minted: &Value,
) {
    let mut args = vec!["import", "--issuer", issuer, "--client-id", client_id];
    args.extend_from_slice(cred);
    let out = broker_ctl_stdin(broker.socket(), &args, &minted.to_string()).await;
    assert_exit(&out, 0, "import");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_only_client_costs_one_basic_attempt_ever_across_a_restart() {
    let provider = OidcProvider::start(60).await;
    let mut broker = BrokerProcess::start(BrokerOptions::default());
    let files = tempfile::tempdir().unwrap();
    let secret = private_file(files.path(), "secret", CONFIDENTIAL_CLIENT_SECRET);
    let minted = provider.mint(POST_CLIENT_ID, SCOPES).await;
    import(
        &broker,
        provider.issuer(),
        POST_CLIENT_ID,
        &["--client-secret-file", secret.to_str().unwrap()],
        &minted,
    )
    .await;

    for _ in 0..2 {
        assert_exit(
            &broker_ctl(broker.socket(), &["refresh"]).await,
            0,
            "refresh",
        );
    }
    let basic = provider
        .client_auth_calls(POST_CLIENT_ID, "client_secret_basic")
        .await;
    let post = provider
        .client_auth_calls(POST_CLIENT_ID, "client_secret_post")
        .await;
    assert_eq!(
        (basic, post),
        (1, 2),
        "one refused Basic try, then post only"
    );
    assert_eq!(
        load(&broker).client_auth_detected,
        Some(ClientAuthMethod::ClientSecretPost),
        "remembered in the profile"
    );

    broker.restart();
    for _ in 0..2 {
        assert_exit(
            &broker_ctl(broker.socket(), &["refresh"]).await,
            0,
            "refresh after restart",
        );
    }
    assert_exit(&broker_ctl(broker.socket(), &["logout"]).await, 0, "logout");
    let basic = provider
        .client_auth_calls(POST_CLIENT_ID, "client_secret_basic")
        .await;
    let post = provider
        .client_auth_calls(POST_CLIENT_ID, "client_secret_post")
        .await;
    eprintln!("client_secret_post client: {basic} Basic attempt(s), {post} post calls (4 refreshes + 1 revocation)");
    assert_eq!(
        (basic, post),
        (1, 5),
        "no Basic attempt after the restart, revocation too"
    );
}

/// A fresh key pair made by Node's crypto: the private key as PEM (`rsa`:
/// PKCS#1 `RSA PRIVATE KEY`; `ec`: SEC1 `EC PRIVATE KEY`, P-256) and the public JWK.
fn node_key_pair(kind: &str) -> (String, Value) {
    let script = r#"
        const { generateKeyPairSync } = require('node:crypto');
        const kind = process.argv[1];
        const { privateKey, publicKey } = kind === 'rsa'
          ? generateKeyPairSync('rsa', { modulusLength: 2048 })
          : generateKeyPairSync('ec', { namedCurve: 'P-256' });
        const pem = privateKey.export({ type: kind === 'rsa' ? 'pkcs1' : 'sec1', format: 'pem' });
        process.stdout.write(JSON.stringify({ pem, jwk: publicKey.export({ format: 'jwk' }) }));
    "#;
    let out = std::process::Command::new("node")
        .args(["-e", script, kind])
        .output()
        .expect("node generates a key pair");
    assert!(out.status.success(), "node: {}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (v["pem"].as_str().unwrap().to_owned(), v["jwk"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_key_jwt_clients_import_refresh_and_revoke() {
    let provider = OidcProvider::start(60).await;
    for (kind, label) in [("rsa", "RSA PRIVATE KEY"), ("ec", "EC PRIVATE KEY")] {
        let broker = BrokerProcess::start(BrokerOptions::default());
        let (pem, jwk) = node_key_pair(kind);
        assert!(pem.contains(label), "{kind}: {pem:.40}");
        let registered = provider
            .register(serde_json::json!({
                "token_endpoint_auth_method": "private_key_jwt",
                "jwks": { "keys": [jwk] },
            }))
            .await;
        let client_id = registered["client_id"].as_str().unwrap().to_owned();
        let files = tempfile::tempdir().unwrap();
        let key = private_file(files.path(), "client.pem", &pem);
        let minted = provider.mint(&client_id, SCOPES).await;
        import(
            &broker,
            provider.issuer(),
            &client_id,
            &["--client-key-file", key.to_str().unwrap()],
            &minted,
        )
        .await;
        let record = load(&broker);
        assert_eq!(record.client_key.as_ref().unwrap().expose(), pem);
        assert!(record.client_secret.is_none());

        let out = broker_ctl(broker.socket(), &["refresh"]).await;
        assert_exit(&out, 0, "refresh with private_key_jwt");
        assert_eq!(
            provider
                .client_auth_calls(&client_id, "private_key_jwt")
                .await,
            1
        );
        let token = text(&broker_ctl(broker.socket(), &["token"]).await.stdout);
        assert_eq!(provider.userinfo_status(token.trim()).await, 200);
        assert_eq!(status_profile(&broker).await["generation"], 2);

        // The key is never shown: not in the broker's log, not in status, and
        // its bytes are not on disk in the clear.
        let key_body: String = pem.lines().nth(1).unwrap().to_owned();
        assert!(
            !broker.stderr().contains(&key_body),
            "{kind}: key in the log"
        );
        let status = text(
            &broker_ctl(broker.socket(), &["status", "--json"])
                .await
                .stdout,
        );
        assert!(!status.contains(&key_body));
        for entry in walk(broker.state_dir()) {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(&key_body),
                "{kind}: key in {} in the clear",
                entry.display()
            );
        }

        let refresh_token = load(&broker).refresh_token.unwrap().expose().to_owned();
        let out = broker_ctl(broker.socket(), &["logout"]).await;
        assert_exit(&out, 0, "logout");
        assert!(
            text(&out.stdout).contains("refresh token revoked"),
            "{}",
            text(&out.stdout)
        );
        assert_eq!(
            provider
                .client_auth_calls(&client_id, "private_key_jwt")
                .await,
            2
        );
        assert!(
            !provider.introspect_active(&refresh_token).await,
            "revoked at the IdP"
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_rotated_at_the_idp_keeps_the_grant_until_broker_ctl_client_fixes_it() {
    let provider = OidcProvider::start(5).await;
    let mut broker = BrokerProcess::start(BrokerOptions::default());
    let registered = provider
        .register(serde_json::json!({ "token_endpoint_auth_method": "client_secret_basic" }))
        .await;
    let client_id = registered["client_id"].as_str().unwrap().to_owned();
    let old_secret = registered["client_secret"].as_str().unwrap().to_owned();
    let files = tempfile::tempdir().unwrap();
    let old_file = private_file(files.path(), "old", &old_secret);
    let minted = provider.mint(&client_id, SCOPES).await;
    import(
        &broker,
        provider.issuer(),
        &client_id,
        &["--client-secret-file", old_file.to_str().unwrap()],
        &minted,
    )
    .await;
    assert_exit(
        &broker_ctl(broker.socket(), &["refresh"]).await,
        0,
        "refresh with the old secret",
    );

    // The admin rotates the secret at the IdP.
    let new_secret = "rotated-secret-0123456789";
    provider.set_client_secret(&client_id, new_secret).await;
    let out = broker_ctl(broker.socket(), &["refresh"]).await;
    assert_exit(&out, 8, "refresh after the rotation");
    let message = text(&out.stderr);
    for needle in [
        provider.issuer(),
        client_id.as_str(),
        "broker-ctl client",
        "invalid_client",
    ] {
        assert!(message.contains(needle), "{needle:?} missing: {message}");
    }
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    let record = load(&broker);
    let kept = record
        .refresh_token
        .clone()
        .expect("the refresh token stays on disk");
    assert!(record.client_rejected.is_some());
    assert!(
        provider.introspect_active(kept.expose()).await,
        "the grant is alive at the IdP"
    );
    assert_eq!(status_profile(&broker).await["state"], "client_rejected");

    // The state survives a restart, and the IdP is not called again: not by the
    // restart, nor by requests once the access token has expired.
    broker.restart();
    assert_eq!(status_profile(&broker).await["state"], "client_rejected");
    let calls_before = provider
        .client_auth_calls(&client_id, "client_secret_basic")
        .await;
    let expires_at = record.access_token.as_ref().unwrap().expires_at;
    while now() <= expires_at {
        // Waiting for a known wall-clock instant (at most the 5 s lifetime).
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..3 {
        assert_exit(
            &broker_ctl(broker.socket(), &["token"]).await,
            8,
            "token while rejected",
        );
    }
    assert_eq!(
        provider
            .client_auth_calls(&client_id, "client_secret_basic")
            .await,
        calls_before,
        "no IdP call while the client is rejected"
    );
    assert!(broker.stderr().matches("rejected the client").count() <= 1);

    // The user gives the new secret: same grant, refreshed at once, no login.
    let new_file = private_file(files.path(), "new", new_secret);
    let out = broker_ctl(
        broker.socket(),
        &["client", "--client-secret-file", new_file.to_str().unwrap()],
    )
    .await;
    assert_exit(&out, 0, "broker-ctl client");
    let token = broker_ctl(broker.socket(), &["token"]).await;
    assert_exit(&token, 0, "token after the fix");
    assert_eq!(
        provider.userinfo_status(text(&token.stdout).trim()).await,
        200
    );
    let record = load(&broker);
    assert!(record.client_rejected.is_none());
    assert_eq!(record.client_secret.unwrap().expose(), new_secret);
    assert_eq!(status_profile(&broker).await["state"], "valid");
    for secret in [old_secret.as_str(), new_secret] {
        assert!(
            !broker.stderr().contains(secret),
            "a client secret reached the log"
        );
    }
}
