//! Extended headers (NBD_OPT_EXTENDED_HEADERS): 32-byte requests and
//! replies with 64-bit lengths, BLOCK_STATUS_EXT, and BLOCK_STATUS with a
//! payload naming its contexts. Spoken by hand over a raw socket (every
//! reply checked byte by byte) on a sparse multi-terabyte image, then by
//! qemu-io and qemu-img, which negotiate them; libnbd without them still
//! gets structured replies.

mod common;

use common::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const TIB: u64 = 1 << 40;
const OPT_EXTENDED_HEADERS: u32 = 11;
const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;
const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;
const FLAG_SEND_DF: u16 = 1 << 7;
const FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;
const REPLY_FLAG_DONE: u16 = 1;
const TYPE_NONE: u16 = 0;
const TYPE_OFFSET_DATA: u16 = 1;
const TYPE_OFFSET_HOLE: u16 = 2;
const TYPE_BLOCK_STATUS_EXT: u16 = 6;
const TYPE_ERROR: u16 = 0x8001;

fn ext_request(cmd: u16, flags: u16, cookie: u64, offset: u64, length: u64) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..4].copy_from_slice(&EXT_REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..32].copy_from_slice(&length.to_be_bytes());
    b
}

/// An extended reply chunk as read from the wire.
#[derive(Debug)]
struct ExtChunk {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    payload: Vec<u8>,
}

impl ExtChunk {
    fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    /// An ERROR chunk's errno.
    fn errno(&self) -> u32 {
        assert_eq!(self.kind, TYPE_ERROR, "an error chunk: {self:?}");
        be32(&self.payload, 0)
    }
}

