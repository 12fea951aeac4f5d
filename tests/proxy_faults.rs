//! `flexnbd proxy` against fake old-style upstreams (tests/common/fakeupstream.rs)
//! that each misbehave once at one point: the client sees no error and the
//! right data, and the requests in flight reach the next upstream connection
//! again, unchanged and in the order first sent; an upstream that comes back
//! with another size fails the pending request with EIO (and the next request
//! starts a new round); retries that run out answer EIO and the proxy lives on.

mod common;

use common::fakeupstream::{Fake, Fault, Req, BAD_COOKIE};
use common::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const SIZE: usize = 1 << 20;
const A_OFF: u64 = 0;
const B_OFF: u64 = 64 * KIB;
const C_OFF: u64 = 512 * KIB;
const W_LEN: usize = 4096;
const C_LEN: u32 = 8192;
const CMD_FLAG_FUA: u16 = 1;
/// Far below the proxy's default upstream timeout (30 s): a fault must be
/// noticed as such, not by waiting.
const QUICK: Duration = Duration::from_secs(5);

/// A proxy to `fake` (readiness by control socket: no probe connections),
/// `--retry-delay delay`, `--verbose`, plus `extra` and `env`.
fn proxy(
    fake: &Fake,
    delay: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (tempfile::TempDir, Server) {
    let dir = tempdir();
    let mut cfg = Serve::proxy(&fake.conn_args())
        .control(&dir.path().join("ctl.sock"))
        .args(&["--retry-delay", delay, "--verbose"])
        .args(extra);
    for (k, v) in env {
        cfg = cfg.env(k, v);
    }
    let srv = cfg.start();
    (dir, srv)
}

/// A client of the proxy, past its old-style greeting.
fn client(p: &Server) -> Raw {
    let mut c = Raw::connect(p.addr());
    let g = c.read_exact(152);
    assert_eq!(be64(&g, 0), NBDMAGIC, "greeting magic");
    assert_eq!(
        be64(&g, 8),
        OLDSTYLE_MAGIC,
        "old-style to the client, as upstream"
    );
    assert_eq!(be64(&g, 16), SIZE as u64, "export size passed on");
    c
}

/// Reads `n` simple replies in any order: cookie → (error, data); READ
/// cookies (with their lengths) in `reads` carry data when they succeed.
fn replies(c: &mut Raw, n: usize, reads: &[(u64, u32)]) -> BTreeMap<u64, (u32, Vec<u8>)> {
    let mut got = BTreeMap::new();
    for _ in 0..n {
        let (error, cookie) = match c.reply() {
            Reply::Simple { error, cookie } => (error, cookie),
            r => panic!("expected a simple reply, got {r:?}"),
        };
        let data = match reads.iter().find(|r| r.0 == cookie) {
            Some(&(_, len)) if error == 0 => c.read_exact(len as usize),
            _ => Vec::new(),
        };
        assert!(
            got.insert(cookie, (error, data)).is_none(),
            "cookie {cookie} answered twice"
        );
    }
    got
}

/// Write A, FUA write B, read C, in one send (all in flight at once).
fn send_batch(c: &mut Raw, a: &[u8], b: &[u8]) {
    let mut buf = request(CMD_WRITE, 0, 1, A_OFF, a.len() as u32).to_vec();
    buf.extend_from_slice(a);
    buf.extend_from_slice(&request(CMD_WRITE, CMD_FLAG_FUA, 2, B_OFF, b.len() as u32));
    buf.extend_from_slice(b);
    buf.extend_from_slice(&request(CMD_READ, 0, 3, C_OFF, C_LEN));
    c.send(&buf);
}

fn keys(reqs: &[Req]) -> Vec<(u16, u16, u64, u32, &[u8])> {
    reqs.iter().map(Req::key).collect()
}

/// The batch reached the faulty connection, and the next connection got the
/// same three requests first, in the same order (cookies aside), then only
/// the two read-backs; no other connection was made.
fn assert_replayed(fake: &Fake, a: &[u8], b: &[u8]) {
    let (fi, first) = fake.faulty().expect("the fault fired");
    assert_eq!(first.len(), 3, "the faulty connection got {first:?}");
    let want: Vec<(u16, u16, u64, u32, &[u8])> = vec![
        (0, CMD_WRITE, A_OFF, W_LEN as u32, a),
        (CMD_FLAG_FUA, CMD_WRITE, B_OFF, W_LEN as u32, b),
        (0, CMD_READ, C_OFF, C_LEN, &[]),
    ];
    assert_eq!(keys(&first), want, "as the client sent them");
    let (ri, again) = fake.replay().expect("a connection after the fault");
    assert_eq!(
        (fi, ri),
        (1, 2),
        "probe, faulty, replay: {:?}",
        fake.conns()
    );
    assert_eq!(fake.conns().len(), 3, "{:?}", fake.conns());
    assert_eq!(again.len(), 5, "connection {ri} got {again:?}");
    assert_eq!(keys(&again[..3]), keys(&first), "sent again in order");
    let reads = vec![
        (0, CMD_READ, A_OFF, W_LEN as u32, &[][..]),
        (0, CMD_READ, B_OFF, W_LEN as u32, &[][..]),
    ];
    assert_eq!(keys(&again[3..]), reads, "then the read-backs");
}

/// One fault scenario: the pipelined batch meets `fault` on the first
/// connection; the client sees success and the right data after `min` at
/// the least; reads give back the writes; the replay is faithful; the log
/// says why the connection failed (`why`) and that 3 requests were re-sent.
fn survives(fault: Fault, seed: u64, env: &[(&str, &str)], min: Duration, why: &str) {
    let img = random_bytes(seed, SIZE);
    let fake = Fake::start(img.clone(), fault, 3);
    let (_dir, mut p) = proxy(&fake, "0.1", &[], env);
    let mut c = client(&p);
    let a = random_bytes(seed + 1, W_LEN);
    let b = random_bytes(seed + 2, W_LEN);
    let t = Instant::now();
    send_batch(&mut c, &a, &b);
    let got = replies(&mut c, 3, &[(3, C_LEN)]);
    let took = t.elapsed();
    assert_eq!(got[&1], (0, Vec::new()), "write A answered OK");
    assert_eq!(got[&2], (0, Vec::new()), "write B answered OK");
    assert_eq!(got[&3].0, 0, "read C answered OK");
    let c_range = C_OFF as usize..C_OFF as usize + C_LEN as usize;
    assert_bytes_eq(&got[&3].1, &img[c_range], "read C");
    assert!(
        took >= min && took < QUICK,
        "{fault:?}: answered after {took:?}"
    );
    assert_bytes_eq(&c.read(4, A_OFF, W_LEN as u32), &a, "A read back");
    assert_bytes_eq(&c.read(5, B_OFF, W_LEN as u32), &b, "B read back");
    let now = fake.image();
    assert_bytes_eq(&now[A_OFF as usize..][..W_LEN], &a, "A in the upstream");
    assert_bytes_eq(&now[B_OFF as usize..][..W_LEN], &b, "B in the upstream");
    assert_replayed(&fake, &a, &b);
    let failed = format!("failed: {why}; reconnecting (3 request(s) to send again)");
    for line in [failed.as_str(), "sent 3 request(s) again"] {
        assert_eq!(p.log_count(line), 1, "{line:?} in log:\n{}", p.stderr());
    }
    c.req(CMD_DISC, 0, 6, 0, 0);
    p.stop();
}

#[test]
fn closed_before_any_reply_replays_in_order() {
    survives(
        Fault::Close,
        10,
        &[],
        Duration::ZERO,
        "connection closed by the server",
    );
}

#[test]
fn closed_inside_a_reply_header_replays_in_order() {
    survives(
        Fault::HalfHeader,
        20,
        &[],
        Duration::ZERO,
        "connection closed by the server",
    );
}

#[test]
fn closed_inside_read_data_replays_in_order() {
    survives(
        Fault::HalfData,
        30,
        &[],
        Duration::ZERO,
        "connection closed by the server",
    );
}

#[test]
fn stalled_upstream_times_out_and_replays_in_order() {
    survives(
        Fault::Stall,
        40,
        &[("FLEXNBD_UPSTREAM_TIMEOUT", "1")],
        Duration::from_millis(900),
        "no reply within 1s",
    );
}

#[test]
fn wrong_handle_replays_in_order() {
    let why = format!("reply with wrong handle {BAD_COOKIE:#x}");
    survives(Fault::WrongHandle, 50, &[], Duration::ZERO, &why);
}

#[test]
fn size_change_fails_pending_with_eio_then_next_request_succeeds() {
    let img = random_bytes(60, SIZE);
    let other = 2 * SIZE as u64;
    let fake = Fake::start(img.clone(), Fault::Resize(other), 1);
    let (_dir, mut p) = proxy(&fake, "0.1", &[], &[]);
    let mut c = client(&p);
    let t = Instant::now();
    c.req(CMD_READ, 0, 1, C_OFF, C_LEN);
    assert_eq!(
        c.simple_reply(1),
        EIO,
        "pending read after the size changed"
    );
    assert!(t.elapsed() < QUICK, "EIO after {:?}", t.elapsed());
    let line = format!("came back with size {other} instead of {SIZE}");
    assert!(
        wait_until(QUICK, || p.log_count(&line) == 1),
        "log:\n{}",
        p.stderr()
    );
    // The next request starts a new round, which finds the right size.
    let d = c.read(2, C_OFF, C_LEN);
    assert_bytes_eq(&d, &img[C_OFF as usize..][..C_LEN as usize], "read after");
    let conns = fake.conns();
    let (fi, first) = fake.faulty().expect("the fault fired");
    assert_eq!(keys(&first), vec![(0, CMD_READ, C_OFF, C_LEN, &[][..])]);
    let resized = &conns[fi + 1];
    assert_eq!(resized.size, other, "the connection after the fault");
    assert!(
        resized.requests.iter().all(|r| r.kind == CMD_DISC),
        "nothing sent to the resized upstream: {:?}",
        resized.requests
    );
    let (ri, again) = fake.replay().expect("a later connection served the read");
    assert!(ri > fi + 1);
    assert_eq!(conns[ri].size, SIZE as u64);
    assert_eq!(keys(&again), vec![(0, CMD_READ, C_OFF, C_LEN, &[][..])]);
    p.assert_alive();
    c.req(CMD_DISC, 0, 3, 0, 0);
    p.stop();
}

/// Retries that run out: the fake accepts the probe and the client's
/// connection, then stops listening and closes at the first request. Two
/// rounds (the first after the fault, the second started by the next
/// request) each wait `waits` (2 attempts) and answer EIO; the proxy lives on.
fn exhausted(extra: &[&str], waits: Duration) {
    let img = random_bytes(70, SIZE);
    let fake = Fake::start(img, Fault::Vanish, 1);
    let mut args = vec!["--retries", "2"];
    args.extend_from_slice(extra);
    let (_dir, mut p) = proxy(&fake, "0.2", &args, &[]);
    let mut c = client(&p);
    for (cookie, rounds) in [(1, 1), (2, 2)] {
        let t = Instant::now();
        c.req(CMD_READ, 0, cookie, C_OFF, C_LEN);
        assert_eq!(c.simple_reply(cookie), EIO, "request {cookie}");
        let took = t.elapsed();
        assert!(
            took >= waits - Duration::from_millis(10) && took < QUICK,
            "EIO after {took:?}"
        );
        p.assert_alive();
        assert!(
            wait_until(QUICK, || p.log_count("gave up") == rounds),
            "log:\n{}",
            p.stderr()
        );
    }
    assert_eq!(p.log_count("after 2 attempt(s)"), 2, "log:\n{}", p.stderr());
    // Only the start-up probe and the client's connection ever got in.
    assert_eq!(fake.conns().len(), 2, "{:?}", fake.conns());
    c.req(CMD_DISC, 0, 3, 0, 0);
    p.stop();
}

#[test]
fn retries_exhausted_answer_eio_and_the_proxy_lives_on() {
    // Constant delays: 0.2 s, then 0.2 s.
    exhausted(&["--retry-exponential", "no"], Duration::from_millis(400));
}

#[test]
fn retries_exhausted_with_doubling_delays() {
    // Doubling (the default): 0.2 s, then 0.4 s.
    exhausted(&[], Duration::from_millis(600));
}
