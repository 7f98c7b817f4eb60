//! cargo-fuzz entry point of [`kontext_broker_fuzz::token_response`]: the token-response parsers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kontext_broker_fuzz::token_response::check(data));
