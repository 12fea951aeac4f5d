//! Durability proven, not assumed.
//!
//! 1. `flexnbd serve` runs under `strace`, driven by writers that send FUA
//!    WRITEs, plain WRITEs and FLUSHes with distinct cookies. The trace then
//!    shows, for every reply the clients received, the system call that sent
//!    it, and for every write the system call that wrote its data (each
//!    write's data names it). Checked: each FUA write's reply was sent after a
//!    `pwritev2(RWF_DSYNC)` of that write completed, or after an
//!    `fdatasync`/`fsync` of the image that started once the write's data was
//!    written; each FLUSH's reply was sent after an `fdatasync`/`fsync` that
//!    started once every write acknowledged before the FLUSH was sent had
//!    been written. (That condition also covers a FLUSH the server answers
//!    without a sync of its own because one that started after those writes
//!    already completed.) A synthetic trace in which a reply precedes its sync
//!    shows that the checker rejects what it must.
//!
//!    Order comes from the trace itself. With `-f`, strace prints a whole line
//!    only when no other traced event came between a call's entry and its exit;
//!    otherwise the call is split into `<unfinished ...>` (its entry) and
//!    `<... resumed>` (its exit). A traced thread cannot act between its exit
//!    stop and strace printing it, so "the sync's exit line comes before the
//!    reply's entry line" means the sync completed before the reply was sent.
//!
//! 2. SIGKILL at a random moment while writers have requests in flight; then
//!    every write acknowledged with FUA, and every write acknowledged before
//!    a FLUSH was sent that was then acknowledged, must be in the file,
//!    unless a later write to that block (issued after it) replaced it.
//!    This proves that acknowledgements are not given before the data is in
//!    the kernel (no write-back cache in the server that a crash loses) and
//!    that a crash in the middle of writes leaves no block holding anything
//!    but data written to it; it does not prove that the data reached stable
//!    storage, because a killed process loses nothing in the page cache (that
//!    is what the trace of part 1 shows). The server promises nothing about
//!    the atomicity of a write that was not acknowledged, so a block whose
//!    last write was in flight may hold a mix of that write and what was
//!    there before; such blocks are counted, not failed, as long as every
//!    16-byte piece comes from one of the writes that block may hold.

mod common;

use common::*;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

const BLOCK: u64 = 4096;
const FLAG_FUA: u16 = 1;

// ---------------------------------------------------------------- the writer

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    FuaWrite,
    Flush,
}

/// One request as the client saw it.
#[derive(Debug, Clone)]
struct Rec {
    kind: Kind,
    cookie: u64,
    /// Write id (what the data names); 0 for a FLUSH.
    wid: u64,
    block: u64,
    /// Global order (all connections): taken just before the request is
    /// sent, and just after its reply was read.
    sent_seq: u64,
    acked_seq: Option<u64>,
    /// Epoch seconds just before sending (to tell a FLUSH's own sync).
    sent_at: f64,
    error: Option<u32>,
}

impl Rec {
    fn ok(&self) -> bool {
        self.error == Some(0)
    }

    fn is_write(&self) -> bool {
        self.kind != Kind::Flush
    }
}

/// Shared by every connection of one run.
#[derive(Default)]
struct Counters {
    seq: AtomicU64,
    wid: AtomicU64,
    acked: AtomicU64,
    stop: AtomicBool,
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    conns: usize,
    qd: usize,
    blocks: u64,
    /// Requests per connection at most (then it drains and disconnects).
    ops: usize,
    fua_pct: u64,
    flush_pct: u64,
    seed: u64,
    limit: Duration,
}

#[derive(Default)]
struct ConnState {
    recs: Vec<Rec>,
    inflight: HashMap<u64, usize>,
    busy: HashSet<u64>,
    /// Why the connection ended, if it did.
    dead: Option<String>,
    /// The client sent DISC: the end of the stream is expected.
    closing: bool,
    /// A plain write was acknowledged since this connection's last FLUSH
    /// (so every FLUSH follows new writes).
    fresh: bool,
}

/// What one connection did.
struct ConnResult {
    recs: Vec<Rec>,
    /// An unexpected end (a failure, or the server's death).
    dead: Option<String>,
}

