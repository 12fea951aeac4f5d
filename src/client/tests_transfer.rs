//! Tests of requests, replies and the pipelined halves against scripted fake servers.

use super::fake::{handshake, quick, Peer, ALL_FLAGS};
use super::{ClientError, Connection, STREAM_CHUNK};
use crate::proto::consts::*;
use crate::proto::handshake::{info_export, newstyle_greeting};
use crate::proto::reply::{error_chunk, none_chunk, offset_data_header, offset_hole_chunk};
use crate::proto::{Command, NbdErrno, SimpleReply};
use std::io::{Read, Write};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Newstyle handshake with structured replies accepted.
fn structured_go(p: &mut Peer, size: u64, flags: u16) {
    p.send(&newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    p.client_flags();
    let (opt, _) = p.option();
    assert_eq!(opt, OPT_STRUCTURED_REPLY);
    p.reply(opt, REP_ACK, &[]);
    p.option();
    p.reply(OPT_GO, REP_INFO, &info_export(size, flags));
    p.reply(OPT_GO, REP_ACK, &[]);
}

fn structured<T, F>(script: F) -> (Connection, JoinHandle<T>)
where
    F: FnOnce(Peer) -> T + Send + 'static,
    T: Send + 'static,
{
    let opts = super::ConnectOptions {
        structured_replies: true,
        ..quick()
    };
    let (c, t) = handshake(&opts, script);
    let c = c.unwrap();
    assert!(c.structured_replies());
    (c, t)
}

/// A writer that remembers the largest single write.
#[derive(Default)]
struct Recorder {
    data: Vec<u8>,
    largest: usize,
}

impl Write for Recorder {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.largest = self.largest.max(b.len());
        self.data.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn large_requests_stream_through_a_bounded_buffer() {
    let size = 3 * STREAM_CHUNK + 5;
    let (conn, server) = handshake(&quick(), move |mut p| {
        p.oldstyle(size as u64 + 100);
        p.serve(vec![0u8; size + 100])
    });
    let mut conn = conn.unwrap();
    let data = pattern(size, 3);
    // A reader that hands out odd-sized pieces.
    let mut input = std::io::Cursor::new(data.clone()).chain(std::io::empty());
    conn.write_from(100, size as u64, &mut input, false)
        .unwrap();
    let mut out = Recorder::default();
    conn.read_to(100, size as u64, &mut out).unwrap();
    assert!(out.data == data, "data differs");
    assert!(out.largest <= STREAM_CHUNK);
    conn.disconnect().unwrap();
    assert!(server.join().unwrap()[100..] == data[..]);
}

#[test]
fn structured_read_assembles_data_and_holes() {
    let (mut conn, server) = structured(|mut p| {
        structured_go(&mut p, 1 << 20, ALL_FLAGS);
        for _ in 0..2 {
            let r = p.request().unwrap();
            assert_eq!(
                (r.command, r.offset, r.length),
                (Command::Read, 1000, 10000)
            );
            p.send(&offset_data_header(r.cookie, 1000, 3000, false));
            p.send(&pattern(3000, 1));
            p.send(&offset_hole_chunk(r.cookie, 4000, 2000, false));
            p.send(&offset_data_header(r.cookie, 6000, 5000, false));
            p.send(&pattern(5000, 2));
            p.send(&none_chunk(r.cookie));
        }
        p.wait_close();
    });
    let mut want = pattern(3000, 1);
    want.extend(vec![0u8; 2000]);
    want.extend(pattern(5000, 2));
    let mut got = vec![0xffu8; 10000];
    conn.read_into(1000, &mut got).unwrap();
    assert!(got == want);
    let mut out = Recorder::default();
    conn.read_to(1000, 10000, &mut out).unwrap();
    assert!(out.data == want);
    drop(conn);
    server.join().unwrap();
}

#[test]
fn error_replies_keep_the_connection() {
    let (mut conn, server) = structured(|mut p| {
        structured_go(&mut p, 4096, ALL_FLAGS);
        let r = p.request().unwrap();
        p.bytes(r.length as usize);
        p.send(&error_chunk(r.cookie, NbdErrno::Perm, "read-only\nexport"));
        let r = p.request().unwrap();
        p.send(&SimpleReply::err(r.cookie, NbdErrno::NoSpc).encode());
        let r = p.request().unwrap();
        p.send(&none_chunk(r.cookie));
        p.wait_close();
    });
    let e = conn.write(0, b"abc", false).unwrap_err();
    match &e {
        ClientError::Nbd { errno, message } => {
            assert_eq!(*errno, NbdErrno::Perm);
            assert_eq!(message.as_deref(), Some("read-only export"));
        }
        e => panic!("{e}"),
    }
    assert!(e.connection_usable());
    let e = conn.trim(0, 4096).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Nbd {
                errno: NbdErrno::NoSpc,
                message: None
            }
        ),
        "{e}"
    );
    conn.flush().unwrap();
    drop(conn);
    server.join().unwrap();
}

#[test]
fn read_past_the_end_is_the_servers_error() {
    let (conn, server) = handshake(&quick(), |mut p| {
        p.oldstyle(4096);
        p.serve(vec![0u8; 4096])
    });
    let mut conn = conn.unwrap();
    let mut b = [0u8; 100];
    let e = conn.read_into(4000, &mut b).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Nbd {
                errno: NbdErrno::Inval,
                ..
            }
        ),
        "{e}"
    );
    conn.read_into(3996, &mut b).unwrap();
    conn.disconnect().unwrap();
    server.join().unwrap();
}

/// Builds the bytes a fake server sends in answer to the request with a cookie.
type Answer = fn(u64) -> Vec<u8>;

