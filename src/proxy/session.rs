//! One client connection of the proxy: requests are read and checked as the
//! server does (`server::reader`, `server::validate`), refused ones answered
//! here, the rest sent upstream through the connection's [`Link`]; answers
//! come back on the link's thread and are written to the client (in any
//! order, as the protocol allows), encoded for what the client negotiated.

use super::link::{Answer, Link, Outcome, Pending, Tag};
use super::upstream::{Upstream, MAX_REQUEST};
use crate::client::{Body, Pipe};
use crate::proto::consts::CMD_FLAG_PAYLOAD_LEN;
use crate::proto::reply::{Framing, Replies};
use crate::proto::{Command, NbdErrno, ProtoError, Request, SimpleReply};
use crate::server::handshake::{Negotiated, BASE_ALLOCATION_ID};
use crate::server::reader::{ReadError, Reader};
use crate::server::validate::{validate, Op};
use crate::server::{Client, End, SendLimit};
use crate::stream::Stream;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Answers up to this size are gathered and go out together; larger READ
/// data is sent on its own after them.
const COALESCE: usize = 256 * 1024;
/// Gathered answers are sent once they reach this size.
const OUT_CAP: usize = 1 << 20;
/// The payload of a refused request is read and dropped up to this size
/// (any compact header's); a longer one closes the connection.
const MAX_DRAIN: u64 = u32::MAX as u64;

/// Data fetched ahead by `--cache`: valid while no write was sent since.
struct ReadAhead {
    generation: u64,
    offset: u64,
    data: Vec<u8>,
}

/// The client side of the connection: where answers are written.
struct Replier {
    conn: Stream,
    writer: Mutex<()>,
    send: SendLimit,
    /// How the client's replies are framed (simple, structured, extended).
    framing: Framing,
    name: String,
    gone: AtomicBool,
    up: Arc<Upstream>,
    cache: Mutex<Option<ReadAhead>>,
    /// Answers gathered and not yet sent.
    out: Mutex<Vec<u8>>,
    /// WRITE payload buffers for reuse.
    spare: Mutex<Vec<Vec<u8>>>,
}

/// Payload buffers kept for reuse (large ones only: small ones are cheap).
const SPARE_BUFFERS: usize = 16;
const SPARE_MIN: usize = 64 * 1024;

