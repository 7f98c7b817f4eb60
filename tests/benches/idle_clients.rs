//! Memory budget (contract §9): 1000 idle clients fit in at most 30 MB of broker RSS.
//!
//! Starts the broker binary next to this bench (`target/release` under
//! `cargo bench`, falling back to `target/debug`; `KONTEXT_BROKER_BIN` wins),
//! opens 1000 idle, greeted `BrokerClient` connections and prints the broker's
//! RSS before and after; then does the same with 1000 `BrokerTokenSource`s, each
//! holding a `Watch` on a profile (what idle sidecars look like). Exits non-zero
//! when either exceeds the budget.
//!
//! ```text
//! cargo build --release -p kontext-broker --bins   # or a debug build
//! cargo bench -p kontext-broker-tests --bench idle_clients
//! ```

use std::time::{Duration, Instant};

use kontext_broker_client::{BrokerClient, BrokerTokenSource};
use kontext_broker_tests::broker_process::{broker_binary, BrokerOptions, BrokerProcess};
use kontext_broker_tests::fake_idp::{FakeIdp, FakeIdpConfig};
use kontext_broker_tests::scenario::import_fake;

const CLIENTS: u64 = 1000;
/// 30 MB (decimal, the stricter reading) in KiB.
const BUDGET_KIB: u64 = 30_000_000 / 1024;

/// The broker RSS once it reports exactly `want` connections (safety net: 60 s).
async fn rss_at(broker: &BrokerProcess, probe: &BrokerClient, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = probe.status().await.expect("status");
        if status.broker.connections == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "broker reports {} connections",
            status.broker.connections
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.rss_kib().expect("VmRSS (Linux only)")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let mut bin = broker_binary();
    if !bin.is_file() {
        let debug = bin
            .parent()
            .and_then(|p| p.parent())
            .map(|t| t.join("debug").join("kontext-broker"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| panic!("{} is missing: build kontext-broker first", bin.display()));
        bin = debug;
    }
    // Read by `BrokerProcess`; set before any thread of ours looks at the env.
    std::env::set_var("KONTEXT_BROKER_BIN", &bin);
    // Every client is one fd here and one in the broker, which inherits our limit.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
        .expect("setrlimit");

    let broker = BrokerProcess::start(BrokerOptions {
        rust_log: "warn".into(),
        ..BrokerOptions::default()
    });
    let probe = BrokerClient::connect_to(broker.socket())
        .await
        .expect("connect");
    let baseline = rss_at(&broker, &probe, 1).await;
    let mut clients = Vec::with_capacity(CLIENTS as usize);
    let started = Instant::now();
    for _ in 0..CLIENTS {
        clients.push(
            BrokerClient::connect_to(broker.socket())
                .await
                .expect("connect"),
        );
    }
    let opened = started.elapsed();
    let loaded = rss_at(&broker, &probe, CLIENTS + 1).await;
    let per_client = (loaded.saturating_sub(baseline) as f64) * 1024.0 / CLIENTS as f64;
    println!(
        "idle_clients: broker {}: RSS {baseline} KiB idle, {loaded} KiB with {CLIENTS} idle clients \
         (+{per_client:.0} B per client; opened in {opened:?}); budget {BUDGET_KIB} KiB (30 MB)",
        bin.display()
    );
    drop(clients);

    // The same with watching token sources on one profile.
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    import_fake(&probe, "default", &idp).await;
    let idle = rss_at(&broker, &probe, 1).await;
    let started = Instant::now();
    let sources: Vec<BrokerTokenSource> = (0..CLIENTS)
        .map(|_| BrokerTokenSource::builder().socket(broker.socket()).build())
        .collect();
    for s in &sources {
        let mut updates = s.updates();
        tokio::time::timeout(Duration::from_secs(60), async {
            while s.cached_generation().is_none() {
                updates.changed().await.expect("source alive");
            }
        })
        .await
        .expect("a source never got its first push");
    }
    let subscribed = started.elapsed();
    let watching = rss_at(&broker, &probe, CLIENTS + 1).await;
    println!(
        "idle_clients: RSS {idle} KiB with one profile, {watching} KiB with {CLIENTS} watching token \
         sources (+{:.0} B per source; subscribed in {subscribed:?})",
        (watching.saturating_sub(idle) as f64) * 1024.0 / CLIENTS as f64
    );
    drop(sources);

    let worst = loaded.max(watching);
    if worst > BUDGET_KIB {
        eprintln!("idle_clients: OVER BUDGET: {worst} KiB > {BUDGET_KIB} KiB");
        std::process::exit(1);
    }
}
