//! Migration under faults, with fake peers written in Rust (`fakepeer`):
//!
//! - a real source (`flexnbd serve`) against fake destinations that fail at
//!   one point each: at the start (reported by `mirror`, never retried) or
//!   after the migration started (retried from scratch with back-off until it
//!   completes, or given up with `--retries`); clients of the source are
//!   unaffected throughout;
//! - a real destination (`flexnbd listen`) against fake senders that misbehave
//!   at one point each; the listener keeps waiting and a real migration still
//!   completes into it afterwards;
//! - old-style interoperability in both directions.
//!
//! The source runs with FLEXNBD_MS_REQUEST_LIMIT_SECS=1 so hangs are detected
//! in a second.

mod common;
mod fakepeer;

use common::*;
use fakepeer::{DestConfig, FakeDest, Fault, Greeting, Sender};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Per-request timeout of every source in this file.
const REQUEST_LIMIT: &str = "1";

/// Checks that the source serves normally: a write and a read back over NBD
/// succeed (the write lands at `off`). Returns the written bytes.
#[track_caller]
fn client_write_read(addr: SocketAddr, off: u64, seed: u64) -> Vec<u8> {
    let data = random_bytes(seed, 8192);
    let mut c = Raw::simple(addr);
    assert_eq!(c.write(1, off, &data), 0, "client write to the source");
    assert_bytes_eq(
        &c.read(2, off, data.len() as u32),
        &data,
        "client read back",
    );
    c.req(CMD_DISC, 0, 3, 0, 0);
    data
}

// ---------------------------------------------------------------- start failures

/// Runs `mirror` against `dest` and expects exit 1 with `reply` on stderr,
/// no lasting migration state, no retry, and an unaffected source.
#[track_caller]
fn expect_start_failure(src: &mut Source, dest: SocketAddr, fake: Option<&FakeDest>, reply: &str) {
    let t = Instant::now();
    let out = mirror_cmd(src.srv.ctl(), dest, &[]);
    let took = t.elapsed();
    assert_eq!(out.status.code(), Some(1), "mirror should fail: {out:?}");
    assert!(
        out.stderr_str().contains(reply),
        "expected {reply:?}, got stderr {:?}",
        out.stderr_str()
    );
    assert!(!out.stdout_str().contains("Migration started"), "{out:?}");
    let st = status_map(src.srv.ctl());
    assert_eq!(
        st["is_mirroring"], "false",
        "a failed start leaves no state: {st:?}"
    );
    assert!(st.keys().all(|k| !k.starts_with("migration_")), "{st:?}");
    if let Some(f) = fake {
        // Not retried: no second connection within the first back-off (1 s) and then some.
        assert!(
            !f.wait_for(Duration::from_millis(1500), |c| c.len() > 1),
            "a failed start was retried: {:?}",
            f.records()
        );
        assert_eq!(f.connections(), 1);
    }
    src.srv.assert_alive();
    client_write_read(src.srv.addr(), 0, took.as_nanos() as u64);
}

/// Expected: each destination that fails before the migration can start makes
/// `mirror` exit 1 with the C flexnbd's reply text, leaves is_mirroring=false
/// with no migration keys, is not retried, and the source keeps serving:
/// - nothing listening → "Mirror failed to connect";
/// - closed at accept (as an ACL does) → "Mirror was rejected";
/// - never greets → "Remote server failed to respond" (after the 5 s greeting wait);
/// - wrong greeting magic → "Mirror was rejected" (as the C flexnbd);
/// - size one block larger → "Remote size does not match local size";
/// - greets, then closes → "Mirror was rejected".
#[test]
fn start_failures_are_reported_and_not_retried() {
    let size = 4 * MIB;
    let mut src = source(size, 1);

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = closed.local_addr().unwrap();
    drop(closed);
    expect_start_failure(&mut src, nobody, None, "Mirror failed to connect");

    let cases: [(Fault, &str); 5] = [
        (Fault::CloseAtAccept, "Mirror was rejected"),
        (Fault::HangBeforeGreeting, "Remote server failed to respond"),
        // As the C flexnbd: a greeting that is not NBD counts as a rejection.
        (Fault::BadMagic, "Mirror was rejected"),
        (
            Fault::WrongSize(4096),
            "Remote size does not match local size",
        ),
        (Fault::CloseAfterGreeting, "Mirror was rejected"),
    ];
    for (fault, reply) in cases {
        let fake = FakeDest::start(DestConfig::newstyle(size).faults(std::slice::from_ref(&fault)));
        let t = Instant::now();
        eprintln!("start failure case {fault:?}");
        expect_start_failure(&mut src, fake.addr, Some(&fake), reply);
        if fault == Fault::HangBeforeGreeting {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "greeting wait took {:?}",
                t.elapsed()
            );
        }
        let recs = fake.records();
        assert!(
            recs.iter().all(|r| r.writes == 0),
            "{fault:?}: data was sent: {recs:?}"
        );
    }
    // And the same source still migrates into a good destination.
    let good = FakeDest::start(DestConfig::newstyle(size));
    mirror_cmd(src.srv.ctl(), good.addr, &[]).expect_success("mirror into a good destination");
    let data = good
        .wait_completed(Duration::from_secs(30))
        .expect("migration completed");
    assert_eq!(
        src.srv
            .wait_exit(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );
    assert_bytes_eq(&data, &read_file(&src.file), "destination image");
}

