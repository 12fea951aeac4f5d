//! `flexnbd serve` spoken to by hand over a raw TcpStream: every reply is
//! checked at the byte level (magic, error, cookie echo), and hostile input
//! (bad flags, bad magic, huge lengths, truncated requests, disconnects in the
//! middle of a payload, random garbage, many connections) must never kill the
//! server or touch the image.

mod common;

use common::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Setup {
    _dir: tempfile::TempDir,
    img: PathBuf,
    original: Vec<u8>,
    srv: Server,
}

fn setup(size: u64, extra: &[&str]) -> Setup {
    let dir = tempdir();
    let img = dir.path().join("img");
    create_random_file(&img, size, size ^ 0xabc);
    let original = read_file(&img);
    let srv = Serve::tcp(&img).args(extra).start();
    Setup {
        _dir: dir,
        img,
        original,
        srv,
    }
}

impl Setup {
    /// A fresh client can still do a read and gets the file's bytes.
    #[track_caller]
    fn still_serves(&mut self) {
        self.srv.assert_alive();
        let mut c = Raw::simple(self.srv.addr());
        let got = c.read(0xfeed, 4096, 4096);
        assert_bytes_eq(
            &got,
            &read_file_at(&self.img, 4096, 4096),
            "read by a new client",
        );
        c.req(CMD_DISC, 0, 0, 0, 0);
    }

    #[track_caller]
    fn image_unchanged(&self) {
        assert_bytes_eq(&read_file(&self.img), &self.original, "image");
    }
}

// ------------------------------------------------------------- handshake

#[test]
fn unknown_client_flags_close_the_connection() {
    let mut s = setup(MIB, &[]);
    for flags in [0x4u32, 0x8000_0000, 0xffff_ffff, 0x3 | 0x10] {
        let mut c = Raw::connect(s.srv.addr());
        assert_eq!(c.newstyle_greeting(), 3);
        c.send(&flags.to_be_bytes());
        // Even a well-formed option after the flags gets no answer.
        c.try_send(&option(OPT_LIST, &[]));
        assert_eq!(
            c.expect_closed(),
            Vec::<u8>::new(),
            "client flags {flags:#x}"
        );
    }
    s.still_serves();
}

#[test]
fn client_without_fixed_newstyle_gets_export_name_only() {
    let mut s = setup(MIB, &[]);
    // Options other than EXPORT_NAME are not allowed: the server hangs up.
    let mut c = Raw::connect(s.srv.addr());
    c.newstyle_greeting();
    c.send(&0u32.to_be_bytes());
    c.send(&option(OPT_LIST, &[]));
    assert_eq!(c.expect_closed(), Vec::<u8>::new());

    // EXPORT_NAME works, with the 124 zero bytes (no NO_ZEROES).
    let mut c = Raw::connect(s.srv.addr());
    c.newstyle_greeting();
    c.send(&0u32.to_be_bytes());
    c.send(&option(OPT_EXPORT_NAME, b""));
    let r = c.read_exact(8 + 2 + 124);
    assert_eq!(be64(&r, 0), MIB, "export size");
    let flags = be16(&r, 8);
    assert_eq!(flags & 1, 1, "HAS_FLAGS");
    assert!(r[10..].iter().all(|&b| b == 0), "124 zeroes");
    let got = c.read(5, 0, 512);
    assert_bytes_eq(&got, &s.original[..512], "read after EXPORT_NAME");
    s.still_serves();
}

#[test]
fn export_name_with_no_zeroes_sends_exactly_ten_bytes() {
    let s = setup(MIB, &[]);
    let mut c = Raw::handshake(s.srv.addr());
    c.send(&option(OPT_EXPORT_NAME, b""));
    let r = c.read_exact(10);
    assert_eq!(be64(&r, 0), MIB);
    let flags = be16(&r, 8);
    assert_eq!(
        flags & 0x2d,
        0x2d,
        "HAS_FLAGS, FLUSH, FUA, TRIM: {flags:#x}"
    );
    assert_eq!(
        flags & 0x80,
        0,
        "no DF without structured replies: {flags:#x}"
    );
    assert_ne!(flags & 0x100, 0, "CAN_MULTI_CONN: {flags:#x}");
    // The very next bytes are the reply to our request, not zero padding.
    c.req(CMD_READ, 0, 0x0102_0304_0506_0708, 100, 10);
    let h = c.read_exact(16);
    assert_eq!(be32(&h, 0), SIMPLE_MAGIC, "{h:02x?}");
    assert_eq!(be32(&h, 4), 0);
    assert_eq!(be64(&h, 8), 0x0102_0304_0506_0708);
    assert_bytes_eq(&c.read_exact(10), &s.original[100..110], "data");
}

#[test]
fn option_with_bad_magic_closes_the_connection() {
    let mut s = setup(MIB, &[]);
    let mut c = Raw::handshake(s.srv.addr());
    let mut o = option(OPT_LIST, &[]);
    o[0] ^= 0x40;
    c.send(&o);
    assert_eq!(c.expect_closed(), Vec::<u8>::new());

    // Also after a successful option.
    let mut c = Raw::handshake(s.srv.addr());
    assert_eq!(
        c.opt(OPT_STRUCTURED_REPLY, &[]).last().unwrap().kind,
        REP_ACK
    );
    c.send(b"IHAVEOPX\0\0\0\x07\0\0\0\0");
    assert_eq!(c.expect_closed(), Vec::<u8>::new());
    s.still_serves();
}

#[test]
fn unknown_options_get_err_unsup_and_haggling_goes_on() {
    let mut s = setup(MIB, &[]);
    let mut c = Raw::handshake(s.srv.addr());
    for (opt, data) in [
        (0x1234u32, b"hello".to_vec()),
        (4, vec![]), // NBD_OPT_PEEK_EXPORT, withdrawn
        (0xffff_ffff, vec![0; 100]),
    ] {
        let r = c.opt(opt, &data);
        assert_eq!(r.len(), 1, "one reply to option {opt:#x}: {r:?}");
        assert_eq!(r[0].kind, REP_ERR_UNSUP, "option {opt:#x}");
    }
    // STARTTLS: no TLS here, refused by policy (or as unsupported).
    let r = c.opt(OPT_STARTTLS, &[]);
    assert!(
        r.len() == 1 && [REP_ERR_POLICY, REP_ERR_UNSUP].contains(&r[0].kind),
        "STARTTLS: {r:?}"
    );
    // LIST still works: one server entry (the default export ""), then ACK.
    let r = c.opt(OPT_LIST, &[]);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0].kind, REP_SERVER);
    assert!(r[0].data.len() >= 4);
    let name_len = be32(&r[0].data, 0) as usize;
    assert!(4 + name_len <= r[0].data.len());
    assert_eq!(r[1].kind, REP_ACK);
    assert!(r[1].data.is_empty());
    let (size, _) = c.go();
    assert_eq!(size, MIB);
    assert_bytes_eq(
        &c.read(1, 0, 4096),
        &s.original[..4096],
        "read after haggling",
    );
    s.still_serves();
}

