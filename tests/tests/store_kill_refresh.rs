//! SIGKILL at random points of refresh cycles with rotation, against the real
//! broker binary and a fake IdP with Hydra's strict rotation.
//!
//! Each round: start the broker on the same state dir; check the predictions
//! of the previous round with one forced refresh per profile; run forced
//! refreshes on every profile at once; SIGKILL the broker after a random number
//! of completed refreshes plus a random pause (anywhere in a request, the IdP
//! call, encryption, the temp-file write, fsync or rename). Then, with the
//! broker dead, open the store from this process and load every profile: a
//! file that does not decrypt and parse is a torn write, and none may exist.
//!
//! A profile can still need a new login: when the kill lands after the IdP
//! rotated the refresh token but before the broker's save of the new one was
//! durable, the file holds the old token, which a strictly rotating IdP has
//! already retired (its reuse revokes the grant). The test predicts exactly
//! these cases by comparing the stored refresh token with the IdP's current
//! one, checks each prediction after the restart, and counts them.
//!
//! Rounds: env `KONTEXT_KILL_ROUNDS` (default 20, about 40 s on a loaded
//! 2-core machine; docs/reliability.md has a 500-round run).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kontext_broker::store::{Store, StoreOptions};
use kontext_broker_client::{BrokerClient, Error};
use kontext_broker_tests::broker_process::{BrokerOptions, BrokerProcess};
use kontext_broker_tests::fake_idp::{FakeIdp, FakeIdpConfig};
use kontext_broker_tests::scenario::{connect, import_fake};
use rand::Rng;

const PROFILES: [&str; 4] = ["p0", "p1", "p2", "p3"];
const DEFAULT_ROUNDS: usize = 20;
/// Safety net for waits on events; never a timing assumption.
const SAFETY: Duration = Duration::from_secs(30);

fn rounds() -> usize {
    std::env::var("KONTEXT_KILL_ROUNDS")
        .ok()
        .map(|v| v.parse().expect("KONTEXT_KILL_ROUNDS is a number"))
        .unwrap_or(DEFAULT_ROUNDS)
}

/// What the dead broker's files say about one profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnDisk {
    /// The stored refresh token is the IdP's current one.
    Current,
    /// The IdP rotated past the stored token: a new login is needed.
    Rotated,
}

/// Loads every profile from the dead broker's store; panics on a torn file.
fn inspect(state: &Path, idp: &FakeIdp, round: usize) -> BTreeMap<&'static str, OnDisk> {
    let store = Store::open(state, StoreOptions::default())
        .unwrap_or_else(|e| panic!("round {round}: store does not open: {e}"));
    PROFILES
        .iter()
        .map(|&name| {
            let record = store
                .load(name)
                .unwrap_or_else(|e| panic!("round {round}: profile {name} is torn: {e}"));
            let stored = record
                .refresh_token
                .unwrap_or_else(|| panic!("round {round}: {name} lost its refresh token"));
            let current = idp
                .current_refresh_token(stored.expose())
                .unwrap_or_else(|| panic!("round {round}: {name}'s grant was revoked"));
            let state = if current == stored.expose() {
                OnDisk::Current
            } else {
                OnDisk::Rotated
            };
            (name, state)
        })
        .collect()
}

fn corrupt_files(state: &Path) -> Vec<String> {
    std::fs::read_dir(state.join("profiles"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".corrupt-"))
        .collect()
}

fn temp_files(state: &Path) -> usize {
    std::fs::read_dir(state.join("profiles"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            !name.to_string_lossy().ends_with(".age")
        })
        .count()
}

async fn wait_idle(idp: &FakeIdp) {
    let deadline = Instant::now() + SAFETY;
    while idp.in_flight_refreshes() > 0 {
        assert!(Instant::now() < deadline, "IdP refreshes stuck in flight");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Forced refreshes of every profile, in parallel, until the connection dies.
fn churn(client: Arc<BrokerClient>, done: Arc<AtomicU64>) -> Vec<tokio::task::JoinHandle<()>> {
    PROFILES
        .iter()
        .map(|&name| {
            let client = client.clone();
            let done = done.clone();
            tokio::spawn(async move {
                while client.refresh(name).await.is_ok() {
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_refresh_cycles_never_tears_a_profile() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await;
    let mut broker = BrokerProcess::start(BrokerOptions {
        rust_log: "warn".into(),
        ..BrokerOptions::default()
    });
    let state = broker.state_dir().to_path_buf();
    {
        let client = connect(broker.socket()).await;
        for name in PROFILES {
            import_fake(&client, name, &idp).await;
        }
    }
    let rounds = rounds();
    let mut rng = rand::rng();
    let mut predicted: BTreeMap<&str, OnDisk> = BTreeMap::new();
    let (mut relogins, mut refreshes, mut temp_left) = (0usize, 0u64, 0usize);
    let started = Instant::now();
    for round in 0..rounds {
        if round > 0 {
            broker.restart();
        }
        let client = Arc::new(connect(broker.socket()).await);
        // The previous round's predictions, checked by one forced refresh each.
        for (&name, &disk) in &predicted {
            match (disk, client.refresh(name).await) {
                (OnDisk::Current, Ok(_)) => {}
                (OnDisk::Rotated, Err(Error::ReauthRequired { .. })) => {
                    relogins += 1;
                    import_fake(&client, name, &idp).await;
                }
                (disk, other) => {
                    panic!("round {round}: {name} was {disk:?} on disk, got {other:?}")
                }
            }
        }
        let done = Arc::new(AtomicU64::new(0));
        let tasks = churn(client.clone(), done.clone());
        let target = rng.random_range(0..12u64);
        let deadline = Instant::now() + SAFETY;
        while done.load(Ordering::SeqCst) < target {
            assert!(
                Instant::now() < deadline,
                "round {round}: refreshes stalled"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        // Random kill point inside the next refresh cycles.
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..4000))).await;
        broker.sigkill();
        let status = broker.wait_exit(SAFETY);
        assert!(
            status.code().is_none(),
            "round {round}: broker exited by itself: {status}"
        );
        for task in tasks {
            task.await.unwrap();
        }
        refreshes += done.load(Ordering::SeqCst);
        wait_idle(&idp).await;
        temp_left += temp_files(&state);
        predicted = inspect(&state, &idp, round);
        assert_eq!(corrupt_files(&state), Vec::<String>::new(), "round {round}");
    }
    let lost_now = predicted
        .values()
        .filter(|d| **d == OnDisk::Rotated)
        .count();
    eprintln!(
        "{rounds} SIGKILLs during refresh cycles ({} profiles, {refreshes} completed refreshes, \
         {} IdP refreshes): 0 torn files, {} temp files left by kills (removed at start), \
         {} profiles needed a new login (killed between the IdP's rotation and the durable \
         save), {:?}",
        PROFILES.len(),
        idp.refresh_successes(),
        temp_left,
        relogins + lost_now,
        started.elapsed()
    );
}
