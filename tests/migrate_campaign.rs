//! A fault campaign: migrations of a 512 MiB image under a random 4 KiB
//! writer at full speed, each with one fault chosen by its seed:
//!
//! - the destination killed (SIGKILL) and restarted on the same port;
//! - the destination stopped (SIGSTOP) for 3–10 s;
//! - the link cut at a random byte (both sides closed);
//! - the link left half-open at a random byte (one direction goes silent,
//!   both connections stay open);
//! - `break`, then `mirror` again;
//! - the source killed (SIGKILL), restarted on its file, and `mirror` again.
//!
//! After each: exactly one server owns the image (the source exited 0
//! after handing over and its control socket is gone; the destination has
//! control and no marker), the destination's image equals the source's
//! final file, every write a writer saw acknowledged is in it, and the
//! migration completed within 60 s of the fault ending.
//!
//! Sources run with a 10 s request limit and copy at 100 MB/s (so a fault
//! lands inside the copy); the destination replaces a sender silent for 2 s.
//!
//! Seeds: `FLEXNBD_CAMPAIGN_SEEDS=1,2,3` or `FLEXNBD_CAMPAIGN_RUNS=N` (seeds
//! 1..=N); the kind of fault is `seed % 6`. The default (the test suite)
//! runs three seeds: a half-open link, a stopped destination and a killed
//! source. `FLEXNBD_CAMPAIGN_MIB` changes the image size.

mod common;

use common::proxy::{Cut, Kind, Proxy};
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One fault, with its parameters.
#[derive(Debug, Clone, Copy)]
enum Fault {
    DestKilled { after: Duration, down: Duration },
    DestStopped { after: Duration, stopped: Duration },
    LinkCut { at: u64 },
    LinkHalfOpen { at: u64, replies: bool },
    BreakThenMirror { after: Duration, pause: Duration },
    SourceKilled { after: Duration, down: Duration },
}

impl Fault {
    fn name(&self) -> &'static str {
        match self {
            Fault::DestKilled { .. } => "destination killed",
            Fault::DestStopped { .. } => "destination stopped",
            Fault::LinkCut { .. } => "link cut",
            Fault::LinkHalfOpen { .. } => "link half-open",
            Fault::BreakThenMirror { .. } => "break, mirror again",
            Fault::SourceKilled { .. } => "source killed",
        }
    }
}

fn plan(seed: u64, size: u64) -> Fault {
    let mut r = Rng::new(seed.wrapping_mul(0x9e37_79b9));
    let ms = |r: &mut Rng, lo: u64, hi: u64| Duration::from_millis(lo + r.below(hi - lo));
    // Inside the first sweep (a 512 MiB copy at 100 MB/s takes over 5 s).
    let after = ms(&mut r, 300, 3000);
    let at = 4096 + r.below(size * 3 / 4);
    match seed % 6 {
        0 => Fault::DestKilled {
            after,
            down: ms(&mut r, 200, 2000),
        },
        1 => Fault::DestStopped {
            after,
            stopped: ms(&mut r, 3000, 10_000),
        },
        2 => Fault::LinkCut { at },
        3 => Fault::LinkHalfOpen {
            at,
            replies: r.below(2) == 0,
        },
        4 => Fault::BreakThenMirror {
            after,
            pause: ms(&mut r, 100, 1500),
        },
        _ => Fault::SourceKilled {
            after,
            down: ms(&mut r, 200, 2000),
        },
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(v) = std::env::var("FLEXNBD_CAMPAIGN_SEEDS") {
        return v
            .split(',')
            .map(|s| s.trim().parse().expect("FLEXNBD_CAMPAIGN_SEEDS: numbers"))
            .collect();
    }
    if let Ok(n) = std::env::var("FLEXNBD_CAMPAIGN_RUNS") {
        let n: u64 = n.trim().parse().expect("FLEXNBD_CAMPAIGN_RUNS: a number");
        return (1..=n).collect();
    }
    vec![3, 7, 11]
}

fn image_size() -> u64 {
    std::env::var("FLEXNBD_CAMPAIGN_MIB")
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .expect("FLEXNBD_CAMPAIGN_MIB: a number")
        })
        .unwrap_or(512)
        * MIB
}

/// What one run showed.
#[derive(Debug)]
struct Outcome {
    /// From the end of the fault to the hand-over.
    recovery: Duration,
    attempts: u64,
    acked: u64,
    checked: u64,
    /// The worst guest write latency while the fault lasted (seconds).
    worst_latency: f64,
}

