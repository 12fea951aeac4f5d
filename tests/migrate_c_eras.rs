//! Migration between flexnbd and fake peers that speak each era of the C
//! flexnbd exactly as `FLEXNBD-COMPAT.md` describes, checked each way with
//! checksums and control:
//!
//! - our source into a listen/rebind-era destination, which takes control
//!   only after ENTRUST (type 0x10000, answered with error 0) and DISC, and
//!   into a 0.5.0 destination, which reads ENTRUST as an empty READ and takes
//!   control at DISC; a refused or dropped ENTRUST fails the attempt, which
//!   is retried;
//! - listen-era and 0.5.0 sources (every byte as WRITEs, holes as zero data;
//!   ENTRUST then DISC, or DISC alone) into our `listen --oldstyle`.

mod common;
mod fakepeer;

use common::*;
use fakepeer::{c_source, DestConfig, Era, FakeDest, Fault, Sender};
use std::time::Duration;

const SIZE: u64 = 8 * MIB + 4096;

/// A source image: random data with a hole in the middle.
fn source_image(seed: u64) -> Source {
    let src = source(SIZE, seed);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src.file)
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            f.write_all_at(&vec![0u8; 2 * MIB as usize], 3 * MIB)
        })
        .unwrap();
    src
}

/// Runs `mirror` from a fresh source into `fake` and checks the hand-over:
/// the source exits 0, the fake took control with the source's exact image
/// after `connections` connections. Returns the fake's connection records.
#[track_caller]
fn mirror_into(cfg: DestConfig, connections: usize, seed: u64) -> Vec<fakepeer::ConnRecord> {
    let mut src = source_image(seed);
    let want = read_file(&src.file);
    let fake = FakeDest::start(cfg);
    mirror_cmd(src.srv.ctl(), fake.addr, &[]).expect_success("mirror");
    let got = fake
        .wait_completed(Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "the destination never took control: {:?}; source log:\n{}",
                fake.records(),
                src.srv.stderr()
            )
        });
    assert_bytes_eq(&got, &want, "image the destination took over");
    let st = src.srv.wait_exit(Duration::from_secs(20));
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(0),
        "source: {}",
        src.srv.stderr()
    );
    let recs = fake.records();
    assert_eq!(recs.len(), connections, "{recs:?}");
    recs
}

/// Expected: into a listen-era destination, the source sends the whole
/// image (no WRITE_ZEROES, which it does not offer), a FLUSH, ENTRUST, waits
/// for its reply, then DISC; the destination takes control with the
/// source's exact image, and the source exits 0. (Without ENTRUST that
/// destination would never take control.)
#[test]
fn mirror_into_a_listen_era_destination_sends_entrust_then_disc() {
    let recs = mirror_into(DestConfig::listen_era(SIZE), 1, 50);
    let r = &recs[0];
    assert_eq!((r.entrusts, r.zeroes, r.covered), (1, 0, SIZE), "{r:?}");
    assert!(
        r.sequence.ends_with("WFED"),
        "order of requests: {}",
        r.sequence
    );
}

/// Expected: into a 0.5.0 destination, ENTRUST arrives as a zero-length
/// READ with FUA, is answered with success, and DISC hands the image over.
#[test]
fn mirror_into_a_050_destination_hands_over_at_disc() {
    let recs = mirror_into(DestConfig::oldstyle(SIZE), 1, 51);
    let r = &recs[0];
    assert!(r.empty_fua_read && r.disc, "{r:?}");
    assert_eq!(r.covered, SIZE);
}

/// Expected: a listen-era destination that answers ENTRUST with EIO (then
/// one that closes at ENTRUST) fails those attempts: no hand-over, the
/// source retries from scratch, and the third connection completes.
#[test]
fn a_refused_entrust_fails_the_attempt_and_it_is_retried() {
    let cfg =
        DestConfig::listen_era(SIZE).faults(&[Fault::ErrorAtEntrust(5), Fault::CloseAtEntrust]);
    let recs = mirror_into(cfg, 3, 52);
    assert!(!recs[0].entrusted && !recs[1].entrusted, "{recs:?}");
    assert!(
        !recs[0].disc && !recs[1].disc,
        "no DISC after a failed ENTRUST"
    );
    assert!(recs[2].entrusted && recs[2].disc);
}

/// A random image with a hole (zeroes, which the C sources send as data).
fn c_image(seed: u64) -> Vec<u8> {
    let mut img = random_bytes(seed, SIZE as usize);
    img[MIB as usize..3 * MIB as usize].fill(0);
    img
}

/// Checks our listener took control with `image`.
#[track_caller]
fn took_over(l: &Listener, image: &[u8]) {
    l.assert_took_control();
    assert_bytes_eq(&read_file(&l.file), image, "received image");
    assert_eq!(md5_file(&l.file), {
        let copy = l.dir.path().join("expected");
        std::fs::write(&copy, image).unwrap();
        md5_file(&copy)
    });
}

/// Expected: a listen-era C source (all data, ENTRUST answered with error 0
/// and its handle, DISC) hands its image to `listen --oldstyle`.
#[test]
fn listen_era_source_into_our_oldstyle_listener() {
    let l = listener(SIZE, &["--oldstyle"]);
    let img = c_image(53);
    c_source(l.srv.addr(), &img, Era::ListenRebind);
    took_over(&l, &img);
    assert!(l.srv.log_count("ENTRUST") >= 1, "log:\n{}", l.srv.stderr());
}

/// Expected: a 0.5.0 C source (all data, then DISC) hands its image to
/// `listen --oldstyle`.
#[test]
fn c_050_source_into_our_oldstyle_listener() {
    let l = listener(SIZE, &["--oldstyle"]);
    let img = c_image(54);
    c_source(l.srv.addr(), &img, Era::V050);
    took_over(&l, &img);
}

/// Expected: a listen-era source that sends everything and ENTRUST, then
/// drops without DISC, hands nothing over; a full retry on a new
/// connection then does.
#[test]
fn a_source_that_drops_after_entrust_hands_nothing_over() {
    let mut l = listener(SIZE, &["--oldstyle"]);
    let img = c_image(55);
    let mut s = Sender::connect(l.srv.addr());
    let _ = s.greeting();
    s.write_all_pipelined(&img, 8 << 20);
    assert_eq!(s.entrust(9), 0);
    drop(s);
    l.wait_no_clients();
    l.assert_stays_waiting(Duration::from_secs(1));
    c_source(l.srv.addr(), &img, Era::ListenRebind);
    took_over(&l, &img);
}

/// Expected: our source into our own `listen --oldstyle` (the path a C
/// source takes, ENTRUST included) completes with the exact image.
#[test]
fn our_source_into_our_oldstyle_listener_sends_entrust() {
    let mut l = listener(SIZE, &["--oldstyle"]);
    l.real_migration_completes(56);
    assert!(l.srv.log_count("ENTRUST") >= 1, "log:\n{}", l.srv.stderr());
}
