//! The TLS stream under concurrency: several writer threads and a reader
//! on each side of one session at once, both directions, with short socket
//! timeouts and a slow reader so writes are cut part-way. Every message
//! arrives whole, in each writer's order, and the session never breaks (a
//! record sent out of sequence would fail its authentication).

mod common;

use common::certs::Certs;
use common::*;
use flexnbd::stream::Stream;
use flexnbd::tls::{ClientTls, ServerTls, TlsMode};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

const WRITERS: u32 = 3;
const MESSAGES: u32 = 300;

/// Message `seq` of writer `w`: [len][w][seq] then a pattern (up to 40 KiB).
fn message(w: u32, seq: u32) -> Vec<u8> {
    let len = 12 + ((w * 7919 + seq * 104_729) % (40 << 10)) as usize;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_be_bytes());
    m.extend_from_slice(&w.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend((12..len).map(|i| (i as u32 ^ w ^ seq) as u8));
    m
}

/// Writers on `s`: each sends its messages with `send_all`, which retries
/// the socket timeouts until its deadline.
fn writers(s: &Arc<Stream>) -> Vec<std::thread::JoinHandle<()>> {
    (0..WRITERS)
        .map(|w| {
            let s = s.clone();
            std::thread::spawn(move || {
                for seq in 0..MESSAGES {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    s.send_all(&message(w, seq), deadline).expect("send");
                }
            })
        })
        .collect()
}

/// Reads every writer's messages from `s`, checking each; sleeps now and
/// then so the other side's writes time out part-way.
fn reader(s: Arc<Stream>, slow: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut next = vec![0u32; WRITERS as usize];
        let mut r = &*s;
        for i in 0..WRITERS * MESSAGES {
            let mut head = [0u8; 12];
            r.read_exact(&mut head).expect("message header");
            let len = be32(&head, 0) as usize;
            let (w, seq) = (be32(&head, 4), be32(&head, 8));
            let mut rest = vec![0u8; len - 12];
            r.read_exact(&mut rest).expect("message body");
            assert_eq!(seq, next[w as usize], "writer {w}'s order");
            next[w as usize] += 1;
            let want = message(w, seq);
            assert!(rest == want[12..], "message {seq} of writer {w} damaged");
            if slow && i % 50 == 0 {
                std::thread::sleep(Duration::from_millis(30));
            }
        }
    })
}

#[test]
fn concurrent_writers_and_readers_on_one_session() {
    let certs = Certs::new();
    let server = ServerTls::load(&certs.server, TlsMode::Require, true).unwrap();
    let client = ClientTls::load(&certs.client, None).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let at = Instant::now() + Duration::from_secs(10);
    let accept = std::thread::spawn(move || server.accept(Stream::Unix(a), at));
    let c = client.connect(Stream::Unix(b), "localhost", at).unwrap();
    let s = accept.join().unwrap().unwrap();
    assert!(s.tls_info().unwrap().peer_subject.is_some());
    for t in [&s, &c] {
        // Short slices: writes are cut by timeouts and resumed.
        t.set_write_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        t.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    let (s, c) = (Arc::new(s), Arc::new(c));
    let mut all = writers(&s);
    all.extend(writers(&c));
    all.push(reader(c.clone(), true));
    all.push(reader(s.clone(), false));
    for h in all {
        h.join().expect("a thread failed");
    }
}
