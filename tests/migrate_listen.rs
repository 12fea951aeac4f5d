//! The destination of a migration (`flexnbd listen`) against hand-driven
//! senders (`fakepeer::Sender`) that misbehave at one point each: the
//! listener keeps waiting (no control, `FILE.INCOMPLETE` kept) unless a
//! sender delivered every byte of the image and then a clean DISC, and a
//! real migration still completes into it afterwards. Also: a silent sender
//! is replaced by a new one, a trickling sender is dropped, and the marker
//! is never followed through a symlink.

mod common;
mod fakepeer;

use common::*;
use fakepeer::{Greeting, Sender};
use std::net::IpAddr;
use std::time::{Duration, Instant};

const LSIZE: u64 = 4 * MIB;

/// Expected: a sender that closes right after connecting leaves the listener
/// waiting; a real migration then completes.
#[test]
fn sender_closes_right_after_connect() {
    let mut l = listener(LSIZE, &[]);
    drop(Sender::connect(l.srv.addr()));
    l.wait_no_clients();
    l.assert_stays_waiting(Duration::from_secs(1));
    l.real_migration_completes(10);
}

/// Expected: a sender that closes after reading the greeting leaves the
/// listener waiting; a real migration then completes.
#[test]
fn sender_closes_after_the_greeting() {
    let mut l = listener(LSIZE, &[]);
    let mut s = Sender::connect(l.srv.addr());
    assert!(matches!(s.greeting(), Greeting::Newstyle { .. }));
    drop(s);
    l.wait_no_clients();
    l.assert_stays_waiting(Duration::from_secs(1));
    l.real_migration_completes(11);
}

/// Expected: a sender that writes most of the image, then sends half of a
/// write's payload and closes, leaves the listener waiting (no control, marker
/// kept); a real migration then completes.
#[test]
fn sender_closes_mid_write() {
    let mut l = listener(LSIZE, &[]);
    let (mut s, size, _) = Sender::handshake(l.srv.addr());
    assert_eq!(size, LSIZE);
    s.write_all_pipelined(&random_bytes(12, (LSIZE - 64 * KIB) as usize), 256 * 1024);
    s.send(&request(CMD_WRITE, 0, 77, LSIZE - 64 * KIB, 64 * 1024));
    s.send(&random_bytes(13, 32 * 1024));
    drop(s);
    l.wait_no_clients();
    l.assert_stays_waiting(Duration::from_secs(1));
    l.real_migration_completes(14);
}

/// Expected: a sender that asks for a 1 MiB read and closes without reading
/// the reply leaves the listener waiting; a real migration then completes.
#[test]
fn sender_closes_mid_read() {
    let mut l = listener(LSIZE, &[]);
    let (mut s, _, _) = Sender::handshake(l.srv.addr());
    assert_eq!(s.write(1, 0, &random_bytes(15, 4096)), 0);
    s.req(CMD_READ, 2, 0, MIB as u32);
    let mut part = [0u8; 100];
    std::io::Read::read_exact(&mut s.s, &mut part).expect("start of the read reply");
    drop(s);
    l.wait_no_clients();
    l.assert_stays_waiting(Duration::from_secs(1));
    l.real_migration_completes(16);
}

/// Expected: writes past the end get ENOSPC and the connection stays in sync
/// (an in-range write afterwards succeeds); the listener stays waiting after
/// the sender leaves; a real migration then completes.
#[test]
fn sender_writes_out_of_range() {
    let mut l = listener(LSIZE, &[]);
    let (mut s, _, _) = Sender::handshake(l.srv.addr());
    assert_eq!(s.write(1, LSIZE - 4096, &random_bytes(17, 8192)), ENOSPC);
    assert_eq!(s.write(2, LSIZE, &random_bytes(18, 4096)), ENOSPC);
    assert_eq!(
        s.write(3, 0, &random_bytes(19, 4096)),
        0,
        "in sync after ENOSPC"
    );
    l.assert_waiting();
    drop(s);
    l.wait_no_clients();
    l.assert_stays_waiting(Duration::from_secs(1));
    l.real_migration_completes(20);
}

