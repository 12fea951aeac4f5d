//! Migrations under client write load through a proxy that breaks the link
//! between source and destination at random points: it closes both sides in
//! the middle of a request or payload, or goes silent in one direction while
//! keeping the destination's connection open (a half-dead link). The source
//! must retry until a copy gets through, the destination must drop the dead
//! sender and accept the next, clients must not notice, and in the end the
//! destination must hold the source's final image and every acknowledged
//! write.
//!
//! The fault plans come from fixed seeds (chosen so that, between them, every
//! kind of fault occurs) so a failure can be replayed; set
//! `FLEXNBD_TEST_CHAOS_SEEDS=1,2,3` to try others.

mod common;

use common::proxy::{Cut, Kind, Proxy};
use common::*;
use std::time::{Duration, Instant};

const SIZE: u64 = 64 * MIB;

fn plan(seed: u64, n: usize) -> Vec<Cut> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|_| Cut {
            // Past the handshake, and well before the end of the first sweep
            // (64 MiB of data), so the cut always lands inside a copy.
            after: 4096 + r.below(48 * MIB),
            kind: match r.below(4) {
                0 | 1 => Kind::Close,
                2 => Kind::HangRequests,
                _ => Kind::HangReplies,
            },
        })
        .collect()
}

fn seeds() -> Vec<u64> {
    match std::env::var("FLEXNBD_TEST_CHAOS_SEEDS") {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().parse().expect("FLEXNBD_TEST_CHAOS_SEEDS: numbers"))
            .collect(),
        Err(_) => vec![2, 4],
    }
}

/// Expected, for each seed: three faults at random points of the copy (each
/// a close, a silent link in one direction, mixed by the seed); every fault
/// fails an attempt and a later attempt goes through (a silent link is given
/// up by the source after its request limit, 3 s, and by the destination
/// after its idle limit, 4 s, which frees the slot for the retry). The source
/// exits 0, the destination has control and no marker, its file equals the
/// source's final file, every acknowledged write is in it, and the writer saw
/// no failure before the hand-over began.
#[test]
fn migration_survives_a_link_broken_at_random_points() {
    for seed in seeds() {
        one_run(seed);
    }
}

fn one_run(seed: u64) {
    let dir = tempdir();
    let src_file = dir.path().join("src.img");
    let dst_file = dir.path().join("dst.img");
    create_random_file(&src_file, SIZE, seed);
    create_sparse_file(&dst_file, SIZE);
    let mut src = Daemon::serve(&src_file, &dir.path().join("src.sock"))
        .env("FLEXNBD_MS_REQUEST_LIMIT_SECS", "3")
        .start();
    let dst = Daemon::listen(&dst_file, &dir.path().join("dst.sock"))
        .env("FLEXNBD_MIGRATION_IDLE_SECS", "4")
        .start();
    let cuts = plan(seed, 3);
    eprintln!("seed {seed}: cuts {cuts:?}");
    let proxy = Proxy::start(dst.addr(), cuts.clone());

    let mut writer = LoadWriter::start(&src.uri(), 8, seed);
    // Limit the speed so the copy takes a few seconds and the writes overlap it.
    mirror_cmd(src.ctl(), proxy.addr, &["--max-speed", "40000000"]).expect_success("mirror");
    let poller = StatusPoller::start(src.ctl());
    let t0 = Instant::now();
    let st = src.wait_exit(Duration::from_secs(150));
    let polled = poller.finish();
    assert!(
        st.is_some(),
        "seed {seed}: no hand-over after {:?}; fired {:?}; source status {:?}; log:\n{}",
        t0.elapsed(),
        proxy.fired(),
        try_status(src.ctl()),
        src.stderr()
    );
    assert_eq!(
        st.unwrap().code(),
        Some(0),
        "seed {seed}: source; log:\n{}",
        src.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(10), || try_status(dst.ctl())
            .is_some_and(|s| s["has_control"] == "true")),
        "seed {seed}: destination has no control; log:\n{}",
        dst.stderr()
    );
    assert!(!marker_of(&dst_file).exists(), "seed {seed}: marker kept");

    let fired = proxy.fired();
    eprintln!(
        "seed {seed}: handed over after {:?}, {} attempts, {} connections, fired {fired:?}",
        t0.elapsed(),
        polled.attempts,
        *proxy.accepted.lock().unwrap()
    );
    assert_eq!(
        fired.len(),
        cuts.len(),
        "seed {seed}: every planned fault fired"
    );
    assert!(
        polled.attempts > fired.len() as u64,
        "seed {seed}: each fault fails an attempt ({} attempts seen)",
        polled.attempts
    );
    assert_eq!(
        polled.idle, None,
        "seed {seed}: is_mirroring=false while retrying"
    );

    let r = writer.finish(Duration::from_secs(30));
    assert_bytes_eq(
        &read_file(&dst_file),
        &read_file(&src_file),
        "destination vs final source",
    );
    let checked = check_acknowledged_writes(&r, |b| read_file_at(&dst_file, b * 4096, 4096));
    assert!(checked > 1000, "seed {seed}: {checked} blocks checked");
    check_load_failures(&r, polled.last_allowed);
}