#[test]
fn options_with_wrong_data_get_err_invalid() {
    let mut s = setup(MIB, &[]);
    let mut c = Raw::handshake(s.srv.addr());
    for (opt, data) in [
        (OPT_LIST, b"x".to_vec()),
        (OPT_STRUCTURED_REPLY, b"data".to_vec()),
        // A name length longer than the option.
        (OPT_GO, vec![0, 0, 1, 0, 0, 0]),
        (OPT_INFO, vec![0, 0]),
        // An info count that does not match the data.
        (OPT_GO, vec![0, 0, 0, 0, 0, 5, 0, 1]),
    ] {
        let r = c.opt(opt, &data);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].kind, REP_ERR_INVALID, "option {opt} with {data:?}");
    }
    // Meta contexts before structured replies.
    for opt in [OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT] {
        let r = c.opt(opt, &meta_data(&["base:allocation"]));
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(
            r[0].kind, REP_ERR_INVALID,
            "meta context option {opt} before SR"
        );
    }
    // The connection is still in sync: structured replies, then meta contexts.
    assert_eq!(
        c.opt(OPT_STRUCTURED_REPLY, &[]),
        vec![OptReply {
            option: OPT_STRUCTURED_REPLY,
            kind: REP_ACK,
            data: vec![]
        }]
    );
    let r = c.opt(OPT_SET_META_CONTEXT, &meta_data(&["nonamespace"]));
    assert_eq!(
        r.last().unwrap().kind,
        REP_ERR_INVALID,
        "query without a namespace"
    );
    let r = c.opt(OPT_LIST_META_CONTEXT, &meta_data(&[]));
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    assert!(
        r.iter()
            .any(|x| x.kind == REP_META_CONTEXT && &x.data[4..] == b"base:allocation"),
        "LIST_META_CONTEXT offers base:allocation: {r:?}"
    );
    let r = c.opt(
        OPT_SET_META_CONTEXT,
        &meta_data(&["qemu:dirty-bitmap:x", "base:allocation"]),
    );
    assert_eq!(r.len(), 2, "only base:allocation is selected: {r:?}");
    assert_eq!(r[0].kind, REP_META_CONTEXT);
    assert_eq!(&r[0].data[4..], b"base:allocation");
    let ctx = be32(&r[0].data, 0);
    assert_eq!(r[1].kind, REP_ACK);
    c.go();

    // BLOCK_STATUS answers with the selected context id and covers the range.
    c.req(CMD_BLOCK_STATUS, 0, 0xb5, 0, 65536);
    match c.reply() {
        Reply::Chunk(ch) => {
            assert_eq!(ch.cookie, 0xb5);
            assert_eq!(ch.kind, 5, "NBD_REPLY_TYPE_BLOCK_STATUS");
            assert_eq!(ch.flags & 1, 1, "DONE");
            assert_eq!(be32(&ch.payload, 0), ctx, "context id");
            assert_eq!((ch.payload.len() - 4) % 8, 0);
            let total: u64 = ch.payload[4..].chunks(8).map(|d| be32(d, 0) as u64).sum();
            assert_eq!(total, 65536, "descriptors cover the request");
            assert_eq!(be32(&ch.payload, 8), 0, "fully allocated image: data");
        }
        r => panic!("block status: {r:?}"),
    }
    s.still_serves();
}

#[test]
fn huge_option_lengths_are_refused_without_harm() {
    let mut s = setup(MIB, &[]);
    // Somewhat too long: the data is read and dropped, an error comes back,
    // and haggling goes on.
    let mut c = Raw::handshake(s.srv.addr());
    let r = c.opt(0x55, &vec![0x5a; 1 << 20]);
    assert_eq!(r.len(), 1, "{:?}", r[0].kind);
    assert_ne!(
        r[0].kind & 0x8000_0000,
        0,
        "an error reply: {:#x}",
        r[0].kind
    );
    assert_eq!(r[0].kind, REP_ERR_TOO_BIG);
    c.go();
    assert_bytes_eq(&c.read(1, 0, 512), &s.original[..512], "read");

    // Absurdly long: an error or a hang-up, but nothing else.
    for opt in [0x55u32, OPT_GO, OPT_EXPORT_NAME, OPT_LIST] {
        let mut c = Raw::handshake(s.srv.addr());
        let mut h = option(opt, &[]);
        h[12..16].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        c.send(&h);
        c.try_send(&[0u8; 4096]);
        let _ = c.s.shutdown(std::net::Shutdown::Write);
        let got = c.expect_closed();
        if !got.is_empty() {
            assert_eq!(be64(&got, 0), REPLY_MAGIC, "option {opt}: {got:02x?}");
            assert_ne!(be32(&got, 12) & 0x8000_0000, 0, "option {opt}: error reply");
        }
    }
    // EXPORT_NAME that is merely too long for a name: closed, nothing sent.
    let mut c = Raw::handshake(s.srv.addr());
    c.send(&option(OPT_EXPORT_NAME, &vec![b'a'; 100_000]));
    assert_eq!(c.expect_closed(), Vec::<u8>::new());
    s.still_serves();
}

#[test]
fn abort_is_acknowledged_then_closed() {
    let mut s = setup(MIB, &[]);
    let mut c = Raw::handshake(s.srv.addr());
    let r = c.opt(OPT_ABORT, &[]);
    assert_eq!(
        r,
        vec![OptReply {
            option: OPT_ABORT,
            kind: REP_ACK,
            data: vec![]
        }]
    );
    assert_eq!(c.expect_closed(), Vec::<u8>::new());
    // A client that sends ABORT and leaves at once does no harm either.
    let mut c = Raw::handshake(s.srv.addr());
    c.send(&option(OPT_ABORT, &[]));
    c.shutdown();
    s.still_serves();
}

