//! Benchmark: startup cost of opening the store and loading 100 profiles with a
//! file identity. Run with `cargo bench -p kontext-broker --bench store_load`.

use std::time::{Duration, Instant};

use kontext_broker::store::{ProfileRecord, Store, StoreOptions, StoredAccessToken};

fn record(i: usize) -> ProfileRecord {
    ProfileRecord::builder(
        format!("profile-{i:03}"),
        "https://idp.example",
        "cli",
        "https://idp.example/token",
    )
    .scopes(["openid", "offline_access"])
    .revocation("https://idp.example/revoke")
    .subject("user@example")
    .refresh_token("r".repeat(600))
    .access_token(StoredAccessToken::bearer(
        "a".repeat(1200),
        1,
        2,
        ["openid"],
    ))
    .generation(i as u64)
    .build()
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