/// Expected: while `mirror` waits (up to 5 s) for a destination that never
/// greets, the source's control socket keeps answering at once: `status`
/// replies within 1 s, and a second `mirror` gets "mirror already running".
#[test]
fn control_answers_while_a_mirror_connects() {
    let size = 2 * MIB;
    let src = source(size, 7);
    let fake = FakeDest::start(DestConfig::newstyle(size).faults(&[Fault::HangBeforeGreeting]));
    let ctl = src.srv.ctl().to_owned();
    let addr = fake.addr;
    let first = std::thread::spawn(move || mirror_cmd(&ctl, addr, &[]));
    assert!(
        fake.wait_for(Duration::from_secs(5), |c| !c.is_empty()),
        "the source never connected"
    );
    let t = Instant::now();
    let st = status_map(src.srv.ctl());
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "status took {:?} while a mirror was connecting",
        t.elapsed()
    );
    assert_eq!(st["is_mirroring"], "false", "{st:?}");
    let second = mirror_cmd(src.srv.ctl(), addr, &[]);
    assert_eq!(second.status.code(), Some(1), "{second:?}");
    assert!(
        second.stderr_str().contains("mirror already running"),
        "{second:?}"
    );
    let out = first.join().unwrap();
    assert!(
        out.stderr_str().contains("Remote server failed to respond"),
        "{out:?}"
    );
}

