//! The fuzz surfaces in the ordinary test run: every file of
//! `fuzz/corpus/NAME/` goes through `flexnbd::fuzzing::NAME`, then a few
//! thousand pseudo-random and mutated inputs (fewer for the surfaces that
//! use sockets). A panic fails the test and prints the input.
//!
//! `write_seed_corpus` (ignored) writes the hand-made seeds:
//! `cargo test --release --test fuzz_smoke -- --ignored write_seed_corpus`.

use flexnbd::fuzzing;
use flexnbd::proto::consts::*;
use flexnbd::proto::handshake::{
    export_name_reply, info_block_size, info_export, newstyle_greeting, oldstyle_greeting,
    option_reply, InfoRequest, MetaContextRequest,
};
use flexnbd::proto::reply::{error_chunk, none_chunk, offset_data_header, offset_hole_chunk};
use flexnbd::proto::{ChunkHeader, Command, NbdErrno, OptionHeader, Request, SimpleReply};
use std::path::PathBuf;

fn corpus_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name)
}

/// The corpus files of one target, in name order.
fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(name);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// SplitMix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One seed changed a few times: bit flips, byte sets, inserts, deletes,
/// truncation, splices with another seed, boundary values.
fn mutate(seeds: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut v = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] = rng.next() as u8;
            }
            2 => {
                let n = 1 + rng.below(16);
                let b = rng.bytes(n);
                v.splice(at..at, b);
            }
            3 => {
                let end = (at + 1 + rng.below(16)).min(v.len());
                v.drain(at.min(end)..end);
            }
            4 => v.truncate(at),
            5 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                v.truncate(at);
                v.extend_from_slice(&other[from..]);
            }
            _ if v.len() >= 4 => {
                let i = at.min(v.len() - 4);
                let word: [u8; 4] = match rng.below(4) {
                    0 => [0; 4],
                    1 => [0xff; 4],
                    2 => [0x7f, 0xff, 0xff, 0xff],
                    _ => [0x80, 0, 0, 0],
                };
                v[i..i + 4].copy_from_slice(&word);
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

/// Prints the input being run if it panics.
struct Witness<'a>(&'a str, &'a [u8]);

impl Drop for Witness<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{} panicked on {} bytes: {:02x?}",
                self.0,
                self.1.len(),
                self.1
            );
        }
    }
}

/// Runs the corpus of `name` and then `extra` generated inputs through `run`.
fn exercise(name: &str, run: fn(&[u8]), extra: usize) {
    let seeds = corpus(name);
    assert!(!seeds.is_empty(), "fuzz/corpus/{name} is empty");
    let mut rng = Rng(name.bytes().fold(0xf1e8, |h, b| h * 31 + u64::from(b)));
    let mut ran = 0;
    let mut one = |input: &[u8]| {
        let _w = Witness(name, input);
        run(input);
        ran += 1;
    };
    for s in &seeds {
        one(s);
    }
    for i in 0..extra {
        let input = match i % 4 {
            0 => {
                let n = rng.below(300);
                rng.bytes(n)
            }
            _ => mutate(&seeds, &mut rng),
        };
        one(&input);
    }
    assert_eq!(ran, seeds.len() + extra);
}

#[test]
fn server_handshake() {
    exercise("server_handshake", fuzzing::server_handshake, 400);
}

#[test]
fn request_headers() {
    exercise("request_headers", fuzzing::request_headers, 5000);
}

#[test]
fn control_request() {
    exercise("control_request", fuzzing::control_request, 5000);
}

#[test]
fn client_greeting() {
    exercise("client_greeting", fuzzing::client_greeting, 400);
}

#[test]
fn client_replies() {
    exercise("client_replies", fuzzing::client_replies, 400);
}

#[test]
fn acl_and_addresses() {
    exercise("acl_and_addresses", fuzzing::acl_and_addresses, 5000);
}

#[test]
fn proto_messages() {
    exercise("proto_messages", fuzzing::proto_messages, 5000);
}

