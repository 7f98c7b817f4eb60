//! The fuzz checks, one module per cargo-fuzz target (`fuzz_targets/`), plus
//! their shared [`harness`]. Each module's `check` takes one input and panics
//! on a finding. Stable `cargo test` runs the committed seed corpus through the
//! same modules (tests/tests/fuzz_corpus.rs includes these files), so the
//! checks stay compiled and exercised without nightly.

pub mod frames;
pub mod harness;
pub mod profile_file;
pub mod token_response;