#[test]
fn info_and_go_report_the_same_export() {
    let s = setup(3 * MIB + 512, &[]);
    let mut c = Raw::handshake(s.srv.addr());
    let infos = [3u16, 1, 2]; // BLOCK_SIZE, NAME, DESCRIPTION
    let info = c.opt(OPT_INFO, &go_data(&infos));
    let go = c.opt(OPT_GO, &go_data(&infos));
    assert_eq!(
        info,
        go.iter()
            .map(|r| OptReply {
                option: OPT_INFO,
                ..r.clone()
            })
            .collect::<Vec<_>>()
    );
    assert_eq!(go.last().unwrap().kind, REP_ACK);
    let export = go
        .iter()
        .position(|r| r.kind == REP_INFO && be16(&r.data, 0) == 0)
        .expect("INFO_EXPORT");
    assert!(export < go.len() - 1);
    assert_eq!(be64(&go[export].data, 2), 3 * MIB + 512);
    let bs = go
        .iter()
        .find(|r| r.kind == REP_INFO && be16(&r.data, 0) == 3)
        .expect("INFO_BLOCK_SIZE when asked");
    assert_eq!(bs.data.len(), 14);
    let (min, pref, max) = (be32(&bs.data, 2), be32(&bs.data, 6), be32(&bs.data, 10));
    assert!(min.is_power_of_two() && min <= 65536, "min {min}");
    assert!(
        pref.is_power_of_two() && pref >= min.max(512),
        "preferred {pref}"
    );
    assert!(max >= pref && max >= 1 << 20, "max {max}");
    // Transmission starts right after GO's ACK: no padding.
    let got = c.read(3, 3 * MIB, 512);
    assert_bytes_eq(&got, &s.original[3 * MIB as usize..], "last 512 bytes");
}

// ------------------------------------------------------------- transmission

#[test]
fn bad_request_magic_ends_only_that_connection() {
    let mut s = setup(MIB, &[]);
    let mut other = Raw::simple(s.srv.addr());
    let mut c = Raw::simple(s.srv.addr());
    let mut r = request(CMD_READ, 0, 1, 0, 512);
    r[0..4].copy_from_slice(&0x2560_9514u32.to_be_bytes());
    c.send(&r);
    // As the C flexnbd: one error reply echoing the handle, then the connection ends.
    let mut expected = 0x6744_6698u32.to_be_bytes().to_vec();
    expected.extend_from_slice(&22u32.to_be_bytes());
    expected.extend_from_slice(&1u64.to_be_bytes());
    assert_eq!(
        c.expect_closed(),
        expected,
        "EINVAL reply to a bad magic, then close"
    );
    // The connection opened before is untouched, and new ones are served.
    assert_bytes_eq(
        &other.read(2, 512, 512),
        &s.original[512..1024],
        "other client",
    );
    s.still_serves();
}

#[test]
fn unknown_commands_get_einval_and_the_connection_goes_on() {
    let s = setup(MIB, &[]);
    let mut c = Raw::simple(s.srv.addr());
    for (i, cmd) in [8u16, 9, 0x42, 0x7fff, 0xffff].into_iter().enumerate() {
        let cookie = 0xc0de_0000 + i as u64;
        c.req(cmd, 0, cookie, 0, 4096);
        let h = c.read_exact(16);
        assert_eq!(
            be32(&h, 0),
            SIMPLE_MAGIC,
            "simple reply, not structured: {h:02x?}"
        );
        assert_eq!(be32(&h, 4), EINVAL, "command {cmd:#x}");
        assert_eq!(be64(&h, 8), cookie, "cookie echo");
        // No payload follows: the next reply starts right away.
        assert_bytes_eq(
            &c.read(cookie + 100, 0, 16),
            &s.original[..16],
            "read after",
        );
    }

    // With structured replies, the error is an ERROR chunk with a message.
    let mut c = Raw::structured(s.srv.addr());
    c.req(0x42, 0, 0xe1, 0, 0);
    match c.reply() {
        Reply::Chunk(ch) => {
            assert_eq!(ch.cookie, 0xe1);
            assert_eq!(ch.kind, 0x8001, "NBD_REPLY_TYPE_ERROR");
            assert_eq!(ch.flags & 1, 1, "DONE");
            assert_eq!(be32(&ch.payload, 0), EINVAL);
            let mlen = be16(&ch.payload, 4) as usize;
            assert_eq!(ch.payload.len(), 6 + mlen);
            assert!(std::str::from_utf8(&ch.payload[6..]).is_ok());
        }
        r => panic!("{r:?}"),
    }
    c.req(CMD_READ, 0, 0xe2, 0, 4096);
    match c.reply() {
        Reply::Chunk(ch) => {
            assert_eq!(
                (ch.cookie, ch.kind, ch.flags),
                (0xe2, 1, 1),
                "OFFSET_DATA, DONE"
            );
            assert_eq!(be64(&ch.payload, 0), 0, "offset");
            assert_bytes_eq(&ch.payload[8..], &s.original[..4096], "structured read");
        }
        r => panic!("{r:?}"),
    }
    // A read past the end: ERROR chunk (or ERROR_OFFSET) with EINVAL.
    c.req(CMD_READ, 0, 0xe3, MIB - 10, 20);
    match c.reply() {
        Reply::Chunk(ch) => {
            assert_eq!(ch.cookie, 0xe3);
            assert!(ch.kind == 0x8001 || ch.kind == 0x8002, "{ch:?}");
            assert_eq!(ch.flags & 1, 1);
            assert_eq!(be32(&ch.payload, 0), EINVAL);
        }
        r => panic!("{r:?}"),
    }
}

/// A payload that is a stream of valid READ requests: if the server failed to
/// consume it, it would answer them.
fn decoy_payload(len: usize) -> Vec<u8> {
    let r = request(CMD_READ, 0, 0xdec0, 0, 4);
    r.iter().copied().cycle().take(len).collect()
}

#[test]
fn refused_writes_consume_their_payload() {
    let mut s = setup(MIB, &[]);
    let mut c = Raw::simple(s.srv.addr());
    // Past the end: ENOSPC.
    assert_eq!(c.write(0x51, MIB - 100, &decoy_payload(65536)), ENOSPC);
    assert_bytes_eq(
        &c.read(0x52, MIB - 4096, 4096),
        &s.original[(MIB - 4096) as usize..],
        "read",
    );
    // Bad flag on a write: EINVAL, payload consumed.
    let mut b = request(CMD_WRITE, 0x400, 0x53, 0, 8192).to_vec();
    b.extend_from_slice(&decoy_payload(8192));
    c.send(&b);
    assert_eq!(c.simple_reply(0x53), EINVAL);
    assert_bytes_eq(&c.read(0x54, 0, 64), &s.original[..64], "read");
    // DISC: the server closes, and no stray reply to the decoys ever came.
    c.req(CMD_DISC, 0, 0x55, 0, 0);
    assert_eq!(
        c.expect_closed(),
        Vec::<u8>::new(),
        "stray bytes after DISC"
    );
    s.image_unchanged();
    s.still_serves();
}