/// Writes to blocks `i, i + conns, i + 2 conns, ...` (so no two connections
/// write one block, and this one has at most one write per block in flight),
/// `qd` requests in flight, each write's data naming it ([`load_block`]).
fn writer_conn(addr: SocketAddr, i: usize, p: Plan, k: &Counters) -> ConnResult {
    let s = Raw::simple(addr).s;
    let mut ws = s.try_clone().expect("clone socket");
    let mut rs = s;
    let st = Mutex::new(ConnState::default());
    let cv = Condvar::new();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut b = [0u8; 16];
            loop {
                let r = rs.read_exact(&mut b);
                let seq = k.seq.fetch_add(1, SeqCst);
                let mut g = st.lock().unwrap();
                if let Err(e) = r {
                    if !g.closing || !g.inflight.is_empty() {
                        g.dead.get_or_insert(format!("reading a reply: {e}"));
                    }
                    g.closing = true;
                    cv.notify_all();
                    return;
                }
                if be32(&b, 0) != SIMPLE_MAGIC {
                    g.dead.get_or_insert(format!("bad reply {b:02x?}"));
                    cv.notify_all();
                    return;
                }
                let cookie = be64(&b, 8);
                let Some(idx) = g.inflight.remove(&cookie) else {
                    g.dead
                        .get_or_insert(format!("reply for unknown cookie {cookie:#x}"));
                    cv.notify_all();
                    return;
                };
                let (kind, block) = {
                    let r = &mut g.recs[idx];
                    r.acked_seq = Some(seq);
                    r.error = Some(be32(&b, 4));
                    (r.kind, r.block)
                };
                if kind != Kind::Flush {
                    g.busy.remove(&block);
                }
                if kind == Kind::Write && be32(&b, 4) == 0 {
                    g.fresh = true;
                }
                k.acked.fetch_add(1, SeqCst);
                cv.notify_all();
            }
        });
        let mut rng = Rng::new(p.seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let started = Instant::now();
        let per_conn = p.blocks / p.conns as u64;
        let mut n = 0u64;
        let mut buf = Vec::with_capacity(28 + BLOCK as usize);
        while (n as usize) < p.ops && !k.stop.load(SeqCst) && started.elapsed() < p.limit {
            let mut g = st.lock().unwrap();
            while g.inflight.len() >= p.qd && g.dead.is_none() && !k.stop.load(SeqCst) {
                g = cv.wait_timeout(g, Duration::from_millis(50)).unwrap().0;
            }
            if g.dead.is_some() || k.stop.load(SeqCst) {
                break;
            }
            let roll = rng.below(100);
            let kind = if roll < p.flush_pct && g.fresh {
                Kind::Flush
            } else if roll < p.flush_pct + p.fua_pct {
                Kind::FuaWrite
            } else {
                Kind::Write
            };
            let block = rng.below(per_conn) * p.conns as u64 + i as u64;
            if kind != Kind::Flush && g.busy.contains(&block) {
                continue;
            }
            let cookie = 0xc0de_0000_0000_0000 | ((i as u64) << 32) | n;
            let wid = match kind {
                Kind::Flush => {
                    g.fresh = false;
                    0
                }
                _ => {
                    g.busy.insert(block);
                    k.wid.fetch_add(1, SeqCst) + 1
                }
            };
            let idx = g.recs.len();
            g.recs.push(Rec {
                kind,
                cookie,
                wid,
                block,
                sent_seq: k.seq.fetch_add(1, SeqCst),
                acked_seq: None,
                sent_at: now_epoch(),
                error: None,
            });
            g.inflight.insert(cookie, idx);
            drop(g);
            buf.clear();
            match kind {
                Kind::Flush => buf.extend_from_slice(&request(CMD_FLUSH, 0, cookie, 0, 0)),
                _ => {
                    let flags = if kind == Kind::FuaWrite { FLAG_FUA } else { 0 };
                    let off = block * BLOCK;
                    buf.extend_from_slice(&request(CMD_WRITE, flags, cookie, off, BLOCK as u32));
                    buf.extend_from_slice(&load_block(wid, block));
                }
            }
            n += 1;
            if let Err(e) = ws.write_all(&buf) {
                st.lock()
                    .unwrap()
                    .dead
                    .get_or_insert(format!("sending a request: {e}"));
                break;
            }
        }
        // Drain, then disconnect (unless the connection is gone).
        let mut g = st.lock().unwrap();
        let deadline = Instant::now() + IO_TIMEOUT;
        while !g.inflight.is_empty() && g.dead.is_none() && Instant::now() < deadline {
            g = cv.wait_timeout(g, Duration::from_millis(50)).unwrap().0;
        }
        if g.dead.is_none() && !g.inflight.is_empty() {
            g.dead = Some(format!("{} replies missing", g.inflight.len()));
        }
        g.closing = true;
        drop(g);
        let _ = ws.write_all(&request(CMD_DISC, 0, 0, 0, 0));
        let _ = ws.shutdown(std::net::Shutdown::Write);
    });
    let st = st.into_inner().unwrap();
    ConnResult {
        recs: st.recs,
        dead: st.dead,
    }
}

/// Runs `p.conns` writers at once; returns every connection's records and
/// the reasons the ones that ended early ended.
fn run_writers(addr: SocketAddr, p: Plan, k: &Counters) -> (Vec<Rec>, Vec<String>) {
    let results: Vec<ConnResult> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..p.conns)
            .map(|i| sc.spawn(move || writer_conn(addr, i, p, k)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("writer thread panicked"))
            .collect()
    });
    let mut recs = Vec::new();
    let mut dead = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        recs.extend(r.recs);
        if let Some(d) = r.dead {
            dead.push(format!("connection {i}: {d}"));
        }
    }
    (recs, dead)
}

/// An image whose block b holds [`load_block`]`(0, b)` (write id 0: the
/// original), written and synced.
fn create_identified_image(path: &Path, blocks: u64) {
    let mut f = std::fs::File::create(path).expect("create image");
    for b in 0..blocks {
        f.write_all(&load_block(0, b)).expect("write image");
    }
    f.sync_all().expect("sync image");
}

// ---------------------------------------------------------------- strace log

/// One traced system call.
#[derive(Debug, Clone)]
struct Call {
    /// Log line (0-based) of its entry, and of its exit (the same unless split).
    line: usize,
    end_line: usize,
    ts: f64,
    end_ts: f64,
    name: String,
    args: Vec<String>,
    ret: Option<i64>,
}

fn bad(i: usize, line: &str, why: &str) -> String {
    format!("strace log line {}: {why}: {line}", i + 1)
}

/// `"PID TS rest"` (PID optional) → (pid, ts, rest).
fn leader(line: &str) -> Option<(u32, f64, &str)> {
    let (a, rest) = line.split_once(' ')?;
    let rest = rest.trim_start();
    let (pid, ts_s, rest) = if a.contains('.') {
        (0, a, rest)
    } else {
        let (b, rest2) = rest.split_once(' ')?;
        (a.parse().ok()?, b, rest2.trim_start())
    };
    Some((pid, ts_s.parse().ok()?, rest))
}

