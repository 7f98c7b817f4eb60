//! cargo-fuzz entry point of [`kontext_broker_fuzz::frames`]: frame decoding plus request dispatch.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kontext_broker_fuzz::frames::check(data));