/// Every target has a corpus, and the corpus stays small enough for the repository.
#[test]
fn corpus_is_small() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let (mut files, mut bytes) = (0, 0);
    for name in TARGETS {
        let c = corpus(name);
        assert!(!c.is_empty(), "fuzz/corpus/{name} is empty");
        files += c.len();
        bytes += c.iter().map(Vec::len).sum::<usize>();
    }
    let dirs = std::fs::read_dir(&root).unwrap().count();
    assert_eq!(dirs, TARGETS.len(), "a corpus directory without a target");
    assert!(
        files <= 3000 && bytes <= 1 << 20,
        "{files} files, {bytes} bytes"
    );
}

const TARGETS: [&str; 7] = [
    "server_handshake",
    "request_headers",
    "control_request",
    "client_greeting",
    "client_replies",
    "acl_and_addresses",
    "proto_messages",
];

// ---- the hand-made seeds ----

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    OptionHeader::encode_with(option, data)
}

fn info_req(name: &str, infos: &[u16]) -> Vec<u8> {
    InfoRequest {
        name: name.into(),
        infos: infos.to_vec(),
    }
    .encode()
}

fn meta_req(queries: &[&str]) -> Vec<u8> {
    MetaContextRequest {
        name: String::new(),
        queries: queries.iter().map(|q| q.to_string()).collect(),
    }
    .encode()
}

fn req(cmd: Command, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    Request::new(cmd, flags, cookie, offset, length.into())
        .encode()
        .to_vec()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn simple(cookie: u64) -> Vec<u8> {
    SimpleReply::ok(cookie).encode().to_vec()
}

fn server_handshake_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let flags = 3u32.to_be_bytes();
    let go = opt(OPT_GO, &info_req("", &[INFO_BLOCK_SIZE]));
    let traffic = cat(&[
        &req(Command::Read, 0, 1, 0, 4096),
        &req(Command::Write, CMD_FLAG_FUA, 2, 4096, 8),
        b"8 bytes!",
        &req(Command::BlockStatus, CMD_FLAG_REQ_ONE, 3, 0, 65536),
        &req(Command::Flush, 0, 4, 0, 0),
        &req(Command::Disc, 0, 5, 0, 0),
    ]);
    vec![
        (
            "go-structured-meta",
            cat(&[
                &[0],
                &flags,
                &opt(OPT_STRUCTURED_REPLY, &[]),
                &opt(OPT_SET_META_CONTEXT, &meta_req(&[BASE_ALLOCATION])),
                &go,
                &traffic,
            ]),
        ),
        (
            "list-info-export-name",
            cat(&[
                &[0],
                &flags,
                &opt(OPT_LIST, &[]),
                &opt(OPT_INFO, &info_req("disk", &[INFO_NAME, INFO_DESCRIPTION])),
                &opt(
                    OPT_LIST_META_CONTEXT,
                    &meta_req(&["base:", "qemu:dirty-bitmap:x"]),
                ),
                &opt(OPT_EXPORT_NAME, b""),
                &req(Command::Read, 0, 1, 0, 512),
            ]),
        ),
        (
            "plain-newstyle",
            cat(&[&[0], &[0; 4], &opt(OPT_EXPORT_NAME, b"disk")]),
        ),
        ("oldstyle", cat(&[&[4], &traffic])),
        ("read-only-write", cat(&[&[1], &flags, &go, &traffic])),
        (
            "shutting-down",
            cat(&[&[2], &flags, &go, &opt(OPT_ABORT, &[])]),
        ),
        (
            "refusals",
            cat(&[
                &[0x18],
                &flags,
                &opt(OPT_STARTTLS, &[]),
                &opt(42, b"x"),
                &opt(OPT_LIST_META_CONTEXT, &meta_req(&[])),
                &opt(OPT_STRUCTURED_REPLY, b"junk"),
                &opt(OPT_GO, b"\0\0\0\x09"),
                &opt(OPT_ABORT, &[]),
            ]),
        ),
        (
            "too-long-option",
            cat(&[
                &[0],
                &flags,
                &IHAVEOPT.to_be_bytes(),
                &7u32.to_be_bytes(),
                &70000u32.to_be_bytes(),
                &[0; 64],
            ]),
        ),
    ]
}

