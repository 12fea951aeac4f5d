//! `flexnbd::fuzzing::client_replies` under libFuzzer. SIGPIPE is ignored, as the
//! Rust runtime does for the `flexnbd` binary (libFuzzer's `main` does not).
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: {
        // SAFETY: sets a signal disposition before any thread of the target runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    },
    |data: &[u8]| flexnbd::fuzzing::client_replies(data)
);
