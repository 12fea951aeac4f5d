//! Soak against a model: one `flexnbd serve`, many client connections (one
//! thread each, one request at a time) doing random READ, WRITE, TRIM,
//! WRITE_ZEROES (with and without NO_HOLE, some with FAST_ZERO), FLUSH,
//! CACHE and BLOCK_STATUS on one export, with a small share of requests that
//! are invalid on purpose, all checked against an in-memory model of the
//! image.
//!
//! The model is exact under concurrency because the test serialises
//! overlapping operations itself: the model is a table of 4 KiB blocks, each
//! behind its own lock; an operation locks the blocks its range touches (in
//! ascending order, so no deadlock), sends its request, waits for the reply,
//! checks it and updates the model, then unlocks. Operations on disjoint
//! blocks run concurrently, on as many connections as there are threads.
//!
//! Checked: every READ's bytes equal the model (data and hole chunks, which
//! must cover the range without overlap); every BLOCK_STATUS reply covers the
//! range in order without gaps and never says STATE_ZERO where the model holds
//! a non-zero byte; every valid request succeeds; every invalid one gets its
//! exact error code and leaves the connection usable (a checked READ follows
//! it) and the image untouched; and at the end the image file equals the
//! model byte for byte. TRIM punches a hole and WRITE_ZEROES makes the range
//! read as zeroes (docs/architecture.md, "Storage and sparseness"), so both
//! zero the model.
//!
//! `FLEXNBD_SOAK_SECS` (default 10), `FLEXNBD_SOAK_CONNS` (default 256),
//! `FLEXNBD_SOAK_MIB` (image size, default 64), `FLEXNBD_SOAK_SEED` and
//! `FLEXNBD_SOAK_DIR` (where the image lives; default /dev/shm when it has
//! room) tune a run.

mod common;

use common::*;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Granularity of the model's locks (and of the server's hole detection).
const BLOCK: u64 = 4096;
/// Largest READ or WRITE of the common kind: buffers stay this size.
const MAX_OP: u64 = 128 * KIB;
/// Largest TRIM, WRITE_ZEROES or BLOCK_STATUS (no payload, no buffer).
const MAX_RANGE_OP: u64 = MIB;
/// Big READs (over the server's 960 KiB reply buffer: streamed) go up to
/// this; at most `BIG_AT_ONCE` of them at a time, so memory stays bounded.
const BIG_READ: u64 = 2 * MIB;
const BIG_AT_ONCE: usize = 4;
/// A quarter of the operations land here, so neighbouring operations (in
/// different blocks, so not serialised) often run side by side.
const HOT: u64 = MIB;
/// Stack of each client thread; buffers live on the heap.
const STACK: usize = 256 * 1024;

const FLAG_FUA: u16 = 1 << 0;
const FLAG_NO_HOLE: u16 = 1 << 1;
const FLAG_DF: u16 = 1 << 2;
const FLAG_REQ_ONE: u16 = 1 << 3;
const FLAG_FAST_ZERO: u16 = 1 << 4;
const REPLY_DONE: u16 = 1 << 0;
const TYPE_NONE: u16 = 0;
const TYPE_OFFSET_DATA: u16 = 1;
const TYPE_OFFSET_HOLE: u16 = 2;
const TYPE_BLOCK_STATUS: u16 = 5;
const TYPE_ERROR: u16 = 0x8001;
const TYPE_ERROR_OFFSET: u16 = 0x8002;
const STATE_HOLE: u32 = 1 << 0;
const STATE_ZERO: u32 = 1 << 1;
/// NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE.
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

type Res<T> = Result<T, String>;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

// ---------------------------------------------------------------- model

/// The image as it must be: one locked 4 KiB block each.
struct Model {
    size: u64,
    blocks: Vec<Mutex<Box<[u8]>>>,
}

/// The blocks of one operation's range, locked.
struct Locked<'a> {
    /// Byte offset of the first locked block.
    base: u64,
    guards: Vec<MutexGuard<'a, Box<[u8]>>>,
}

impl Model {
    fn new(image: &[u8]) -> Model {
        assert_eq!(image.len() as u64 % BLOCK, 0, "test bug: image size");
        Model {
            size: image.len() as u64,
            blocks: image
                .chunks(BLOCK as usize)
                .map(|c| Mutex::new(c.to_vec().into_boxed_slice()))
                .collect(),
        }
    }

    /// Locks every block `[off, off + len)` touches (clipped to the image).
    fn lock(&self, off: u64, len: u64) -> Locked<'_> {
        let end = off.saturating_add(len).min(self.size);
        if off >= end {
            return Locked {
                base: 0,
                guards: Vec::new(),
            };
        }
        let first = off / BLOCK;
        let last = (end - 1) / BLOCK;
        Locked {
            base: first * BLOCK,
            guards: (first..=last)
                .map(|b| {
                    self.blocks[b as usize]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                })
                .collect(),
        }
    }
}