/// `"args) = ret"` → (args, ret).
fn args_and_ret(s: &str) -> Option<(&str, Option<i64>)> {
    let (a, r) = s.rsplit_once(" = ")?;
    let a = a.trim_end().strip_suffix(')')?;
    let ret = r.split_whitespace().next().and_then(|t| t.parse().ok());
    Some((a, ret))
}

/// Splits an argument list at its top-level commas (outside strings,
/// brackets and braces).
fn split_args(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut depth, mut quoted, mut esc) = (0i32, false, false);
    for ch in s.chars() {
        if quoted {
            cur.push(ch);
            match (esc, ch) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => quoted = false,
                _ => {}
            }
            continue;
        }
        match ch {
            '"' => quoted = true,
            '[' | '{' | '(' => depth += 1,
            ']' | '}' | ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(cur.trim().to_owned());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_owned());
    }
    out
}

/// Parses the whole log; lines that are not system calls (signals, exits)
/// are skipped.
fn parse_log(text: &str) -> Result<Vec<Call>, String> {
    let mut calls = Vec::new();
    // pid → (name, partial args, line, ts)
    let mut pending: HashMap<u32, (String, String, usize, f64)> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (pid, ts, rest) = leader(line).ok_or_else(|| bad(i, line, "no pid/timestamp"))?;
        if rest.starts_with("+++") || rest.starts_with("---") {
            continue;
        }
        if let Some(r) = rest.strip_prefix("<... ") {
            let (name, tail) = r
                .split_once(" resumed>")
                .ok_or_else(|| bad(i, line, "bad resumption"))?;
            let (pname, partial, pline, pts) = pending
                .remove(&pid)
                .ok_or_else(|| bad(i, line, "resumes nothing"))?;
            if pname != name {
                return Err(bad(
                    i,
                    line,
                    &format!("resumes {name}, {pname} was pending"),
                ));
            }
            let joined = format!("{partial}{tail}");
            let (args, ret) = match args_and_ret(&joined) {
                Some(x) => x,
                // Killed in the call: "= ?" may be missing altogether.
                None => (joined.trim_end_matches(')'), None),
            };
            calls.push(Call {
                line: pline,
                end_line: i,
                ts: pts,
                end_ts: ts,
                name: name.to_owned(),
                args: split_args(args),
                ret,
            });
            continue;
        }
        let (name, after) = rest
            .split_once('(')
            .ok_or_else(|| bad(i, line, "not a system call"))?;
        if let Some(partial) = after.strip_suffix(" <unfinished ...>") {
            if pending
                .insert(pid, (name.to_owned(), partial.to_owned(), i, ts))
                .is_some()
            {
                return Err(bad(i, line, "two unfinished calls in one thread"));
            }
            continue;
        }
        let (args, ret) = args_and_ret(after).ok_or_else(|| bad(i, line, "no result"))?;
        calls.push(Call {
            line: i,
            end_line: i,
            ts,
            end_ts: ts,
            name: name.to_owned(),
            args: split_args(args),
            ret,
        });
    }
    // Calls still pending when the log ends never completed: they count as
    // started, not finished, which no check relies on.
    calls.sort_by_key(|c| c.line);
    Ok(calls)
}