/// Expected: a real `flexnbd listen` whose ACL excludes the source's address
/// (127.0.0.1) closes its connection with nothing sent: `mirror` exits 1 with
/// "Mirror was rejected", nothing is retried, the listener stays waiting, and
/// with `--bind 127.0.0.2` (allowed) the migration completes.
#[test]
fn destination_acl_rejects_the_source() {
    let size = 2 * MIB;
    let mut src = source(size, 2);
    let dir = tempdir();
    let dfile = dir.path().join("dst.img");
    create_sparse_file(&dfile, size);
    let dst = Daemon::listen(&dfile, &dir.path().join("dst.sock"))
        .arg("127.0.0.2")
        .start();
    expect_start_failure(&mut src, dst.addr(), None, "Mirror was rejected");
    assert!(
        dst.log_count("refused connection from 127.0.0.1") >= 1,
        "{}",
        dst.stderr()
    );
    let n = dst.log_count("refused connection");
    assert!(
        !wait_until(Duration::from_millis(1500), || dst
            .log_count("refused connection")
            > n),
        "the source retried a rejected start"
    );
    assert_eq!(status_map(dst.ctl())["has_control"], "false");

    mirror_cmd(src.srv.ctl(), dst.addr(), &["--bind", "127.0.0.2"]).expect_success("mirror --bind");
    assert_eq!(
        src.srv
            .wait_exit(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );
    assert!(wait_until(Duration::from_secs(10), || {
        try_status(dst.ctl()).is_some_and(|s| s["has_control"] == "true")
    }));
    assert_eq!(read_file(&dfile), read_file(&src.file));
    assert!(!marker_of(&dfile).exists());
}

// ---------------------------------------------------------------- retries

/// Runs a migration of a 4 MiB image at 4 MB/s (about a second per attempt,
/// so status sees each one) into a fake destination whose connections fail
/// as `faults` says, then serve well. While it retries, a client writes to
/// the source. Expected: `mirror` starts, the source retries from scratch
/// (one fresh connection per attempt, each full copy), status shows
/// is_mirroring=true throughout and migration_attempts rising to the number
/// of connections that got past the handshake, the log says it retries, the
/// client's write and read succeed, and the last connection receives the
/// whole image, including the client's write, before a DISC; the source
/// exits 0. Returns the fake's records.
fn retry_scenario(faults: &[Fault], log_needle: &str) -> Vec<fakepeer::ConnRecord> {
    let size = 4 * MIB;
    let mut src = source(size, 3);
    let fake = FakeDest::start(DestConfig::newstyle(size).faults(faults));
    let t0 = Instant::now();
    let out = mirror_cmd(src.srv.ctl(), fake.addr, &["--max-speed", "4000000"]);
    out.expect_success("mirror");
    assert_eq!(out.stdout_str().trim(), "Migration started");
    let poller = StatusPoller::start(src.srv.ctl());

    // The first failure happens; then a client uses the source.
    assert!(
        fake.wait_for(Duration::from_secs(30), |c| c.len() > 1
            || c.first().is_some_and(|r| !r.end.is_empty())),
        "first connection never failed: {:?}",
        fake.records()
    );
    src.srv.assert_alive();
    let written = client_write_read(src.srv.addr(), 3 * MIB + 4096, 99);

    let data = fake.wait_completed(Duration::from_secs(60));
    let st = src.srv.wait_exit(Duration::from_secs(30));
    let Polled { attempts, idle, .. } = poller.finish();
    let recs = fake.records();
    assert!(
        data.is_some(),
        "never completed; records {recs:?}; log:\n{}",
        src.srv.stderr()
    );
    assert_eq!(
        st.and_then(|s| s.code()),
        Some(0),
        "source exit; log:\n{}",
        src.srv.stderr()
    );
    eprintln!(
        "{faults:?}: completed after {:?}; records {recs:#?}",
        t0.elapsed()
    );
    let data = data.unwrap();
    assert_bytes_eq(
        &data,
        &read_file(&src.file),
        "destination image vs final source",
    );
    assert_bytes_eq(
        &data[(3 * MIB + 4096) as usize..][..written.len()],
        &written,
        "the client's write during the faults",
    );
    assert!(
        recs.len() > faults.len(),
        "one connection per attempt: {recs:?}"
    );
    let last = recs.last().unwrap();
    assert!(last.disc && last.covered == size, "{last:?}");
    // Every attempt started from scratch: the final one covered the image by itself.
    assert!(last.write_bytes + last.zero_bytes >= size, "{last:?}");
    let negotiated = recs.iter().filter(|r| r.negotiated).count() as u64;
    assert_eq!(
        idle, None,
        "status showed is_mirroring=false during the retries"
    );
    assert_eq!(
        attempts,
        recs.len() as u64,
        "migration_attempts vs connections, every one an attempt ({recs:?})"
    );
    assert!(negotiated <= attempts);
    assert!(
        src.srv.log_count(log_needle) >= 1,
        "log lacks {log_needle:?}:\n{}",
        src.srv.stderr()
    );
    assert!(src.srv.log_count("retrying") >= 1, "{}", src.srv.stderr());
    recs
}

/// Expected: the destination closes right after the first write → retried,
/// completes (see [`retry_scenario`]).
#[test]
fn destination_closes_after_the_first_write() {
    let recs = retry_scenario(&[Fault::CloseAtWrite(1)], "closed by the server");
    assert_eq!(recs.len(), 2);
}

/// Expected: the destination closes after several (5) writes → retried, completes.
#[test]
fn destination_closes_after_several_writes() {
    let recs = retry_scenario(&[Fault::CloseAtWrite(5)], "retrying");
    assert_eq!(recs[0].writes, 5);
    assert_eq!(recs.len(), 2);
}

/// Expected: the first attempt fails at its first write and the reconnection
/// is closed right after the greeting → retried again (after 1 s, then 2 s);
/// the third connection completes; migration_attempts counts all three,
/// the one closed after its greeting included.
#[test]
fn destination_closes_right_after_the_greeting_on_reconnect() {
    let recs = retry_scenario(
        &[Fault::CloseAtWrite(1), Fault::CloseAfterGreeting],
        "retrying",
    );
    assert_eq!(recs.len(), 3);
    assert!(!recs[1].negotiated);
}

/// Expected: the destination stops replying after its second write (socket
/// open) → after FLEXNBD_MS_REQUEST_LIMIT_SECS (1 s) the attempt fails and is
/// retried; completes.
#[test]
fn destination_hangs_after_a_write() {
    let t = Instant::now();
    let recs = retry_scenario(&[Fault::HangAtWrite(2)], "retrying");
    assert_eq!(recs.len(), 2);
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

/// Expected: the reconnection never gets a greeting (5 s wait) → retried
/// again; completes.
#[test]
fn destination_hangs_before_the_greeting_on_reconnect() {
    let recs = retry_scenario(
        &[Fault::CloseAtWrite(1), Fault::HangBeforeGreeting],
        "retrying",
    );
    assert_eq!(recs.len(), 3);
}

/// Expected: the destination answers a write with EIO → the attempt fails
/// ("refused a request" in the log) and is retried; completes.
#[test]
fn destination_replies_eio_to_a_write() {
    let recs = retry_scenario(&[Fault::ErrorAtWrite(2, EIO)], "refused a request");
    assert_eq!(recs.len(), 2);
}

/// Expected: the destination answers a write with a cookie that was never
/// sent → the attempt fails and is retried; completes.
#[test]
fn destination_replies_with_a_wrong_handle() {
    let recs = retry_scenario(&[Fault::WrongCookieAtWrite(2)], "retrying");
    assert_eq!(recs.len(), 2);
}

/// Expected: the destination answers the hand-over's FLUSH with EIO → the
/// hand-over is abandoned (clients are admitted again), the attempt is
/// retried from scratch and completes; the failed connection never got a DISC.
#[test]
fn destination_fails_the_final_flush() {
    let recs = retry_scenario(&[Fault::ErrorAtFlush(EIO)], "retrying");
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].flushes, 1);
    assert!(
        !recs[0].disc,
        "DISC sent after a failed flush: {:?}",
        recs[0]
    );
}