/// Expected: with an ACL allowing only 127.0.0.1, a sender from 127.0.0.2 is
/// closed with nothing sent; the listener stays waiting; a real migration
/// (from 127.0.0.1) then completes.
#[test]
fn sender_from_a_banned_address_gets_nothing() {
    let mut l = listener(LSIZE, &["127.0.0.1"]);
    let ip: IpAddr = "127.0.0.2".parse().unwrap();
    let mut s = Sender::from_stream(connect_from(ip, l.srv.addr()).expect("connect"));
    let got = s.read_to_close().expect("closed");
    assert!(got.is_empty(), "banned sender received {} bytes", got.len());
    l.assert_waiting();
    l.real_migration_completes(21);
}

/// Expected: while one sender is connected, a second connection is closed at
/// accept with nothing sent; the first sender is unaffected (its writes and a
/// read back succeed afterwards); when it drops having written only part of
/// the image, no control is given, a new connection is admitted again, and a
/// real migration then completes.
#[test]
fn second_sender_is_closed_and_first_unaffected() {
    let mut l = listener(LSIZE, &[]);
    let (mut a, _, _) = Sender::handshake(l.srv.addr());
    let d1 = random_bytes(22, 64 * 1024);
    assert_eq!(a.write(1, 0, &d1), 0);
    let mut b = Sender::connect(l.srv.addr());
    let got = b.read_to_close().expect("second sender closed");
    assert!(got.is_empty(), "second sender received {} bytes", got.len());
    let d2 = random_bytes(23, 64 * 1024);
    assert_eq!(
        a.write(2, MIB, &d2),
        0,
        "first sender after the second was refused"
    );
    a.req(CMD_READ, 3, MIB, d2.len() as u32);
    let (e, c) = a.reply();
    assert_eq!((e, c), (0, 3));
    assert_bytes_eq(
        &a.read_exact(d2.len()),
        &d2,
        "read back by the first sender",
    );
    // A leaves without DISC (a sender that drops part-way).
    drop(a);
    l.wait_no_clients();
    l.assert_stays_waiting(Duration::from_secs(1));
    let mut c = Sender::connect(l.srv.addr());
    assert!(
        matches!(c.greeting(), Greeting::Newstyle { .. }),
        "a sender is admitted again once the first left"
    );
    drop(c);
    l.wait_no_clients();
    l.real_migration_completes(24);
}

/// Expected: with `FLEXNBD_MIGRATION_IDLE_SECS=1`, a sender whose requests
/// keep coming less than a second apart stays connected; once it goes quiet
/// (connected, nothing sent) the listener drops it after about a second,
/// saying why, and stays waiting without control; the slot it held is free
/// again and a real migration then completes.
#[test]
fn quiet_sender_is_dropped_after_the_idle_limit() {
    let mut l = listener_env(LSIZE, &[], &[("FLEXNBD_MIGRATION_IDLE_SECS", "1")]);
    let (mut a, _, _) = Sender::handshake(l.srv.addr());
    for i in 0..5u64 {
        assert_eq!(
            a.write(i, i * 65536, &random_bytes(60 + i, 65536)),
            0,
            "write {i}"
        );
        // A sender pacing itself: gaps well under the limit.
        std::thread::sleep(Duration::from_millis(400));
    }
    let mut b = Sender::connect(l.srv.addr());
    let got = b.read_to_close().expect("second sender closed");
    assert!(got.is_empty(), "the slot is still held by the paced sender");
    assert_eq!(a.write(9, 0, &random_bytes(66, 4096)), 0, "last write");
    let quiet_from = Instant::now();
    let rest = a.read_to_close().expect("quiet sender closed");
    let waited = quiet_from.elapsed();
    assert!(
        rest.is_empty(),
        "{} bytes sent to the quiet sender",
        rest.len()
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "dropped after {waited:?}"
    );
    l.wait_no_clients();
    assert!(
        l.srv.log_count("idle limit") >= 1,
        "log:\n{}",
        l.srv.stderr()
    );
    l.assert_stays_waiting(Duration::from_secs(1));
    l.real_migration_completes(27);
}