impl Replier {
    /// Adds an answer (its parts in order) to those to send; a large one is
    /// sent at once, after those gathered before it.
    fn send(&self, parts: &[&[u8]]) {
        if self.gone.load(Relaxed) {
            return;
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if total <= COALESCE {
            for p in parts {
                out.extend_from_slice(p);
            }
            if out.len() >= OUT_CAP {
                self.write(&mut out, &[]);
            }
            return;
        }
        self.write(&mut out, parts);
    }

    /// Sends what was gathered, then `parts`, under the writer lock.
    fn write(&self, out: &mut Vec<u8>, parts: &[&[u8]]) {
        let _g = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = self.send.deadline();
        let mut all = Vec::with_capacity(parts.len() + 1);
        all.push(&out[..]);
        all.extend_from_slice(parts);
        let r = self.conn.send_all_parts(&all, deadline);
        out.clear();
        if let Err(e) = r {
            if !self.gone.swap(true, Relaxed) {
                info!("{}: cannot send to the client: {e}", self.name);
            }
            self.conn.shutdown(Shutdown::Both);
        }
    }

    /// The replies to `req`, framed as the client agreed.
    fn replies(&self, req: &Request) -> Replies {
        Replies::new(self.framing, req.cookie, req.offset)
    }

    /// Answers a request with an error: a structured error chunk, with the
    /// message, where structured replies were agreed.
    fn error(&self, req: &Request, errno: NbdErrno, msg: &str) {
        self.send(&[&self.replies(req).error(errno, msg)]);
    }

    /// Answers a header that could not be parsed (the connection closes next).
    fn malformed(&self, cookie: u64) {
        let r = Replies::new(self.framing, cookie, 0);
        self.send(&[&r.error(NbdErrno::Inval, "malformed request")]);
    }

    /// Success without data: a simple reply unless extended headers, which
    /// have none, were agreed.
    fn done(&self, req: &Request) {
        match self.framing {
            Framing::Extended => self.send(&[&self.replies(req).ok()]),
            _ => self.send(&[&SimpleReply::ok(req.cookie).encode()]),
        }
    }

    fn data(&self, req: &Request, data: &[u8]) {
        let r = self.replies(req);
        if self.framing.structured() && data.is_empty() {
            self.send(&[&r.ok()]);
        } else {
            self.send(&[&r.data(req.offset, data.len() as u32, true), data]);
        }
    }

    /// The `base:allocation` extents the upstream gave, in the client's
    /// framing (compact headers carry 32-bit lengths: a longer extent is
    /// cut to a 4 KiB multiple, which a client must accept).
    fn extents(&self, req: &Request, mut e: Vec<(u64, u32)>) {
        if self.framing != Framing::Extended {
            const MAX: u64 = u32::MAX as u64 & !0xfff;
            for x in e.iter_mut() {
                x.0 = x.0.min(MAX);
            }
        }
        self.send(&[&self.replies(req).block_status(BASE_ALLOCATION_ID, &e, true)]);
    }

    /// A READ's data passed on from the pipe it waits in: the answers
    /// gathered so far and the header, then the data moved by `splice(2)`.
    fn piped(&self, req: &Request, pipe: &Pipe, len: usize) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if self.gone.load(Relaxed) {
            pipe.discard();
            return;
        }
        out.extend_from_slice(&self.replies(req).data(req.offset, len as u32, true));
        let _g = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = self.send.deadline();
        let Some(fd) = self.conn.plain_fd() else {
            return; // never: answer() checks
        };
        // On TCP the header waits for the data (MSG_MORE): one segment, not two.
        let head = match self.conn.is_tcp() {
            true => crate::stream::send_by(out.len(), deadline, |done| {
                crate::sys::send_more(fd, &out[done..])
            }),
            false => self.conn.send_all(&out, deadline),
        };
        let r = head.and_then(|_| pipe.splice_out(fd, len, deadline));
        out.clear();
        if let Err(e) = r {
            pipe.discard();
            if !self.gone.swap(true, Relaxed) {
                info!("{}: cannot send to the client: {e}", self.name);
            }
            self.conn.shutdown(Shutdown::Both);
        }
    }

    /// A read answered from the read-ahead, if it lies inside it.
    fn cached(&self, req: &Request) -> bool {
        let g = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ra) = g.as_ref() else {
            return false;
        };
        let end = req.offset + req.length;
        if ra.generation != self.up.generation()
            || req.offset < ra.offset
            || end > ra.offset + ra.data.len() as u64
        {
            return false;
        }
        let at = (req.offset - ra.offset) as usize;
        let data = ra.data[at..at + req.length as usize].to_vec();
        drop(g);
        self.data(req, &data);
        true
    }

    /// A buffer for a WRITE payload of `len` bytes (a used one if there is one).
    fn payload(&self, len: usize) -> Vec<u8> {
        if len >= SPARE_MIN {
            let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = spare.iter().position(|b| b.capacity() >= len) {
                let mut b = spare.swap_remove(i);
                // Every byte is then read from the client.
                b.resize(len, 0);
                return b;
            }
        }
        vec![0u8; len]
    }

    /// Takes back an answered WRITE's payload buffer.
    fn give_back(&self, b: Vec<u8>) {
        if b.capacity() >= SPARE_MIN {
            let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
            if spare.len() < SPARE_BUFFERS {
                spare.push(b);
            }
        }
    }

    fn forget_cache(&self) {
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Answer for Replier {
    fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if !out.is_empty() && !self.gone.load(Relaxed) {
            self.write(&mut out, &[]);
        }
    }

    fn answer(&self, p: Pending, outcome: Outcome) -> Option<Vec<u8>> {
        let Tag::Client { cookie, readahead } = p.tag else {
            return None;
        };
        let mut req = p.req;
        req.cookie = cookie;
        if let Ok(payload) = Arc::try_unwrap(p.payload) {
            self.give_back(payload);
        }
        match outcome {
            Outcome::Failed { errno, message } => {
                let msg = message.unwrap_or_else(|| errno.name().to_owned());
                self.error(&req, errno, &msg);
            }
            // Spliced on to a plain socket; a TLS client gets it copied.
            Outcome::Done(Body::Piped { len, pipe })
                if readahead.is_none() && self.conn.plain_fd().is_some() =>
            {
                self.piped(&req, &pipe, len);
            }
            Outcome::Done(Body::Piped { len, pipe }) => {
                let Ok(d) = pipe.read_out(len) else {
                    pipe.discard();
                    self.error(&req, NbdErrno::Io, "reading the data from its pipe failed");
                    return None;
                };
                return self.answer(
                    p_with(req, Arc::new(Vec::new()), cookie, readahead),
                    Outcome::Done(Body::Data(d)),
                );
            }
            Outcome::Done(Body::Data(mut d)) => {
                if let Some((want, generation)) = readahead {
                    let rest = d.split_off((want as usize).min(d.len()));
                    req.length = want.into();
                    *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Some(ReadAhead {
                        generation,
                        offset: req.offset + u64::from(want),
                        data: rest,
                    });
                }
                self.data(&req, &d);
                return Some(d);
            }
            Outcome::Done(Body::Extents(e)) => self.extents(&req, e),
            Outcome::Done(Body::Empty) => {
                if req.command == Command::Read {
                    self.data(&req, &[]);
                } else {
                    self.done(&req);
                }
            }
        }
        None
    }
}