/// Sends one read and answers it with `answer`; returns the error.
fn read_answered_with(structured_replies: bool, answer: Answer) -> ClientError {
    let script = move |mut p: Peer| {
        if structured_replies {
            structured_go(&mut p, 1 << 20, ALL_FLAGS);
        } else {
            p.oldstyle(1 << 20);
        }
        let r = p.request().unwrap();
        p.send(&answer(r.cookie));
        p.wait_close();
    };
    let (mut conn, server) = if structured_replies {
        structured(script)
    } else {
        let (c, t) = handshake(&quick(), script);
        (c.unwrap(), t)
    };
    let mut b = [0u8; 100];
    let e = conn.read_into(0, &mut b).unwrap_err();
    assert!(!e.connection_usable(), "{e}");
    let again = conn.flush().unwrap_err();
    assert!(matches!(again, ClientError::Invalid(_)), "{again}");
    drop(conn);
    server.join().unwrap();
    e
}

#[test]
fn reply_with_another_handle_is_wrong_handle() {
    let e = read_answered_with(false, |c| SimpleReply::ok(c ^ 0xdead).encode().to_vec());
    assert!(matches!(e, ClientError::WrongHandle(_)), "{e}");
}

#[test]
fn malformed_replies_are_protocol_errors() {
    let cases: [(bool, Answer); 6] = [
        (false, |c| {
            let mut b = SimpleReply::ok(c).encode().to_vec();
            b[0] ^= 1;
            b
        }),
        (false, |c| none_chunk(c).to_vec()),
        (true, |c| offset_data_header(c, 50, 100, true).to_vec()),
        (true, |c| offset_hole_chunk(c, 10, 10, false).to_vec()),
        (true, |c| {
            let mut b = none_chunk(c).to_vec();
            b[16..20].copy_from_slice(&(1u32 << 30).to_be_bytes());
            b[6..8].copy_from_slice(&REPLY_TYPE_ERROR.to_be_bytes());
            b
        }),
        (true, |c| {
            crate::proto::reply::block_status_chunk(c, 1, &[(100, 0)], true)
        }),
    ];
    for (i, (s, answer)) in cases.into_iter().enumerate() {
        let e = read_answered_with(s, answer);
        assert!(matches!(e, ClientError::Protocol(_)), "case {i}: {e}");
    }
}

#[test]
fn short_input_abandons_the_write() {
    let (conn, server) = handshake(&quick(), |mut p| {
        p.oldstyle(1 << 20);
        let r = p.request().unwrap();
        assert_eq!(r.length, 10000);
        let mut got = 0;
        let mut b = [0u8; 4096];
        while let Ok(n @ 1..) = p.s.read(&mut b) {
            got += n;
        }
        got
    });
    let mut conn = conn.unwrap();
    let mut input = std::io::Cursor::new(vec![1u8; 4000]);
    let e = conn.write_from(0, 10000, &mut input, false).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::ShortInput {
                expected: 10000,
                got: 4000
            }
        ),
        "{e}"
    );
    assert_eq!(server.join().unwrap(), 4000);
}

#[test]
fn silent_server_times_out() {
    let opts = super::ConnectOptions {
        request_timeout: Some(Duration::from_millis(200)),
        ..quick()
    };
    let (conn, server) = handshake(&opts, |mut p| {
        p.oldstyle(1 << 20);
        p.wait_close();
    });
    let mut conn = conn.unwrap();
    let start = Instant::now();
    let e = conn.flush().unwrap_err();
    assert!(matches!(e, ClientError::Timeout(_)), "{e}");
    assert!(start.elapsed() < Duration::from_secs(3));
    drop(conn);
    server.join().unwrap();
}

#[test]
fn requests_the_export_cannot_take_are_refused_locally() {
    let (conn, server) = handshake(&quick(), |mut p| {
        p.send(&newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        p.client_flags();
        p.option();
        p.reply(OPT_GO, REP_INFO, &info_export(1 << 20, FLAG_HAS_FLAGS));
        p.reply(OPT_GO, REP_ACK, &[]);
        p.wait_close();
    });
    let mut conn = conn.unwrap();
    for e in [
        conn.write(0, b"x", true).unwrap_err(),
        conn.flush().unwrap_err(),
        conn.trim(0, 1).unwrap_err(),
        conn.write_zeroes(0, 1, false).unwrap_err(),
        conn.read_to(0, 1 << 32, &mut std::io::sink()).unwrap_err(),
        conn.read_to(u64::MAX - 5, 10, &mut std::io::sink())
            .unwrap_err(),
    ] {
        assert!(matches!(e, ClientError::Invalid(_)), "{e}");
    }
    drop(conn);
    server.join().unwrap();
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn random_replies_never_panic(
        tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
        structured_replies: bool,
        read: bool,
    ) {
        use crate::proto::handshake::option_reply;
        let mut bytes = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_vec();
        if structured_replies {
            bytes.extend(option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        }
        bytes.extend(option_reply(OPT_GO, REP_INFO, &info_export(1 << 20, ALL_FLAGS)));
        bytes.extend(option_reply(OPT_GO, REP_ACK, &[]));
        // Replies for the first request (cookie 1) make deeper paths reachable.
        bytes.extend(SimpleReply::ok(1).encode().iter().take(tail.len() % 17));
        bytes.extend(tail);
        let opts = super::ConnectOptions { structured_replies, ..quick() };
        let (conn, server) = handshake(&opts, move |mut p| p.send_all_then_listen(&bytes));
        let mut conn = conn.unwrap();
        // Success is possible (the tail may start with a valid reply); panics are not.
        let _ = if read {
            conn.read_into(0, &mut [0u8; 100])
        } else {
            conn.write(0, &[1u8; 100], false)
        };
        drop(conn);
        server.join().unwrap();
    }
}
