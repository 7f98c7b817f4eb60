//! No token byte reaches the disk in any common encoding.

use std::fs;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use kontext_broker::config::IdentityKind;
use kontext_broker::store::{ProfileRecord, Store, StoreOptions, StoredAccessToken};
use kontext_broker_protocol::Secret;
use rand::distr::{Alphanumeric, SampleString};

fn marker() -> String {
    format!("MARK{}", Alphanumeric.sample_string(&mut rand::rng(), 40))
}

fn record(rt: &str, at: &str, secret: &str, generation: u64) -> ProfileRecord {
    ProfileRecord::builder(
        "default",
        "https://idp.example",
        "cli",
        "https://idp.example/token",
    )
    .client_secret(secret)
    .scopes(["openid"])
    .refresh_token(rt)
    .access_token(StoredAccessToken::bearer(at, 1, 2, Vec::<String>::new()))
    .generation(generation)
    .build()
}

/// Every way the marker could appear: raw, hex (both cases), and base64 in
/// all four alphabets at each of the three byte alignments it could have
/// inside a longer encoded blob (edge characters that depend on neighbouring
/// bytes are trimmed).
fn encodings(marker: &str) -> Vec<Vec<u8>> {
    let raw = marker.as_bytes();
    let mut out = vec![
        raw.to_vec(),
        hex::encode(raw).into_bytes(),
        hex::encode_upper(raw).into_bytes(),
    ];
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        for align in 0..3usize {
            let mut input = vec![0u8; align];
            input.extend_from_slice(raw);
            let enc = engine.encode(&input);
            let skip = (align * 8).div_ceil(6);
            let core = &enc.as_bytes()[skip..enc.len() - 4];
            out.push(core.to_vec());
        }
    }
    out.sort();
    out.dedup();
    out
}

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn scan(state: &Path, markers: &[String]) -> (usize, Vec<String>) {
    let mut files = Vec::new();
    all_files(state, &mut files);
    let needles: Vec<(String, Vec<u8>)> = markers
        .iter()
        .flat_map(|m| encodings(m).into_iter().map(move |e| (m.clone(), e)))
        .collect();
    let mut hits = Vec::new();
    for file in &files {
        let bytes = fs::read(file).unwrap();
        for (marker, needle) in &needles {
            if bytes.windows(needle.len()).any(|w| w == needle.as_slice()) {
                hits.push(format!("{} in {}", marker, file.display()));
            }
        }
    }
    (files.len(), hits)
}

fn churn(identity: IdentityKind) {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let store = Store::open(
        &state,
        StoreOptions {
            identity,
            scrypt_work_factor: Some(10),
        },
    )
    .unwrap();
    store.unlock(&Secret::from("pw")).unwrap();
    let mut markers = Vec::new();
    for generation in 0..50 {
        let (rt, at, cs) = (marker(), marker(), marker());
        store.save(&record(&rt, &at, &cs, generation)).unwrap();
        if generation % 10 == 0 {
            // Passphrase stores also save while locked.
            store.lock();
        }
        markers.extend([rt, at, cs]);
    }
    store.unlock(&Secret::from("pw")).unwrap();
    let last = store.load("default").unwrap();
    assert_eq!(
        last.refresh_token.unwrap().expose(),
        markers[markers.len() - 3]
    );

    // The scanner itself finds a marker written in each encoding.
    let probe = state.join("probe");
    let m = marker();
    for (i, enc) in encodings(&m).iter().enumerate() {
        let mut bytes = b"xx".to_vec();
        bytes.extend_from_slice(enc);
        fs::write(&probe, &bytes).unwrap();
        assert!(
            !scan(&state, std::slice::from_ref(&m)).1.is_empty(),
            "encoding {i}"
        );
    }
    let b64 = STANDARD.encode(format!("{{\"t\":\"{m}\"}}"));
    fs::write(&probe, b64).unwrap();
    assert!(!scan(&state, &[m]).1.is_empty(), "embedded base64");
    fs::remove_file(&probe).unwrap();

    let (files, hits) = scan(&state, &markers);
    assert!(files >= 2, "scanned {files} files");
    assert!(hits.is_empty(), "plaintext on disk: {hits:?}");
}

#[test]
fn no_plaintext_on_disk_file_identity() {
    churn(IdentityKind::File);
}

#[test]
fn no_plaintext_on_disk_passphrase_identity() {
    churn(IdentityKind::Passphrase);
}