#[test]
fn write_longer_than_one_gib_gets_einval_and_payload_is_consumed() {
    let mut s = setup(MIB, &[]);
    let mut c = Raw::simple(s.srv.addr());
    let len: u32 = (1 << 30) + 4096;
    c.send(&request(CMD_WRITE, 0, 0x1_0000_0001, 0, len));
    let piece = decoy_payload(4 << 20);
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(piece.len());
        c.send(&piece[..n]);
        left -= n;
    }
    assert_eq!(c.simple_reply(0x1_0000_0001), EINVAL);
    assert_bytes_eq(&c.read(2, 0, 4096), &s.original[..4096], "read after");
    c.req(CMD_DISC, 0, 3, 0, 0);
    assert_eq!(c.expect_closed(), Vec::<u8>::new(), "stray replies");
    s.image_unchanged();
    s.still_serves();
}

#[test]
fn large_writes_are_streamed_and_land() {
    let mut s = setup(16 * MIB, &[]);
    let mut c = Raw::simple(s.srv.addr());
    let data = random_bytes(99, 9 * MIB as usize + 1234);
    assert_eq!(c.write(7, 3 * MIB + 17, &data), 0);
    let back = {
        c.req(CMD_READ, 0, 8, 3 * MIB + 17, data.len() as u32);
        assert_eq!(c.simple_reply(8), 0);
        c.read_exact(data.len())
    };
    assert_bytes_eq(&back, &data, "read back of a 9 MiB write");
    c.req(CMD_FLUSH, 0, 9, 0, 0);
    assert_eq!(c.simple_reply(9), 0);
    s.srv.stop();
    let mut model = s.original.clone();
    model[(3 * MIB + 17) as usize..(3 * MIB + 17) as usize + data.len()].copy_from_slice(&data);
    assert_bytes_eq(&read_file(&s.img), &model, "image");
}

#[test]
fn client_leaving_in_the_middle_of_a_payload_harms_nothing_else() {
    let mut s = setup(64 * MIB, &[]);
    let mut b = Raw::simple(s.srv.addr());
    // A large (streamed) write cut off after 6 of 8 MiB.
    let mut a = Raw::simple(s.srv.addr());
    a.send(&request(CMD_WRITE, 0, 1, 16 * MIB, 8 << 20));
    a.send(&vec![0xee; 6 << 20]);
    // A small (gathered) write cut off half-way.
    let mut c = Raw::simple(s.srv.addr());
    c.send(&request(CMD_WRITE, 0, 1, 40 * MIB, 256 << 10));
    c.send(&vec![0xdd; 128 << 10]);
    a.shutdown();
    c.shutdown();
    drop((a, c));
    // Another client keeps working meanwhile.
    let data = vec![0x77u8; 65536];
    assert_eq!(b.write(5, 50 * MIB, &data), 0);
    assert_bytes_eq(
        &b.read(6, 30 * MIB, 4096),
        &s.original[30 * MIB as usize..][..4096],
        "read",
    );
    drop(b);
    s.still_serves();
    // Stopping waits for every session to end: the image is final after it.
    s.srv.stop();
    let got = read_file(&s.img);
    let mut model = s.original.clone();
    model[50 * MIB as usize..][..65536].copy_from_slice(&data);
    let (lo, hi) = (16 * MIB as usize, 24 * MIB as usize);
    assert_bytes_eq(&got[..lo], &model[..lo], "before the cut-off write");
    assert_bytes_eq(&got[hi..], &model[hi..], "after the cut-off write");
    for (i, (&g, &o)) in got[lo..hi].iter().zip(&model[lo..hi]).enumerate() {
        assert!(
            g == o || g == 0xee,
            "byte {} is neither old nor new",
            lo + i
        );
    }
}

#[test]
fn half_a_request_header_then_close_or_silence() {
    let mut s = setup(MIB, &[]);
    // Half a header, then close.
    let mut c = Raw::simple(s.srv.addr());
    c.send(&request(CMD_READ, 0, 1, 0, 512)[..14]);
    c.shutdown();
    // Half a header, then silence: others are not held up.
    let mut quiet = Raw::simple(s.srv.addr());
    quiet.send(&request(CMD_READ, 0, 2, 0, 512)[..14]);
    let mut other = Raw::simple(s.srv.addr());
    assert_bytes_eq(&other.read(3, 0, 512), &s.original[..512], "other client");
    // The silent one can still complete its request.
    quiet.send(&request(CMD_READ, 0, 2, 0, 512)[14..]);
    assert_eq!(quiet.simple_reply(2), 0);
    assert_bytes_eq(
        &quiet.read_exact(512),
        &s.original[..512],
        "completed request",
    );
    // Half a header during the handshake, then close.
    let mut h = Raw::handshake(s.srv.addr());
    h.send(&option(OPT_GO, &go_data(&[]))[..9]);
    h.shutdown();
    s.still_serves();
}

#[test]
fn pipelined_requests_are_all_answered_with_their_cookies() {
    let mut s = setup(8 * MIB, &[]);
    let mut c = Raw::simple(s.srv.addr());
    let mut batch = Vec::new();
    let mut expect_read = std::collections::HashMap::new();
    for i in 0..64u64 {
        let off = i * 65536;
        batch.extend_from_slice(&request(CMD_READ, 0, 1000 + i, off, 4096));
        expect_read.insert(1000 + i, off);
    }
    let mut writes = std::collections::HashSet::new();
    for i in 0..16u64 {
        let off = 4 * MIB + i * 65536;
        batch.extend_from_slice(&request(
            CMD_WRITE,
            if i % 4 == 0 { 1 } else { 0 },
            2000 + i,
            off,
            8192,
        ));
        batch.extend_from_slice(&vec![i as u8 + 1; 8192]);
        writes.insert(2000 + i);
    }
    batch.extend_from_slice(&request(CMD_READ, 0, 3000, 8 * MIB, 1)); // past the end
    c.send(&batch);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..(64 + 16 + 1) {
        let (error, cookie) = match c.reply() {
            Reply::Simple { error, cookie } => (error, cookie),
            r => panic!("{r:?}"),
        };
        assert!(seen.insert(cookie), "cookie {cookie} answered twice");
        if let Some(off) = expect_read.get(&cookie) {
            assert_eq!(error, 0);
            let data = c.read_exact(4096);
            assert_bytes_eq(
                &data,
                &s.original[*off as usize..][..4096],
                "pipelined read",
            );
        } else if writes.contains(&cookie) {
            assert_eq!(error, 0);
        } else {
            assert_eq!((cookie, error), (3000, EINVAL));
        }
    }
    c.req(CMD_DISC, 0, 0, 0, 0);
    assert_eq!(c.expect_closed(), Vec::<u8>::new());
    s.srv.stop();
    let got = read_file(&s.img);
    for i in 0..16u64 {
        let off = (4 * MIB + i * 65536) as usize;
        assert!(
            got[off..off + 8192].iter().all(|&b| b == i as u8 + 1),
            "write {i}"
        );
    }
}

