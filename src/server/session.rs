//! One client connection in the transmission phase. A few workers take turns
//! reading a batch of requests (reader lock), execute their batches
//! concurrently and send each batch's replies with one write (writer lock), so
//! replies go out of order as the protocol allows.

use super::conn::SendLimit;
use super::handshake::Negotiated;
use super::intake::SenderTrack;
use super::out::{Out, OUT_CAP};
use super::reader::{ReadError, Reader};
use super::validate::{validate, Op, Refusal, MAX_REQUEST};
use crate::export::Export;
use crate::proto::consts::CMD_FLAG_PAYLOAD_LEN;
use crate::proto::{Command, ProtoError, Request};
use crate::stream::Stream;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Workers per connection once requests turn out slow.
const MAX_WORKERS: usize = 4;
/// An extra worker that has had nothing to read for this long exits.
const WORKER_IDLE: Duration = Duration::from_secs(2);
/// Storage that has not been slow for this long is taken to be fast again:
/// the extra workers go (requests from memory are best served by one).
const FAST_AGAIN: Duration = Duration::from_secs(10);
/// Requests taken per turn at the reader.
const MAX_BATCH: usize = 32;
/// A request taking longer than this reveals slow storage.
pub(super) const SLOW_REQUEST: Duration = Duration::from_micros(500);
/// Write payload gathered per batch; larger writes are streamed in pieces
/// of this size (memory per connection stays small with many of them).
pub(super) const PAYLOAD_CAP: usize = 256 << 10;
/// Workers beyond the first of each connection, over all connections: with
/// many connections, they are the parallelism, and each worker's buffers
/// cost memory.
const MAX_EXTRA_WORKERS: usize = 8;
static EXTRA_WORKERS: AtomicUsize = AtomicUsize::new(0);

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The client sent NBD_CMD_DISC.
    Disconnect,
    /// The connection was closed or shut down.
    Closed,
    /// A protocol or I/O error ended it.
    Error(String),
}

/// A request taken from the stream, ready to execute.
#[derive(Debug)]
pub(super) struct Item {
    pub req: Request,
    pub op: Result<Op, Refusal>,
    /// Start of a WRITE's payload in the worker's payload buffer.
    pub at: usize,
}

/// A worker's reusable buffers.
pub(super) struct Worker {
    pub out: Out,
    pub payload: Vec<u8>,
    pub batch: Vec<Item>,
}

pub struct Session {
    pub(super) export: Arc<Export>,
    pub(super) conn: Stream,
    pub(super) neg: Negotiated,
    pub(super) writer: Mutex<()>,
    reader: Mutex<Reader>,
    /// A worker holds the reader (is reading or waiting for a request);
    /// the others wait on `reading_cv` for their turn.
    reading: Mutex<bool>,
    reading_cv: Condvar,
    stop: AtomicBool,
    end: Mutex<Option<End>>,
    idle: AtomicUsize,
    workers: AtomicUsize,
    /// Workers allowed: one while every request is served from memory (no
    /// hand-offs between threads), more once one was slow.
    allowed: AtomicUsize,
    /// When a request was last slow (nanoseconds after `born`).
    slow_at: AtomicU64,
    born: Instant,
    handles: Mutex<Vec<JoinHandle<()>>>,
    pub(super) name: String,
    /// What an incoming migration's sender has sent.
    sender: Option<Arc<SenderTrack>>,
    /// How long a send may take.
    pub(super) send: SendLimit,
    pub(super) metrics: Arc<crate::metrics::Metrics>,
}