/// Decodes the C string starting at `s[0] == '"'`; returns the bytes and
/// whether strace truncated it (`"..."...`).
fn decode_string(s: &str) -> Option<(Vec<u8>, bool)> {
    let b = s.as_bytes();
    if b.first() != Some(&b'"') {
        return None;
    }
    let mut out = Vec::new();
    let mut i = 1;
    while i < b.len() {
        match b[i] {
            b'"' => return Some((out, s[i + 1..].starts_with("..."))),
            b'\\' => {
                let c = *b.get(i + 1)?;
                i += 2;
                match c {
                    b'x' => {
                        let h = std::str::from_utf8(b.get(i..i + 2)?).ok()?;
                        out.push(u8::from_str_radix(h, 16).ok()?);
                        i += 2;
                    }
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    b'r' => out.push(b'\r'),
                    b'v' => out.push(0x0b),
                    b'f' => out.push(0x0c),
                    b'0'..=b'7' => {
                        let mut v = (c - b'0') as u32;
                        for _ in 0..2 {
                            match b.get(i) {
                                Some(&d @ b'0'..=b'7') => {
                                    v = v * 8 + (d - b'0') as u32;
                                    i += 1;
                                }
                                _ => break,
                            }
                        }
                        out.push(v as u8);
                    }
                    other => out.push(other),
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    None
}

/// Every `iov_base="..."` buffer in an argument, in order.
fn iov_strings(arg: &str) -> Vec<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    let mut rest = arg;
    while let Some(at) = rest.find("iov_base=\"") {
        let s = &rest[at + "iov_base=".len()..];
        match decode_string(s) {
            Some(x) => out.push(x),
            None => break,
        }
        rest = &s[1..];
    }
    out
}

/// The bytes a call wrote (as far as strace shows them) and whether that
/// is all of them.
fn written_bytes(c: &Call) -> (Vec<u8>, bool) {
    let parts = match c.name.as_str() {
        "write" | "sendto" | "pwrite64" => c
            .args
            .get(1)
            .and_then(|a| decode_string(a))
            .into_iter()
            .collect(),
        _ => c.args.get(1).map(|a| iov_strings(a)).unwrap_or_default(),
    };
    let mut v = Vec::new();
    let mut whole = true;
    for (b, trunc) in parts {
        v.extend_from_slice(&b);
        whole &= !trunc;
    }
    let n = c.ret.unwrap_or(0).max(0) as usize;
    if v.len() > n {
        v.truncate(n);
    }
    let whole = whole && v.len() == n;
    (v, whole)
}

fn fd_of(c: &Call) -> Option<i64> {
    c.args.first()?.parse().ok()
}

/// One write's data reaching the image.
#[derive(Debug, Clone, Copy)]
struct DataEv {
    call: usize,
    dsync: bool,
}

/// The bytes sent on one fd, and where each call's bytes start in them.
type Stream = (Vec<u8>, Vec<(usize, usize)>);

/// What the trace check counted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Checked {
    replies: usize,
    writes: usize,
    fua_by_dsync: usize,
    fua_by_sync: usize,
    flush_own_sync: usize,
    flush_earlier_sync: usize,
    flush_nothing_to_cover: usize,
    syncs: usize,
    dsync_writes: usize,
}

/// Checks the trace against what the client saw (see the file's doc).
fn check_trace(calls: &[Call], recs: &[Rec]) -> Result<Checked, String> {
    let mut ck = Checked::default();
    let data_calls = ["pwrite64", "pwritev", "pwritev2"];
    let sync_calls = ["fdatasync", "fsync"];
    // The image: the file our writes' data went to.
    let wids: HashMap<u64, &Rec> = recs
        .iter()
        .filter(|r| r.is_write())
        .map(|r| (r.wid, r))
        .collect();
    let mut image_fd = None;
    let mut data: HashMap<u64, Vec<DataEv>> = HashMap::new();
    for (ci, c) in calls.iter().enumerate() {
        if !data_calls.contains(&c.name.as_str()) {
            continue;
        }
        let (bytes, _) = written_bytes(c);
        if bytes.len() < 16 {
            continue;
        }
        let (wid, block) = (be64(&bytes, 0), be64(&bytes, 8));
        let Some(r) = wids.get(&wid) else { continue };
        let off: Option<u64> = c.args.get(3).and_then(|a| a.parse().ok());
        if r.block != block || off != Some(block * BLOCK) {
            return Err(format!(
                "line {}: {} of write {wid}'s data at {off:?}, for block {block}; the \
                 client wrote block {}",
                c.line + 1,
                c.name,
                r.block
            ));
        }
        if c.ret != Some(BLOCK as i64) {
            continue; // failed (e.g. RWF_DSYNC unsupported) or short: not the data
        }
        let fd = fd_of(c);
        if image_fd.is_some_and(|f| Some(f) != fd) {
            return Err(format!("writes' data went to fds {image_fd:?} and {fd:?}"));
        }
        image_fd = fd;
        let dsync = c.name == "pwritev2" && c.args.get(4).is_some_and(|f| f.contains("RWF_DSYNC"));
        ck.dsync_writes += dsync as usize;
        data.entry(wid)
            .or_default()
            .push(DataEv { call: ci, dsync });
    }
    let syncs: Vec<&Call> = calls
        .iter()
        .filter(|c| sync_calls.contains(&c.name.as_str()) && c.ret == Some(0))
        .filter(|c| image_fd.is_none() || fd_of(c) == image_fd)
        .collect();
    ck.syncs = syncs.len();

    // The replies: every simple reply header in what went to each socket,
    // at any offset of a send, also across sends.
    let mut streams: HashMap<i64, Stream> = HashMap::new();
    let mut cut = false;
    for (ci, c) in calls.iter().enumerate() {
        if !["write", "writev", "sendto", "sendmsg"].contains(&c.name.as_str()) {
            continue;
        }
        let Some(fd) = fd_of(c) else { continue };
        if Some(fd) == image_fd || c.ret.unwrap_or(0) <= 0 {
            continue;
        }
        let (bytes, whole) = written_bytes(c);
        cut |= !whole;
        let (s, starts) = streams.entry(fd).or_default();
        starts.push((s.len(), ci));
        s.extend_from_slice(&bytes);
    }
    let mut reply_at: HashMap<u64, Vec<(usize, u32)>> = HashMap::new();
    for (s, starts) in streams.values() {
        for pos in 0..s.len().saturating_sub(15) {
            if be32(s, pos) != SIMPLE_MAGIC {
                continue;
            }
            let k = starts.partition_point(|&(p, _)| p <= pos) - 1;
            reply_at
                .entry(be64(s, pos + 8))
                .or_default()
                .push((starts[k].1, be32(s, pos + 4)));
        }
    }

    let reply = |r: &Rec| -> Result<&Call, String> {
        match reply_at.get(&r.cookie).map(Vec::as_slice) {
            Some([(ci, 0)]) => Ok(&calls[*ci]),
            Some([(ci, e)]) => Err(format!(
                "line {}: the reply to {:?} {:#x} carries error {e}",
                calls[*ci].line + 1,
                r.kind,
                r.cookie
            )),
            Some(more) => Err(format!(
                "the reply to {:?} {:#x} was sent {} times",
                r.kind,
                r.cookie,
                more.len()
            )),
            None => Err(format!(
                "the reply to {:?} {:#x} (write id {}) is not in the trace{}",
                r.kind,
                r.cookie,
                r.wid,
                if cut {
                    " (some sends were cut short by strace -s)"
                } else {
                    ""
                }
            )),
        }
    };
    // The data event of a write that completed before its reply went out.
    let written_before = |r: &Rec, rep: &Call| -> Result<DataEv, String> {
        data.get(&r.wid)
            .into_iter()
            .flatten()
            .copied()
            .rfind(|d| calls[d.call].end_line < rep.line)
            .ok_or_else(|| {
                format!(
                    "line {}: the reply to write {} (block {}) was sent before its data \
                     was written (or the write is not in the trace)",
                    rep.line + 1,
                    r.wid,
                    r.block
                )
            })
    };
    // A sync of the image that started after line `after` and ended before `rep`.
    let sync_between = |after: usize, after_ts: f64, rep: &Call| {
        syncs
            .iter()
            .filter(|s| s.line > after && s.ts >= after_ts)
            .rfind(|s| s.end_line < rep.line && s.end_ts <= rep.ts)
            .copied()
    };

    for r in recs.iter().filter(|r| r.ok()) {
        let rep = reply(r)?;
        ck.replies += 1;
        match r.kind {
            Kind::Write => {
                written_before(r, rep)?;
                ck.writes += 1;
            }
            Kind::FuaWrite => {
                let d = written_before(r, rep)?;
                ck.writes += 1;
                let dc = &calls[d.call];
                if d.dsync {
                    ck.fua_by_dsync += 1;
                } else if sync_between(dc.end_line, dc.end_ts, rep).is_some() {
                    ck.fua_by_sync += 1;
                } else {
                    return Err(format!(
                        "line {}: the reply to FUA write {} (block {}, cookie {:#x}) was \
                         sent with no pwritev2(RWF_DSYNC) of it and no sync of the image \
                         since its data was written (line {})",
                        rep.line + 1,
                        r.wid,
                        r.block,
                        r.cookie,
                        dc.end_line + 1
                    ));
                }
            }
            Kind::Flush => {
                // The last of the plain writes acknowledged before this FLUSH
                // was sent to reach the image (FUA writes are durable by themselves).
                let mut need: Option<(usize, f64, u64)> = None;
                for w in recs.iter().filter(|w| w.kind == Kind::Write && w.ok()) {
                    if w.acked_seq.is_some_and(|a| a < r.sent_seq) {
                        let d = written_before(w, reply(w)?)?;
                        let dc = &calls[d.call];
                        if need.is_none_or(|(l, _, _)| dc.end_line > l) {
                            need = Some((dc.end_line, dc.end_ts, w.wid));
                        }
                    }
                }
                let Some((after, after_ts, wid)) = need else {
                    ck.flush_nothing_to_cover += 1;
                    continue;
                };
                match sync_between(after, after_ts, rep) {
                    Some(s) if s.ts >= r.sent_at => ck.flush_own_sync += 1,
                    Some(_) => ck.flush_earlier_sync += 1,
                    None => {
                        return Err(format!(
                            "line {}: the reply to FLUSH {:#x} was sent with no sync of the \
                             image since write {wid}, acknowledged before the FLUSH was \
                             sent, was written (line {})",
                            rep.line + 1,
                            r.cookie,
                            after + 1
                        ))
                    }
                }
            }
        }
    }
    Ok(ck)
}

// ---------------------------------------------------------------- the traced server

/// `flexnbd serve` under strace; both are killed and reaped when dropped.
struct Traced {
    strace: Child,
    /// The traced server (strace's child), once found.
    server: Option<u32>,
    err: PathBuf,
}

impl Traced {
    fn start(strace: &Path, log: &Path, img: &Path, port: u16, dir: &Path) -> Traced {
        let err = dir.join("strace.stderr");
        // -s 1024, not 64: replies are batched (up to 32 in one send, 512
        // bytes) and a reply beyond the printed part of a buffer would be
        // invisible. Writes' data shows its first 1024 bytes; 16 name it.
        let strace = Command::new(strace)
            .args(["-f", "-ttt", "-s", "1024", "-xx", "-o"])
            .arg(log)
            .args([
                "-e",
                "trace=pwrite64,pwritev,pwritev2,fdatasync,fsync,sendto,sendmsg,write,writev",
            ])
            .arg(bin())
            .args([
                "serve",
                "--addr",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--file",
            ])
            .arg(img)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("start strace");
        Traced {
            strace,
            server: None,
            err,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        matches!(self.strace.try_wait(), Ok(None))
    }

    /// The pid whose parent is strace and which runs flexnbd.
    fn find_server(&mut self) -> Option<u32> {
        let me = self.strace.id();
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
            let Some((comm, rest)) = stat.rsplit_once(") ") else {
                continue;
            };
            let ppid = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
            if ppid == Some(me) && comm.ends_with("(flexnbd") {
                self.server = Some(pid);
                return Some(pid);
            }
        }
        None
    }

    /// SIGTERM to the server; strace exits with it. Returns strace's status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let pid = self.server.expect("server pid");
        assert!(send_signal(pid, SIGTERM), "cannot signal the server");
        let st = wait_child(&mut self.strace, STOP_TIMEOUT);
        self.server = None;
        st.unwrap_or_else(|| panic!("strace/server did not exit; {}", self.stderr()))
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if let Some(pid) = self.server.take() {
            if self.running() {
                send_signal(pid, SIGKILL);
            }
        }
        if self.running() {
            let _ = self.strace.kill();
        }
        let _ = self.strace.wait();
    }
}

#[test]
fn fua_and_flush_replies_follow_durable_syscalls() {
    let strace = require_tool("strace");
    let dir = tempdir();
    let img = dir.path().join("img");
    let log = dir.path().join("strace.log");
    let blocks = 1024;
    create_identified_image(&img, blocks);
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut t = Traced::start(&strace, &log, &img, port, dir.path());
    let up = wait_until(READY_TIMEOUT, || {
        !t.running() || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });
    assert!(
        up && t.running(),
        "traced server did not start: {}",
        t.stderr()
    );
    assert!(
        wait_until(READY_TIMEOUT, || t.find_server().is_some()),
        "no flexnbd process under strace"
    );

    let plan = Plan {
        conns: 3,
        qd: 8,
        blocks,
        ops: 1500,
        fua_pct: 30,
        flush_pct: 12,
        seed: now_epoch().to_bits(),
        limit: Duration::from_secs(15),
    };
    let k = Counters::default();
    let started = Instant::now();
    let (recs, dead) = run_writers(addr, plan, &k);
    let took = started.elapsed();
    assert!(dead.is_empty(), "writers failed: {dead:?}\n{}", t.stderr());
    let st = t.stop();
    assert!(
        st.success(),
        "server under strace exited {st:?}: {}",
        t.stderr()
    );

    let failed: Vec<&Rec> = recs.iter().filter(|r| !r.ok()).collect();
    assert!(failed.is_empty(), "requests failed: {failed:?}");
    // The data: each block holds its last write (all were acknowledged).
    let mut last: HashMap<u64, u64> = HashMap::new();
    for r in recs.iter().filter(|r| r.is_write()) {
        last.insert(r.block, r.wid);
    }
    for b in 0..blocks {
        let want = load_block(last.get(&b).copied().unwrap_or(0), b);
        assert_bytes_eq(
            &read_file_at(&img, b * BLOCK, BLOCK as usize),
            &want,
            &format!("block {b}"),
        );
    }

    let text = std::fs::read_to_string(&log).expect("strace log");
    let calls = parse_log(&text).unwrap_or_else(|e| panic!("{e}"));
    let ck = check_trace(&calls, &recs).unwrap_or_else(|e| {
        panic!(
            "durability violated: {e}\n(strace log: {} lines)",
            text.lines().count()
        )
    });
    let n = |k: Kind| recs.iter().filter(|r| r.kind == k).count();
    eprintln!(
        "durability: {} requests in {:.1} s under strace ({} writes, {} FUA writes, {} \
         flushes); trace: {} lines, {} syncs, {} RWF_DSYNC writes; {ck:?}",
        recs.len(),
        took.as_secs_f64(),
        n(Kind::Write),
        n(Kind::FuaWrite),
        n(Kind::Flush),
        text.lines().count(),
        ck.syncs,
        ck.dsync_writes,
    );
    assert_eq!(ck.replies, recs.len(), "every reply found in the trace");
    assert_eq!(
        ck.fua_by_dsync + ck.fua_by_sync,
        n(Kind::FuaWrite),
        "FUA replies checked"
    );
    assert_eq!(
        ck.flush_own_sync + ck.flush_earlier_sync + ck.flush_nothing_to_cover,
        n(Kind::Flush),
        "FLUSH replies checked"
    );
    assert!(
        n(Kind::FuaWrite) >= 50,
        "too few FUA writes to mean anything"
    );
    assert!(
        ck.flush_own_sync + ck.flush_earlier_sync >= 20,
        "too few FLUSHes covering writes: {ck:?}"
    );
}

// ---------------------------------------------------------------- checker self-test

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("\\x{x:02x}")).collect()
}

