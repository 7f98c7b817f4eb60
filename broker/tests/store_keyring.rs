//! The keyring identity without a keyring daemon (the headless case).
//! Runs only with `--features keyring`.
#![cfg(feature = "keyring")]

use kontext_broker::config::IdentityKind;
use kontext_broker::store::{Store, StoreOptions};
use kontext_broker::Error;

#[test]
fn keyring_without_a_daemon_fails_clearly() {
    // Point the session bus at nothing, so the test means "no daemon" even on
    // a desktop. This file holds one test, so no other thread reads the env.
    std::env::set_var(
        "DBUS_SESSION_BUS_ADDRESS",
        "unix:path=/nonexistent/kontext-test-bus",
    );
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let err = Store::open(
        &state,
        StoreOptions {
            identity: IdentityKind::Keyring,
            scrypt_work_factor: None,
        },
    )
    .unwrap_err();
    let Error::Keyring(msg) = &err else {
        panic!("expected a keyring error, got {err:?}");
    };
    assert!(msg.contains("no OS keyring is available"), "{msg}");
    assert!(msg.contains("identity = \"file\""), "{msg}");
    eprintln!("error as shown to the user: {err}");
    // Nothing secret was written as a fallback.
    assert!(!state.join("identity.txt").exists());
    assert!(!state.join("recipient.txt").exists());
}
