//! The committed fuzz seed corpus (`fuzz/corpus/<target>/`), run through the
//! fuzz targets' own checks on the stable toolchain, so every `cargo test`
//! exercises them and replays what fuzzing once found (the `regress_*` seeds).
//!
//! The checks live in the `fuzz/` crate, which is outside the workspace (its
//! targets need nightly); this test compiles the same source files.

#[path = "../../fuzz/src/frames.rs"]
mod frames;
#[path = "../../fuzz/src/harness.rs"]
mod harness;
#[path = "../../fuzz/src/profile_file.rs"]
mod profile_file;
#[path = "../../fuzz/src/token_response.rs"]
mod token_response;

use std::path::{Path, PathBuf};

/// Every seed of one target, sorted by name.
fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let seeds = seeds(target);
    for (path, bytes) in &seeds {
        eprintln!("{target}: {}", path.display());
        check(bytes);
    }
    seeds.len()
}

/// One test, in this order: `frames` points the process's HTTP proxy
/// variables at a closed port, which the token-response check (a loopback
/// HTTP server) must not inherit.
#[test]
fn every_seed_passes_its_fuzz_check() {
    let n = replay("token_response", token_response::check);
    assert!(
        n >= 14,
        "token_response: {n} seeds (the regress_* seeds are missing?)"
    );
    replay("profile_file", profile_file::check);
    replay("frames", frames::check);
}