#[test]
fn two_hundred_concurrent_connections() {
    const N: usize = 200;
    let dir = tempdir();
    let img = dir.path().join("img");
    create_random_file(&img, N as u64 * 4096, 200);
    let original = Arc::new(read_file(&img));
    let ctl = dir.path().join("ctl");
    let mut srv = Serve::tcp(&img).control(&ctl).start();
    let addr = srv.addr();
    let arrived = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..N)
        .map(|i| {
            let (arrived, go, original) = (arrived.clone(), go.clone(), original.clone());
            std::thread::spawn(move || {
                let mut c = Raw::simple(addr);
                // Everyone is connected and negotiated before anyone reads
                // (bounded: a client that failed must not hang the others).
                arrived.fetch_add(1, Ordering::SeqCst);
                wait_until(Duration::from_secs(60), || go.load(Ordering::SeqCst));
                let got = c.read(i as u64, i as u64 * 4096, 4096);
                assert_bytes_eq(&got, &original[i * 4096..][..4096], &format!("client {i}"));
                c.req(CMD_DISC, 0, 0, 0, 0);
                c.expect_closed();
            })
        })
        .collect();
    let all = wait_until(Duration::from_secs(60), || {
        arrived.load(Ordering::SeqCst) == N
    });
    // The server counts them all at once.
    let status = run(
        std::process::Command::new(bin())
            .args(["status", "--sock"])
            .arg(&ctl),
        Duration::from_secs(30),
    );
    go.store(true, Ordering::SeqCst);
    let mut failed = 0;
    for h in handles {
        if h.join().is_err() {
            failed += 1;
        }
    }
    assert!(
        all,
        "only {} of {N} clients negotiated",
        arrived.load(Ordering::SeqCst)
    );
    assert_eq!(failed, 0, "{failed} of {N} clients failed");
    status.expect_success("flexnbd status");
    assert!(
        status
            .stdout_str()
            .split_whitespace()
            .any(|kv| kv == format!("num_clients={N}")),
        "status while {N} clients were connected: {}",
        status.stdout_str()
    );
    let mut c = Raw::simple(addr);
    assert_bytes_eq(&c.read(1, 0, 4096), &original[..4096], "read after");
    srv.stop();
}

/// One connection's worth of garbage, per `mode`.
fn garbage(rng: &mut Rng, mode: u64, size: u64) -> (bool, Vec<u8>) {
    // (whether to negotiate first, bytes to send after)
    let mut out = Vec::new();
    match mode {
        // Pure noise instead of client flags and options.
        0 => {
            let n = rng.below(2048) as usize + 1;
            out = rng.bytes(n);
            (false, out)
        }
        // Valid flags, then plausible options with random codes, lengths and data.
        1 => {
            out.extend_from_slice(&(rng.below(4) as u32).to_be_bytes());
            for _ in 0..rng.below(20) + 1 {
                let opt = match rng.below(4) {
                    0 => rng.below(16) as u32,
                    1 => rng.next_u64() as u32,
                    _ => [3u32, 6, 8, 9, 10, 2][rng.below(6) as usize],
                };
                let len = rng.below(300) as usize;
                let mut o = option(opt, &rng.bytes(len));
                if rng.below(10) == 0 {
                    // A lying length field.
                    let l = rng.next_u64() as u32;
                    o[12..16].copy_from_slice(&l.to_be_bytes());
                }
                if rng.below(20) == 0 {
                    o[rng.below(8) as usize] ^= 1;
                }
                out.extend_from_slice(&o);
            }
            (false, out)
        }
        // A negotiated connection, then requests that never modify the image
        // (no WRITE, TRIM or WRITE_ZEROES) with random fields, and noise.
        _ => {
            for _ in 0..rng.below(40) + 1 {
                let cmd = match rng.below(6) {
                    0 => CMD_READ,
                    1 => CMD_FLUSH,
                    2 => CMD_CACHE,
                    3 => CMD_BLOCK_STATUS,
                    4 => 8 + rng.below(0xfff0) as u16,
                    _ => [CMD_READ, CMD_DISC][rng.below(2) as usize],
                };
                let flags = if rng.below(2) == 0 {
                    0
                } else {
                    rng.next_u64() as u16
                };
                let offset = if rng.below(2) == 0 {
                    rng.below(size)
                } else {
                    rng.next_u64()
                };
                let length = match rng.below(3) {
                    0 => rng.below(65536) as u32,
                    1 => rng.next_u64() as u32,
                    _ => rng.below(size) as u32,
                };
                let mut r = request(cmd, flags, rng.next_u64(), offset, length).to_vec();
                if rng.below(30) == 0 {
                    // Break the magic, or the header short and then noise.
                    r[rng.below(4) as usize] ^= 0x80;
                }
                out.extend_from_slice(&r);
                if rng.below(25) == 0 {
                    let n = rng.below(100) as usize;
                    out.extend_from_slice(&rng.bytes(n));
                }
            }
            (true, out)
        }
    }
}