fn request_headers_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "all-commands",
            cat(&[
                &req(Command::Read, CMD_FLAG_DF, 1, 0, 4096),
                &req(Command::Write, 0, 2, 512, 4),
                b"data",
                &req(Command::Trim, CMD_FLAG_FUA, 3, 0, 4096),
                &req(Command::Cache, 0, 4, 0, 1 << 20),
                &req(
                    Command::WriteZeroes,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                    5,
                    0,
                    8192,
                ),
                &req(Command::BlockStatus, CMD_FLAG_REQ_ONE, 6, 4096, 4096),
                &req(Command::Flush, 0, 7, 0, 0),
                &req(Command::Disc, 0, 8, 0, 0),
            ]),
        ),
        (
            "edges",
            cat(&[
                &req(Command::Read, 0, 1, u64::MAX, 1),
                &req(Command::Read, CMD_FLAG_DF, 2, 0, 8 << 20),
                &req(Command::Write, 0, 3, 1 << 20, 0),
                &req(Command::Unknown(42), 0xffff, 4, 0, 0),
                &req(Command::BlockStatus, 0, 5, 0, 0),
                &Request::entrust(6).encode(),
            ]),
        ),
        (
            "bad-magic-then-read",
            cat(&[b"\x25\x60\x95", &req(Command::Read, 0, 1, 0, 512)]),
        ),
        (
            "write-payload-cut",
            cat(&[&req(Command::Write, 0, 1, 0, 1 << 30), &[7; 40]]),
        ),
    ]
}

fn control_request_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let s = |name, text: &str| (name, text.as_bytes().to_vec());
    vec![
        s("status", "status\n\n"),
        s("status-crlf", "status\r\n\r\n"),
        s("mirror", "mirror\n127.0.0.1\n10809\n\n"),
        s(
            "mirror-all-args",
            "mirror\n::1\n10809\nunlink\n0\n1048576\nforever\nwait\n\n",
        ),
        s(
            "mirror-bad",
            "mirror\n127.0.0.1\n99999\nexit\n[::1]\n-1\n\n",
        ),
        s("acl", "acl\n127.0.0.1\n10.0.0.0/8\n::1/128\n\n"),
        s("acl-bad", "acl\n10.0.0.0/0\n\n"),
        s("mirror-max-bps", "mirror_max_bps\n1048576\n\n"),
        s("break", "break\n\n"),
        s("mirror-wait", "mirror_wait\n\n"),
        s("unknown", "bogus\nx\n\n"),
        s("no-final-newline", "mirror\n127.0.0.1\n108"),
        s(
            "status-text",
            "pid=1 size=1048576 is_mirroring=true clients_allowed=true num_clients=0 \
             has_control=true migration_speed=0 migration_duration=1 migration_bytes_left=4096 \
             migration_attempts=2 migration_state=retrying migration_retry_in=1 \
             migration_last_error=connect%3A%20refused%0A",
        ),
        s("reply-line", "0: Mirror started\n"),
        s("reply-line-crlf", "10: unknown command\r\nmore"),
        ("not-utf8", b"status\n\xff\xfe\n\n".to_vec()),
    ]
}

fn acl_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let s = |name, text: &str| (name, text.as_bytes().to_vec());
    vec![
        s("acl-v4", "127.0.0.1\n10.0.0.0/8\n192.168.1.1/32\n"),
        s(
            "acl-v6",
            "::1\nfe80::/10\n::ffff:127.0.0.2/128\n2001:db8::/32",
        ),
        s(
            "addresses",
            "0\n[::1]\n10809\n65535\n/tmp/flexnbd.sock\n127.0.0.1\n8080",
        ),
        s(
            "bad",
            "10.0.0.0/0\n1.2.3.4/33\n::1/129\n256.0.0.1\n1.2.3\n65536\n+1\n/\n[::1",
        ),
    ]
}

/// The GO exchange as a server answers it: export info, block sizes, ACK.
fn go_replies(size: u64, flags: u16) -> Vec<u8> {
    cat(&[
        &option_reply(OPT_GO, REP_INFO, &info_export(size, flags)),
        &option_reply(OPT_GO, REP_INFO, &info_block_size(1, 4096, 32 << 20)),
        &option_reply(OPT_GO, REP_ACK, &[]),
    ])
}

