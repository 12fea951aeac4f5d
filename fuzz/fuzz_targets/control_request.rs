//! `flexnbd::fuzzing::control_request` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flexnbd::fuzzing::control_request(data));