impl Locked<'_> {
    /// Calls `f(piece, at)` for each in-block piece of `[off, off + len)`,
    /// `at` being the piece's offset from `off`.
    fn each(&self, off: u64, len: u64, mut f: impl FnMut(&[u8], usize)) {
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let i = ((pos - self.base) / BLOCK) as usize;
            let within = (pos % BLOCK) as usize;
            let n = (BLOCK as usize - within).min((end - pos) as usize);
            let g = self
                .guards
                .get(i)
                .unwrap_or_else(|| panic!("test bug: {off}+{len} not locked"));
            f(&g[within..within + n], (pos - off) as usize);
            pos += n as u64;
        }
    }

    fn each_mut(&mut self, off: u64, len: u64, mut f: impl FnMut(&mut [u8], usize)) {
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let i = ((pos - self.base) / BLOCK) as usize;
            let within = (pos % BLOCK) as usize;
            let n = (BLOCK as usize - within).min((end - pos) as usize);
            let g = self
                .guards
                .get_mut(i)
                .unwrap_or_else(|| panic!("test bug: {off}+{len} not locked"));
            f(&mut g[within..within + n], (pos - off) as usize);
            pos += n as u64;
        }
    }

    /// Offset of the first byte of `[off, off + data.len())` that differs from `data`.
    fn differs(&self, off: u64, data: &[u8]) -> Option<(u64, u8, u8)> {
        let mut first = None;
        self.each(off, data.len() as u64, |piece, at| {
            if first.is_none() && piece != &data[at..at + piece.len()] {
                let k = (0..piece.len())
                    .find(|&k| piece[k] != data[at + k])
                    .unwrap();
                first = Some((off + (at + k) as u64, data[at + k], piece[k]));
            }
        });
        first
    }

    /// Offset and value of the first non-zero model byte in the range.
    fn nonzero(&self, off: u64, len: u64) -> Option<(u64, u8)> {
        let mut first = None;
        self.each(off, len, |piece, at| {
            if first.is_none() {
                if let Some(k) = piece.iter().position(|&b| b != 0) {
                    first = Some((off + (at + k) as u64, piece[k]));
                }
            }
        });
        first
    }

    fn set(&mut self, off: u64, data: &[u8]) {
        self.each_mut(off, data.len() as u64, |piece, at| {
            let n = piece.len();
            piece.copy_from_slice(&data[at..at + n]);
        });
    }

    fn zero(&mut self, off: u64, len: u64) {
        self.each_mut(off, len, |piece, _| piece.fill(0));
    }
}

// ---------------------------------------------------------------- client

/// One reply header as read from the wire.
#[derive(Debug, Clone, Copy)]
enum Hdr {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        len: u32,
    },
}

/// A minimal blocking NBD client whose failures are errors, not panics (a
/// thread that fails tells the others to stop and reports what it saw).
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
    structured: bool,
    meta_id: u32,
    /// The advertised maximum payload: a larger DF READ gets EOVERFLOW.
    max_payload: u64,
    cookie: u64,
    sendbuf: Vec<u8>,
    /// Scratch for read payloads.
    buf: Vec<u8>,
}