fn client_greeting_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let fixed = newstyle_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    let flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
    let ack = option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    vec![
        ("go", cat(&[&[0], &fixed, &go_replies(1 << 20, flags)])),
        (
            "go-structured",
            cat(&[&[1], &fixed, &ack, &go_replies(1 << 30, flags)]),
        ),
        ("oldstyle", cat(&[&[0], &oldstyle_greeting(1 << 20, 0x0d)])),
        (
            "plain-newstyle",
            cat(&[
                &[2],
                &newstyle_greeting(0),
                &export_name_reply(4096, flags, false),
            ]),
        ),
        (
            "go-unsupported",
            cat(&[
                &[0],
                &fixed,
                &option_reply(OPT_GO, REP_ERR_UNSUP, &[]),
                &export_name_reply(4096, flags, true),
            ]),
        ),
        (
            "go-refused",
            cat(&[
                &[2],
                &fixed,
                &option_reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export"),
            ]),
        ),
        (
            "structured-refused",
            cat(&[
                &[1],
                &fixed,
                &option_reply(OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]),
                &go_replies(512, flags),
            ]),
        ),
        ("not-nbd", cat(&[&[0], b"HTTP/1.1 400 Bad Request\r\n\r\n"])),
    ]
}

fn client_replies_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let data = |n: usize| vec![0xab; n];
    let blocking_simple = cat(&[
        &simple(1),
        &data(512),
        &simple(2),
        &data(2048),
        &simple(3),
        &simple(4),
        &simple(5),
        &simple(6),
    ]);
    let blocking_structured = cat(&[
        &offset_data_header(1, 4096, 512, true),
        &data(512),
        &offset_hole_chunk(2, 0, 1024, false),
        &offset_data_header(2, 1024, 1024, false),
        &data(1024),
        &none_chunk(2),
        &simple(3),
        &error_chunk(4, NbdErrno::NoSpc, "no space"),
        &SimpleReply::err(5, NbdErrno::Perm).encode(),
        &ChunkHeader::new(REPLY_TYPE_NONE, true, 6, 0).encode(),
    ]);
    let pipelined = cat(&[
        &simple(3),
        &simple(1),
        &none_chunk(2),
        &simple(5),
        &error_chunk(4, NbdErrno::Io, "disk failed"),
    ]);
    let pipelined_simple = cat(&[&simple(1), &simple(2), &simple(3), &simple(4), &simple(5)]);
    vec![
        ("oldstyle-blocking", cat(&[&[0], &blocking_simple])),
        ("go-blocking", cat(&[&[1], &blocking_simple])),
        ("structured-blocking", cat(&[&[2], &blocking_structured])),
        ("export-name-blocking", cat(&[&[3], &blocking_simple])),
        ("oldstyle-pipelined", cat(&[&[4], &pipelined_simple])),
        ("structured-pipelined", cat(&[&[6], &pipelined])),
        (
            "wrong-handle",
            cat(&[&[2], &offset_data_header(9, 4096, 512, true), &data(512)]),
        ),
    ]
}

fn proto_messages_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("newstyle-greeting", newstyle_greeting(3).to_vec()),
        (
            "oldstyle-greeting",
            oldstyle_greeting(1 << 20, 0x0d).to_vec(),
        ),
        ("option", opt(OPT_GO, &info_req("disk", &[INFO_BLOCK_SIZE]))),
        ("option-reply", option_reply(OPT_GO, REP_ACK, &[])),
        (
            "info-request",
            info_req("disk", &[INFO_NAME, INFO_BLOCK_SIZE]),
        ),
        ("meta-request", meta_req(&[BASE_ALLOCATION, "base:"])),
        (
            "error-chunk",
            error_chunk(1, NbdErrno::Inval, "bad ☃ request"),
        ),
        ("simple-reply", simple(7)),
        ("client-flags", 3u32.to_be_bytes().to_vec()),
    ]
}

#[test]
#[ignore = "writes the seed files into fuzz/corpus"]
fn write_seed_corpus() {
    let sets = [
        ("server_handshake", server_handshake_seeds()),
        ("request_headers", request_headers_seeds()),
        ("control_request", control_request_seeds()),
        ("client_greeting", client_greeting_seeds()),
        ("client_replies", client_replies_seeds()),
        ("acl_and_addresses", acl_seeds()),
        ("proto_messages", proto_messages_seeds()),
    ];
    for (target, seeds) in sets {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds {
            assert!(bytes.len() <= 4096, "{target}/{name}");
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }
}