/// Handshake, extended headers, base:allocation, GO; returns the
/// connection, the export size and its transmission flags.
#[track_caller]
fn extended(addr: SocketAddr) -> (Raw, u64, u16) {
    let mut r = Raw::handshake(addr);
    let eh = r.opt(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(eh.last().unwrap().kind, REP_ACK, "{eh:?}");
    let mc = r.opt(OPT_SET_META_CONTEXT, &meta_data(&["base:allocation"]));
    assert_eq!(mc.last().unwrap().kind, REP_ACK, "{mc:?}");
    let id = mc
        .iter()
        .find(|m| m.kind == REP_META_CONTEXT)
        .expect("a context");
    assert_eq!(be32(&id.data, 0), 1, "base:allocation's id");
    let (size, flags) = r.go();
    (r, size, flags)
}

trait Ext {
    fn ext(&mut self, cmd: u16, flags: u16, cookie: u64, offset: u64, length: u64);
    fn chunk(&mut self) -> ExtChunk;
    fn ok(&mut self, cookie: u64, offset: u64);
    fn failed(&mut self, cookie: u64) -> u32;
    fn read_ext(&mut self, cookie: u64, offset: u64, len: u64) -> Vec<u8>;
}

impl Ext for Raw {
    #[track_caller]
    fn ext(&mut self, cmd: u16, flags: u16, cookie: u64, offset: u64, length: u64) {
        self.send(&ext_request(cmd, flags, cookie, offset, length));
    }

    /// One reply: it must be an extended chunk (never a simple reply).
    #[track_caller]
    fn chunk(&mut self) -> ExtChunk {
        let h = self.read_exact(32);
        assert_eq!(
            be32(&h, 0),
            EXT_REPLY_MAGIC,
            "extended reply magic in {h:02x?}"
        );
        let len = be64(&h, 24);
        assert!(len <= 64 << 20, "chunk of {len} bytes");
        ExtChunk {
            flags: be16(&h, 4),
            kind: be16(&h, 6),
            cookie: be64(&h, 8),
            offset: be64(&h, 16),
            payload: self.read_exact(len as usize),
        }
    }

    /// Expects success: a final NONE chunk echoing the cookie and offset.
    #[track_caller]
    fn ok(&mut self, cookie: u64, offset: u64) {
        let c = self.chunk();
        assert_eq!(
            (c.kind, c.done(), c.cookie, c.offset, c.payload.len()),
            (TYPE_NONE, true, cookie, offset, 0),
            "{c:?}"
        );
    }

    /// Expects a final ERROR chunk for `cookie`; returns its errno.
    #[track_caller]
    fn failed(&mut self, cookie: u64) -> u32 {
        let c = self.chunk();
        assert_eq!((c.cookie, c.done()), (cookie, true), "{c:?}");
        let msg_len = be16(&c.payload, 4) as usize;
        assert_eq!(c.payload.len(), 6 + msg_len, "error chunk length");
        assert!(msg_len > 0, "error chunks carry a message");
        c.errno()
    }

    /// A READ: data and hole chunks until the final one, assembled.
    #[track_caller]
    fn read_ext(&mut self, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
        self.ext(CMD_READ, 0, cookie, offset, len);
        let mut out = vec![0xeeu8; len as usize];
        let mut covered = 0u64;
        loop {
            let c = self.chunk();
            assert_eq!((c.cookie, c.offset), (cookie, offset), "{c:?}");
            match c.kind {
                TYPE_OFFSET_DATA => {
                    let at = be64(&c.payload, 0) - offset;
                    let data = &c.payload[8..];
                    out[at as usize..at as usize + data.len()].copy_from_slice(data);
                    covered += data.len() as u64;
                }
                TYPE_OFFSET_HOLE => {
                    let at = (be64(&c.payload, 0) - offset) as usize;
                    let n = be32(&c.payload, 8) as usize;
                    out[at..at + n].fill(0);
                    covered += n as u64;
                }
                TYPE_NONE => {}
                k => panic!("chunk type {k:#x} in a read reply: {c:?}"),
            }
            if c.done() {
                break;
            }
        }
        assert_eq!(covered, len, "the chunks cover the read");
        out
    }
}

/// Sparse image of `size` bytes with `data` at each offset given.
fn sparse_image(dir: &Path, size: u64, data: &[(u64, &[u8])]) -> std::path::PathBuf {
    let img = dir.join("img");
    create_sparse_file(&img, size);
    for (at, d) in data {
        write_file_at(&img, *at, d);
    }
    img
}

#[test]
fn negotiation_rules() {
    let dir = tempdir();
    let img = sparse_image(dir.path(), 16 * MIB, &[]);
    let mut srv = Serve::tcp(&img).start();
    let mut r = Raw::handshake(srv.addr());
    let bad = r.opt(OPT_EXTENDED_HEADERS, &[0]);
    assert_eq!(bad.last().unwrap().kind, REP_ERR_INVALID, "with data");
    let ok = r.opt(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(ok.last().unwrap().kind, REP_ACK);
    let twice = r.opt(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(twice.last().unwrap().kind, REP_ERR_INVALID, "twice");
    let sr = r.opt(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(sr.last().unwrap().kind, REP_ERR_EXT_HEADER_REQD);
    // Structured replies come with them: meta contexts can be chosen.
    let mc = r.opt(OPT_SET_META_CONTEXT, &meta_data(&["base:allocation"]));
    assert_eq!(mc.last().unwrap().kind, REP_ACK);
    let (size, flags) = r.go();
    assert_eq!(size, 16 * MIB);
    assert_ne!(flags & FLAG_BLOCK_STATUS_PAYLOAD, 0, "flags {flags:#x}");
    assert_ne!(flags & FLAG_SEND_DF, 0, "flags {flags:#x}");
    r.ext(CMD_FLUSH, 0, 5, 0, 0);
    r.ok(5, 0);
    // A compact header now is a protocol error: an error chunk, then a close.
    r.req(CMD_READ, 0, 6, 0, 512);
    assert_eq!(r.failed(6), EINVAL);
    r.expect_closed();

    // Without extended headers the flag that needs them is not offered.
    let mut plain = Raw::structured(srv.addr());
    plain.req(CMD_DISC, 0, 0, 0, 0);
    let mut r = Raw::handshake(srv.addr());
    r.opt(OPT_STRUCTURED_REPLY, &[]);
    let (_, flags) = r.go();
    assert_eq!(flags & FLAG_BLOCK_STATUS_PAYLOAD, 0, "flags {flags:#x}");
    // Structured first, then extended, is allowed.
    let mut r = Raw::handshake(srv.addr());
    r.opt(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(
        r.opt(OPT_EXTENDED_HEADERS, &[]).last().unwrap().kind,
        REP_ACK
    );
    r.go();
    r.ext(CMD_FLUSH, 0, 1, 0, 0);
    r.ok(1, 0);
    // NBD_OPT_EXPORT_NAME cannot follow extended headers: the server hangs up.
    let mut r = Raw::handshake(srv.addr());
    r.opt(OPT_EXTENDED_HEADERS, &[]);
    r.send(&option(OPT_EXPORT_NAME, b""));
    assert!(r.expect_closed().is_empty(), "no export-name reply");
    srv.assert_alive();
    assert_eq!(read_file(&img), vec![0u8; (16 * MIB) as usize]);
}

#[test]
fn requests_with_64_bit_lengths_on_a_sparse_8_tib_image() {
    let dir = tempdir();
    let first = random_bytes(1, 64 * 1024);
    let img = sparse_image(dir.path(), 8 * TIB, &[(5 * TIB, &first)]);
    let mut srv = Serve::tcp(&img).arg("-v").start();
    sixty_four_bit_lengths(&mut srv, &img, &first);
}

/// The same requests through `flexnbd proxy`: it offers extended headers
/// because its upstream does, and passes the 64-bit lengths on (one
/// WRITE_ZEROES of 8 TiB upstream, extents beyond 4 GiB back).
#[test]
fn the_proxy_passes_64_bit_lengths_on() {
    let dir = tempdir();
    let first = random_bytes(1, 64 * 1024);
    let img = sparse_image(dir.path(), 8 * TIB, &[(5 * TIB, &first)]);
    let maddr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut up = Serve::tcp(&img)
        .args(&["-v", "--metrics", &maddr.to_string()])
        .start();
    let mut p = Serve::proxy(&up.conn_args()).arg("-v").start();
    sixty_four_bit_lengths(&mut p, &img, &first);
    // Every request went upstream with extended headers too.
    assert!(up.log_count("extended headers") >= 1, "{}", up.stderr());

    // qemu-io through the proxy: its 8 TiB WRITE_ZEROES reaches the
    // upstream as one request.
    let qemu_io = require_tool("qemu-io");
    let io = |cmds: &[&str]| {
        let mut c = Command::new(&qemu_io);
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.arg(p.uri());
        let out = run(&mut c, Duration::from_secs(60));
        out.expect_success("qemu-io");
        let text = out.stdout_str();
        assert!(!text.contains("fail"), "qemu-io: {text}");
    };
    io(&["write -P 0x5a 7T 1M", "read -P 0x5a 7T 1M"]);
    assert_eq!(read_file_at(&img, 7 * TIB, 4096), vec![0x5a; 4096]);
    let key = "flexnbd_requests_total{command=\"write_zeroes\"}";
    let before = scrape(maddr)[key];
    io(&["write -z -n -u 0 8T", "read -P 0 7T 1M"]);
    assert_eq!(
        scrape(maddr)[key] - before,
        1.0,
        "one WRITE_ZEROES upstream"
    );
    assert_eq!(read_file_at(&img, 7 * TIB, 4096), vec![0u8; 4096]);
    up.assert_alive();
    p.assert_alive();

    // A proxy whose upstream lacks them (nbdkit 1.32) does not offer them,
    // and its clients get structured replies instead.
    let dir = tempdir();
    let small = sparse_image(dir.path(), 16 * MIB, &[]);
    let kit = common::nbdkit::Nbdkit::start(&small, "plugin");
    let up_args = [
        "--conn-addr".to_owned(),
        "127.0.0.1".to_owned(),
        "--conn-port".to_owned(),
        kit.port.to_string(),
    ];
    let mut p = Serve::proxy(&up_args).start();
    let mut r = Raw::handshake(p.addr());
    let eh = r.opt(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(eh.last().unwrap().kind, REP_ERR_UNSUP, "{eh:?}");
    let sr = r.opt(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(sr.last().unwrap().kind, REP_ACK, "{sr:?}");
    let (got, flags) = r.go();
    assert_eq!(got, 16 * MIB);
    assert_eq!(flags & FLAG_BLOCK_STATUS_PAYLOAD, 0, "flags {flags:#x}");
    r.req(CMD_FLUSH, 0, 1, 0, 0);
    assert_eq!(r.simple_reply(1), 0, "flush through the proxy");
    p.assert_alive();
}

/// Writes, reads, block status, refusals and a WRITE_ZEROES over all of an
/// 8 TiB image with `first` at 5 TiB, served by `srv`, checked on the wire
/// and in the file `img`.
fn sixty_four_bit_lengths(srv: &mut Server, img: &Path, first: &[u8]) {
    let size = 8 * TIB;
    let img = img.to_owned();
    let (mut r, got, _) = extended(srv.addr());
    assert_eq!(got, size);

    // A write with PAYLOAD_LEN (as qemu sends it) and one without.
    let a = random_bytes(2, 128 * 1024);
    r.ext(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 1, 6 * TIB, a.len() as u64);
    r.send(&a);
    r.ok(1, 6 * TIB);
    let b = random_bytes(3, 4096);
    r.ext(CMD_WRITE, 0, 2, MIB, b.len() as u64);
    r.send(&b);
    r.ok(2, MIB);
    assert_bytes_eq(&read_file_at(&img, 6 * TIB, a.len()), &a, "first write");
    assert_bytes_eq(&read_file_at(&img, MIB, b.len()), &b, "second write");
    // Reads come back as extended chunks echoing the request's offset.
    assert_bytes_eq(&r.read_ext(3, 5 * TIB, first.len() as u64), first, "read");
    let around = r.read_ext(4, 6 * TIB - 4096, 4096 + a.len() as u64);
    assert_bytes_eq(&around[..4096], &[0u8; 4096], "hole before");
    assert_bytes_eq(&around[4096..], &a, "data after");

    // Block status over the whole image in one request: BLOCK_STATUS_EXT,
    // with extents far beyond 4 GiB.
    r.ext(CMD_BLOCK_STATUS, 0, 5, 0, size);
    let c = r.chunk();
    assert_eq!(
        (c.kind, c.cookie, c.offset, c.done()),
        (TYPE_BLOCK_STATUS_EXT, 5, 0, true)
    );
    assert_eq!(be32(&c.payload, 0), 1, "context id");
    let n = be32(&c.payload, 4) as usize;
    assert_eq!(c.payload.len(), 8 + 16 * n, "descriptor count");
    let ext: Vec<(u64, u64)> = (0..n)
        .map(|i| (be64(&c.payload, 8 + 16 * i), be64(&c.payload, 16 + 16 * i)))
        .collect();
    let mut pos = 0;
    let mut data = Vec::new();
    for &(len, flags) in &ext {
        assert!(len > 0 && flags & !3 == 0, "{ext:?}");
        if flags == 0 {
            data.push((pos, len));
        }
        pos += len;
    }
    assert!(pos <= size, "{ext:?}");
    assert!(ext.iter().any(|&(l, f)| l > 4 * TIB && f == 3), "{ext:?}");
    for at in [MIB, 5 * TIB, 6 * TIB] {
        assert!(
            data.iter().any(|&(s, l)| s <= at && at < s + l),
            "data at {at}: {ext:?}"
        );
    }

    // Block status naming its context in a payload (range length, ids).
    let mut p = size.to_be_bytes().to_vec();
    p.extend_from_slice(&1u32.to_be_bytes());
    r.ext(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 6, 0, p.len() as u64);
    r.send(&p);
    let c2 = r.chunk();
    assert_eq!((c2.kind, c2.cookie), (TYPE_BLOCK_STATUS_EXT, 6));
    assert_eq!(
        c2.payload, c.payload,
        "the same answer as without a payload"
    );
    // An id never agreed, a payload too short: EINVAL, and the stream goes on.
    let mut q = size.to_be_bytes().to_vec();
    q.extend_from_slice(&9u32.to_be_bytes());
    r.ext(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 7, 0, q.len() as u64);
    r.send(&q);
    assert_eq!(r.failed(7), EINVAL);
    r.ext(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 8, 0, 8);
    r.send(&size.to_be_bytes());
    assert_eq!(r.failed(8), EINVAL);
    // PAYLOAD_LEN where it means nothing: refused, its payload skipped.
    r.ext(CMD_TRIM, CMD_FLAG_PAYLOAD_LEN, 9, 0, 16);
    r.send(&[0xaa; 16]);
    assert_eq!(r.failed(9), EINVAL);
    // Too long for a read, beyond the end for a trim.
    r.ext(CMD_READ, 0, 10, 0, 8 * GIB);
    assert_eq!(r.failed(10), EINVAL);
    r.ext(CMD_TRIM, 0, 11, 4 * TIB, 4 * TIB + 1);
    assert_eq!(r.failed(11), EINVAL);
    assert_bytes_eq(
        &read_file_at(&img, MIB, b.len()),
        &b,
        "untouched by refusals",
    );

    // Zeroes over all 8 TiB in one request: every byte reads as zero and
    // nothing stays allocated.
    r.ext(CMD_WRITE_ZEROES, 0, 12, 0, size);
    r.ok(12, 0);
    assert_bytes_eq(
        &r.read_ext(13, 6 * TIB, a.len() as u64),
        &vec![0; a.len()],
        "zeroed",
    );
    assert_eq!(read_file_at(&img, 5 * TIB, 4096), vec![0u8; 4096]);
    assert!(
        allocated_bytes(&img) < MIB,
        "{} bytes allocated",
        allocated_bytes(&img)
    );

    // A write claiming a payload too large to read or drop: an error
    // chunk, then the connection closes; the server serves on.
    r.ext(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 14, 0, 2 * TIB);
    assert_eq!(r.failed(14), EINVAL);
    r.expect_closed();
    srv.assert_alive();
    let (mut r, _, _) = extended(srv.addr());
    r.ext(CMD_DISC, 0, 0, 0, 0);
    assert!(r.expect_closed().is_empty());
    assert!(srv.log_count("extended headers") >= 2, "{}", srv.stderr());
}

/// The metrics scrape as (name with labels → value).
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut all = String::new();
    c.read_to_string(&mut all).unwrap();
    let body = all.split_once("\r\n\r\n").expect("an HTTP reply").1;
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn qemu_zeroes_terabytes_in_one_request() {
    let qemu_io = require_tool("qemu-io");
    let qemu_img = require_tool("qemu-img");
    let size = 8 * TIB;
    let dir = tempdir();
    let img = sparse_image(dir.path(), size, &[(0, &random_bytes(7, 1 << 20))]);
    let maddr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut srv = Serve::tcp(&img)
        .args(&["-v", "--metrics", &maddr.to_string()])
        .start();
    let uri = srv.uri();
    let io = |cmds: &[&str]| {
        let mut c = Command::new(&qemu_io);
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.arg(&uri);
        let out = run(&mut c, Duration::from_secs(60));
        out.expect_success("qemu-io");
        let text = out.stdout_str();
        assert!(!text.contains("fail"), "qemu-io: {text}");
        text
    };
    io(&["write -P 0x5a 7T 1M", "read -P 0x5a 7T 1M"]);
    assert_eq!(read_file_at(&img, 7 * TIB, 4096), vec![0x5a; 4096]);
    let before = scrape(maddr);
    let key = "flexnbd_requests_total{command=\"write_zeroes\"}";
    let bytes = "flexnbd_request_bytes_total{command=\"write_zeroes\"}";
    // -n: no fallback to writes; -u: holes allowed. qemu sends one request.
    io(&["write -z -n -u 0 8T"]);
    let after = scrape(maddr);
    assert_eq!(after[key] - before[key], 1.0, "one WRITE_ZEROES");
    assert_eq!(after[bytes] - before[bytes], size as f64);
    io(&["read -P 0 0 1M", "read -P 0 7T 1M"]);
    assert!(allocated_bytes(&img) < MIB);

    // qemu-img sees the data written since as one extent in a sea of zeroes.
    io(&["write -P 0x33 3T 64k"]);
    let out = run(
        Command::new(&qemu_img).args(["map", "--output=json", "-f", "raw", &uri]),
        Duration::from_secs(60),
    );
    out.expect_success("qemu-img map");
    let map: serde_json::Value = serde_json::from_str(&out.stdout_str()).unwrap();
    let data: Vec<(u64, u64)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data.len(), 1, "{map}");
    assert!(
        data[0].0 <= 3 * TIB && 3 * TIB + 65536 <= data[0].0 + data[0].1,
        "{map}"
    );
    let covered: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(covered, size, "{map}");
    assert!(srv.log_count("extended headers") >= 4, "{}", srv.stderr());
    srv.assert_alive();
}

#[test]
fn libnbd_without_extended_headers_still_gets_structured_replies() {
    require_python_nbd();
    let dir = tempdir();
    let img = sparse_image(dir.path(), 64 * MIB, &[]);
    let mut srv = Serve::tcp(&img).arg("-v").start();
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(7) % 251) as u8)
        .collect();
    let script = r#"
import json, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
buf = bytes((i * 7) % 251 for i in range(1 << 20))
h.pwrite(buf, 3 << 20)
h.flush()
back = h.pread(len(buf), 3 << 20)
ext = getattr(h, "get_extended_headers_negotiated", lambda: False)()
print(json.dumps({"same": back == buf, "structured": h.get_structured_replies_negotiated(), "ext": ext}))
"#;
    let v = python_json(script, &[srv.uri()], Duration::from_secs(60));
    assert_eq!(v["same"], true, "{v}");
    assert_eq!(v["structured"], true, "{v}");
    assert_bytes_eq(&read_file_at(&img, 3 * MIB, data.len()), &data, "image");
    // A libnbd that asked for none got none.
    if v["ext"] == false {
        assert_eq!(srv.log_count("extended headers"), 0, "{}", srv.stderr());
        assert!(srv.log_count("connected from") >= 1, "{}", srv.stderr());
    }
    srv.assert_alive();
}

#[test]
fn mirror_zeroes_a_two_terabyte_hole_in_a_few_requests() {
    let size = 2 * TIB;
    let dir = tempdir();
    let head = random_bytes(11, 1 << 20);
    let tail = random_bytes(12, 1 << 20);
    let src = sparse_image(dir.path(), size, &[(0, &head), (3 * TIB / 2, &tail)]);
    let mut source = Daemon::serve(&src, &dir.path().join("src.sock")).start();
    let maddr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dst = common::migration::listener(size, &["--metrics", &maddr.to_string()]);
    // Old bytes in what is a hole on the source: the mirror must zero them.
    write_file_at(&dst.file, TIB, &[0xff; 1 << 20]);
    mirror_cmd(source.ctl(), dst.srv.addr(), &[]).expect_success("mirror");
    assert_eq!(
        source
            .wait_exit(Duration::from_secs(30))
            .map(|s| s.success()),
        Some(true),
        "the source hands over and exits"
    );
    dst.assert_took_control();
    assert_bytes_eq(&read_file_at(&dst.file, 0, head.len()), &head, "head");
    assert_bytes_eq(
        &read_file_at(&dst.file, 3 * TIB / 2, tail.len()),
        &tail,
        "tail",
    );
    assert_eq!(
        read_file_at(&dst.file, TIB, 1 << 20),
        vec![0u8; 1 << 20],
        "zeroed"
    );
    assert!(
        allocated_bytes(&dst.file) < 16 * MIB,
        "{}",
        allocated_bytes(&dst.file)
    );
    // Each hole went as one WRITE_ZEROES (32-bit lengths would take
    // over two thousand).
    let m = scrape(maddr);
    let zeroes = m["flexnbd_requests_total{command=\"write_zeroes\"}"];
    let zeroed = m["flexnbd_request_bytes_total{command=\"write_zeroes\"}"];
    assert!(
        (1.0..=8.0).contains(&zeroes),
        "{zeroes} WRITE_ZEROES requests"
    );
    assert!(zeroed >= (size - 4 * MIB) as f64, "{zeroed} bytes zeroed");
    assert!(
        dst.srv.log_count("extended headers") >= 1,
        "{}",
        dst.srv.stderr()
    );
}

/// A third-party server started for one test, killed and reaped on drop.
struct Peer(std::process::Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tool args` and waits until `port` on 127.0.0.1 answers with an
/// NBD greeting.
fn peer(tool: &Path, args: &[String], port: u16) -> Peer {
    let child = Command::new(tool)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the peer server");
    let p = Peer(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || {
            let Ok(mut s) = TcpStream::connect(addr) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut g = [0u8; 8];
            s.read_exact(&mut g).is_ok() && &g == b"NBDMAGIC"
        }),
        "{} did not start",
        tool.display()
    );
    p
}

/// Migrates a sparse 64 GiB image (data at both ends, a hole between, old
/// bytes in the destination's hole) into `dst_file` served by a peer on
/// `port`; checks the destination's file after the hand-over.
fn mirror_into_peer(port: u16, dst_file: &Path, dir: &Path) {
    let size = 64 * GIB;
    let head = random_bytes(21, 1 << 20);
    let tail = random_bytes(22, 1 << 20);
    let src = sparse_image(dir, size, &[(0, &head), (size - (1 << 20), &tail)]);
    let mut source = Daemon::serve(&src, &dir.join("src.sock")).start();
    let dest: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    mirror_cmd(source.ctl(), dest, &[]).expect_success("mirror");
    assert_eq!(
        source
            .wait_exit(Duration::from_secs(60))
            .map(|s| s.success()),
        Some(true),
        "the source hands over and exits"
    );
    assert_bytes_eq(&read_file_at(dst_file, 0, head.len()), &head, "head");
    assert_bytes_eq(
        &read_file_at(dst_file, size - (1 << 20), tail.len()),
        &tail,
        "tail",
    );
    assert_eq!(
        read_file_at(dst_file, 32 * GIB, 1 << 20),
        vec![0u8; 1 << 20],
        "zeroed"
    );
    assert!(
        allocated_bytes(dst_file) < 64 * MIB,
        "{}",
        allocated_bytes(dst_file)
    );
}

/// qemu-nbd (qemu 10 has extended headers): the mirror's holes go as 64-bit
/// WRITE_ZEROES to a server that is not ours.
#[test]
fn mirror_into_qemu_nbd_with_extended_headers() {
    let qemu_nbd = require_tool("qemu-nbd");
    let dir = tempdir();
    let dst = dir.path().join("dst.img");
    create_sparse_file(&dst, 64 * GIB);
    write_file_at(&dst, 32 * GIB, &[0xff; 1 << 20]);
    let port = free_port();
    let args: Vec<String> = [
        "-t",
        "-f",
        "raw",
        "--discard=unmap",
        "-b",
        "127.0.0.1",
        "-p",
        &port.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([dst.display().to_string()])
    .collect();
    let _q = peer(&qemu_nbd, &args, port);
    mirror_into_peer(port, &dst, dir.path());
}

/// nbdkit 1.32 predates extended headers: the mirror falls back to
/// compact ones (holes in 1 GiB requests) and the result is the same.
#[test]
fn mirror_into_nbdkit_without_extended_headers() {
    let nbdkit = require_tool("nbdkit");
    let dir = tempdir();
    let dst = dir.path().join("dst.img");
    create_sparse_file(&dst, 64 * GIB);
    write_file_at(&dst, 32 * GIB, &[0xff; 1 << 20]);
    let port = free_port();
    let args: Vec<String> = [
        "-f".to_string(),
        "--exit-with-parent".into(),
        "-i".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "file".into(),
        format!("file={}", dst.display()),
    ]
    .to_vec();
    let _k = peer(&nbdkit, &args, port);
    mirror_into_peer(port, &dst, dir.path());
}

/// Hostile 64-bit fields: ranges that wrap around, the largest lengths,
/// and a block status payload too long to read. Each gets its error (or a
/// close), nothing is written, and the server serves on.
#[test]
fn hostile_64_bit_lengths() {
    let dir = tempdir();
    let data = random_bytes(31, 1 << 20);
    let img = sparse_image(dir.path(), 16 * MIB, &[(0, &data)]);
    let before = read_file(&img);
    let mut srv = Serve::tcp(&img).start();
    // The same answers from the server and from a proxy in front of it.
    let mut proxy = Serve::proxy(&srv.conn_args()).start();
    hostile_requests(&mut srv);
    hostile_requests(&mut proxy);
    srv.assert_alive();
    assert_bytes_eq(&read_file(&img), &before, "image");
}

/// Requests whose 64-bit ranges overflow or exceed what `srv` serves: an
/// error chunk each, then a payload length it must not read: a close.
fn hostile_requests(srv: &mut Server) {
    let (mut r, _, _) = extended(srv.addr());
    let cases: [(u16, u64, u64, u32); 6] = [
        (CMD_WRITE_ZEROES, 4096, u64::MAX, ENOSPC),
        (CMD_TRIM, u64::MAX, 2, EINVAL),
        (CMD_BLOCK_STATUS, 1, u64::MAX, EINVAL),
        (CMD_CACHE, 16 * MIB, 1, EINVAL),
        (CMD_READ, 0, u64::MAX, EINVAL),
        (CMD_WRITE_ZEROES, u64::MAX - 4095, 4096, ENOSPC),
    ];
    for (i, &(cmd, off, len, want)) in cases.iter().enumerate() {
        r.ext(cmd, 0, i as u64, off, len);
        assert_eq!(r.failed(i as u64), want, "command {cmd} at {off} for {len}");
    }
    r.ext(CMD_FLUSH, 0, 99, 0, 0);
    r.ok(99, 0);
    // A block status payload of a terabyte: an error chunk, then a close.
    r.ext(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 100, 0, TIB);
    assert_eq!(r.failed(100), EINVAL);
    r.expect_closed();
    // A compact header where extended ones were agreed: the same.
    let (mut r, _, _) = extended(srv.addr());
    r.req(CMD_READ, 0, 7, 0, 512);
    assert_eq!(r.failed(7), EINVAL);
    r.expect_closed();
    srv.assert_alive();
}

/// The upstream behind an extended-header proxy is killed and comes back as
/// nbdkit 1.32, which has no extended headers: the client's connection
/// stays up; a TRIM over 4 GiB that was waiting for the upstream, and one
/// sent after, get EINVAL with a message; a block status over all of it
/// gets what compact headers can carry; reads and writes go on.
#[test]
fn the_proxy_outlives_an_upstream_that_comes_back_without_extended_headers() {
    let nbdkit = require_tool("nbdkit");
    let size = 8 * GIB;
    let dir = tempdir();
    let a = random_bytes(41, 64 * 1024);
    let img = sparse_image(dir.path(), size, &[(5 * GIB, &a)]);
    let mut up = Serve::tcp(&img).start();
    let port = up.port.expect("a TCP port");
    let mut p = Serve::proxy(&up.conn_args())
        .args(&["-v", "--retry-delay", "0.2", "--retries", "100"])
        .start();
    let (mut r, got, _) = extended(p.addr());
    assert_eq!(got, size);
    up.kill();
    // Sent while there is no upstream: it waits in the proxy.
    r.ext(CMD_TRIM, 0, 1, 0, 6 * GIB);
    let mut kit = std::process::Command::new(&nbdkit)
        .args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .arg("file")
        .arg(&img)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start nbdkit");
    let c = r.chunk();
    assert_eq!((c.kind, c.cookie, c.done()), (TYPE_ERROR, 1, true), "{c:?}");
    assert_eq!(c.errno(), EINVAL);
    let msg = String::from_utf8_lossy(&c.payload[6..]).into_owned();
    assert!(msg.contains("extended headers"), "{msg}");
    // Sent on the new upstream connection: the same.
    r.ext(CMD_WRITE_ZEROES, 0, 2, 0, 5 * GIB);
    assert_eq!(r.failed(2), EINVAL);
    // A block status over all 8 GiB: compact extents, as far as they reach.
    r.ext(CMD_BLOCK_STATUS, 0, 3, 0, size);
    let c = r.chunk();
    assert_eq!(
        (c.kind, c.cookie, c.offset, c.done()),
        (TYPE_BLOCK_STATUS_EXT, 3, 0, true),
        "{c:?}"
    );
    let n = be32(&c.payload, 4) as usize;
    let covered: u64 = (0..n).map(|i| be64(&c.payload, 8 + 16 * i)).sum();
    assert!(
        covered > 0 && covered < 4 * GIB,
        "{covered} bytes described"
    );
    // Reads and writes beyond 4 GiB go on, data intact.
    assert_bytes_eq(&r.read_ext(4, 5 * GIB, a.len() as u64), &a, "read");
    let b = random_bytes(42, 4096);
    r.ext(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 5, 7 * GIB, b.len() as u64);
    r.send(&b);
    r.ok(5, 7 * GIB);
    assert_bytes_eq(&read_file_at(&img, 7 * GIB, b.len()), &b, "written");
    assert_bytes_eq(&read_file_at(&img, 5 * GIB, a.len()), &a, "not trimmed");
    r.ext(CMD_DISC, 0, 0, 0, 0);
    assert!(r.expect_closed().is_empty());
    assert!(
        p.log_count("without extended headers") >= 1,
        "{}",
        p.stderr()
    );
    p.assert_alive();
    let _ = kit.kill();
    let _ = kit.wait();
}