#[test]
fn random_garbage_never_kills_the_server() {
    let mut s = setup(8 * MIB, &[]);
    let addr = s.srv.addr();
    let size = 8 * MIB;
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut rng = Rng::new(0xf00d + t);
                for i in 0..40u64 {
                    let mode = (i + t) % 3;
                    let (negotiate, bytes) = garbage(&mut rng, mode, size);
                    let mut c = if negotiate {
                        if rng.below(2) == 0 {
                            Raw::simple(addr)
                        } else {
                            Raw::structured(addr)
                        }
                    } else {
                        let mut c = Raw::connect(addr);
                        c.newstyle_greeting();
                        c
                    };
                    // Drain whatever comes back so the server never blocks on us.
                    let mut rd = c.s.try_clone().unwrap();
                    let drain = std::thread::spawn(move || {
                        let mut buf = vec![0u8; 1 << 16];
                        let mut total = 0usize;
                        while let Ok(n) = std::io::Read::read(&mut rd, &mut buf) {
                            if n == 0 {
                                break;
                            }
                            total += n;
                        }
                        total
                    });
                    for piece in bytes.chunks(rng.below(512) as usize + 1) {
                        if !c.try_send(piece) {
                            break;
                        }
                    }
                    c.shutdown();
                    drain.join().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("fuzz thread");
    }
    s.srv.assert_alive();
    s.still_serves();
    // A whole-image read by a normal client matches the untouched file.
    let mut c = Raw::simple(addr);
    let all = c.read(1, 0, size as u32);
    assert_bytes_eq(&all, &s.original, "whole image read");
    s.image_unchanged();
    s.srv.stop();
    s.image_unchanged();
}

#[test]
fn disc_after_requests_answers_them_then_closes() {
    let s = setup(MIB, &[]);
    let mut c = Raw::simple(s.srv.addr());
    let mut b = request(CMD_READ, 0, 11, 0, 100).to_vec();
    b.extend_from_slice(&request(CMD_DISC, 0, 12, 0, 0));
    b.extend_from_slice(&request(CMD_READ, 0, 13, 0, 100));
    c.send(&b);
    assert_eq!(c.simple_reply(11), 0);
    assert_bytes_eq(&c.read_exact(100), &s.original[..100], "read before DISC");
    // Nothing is answered after DISC.
    assert_eq!(c.expect_closed(), Vec::<u8>::new());
}

/// Reads all chunks of one structured reply (until DONE).
#[track_caller]
fn chunks_until_done(c: &mut Raw, cookie: u64) -> Vec<Chunk> {
    let mut v = Vec::new();
    loop {
        match c.reply() {
            Reply::Chunk(ch) => {
                assert_eq!(ch.cookie, cookie, "cookie echo");
                let done = ch.flags & 1 == 1;
                v.push(ch);
                if done {
                    return v;
                }
            }
            r => panic!("simple reply to a structured read: {r:?}"),
        }
    }
}

/// Expected: a DF read is one data chunk up to the advertised maximum
/// payload (32 MiB), and EOVERFLOW beyond it.
#[test]
fn df_reads_are_one_chunk_or_eoverflow() {
    let s = setup(40 * MIB, &[]);
    let mut c = Raw::structured(s.srv.addr());
    let mut problems = Vec::new();
    for (i, len) in [
        512u32,
        65536,
        500_000,
        983_040,
        983_041,
        1_000_000,
        1_044_480,
        1 << 20,
        2 << 20,
        32 << 20,
        (32 << 20) + 1,
    ]
    .into_iter()
    .enumerate()
    {
        let cookie = 0xdf00 + i as u64;
        let off = 4096;
        c.req(CMD_READ, 1 << 2, cookie, off, len);
        let chunks = chunks_until_done(&mut c, cookie);
        let kinds: Vec<u16> = chunks.iter().map(|ch| ch.kind).collect();
        match kinds.as_slice() {
            // One content chunk, possibly followed by the final NONE chunk.
            [1] | [1, 0] => {
                let p = &chunks[0].payload;
                assert_eq!(be64(p, 0), off);
                assert_bytes_eq(
                    &p[8..],
                    &s.original[off as usize..][..len as usize],
                    "DF data",
                );
            }
            [0x8001] | [0x8002] if len > 32 << 20 => {
                assert_eq!(
                    be32(&chunks[0].payload, 0),
                    EOVERFLOW,
                    "DF read of {len}: error"
                );
            }
            _ => {
                problems.push(format!(
                "DF read of {len} bytes answered with {} chunks of types {kinds:?} (lengths {:?})",
                chunks.len(),
                chunks.iter().map(|ch| ch.payload.len() as i64 - 8).collect::<Vec<_>>()
            ))
            }
        }
    }
    assert!(
        problems.is_empty(),
        "DF (do not fragment) needs one data chunk or EOVERFLOW:\n{}",
        problems.join("\n")
    );
    c.req(CMD_READ, 1 << 2, 0xdfff, 0, (32 << 20) + 1);
    let chunks = chunks_until_done(&mut c, 0xdfff);
    assert_eq!(
        be32(&chunks[0].payload, 0),
        EOVERFLOW,
        "DF read over 32 MiB"
    );
}

/// Expected: a structured 32 MiB read of a sparse image comes as one chunk
/// per data or hole run of the image (not in fixed pieces), whatever the
/// read's size: hole chunks exactly where the holes are, data chunks
/// carrying the file's bytes, then the final NONE chunk. On tmpfs, where
/// holes are found by probing every 64 KiB, the runs here are far apart
/// enough to be exact too.
#[test]
fn structured_reads_follow_the_data_and_hole_boundaries() {
    for dir in [big_tempdir(64 * MIB), tempdir()] {
        let img = dir.path().join("img");
        create_sparse_file(&img, 40 * MIB);
        // Runs: data [0, 1M), hole, data [3M+4K, 3M+12K), hole, data [10M, 20M), hole to 32M.
        for (off, len, seed) in [
            (0, MIB, 1u64),
            (3 * MIB + 4096, 8192, 2),
            (10 * MIB, 10 * MIB, 3),
        ] {
            write_file_at(&img, off, &random_bytes(seed, len as usize));
        }
        let file = read_file(&img);
        let srv = Serve::tcp(&img).start();
        let mut c = Raw::structured(srv.addr());
        for (cookie, off, len) in [(1u64, 0u64, 32 * MIB), (2, MIB / 2, 16 * MIB)] {
            c.req(CMD_READ, 0, cookie, off, len as u32);
            let chunks = chunks_until_done(&mut c, cookie);
            let mut runs = Vec::new();
            let mut pos = off;
            for ch in &chunks {
                if ch.kind == 0 {
                    continue; // the final NONE chunk
                }
                let at = be64(&ch.payload, 0);
                match ch.kind {
                    1 => {
                        let data = &ch.payload[8..];
                        assert_eq!(at, pos, "data chunk in order");
                        assert_bytes_eq(data, &file[at as usize..][..data.len()], "data chunk");
                        runs.push((at, data.len() as u64, false));
                        pos += data.len() as u64;
                    }
                    2 => {
                        let l = be32(&ch.payload, 8) as u64;
                        assert_eq!(at, pos, "hole chunk in order");
                        assert!(file[at as usize..][..l as usize].iter().all(|&b| b == 0));
                        runs.push((at, l, true));
                        pos += l;
                    }
                    k => panic!("chunk type {k:#x}"),
                }
            }
            assert_eq!(pos, off + len, "chunks cover the read");
            let end = off + len;
            let want: Vec<(u64, u64, bool)> = [
                (0, MIB, false),
                (MIB, 2 * MIB + 4096, true),
                (3 * MIB + 4096, 8192, false),
                (3 * MIB + 12288, 7 * MIB - 12288, true),
                (10 * MIB, 10 * MIB, false),
                (20 * MIB, 20 * MIB, true),
            ]
            .iter()
            .filter_map(|&(o, l, h)| {
                let (s, e) = (o.max(off), (o + l).min(end));
                (s < e).then_some((s, e - s, h))
            })
            .collect();
            assert_eq!(runs, want, "chunks of the read at {off} ({:?})", dir.path());
        }
        drop(c);
    }
}

