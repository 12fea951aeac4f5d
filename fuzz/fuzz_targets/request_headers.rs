//! `flexnbd::fuzzing::request_headers` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flexnbd::fuzzing::request_headers(data));