impl Session {
    pub fn new(
        export: Arc<Export>,
        conn: Stream,
        neg: Negotiated,
        name: String,
        sender: Option<Arc<SenderTrack>>,
        send: SendLimit,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> io::Result<Arc<Session>> {
        let mut reader = Reader::new(conn.try_clone()?);
        reader.set_extended(neg.extended());
        Ok(Arc::new(Session {
            export,
            conn,
            neg,
            writer: Mutex::new(()),
            reader: Mutex::new(reader),
            reading: Mutex::new(false),
            reading_cv: Condvar::new(),
            stop: AtomicBool::new(false),
            end: Mutex::new(None),
            idle: AtomicUsize::new(0),
            workers: AtomicUsize::new(1),
            allowed: AtomicUsize::new(1),
            slow_at: AtomicU64::new(0),
            born: Instant::now(),
            handles: Mutex::new(Vec::new()),
            name,
            sender,
            send,
            metrics,
        }))
    }

    /// Serves requests until the client disconnects or the session is stopped;
    /// waits for every in-flight request to be answered.
    pub fn run(self: &Arc<Self>) -> End {
        self.work(false);
        self.finish(End::Closed);
        self.conn.shutdown(Shutdown::Read);
        loop {
            let h = self.handles.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match h {
                Some(h) => {
                    let _ = h.join();
                }
                None => break,
            }
        }
        self.conn.shutdown(Shutdown::Both);
        self.end
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or(End::Closed)
    }

    /// Writes `b` to the client within the send limit.
    pub(super) fn send_all(&self, b: &[u8]) -> io::Result<()> {
        self.conn.send_all(b, self.send.deadline())
    }

    /// Records that this client wrote, zeroed or trimmed `[off, off + len)`.
    pub(super) fn covered(&self, off: u64, len: u64) {
        if let Some(t) = &self.sender {
            t.covered(off, len);
        }
    }

    /// The sender sent ENTRUST.
    pub(super) fn entrusted(&self) {
        if let Some(t) = &self.sender {
            info!("{}: the sender entrusted the image (ENTRUST)", self.name);
            t.entrust();
        }
    }

    /// Stops reading requests; those in flight still get their replies.
    pub fn stop(&self) {
        self.conn.shutdown(Shutdown::Read);
    }

    /// Records why the session ends (the first reason wins) and stops reading.
    fn finish(&self, why: End) {
        self.stop.store(true, SeqCst);
        {
            let mut e = self.end.lock().unwrap_or_else(|p| p.into_inner());
            if e.is_none() {
                *e = Some(why);
            }
        }
        let _g = self.reading.lock().unwrap_or_else(|p| p.into_inner());
        self.reading_cv.notify_all();
    }

    fn stopped(&self) -> bool {
        self.stop.load(SeqCst)
    }

    /// A worker's loop. `extra`: a worker started for slow requests, which
    /// exits once it has had nothing to do for [`WORKER_IDLE`].
    fn work(self: &Arc<Self>, extra: bool) {
        let mut w = Worker {
            out: Out::new(),
            payload: Vec::new(),
            batch: Vec::with_capacity(MAX_BATCH),
        };
        // An extra worker gives its place in the budget back when it ends.
        struct Extra(bool);
        impl Drop for Extra {
            fn drop(&mut self) {
                if self.0 {
                    EXTRA_WORKERS.fetch_sub(1, SeqCst);
                }
            }
        }
        let _extra = Extra(extra);
        while !self.stopped() {
            match self.turn(&mut w, extra) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    // A client that went away is not an error of ours.
                    let end = match e.kind() {
                        io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted => End::Closed,
                        _ => End::Error(e.to_string()),
                    };
                    self.finish(end);
                    self.conn.shutdown(Shutdown::Both);
                }
            }
        }
    }

    /// One turn: wait for the reader, take a batch, execute it, send the
    /// replies. `Ok(false)`: this (extra) worker was idle and has retired.
    fn turn(self: &Arc<Self>, w: &mut Worker, extra: bool) -> io::Result<bool> {
        if extra && self.fast_again() {
            return Ok(!self.retire());
        }
        self.idle.fetch_add(1, SeqCst);
        let retire_at = extra.then(|| Instant::now() + WORKER_IDLE);
        let g = self.reading.lock().unwrap_or_else(|p| p.into_inner());
        let (mut g, my_turn) = crate::wait::until(&self.reading_cv, g, retire_at, |busy| {
            !*busy || self.stopped()
        });
        self.idle.fetch_sub(1, SeqCst);
        if self.stopped() {
            return Ok(true);
        }
        if !my_turn {
            drop(g);
            return Ok(!self.retire());
        }
        *g = true;
        drop(g);
        let gathered = {
            let mut rd = self.reader.lock().unwrap_or_else(|p| p.into_inner());
            self.gather(&mut rd, w, extra)
        };
        {
            *self.reading.lock().unwrap_or_else(|p| p.into_inner()) = false;
            self.reading_cv.notify_one();
        }
        if let Ok(true) = gathered {
            // Nothing to read for a while: an extra worker is not needed.
            return Ok(!self.retire());
        }
        let gathered = gathered.map(|_| ());
        self.add_worker_if_needed();
        let executed = self.execute(w);
        let sent = w.out.send(&self.conn, &self.writer, self.send);
        gathered.and(executed).and(sent).map(|_| true)
    }

    /// Lets an idle extra worker go (never the last one). True if it may exit.
    fn retire(&self) -> bool {
        self.workers
            .fetch_update(SeqCst, SeqCst, |n| (n > 1).then(|| n - 1))
            .is_ok()
    }

    /// Storage turned out slow: from now on, requests are executed by several
    /// workers at once, and one more starts now if nobody is reading.
    pub(super) fn slow_request_seen(self: &Arc<Self>) {
        self.slow_at
            .store(self.born.elapsed().as_nanos() as u64, SeqCst);
        if self.allowed.swap(MAX_WORKERS, SeqCst) < MAX_WORKERS {
            debug!(
                "{}: slow requests: serving with up to {MAX_WORKERS} workers",
                self.name
            );
        }
        self.add_worker_if_needed();
    }

    /// No request was slow for [`FAST_AGAIN`]: one worker is allowed again
    /// (true while more are running than allowed).
    fn fast_again(&self) -> bool {
        if self.allowed.load(SeqCst) > 1 {
            let since = self.born.elapsed().as_nanos() as u64 - self.slow_at.load(SeqCst);
            if Duration::from_nanos(since) > FAST_AGAIN && self.allowed.swap(1, SeqCst) > 1 {
                debug!(
                    "{}: requests are fast again: serving with one worker",
                    self.name
                );
            }
        }
        self.workers.load(SeqCst) > self.allowed.load(SeqCst)
    }

    /// Starts a worker if more are allowed and none is waiting to read.
    fn add_worker_if_needed(self: &Arc<Self>) {
        if !self.stopped()
            && self.idle.load(SeqCst) == 0
            && self.workers.load(SeqCst) < self.allowed.load(SeqCst)
        {
            self.spawn_worker();
        }
    }

    fn spawn_worker(self: &Arc<Self>) {
        let mut hs = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        if self.stopped() || self.workers.load(SeqCst) >= self.allowed.load(SeqCst) {
            return;
        }
        let budget = EXTRA_WORKERS
            .fetch_update(SeqCst, SeqCst, |n| (n < MAX_EXTRA_WORKERS).then_some(n + 1));
        if budget.is_err() {
            return;
        }
        // Workers that retired are done: forget them.
        hs.retain(|h| !h.is_finished());
        let me = self.clone();
        let n = self.workers.fetch_add(1, SeqCst);
        match std::thread::Builder::new()
            .name(format!("{}.{}", self.name, n))
            .spawn(move || me.work(true))
        {
            Ok(h) => hs.push(h),
            Err(e) => {
                EXTRA_WORKERS.fetch_sub(1, SeqCst);
                self.workers.fetch_sub(1, SeqCst);
                warn!("cannot start a worker thread: {e}");
            }
        }
    }

    /// Takes requests from the stream into `w.batch`: at least one (waiting
    /// for it), then as many as are already buffered and fit.
    /// Takes requests from the stream into `w.batch` (see `gather_batch`).
    /// An `extra` worker waits at most [`WORKER_IDLE`] for the first one:
    /// `Ok(true)` means none came, and the worker may retire.
    fn gather(&self, rd: &mut Reader, w: &mut Worker, extra: bool) -> io::Result<bool> {
        w.batch.clear();
        if extra && self.sender.is_none() {
            rd.set_deadline(Some(Instant::now() + WORKER_IDLE));
            let waited = rd.peek(true);
            rd.set_deadline(None);
            // Anything else (a header, an error) is there for the batch to take.
            if let Err(ReadError::Idle) = waited {
                return Ok(true);
            }
        }
        // A sender's next request must arrive whole within its idle limit.
        if let Some(t) = &self.sender {
            rd.set_deadline(t.idle_limit().map(|d| std::time::Instant::now() + d));
        }
        let r = self.gather_batch(rd, w);
        if let Some(t) = &self.sender {
            if !w.batch.is_empty() {
                t.request_arrived();
            }
        }
        r.map(|_| false)
    }

    fn gather_batch(&self, rd: &mut Reader, w: &mut Worker) -> io::Result<()> {
        let mut payload_used = 0usize;
        let mut reply_bytes = 0usize;
        while w.batch.len() < MAX_BATCH {
            let first = w.batch.is_empty();
            let req = match rd.peek(first) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    if let (ReadError::Proto(_), Some(cookie)) = (&e, rd.raw_cookie()) {
                        // The stream is lost: answer this header with an error, then close.
                        let _ = self.bad_request_reply(w, cookie);
                    }
                    self.read_failed(e);
                    break;
                }
            };
            let (req, op) = match self.neg.extended() && req.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
                // BLOCK_STATUS naming its contexts: the payload is read
                // here and the request goes on as the range it names.
                true if req.command == Command::BlockStatus => {
                    let named = match rd.block_status_with_payload(&req) {
                        Ok(r) => r,
                        Err(e) => {
                            if matches!(e, ReadError::Proto(_)) {
                                let _ = self.bad_request_reply(w, req.cookie);
                            }
                            self.read_failed(e);
                            break;
                        }
                    };
                    let op = named.and_then(|r| {
                        validate(&r, &self.neg, self.export.size(), self.export.read_only())
                            .map(|op| (r, op))
                    });
                    match op {
                        Ok((r, op)) => w.batch.push(Item {
                            req: r,
                            op: Ok(op),
                            at: 0,
                        }),
                        Err(e) => w.batch.push(Item {
                            req,
                            op: Err(e),
                            at: 0,
                        }),
                    }
                    continue;
                }
                _ => (
                    req,
                    validate(&req, &self.neg, self.export.size(), self.export.read_only()),
                ),
            };
            let len = req.length as usize;
            match op {
                Ok(Op::Write { .. }) if len > PAYLOAD_CAP => {
                    if !first {
                        break;
                    }
                    rd.consume_header();
                    return self.stream_write(rd, w, &req);
                }
                Ok(Op::Write { .. }) => {
                    let buffered = rd.buffered_len() >= rd.header_len() + len;
                    if !first && (!buffered || payload_used + len > PAYLOAD_CAP) {
                        break;
                    }
                }
                Ok(Op::Read { .. }) => {
                    if !first && reply_bytes + len + 64 > OUT_CAP {
                        break;
                    }
                    reply_bytes += len + 64;
                }
                _ => {}
            }
            rd.consume_header();
            let mut at = 0;
            match op {
                Ok(Op::Write { .. }) => {
                    at = payload_used;
                    if w.payload.len() < at + len {
                        w.payload.resize(at + len, 0);
                    }
                    if let Err(e) = rd.read_exact(&mut w.payload[at..at + len]) {
                        self.read_failed(e);
                        break;
                    }
                    payload_used += len;
                }
                Err(_) if self.neg.extended() && req.payload_len(true) > MAX_REQUEST => {
                    // A 64-bit payload length: far too much to read and
                    // drop (a 32-bit one is drained): answer, then close.
                    w.batch.push(Item { req, op, at });
                    self.read_failed(ReadError::Proto(ProtoError::TooLong {
                        what: "request payload",
                        len: req.length,
                        max: MAX_REQUEST,
                    }));
                    break;
                }
                Err(_) if req.payload_len(self.neg.extended()) > 0 => {
                    if let Err(e) = rd.skip(req.payload_len(self.neg.extended())) {
                        self.read_failed(e);
                        break;
                    }
                }
                Ok(Op::Disc) => {
                    self.finish(End::Disconnect);
                    break;
                }
                _ => {}
            }
            w.batch.push(Item { req, op, at });
        }
        Ok(())
    }

    fn bad_request_reply(&self, w: &mut Worker, cookie: u64) -> io::Result<()> {
        use crate::proto::reply::Replies;
        use crate::proto::NbdErrno;
        let r = Replies::new(self.neg.framing, cookie, 0);
        w.out.push(&r.error(NbdErrno::Inval, "malformed request"));
        w.out.send(&self.conn, &self.writer, self.send)
    }

    fn read_failed(&self, e: ReadError) {
        match e {
            ReadError::Eof => self.finish(End::Closed),
            e => {
                warn!("{}: {e}; closing the connection", self.name);
                self.finish(End::Error(e.to_string()));
            }
        }
    }
}
