//! Benchmark: startup cost of opening the store and loading 100 profiles with a
//! file identity. Run with `cargo bench -p kontext-broker --bench store_load`.

use std::time::{Duration, Instant};

use kontext_broker::store::{
    Endpoints, ProfileRecord, Store, StoreOptions, StoredAccessToken, PROFILE_FORMAT_VERSION,
};
use kontext_broker_protocol::Secret;

fn record(i: usize) -> ProfileRecord {
    ProfileRecord {
        format_version: PROFILE_FORMAT_VERSION,
        name: format!("profile-{i:03}"),
        issuer: "https://idp.example".into(),
        client_id: "cli".into(),
        client_secret: None,
        client_key: None,
        client_auth: None,
        client_auth_detected: None,
        client_rejected: None,
        scopes: vec!["openid".into(), "offline_access".into()],
        audience: None,
        endpoints: Endpoints {
            token: "https://idp.example/token".into(),
            revocation: Some("https://idp.example/revoke".into()),
            ..Endpoints::default()
        },
        subject: Some("user@example".into()),
        refresh_token: Some(Secret::new("r".repeat(600))),
        access_token: Some(StoredAccessToken {
            lifetime_source: None,
            token: Secret::new("a".repeat(1200)),
            token_type: "Bearer".into(),
            issued_at: 1,
            expires_at: 2,
            scopes: vec!["openid".into()],
        }),
        generation: i as u64,
    }
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let store = Store::open(&state, StoreOptions::default()).unwrap();
    let t = Instant::now();
    for i in 0..100 {
        store.save(&record(i)).unwrap();
    }
    let save_all = t.elapsed();
    drop(store);

    let mut runs: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let store = Store::open(&state, StoreOptions::default()).unwrap();
            let names = store.profile_names().unwrap();
            assert_eq!(names.len(), 100);
            for name in &names {
                store.load(name).unwrap();
            }
            t.elapsed()
        })
        .collect();
    runs.sort();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    eprintln!(
        "[{profile}] open + list + load 100 profiles: median {:?} (min {:?}, max {:?}); \
         saving 100 (with fsyncs): {save_all:?}",
        runs[2], runs[0], runs[4]
    );
}
