//! Store behaviour: round trips, identities, locking, permissions, corruption.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kontext_broker::config::IdentityKind;
use kontext_broker::store::{
    ProfileRecord, Store, StoreOptions, StoredAccessToken, UnlockThrottle,
};
use kontext_broker::Error;
use kontext_broker_protocol::Secret;

fn record(name: &str, generation: u64) -> ProfileRecord {
    ProfileRecord::builder(
        name,
        "https://idp.example",
        "cli",
        "https://idp.example/token",
    )
    .client_secret("client-secret")
    .scopes(["openid", "offline_access"])
    .audience("api")
    .revocation("https://idp.example/revoke")
    .subject("alice@example")
    .refresh_token(format!("rt-{generation}"))
    .access_token(StoredAccessToken::bearer(
        format!("at-{generation}"),
        1_700_000_000,
        1_700_003_600,
        ["openid"],
    ))
    .generation(generation)
    .build()
}

/// A state dir path inside a fresh temp dir (which itself may be 0755).
fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    (tmp, state)
}

fn file_opts() -> StoreOptions {
    StoreOptions::default()
}

fn pass_opts() -> StoreOptions {
    StoreOptions {
        identity: IdentityKind::Passphrase,
        scrypt_work_factor: Some(10),
    }
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn file_identity_round_trip_across_reopen() {
    let (_tmp, state) = state_dir();
    let store = Store::open(&state, file_opts()).unwrap();
    assert!(!store.is_locked());
    assert_eq!(store.state_dir(), state);
    let a = record("default", 3);
    let b = record("work.prod", 9);
    store.save(&a).unwrap();
    store.save(&b).unwrap();
    drop(store);

    let store = Store::open(&state, file_opts()).unwrap();
    assert_eq!(store.profile_names().unwrap(), vec!["default", "work.prod"]);
    let loaded = store.load("default").unwrap();
    assert_eq!(loaded, a);
    assert_eq!(store.load("work.prod").unwrap(), b);
    // Debug output of a loaded record and of the store shows no secret.
    let shown = format!("{loaded:?} {store:?}");
    for secret in ["rt-3", "at-3", "client-secret", "AGE-SECRET-KEY"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    // Modes: state and profiles dirs 0700, identity and profile files 0600.
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("profiles")), 0o700);
    assert_eq!(mode(&state.join("identity.txt")), 0o600);
    assert_eq!(mode(&state.join("profiles/default.age")), 0o600);
}

#[test]
fn delete_and_unknown_profile() {
    let (_tmp, dir) = state_dir();
    let store = Store::open(dir.as_path(), file_opts()).unwrap();
    store.save(&record("a", 1)).unwrap();
    store.delete("a").unwrap();
    assert!(matches!(store.load("a"), Err(Error::UnknownProfile(n)) if n == "a"));
    assert!(matches!(store.delete("a"), Err(Error::UnknownProfile(_))));
    assert!(store.profile_names().unwrap().is_empty());
}

