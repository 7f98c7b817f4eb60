//! SIGKILL during a rotation loop never leaves a torn or unloadable record.
//!
//! The child is this test binary re-executed with [`CHILD_ENV`] set, running
//! only [`churn_child`], which saves generation n with refresh token `rt-n` in
//! a tight loop and prints `SAVED n` after each save returns.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kontext_broker::store::{ProfileRecord, Store, StoreOptions, StoredAccessToken};
use kontext_broker_protocol::Secret;
use rand::Rng;

const CHILD_ENV: &str = "KONTEXT_STORE_TEST_CHURN_DIR";
const PROFILE: &str = "churn";
const KILLS: usize = 200;

fn rotate(record: &mut ProfileRecord, generation: u64) {
    record.generation = generation;
    record.refresh_token = Some(Secret::new(format!("rt-{generation}")));
    record.access_token = Some(StoredAccessToken {
        lifetime_source: None,
        token: Secret::new(format!("at-{generation}")),
        token_type: "Bearer".into(),
        issued_at: generation,
        expires_at: generation + 3600,
        scopes: vec!["openid".into()],
    });
}

fn initial() -> ProfileRecord {
    let mut r = ProfileRecord::builder(
        PROFILE,
        "https://idp.example",
        "cli",
        "https://idp.example/token",
    )
    .scopes(["openid"])
    .build();
    rotate(&mut r, 0);
    r
}

/// The churn loop; a no-op unless this process is the re-executed child.
#[test]
fn churn_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let store = Store::open(Path::new(&dir), StoreOptions::default()).unwrap();
    let mut record = store.load(PROFILE).unwrap();
    let mut out = std::io::stdout().lock();
    loop {
        let next = record.generation + 1;
        rotate(&mut record, next);
        store.save(&record).unwrap();
        // Newline-terminated marker; libtest may print on the same line first.
        writeln!(out, "SAVED {next}").unwrap();
        out.flush().unwrap();
    }
}

/// Asserts the store holds a whole record of generation `reported` or `reported + 1`.
fn check(state: &Path, reported: u64, round: usize) -> u64 {
    let store = Store::open(state, StoreOptions::default()).unwrap();
    let r = store
        .load(PROFILE)
        .unwrap_or_else(|e| panic!("round {round}: load failed: {e}"));
    let g = r.generation;
    assert!(
        g == reported || g == reported + 1,
        "round {round}: generation {g}, child reported {reported}"
    );
    assert_eq!(
        r.refresh_token.unwrap().expose(),
        format!("rt-{g}"),
        "round {round}"
    );
    assert_eq!(
        r.access_token.unwrap().token.expose(),
        format!("at-{g}"),
        "round {round}"
    );
    g
}

#[test]
fn sigkill_during_rotation_never_tears_a_record() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    Store::open(&state, StoreOptions::default())
        .unwrap()
        .save(&initial())
        .unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::rng();
    let mut current = 0u64;
    let mut saves_seen = 0usize;
    let started = Instant::now();
    for round in 0..KILLS {
        let mut child = Command::new(&exe)
            .args(["--exact", "churn_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &state)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel::<u64>();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(pos) = line.find("SAVED ") {
                    let n = line[pos + 6..].trim().parse().unwrap();
                    if tx.send(n).is_err() {
                        break;
                    }
                }
            }
        });
        // Random kill point: after 0-4 reported saves plus 0-3 ms, which lands
        // anywhere inside startup, encryption, the write, fsync or rename.
        let mut reported = current;
        for _ in 0..rng.random_range(0..5) {
            // Safety net only: a healthy child reports a save within milliseconds.
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(n) => reported = n,
                Err(e) => panic!(
                    "round {round}: child stopped reporting ({e}): {:?}",
                    child.try_wait()
                ),
            }
        }
        std::thread::sleep(Duration::from_micros(rng.random_range(0..3000)));
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.code().is_none(),
            "round {round}: child exited by itself: {status}"
        );
        reader.join().unwrap();
        for n in rx.try_iter() {
            reported = n;
        }
        saves_seen += (reported - current) as usize;
        current = check(&state, reported, round);
    }
    let store = Store::open(&state, StoreOptions::default()).unwrap();
    assert_eq!(store.profile_names().unwrap(), vec![PROFILE]);
    let stale = store.remove_stale_temp_files().unwrap();
    eprintln!(
        "{KILLS} kills, {saves_seen} reported saves, final generation {current}, \
         {stale} stale temp files, {:?}",
        started.elapsed()
    );
    assert!(saves_seen > KILLS, "the children barely saved anything");
}