/// Serves one client connection until it disconnects or fails.
pub fn run(up: Arc<Upstream>, conn: Stream, neg: Negotiated, client: Client<'_>) -> End {
    let name = client.name.to_owned();
    crate::net::proxy_buffers(conn.socket_fd());
    let (rconn, wconn) = match (conn.try_clone(), conn.try_clone()) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(e), _) | (_, Err(e)) => return End::Error(e.to_string()),
    };
    let replier = Arc::new(Replier {
        conn: wconn,
        writer: Mutex::new(()),
        send: client.send,
        framing: neg.framing,
        name: name.clone(),
        gone: AtomicBool::new(false),
        up: up.clone(),
        cache: Mutex::new(None),
        out: Mutex::new(Vec::new()),
        spare: Mutex::new(Vec::new()),
    });
    let link = match Link::start(up.clone(), replier.clone(), name.clone()) {
        Ok(l) => l,
        Err(e) => {
            warn!("{name}: {e}");
            return End::Error(e.to_string());
        }
    };
    let mut rd = Reader::new(rconn);
    rd.set_extended(neg.extended());
    let end = serve(&up, &link, &replier, &mut rd, &neg);
    link.close(end == End::Disconnect);
    conn.shutdown(Shutdown::Both);
    end
}

fn serve(up: &Upstream, link: &Link, replier: &Replier, rd: &mut Reader, neg: &Negotiated) -> End {
    let read_only = up.info_read_only();
    loop {
        if !matches!(rd.peek(false), Ok(Some(_))) {
            // Nothing more at hand: what was held back goes out now.
            link.send_queued();
        }
        let req = match rd.peek(true) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(ReadError::Eof) => return End::Closed,
            Err(e) => {
                if let (ReadError::Proto(_), Some(cookie)) = (&e, rd.raw_cookie()) {
                    replier.malformed(cookie);
                }
                warn!("{}: {e}; closing the connection", replier.name);
                return End::Error(e.to_string());
            }
        };
        // A payload still to read after the header (a refused request's is
        // skipped); a BLOCK_STATUS naming its contexts is read here and goes
        // on as the plain range it names.
        let mut payload_left = req.payload_len(neg.extended());
        let (req, op) = match neg.extended()
            && req.command == Command::BlockStatus
            && req.flags & CMD_FLAG_PAYLOAD_LEN != 0
        {
            true => {
                payload_left = 0;
                match rd.block_status_with_payload(&req) {
                    Ok(Ok(r)) => (r, validate(&r, neg, up.size(), read_only)),
                    Ok(Err(refusal)) => (req, Err(refusal)),
                    Err(e) => {
                        if matches!(e, ReadError::Proto(_)) {
                            replier.malformed(req.cookie);
                        }
                        return read_end(e, replier);
                    }
                }
            }
            false => {
                rd.consume_header();
                (req, validate(&req, neg, up.size(), read_only))
            }
        };
        let too_big = matches!(req.command, Command::Read | Command::Write)
            && req.length > u64::from(MAX_REQUEST);
        let refusal = match op {
            Err(r) => Some((r.errno, r.msg)),
            Ok(_) if too_big => Some((NbdErrno::Inval, "request larger than 32 MiB")),
            Ok(Op::Write { .. } | Op::Trim { .. } | Op::Zero { .. }) if up.read_only_fallback() => {
                Some((NbdErrno::Perm, "the upstream failed: read-only from now on"))
            }
            Ok(_) => None,
        };
        if let Some((errno, msg)) = refusal {
            if payload_left > MAX_DRAIN {
                // A 64-bit payload length: far too much to read and drop
                // (a 32-bit one is drained): answer, then close.
                replier.error(&req, errno, msg);
                let e = ProtoError::TooLong {
                    what: "request payload",
                    len: payload_left,
                    max: MAX_DRAIN,
                };
                return read_end(ReadError::Proto(e), replier);
            }
            if payload_left > 0 {
                if let Err(e) = rd.skip(payload_left) {
                    return read_end(e, replier);
                }
            }
            replier.error(&req, errno, msg);
            replier.flush();
            continue;
        }
        let Ok(op) = op else { continue };
        let mut payload = Vec::new();
        match op {
            Op::Disc => return End::Disconnect,
            Op::Write { .. } => {
                payload = replier.payload(req.length as usize);
                if let Err(e) = rd.read_exact(&mut payload) {
                    return read_end(e, replier);
                }
            }
            _ => {}
        }
        let mut tag = Tag::Client {
            cookie: req.cookie,
            readahead: None,
        };
        let mut fwd = req;
        match op {
            Op::Read { .. } => {
                let cache = up.settings().cache;
                if req.length > 0 && req.length <= u64::from(cache) {
                    if replier.cached(&req) {
                        replier.flush();
                        continue;
                    }
                    // Fetch twice as much when that fits the export.
                    let end = (req.offset + 2 * req.length).min(up.size());
                    fwd.length = end - req.offset;
                    tag = Tag::Client {
                        cookie: req.cookie,
                        // At most `cache`, a u32.
                        readahead: Some((req.length as u32, up.generation())),
                    };
                }
            }
            Op::Flush
            | Op::Write { fua: true }
            | Op::Trim { fua: true }
            | Op::Zero { fua: true, .. } => {
                replier.forget_cache();
                if modifies(op) {
                    up.bump_generation();
                }
                if up.emulates_multi_conn() && !up.flush_others(link.id) {
                    replier.error(
                        &req,
                        NbdErrno::Io,
                        "flushing another upstream connection failed",
                    );
                    continue;
                }
            }
            _ => {
                replier.forget_cache();
                if modifies(op) {
                    up.bump_generation();
                }
            }
        }
        // Requests already buffered behind this one go out in the same write.
        let more = matches!(rd.peek(false), Ok(Some(_)));
        link.submit(fwd, payload, tag, more);
    }
}

fn modifies(op: Op) -> bool {
    matches!(op, Op::Write { .. } | Op::Trim { .. } | Op::Zero { .. })
}

fn read_end(e: ReadError, replier: &Replier) -> End {
    match e {
        ReadError::Eof => End::Closed,
        e => {
            warn!("{}: {e}; closing the connection", replier.name);
            End::Error(e.to_string())
        }
    }
}

/// A pending request for `req` with the client's `cookie` (re-entering
/// [`Replier::answer`] with its data in memory).
fn p_with(
    req: Request,
    payload: Arc<Vec<u8>>,
    cookie: u64,
    readahead: Option<(u32, u64)>,
) -> Pending {
    Pending::new(req, payload, Tag::Client { cookie, readahead })
}