fn reply_bytes(cookie: u64) -> Vec<u8> {
    let mut v = SIMPLE_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&0u32.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v
}

/// A synthetic trace (fd 3 the image, fd 5 the client) and what the client
/// saw: plain write 1 (block 2), acknowledged; then FLUSH 0xf1 sent; FUA
/// write 2 (block 3); a second FLUSH 0xf2 with nothing new to cover.
struct Synthetic {
    lines: Vec<String>,
    recs: Vec<Rec>,
}

impl Synthetic {
    fn new() -> Synthetic {
        let w1 = hex(&load_block(1, 2)[..16]);
        let w2 = hex(&load_block(2, 3)[..16]);
        let r = |c| hex(&reply_bytes(c));
        let lines = vec![
            format!("100  1000.000001 pwrite64(3, \"{w1}\"..., 4096, 8192) = 4096"),
            format!(
                "100  1000.000002 sendto(5, \"{}\", 16, MSG_NOSIGNAL, NULL, 0) = 16",
                r(0xa1)
            ),
            "101  1000.000003 fdatasync(3 <unfinished ...>".to_owned(),
            format!(
                "100  1000.000004 pwritev2(3, [{{iov_base=\"{w2}\"..., iov_len=4096}}], 1, \
                 12288, RWF_DSYNC) = 4096"
            ),
            "101  1000.000005 <... fdatasync resumed>) = 0".to_owned(),
            format!(
                "101  1000.000006 writev(5, [{{iov_base=\"{}\", iov_len=16}}, \
                 {{iov_base=\"{}{}\", iov_len=32}}], 2) = 48",
                r(0xf1),
                r(0xa2),
                r(0xf2)
            ),
            "100  1000.000007 +++ exited with 0 +++".to_owned(),
        ];
        let rec = |kind, cookie, wid, block, sent_seq, acked_seq, sent_at| Rec {
            kind,
            cookie,
            wid,
            block,
            sent_seq,
            acked_seq: Some(acked_seq),
            sent_at,
            error: Some(0),
        };
        // FLUSH 0xf1 is sent before the fdatasync starts (its own), 0xf2 after.
        let recs = vec![
            rec(Kind::Write, 0xa1, 1, 2, 0, 1, 1000.0),
            rec(Kind::Flush, 0xf1, 0, 0, 2, 6, 1000.0000025),
            rec(Kind::FuaWrite, 0xa2, 2, 3, 3, 7, 1000.0000026),
            rec(Kind::Flush, 0xf2, 0, 0, 4, 8, 1000.0000045),
        ];
        Synthetic { lines, recs }
    }

