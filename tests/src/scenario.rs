//! Small helpers shared by the end-to-end tests: connecting, importing, and
//! running `broker-ctl`.

use std::path::{Path, PathBuf};
use std::process::Output;

use kontext_broker_client::{BrokerClient, ImportRequest, ProfileStatus, Secret};
use serde_json::Value;

use crate::fake_idp::FakeIdp;

/// Path of the `broker-ctl` binary (package `kontext-broker-ctl`) next to
/// `kontext-broker`; panics naming the build command when it is missing.
pub fn broker_ctl_binary() -> PathBuf {
    let bin = crate::broker_process::broker_binary().with_file_name("broker-ctl");
    assert!(
        bin.is_file(),
        "{} not found; run `cargo build --workspace --bins`",
        bin.display()
    );
    bin
}

/// Connects a client to the broker at `socket`.
pub async fn connect(socket: &Path) -> BrokerClient {
    BrokerClient::connect_to(socket)
        .await
        .expect("connecting to the broker")
}

/// Imports `response` (an RFC 6749 token response) as `profile`.
pub async fn import(
    client: &BrokerClient,
    profile: &str,
    issuer: &str,
    client_id: &str,
    response: &Value,
) -> ProfileStatus {
    client
        .import(ImportRequest {
            profile: profile.into(),
            issuer: issuer.into(),
            client_id: client_id.into(),
            credential: kontext_broker_protocol::ClientCredential::None,
            client_auth: None,
            endpoints: Default::default(),
            scopes: vec!["openid".into(), "offline_access".into()],
            token_response: Secret::new(response.to_string()),
        })
        .await
        .expect("import")
}

/// Imports a fresh grant of `idp`'s public client as `profile`.
pub async fn import_fake(client: &BrokerClient, profile: &str, idp: &FakeIdp) -> ProfileStatus {
    import(client, profile, &idp.issuer(), idp.client_id(), &idp.mint()).await
}

/// Runs `broker-ctl --socket SOCKET ARGS...` and returns its output.
pub async fn broker_ctl(socket: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(broker_ctl_binary())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .await
        .expect("running broker-ctl")
}

/// A real provider, a broker, a connected client, and one imported grant.
pub struct WithProfile {
    pub provider: crate::oidc_provider::OidcProvider,
    pub broker: crate::broker_process::BrokerProcess,
    pub client: BrokerClient,
    /// The minted token response that was imported.
    pub minted: Value,
    /// The broker's answer to the import.
    pub imported: ProfileStatus,
}

/// The real provider with `ttl`-second access tokens, a broker, a connected
/// client, and one grant of the public client imported as `default`.
pub async fn provider_with_profile(ttl: u64) -> WithProfile {
    use crate::oidc_provider::{OidcProvider, PUBLIC_CLIENT_ID};
    let provider = OidcProvider::start(ttl).await;
    let broker = crate::broker_process::BrokerProcess::start(Default::default());
    let client = connect(broker.socket()).await;
    let minted = provider
        .mint(PUBLIC_CLIENT_ID, &["openid", "offline_access"])
        .await;
    let imported = import(
        &client,
        "default",
        provider.issuer(),
        PUBLIC_CLIENT_ID,
        &minted,
    )
    .await;
    WithProfile {
        provider,
        broker,
        client,
        minted,
        imported,
    }
}