#[test]
fn block_status_req_one_and_context_changes() {
    let dir = tempdir();
    let img = dir.path().join("img");
    create_sparse_file(&img, 8 * MIB);
    write_file_at(&img, 2 * MIB, &random_bytes(5, MIB as usize));
    let srv = Serve::tcp(&img).start();
    let mut c = Raw::handshake(srv.addr());
    c.opt(OPT_STRUCTURED_REPLY, &[]);
    let r = c.opt(OPT_LIST_META_CONTEXT, &meta_data(&["base:"]));
    assert!(
        r.iter()
            .any(|x| x.kind == REP_META_CONTEXT && &x.data[4..] == b"base:allocation"),
        "`base:` lists base:allocation: {r:?}"
    );
    let r = c.opt(OPT_SET_META_CONTEXT, &meta_data(&["base:allocation"]));
    let id = be32(&r[0].data, 0);
    c.go();
    let status = |c: &mut Raw, cookie: u64, flags: u16, off: u64, len: u32| -> Vec<(u32, u32)> {
        c.req(CMD_BLOCK_STATUS, flags, cookie, off, len);
        let ch = chunks_until_done(c, cookie);
        assert_eq!(ch.len(), 1, "one chunk per context");
        assert_eq!(ch[0].kind, 5, "{:?}", ch[0]);
        assert_eq!(be32(&ch[0].payload, 0), id);
        ch[0].payload[4..]
            .chunks(8)
            .map(|d| (be32(d, 0), be32(d, 4)))
            .collect()
    };
    let m = MIB as u32;
    assert_eq!(
        status(&mut c, 1, 0, 0, 4 * m),
        vec![(2 * m, 3), (m, 0), (m, 3)]
    );
    assert_eq!(
        status(&mut c, 2, 1 << 3, 0, 4 * m),
        vec![(2 * m, 3)],
        "REQ_ONE"
    );
    assert_eq!(
        status(&mut c, 3, 1 << 3, 2 * MIB + 4096, 8192),
        vec![(8192, 0)],
        "REQ_ONE, clipped"
    );
    assert_eq!(status(&mut c, 4, 0, 7 * MIB, m), vec![(m, 3)]);
    drop(c);

    // Selecting no known context: BLOCK_STATUS is then refused with EINVAL.
    let mut c = Raw::handshake(srv.addr());
    c.opt(OPT_STRUCTURED_REPLY, &[]);
    c.opt(OPT_SET_META_CONTEXT, &meta_data(&["base:allocation"]));
    let r = c.opt(OPT_SET_META_CONTEXT, &meta_data(&["qemu:dirty-bitmap:x"]));
    assert_eq!(r.len(), 1, "nothing selected: {r:?}");
    c.go();
    c.req(CMD_BLOCK_STATUS, 0, 9, 0, 4096);
    let ch = chunks_until_done(&mut c, 9);
    assert_eq!(ch.len(), 1);
    assert!(ch[0].kind & 0x8000 != 0, "an error chunk: {:?}", ch[0]);
    assert_eq!(be32(&ch[0].payload, 0), EINVAL);
}

/// The keepalive timer of the server's side of a loopback connection, from
/// /proc/net/tcp: (timer kind, remaining clock ticks).
fn server_side_timer(port: u16, peer_port: u16) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    let remote = format!("0100007F:{peer_port:04X}");
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 5 && f[1] == local && f[2] == remote && f[3] == "01" {
            let (tr, when) = f[5].split_once(':')?;
            Some((
                u32::from_str_radix(tr, 16).ok()?,
                u64::from_str_radix(when, 16).ok()?,
            ))
        } else {
            None
        }
    })
}

#[test]
fn accepted_sockets_have_keepalive_of_30_seconds() {
    let s = setup(MIB, &[]);
    let c = Raw::simple(s.srv.addr());
    let peer = c.s.local_addr().unwrap().port();
    // Timer 2 is the keepalive timer (1, retransmission, shows until the last
    // reply is acknowledged); the remaining time is in USER_HZ (100/s).
    let mut last = None;
    let armed = wait_until(Duration::from_secs(5), || {
        last = server_side_timer(s.srv.addr().port(), peer);
        matches!(last, Some((2, _)))
    });
    assert!(
        armed,
        "no keepalive timer on the server side: {last:?} (kind, ticks)"
    );
    let (_, when) = last.unwrap();
    assert!(
        (20 * 100..=30 * 100).contains(&when),
        "keepalive idle time {when} ticks"
    );
}