    fn check(&self) -> Result<Checked, String> {
        check_trace(&parse_log(&self.lines.join("\n"))?, &self.recs)
    }
}

#[test]
fn checker_accepts_a_good_trace_and_rejects_bad_ones() {
    let good = Synthetic::new();
    let ck = good.check().expect("the good synthetic trace passes");
    assert_eq!(
        ck,
        Checked {
            replies: 4,
            writes: 2,
            fua_by_dsync: 1,
            fua_by_sync: 0,
            flush_own_sync: 1,
            flush_earlier_sync: 1,
            flush_nothing_to_cover: 0,
            syncs: 1,
            dsync_writes: 1,
        }
    );

    let expect_err = |s: &Synthetic, needle: &str, what: &str| match s.check() {
        Ok(ck) => panic!("{what}: the checker accepted it: {ck:?}"),
        Err(e) => assert!(e.contains(needle), "{what}: wrong reason: {e}"),
    };

    // The FLUSH's reply goes out before the fdatasync completes.
    let mut s = Synthetic::new();
    let sync_end = s.lines.remove(4);
    s.lines.insert(5, sync_end);
    expect_err(&s, "FLUSH 0xf1", "FLUSH reply before its fdatasync");

    // The fdatasync starts before the write it must cover has been written.
    // pwrite64 enters, fdatasync enters, pwrite64 returns, its reply, ...
    let mut s = Synthetic::new();
    let g = Synthetic::new().lines;
    s.lines = vec![
        g[0].replace(") = 4096", " <unfinished ...>"),
        g[2].replace("1000.000003", "1000.0000011"),
        "100  1000.0000012 <... pwrite64 resumed>) = 4096".to_owned(),
        g[1].clone(),
        g[3].clone(),
        g[4].clone(),
        g[5].clone(),
    ];
    expect_err(
        &s,
        "FLUSH 0xf1",
        "fdatasync started before the write was written",
    );

    // The FUA write is a plain pwrite64 with no sync after it.
    let mut s = Synthetic::new();
    s.lines[3] = format!(
        "100  1000.000004 pwrite64(3, \"{}\"..., 4096, 12288) = 4096",
        hex(&load_block(2, 3)[..16])
    );
    expect_err(&s, "FUA write 2", "FUA write without RWF_DSYNC or sync");

    // The FUA reply is sent while its pwritev2 is still running.
    let mut s = Synthetic::new();
    s.lines[3] = s.lines[3].replace(") = 4096", " <unfinished ...>");
    s.lines.insert(
        6,
        "100  1000.0000065 <... pwritev2 resumed>) = 4096".to_owned(),
    );
    expect_err(
        &s,
        "before its data",
        "FUA reply before its write completed",
    );

    // A reply the client got is missing from the trace.
    let mut s = Synthetic::new();
    s.lines.remove(1);
    expect_err(&s, "not in the trace", "missing reply");

    // A FUA write's reply sent twice.
    let mut s = Synthetic::new();
    let dup = s.lines[5].clone().replace("1000.000006", "1000.000008");
    s.lines.insert(6, dup);
    expect_err(&s, "times", "duplicate reply");
}