impl Client {
    /// Handshake (on the calling thread; it panics on any surprise).
    fn connect(addr: SocketAddr, structured: bool, size: u64, id: u64) -> Client {
        let mut raw = Raw::handshake(addr);
        let mut meta_id = u32::MAX;
        if structured {
            let sr = raw.opt(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(sr.last().unwrap().kind, REP_ACK, "structured replies");
            let mc = raw.opt(OPT_SET_META_CONTEXT, &meta_data(&["base:allocation"]));
            assert_eq!(mc.last().unwrap().kind, REP_ACK, "meta context: {mc:?}");
            let ctx = mc
                .iter()
                .find(|r| r.kind == REP_META_CONTEXT)
                .expect("base:allocation selected");
            assert_eq!(&ctx.data[4..], b"base:allocation", "context name");
            meta_id = be32(&ctx.data, 0);
        }
        // GO asking for the block sizes: the limits the test must respect.
        let reps = raw.opt(OPT_GO, &go_data(&[INFO_BLOCK_SIZE]));
        assert_eq!(reps.last().unwrap().kind, REP_ACK, "GO answered {reps:?}");
        let info = |t: u16| {
            reps.iter()
                .find(|r| r.kind == REP_INFO && be16(&r.data, 0) == t)
                .unwrap_or_else(|| panic!("no NBD_INFO type {t} before the ACK: {reps:?}"))
        };
        let export = info(INFO_EXPORT);
        let (got, flags) = (be64(&export.data, 2), be16(&export.data, 10));
        assert_eq!(got, size, "export size");
        let bs = info(INFO_BLOCK_SIZE);
        assert_eq!(bs.data.len(), 14, "NBD_INFO_BLOCK_SIZE length");
        let (min, max_payload) = (be32(&bs.data, 2), be32(&bs.data, 10) as u64);
        // The test sends requests at any byte offset, and READs and WRITEs
        // of up to BIG_READ bytes.
        assert_eq!(min, 1, "minimum block size");
        assert!(max_payload >= BIG_READ, "maximum payload {max_payload}");
        for (bit, what) in [(5, "TRIM"), (6, "WRITE_ZEROES"), (11, "FAST_ZERO")] {
            assert!(flags & (1 << bit) != 0, "server does not offer {what}");
        }
        let s = raw.s;
        Client {
            r: BufReader::with_capacity(64 * 1024, s.try_clone().expect("clone socket")),
            w: s,
            structured,
            meta_id,
            max_payload,
            cookie: id << 40,
            sendbuf: Vec::with_capacity(MAX_OP as usize + 28),
            buf: Vec::with_capacity(MAX_OP as usize),
        }
    }

    fn send(&mut self, cmd: u16, flags: u16, off: u64, len: u32, payload: &[u8]) -> Res<u64> {
        self.cookie += 1;
        self.sendbuf.clear();
        self.sendbuf
            .extend_from_slice(&request(cmd, flags, self.cookie, off, len));
        self.sendbuf.extend_from_slice(payload);
        self.w
            .write_all(&self.sendbuf)
            .map_err(|e| format!("sending command {cmd} {off}+{len}: {e}"))?;
        Ok(self.cookie)
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Res<()> {
        self.r
            .read_exact(buf)
            .map_err(|e| format!("reading {what}: {e}"))
    }

    fn u64(&mut self, what: &str) -> Res<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }

    fn hdr(&mut self, cookie: u64) -> Res<Hdr> {
        let mut m = [0u8; 4];
        self.read_exact(&mut m, "reply magic")?;
        let h = match u32::from_be_bytes(m) {
            SIMPLE_MAGIC => {
                let mut r = [0u8; 12];
                self.read_exact(&mut r, "simple reply")?;
                Hdr::Simple {
                    error: be32(&r, 0),
                    cookie: be64(&r, 4),
                }
            }
            CHUNK_MAGIC if self.structured => {
                let mut h = [0u8; 16];
                self.read_exact(&mut h, "chunk header")?;
                Hdr::Chunk {
                    flags: be16(&h, 0),
                    kind: be16(&h, 2),
                    cookie: be64(&h, 4),
                    len: be32(&h, 12),
                }
            }
            other => return Err(format!("bad reply magic {other:#010x}")),
        };
        let c = match h {
            Hdr::Simple { cookie, .. } | Hdr::Chunk { cookie, .. } => cookie,
        };
        if c != cookie {
            return Err(format!("reply for cookie {c:#x}, expected {cookie:#x}"));
        }
        Ok(h)
    }

    /// Reads an error chunk's payload (the header is read); returns the error.
    fn error_chunk(&mut self, flags: u16, kind: u16, len: u32) -> Res<u32> {
        if flags & REPLY_DONE == 0 {
            return Err("error chunk without the DONE flag".into());
        }
        let min = if kind == TYPE_ERROR_OFFSET { 14 } else { 6 };
        if len < min || len > 8192 {
            return Err(format!("error chunk of {len} bytes"));
        }
        let mut p = vec![0u8; len as usize];
        self.read_exact(&mut p, "error chunk")?;
        let msg_len = be16(&p, 4) as u32;
        if msg_len + min != len {
            return Err(format!(
                "error chunk of {len} bytes with a {msg_len}-byte message"
            ));
        }
        let error = be32(&p, 0);
        if error == 0 {
            return Err("error chunk with error 0".into());
        }
        Ok(error)
    }

    /// The outcome of a request without data in its reply: 0 or the error.
    fn status(&mut self, cookie: u64) -> Res<u32> {
        match self.hdr(cookie)? {
            Hdr::Simple { error, .. } => Ok(error),
            Hdr::Chunk {
                flags,
                kind: kind @ (TYPE_ERROR | TYPE_ERROR_OFFSET),
                len,
                ..
            } => self.error_chunk(flags, kind, len),
            Hdr::Chunk {
                flags: REPLY_DONE,
                kind: TYPE_NONE,
                len: 0,
                ..
            } => Ok(0),
            h => Err(format!("unexpected reply {h:?}")),
        }
    }
}

// ---------------------------------------------------------------- statistics

/// What the threads counted; one slot per name in [`STAT_NAMES`].
#[derive(Debug, Clone, Default)]
struct Stats([u64; STAT_NAMES.len()]);

const STAT_NAMES: [&str; 21] = [
    "read",
    "read_df",
    "read_big",
    "write",
    "write_zero_data",
    "trim",
    "write_zeroes",
    "write_zeroes_no_hole",
    "write_zeroes_fast",
    "flush",
    "cache",
    "block_status",
    "block_status_req_one",
    "fua",
    "invalid",
    "read_bytes",
    "write_bytes",
    "read_hole_chunks",
    "read_data_chunks",
    "extents",
    "zero_extents",
];

#[derive(Clone, Copy)]
enum S {
    Read,
    ReadDf,
    ReadBig,
    Write,
    WriteZeroData,
    Trim,
    Zeroes,
    ZeroesNoHole,
    ZeroesFast,
    Flush,
    Cache,
    BlockStatus,
    BlockStatusOne,
    Fua,
    Invalid,
    ReadBytes,
    WriteBytes,
    HoleChunks,
    DataChunks,
    Extents,
    ZeroExtents,
}

impl Stats {
    fn add(&mut self, s: S, n: u64) {
        self.0[s as usize] += n;
    }

    fn get(&self, s: S) -> u64 {
        self.0[s as usize]
    }

    fn merge(&mut self, o: &Stats) {
        for (a, b) in self.0.iter_mut().zip(o.0.iter()) {
            *a += b;
        }
    }

    /// Requests sent (the byte and chunk counters are not requests).
    fn ops(&self) -> u64 {
        [
            S::Read,
            S::Write,
            S::Trim,
            S::Zeroes,
            S::Flush,
            S::Cache,
            S::BlockStatus,
            S::Invalid,
        ]
        .iter()
        .map(|&s| self.get(s))
        .sum()
    }
}

// ---------------------------------------------------------------- operations

/// One client thread's world.
struct Ctx<'a> {
    model: &'a Model,
    c: Client,
    rng: Rng,
    st: Stats,
    big: &'a AtomicUsize,
    invalid: [u64; INVALID_KINDS],
}

const INVALID_KINDS: usize = 16;