#[test]
fn migrations_survive_one_fault_each() {
    let size = image_size();
    let mut results = Vec::new();
    for seed in seeds() {
        let fault = plan(seed, size);
        eprintln!("campaign seed {seed}: {fault:?}");
        let t = Instant::now();
        let o = one_run(seed, size, fault);
        eprintln!(
            "campaign seed {seed}: {}: handed over {:.1}s after the fault ended, {} attempts, \
             {} writes acknowledged, {} blocks checked, worst write latency during the fault \
             {:.3}s ({:.0}s in all)",
            fault.name(),
            o.recovery.as_secs_f64(),
            o.attempts,
            o.acked,
            o.checked,
            o.worst_latency,
            t.elapsed().as_secs_f64()
        );
        results.push((fault, o));
    }
    let worst = results
        .iter()
        .map(|r| r.1.recovery)
        .max()
        .unwrap_or_default();
    let mut by_kind: Vec<(&str, usize)> = Vec::new();
    for (f, _) in &results {
        match by_kind.iter_mut().find(|k| k.0 == f.name()) {
            Some(k) => k.1 += 1,
            None => by_kind.push((f.name(), 1)),
        }
    }
    eprintln!(
        "campaign: {} migrations of {} MiB, all handed over intact; by fault {by_kind:?}; \
         slowest recovery {:.1}s; {} writes acknowledged in all",
        results.len(),
        size / MIB,
        worst.as_secs_f64(),
        results.iter().map(|r| r.1.acked).sum::<u64>()
    );
}

struct Paths {
    src_file: PathBuf,
    dst_file: PathBuf,
    src_sock: PathBuf,
    dst_sock: PathBuf,
}

fn source(p: &Paths) -> Server {
    Daemon::serve(&p.src_file, &p.src_sock)
        .env("FLEXNBD_MS_REQUEST_LIMIT_SECS", "10")
        .start()
}

fn destination(p: &Paths, port: Option<u16>) -> Server {
    let d = Daemon::listen(&p.dst_file, &p.dst_sock).env("FLEXNBD_MIGRATION_STALE_SECS", "2");
    match port {
        Some(port) => d.port(port).start(),
        None => d.start(),
    }
}

const MIRROR_SPEED: &[&str] = &["--max-speed", "100000000"];
/// Write ids of the writer on a restarted source start here.
const LATER_IDS: u64 = 1 << 40;

/// Sleeps until `t` (the fault's planned moment: the fault itself, not a
/// readiness wait).
fn sleep_until(t: Instant) {
    std::thread::sleep(t.saturating_duration_since(Instant::now()));
}

