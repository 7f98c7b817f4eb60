//! Shared setup for the fuzz checks: an in-process broker service with no
//! network (every IdP URL points at a closed loopback port) and a seeded profile.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kontext_broker::clock::SystemClock;
use kontext_broker::config::Config;
use kontext_broker::engine::{RefreshError, Refreshed, TokenEndpoint};
use kontext_broker::idp::Idp;
use kontext_broker::service::{Service, ServiceInfo};
use kontext_broker::store::{
    Endpoints, ProfileRecord, Store, StoreOptions, StoredAccessToken, PROFILE_FORMAT_VERSION,
};
use kontext_broker_protocol::Secret;

/// A closed loopback port: connecting fails at once, so no input reaches a network.
pub const DEAD_URL: &str = "http://127.0.0.1:1";

/// The profile every run starts with.
pub const SEEDED: &str = "default";

/// Makes every HTTP client of this process fail fast instead of resolving names:
/// reqwest honours these variables, and the proxy is a closed port.
pub fn cut_network() {
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        std::env::set_var(var, DEAD_URL);
    }
    std::env::remove_var("NO_PROXY");
    std::env::remove_var("no_proxy");
}

/// Config with short HTTP timeouts, so even a slow failure costs little.
pub fn fuzz_config() -> Config {
    Config {
        http_connect_timeout_secs: 1,
        http_timeout_secs: 2,
        ..Config::default()
    }
}

/// A token endpoint that always rotates, without I/O.
pub struct InstantIdp;

impl TokenEndpoint for InstantIdp {
    fn refresh(
        &self,
        record: ProfileRecord,
    ) -> BoxFuture<'static, Result<Refreshed, RefreshError>> {
        let n = record.generation + 1;
        Box::pin(async move {
            Ok(Refreshed {
                access_token: Secret::new(format!("at-{n}")),
                token_type: "Bearer".into(),
                expires_in: Some(Duration::from_secs(3600)),
                refresh_token: Some(Secret::new(format!("rt-{n}"))),
                scopes: None,
                client_auth_detected: None,
            })
        })
    }
}

/// A record with a valid hour-long token and dead-port endpoints.
pub fn seeded_record(now_secs: u64) -> ProfileRecord {
    ProfileRecord {
        format_version: PROFILE_FORMAT_VERSION,
        name: SEEDED.into(),
        issuer: DEAD_URL.into(),
        client_id: "cli".into(),
        client_secret: None,
        client_key: None,
        client_auth: None,
        client_auth_detected: None,
        client_rejected: None,
        scopes: vec!["openid".into()],
        audience: None,
        endpoints: Endpoints {
            token: format!("{DEAD_URL}/token"),
            revocation: Some(format!("{DEAD_URL}/revoke")),
            ..Endpoints::default()
        },
        subject: Some("alice".into()),
        refresh_token: Some(Secret::from("rt-0")),
        access_token: Some(StoredAccessToken {
            lifetime_source: None,
            token: Secret::from("at-0"),
            token_type: "Bearer".into(),
            issued_at: now_secs,
            expires_at: now_secs + 3600,
            scopes: vec!["openid".into()],
        }),
        generation: 1,
    }
}

/// A scratch directory on tmpfs when there is one (fsync is cheap there).
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).expect("creating a scratch dir in /dev/shm")
    } else {
        tempfile::tempdir().expect("creating a scratch dir")
    }
}

/// A service over a fresh store in `dir`, with [`SEEDED`] installed.
pub async fn service_in(dir: &std::path::Path, socket: PathBuf) -> Service {
    let config = fuzz_config();
    let state_dir = dir.join("state");
    let store = Arc::new(Store::open(&state_dir, StoreOptions::default()).expect("store"));
    let idp = Idp::new(&config).expect("idp");
    let service = Service::with_parts(
        config,
        ServiceInfo { socket, state_dir },
        store,
        idp,
        Arc::new(InstantIdp),
        Arc::new(SystemClock),
    )
    .await
    .expect("service");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    service.install(seeded_record(now)).await.expect("seeding");
    service
}
