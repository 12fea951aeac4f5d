//! Tests of the pipelined sender and receiver against scripted fake servers.

use super::fake::{handshake, quick, Peer, ALL_FLAGS};
use super::{ClientError, Completion, ConnectOptions, Receiver, Sender};
use crate::proto::consts::*;
use crate::proto::handshake::{info_export, newstyle_greeting};
use crate::proto::reply::{error_chunk, none_chunk};
use crate::proto::{Command, NbdErrno, SimpleReply};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn pipeline<T, F>(
    structured: bool,
    timeout: Duration,
    script: F,
) -> (Sender, Receiver, JoinHandle<T>)
where
    F: FnOnce(Peer) -> T + Send + 'static,
    T: Send + 'static,
{
    let opts = ConnectOptions {
        structured_replies: structured,
        ..quick()
    };
    let (conn, server) = handshake(&opts, script);
    let conn = conn.unwrap();
    assert_eq!(conn.structured_replies(), structured);
    let (tx, rx) = conn.into_pipeline(timeout).unwrap();
    (tx, rx, server)
}

fn go(p: &mut Peer, structured: bool) {
    p.send(&newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    p.client_flags();
    if structured {
        let (opt, _) = p.option();
        p.reply(opt, REP_ACK, &[]);
    }
    p.option();
    p.reply(OPT_GO, REP_INFO, &info_export(1 << 20, ALL_FLAGS));
    p.reply(OPT_GO, REP_ACK, &[]);
}

fn next(rx: &mut Receiver) -> Completion {
    rx.recv().unwrap().expect("a completion")
}

#[test]
fn completions_arrive_in_the_servers_order() {
    let (mut tx, mut rx, server) = pipeline(false, Duration::from_secs(5), |mut p| {
        go(&mut p, false);
        let mut seen = Vec::new();
        for _ in 0..5 {
            let r = p.request().unwrap();
            if r.command == Command::Write {
                p.bytes(r.length as usize);
            }
            seen.push((r.command, r.cookie, r.flags));
        }
        for &(_, cookie, _) in seen.iter().rev() {
            let reply = if cookie == 3 {
                SimpleReply::err(cookie, NbdErrno::Io)
            } else {
                SimpleReply::ok(cookie)
            };
            p.send(&reply.encode());
        }
        let disc = p.request().unwrap();
        assert_eq!(disc.command, Command::Disc);
        assert!(p.request().is_none());
        seen
    });
    let sender = std::thread::spawn(move || {
        tx.write(1, 0, &[1u8; 100], false).unwrap();
        tx.write(2, 4096, &vec![2u8; 200_000], true).unwrap();
        tx.write_zeroes(3, 8192, 4096, true).unwrap();
        tx.trim(4, 0, 4096).unwrap();
        tx.flush(5).unwrap();
        tx
    });
    let mut got = Vec::new();
    for _ in 0..5 {
        let c = next(&mut rx);
        got.push((c.cookie, c.result.is_ok()));
        if c.cookie == 3 {
            let e = c.result.unwrap_err();
            assert!(
                matches!(
                    e,
                    ClientError::Nbd {
                        errno: NbdErrno::Io,
                        ..
                    }
                ),
                "{e}"
            );
        }
    }
    assert_eq!(
        got,
        vec![(5, true), (4, true), (3, false), (2, true), (1, true)]
    );
    assert_eq!(rx.in_flight(), 0);
    let mut tx = sender.join().unwrap();
    tx.disconnect().unwrap();
    assert!(rx.recv().unwrap().is_none());
    let seen = server.join().unwrap();
    assert_eq!(seen[1], (Command::Write, 2, CMD_FLAG_FUA));
    assert_eq!(seen[2], (Command::WriteZeroes, 3, CMD_FLAG_NO_HOLE));
}

#[test]
fn structured_chunks_of_several_requests_interleave() {
    let (mut tx, mut rx, server) = pipeline(true, Duration::from_secs(5), |mut p| {
        go(&mut p, true);
        let a = p.request().unwrap();
        p.bytes(a.length as usize);
        let b = p.request().unwrap();
        let mut not_last = error_chunk(a.cookie, NbdErrno::NoSpc, "full");
        not_last[4..6].copy_from_slice(&0u16.to_be_bytes());
        p.send(&not_last);
        p.send(&none_chunk(b.cookie));
        p.send(&none_chunk(a.cookie));
        p.wait_close();
    });
    tx.write(10, 0, b"data", false).unwrap();
    tx.flush(11).unwrap();
    let first = next(&mut rx);
    assert_eq!(first.cookie, 11);
    assert!(first.result.is_ok());
    let second = next(&mut rx);
    assert_eq!(second.cookie, 10);
    match second.result.unwrap_err() {
        ClientError::Nbd { errno, message } => {
            assert_eq!(errno, NbdErrno::NoSpc);
            assert_eq!(message.as_deref(), Some("full"));
        }
        e => panic!("{e}"),
    }
    drop((tx, rx));
    server.join().unwrap();
}

#[test]
fn unknown_cookie_is_wrong_handle() {
    let (mut tx, mut rx, server) = pipeline(false, Duration::from_secs(5), |mut p| {
        go(&mut p, false);
        let r = p.request().unwrap();
        p.send(&SimpleReply::ok(r.cookie + 1).encode());
        p.wait_close();
    });
    tx.flush(7).unwrap();
    let e = rx.recv().unwrap_err();
    assert!(matches!(e, ClientError::WrongHandle(8)), "{e}");
    drop((tx, rx));
    server.join().unwrap();
}

#[test]
fn duplicate_cookie_is_refused() {
    let (mut tx, rx, server) = pipeline(false, Duration::from_secs(5), |mut p| {
        go(&mut p, false);
        p.wait_close();
    });
    tx.flush(1).unwrap();
    assert_eq!(tx.in_flight(), 1);
    let e = tx.flush(1).unwrap_err();
    assert!(matches!(e, ClientError::Invalid(_)), "{e}");
    drop((tx, rx));
    server.join().unwrap();
}

#[test]
fn silence_with_requests_in_flight_times_out() {
    let (mut tx, mut rx, server) = pipeline(false, Duration::from_millis(200), |mut p| {
        go(&mut p, false);
        p.wait_close();
    });
    tx.flush(1).unwrap();
    let start = Instant::now();
    let e = rx.recv().unwrap_err();
    assert!(matches!(e, ClientError::Timeout(_)), "{e}");
    assert!(start.elapsed() < Duration::from_secs(3));
    drop((tx, rx));
    server.join().unwrap();
}

#[test]
fn idle_receiver_waits_until_shut_down() {
    let (tx, mut rx, server) = pipeline(false, Duration::from_millis(100), |mut p| {
        go(&mut p, false);
        p.wait_close();
    });
    let handle = tx.shutdown_handle();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        handle.shutdown();
    });
    let start = Instant::now();
    assert!(rx.recv().unwrap().is_none());
    assert!(start.elapsed() >= Duration::from_millis(400));
    stopper.join().unwrap();
    drop((tx, rx));
    server.join().unwrap();
}

#[test]
fn shutdown_unblocks_a_receiver_with_requests_in_flight() {
    let (mut tx, mut rx, server) = pipeline(false, Duration::from_secs(30), |mut p| {
        go(&mut p, false);
        p.wait_close();
    });
    tx.flush(1).unwrap();
    let handle = rx.shutdown_handle();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        handle.shutdown();
    });
    let start = Instant::now();
    let e = rx.recv().unwrap_err();
    assert!(matches!(e, ClientError::Closed), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));
    stopper.join().unwrap();
    drop((tx, rx));
    server.join().unwrap();
}

#[test]
fn halves_and_handles_move_between_threads() {
    fn sendable<T: Send + 'static>() {}
    sendable::<Sender>();
    sendable::<Receiver>();
    sendable::<super::ShutdownHandle>();
    sendable::<super::Connection>();
    fn shareable<T: Sync>() {}
    shareable::<super::ShutdownHandle>();
}