/// Expected: a connection that writes nothing (a probe such as nbdinfo) and
/// sends a clean DISC does not hand the image over; a real migration then
/// completes.
#[test]
fn disc_without_writes_does_not_give_control() {
    let mut l = listener(LSIZE, &[]);
    let (mut s, _, _) = Sender::handshake(l.srv.addr());
    s.disc();
    let rest = s.read_to_close().expect("closed after DISC");
    assert!(rest.is_empty(), "{} bytes after DISC", rest.len());
    l.wait_no_clients();
    l.assert_stays_waiting(Duration::from_secs(2));
    l.real_migration_completes(26);
}

/// Sends `data` at 0 and then DISC, and waits for the listener to close.
fn send_then_disc(s: &mut Sender, data: &[u8]) {
    if !data.is_empty() {
        s.write_all_pipelined(data, 512 * 1024);
    }
    s.disc();
    let rest = s.read_to_close().expect("closed after DISC");
    assert!(rest.is_empty(), "{} bytes after DISC", rest.len());
}

/// Expected: a connection that writes one byte and sends a clean DISC hands
/// nothing over: the listener logs an error naming how little arrived, keeps
/// its marker and serves nobody; the real migration that follows completes.
#[test]
fn one_byte_then_disc_hands_nothing_over() {
    let mut l = listener(LSIZE, &[]);
    let (mut s, _, _) = Sender::handshake(l.srv.addr());
    assert_eq!(s.write(1, 12345, &[0x5a]), 0);
    send_then_disc(&mut s, &[]);
    l.wait_no_clients();
    l.assert_stays_waiting(Duration::from_secs(1));
    let log = l.srv.stderr();
    assert!(
        log.lines()
            .any(|x| x.starts_with('E') && x.contains(&format!("sent 1 of {LSIZE} bytes"))),
        "no error naming the partial sender; log:\n{log}"
    );
    l.real_migration_completes(40);
}

/// Expected: a sender that writes all but the last 4 KiB, then DISC, hands
/// nothing over (error logged, marker kept, no clients admitted: a client
/// connection is closed with nothing sent); the real migration that follows
/// completes.
#[test]
fn partial_image_then_disc_hands_nothing_over() {
    let mut l = listener(LSIZE, &[]);
    let (mut s, _, _) = Sender::handshake(l.srv.addr());
    send_then_disc(&mut s, &random_bytes(25, (LSIZE - 4096) as usize));
    l.wait_no_clients();
    l.assert_stays_waiting(Duration::from_secs(1));
    assert!(
        l.srv.log_count("the image is incomplete") >= 1,
        "log:\n{}",
        l.srv.stderr()
    );
    l.real_migration_completes(41);
}

/// Expected: WRITEs, WRITE_ZEROES and TRIMs that together cover every byte
/// (in any order, overlapping) followed by DISC hand the image over: control
/// arrives, marker gone, and the file holds the data with zeroes where the
/// zeroes and trims went.
#[test]
fn writes_zeroes_and_trims_covering_everything_hand_over() {
    let l = listener(LSIZE, &[]);
    let (mut s, _, flags) = Sender::handshake(l.srv.addr());
    assert!(
        flags & 64 != 0 && flags & 32 != 0,
        "WRITE_ZEROES and TRIM offered: {flags:#x}"
    );
    let half = (LSIZE / 2) as usize;
    let data = random_bytes(42, half + 8192);
    s.write_all_pipelined(&data, 256 * 1024);
    s.req(CMD_WRITE_ZEROES, 1001, half as u64, (LSIZE / 4) as u32);
    assert_eq!(s.reply(), (0, 1001));
    s.req(
        CMD_TRIM,
        1002,
        LSIZE * 3 / 4 - 4096,
        (LSIZE / 4 + 4096) as u32,
    );
    assert_eq!(s.reply(), (0, 1002));
    send_then_disc(&mut s, &[]);
    l.assert_took_control();
    let mut want = vec![0u8; LSIZE as usize];
    want[..half].copy_from_slice(&data[..half]);
    assert_bytes_eq(&read_file(&l.file), &want, "received image");
}