// ---------------------------------------------------------------- SIGKILL

/// Checks the image after a crash; returns (blocks whose guaranteed write
/// was checked, acknowledged writes not guaranteed but found, torn blocks).
fn check_after_kill(img: &Path, blocks: u64, recs: &[Rec]) -> (u64, u64, u64) {
    // The last FLUSH sent that was acknowledged covers every write
    // acknowledged before it was sent (on any connection: multi-conn).
    let flush_sent = recs
        .iter()
        .filter(|r| r.kind == Kind::Flush && r.ok())
        .map(|r| r.sent_seq)
        .max();
    let guaranteed = |w: &Rec| {
        w.ok()
            && (w.kind == Kind::FuaWrite
                || flush_sent.is_some_and(|f| w.acked_seq.is_some_and(|a| a < f)))
    };
    let mut per_block: HashMap<u64, Vec<&Rec>> = HashMap::new();
    for w in recs.iter().filter(|r| r.is_write()) {
        per_block.entry(w.block).or_default().push(w);
    }
    let image = read_file(img);
    let (mut checked, mut extra, mut torn) = (0, 0, 0);
    for b in 0..blocks {
        let got = &image[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
        let mut ws: Vec<&Rec> = per_block.remove(&b).unwrap_or_default();
        ws.sort_by_key(|w| w.wid); // issue order: one connection writes a block
                                   // What the block may hold: its last guaranteed write or any write
                                   // issued after it; with none, the original or any write.
        let g = ws.iter().rposition(|w| guaranteed(w));
        let allowed: Vec<u64> = match g {
            Some(i) => ws[i..].iter().map(|w| w.wid).collect(),
            None => std::iter::once(0).chain(ws.iter().map(|w| w.wid)).collect(),
        };
        let whole = allowed
            .iter()
            .find(|&&id| got == load_block(id, b).as_slice());
        match whole {
            Some(&id) => {
                checked += g.is_some() as u64;
                if ws.iter().any(|w| w.wid == id && w.ok() && !guaranteed(w)) {
                    extra += 1;
                }
            }
            None => {
                // Not one write: every 16-byte piece must still come from an
                // allowed one (a write in flight, not atomic), else data is lost.
                let pieces_ok = got.chunks(16).enumerate().all(|(j, piece)| {
                    allowed
                        .iter()
                        .any(|&id| piece == &load_block(id, b)[j * 16..j * 16 + 16])
                });
                let ids: Vec<u64> = got.chunks(16).map(|p| be64(p, 0)).collect();
                assert!(
                    pieces_ok,
                    "block {b} holds neither its guaranteed write nor a later one: \
                     allowed ids {allowed:?}, found ids {:?} (writes to it: {:?})",
                    &ids[..ids.len().min(8)],
                    ws.iter()
                        .map(|w| (w.wid, w.kind, w.acked_seq.is_some(), w.error))
                        .collect::<Vec<_>>()
                );
                torn += 1;
                checked += g.is_some() as u64;
            }
        }
    }
    (checked, extra, torn)
}

#[test]
fn sigkill_keeps_fua_and_flushed_writes() {
    let blocks = 4096; // 16 MiB
    let mut rng = Rng::new(now_epoch().to_bits());
    let (mut total_checked, mut total_inflight) = (0, 0);
    for round in 0..5 {
        let dir = tempdir();
        let img = dir.path().join("img");
        create_identified_image(&img, blocks);
        let mut srv = Serve::tcp(&img).start();
        let addr = srv.addr();
        let plan = Plan {
            conns: 4,
            qd: 8,
            blocks,
            ops: usize::MAX,
            fua_pct: 25,
            flush_pct: 8,
            seed: rng.next_u64(),
            limit: Duration::from_secs(20),
        };
        let k = Counters::default();
        // Kill once this many requests were answered: a random moment.
        let kill_at = 300 + rng.below(4000);
        let (recs, dead) = std::thread::scope(|sc| {
            let w = sc.spawn(|| run_writers(addr, plan, &k));
            let reached = wait_until(Duration::from_secs(20), || {
                k.acked.load(SeqCst) >= kill_at || w.is_finished()
            });
            let early = w.is_finished();
            srv.kill();
            k.stop.store(true, SeqCst);
            assert!(
                reached && !early,
                "writers stopped before the kill (after {} replies)",
                k.acked.load(SeqCst)
            );
            w.join().expect("writers")
        });
        let inflight = recs.iter().filter(|r| r.acked_seq.is_none()).count();
        let failed: Vec<&Rec> = recs
            .iter()
            .filter(|r| r.error.is_some_and(|e| e != 0))
            .collect();
        assert!(
            failed.is_empty(),
            "requests failed before the kill: {failed:?}"
        );
        assert!(!dead.is_empty(), "no connection noticed the kill");
        assert!(inflight > 0, "no request was in flight at the kill");
        let (checked, extra, torn) = check_after_kill(&img, blocks, &recs);
        let n = |kind: Kind| recs.iter().filter(|r| r.kind == kind && r.ok()).count();
        eprintln!(
            "durability: kill round {round}: killed after {} replies; acknowledged {} writes, \
             {} FUA writes, {} flushes; {inflight} in flight; {checked} blocks with a \
             guaranteed write checked, {extra} other acknowledged writes found, {torn} \
             blocks mixed by a write in flight",
            k.acked.load(SeqCst),
            n(Kind::Write),
            n(Kind::FuaWrite),
            n(Kind::Flush),
        );
        total_checked += checked;
        total_inflight += inflight;
    }
    assert!(total_checked > 0, "no guaranteed write was checked");
    assert!(total_inflight > 0);
}

#[test]
fn kill_checker_rejects_lost_and_mixed_writes() {
    let dir = tempdir();
    let img = dir.path().join("img");
    let rec = |kind, wid, block, sent_seq, acked_seq: Option<u64>| Rec {
        kind,
        cookie: wid,
        wid,
        block,
        sent_seq,
        acked_seq,
        sent_at: 0.0,
        error: acked_seq.map(|_| 0),
    };
    // Block 0: FUA write 1. Block 1: plain write 2, then FLUSH (covers it),
    // then write 3 in flight. Block 2: plain write 4, acknowledged, unflushed.
    let recs = vec![
        rec(Kind::FuaWrite, 1, 0, 0, Some(1)),
        rec(Kind::Write, 2, 1, 2, Some(3)),
        rec(Kind::Flush, 0, 0, 4, Some(5)),
        rec(Kind::Write, 3, 1, 6, None),
        rec(Kind::Write, 4, 2, 7, Some(8)),
    ];
    let write = |blocks: [Vec<u8>; 3]| std::fs::write(&img, blocks.concat()).unwrap();
    let mixed = |a: Vec<u8>, b: Vec<u8>| [&a[..2048], &b[2048..]].concat();
    // Accepted: the in-flight write 3 landed, write 4 did not; then write 3
    // half landed over write 2 (not atomic: allowed, counted).
    write([load_block(1, 0), load_block(3, 1), load_block(0, 2)]);
    assert_eq!(check_after_kill(&img, 3, &recs), (2, 0, 0));
    write([
        load_block(1, 0),
        mixed(load_block(2, 1), load_block(3, 1)),
        load_block(4, 2),
    ]);
    assert_eq!(check_after_kill(&img, 3, &recs), (2, 1, 1));
    // Rejected: the FUA write lost; the flushed write lost; a flushed block
    // mixed with the data it replaced.
    for (what, blocks) in [
        (
            "FUA write lost",
            [load_block(0, 0), load_block(2, 1), load_block(4, 2)],
        ),
        (
            "flushed write lost",
            [load_block(1, 0), load_block(0, 1), load_block(4, 2)],
        ),
        (
            "flushed write mixed with the old data",
            [
                load_block(1, 0),
                mixed(load_block(0, 1), load_block(2, 1)),
                load_block(4, 2),
            ],
        ),
    ] {
        write(blocks);
        let r = std::panic::catch_unwind(|| check_after_kill(&img, 3, &recs));
        assert!(r.is_err(), "{what}: accepted");
    }
}
