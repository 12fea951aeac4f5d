//! `flexnbd::fuzzing::acl_and_addresses` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flexnbd::fuzzing::acl_and_addresses(data));