/// Expected: with `FLEXNBD_MIGRATION_STALE_SECS=1`, a sender that has gone
/// silent (connected, nothing more sent: a half-open link) no longer holds
/// the slot: a real source arriving after that second is admitted in its
/// place (the silent connection is closed) and its migration completes,
/// well before the idle limit (120 s) would have dropped the silent one.
#[test]
fn silent_sender_is_replaced_by_a_new_one() {
    let mut l = listener_env(LSIZE, &[], &[("FLEXNBD_MIGRATION_STALE_SECS", "1")]);
    let (mut a, _, _) = Sender::handshake(l.srv.addr());
    assert_eq!(a.write(1, 0, &random_bytes(43, 65536)), 0);
    // The fault itself: the sender stays silent for longer than the limit.
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    l.real_migration_completes(44);
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
    let rest = a.read_to_close().expect("the silent sender is closed");
    assert!(
        rest.is_empty(),
        "{} bytes to the replaced sender",
        rest.len()
    );
    assert!(
        l.srv.log_count("replaced by a new sender") >= 1,
        "log:\n{}",
        l.srv.stderr()
    );
}

/// Expected: with `FLEXNBD_MIGRATION_IDLE_SECS=1`, a sender that starts a
/// write and then trickles its payload one byte every 100 ms (never quite
/// silent, never finishing a request) is dropped about a second after the
/// request began; the listener stays waiting and a real migration completes.
#[test]
fn trickling_sender_is_dropped_after_the_idle_limit() {
    let mut l = listener_env(LSIZE, &[], &[("FLEXNBD_MIGRATION_IDLE_SECS", "1")]);
    let (mut a, _, _) = Sender::handshake(l.srv.addr());
    let t0 = Instant::now();
    a.send(&request(CMD_WRITE, 0, 1, 0, 4096));
    let mut dropped = None;
    for i in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        if std::io::Write::write_all(&mut a.s, &[i as u8]).is_err() {
            dropped = Some(t0.elapsed());
            break;
        }
        if try_status(l.srv.ctl()).is_some_and(|s| s["num_clients"] == "0") {
            dropped = Some(t0.elapsed());
            break;
        }
    }
    let dropped = dropped.expect("the trickling sender was never dropped");
    assert!(
        dropped >= Duration::from_millis(900) && dropped < Duration::from_secs(5),
        "dropped after {dropped:?}"
    );
    assert!(
        l.srv.log_count("idle limit") >= 1,
        "log:\n{}",
        l.srv.stderr()
    );
    l.assert_stays_waiting(Duration::from_secs(1));
    l.real_migration_completes(45);
}

/// Expected: `listen` refuses to start when `FILE.INCOMPLETE` is a symlink
/// (exit 1, a message saying so), and the file it points to is untouched;
/// with a FIFO in its place it fails the same way instead of hanging.
#[test]
fn listen_never_follows_a_symlink_at_the_marker() {
    let dir = tempdir();
    let file = dir.path().join("dst.img");
    create_sparse_file(&file, LSIZE);
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"do not truncate me").unwrap();
    std::os::unix::fs::symlink(&victim, marker_of(&file)).unwrap();
    let port = free_port().to_string();
    let f = file.display().to_string();
    let out = flexnbd(&[
        "listen",
        "--addr",
        "127.0.0.1",
        "--port",
        &port,
        "--file",
        &f,
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr_str().contains("symbolic link"),
        "{}",
        out.stderr_str()
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"do not truncate me");
    assert!(
        !accepts(format!("127.0.0.1:{port}").parse().unwrap()),
        "it listened"
    );

    std::fs::remove_file(marker_of(&file)).unwrap();
    let mk = std::process::Command::new("mkfifo")
        .arg(marker_of(&file))
        .status()
        .unwrap();
    assert!(mk.success());
    let out = flexnbd(&[
        "listen",
        "--addr",
        "127.0.0.1",
        "--port",
        &port,
        "--file",
        &f,
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr_str().contains("not a regular file"),
        "{}",
        out.stderr_str()
    );
}