#[test]
fn names_are_validated_everywhere() {
    let (_tmp, dir) = state_dir();
    let store = Store::open(dir.as_path(), file_opts()).unwrap();
    for bad in ["../x", ".hidden", "a/b", "", ".."] {
        assert!(
            matches!(store.load(bad), Err(Error::InvalidProfileName(_))),
            "{bad}"
        );
        assert!(matches!(
            store.save(&record(bad, 1)),
            Err(Error::InvalidProfileName(_))
        ));
        assert!(matches!(
            store.delete(bad),
            Err(Error::InvalidProfileName(_))
        ));
    }
    // Nothing escaped the profiles directory.
    let mut entries: Vec<_> = fs::read_dir(dir.as_path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    entries.sort();
    assert_eq!(entries, vec!["identity.txt", "profiles"]);
    assert_eq!(
        fs::read_dir(dir.as_path().join("profiles"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn identity_readable_by_others_is_refused_with_the_fix() {
    let (_tmp, dir) = state_dir();
    drop(Store::open(dir.as_path(), file_opts()).unwrap());
    let id = dir.as_path().join("identity.txt");
    fs::set_permissions(&id, fs::Permissions::from_mode(0o644)).unwrap();
    let err = Store::open(dir.as_path(), file_opts()).unwrap_err();
    match &err {
        Error::UnsafePermissions { path, .. } => assert_eq!(path, &id),
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&id.display().to_string()), "{msg}");
    assert!(
        msg.contains(&format!("chmod 600 {}", id.display())),
        "{msg}"
    );
}

#[test]
fn state_dir_open_to_others_is_refused_with_the_fix() {
    let (_tmp, state) = state_dir();
    fs::create_dir(&state).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
    let err = Store::open(&state, file_opts()).unwrap_err();
    assert!(
        matches!(&err, Error::UnsafePermissions { path, .. } if path == &state),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("chmod 700 {}", state.display())),
        "{msg}"
    );
    // Nothing was created inside the refused directory.
    assert_eq!(fs::read_dir(&state).unwrap().count(), 0);
}

#[test]
fn files_of_another_uid_are_refused() {
    // Needs root to hand a file to another uid (CI runs as root).
    if !kontext_broker_testutil::root("chown a file to another uid") {
        return;
    }
    let (_tmp, dir) = state_dir();
    drop(Store::open(dir.as_path(), file_opts()).unwrap());
    let id = dir.as_path().join("identity.txt");
    std::os::unix::fs::chown(&id, Some(65534), None).unwrap();
    let err = Store::open(dir.as_path(), file_opts()).unwrap_err();
    assert!(
        matches!(&err, Error::UnsafePermissions { path, problem, .. }
            if path == &id && problem.contains("uid 65534")),
        "{err:?}"
    );
}

#[test]
fn passphrase_store_locking_lifecycle() {
    let (_tmp, dir) = state_dir();
    let store = Store::open(dir.as_path(), pass_opts()).unwrap();
    assert!(store.is_locked());
    // No identity exists yet, so nothing can be encrypted.
    assert!(matches!(store.save(&record("p", 1)), Err(Error::Locked)));
    // The first unlock sets the passphrase.
    store.unlock(&Secret::from("correct horse")).unwrap();
    assert!(!store.is_locked());
    assert_eq!(mode(&dir.as_path().join("identity.age")), 0o600);
    assert_eq!(mode(&dir.as_path().join("recipient.txt")), 0o600);
    let id_age = fs::read(dir.as_path().join("identity.age")).unwrap();
    assert!(!String::from_utf8_lossy(&id_age).contains("AGE-SECRET-KEY"));
    store.save(&record("p", 1)).unwrap();
    assert_eq!(store.load("p").unwrap(), record("p", 1));

    store.lock();
    assert!(store.is_locked());
    assert!(matches!(store.load("p"), Err(Error::Locked)));
    // Saving works while locked: it needs only the recipient.
    store.save(&record("p", 2)).unwrap();
    assert!(matches!(
        store.unlock(&Secret::from("wrong")),
        Err(Error::WrongPassphrase)
    ));
    assert!(store.is_locked());
    store.unlock(&Secret::from("correct horse")).unwrap();
    assert_eq!(store.load("p").unwrap(), record("p", 2));
    drop(store);

    // A new process: starts locked, recipient known, same passphrase works.
    let store = Store::open(dir.as_path(), pass_opts()).unwrap();
    assert!(store.is_locked());
    assert!(matches!(store.load("p"), Err(Error::Locked)));
    store.save(&record("q", 5)).unwrap();
    store.unlock(&Secret::from("correct horse")).unwrap();
    assert_eq!(store.load("p").unwrap(), record("p", 2));
    assert_eq!(store.load("q").unwrap(), record("q", 5));
}

#[test]
fn passphrase_first_unlock_refuses_empty() {
    let (_tmp, dir) = state_dir();
    let store = Store::open(dir.as_path(), pass_opts()).unwrap();
    assert!(store.unlock(&Secret::from("")).is_err());
    assert!(store.is_locked());
    assert!(!dir.as_path().join("identity.age").exists());
}

#[test]
fn file_store_lock_and_unlock_reload_the_identity() {
    let (_tmp, dir) = state_dir();
    let store = Store::open(dir.as_path(), file_opts()).unwrap();
    store.save(&record("a", 1)).unwrap();
    store.lock();
    assert!(matches!(store.load("a"), Err(Error::Locked)));
    store.save(&record("a", 2)).unwrap();
    store.unlock(&Secret::default()).unwrap();
    assert_eq!(store.load("a").unwrap(), record("a", 2));
}

#[tokio::test(start_paused = true)]
async fn wrong_passphrases_cost_a_growing_delay() {
    let (_tmp, dir) = state_dir();
    let store = Arc::new(Store::open(dir.as_path(), pass_opts()).unwrap());
    let throttle = UnlockThrottle::new(Duration::from_secs(1), Duration::from_secs(60));
    throttle
        .unlock(store.clone(), Secret::from("right"))
        .await
        .unwrap();
    store.lock();

    let mut delays = Vec::new();
    for _ in 0..4 {
        let start = tokio::time::Instant::now();
        let r = throttle.unlock(store.clone(), Secret::from("nope")).await;
        assert!(matches!(r, Err(Error::WrongPassphrase)), "{r:?}");
        delays.push(start.elapsed());
    }
    assert_eq!(throttle.failures(), 4);
    // Paused clock: elapsed time is exactly the penalty (scrypt is real time,
    // which the paused clock does not count).
    let secs: Vec<u64> = delays.iter().map(|d| d.as_secs()).collect();
    assert_eq!(secs, vec![1, 2, 4, 8], "{delays:?}");
    assert!(store.is_locked());

    // The right passphrase resets the penalty.
    throttle
        .unlock(store.clone(), Secret::from("right"))
        .await
        .unwrap();
    assert_eq!(throttle.failures(), 0);
    assert!(!store.is_locked());
}

#[tokio::test(start_paused = true)]
async fn throttle_penalty_does_not_block_other_tasks() {
    let (_tmp, dir) = state_dir();
    let store = Arc::new(Store::open(dir.as_path(), pass_opts()).unwrap());
    store.unlock(&Secret::from("right")).unwrap();
    store.lock();
    let throttle = Arc::new(UnlockThrottle::new(
        Duration::from_secs(30),
        Duration::from_secs(60),
    ));
    let t = throttle.clone();
    let s = store.clone();
    let guess = tokio::spawn(async move { t.unlock(s, Secret::from("nope")).await });
    // While the guesser serves its 30 s penalty, other store work proceeds.
    while throttle.failures() == 0 {
        tokio::task::yield_now().await;
    }
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.save(&record("x", 1)))
        .await
        .unwrap()
        .unwrap();
    assert!(!guess.is_finished());
    assert!(matches!(guess.await.unwrap(), Err(Error::WrongPassphrase)));
}

#[test]
fn a_corrupt_file_is_isolated_and_kept() {
    let (_tmp, dir) = state_dir();
    let store = Store::open(dir.as_path(), file_opts()).unwrap();
    for name in ["a", "b", "c"] {
        store.save(&record(name, 1)).unwrap();
    }
    let profiles = dir.as_path().join("profiles");
    let garbage = b"age-encryption.org/v1\n-> X25519 garbage\n--- nope\n\x00\x01".to_vec();
    fs::write(profiles.join("b.age"), &garbage).unwrap();
    // A well-formed file encrypted to another identity is just as unreadable.
    let (_tmp2, other) = state_dir();
    let other_store = Store::open(other.as_path(), file_opts()).unwrap();
    other_store.save(&record("c", 7)).unwrap();
    fs::copy(
        other.as_path().join("profiles/c.age"),
        profiles.join("c.age"),
    )
    .unwrap();

    assert_eq!(store.load("a").unwrap(), record("a", 1));
    for (name, original) in [
        ("b", garbage),
        (
            "c",
            fs::read(other.as_path().join("profiles/c.age")).unwrap(),
        ),
    ] {
        let err = store.load(name).unwrap_err();
        let Error::CorruptProfile { profile, kept, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(profile, name);
        let kept_name = kept.file_name().unwrap().to_str().unwrap();
        assert!(
            kept_name.starts_with(&format!("{name}.age.corrupt-")),
            "{kept_name}"
        );
        assert_eq!(fs::read(kept).unwrap(), original, "kept byte for byte");
        assert!(!profiles.join(format!("{name}.age")).exists());
        assert!(matches!(store.load(name), Err(Error::UnknownProfile(_))));
    }
    assert_eq!(store.profile_names().unwrap(), vec!["a"]);
    assert_eq!(store.load("a").unwrap(), record("a", 1));
    // The profile can be saved again next to its kept corrupt copy.
    store.save(&record("b", 2)).unwrap();
    assert_eq!(store.load("b").unwrap(), record("b", 2));
}

#[test]
fn a_record_under_the_wrong_name_is_corrupt() {
    let (_tmp, dir) = state_dir();
    let store = Store::open(dir.as_path(), file_opts()).unwrap();
    store.save(&record("a", 1)).unwrap();
    let p = dir.as_path().join("profiles");
    fs::copy(p.join("a.age"), p.join("b.age")).unwrap();
    assert!(matches!(store.load("b"), Err(Error::CorruptProfile { .. })));
    assert_eq!(store.load("a").unwrap(), record("a", 1));
}

#[test]
fn stale_temp_files_are_ignored_and_removable() {
    let (_tmp, dir) = state_dir();
    let store = Store::open(dir.as_path(), file_opts()).unwrap();
    store.save(&record("a", 1)).unwrap();
    let stale = dir.as_path().join("profiles/.a.age.tmp-1-0-deadbeef");
    fs::write(&stale, b"partial").unwrap();
    assert_eq!(store.profile_names().unwrap(), vec!["a"]);
    assert_eq!(store.remove_stale_temp_files().unwrap(), 1);
    assert!(!stale.exists());
    assert_eq!(store.load("a").unwrap(), record("a", 1));
}

#[test]
fn keyring_without_the_feature_is_a_clear_error() {
    if cfg!(feature = "keyring") {
        return; // store_keyring.rs covers the built-in case.
    }
    let (_tmp, dir) = state_dir();
    let err = Store::open(
        dir.as_path(),
        StoreOptions {
            identity: IdentityKind::Keyring,
            scrypt_work_factor: None,
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Keyring(m) if m.contains("--features keyring")),
        "{err:?}"
    );
}

#[test]
fn corrupt_record_errors_never_quote_file_contents() {
    use std::str::FromStr;
    let (_tmp, dir) = state_dir();
    let store = Store::open(&dir, file_opts()).unwrap();
    let text = fs::read_to_string(dir.join("identity.txt")).unwrap();
    let key = text
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .unwrap();
    let recipient = age::x25519::Identity::from_str(key).unwrap().to_public();
    // Decrypts fine, but a token sits where a number belongs; serde_json's
    // own message would quote it.
    let json = br#"{"format_version":1,"name":"b","generation":"TOPSECRET-4711"}"#;
    fs::write(
        dir.join("profiles/b.age"),
        age::encrypt(&recipient, json).unwrap(),
    )
    .unwrap();
    let err = store.load("b").unwrap_err();
    assert!(matches!(err, Error::CorruptProfile { .. }), "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("TOPSECRET"), "{shown}");
    assert!(shown.contains("line 1"), "{shown}");
}

#[test]
fn a_lost_identity_is_not_silently_replaced() {
    let (_tmp, dir) = state_dir();
    let store = Store::open(&dir, file_opts()).unwrap();
    store.save(&record("a", 1)).unwrap();
    drop(store);
    fs::remove_file(dir.join("identity.txt")).unwrap();
    let err = Store::open(&dir, file_opts()).unwrap_err();
    assert!(err.to_string().contains("identity.txt is missing"), "{err}");
    assert!(!dir.join("identity.txt").exists());
    assert!(dir.join("profiles/a.age").exists());

    // Same for a passphrase store whose identity.age is gone.
    let (_tmp2, dir) = state_dir();
    let store = Store::open(&dir, pass_opts()).unwrap();
    store.unlock(&Secret::from("pw")).unwrap();
    store.save(&record("a", 1)).unwrap();
    fs::remove_file(dir.join("identity.age")).unwrap();
    let store = Store::open(&dir, pass_opts()).unwrap();
    let err = store.unlock(&Secret::from("new")).unwrap_err();
    assert!(err.to_string().contains("identity.age is missing"), "{err}");
    assert!(!dir.join("identity.age").exists());
}
