//! cargo-fuzz entry point of [`kontext_broker_fuzz::profile_file`]: the profile-file decoder.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kontext_broker_fuzz::profile_file::check(data));