/// Expected: the destination closes when the hand-over's FLUSH arrives →
/// hand-over abandoned, retried, completes.
#[test]
fn destination_closes_at_the_final_flush() {
    let recs = retry_scenario(&[Fault::CloseAtFlush], "retrying");
    assert_eq!(recs.len(), 2);
    assert!(!recs[0].disc);
}

/// Expected: with `--retries 1` against a destination that always closes at
/// the first write, the source makes two attempts (one failure tolerated),
/// then gives up: `mirror --wait` exits 1 reporting the failure, status shows
/// is_mirroring=false and no migration keys, the log says it gave up, no
/// further connection is made, and the source keeps serving clients.
#[test]
fn gives_up_after_retries() {
    let size = 2 * MIB;
    let mut src = source(size, 4);
    let fake = FakeDest::start(DestConfig::newstyle(size).then(Fault::CloseAtWrite(1)));
    let out = run(
        std::process::Command::new(bin()).args([
            "mirror",
            "--addr",
            "127.0.0.1",
            "--port",
            &fake.port().to_string(),
            "--sock",
            &src.srv.ctl().display().to_string(),
            "--retries",
            "1",
            "--wait",
        ]),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout_str().contains("Migration started"), "{out:?}");
    assert!(
        out.stderr_str().contains("migration failed"),
        "stderr: {}",
        out.stderr_str()
    );
    assert_eq!(fake.connections(), 2, "{:?}", fake.records());
    let st = status_map(src.srv.ctl());
    assert_eq!(st["is_mirroring"], "false", "{st:?}");
    assert_eq!(st["clients_allowed"], "true", "{st:?}");
    assert!(st.keys().all(|k| !k.starts_with("migration_")), "{st:?}");
    assert!(
        src.srv.log_count("gave up") >= 1,
        "log:\n{}",
        src.srv.stderr()
    );
    assert!(
        !fake.wait_for(Duration::from_secs(3), |c| c.len() > 2),
        "retried after giving up"
    );
    src.srv.assert_alive();
    client_write_read(src.srv.addr(), MIB, 5);
    // A new migration may be started afterwards.
    let out = mirror_cmd(src.srv.ctl(), fake.addr, &[]);
    out.expect_success("mirror after giving up");
    let out = flexnbd(&["break", "--sock", &src.srv.ctl().display().to_string()]);
    out.expect_success("break");
    assert_eq!(out.stdout_str().trim(), "mirror stopped");
}