/// An error code as a name, for messages.
fn ename(e: u32) -> String {
    match e {
        0 => "success".into(),
        EINVAL => "EINVAL".into(),
        ENOSPC => "ENOSPC".into(),
        EOVERFLOW => "EOVERFLOW".into(),
        EPERM => "EPERM".into(),
        EIO => "EIO".into(),
        e => format!("errno {e}"),
    }
}

impl Ctx<'_> {
    fn size(&self) -> u64 {
        self.model.size
    }

    /// A random range: offsets and lengths 4 KiB-aligned, 512-aligned or
    /// arbitrary; a quarter of them in the hot first MiB; clipped to the image.
    fn range(&mut self, max_len: u64) -> (u64, u64) {
        let size = self.size();
        let span = if self.rng.below(4) == 0 {
            HOT.min(size)
        } else {
            size
        };
        let align = match self.rng.below(10) {
            0..=3 => BLOCK,
            4..=6 => 512,
            _ => 1,
        };
        let len = match self.rng.below(20) {
            0 => 0,
            1..=9 => 1 + self.rng.below(BLOCK * 2),
            10..=16 => 1 + self.rng.below((max_len / 2).max(1)),
            _ => 1 + self.rng.below(max_len),
        };
        let len = (len.div_ceil(align) * align).min(max_len);
        let off = self.rng.below(span) / align * align;
        (off, len.min(size - off))
    }

    fn fua(&mut self) -> u16 {
        if self.rng.below(10) == 0 {
            self.st.add(S::Fua, 1);
            FLAG_FUA
        } else {
            0
        }
    }

    fn one(&mut self) -> Res<()> {
        match self.rng.below(1000) {
            0..=299 => {
                let (off, len) = self.range(MAX_OP);
                self.read(off, len, false)
            }
            300..=304 => self.big_read(),
            305..=599 => self.write(),
            600..=679 => {
                let (off, len) = self.range(MAX_RANGE_OP);
                let flags = self.fua();
                self.trim(off, len, flags)
            }
            680..=779 => self.write_zeroes(),
            780..=809 => self.flush(),
            810..=829 => self.cache(),
            830..=979 if self.c.structured => self.block_status(),
            830..=979 => {
                let (off, len) = self.range(MAX_OP);
                self.read(off, len, false)
            }
            _ => self.invalid(),
        }
    }

    fn read(&mut self, off: u64, len: u64, big: bool) -> Res<()> {
        let df = self.c.structured && !big && self.rng.below(5) == 0;
        let flags = if df { FLAG_DF } else { 0 };
        let locked = self.model.lock(off, len);
        let cookie = self.c.send(CMD_READ, flags, off, len as u32, &[])?;
        let what = format!("READ {off}+{len} flags {flags:#x} (cookie {cookie:#x})");
        self.st.add(S::Read, 1);
        self.st.add(S::ReadBytes, len);
        if df {
            self.st.add(S::ReadDf, 1);
        }
        if !self.c.structured {
            let error = match self.c.hdr(cookie)? {
                Hdr::Simple { error, .. } => error,
                h => return Err(format!("{what}: simple connection got {h:?}")),
            };
            if error != 0 {
                return Err(format!("{what} failed with {}", ename(error)));
            }
            let mut buf = std::mem::take(&mut self.c.buf);
            buf.resize(len as usize, 0);
            let r = self.c.read_exact(&mut buf, "read data");
            let diff = locked.differs(off, &buf);
            self.c.buf = buf;
            r?;
            if let Some((at, got, want)) = diff {
                return Err(format!(
                    "{what}: byte {at} reads {got:#04x}, the model has {want:#04x}"
                ));
            }
            return Ok(());
        }
        // Structured: data and hole chunks, in any order, covering the range once.
        let end = off + len;
        let mut seen: Vec<(u64, u64)> = Vec::new();
        let (mut data_chunks, mut hole_chunks) = (0u64, 0u64);
        loop {
            let (cflags, kind, clen) = match self.c.hdr(cookie)? {
                Hdr::Chunk {
                    flags, kind, len, ..
                } => (flags, kind, len as u64),
                h => {
                    return Err(format!(
                        "{what}: a simple reply to a structured READ: {h:?}"
                    ))
                }
            };
            match kind {
                TYPE_OFFSET_DATA => {
                    if clen < 8 || clen - 8 > len {
                        return Err(format!("{what}: data chunk of {clen} bytes"));
                    }
                    let at = self.c.u64("data chunk offset")?;
                    let n = clen - 8;
                    if at < off || at + n > end {
                        return Err(format!("{what}: data chunk {at}+{n} outside the request"));
                    }
                    let mut buf = std::mem::take(&mut self.c.buf);
                    buf.resize(n as usize, 0);
                    let r = self.c.read_exact(&mut buf, "data chunk");
                    let diff = locked.differs(at, &buf);
                    self.c.buf = buf;
                    r?;
                    if let Some((b, got, want)) = diff {
                        return Err(format!(
                            "{what}: byte {b} reads {got:#04x} (data chunk {at}+{n}), \
                             the model has {want:#04x}"
                        ));
                    }
                    seen.push((at, n));
                    data_chunks += 1;
                }
                TYPE_OFFSET_HOLE => {
                    if clen != 12 {
                        return Err(format!("{what}: hole chunk of {clen} bytes"));
                    }
                    let at = self.c.u64("hole chunk offset")?;
                    let mut n = [0u8; 4];
                    self.c.read_exact(&mut n, "hole chunk size")?;
                    let n = u32::from_be_bytes(n) as u64;
                    if n == 0 || at < off || at + n > end {
                        return Err(format!("{what}: hole chunk {at}+{n} outside the request"));
                    }
                    if let Some((b, v)) = locked.nonzero(at, n) {
                        return Err(format!(
                            "{what}: hole chunk {at}+{n} but the model has {v:#04x} at {b}"
                        ));
                    }
                    seen.push((at, n));
                    hole_chunks += 1;
                }
                TYPE_NONE => {
                    if clen != 0 || cflags & REPLY_DONE == 0 {
                        return Err(format!(
                            "{what}: NONE chunk of {clen} bytes, flags {cflags}"
                        ));
                    }
                }
                TYPE_ERROR | TYPE_ERROR_OFFSET => {
                    let e = self.c.error_chunk(cflags, kind, clen as u32)?;
                    return Err(format!("{what} failed with {}", ename(e)));
                }
                k => return Err(format!("{what}: unexpected chunk type {k}")),
            }
            if cflags & REPLY_DONE != 0 {
                break;
            }
        }
        seen.sort_unstable();
        let mut pos = off;
        for &(at, n) in &seen {
            if at != pos {
                return Err(format!(
                    "{what}: chunks {seen:?} leave a gap or overlap at {pos}"
                ));
            }
            pos += n;
        }
        if pos != end {
            return Err(format!("{what}: chunks {seen:?} end at {pos}"));
        }
        if df && (hole_chunks > 0 || data_chunks > 1) {
            return Err(format!(
                "{what}: DF read sent {data_chunks} data and {hole_chunks} hole chunks"
            ));
        }
        self.st.add(S::DataChunks, data_chunks);
        self.st.add(S::HoleChunks, hole_chunks);
        Ok(())
    }

    /// A READ over 1 MiB (streamed by the server); a few at a time at most.
    fn big_read(&mut self) -> Res<()> {
        let size = self.size();
        if self.big.fetch_add(1, Relaxed) >= BIG_AT_ONCE || size < BIG_READ {
            self.big.fetch_sub(1, Relaxed);
            let (off, len) = self.range(MAX_OP);
            return self.read(off, len, false);
        }
        let len = MIB + self.rng.below(BIG_READ - MIB + 1);
        let off = self.rng.below(size - len + 1);
        self.st.add(S::ReadBig, 1);
        let r = self.read(off, len, true);
        self.c.buf = Vec::with_capacity(MAX_OP as usize);
        self.big.fetch_sub(1, Relaxed);
        r
    }

    /// Random data, all zeroes, or data with some zero blocks (the server
    /// skips zero blocks that land on holes).
    fn payload(&mut self, off: u64, len: u64) -> Vec<u8> {
        let mut data = self.rng.bytes(len as usize);
        match self.rng.below(20) {
            0..=2 => {
                data.fill(0);
                self.st.add(S::WriteZeroData, 1);
            }
            3..=5 => {
                let mut b = off.div_ceil(BLOCK) * BLOCK;
                while b + BLOCK <= off + len {
                    if self.rng.below(2) == 0 {
                        let s = (b - off) as usize;
                        data[s..s + BLOCK as usize].fill(0);
                    }
                    b += BLOCK;
                }
                self.st.add(S::WriteZeroData, 1);
            }
            _ => {}
        }
        data
    }

    fn write(&mut self) -> Res<()> {
        let (off, len) = self.range(MAX_OP);
        let flags = self.fua();
        let data = self.payload(off, len);
        let mut locked = self.model.lock(off, len);
        let cookie = self.c.send(CMD_WRITE, flags, off, len as u32, &data)?;
        self.st.add(S::Write, 1);
        self.st.add(S::WriteBytes, len);
        match self.c.status(cookie)? {
            0 => {
                locked.set(off, &data);
                Ok(())
            }
            e => Err(format!(
                "WRITE {off}+{len} flags {flags:#x} failed with {}",
                ename(e)
            )),
        }
    }

    fn trim(&mut self, off: u64, len: u64, flags: u16) -> Res<()> {
        let mut locked = self.model.lock(off, len);
        let cookie = self.c.send(CMD_TRIM, flags, off, len as u32, &[])?;
        self.st.add(S::Trim, 1);
        match self.c.status(cookie)? {
            0 => {
                locked.zero(off, len);
                Ok(())
            }
            e => Err(format!("TRIM {off}+{len} failed with {}", ename(e))),
        }
    }

    fn write_zeroes(&mut self) -> Res<()> {
        let (off, len) = self.range(MAX_RANGE_OP);
        let mut flags = self.fua();
        if self.rng.below(2) == 0 {
            flags |= FLAG_NO_HOLE;
            self.st.add(S::ZeroesNoHole, 1);
        }
        if self.rng.below(4) == 0 {
            flags |= FLAG_FAST_ZERO;
            self.st.add(S::ZeroesFast, 1);
        }
        let mut locked = self.model.lock(off, len);
        let cookie = self.c.send(CMD_WRITE_ZEROES, flags, off, len as u32, &[])?;
        self.st.add(S::Zeroes, 1);
        match self.c.status(cookie)? {
            0 => {
                locked.zero(off, len);
                Ok(())
            }
            e => Err(format!(
                "WRITE_ZEROES {off}+{len} flags {flags:#x} failed with {}",
                ename(e)
            )),
        }
    }

    fn flush(&mut self) -> Res<()> {
        let cookie = self.c.send(CMD_FLUSH, 0, 0, 0, &[])?;
        self.st.add(S::Flush, 1);
        match self.c.status(cookie)? {
            0 => Ok(()),
            e => Err(format!("FLUSH failed with {}", ename(e))),
        }
    }

    fn cache(&mut self) -> Res<()> {
        let (off, len) = self.range(MAX_RANGE_OP);
        let cookie = self.c.send(CMD_CACHE, 0, off, len as u32, &[])?;
        self.st.add(S::Cache, 1);
        match self.c.status(cookie)? {
            0 => Ok(()),
            e => Err(format!("CACHE {off}+{len} failed with {}", ename(e))),
        }
    }

    fn block_status(&mut self) -> Res<()> {
        let (off, len) = self.range(MAX_RANGE_OP);
        let len = len.max(1).min(self.size() - off);
        let one = self.rng.below(5) == 0;
        let flags = if one { FLAG_REQ_ONE } else { 0 };
        let locked = self.model.lock(off, len);
        let cookie = self.c.send(CMD_BLOCK_STATUS, flags, off, len as u32, &[])?;
        let what = format!("BLOCK_STATUS {off}+{len} flags {flags:#x} (cookie {cookie:#x})");
        self.st.add(S::BlockStatus, 1);
        if one {
            self.st.add(S::BlockStatusOne, 1);
        }
        let mut extents: Option<Vec<(u64, u32)>> = None;
        loop {
            let (cflags, kind, clen) = match self.c.hdr(cookie)? {
                Hdr::Chunk {
                    flags, kind, len, ..
                } => (flags, kind, len),
                h => return Err(format!("{what}: simple reply {h:?}")),
            };
            match kind {
                TYPE_BLOCK_STATUS => {
                    if extents.is_some() {
                        return Err(format!("{what}: two block status chunks"));
                    }
                    if clen < 12 || (clen - 4) % 8 != 0 || clen > 4 + 8 * 20000 {
                        return Err(format!("{what}: block status chunk of {clen} bytes"));
                    }
                    let mut p = vec![0u8; clen as usize];
                    self.c.read_exact(&mut p, "block status chunk")?;
                    if be32(&p, 0) != self.c.meta_id {
                        return Err(format!(
                            "{what}: context id {} (negotiated {})",
                            be32(&p, 0),
                            self.c.meta_id
                        ));
                    }
                    extents = Some(
                        p[4..]
                            .chunks(8)
                            .map(|d| (be32(d, 0) as u64, be32(d, 4)))
                            .collect(),
                    );
                }
                TYPE_NONE if clen == 0 => {}
                TYPE_ERROR | TYPE_ERROR_OFFSET => {
                    let e = self.c.error_chunk(cflags, kind, clen)?;
                    return Err(format!("{what} failed with {}", ename(e)));
                }
                k => return Err(format!("{what}: unexpected chunk type {k} ({clen} bytes)")),
            }
            if cflags & REPLY_DONE != 0 {
                break;
            }
        }
        let ext = extents.ok_or_else(|| format!("{what}: no block status chunk"))?;
        if one && ext.len() != 1 {
            return Err(format!(
                "{what}: REQ_ONE answered with {} extents",
                ext.len()
            ));
        }
        // Extents follow each other from the start of the range; they cover
        // it exactly (the server clips to the request and sends at most 16 Ki
        // descriptors, far more than a 1 MiB range has blocks); with REQ_ONE
        // the single extent may stop short.
        let mut pos = off;
        for &(elen, eflags) in &ext {
            if elen == 0 || eflags & !(STATE_HOLE | STATE_ZERO) != 0 {
                return Err(format!(
                    "{what}: bad extent ({elen}, {eflags:#x}) in {ext:?}"
                ));
            }
            if pos + elen > off + len {
                return Err(format!("{what}: extents {ext:?} go past the range"));
            }
            if eflags & STATE_ZERO != 0 {
                self.st.add(S::ZeroExtents, 1);
                if let Some((at, v)) = locked.nonzero(pos, elen) {
                    return Err(format!(
                        "{what}: extent {pos}+{elen} is STATE_ZERO (flags {eflags:#x}) \
                         but the model has {v:#04x} at {at}; extents {ext:?}"
                    ));
                }
            }
            pos += elen;
        }
        if pos != off + len && !(one && pos < off + len) {
            return Err(format!(
                "{what}: extents {ext:?} cover up to {pos}, not {}",
                off + len
            ));
        }
        self.st.add(S::Extents, ext.len() as u64);
        Ok(())
    }

    /// A request that is invalid on purpose: its exact error, then a checked
    /// READ to show the connection is still in step.
    fn invalid(&mut self) -> Res<()> {
        let size = self.size();
        let kind = self.rng.below(INVALID_KINDS as u64) as usize;
        // A range reaching past the end of the image (it may start past it).
        let past = {
            let off = size - self.rng.below(8192).min(size);
            let off = if self.rng.below(4) == 0 {
                size + self.rng.below(1 << 20)
            } else {
                off
            };
            let len = (size.saturating_sub(off)) + 1 + self.rng.below(8192);
            (off, len)
        };
        let (ioff, ilen) = self.range(16 * KIB);
        let s = self.c.structured;
        // (command, flags, offset, length, payload, expected error, what)
        let (cmd, flags, off, len, payload, want, what): (u16, u16, u64, u64, usize, u32, &str) =
            match kind {
                0 => (CMD_READ, 0, past.0, past.1, 0, EINVAL, "READ past the end"),
                1 => (
                    CMD_WRITE,
                    0,
                    past.0,
                    past.1,
                    past.1 as usize,
                    ENOSPC,
                    "WRITE past the end",
                ),
                2 => (CMD_TRIM, 0, past.0, past.1, 0, EINVAL, "TRIM past the end"),
                3 => (
                    CMD_WRITE_ZEROES,
                    FLAG_NO_HOLE,
                    past.0,
                    past.1,
                    0,
                    ENOSPC,
                    "WRITE_ZEROES past the end",
                ),
                4 => (
                    CMD_CACHE,
                    0,
                    past.0,
                    past.1,
                    0,
                    EINVAL,
                    "CACHE past the end",
                ),
                5 => (
                    CMD_BLOCK_STATUS,
                    0,
                    past.0,
                    past.1,
                    0,
                    EINVAL,
                    "BLOCK_STATUS past the end (or unnegotiated)",
                ),
                6 => (
                    CMD_READ,
                    0,
                    u64::MAX - self.rng.below(4096),
                    8192,
                    0,
                    EINVAL,
                    "READ whose end overflows",
                ),
                7 => (
                    CMD_READ,
                    FLAG_NO_HOLE,
                    ioff,
                    ilen,
                    0,
                    EINVAL,
                    "READ with NO_HOLE",
                ),
                8 => (
                    CMD_WRITE,
                    FLAG_REQ_ONE,
                    ioff,
                    ilen,
                    ilen as usize,
                    EINVAL,
                    "WRITE with REQ_ONE",
                ),
                9 => (
                    CMD_TRIM,
                    FLAG_NO_HOLE,
                    ioff,
                    ilen,
                    0,
                    EINVAL,
                    "TRIM with NO_HOLE",
                ),
                10 => (CMD_FLUSH, FLAG_DF, 0, 0, 0, EINVAL, "FLUSH with DF"),
                11 => (0x2a, 0, ioff, ilen, 0, EINVAL, "unknown command 42"),
                12 => (
                    CMD_BLOCK_STATUS,
                    0,
                    ioff,
                    0,
                    0,
                    EINVAL,
                    "BLOCK_STATUS of nothing (or unnegotiated)",
                ),
                13 if s => (
                    CMD_READ,
                    FLAG_DF,
                    0,
                    self.c.max_payload + 1 + self.rng.below(MIB),
                    0,
                    EOVERFLOW,
                    "DF READ too large to send whole",
                ),
                13 => (
                    CMD_READ,
                    FLAG_DF,
                    ioff,
                    ilen,
                    0,
                    EINVAL,
                    "DF READ without structured replies",
                ),
                14 => (
                    CMD_WRITE_ZEROES,
                    FLAG_DF,
                    ioff,
                    ilen,
                    0,
                    EINVAL,
                    "WRITE_ZEROES with DF",
                ),
                _ => (
                    CMD_WRITE,
                    FLAG_FAST_ZERO,
                    ioff,
                    ilen,
                    ilen as usize,
                    EINVAL,
                    "WRITE with FAST_ZERO",
                ),
            };
        self.invalid[kind] += 1;
        self.st.add(S::Invalid, 1);
        // Lock what a modifying request names inside the image: if the
        // server changed it anyway, later reads and the final comparison see it.
        let modifies = [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES].contains(&cmd);
        let _locked = self.model.lock(off, if modifies { len } else { 0 });
        let data = if payload > 0 {
            self.rng.bytes(payload)
        } else {
            Vec::new()
        };
        let cookie = self.c.send(cmd, flags, off, len as u32, &data)?;
        let what = format!("{what} ({off}+{len}, flags {flags:#x}, cookie {cookie:#x})");
        let got = self.c.status(cookie).map_err(|e| format!("{what}: {e}"))?;
        if got != want {
            return Err(format!(
                "{what}: answered {}, expected {}",
                ename(got),
                ename(want)
            ));
        }
        drop(_locked);
        // Still in step: a small checked read.
        let off = self.rng.below(size - 512);
        self.read(off, 512, false)
            .map_err(|e| format!("after {what}: {e}"))
    }
}