fn one_run(seed: u64, size: u64, fault: Fault) -> Outcome {
    let dir = big_tempdir(3 * size);
    let p = Paths {
        src_file: dir.path().join("src.img"),
        dst_file: dir.path().join("dst.img"),
        src_sock: dir.path().join("src.sock"),
        dst_sock: dir.path().join("dst.sock"),
    };
    create_random_file(&p.src_file, size, seed);
    create_sparse_file(&p.dst_file, size);
    let mut dst = destination(&p, None);
    let dst_port = dst.port.unwrap();
    let cuts = match fault {
        Fault::LinkCut { at } => vec![Cut {
            after: at,
            kind: Kind::Close,
        }],
        Fault::LinkHalfOpen { at, replies } => vec![Cut {
            after: at,
            kind: if replies {
                Kind::HangReplies
            } else {
                Kind::HangRequests
            },
        }],
        _ => Vec::new(),
    };
    let proxy = Proxy::start(dst.addr(), cuts);
    let mut src = source(&p);
    let mut writers = vec![LoadWriter::start(&src.uri(), 8, seed)];
    mirror_cmd(src.ctl(), proxy.addr, MIRROR_SPEED).expect_success("mirror");
    let mut poller = StatusPoller::start(src.ctl());
    let t0 = Instant::now();
    let (fault_start, fault_end) = match fault {
        Fault::DestKilled { after, down } => {
            sleep_until(t0 + after);
            let from = now_epoch();
            dst.kill();
            std::thread::sleep(down);
            dst = destination(&p, Some(dst_port));
            (from, Instant::now())
        }
        Fault::DestStopped { after, stopped } => {
            sleep_until(t0 + after);
            let from = now_epoch();
            dst.signal(SIGSTOP);
            std::thread::sleep(stopped);
            dst.signal(SIGCONT);
            (from, Instant::now())
        }
        Fault::LinkCut { .. } | Fault::LinkHalfOpen { .. } => {
            assert!(
                wait_until(Duration::from_secs(60), || !proxy.fired().is_empty()),
                "seed {seed}: the cut never fired; source log:\n{}",
                src.stderr()
            );
            (now_epoch(), Instant::now())
        }
        Fault::BreakThenMirror { after, pause } => {
            sleep_until(t0 + after);
            let from = now_epoch();
            let out = flexnbd(&["break", "--sock", &src.ctl().display().to_string()]);
            out.expect_success("break");
            assert_eq!(out.stdout_str().trim(), "mirror stopped", "seed {seed}");
            assert_eq!(status_map(src.ctl())["is_mirroring"], "false");
            std::thread::sleep(pause);
            mirror_cmd(src.ctl(), proxy.addr, MIRROR_SPEED).expect_success("mirror again");
            (from, Instant::now())
        }
        Fault::SourceKilled { after, down } => {
            sleep_until(t0 + after);
            let from = now_epoch();
            poller.finish();
            src.kill();
            std::thread::sleep(down);
            src = source(&p);
            writers.push(LoadWriter::start_from(
                &src.uri(),
                8,
                seed + 1000,
                LATER_IDS,
            ));
            mirror_cmd(src.ctl(), proxy.addr, MIRROR_SPEED).expect_success("mirror again");
            poller = StatusPoller::start(src.ctl());
            (from, Instant::now())
        }
    };
    let fault_end_epoch = now_epoch();

    let st = src.wait_exit(Duration::from_secs(120));
    let recovery = fault_end.elapsed();
    let polled = poller.finish();
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(0),
        "seed {seed} ({fault:?}): the source did not hand over; status {:?}; log:\n{}",
        try_status(src.ctl()),
        src.stderr()
    );
    assert!(
        recovery < Duration::from_secs(60),
        "seed {seed} ({fault:?}): handed over {recovery:?} after the fault ended"
    );
    // Exactly one owner: the source is gone, the destination has control.
    assert!(
        !p.src_sock.exists(),
        "seed {seed}: the source's control socket is left"
    );
    assert!(
        wait_until(Duration::from_secs(10), || try_status(dst.ctl())
            .is_some_and(|s| s["has_control"] == "true")),
        "seed {seed}: destination without control; log:\n{}",
        dst.stderr()
    );
    assert!(!marker_of(&p.dst_file).exists(), "seed {seed}: marker kept");
    compare_files(&p.dst_file, &p.src_file, seed);

    let n = writers.len();
    let mut acked = 0;
    let mut checked = 0;
    let mut worst_latency = 0.0f64;
    for (i, w) in writers.iter_mut().enumerate() {
        let r = w.finish(Duration::from_secs(30));
        acked += r["n_ok"].as_u64().unwrap();
        let read = |b| read_file_at(&p.dst_file, b * 4096, 4096);
        checked += match i + 1 == n {
            true => check_acknowledged_writes(&r, read),
            false => check_acknowledged_writes_before(&r, read, LATER_IDS),
        };
        worst_latency = worst_latency.max(load_worst_latency(&r, fault_start, fault_end_epoch));
        // A killed source's writer fails at the kill; the last writer only
        // sees its connection dropped at the hand-over.
        if i + 1 == n {
            check_load_failures(&r, polled.last_allowed);
        }
    }
    assert!(checked > 1000, "seed {seed}: {checked} blocks checked");
    drop(proxy);
    Outcome {
        recovery,
        attempts: polled.attempts,
        acked,
        checked,
        worst_latency,
    }
}

/// Compares two large files piece by piece.
fn compare_files(a: &Path, b: &Path, seed: u64) {
    use std::io::Read;
    let size = std::fs::metadata(a).unwrap().len();
    assert_eq!(
        size,
        std::fs::metadata(b).unwrap().len(),
        "seed {seed}: sizes"
    );
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (mut ba, mut bb) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if let Some(i) = (0..n).find(|&i| ba[i] != bb[i]) {
            panic!(
                "seed {seed}: destination differs from the source at byte {}",
                off + i as u64
            );
        }
        off += n as u64;
    }
}