/// Expected: the real destination is SIGKILLed part-way through the copy
/// (marker left behind) and a new `listen` is started on the same port and
/// file; the source retries, completes into the new one (control, marker
/// removed) with the source's data, including a client write made while the
/// destination was down; the source exits 0.
#[test]
fn destination_killed_mid_copy_then_replaced() {
    let size = 64 * MIB;
    let mut src = source(size, 6);
    let dir = tempdir();
    let dfile = dir.path().join("dst.img");
    let dsock = dir.path().join("dst.sock");
    create_sparse_file(&dfile, size);
    let mut dst = Daemon::listen(&dfile, &dsock).start();
    let port = dst.port.unwrap();
    mirror_cmd(src.srv.ctl(), dst.addr(), &["--max-speed", "16000000"]).expect_success("mirror");
    let poller = StatusPoller::start(src.srv.ctl());
    assert!(
        wait_until(Duration::from_secs(30), || allocated_bytes(&dfile)
            >= 16 * MIB),
        "no data arrived"
    );
    dst.kill();
    let partial = allocated_bytes(&dfile);
    assert!(partial < size, "killed too late: {partial}");
    assert!(marker_of(&dfile).exists());
    let written = client_write_read(src.srv.addr(), 60 * MIB, 7);
    assert_eq!(status_map(src.srv.ctl())["is_mirroring"], "true");

    let dst2 = Daemon::listen(&dfile, &dsock).port(port).start();
    flexnbd(&[
        "mirror-speed",
        "--sock",
        &src.srv.ctl().display().to_string(),
        "--max-speed",
        "0",
    ])
    .expect_success("mirror-speed 0");
    let st = src.srv.wait_exit(Duration::from_secs(60));
    let Polled { attempts, idle, .. } = poller.finish();
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", src.srv.stderr());
    assert!(wait_until(Duration::from_secs(10), || {
        try_status(dst2.ctl()).is_some_and(|s| s["has_control"] == "true")
    }));
    assert_eq!(idle, None, "is_mirroring went false while retrying");
    assert!(attempts >= 2, "migration_attempts seen: {attempts}");
    assert!(!marker_of(&dfile).exists());
    assert_eq!(md5_file(&dfile), md5_file(&src.file));
    assert_bytes_eq(
        &read_file_at(&dfile, 60 * MIB, written.len()),
        &written,
        "client write",
    );
}

// ---------------------------------------------------------------- old-style

/// Expected: `listen --oldstyle` greets with exactly 152 bytes: NBDMAGIC,
/// 0x0000420281861253, the size, a u32 of transmission flags (high half zero,
/// has-flags and flush set), 124 zero bytes, and no option haggling. A
/// C-flexnbd-like sender (writes of the whole image in 1 MiB pieces, simple
/// replies, then DISC) makes control arrive: has_control=true, marker gone,
/// the file equals what was sent, and the image is then served to clients.
#[test]
fn oldstyle_listener_takes_a_c_style_migration() {
    let size = 3 * MIB + 4096;
    let l = listener(size, &["--oldstyle"]);
    let mut s = Sender::connect(l.srv.addr());
    let Greeting::Oldstyle {
        size: gsize,
        flags,
        raw,
    } = s.greeting()
    else {
        panic!("expected the old-style greeting");
    };
    assert_eq!(raw.len(), 152);
    assert_eq!(&raw[0..8], b"NBDMAGIC");
    assert_eq!(raw[8..16], 0x0000_4202_8186_1253u64.to_be_bytes());
    assert_eq!(gsize, size);
    assert_eq!(flags >> 16, 0, "flags {flags:#x}");
    assert_eq!(flags & 0x5, 0x5, "has-flags and flush: {flags:#x}");
    assert!(raw[28..].iter().all(|&b| b == 0), "124 zero bytes");
    let data = random_bytes(30, size as usize);
    s.write_all_pipelined(&data, MIB as usize);
    s.disc();
    assert!(s.read_to_close().expect("closed").is_empty());
    l.assert_took_control();
    assert_bytes_eq(&read_file(&l.file), &data, "received image");
    // Now an ordinary old-style server.
    let mut c = Sender::connect(l.srv.addr());
    assert!(matches!(c.greeting(), Greeting::Oldstyle { .. }));
    c.req(CMD_READ, 9, size - 4096, 4096);
    assert_eq!(c.reply(), (0, 9));
    assert_bytes_eq(&c.read_exact(4096), &data[(size - 4096) as usize..], "read");
}