/// One client thread: random operations until `deadline` or `stop`.
fn client_thread(
    i: usize,
    c: Client,
    model: &Model,
    seed: u64,
    deadline: Instant,
    stop: &AtomicBool,
    big: &AtomicUsize,
) -> (Stats, [u64; INVALID_KINDS], Res<()>) {
    let mut ctx = Ctx {
        model,
        c,
        rng: Rng::new(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        st: Stats::default(),
        big,
        invalid: [0; INVALID_KINDS],
    };
    let mut r = Ok(());
    while !stop.load(Relaxed) && Instant::now() < deadline {
        if let Err(e) = ctx.one() {
            stop.store(true, Relaxed);
            r = Err(format!(
                "connection {i} (structured: {}): {e}",
                ctx.c.structured
            ));
            break;
        }
    }
    if r.is_ok() {
        let _ = ctx.c.send(CMD_DISC, 0, 0, 0, &[]);
    }
    let _ = ctx.c.w.shutdown(std::net::Shutdown::Both);
    (ctx.st, ctx.invalid, r)
}

// ---------------------------------------------------------------- setup

/// A `size`-byte image: random data, allocated zeroes and holes in runs of
/// 4 KiB to 1 MiB, some runs starting or ending off a block boundary.
fn create_image(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    let mut rng = Rng::new(seed);
    let mut pos = 0u64;
    while pos < size {
        let mut n = (1 + rng.below(256)) * BLOCK;
        if rng.below(4) == 0 {
            n += rng.below(BLOCK);
        }
        let n = n.min(size - pos);
        match rng.below(10) {
            0..=5 => {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&rng.bytes(n as usize), pos)
                    .expect("write image");
            }
            6 => {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&vec![0u8; n as usize], pos)
                    .expect("write image");
            }
            _ => {} // a hole
        }
        pos += n;
    }
    f.sync_all().expect("sync image");
}

