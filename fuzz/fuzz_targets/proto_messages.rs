//! `flexnbd::fuzzing::proto_messages` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flexnbd::fuzzing::proto_messages(data));
