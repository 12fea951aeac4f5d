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

use common::*;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SIZE: u64 = 64 * MIB;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Close both connections (source side and destination side).
    Close,
    /// Stop forwarding the source's requests; keep both sides open.
    HangRequests,
    /// Stop forwarding the destination's replies; keep both sides open.
    HangReplies,
}

/// Break a connection once the source has sent `after` bytes over it.
#[derive(Debug, Clone, Copy)]
struct Cut {
    after: u64,
    kind: Kind,
}

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

/// What one proxied connection is doing.
const OPEN: u8 = 0;
const CLOSED: u8 = 1;
const HUNG: u8 = 2;

struct Proxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Cuts not yet used; each is armed on the next connection and put back
    /// if that connection ends before it fires (a refused attempt).
    queue: Arc<Mutex<VecDeque<Cut>>>,
    fired: Arc<Mutex<Vec<Cut>>>,
    accepted: Arc<Mutex<usize>>,
}

impl Proxy {
    fn start(dest: SocketAddr, cuts: Vec<Cut>) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let p = Proxy {
            addr: l.local_addr().unwrap(),
            stop: Arc::new(AtomicBool::new(false)),
            queue: Arc::new(Mutex::new(cuts.into())),
            fired: Arc::new(Mutex::new(Vec::new())),
            accepted: Arc::new(Mutex::new(0)),
        };
        let (stop, queue, fired, accepted) = (
            p.stop.clone(),
            p.queue.clone(),
            p.fired.clone(),
            p.accepted.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                match l.accept() {
                    Ok((src, _)) => {
                        src.set_nonblocking(false).unwrap();
                        *accepted.lock().unwrap() += 1;
                        let Ok(dst) = TcpStream::connect(dest) else {
                            continue;
                        };
                        let cut = queue.lock().unwrap().pop_front();
                        link(src, dst, cut, queue.clone(), fired.clone());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("proxy accept: {e}"),
                }
            }
        });
        p
    }

    fn fired(&self) -> Vec<Cut> {
        self.fired.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

/// Forwards one connection in both directions, breaking it as `cut` says.
fn link(
    src: TcpStream,
    dst: TcpStream,
    cut: Option<Cut>,
    queue: Arc<Mutex<VecDeque<Cut>>>,
    fired: Arc<Mutex<Vec<Cut>>>,
) {
    let state = Arc::new(AtomicU8::new(OPEN));
    let _ = src.set_nodelay(true);
    let _ = dst.set_nodelay(true);
    // Source -> destination: counts the bytes and fires the cut.
    {
        let (mut from, mut to) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let (src2, dst2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let state = state.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            let mut sent = 0u64;
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let hung = state.load(SeqCst) == HUNG;
                if hung && cut.is_some_and(|c| c.kind == Kind::HangRequests) {
                    continue; // swallow what the source still sends
                }
                if let Some(c) = cut.filter(|c| !hung && sent + n as u64 >= c.after) {
                    fired.lock().unwrap().push(c);
                    match c.kind {
                        Kind::Close => {
                            let _ = to.write_all(&buf[..(c.after - sent) as usize]);
                            state.store(CLOSED, SeqCst);
                            let _ = src2.shutdown(Shutdown::Both);
                            let _ = dst2.shutdown(Shutdown::Both);
                            return;
                        }
                        Kind::HangRequests => {
                            let _ = to.write_all(&buf[..(c.after - sent) as usize]);
                            state.store(HUNG, SeqCst);
                            continue;
                        }
                        Kind::HangReplies => state.store(HUNG, SeqCst),
                    }
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                sent += n as u64;
            }
            // The source left. A hung link keeps the destination's side open
            // (the destination must notice by itself); otherwise pass the
            // close on. An unfired cut goes back for the next connection.
            if state.load(SeqCst) == OPEN {
                if let Some(c) = cut {
                    queue.lock().unwrap().push_front(c);
                }
                let _ = dst2.shutdown(Shutdown::Write);
            }
        });
    }
    // Destination -> source.
    {
        let (mut from, mut to) = (dst, src);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let st = state.load(SeqCst);
                if st == HUNG && cut.is_some_and(|c| c.kind == Kind::HangReplies) {
                    continue;
                }
                if st == CLOSED || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            if state.load(SeqCst) != HUNG {
                let _ = to.shutdown(Shutdown::Write);
            }
        });
    }
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
