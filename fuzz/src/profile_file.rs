//! The profile-file decoder: `Store::load` on a file whose bytes come from the input.
//!
//! Byte 0 picks the layer. Even: the rest is the decrypted JSON, encrypted here
//! to the store's own recipient, so the record parser and its checks see it.
//! Odd: the rest is the file as stored (age header, stanzas, payload), so the
//! decryptor sees it. Either way the load must return a record or an error,
//! never panic; a file that fails moves aside and the store keeps working.

use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::OnceLock;

use kontext_broker::store::{Store, StoreOptions, IDENTITY_FILE};

const NAME: &str = "fuzzed";

struct Harness {
    _dir: tempfile::TempDir,
    profiles: PathBuf,
    store: Store,
    recipient: age::x25519::Recipient,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let dir = super::harness::scratch_dir();
        let state = dir.path().join("state");
        let store = Store::open(&state, StoreOptions::default()).expect("store");
        let identity = std::fs::read_to_string(state.join(IDENTITY_FILE)).expect("identity");
        let key = identity
            .lines()
            .find(|l| l.starts_with("AGE-SECRET-KEY-"))
            .expect("a secret key line");
        let recipient = age::x25519::Identity::from_str(key)
            .expect("identity parses")
            .to_public();
        Harness {
            profiles: state.join("profiles"),
            _dir: dir,
            store,
            recipient,
        }
    })
}

fn encrypt(recipient: &age::x25519::Recipient, plain: &[u8]) -> Vec<u8> {
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(recipient as &dyn age::Recipient))
            .expect("encryptor");
    let mut out = Vec::new();
    let mut w = encryptor.wrap_output(&mut out).expect("wrap");
    w.write_all(plain).expect("write");
    w.finish().expect("finish");
    out
}

/// Runs one input; panics on a finding.
pub fn check(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let h = harness();
    let file = if mode % 2 == 0 {
        encrypt(&h.recipient, rest)
    } else {
        rest.to_vec()
    };
    let path = h.profiles.join(format!("{NAME}.age"));
    std::fs::write(&path, &file).expect("writing the profile file");
    match h.store.load(NAME) {
        Ok(record) => {
            assert_eq!(record.name, NAME);
            // What loads must save and load again unchanged.
            h.store.save(&record).expect("a loaded record saves");
            assert_eq!(h.store.load(NAME).expect("reload"), record);
        }
        Err(e) => {
            // Errors name the cause but never echo file content.
            let text = e.to_string();
            assert!(!text.is_empty());
        }
    }
    // Clear the directory (corrupt files are moved aside, never deleted).
    for entry in std::fs::read_dir(&h.profiles).expect("listing") {
        let _ = std::fs::remove_file(entry.expect("entry").path());
    }
}