#[test]
fn one_gib_reads_and_writes_in_a_single_request() {
    const LEN: u64 = 1 << 30;
    const PIECE: usize = 4 << 20;
    let dir = big_tempdir(LEN + 256 * MIB);
    let img = dir.path().join("img");
    create_sparse_file(&img, LEN);
    let mut srv = Serve::tcp(&img).start();

    // One WRITE of exactly 1 GiB (the largest the C `flexnbd write` sends).
    let mut c = Raw::simple(srv.addr());
    c.send(&request(CMD_WRITE, 0, 0x6161, 0, LEN as u32));
    let mut rng = Rng::new(0x1_0000);
    let mut buf = vec![0u8; PIECE];
    for _ in 0..LEN as usize / PIECE {
        rng.fill(&mut buf);
        c.send(&buf);
    }
    assert_eq!(c.simple_reply(0x6161), 0, "1 GiB write");

    // One READ of exactly 1 GiB with a simple reply.
    c.req(CMD_READ, 0, 0x6162, 0, LEN as u32);
    assert_eq!(c.simple_reply(0x6162), 0, "1 GiB read");
    let mut rng = Rng::new(0x1_0000);
    for i in 0..LEN as usize / PIECE {
        rng.fill(&mut buf);
        let got = c.read_exact(PIECE);
        assert_bytes_eq(&got, &buf, &format!("simple read, piece {i}"));
    }

    // The same with structured replies: chunks tile the range, data matches.
    let mut s = Raw::structured(srv.addr());
    s.req(CMD_READ, 0, 0x6163, 0, LEN as u32);
    let mut expected = Rng::new(0x1_0000);
    let mut pos = 0u64;
    loop {
        let ch = match s.reply() {
            Reply::Chunk(ch) => ch,
            r => panic!("{r:?}"),
        };
        assert_eq!(ch.cookie, 0x6163);
        if ch.kind == 0 {
            // A final NONE chunk may close a reply whose data chunks were not final.
            assert_eq!(ch.flags & 1, 1, "NONE chunk must be final");
            break;
        }
        assert_eq!(ch.kind, 1, "fully written: data chunks only");
        assert_eq!(be64(&ch.payload, 0), pos, "chunks in order without gaps");
        let data = &ch.payload[8..];
        // Compare against the generator, which produces 4 MiB pieces.
        let mut want = vec![0u8; data.len()];
        let mut filled = 0;
        while filled < want.len() {
            let at = (pos as usize + filled) % PIECE;
            if at == 0 {
                expected.fill(&mut buf);
            }
            let n = (PIECE - at).min(want.len() - filled);
            want[filled..filled + n].copy_from_slice(&buf[at..at + n]);
            filled += n;
        }
        assert_bytes_eq(data, &want, &format!("structured chunk at {pos}"));
        pos += data.len() as u64;
        if ch.flags & 1 == 1 {
            break;
        }
    }
    assert_eq!(pos, LEN);

    // One byte more is refused: the length limit, not just the export end.
    c.req(CMD_READ, 0, 0x6164, 0, LEN as u32 + 1);
    assert_eq!(c.simple_reply(0x6164), EINVAL);
    srv.stop();
    let mut rng = Rng::new(0x1_0000);
    for i in 0..LEN as usize / PIECE {
        rng.fill(&mut buf);
        let got = read_file_at(&img, (i * PIECE) as u64, PIECE);
        assert_bytes_eq(&got, &buf, &format!("file piece {i}"));
    }
}

/// Data of NBD_OPT_SET_META_CONTEXT for export `name`.
fn meta_data_for(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&meta_data(queries)[4..]);
    d
}

/// BLOCK_STATUS of the first 4 KiB; the error of its error chunk, or 0.
fn block_status_error(c: &mut Raw, cookie: u64) -> u32 {
    c.req(CMD_BLOCK_STATUS, 0, cookie, 0, 4096);
    let ch = chunks_until_done(c, cookie);
    match ch.iter().find(|x| x.kind & 0x8000 != 0) {
        Some(e) => be32(&e.payload, 0),
        None => {
            assert_eq!(ch[0].kind, 5, "a block status chunk: {ch:?}");
            0
        }
    }
}

/// Expected: a SET_META_CONTEXT that fails (malformed data, or a query
/// without a namespace) clears
/// the selection made before it, so BLOCK_STATUS gets EINVAL; so does one
/// for an export name the server lacks; one made for the name that GO uses
/// works.
#[test]
fn a_failed_set_meta_context_clears_the_selection_and_names_count() {
    let s = setup(MIB, &[]);
    let select = |c: &mut Raw, name: &str| {
        let r = c.opt(
            OPT_SET_META_CONTEXT,
            &meta_data_for(name, &["base:allocation"]),
        );
        assert_eq!(r[0].kind, REP_META_CONTEXT, "{r:?}");
        assert_eq!(r.last().unwrap().kind, REP_ACK, "{r:?}");
    };

    // Control: selected, then GO for the same (empty) name.
    let mut c = Raw::handshake(s.srv.addr());
    c.opt(OPT_STRUCTURED_REPLY, &[]);
    select(&mut c, "");
    c.go();
    assert_eq!(block_status_error(&mut c, 1), 0, "selected context works");

    // Malformed SET data after a good SET.
    let mut c = Raw::handshake(s.srv.addr());
    c.opt(OPT_STRUCTURED_REPLY, &[]);
    select(&mut c, "");
    let r = c.opt(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 9]);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].kind, REP_ERR_INVALID, "{r:?}");
    c.go();
    assert_eq!(
        block_status_error(&mut c, 2),
        EINVAL,
        "cleared by a malformed SET"
    );

    // A query without a namespace after a good SET.
    let mut c = Raw::handshake(s.srv.addr());
    c.opt(OPT_STRUCTURED_REPLY, &[]);
    select(&mut c, "");
    let r = c.opt(OPT_SET_META_CONTEXT, &meta_data(&["nonamespace"]));
    assert!(r[0].kind & 0x8000_0000 != 0, "an error reply: {r:?}");
    c.go();
    assert_eq!(
        block_status_error(&mut c, 3),
        EINVAL,
        "cleared by a failed SET"
    );

    // A LIST does not change what SET chose.
    let mut c = Raw::handshake(s.srv.addr());
    c.opt(OPT_STRUCTURED_REPLY, &[]);
    select(&mut c, "");
    c.opt(OPT_LIST_META_CONTEXT, &meta_data(&["nonamespace"]));
    c.go();
    assert_eq!(
        block_status_error(&mut c, 4),
        0,
        "LIST leaves the selection"
    );

    // A SET for an export name this server lacks is refused (ERR_UNKNOWN)
    // and, as any failed SET, clears what was chosen before; GO for "".
    let mut c = Raw::handshake(s.srv.addr());
    c.opt(OPT_STRUCTURED_REPLY, &[]);
    select(&mut c, "");
    let r = c.opt(
        OPT_SET_META_CONTEXT,
        &meta_data_for("other", &["base:allocation"]),
    );
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].kind, REP_ERR_UNKNOWN, "{r:?}");
    c.go();
    assert_eq!(
        block_status_error(&mut c, 5),
        EINVAL,
        "contexts of another name"
    );
}