/// Expected: `mirror` into an old-style destination advertising flags 0x0D
/// (no WRITE_ZEROES) completes: no WRITE_ZEROES is ever sent, the holes of
/// the sparse source arrive as zero data (WRITEs cover the whole image), the
/// destination's image equals the source, a DISC ends it and the source exits 0.
#[test]
fn mirror_into_an_oldstyle_destination_sends_holes_as_data() {
    let size = 8 * MIB;
    let dir = tempdir();
    let file = dir.path().join("src.img");
    create_sparse_file(&file, size);
    write_file_at(&file, MIB, &random_bytes(31, 256 * 1024));
    write_file_at(&file, 6 * MIB + 4096, &random_bytes(32, 8192));
    let mut src = Daemon::serve(&file, &dir.path().join("src.sock"))
        .env("FLEXNBD_MS_REQUEST_LIMIT_SECS", REQUEST_LIMIT)
        .start();
    let fake = FakeDest::start(DestConfig::oldstyle(size));
    mirror_cmd(src.ctl(), fake.addr, &[]).expect_success("mirror");
    let data = fake
        .wait_completed(Duration::from_secs(30))
        .expect("completed");
    assert_eq!(
        src.wait_exit(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );
    let recs = fake.records();
    let last = recs.last().unwrap();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(last.zeroes, 0, "WRITE_ZEROES sent to a server without it");
    assert_eq!(last.covered, size);
    assert!(last.write_bytes >= size, "{last:?}");
    assert!(last.disc);
    assert_bytes_eq(&data, &read_file(&file), "destination image");
}

// ---------------------------------------------------------------- faults under load

/// Runs [`LOAD_WRITER`] (8 in flight, as fast as it can) against a source of
/// 64 MiB migrating into a fake destination whose first connection has
/// `fault`. With `trip_when_active`, the copy runs at 20 MB/s (slower than
/// the load dirties the image, so the source must switch to active
/// mirroring: client writes are forwarded and wait for the destination) and
/// the fault is triggered once the source logs that it mirrors actively;
/// the limit is then lifted so the retry finishes quickly.
///
/// Expected: the attempt fails and is retried; the second completes; the
/// source exits 0; the writer kept getting acknowledgements through the
/// fault and retry, saw no failure before the final hand-over and no error
/// reply at all (only the writes in flight when the connection was dropped at
/// the very end failed), none succeeding after the first; the destination's image equals the source's final file and holds
/// every acknowledged write.
fn load_with_destination_fault(fault: Fault, trip_when_active: bool) {
    let size = 64 * MIB;
    let mut src = source(size, 40);
    let ctl = src.srv.ctl().display().to_string();
    let fake = FakeDest::start(DestConfig::newstyle(size).faults(std::slice::from_ref(&fault)));
    let mut writer = LoadWriter::start(&src.srv.uri(), 8, 41);
    let limit: &[&str] = if trip_when_active {
        &["--max-speed", "20000000"]
    } else {
        &[]
    };
    mirror_cmd(src.srv.ctl(), fake.addr, limit).expect_success("mirror");
    let poller = StatusPoller::start(src.srv.ctl());
    if trip_when_active {
        assert!(
            wait_until(Duration::from_secs(60), || src
                .srv
                .log_count("mirroring writes actively")
                >= 1),
            "never switched to active mirroring; log:\n{}",
            src.srv.stderr()
        );
        fake.trip();
    }
    let t_fault = now_epoch();
    assert!(
        fake.wait_for(Duration::from_secs(60), |c| c.len() > 1),
        "no retry: {:?}; log:\n{}",
        fake.records(),
        src.srv.stderr()
    );
    if trip_when_active {
        flexnbd(&["mirror-speed", "--sock", &ctl, "--max-speed", "0"])
            .expect_success("lift the limit");
    }
    let data = fake.wait_completed(Duration::from_secs(120));
    let st = src.srv.wait_exit(Duration::from_secs(30));
    let polled = poller.finish();
    assert!(
        data.is_some(),
        "never completed: {:?}; log:\n{}",
        fake.records(),
        src.srv.stderr()
    );
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", src.srv.stderr());
    let recs = fake.records();
    assert_eq!(recs[0].fault.as_ref(), Some(&fault));
    assert!(!recs[0].disc, "{:?}", recs[0]);
    assert!(polled.attempts >= 2, "{polled:?}");
    assert_eq!(polled.idle, None, "is_mirroring=false while retrying");

    let r = writer.finish(Duration::from_secs(30));
    let during = load_acked_after(&r, t_fault);
    eprintln!(
        "{fault:?}: writer {} acknowledged ({during} after the fault), {} failed {}; records {recs:?}",
        r["n_ok"], r["n_fail"], r["fails"]
    );
    assert!(
        during >= 1000,
        "clients must keep being served through the fault and the retry ({during})"
    );
    let data = data.unwrap();
    assert_bytes_eq(&data, &read_file(&src.file), "destination vs final source");
    let checked = check_acknowledged_writes(&r, |b| data[(b * 4096) as usize..][..4096].to_vec());
    assert!(checked > 1000, "{checked}");
    check_load_failures(&r, polled.last_allowed);
}

/// See [`load_with_destination_fault`]: the destination closes during active
/// mirroring (forwarded client writes in flight fall back to the dirty map).
#[test]
fn load_destination_closes_during_active_mirroring() {
    load_with_destination_fault(Fault::CloseWhenTripped, true);
}

/// See [`load_with_destination_fault`]: the destination stops answering
/// during active mirroring (forwarded client writes wait for the 1 s request
/// limit, then fall back to the dirty map; clients see no error).
#[test]
fn load_destination_hangs_during_active_mirroring() {
    load_with_destination_fault(Fault::HangWhenTripped, true);
}

/// See [`load_with_destination_fault`]: the destination fails the hand-over's
/// FLUSH; requests held during the abandoned hand-over are served, not failed.
#[test]
fn load_destination_fails_the_handover_flush() {
    load_with_destination_fault(Fault::ErrorAtFlush(EIO), false);
}

// ---------------------------------------------------------------- more

/// Expected: a real `mirror` from our source into `listen --oldstyle`
/// completes (our client speaks the old-style handshake): source exits 0,
/// control arrives, the files are identical.
#[test]
fn real_mirror_into_an_oldstyle_listener() {
    let mut l = listener(2 * MIB + 4096, &["--oldstyle"]);
    l.real_migration_completes(50);
}

/// Expected: the source is stopped (SIGTERM) in the middle of a migration:
/// it exits 1 (a migration was under way: not a clean stop, as the C
/// flexnbd); the destination never gets control (has_control=false, marker
/// kept) and accepts a new sender.
#[test]
fn source_stopped_mid_migration_does_not_hand_over() {
    let size = 64 * MIB;
    let mut src = source(size, 51);
    let mut l = listener(size, &[]);
    mirror_cmd(src.srv.ctl(), l.srv.addr(), &["--max-speed", "16000000"]).expect_success("mirror");
    assert!(
        wait_until(Duration::from_secs(30), || allocated_bytes(&l.file)
            >= 8 * MIB),
        "no data arrived"
    );
    let st = src.srv.stop_with(SIGTERM);
    assert_eq!(st.code(), Some(1), "{}", src.srv.stderr());
    l.wait_no_clients();
    l.assert_stays_waiting(Duration::from_secs(1));
    assert!(allocated_bytes(&l.file) < size);
    l.real_migration_completes(52);
}

/// Expected: `mirror --wait` on a migration that is then stopped with
/// `break` exits 1 and says the migration stopped; the source keeps serving.
#[test]
fn mirror_wait_reports_a_break() {
    let size = 64 * MIB;
    let mut src = source(size, 53);
    let mut l = listener(size, &[]);
    let (ctl, port) = (src.srv.ctl().display().to_string(), l.srv.port.unwrap());
    let waiter = std::thread::spawn(move || {
        run(
            std::process::Command::new(bin()).args([
                "mirror",
                "--addr",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--sock",
                &ctl,
                "--max-speed",
                "8000000",
                "--wait",
            ]),
            Duration::from_secs(60),
        )
    });
    assert!(
        wait_until(Duration::from_secs(20), || try_status(src.srv.ctl())
            .is_some_and(|s| s["is_mirroring"] == "true")),
        "migration did not start"
    );
    let out = flexnbd(&["break", "--sock", &src.srv.ctl().display().to_string()]);
    out.expect_success("break");
    let w = waiter.join().unwrap();
    assert_eq!(w.status.code(), Some(1), "{w:?}");
    assert!(w.stdout_str().contains("Migration started"), "{w:?}");
    assert!(w.stderr_str().contains("stopped"), "{w:?}");
    src.srv.assert_alive();
    client_write_read(src.srv.addr(), 0, 54);
    // The stopped migration must not hand over (no DISC was sent).
    l.wait_no_clients();
    l.assert_stays_waiting(Duration::from_secs(1));
}

/// Expected: the destination stops answering at the hand-over's FLUSH while
/// the source uses the default 60 s request limit. During the hung hand-over
/// the source reports clients_allowed=false and a client's write is held (not
/// failed, not answered for the first 500 ms); within the hand-over's budget
/// (1 s, plus the 250 ms a forwarded write may wait) the source gives up on
/// it and serves clients again: the held write succeeds and lands in the
/// file, clients_allowed=true, is_mirroring=true. `break` then returns
/// promptly with "mirror stopped", and the destination never got a DISC.
#[test]
fn a_hung_handover_releases_clients_after_its_budget() {
    let size = 4 * MIB;
    let dir = tempdir();
    let file = dir.path().join("src.img");
    create_random_file(&file, size, 60);
    // No FLEXNBD_MS_REQUEST_LIMIT_SECS: the hang would last 60 s.
    let src = Daemon::serve(&file, &dir.path().join("src.sock")).start();
    let fake = FakeDest::start(DestConfig::newstyle(size).faults(&[Fault::HangAtFlush]));
    let mut held = Raw::simple(src.addr());
    mirror_cmd(src.ctl(), fake.addr, &[]).expect_success("mirror");
    assert!(
        fake.wait_for(Duration::from_secs(30), |c| c
            .first()
            .is_some_and(|r| r.flushes == 1)),
        "hand-over never flushed: {:?}",
        fake.records()
    );
    let t_flush = Instant::now();
    let st = status_map(src.ctl());
    assert_eq!(
        st["clients_allowed"], "false",
        "during the hand-over: {st:?}"
    );
    assert_eq!(st["migration_state"], "handover", "{st:?}");
    let data = random_bytes(61, 4096);
    let writer = std::thread::spawn(move || {
        let e = held.write(7, 8192, &data);
        (e, data, Instant::now())
    });
    // The write is held at the closed gate: no reply yet (polled for 500 ms).
    assert!(
        !wait_until(Duration::from_millis(500), || writer.is_finished()),
        "a client write was answered during the hand-over"
    );
    let (e, data, answered) = writer.join().unwrap();
    assert_eq!(e, 0, "the held write must succeed");
    let held_for = answered.duration_since(t_flush);
    assert!(held_for < Duration::from_secs(3), "held for {held_for:?}");
    assert_eq!(read_file_at(&file, 8192, 4096), data);
    let st = status_map(src.ctl());
    assert_eq!(st["clients_allowed"], "true", "{st:?}");
    assert_eq!(st["is_mirroring"], "true", "{st:?}");
    let t = Instant::now();
    let out = flexnbd(&["break", "--sock", &src.ctl().display().to_string()]);
    let took = t.elapsed();
    out.expect_success("break");
    assert_eq!(out.stdout_str().trim(), "mirror stopped");
    assert!(took < Duration::from_secs(5), "break took {took:?}");
    let st = status_map(src.ctl());
    assert_eq!(st["is_mirroring"], "false", "{st:?}");
    assert_eq!(st["clients_allowed"], "true", "{st:?}");
    assert!(!fake.records()[0].disc);
    client_write_read(src.addr(), MIB, 62);
}

/// Expected: a client request that arrives while the hand-over holds
/// requests back (here: while the destination takes 600 ms over the final
/// FLUSH, within the hand-over's 1 s budget) is never answered and never
/// executed: once the hand-over completes
/// the client's connection is closed with nothing sent for it (no ESHUTDOWN
/// or other error reply, which a VM would see as an I/O error; a reconnecting
/// client retries it against the new server). A write acknowledged before
/// the hand-over is in the destination's image; the held write is neither in
/// it nor in the source's file.
#[test]
fn requests_held_at_the_handover_get_no_reply() {
    let size = 4 * MIB;
    let dir = tempdir();
    let file = dir.path().join("src.img");
    create_random_file(&file, size, 63);
    let original = read_file(&file);
    let mut src = Daemon::serve(&file, &dir.path().join("src.sock")).start();
    let fake = FakeDest::start(DestConfig::newstyle(size).faults(&[Fault::SlowFlush(600)]));
    let mut held = Raw::simple(src.addr());
    let acked = random_bytes(64, 4096);
    assert_eq!(held.write(1, 0, &acked), 0, "write before the migration");
    mirror_cmd(src.ctl(), fake.addr, &[]).expect_success("mirror");
    assert!(
        fake.wait_for(Duration::from_secs(30), |c| c
            .first()
            .is_some_and(|r| r.flushes == 1)),
        "hand-over never flushed: {:?}",
        fake.records()
    );
    // The gate is closed while the destination sits on the FLUSH.
    held.req(CMD_WRITE, 0, 2, 8192, 4096);
    held.send(&random_bytes(65, 4096));
    held.req(CMD_READ, 0, 3, 0, 4096);
    let got = held.expect_closed();
    assert!(
        got.is_empty(),
        "held requests were answered at the hand-over: {:02x?}",
        &got[..got.len().min(32)]
    );
    let st = src.wait_exit(Duration::from_secs(30));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", src.stderr());
    let data = fake
        .wait_completed(Duration::from_secs(10))
        .expect("destination got the whole image and DISC");
    assert_bytes_eq(
        &data[..4096],
        &acked,
        "acknowledged write at the destination",
    );
    assert_bytes_eq(
        &data[4096..],
        &original[4096..],
        "rest of the image at the destination (held write not applied)",
    );
    assert_bytes_eq(
        &read_file_at(&file, 8192, 4096),
        &original[8192..8192 + 4096],
        "held write not applied at the source",
    );
}
