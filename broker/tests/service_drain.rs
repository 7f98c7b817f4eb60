//! After `drain` (shutdown), no engine may start and no logout may run: an
//! engine started late would be killed mid-refresh, and a logout would skip
//! revocation yet delete the profile.

use std::sync::Arc;

use futures::future::BoxFuture;
use kontext_broker::clock::SystemClock;
use kontext_broker::config::Config;
use kontext_broker::engine::{RefreshError, Refreshed, TokenEndpoint};
use kontext_broker::idp::Idp;
use kontext_broker::service::{Service, ServiceInfo};
use kontext_broker::store::{ProfileRecord, Store, StoreOptions, StoredAccessToken};
use kontext_broker_protocol::{BrokerError, Request};

struct NeverCalled;

impl TokenEndpoint for NeverCalled {
    fn refresh(&self, _: ProfileRecord) -> BoxFuture<'static, Result<Refreshed, RefreshError>> {
        panic!("no refresh is expected in this test")
    }
}

fn record(name: &str) -> ProfileRecord {
    ProfileRecord::builder(
        name,
        "https://idp.example",
        "cli",
        "https://idp.example/token",
    )
    .refresh_token("rt")
    .access_token(StoredAccessToken::bearer(
        "at",
        u64::MAX / 4,
        u64::MAX / 4 + 3600,
        Vec::<String>::new(),
    ))
    .generation(1)
    .build()
}

#[tokio::test]
async fn nothing_starts_after_drain() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let config = Config::default();
    let store = Arc::new(Store::open(&state, StoreOptions::default()).unwrap());
    let service = Service::with_parts(
        config.clone(),
        ServiceInfo {
            socket: tmp.path().join("s"),
            state_dir: state,
        },
        store,
        Idp::new(&config).unwrap(),
        Arc::new(NeverCalled),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    service.install(record("before")).await.unwrap();

    service.drain().await;

    let err = service.install(record("after")).await.unwrap_err();
    assert!(err.to_string().contains("shutting down"), "{err}");
    let err = service
        .call(Request::Logout {
            profile: "before".into(),
            revoke: true,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, BrokerError::BadRequest { ref detail } if detail.contains("shutting down")),
        "{err:?}"
    );
    // The profile was not deleted.
    let status = match service.call(Request::Status).await.unwrap() {
        kontext_broker_protocol::Response::Status(s) => s,
        other => panic!("{other:?}"),
    };
    assert!(status.profiles.iter().any(|p| p.name == "before"));
}