/// A `/proc/PID/status` field (e.g. "VmHWM").
fn proc_status(pid: &str, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(str::trim))
        .unwrap_or("?")
        .to_owned()
}

fn kib_of(s: &str) -> Option<u64> {
    s.strip_suffix(" kB")?.trim().parse().ok()
}

#[test]
fn soak_against_a_model() {
    let secs = env_u64("FLEXNBD_SOAK_SECS", 10);
    let conns = env_u64("FLEXNBD_SOAK_CONNS", 256).max(1) as usize;
    let size = env_u64("FLEXNBD_SOAK_MIB", 64).max(4) * MIB;
    let seed = env_u64(
        "FLEXNBD_SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let dir = match std::env::var_os("FLEXNBD_SOAK_DIR") {
        Some(d) => tempfile::Builder::new()
            .prefix("flexnbd-soak-")
            .tempdir_in(d)
            .expect("temp dir in FLEXNBD_SOAK_DIR"),
        None => big_tempdir(2 * size),
    };
    let img = dir.path().join("soak.img");
    create_image(&img, size, seed);
    let model = Model::new(&read_file(&img));
    eprintln!(
        "soak: seed {seed}, {conns} connections, {secs} s, {} MiB image in {} \
         ({} MiB allocated)",
        size / MIB,
        dir.path().display(),
        allocated_bytes(&img) / MIB
    );

    let mut srv = Serve::tcp(&img).start();
    let addr = srv.addr();
    // Handshakes one after the other (no accept backlog to overflow); three
    // connections in four use structured replies and base:allocation.
    let clients: Vec<Client> = (0..conns)
        .map(|i| Client::connect(addr, i % 4 != 3, size, i as u64 + 1))
        .collect();

    let stop = AtomicBool::new(false);
    let big = AtomicUsize::new(0);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let results: Vec<(Stats, [u64; INVALID_KINDS], Res<()>)> = std::thread::scope(|sc| {
        let handles: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let (model, stop, big) = (&model, &stop, &big);
                std::thread::Builder::new()
                    .name(format!("soak-{i}"))
                    .stack_size(STACK)
                    .spawn_scoped(sc, move || {
                        client_thread(i, c, model, seed, deadline, stop, big)
                    })
                    .expect("spawn client thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread panicked"))
            .collect()
    });
    let elapsed = started.elapsed();
    assert_eq!(results.len(), conns, "every client thread joined");

    let mut st = Stats::default();
    let mut invalid = [0u64; INVALID_KINDS];
    let mut failures = Vec::new();
    for (s, inv, r) in &results {
        st.merge(s);
        for (a, b) in invalid.iter_mut().zip(inv) {
            *a += b;
        }
        if let Err(e) = r {
            failures.push(e.clone());
        }
    }
    let ops = st.ops();
    eprintln!(
        "soak: {ops} requests in {:.1} s: {:.0} requests/s",
        elapsed.as_secs_f64(),
        ops as f64 / elapsed.as_secs_f64()
    );
    for (name, n) in STAT_NAMES.iter().zip(st.0.iter()) {
        eprintln!("soak:   {name:<22} {n}");
    }
    eprintln!("soak:   invalid by kind {invalid:?}");
    let pid = srv.pid().to_string();
    let me = std::process::id().to_string();
    eprintln!(
        "soak: server peak RSS {}, threads now {}; test process peak RSS {}",
        proc_status(&pid, "VmHWM"),
        proc_status(&pid, "Threads"),
        proc_status(&me, "VmHWM")
    );
    assert!(
        failures.is_empty(),
        "{} of {conns} connections failed; first: {}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n")
    );
    srv.assert_alive();
    srv.stop();

    // The image file, byte for byte.
    let got = read_file(&img);
    assert_eq!(got.len() as u64, size, "image size");
    for (b, (file, want)) in got.chunks(BLOCK as usize).zip(&model.blocks).enumerate() {
        let want = want.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, g, w)) = first_difference(file, &want) {
            panic!(
                "the image differs from the model at byte {} (block {b}): file {g:?}, \
                 model {w:?}",
                b as u64 * BLOCK + at as u64
            );
        }
    }
    drop(got);
    eprintln!("soak: image equals the model ({} MiB)", size / MIB);

    // The run did what it claims (these fail when a kind of request never
    // got through, e.g. after a change of the weights above).
    for (s, what) in [
        (S::Read, "reads"),
        (S::Write, "writes"),
        (S::Trim, "trims"),
        (S::ZeroesNoHole, "NO_HOLE zeroes"),
        (S::Flush, "flushes"),
        (S::HoleChunks, "hole chunks"),
        (S::ZeroExtents, "STATE_ZERO extents"),
        (S::Invalid, "invalid requests"),
    ] {
        assert!(st.get(s) > 0, "the soak checked no {what}");
    }
    let rss = kib_of(&proc_status(&me, "VmHWM")).unwrap_or(0);
    // The model (the image's size) plus bounded buffers per connection.
    let bound = 2 * size / KIB + conns as u64 * 1024 + 256 * 1024;
    assert!(
        rss <= bound,
        "test process peak RSS {rss} KiB is above {bound} KiB"
    );
}
