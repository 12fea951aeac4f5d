//! One upstream connection, serving one client connection: the requests
//! sent and not yet answered (kept with their data until answered), the
//! thread that receives the answers, and reconnecting and replaying when the
//! upstream fails.
//!
//! A request is sent under the sender lock, which a replay also holds, so a
//! request is on exactly one upstream connection at a time: either it was
//! sent before the failure (and the replay sends it again, in the order it
//! was first sent), or it is sent on the new connection after the replay.

use super::upstream::Upstream;
use crate::client::{Body, Cancel, ClientError, Completion, Connection, Receiver, Sender};
use crate::proto::consts::*;
use crate::proto::{Command, NbdErrno, Request};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Requests in flight per client connection; more wait for answers.
const MAX_REQUESTS: usize = 512;
/// Bytes of READ and WRITE data in flight per client connection (one request
/// of any allowed size is always let through).
const MAX_BYTES: usize = 64 << 20;

/// Where a link's upstream connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connected; requests go out as they come.
    Up,
    /// Connecting or waiting to retry; requests queue.
    Reconnecting,
    /// A round of retries ended without a usable upstream; the next request
    /// starts another.
    Failed,
}

/// What an answer is for.
#[derive(Debug)]
pub enum Tag {
    /// A client's request (`cookie` is the client's). `readahead`: the
    /// client asked for this many bytes, and the rest is kept for later
    /// reads while no write is sent after the generation given.
    Client {
        cookie: u64,
        readahead: Option<(u32, u64)>,
    },
    /// A flush sent on behalf of another client connection (multi-conn).
    Barrier(Arc<Barrier>),
}

/// A request sent (or to be sent) upstream, with what it needs to be sent again.
#[derive(Debug)]
pub struct Pending {
    /// As sent upstream: the cookie is the link's own sequence number.
    pub req: Request,
    pub payload: Arc<Vec<u8>>,
    pub tag: Tag,
    /// It went out on some upstream connection (so sending it again counts
    /// as a re-send).
    sent: bool,
}

impl Pending {
    /// A request not yet sent.
    pub fn new(req: Request, payload: Arc<Vec<u8>>, tag: Tag) -> Pending {
        Pending {
            req,
            payload,
            tag,
            sent: false,
        }
    }
}

/// The outcome of a request.
#[derive(Debug)]
pub enum Outcome {
    Done(Body),
    Failed {
        errno: NbdErrno,
        message: Option<String>,
    },
}

impl Outcome {
    pub fn error(errno: NbdErrno, message: impl Into<String>) -> Outcome {
        Outcome::Failed {
            errno,
            message: Some(message.into()),
        }
    }
}

/// Where answers to a client's requests go. Answers may be gathered and
/// go out at [`flush`](Answer::flush).
pub trait Answer: Send + Sync {
    /// Answers `p`; gives back the READ data buffer of `outcome`, for reuse.
    fn answer(&self, p: Pending, outcome: Outcome) -> Option<Vec<u8>>;
    /// Sends the answers gathered so far.
    fn flush(&self);
}

/// Waits for flushes on several links (the multi-conn emulation).
#[derive(Debug, Default)]
pub struct Barrier {
    left: Mutex<(usize, bool)>,
    done: Condvar,
}

impl Barrier {
    pub fn new(n: usize) -> Arc<Barrier> {
        Arc::new(Barrier {
            left: Mutex::new((n, true)),
            done: Condvar::new(),
        })
    }

    fn arrive(&self, ok: bool) {
        let mut g = self.left.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = g.0.saturating_sub(1);
        g.1 &= ok;
        self.done.notify_all();
    }

    /// Waits for every flush; true if all succeeded.
    pub fn wait(&self) -> bool {
        let g = self.left.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = crate::wait::until(&self.done, g, None, |s| s.0 == 0);
        g.1
    }
}

struct State {
    pending: BTreeMap<u64, Pending>,
    next: u64,
    bytes: usize,
    phase: Phase,
    /// Writes answered since the last flush sent on this link.
    dirty: bool,
    closing: bool,
    /// A request arrived while failed: start another round.
    kick: bool,
    /// Threads waiting on `changed` (so an answer wakes no one needlessly).
    waiters: usize,
}

impl State {
    /// Takes out the pending requests for which `pick` holds (it may adjust
    /// each request it looks at), in the order they were first sent.
    fn take_where(&mut self, mut pick: impl FnMut(&mut Pending) -> bool) -> Vec<Pending> {
        let keys: Vec<u64> = self
            .pending
            .iter_mut()
            .filter_map(|(k, p)| pick(p).then_some(*k))
            .collect();
        let mut taken = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(p) = self.pending.remove(&k) {
                self.bytes -= cost(&p.req);
                taken.push(p);
            }
        }
        taken
    }
}

/// One upstream connection for one client connection.
pub struct Link {
    pub id: u64,
    name: String,
    up: Arc<Upstream>,
    client: Arc<dyn Answer>,
    state: Mutex<State>,
    changed: Condvar,
    sender: Mutex<Option<Sender>>,
    /// Cuts the current connection or connect attempt.
    cancel: Mutex<Option<Arc<Cancel>>>,
    cut: Mutex<Option<crate::client::ShutdownHandle>>,
    ever_up: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn cost(req: &Request) -> usize {
    match req.command {
        Command::Read | Command::Write => req.length as usize,
        _ => 0,
    }
}

fn modifies(cmd: Command) -> bool {
    matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes)
}

impl Link {
    /// Starts a link and its receiving thread, which connects at once.
    pub fn start(
        up: Arc<Upstream>,
        client: Arc<dyn Answer>,
        name: String,
    ) -> std::io::Result<Arc<Link>> {
        let link = Arc::new(Link {
            id: up.next_link_id(),
            name,
            up: up.clone(),
            client,
            state: Mutex::new(State {
                pending: BTreeMap::new(),
                next: 1,
                bytes: 0,
                phase: Phase::Reconnecting,
                dirty: false,
                closing: false,
                kick: false,
                waiters: 0,
            }),
            changed: Condvar::new(),
            sender: Mutex::new(None),
            cancel: Mutex::new(None),
            cut: Mutex::new(None),
            ever_up: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        up.register(&link);
        let me = link.clone();
        let h = std::thread::Builder::new()
            .name(format!("{}-upstream", link.name))
            .spawn(move || me.run())?;
        *link.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        Ok(link)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits on `changed` until `done` holds or `deadline` passes.
    fn wait_for<'a>(
        &self,
        mut g: MutexGuard<'a, State>,
        deadline: Option<Instant>,
        done: impl FnMut(&mut State) -> bool,
    ) -> MutexGuard<'a, State> {
        g.waiters += 1;
        let (mut g, _) = crate::wait::until(&self.changed, g, deadline, done);
        g.waiters -= 1;
        g
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    pub fn in_flight(&self) -> usize {
        self.lock().pending.len()
    }

    /// Whether writes were answered since the last flush, clearing it (a
    /// flush is about to be sent).
    pub fn take_dirty(&self) -> bool {
        std::mem::take(&mut self.lock().dirty)
    }

    /// Sends `req` (the client's, or an internal flush) upstream, or queues it
    /// while the upstream is down. Waits while the link has too much in
    /// flight. With `more`, a small request may wait for the next ones to go
    /// out in one write ([`Link::send_queued`] sends it).
    pub fn submit(&self, mut req: Request, payload: Vec<u8>, tag: Tag, more: bool) {
        let c = cost(&req);
        {
            let full = {
                let s = self.lock();
                !s.pending.is_empty()
                    && (s.pending.len() >= MAX_REQUESTS || s.bytes + c > MAX_BYTES)
            };
            if full {
                // Answers cannot come for requests still in the buffer.
                self.send_queued();
            }
            let g = self.wait_for(self.lock(), None, |s| {
                s.closing
                    || s.pending.is_empty()
                    || (s.pending.len() < MAX_REQUESTS && s.bytes + c <= MAX_BYTES)
            });
            if g.closing {
                drop(g);
                let p = Pending {
                    req,
                    payload: Arc::new(payload),
                    tag,
                    sent: false,
                };
                self.answer(p, closing());
                self.client.flush();
                return;
            }
        }
        // The DF flag is honoured here (answers are sent as one chunk); a
        // WRITE's PAYLOAD_LEN is set again where the upstream framing has it.
        req.flags &= !(CMD_FLAG_DF | CMD_FLAG_PAYLOAD_LEN);
        let payload = Arc::new(payload);
        let mut sender = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = sender.as_ref() {
            if !fit(&mut req, s.info().extended_headers) {
                drop(sender);
                let p = Pending::new(req, payload, tag);
                self.answer(p, unfit());
                self.client.flush();
                return;
            }
        }
        {
            let mut st = self.lock();
            req.cookie = st.next;
            st.next += 1;
            st.bytes += c;
            st.pending.insert(
                req.cookie,
                Pending {
                    req,
                    payload: payload.clone(),
                    tag,
                    sent: sender.is_some(),
                },
            );
            if st.phase == Phase::Failed {
                st.kick = true;
                self.changed.notify_all();
            }
        }
        let Some(s) = sender.as_mut() else {
            return; // sent by the replay once connected
        };
        let sent = match more {
            true => s.queue(req, &payload),
            false => s.forward(req, &payload),
        };
        if let Err(e) = sent {
            if e.connection_usable() {
                drop(sender);
                if let Some(p) = self.take(req.cookie) {
                    self.answer(p, Outcome::error(NbdErrno::Inval, e.to_string()));
                    self.client.flush();
                }
                return;
            }
            // The receiver sees the connection fail and replays this request.
            *sender = None;
            drop(sender);
            self.cut_connection();
        }
    }

    /// Writes the requests [`submit`](Self::submit) held back.
    pub fn send_queued(&self) {
        let mut sender = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = sender.as_mut() {
            if s.send_queued().is_err() {
                *sender = None;
                drop(sender);
                self.cut_connection();
            }
        }
    }

    /// Ends the link. With `drain`, first waits until every request was
    /// answered (or failed), as after a client's NBD_CMD_DISC.
    pub fn close(&self, drain: bool) {
        if drain {
            let _g = self.wait_for(self.lock(), None, |s| {
                s.pending.is_empty() || s.phase == Phase::Failed
            });
        }
        {
            let mut st = self.lock();
            st.closing = true;
            self.changed.notify_all();
        }
        let idle = self.lock().pending.is_empty();
        {
            let mut s = self.sender.lock().unwrap_or_else(|p| p.into_inner());
            if let (true, Some(s)) = (idle, s.as_mut()) {
                let _ = s.disconnect();
            }
            *s = None;
        }
        if let Some(c) = self.cancel.lock().unwrap_or_else(|p| p.into_inner()).take() {
            c.cancel();
        }
        if !idle {
            self.cut_connection();
        }
        let h = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = h {
            let _ = h.join();
        }
        self.up.unregister(self.id);
        // Whatever is left can no longer be answered upstream.
        let left: Vec<Pending> = std::mem::take(&mut self.lock().pending)
            .into_values()
            .collect();
        for p in left {
            self.answer(p, closing());
        }
        self.client.flush();
    }

    fn cut_connection(&self) {
        if let Some(h) = self.cut.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            h.shutdown();
        }
    }

    fn take(&self, cookie: u64) -> Option<Pending> {
        let mut st = self.lock();
        let p = st.pending.remove(&cookie)?;
        st.bytes -= cost(&p.req);
        if st.waiters > 0 {
            self.changed.notify_all();
        }
        Some(p)
    }

    fn answer(&self, p: Pending, outcome: Outcome) -> Option<Vec<u8>> {
        match p.tag {
            Tag::Barrier(ref b) => {
                b.arrive(matches!(outcome, Outcome::Done(_)));
                None
            }
            Tag::Client { .. } => self.client.answer(p, outcome),
        }
    }

    fn set_phase(&self, phase: Phase) {
        let mut st = self.lock();
        st.phase = phase;
        self.changed.notify_all();
    }

    fn closing(&self) -> bool {
        self.lock().closing
    }

    /// The receiving thread: connect, receive answers until the upstream
    /// fails, reconnect and replay, until closed.
    fn run(self: Arc<Self>) {
        loop {
            let Some(rx) = self.reconnect() else {
                if self.closing() {
                    return;
                }
                continue;
            };
            let why = self.receive(rx);
            if self.closing() {
                return;
            }
            self.down(&why);
        }
    }

    /// Receives answers until the connection fails; returns why.
    fn receive(&self, mut rx: Receiver) -> String {
        loop {
            let r = rx.recv();
            if let Ok(Some(c)) = r {
                match self.completed(c) {
                    Ok(Some(buf)) => rx.recycle(buf),
                    Ok(None) => {}
                    Err(why) => {
                        self.client.flush();
                        return why;
                    }
                }
                // Answers go out together while more replies are at hand.
                if !rx.reply_buffered() {
                    self.client.flush();
                    std::thread::yield_now();
                }
                continue;
            }
            self.client.flush();
            return match r {
                Ok(_) => "the upstream closed the connection".into(),
                Err(e) => e.to_string(),
            };
        }
    }

    /// Answers a completed request. `Err`: the upstream said it is shutting
    /// down (ESHUTDOWN, as a server going away answers what it will not
    /// execute); the request stays pending, to be sent to its successor.
    fn completed(&self, c: Completion) -> Result<Option<Vec<u8>>, String> {
        if let Err(ClientError::Nbd {
            errno: NbdErrno::Shutdown,
            ..
        }) = c.result
        {
            return Err("the upstream is shutting down".into());
        }
        let Some(p) = self.take(c.cookie) else {
            return Ok(None);
        };
        let outcome = match c.result {
            Ok(()) => {
                if modifies(p.req.command) {
                    self.lock().dirty = true;
                    self.up.wrote();
                }
                Outcome::Done(c.body)
            }
            Err(ClientError::Nbd { errno, message }) => Outcome::Failed { errno, message },
            Err(e) => Outcome::error(NbdErrno::Io, e.to_string()),
        };
        Ok(self.answer(p, outcome))
    }

    /// The upstream connection failed: stop sending on it.
    fn down(&self, why: &str) {
        *self.sender.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.cut.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let n = self.in_flight();
        warn!(
            "{}: upstream {} failed: {why}; reconnecting ({n} request(s) to send again)",
            self.name,
            self.up.endpoint()
        );
        self.up.failed(why);
        self.set_phase(Phase::Reconnecting);
    }

    /// One round of attempts (the very first connection of a link is tried
    /// at once, then as retries). Returns the receiver of a connection on
    /// which everything pending was sent again, or `None` when the round
    /// failed (the pending requests got EIO) or the link is closing.
    fn reconnect(&self) -> Option<Receiver> {
        self.set_phase(Phase::Reconnecting);
        let retry = self.up.retry();
        let immediate = !self.ever_up.load(Relaxed);
        let mut last = String::from("no attempt made");
        let mut n = 0u32;
        loop {
            let wait = match (immediate, n) {
                (true, 0) => Some(Duration::ZERO),
                (true, n) => retry.delay_before(n - 1),
                (false, n) => retry.delay_before(n),
            };
            let Some(wait) = wait else {
                let tries = n;
                self.give_up(&format!(
                    "gave up on the upstream {} after {tries} attempt(s): {last}",
                    self.up.endpoint()
                ));
                return None;
            };
            n += 1;
            if !self.sleep(wait) {
                return None;
            }
            let cancel = Cancel::new();
            *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) = Some(cancel.clone());
            let r = self.up.connect(Some(cancel));
            *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) = None;
            if self.closing() {
                return None;
            }
            match r {
                Ok(c) if c.size() != self.up.size() => {
                    let msg = format!(
                        "the upstream {} came back with size {} instead of {}",
                        self.up.endpoint(),
                        c.size(),
                        self.up.size()
                    );
                    let _ = c.disconnect();
                    self.give_up(&msg);
                    return None;
                }
                Ok(c) => {
                    if c.flags() != self.up.flags() {
                        warn!(
                            "{}: the upstream came back with flags {:#x} instead of {:#x}",
                            self.name,
                            c.flags(),
                            self.up.flags()
                        );
                    }
                    match self.install(c) {
                        Some(rx) => return Some(rx),
                        None if self.closing() => return None,
                        None => last = "sending the requests again failed".into(),
                    }
                }
                Err(e) => {
                    debug!("{}: upstream attempt {n} failed: {e}", self.name);
                    last = e.to_string();
                }
            }
        }
    }

    /// Waits `d` unless the link closes first; false if it did.
    fn sleep(&self, d: Duration) -> bool {
        let g = self.wait_for(self.lock(), Some(Instant::now() + d), |s| s.closing);
        !g.closing
    }

    /// The round failed: everything pending gets EIO; then wait for a new
    /// request (which starts another round) or the end of the link.
    fn give_up(&self, msg: &str) {
        error!(
            "{}: {msg}; failing the requests in flight with EIO",
            self.name
        );
        self.up.failed(msg);
        let failed: Vec<Pending> = {
            let mut st = self.lock();
            st.phase = Phase::Failed;
            st.kick = false;
            st.bytes = 0;
            self.changed.notify_all();
            std::mem::take(&mut st.pending).into_values().collect()
        };
        for p in failed {
            self.answer(p, Outcome::error(NbdErrno::Io, msg));
        }
        self.client.flush();
        let mut g = self.wait_for(self.lock(), None, |s| s.closing || s.kick);
        g.kick = false;
    }

    /// Takes a new connection into use: sends everything pending again, in
    /// the order it was first sent, then lets new requests through.
    fn install(&self, c: Connection) -> Option<Receiver> {
        c.large_buffers();
        let cut = c.shutdown_handle();
        let (mut tx, mut rx) = match c.into_pipeline(self.up.timeout()) {
            Ok(p) => p,
            Err(e) => {
                warn!("{}: {e}", self.name);
                return None;
            }
        };
        // Large READ data waits in a pipe and goes on to the client by
        // splice (from a plain socket only: TLS data is decrypted in memory).
        match crate::client::Pipe::new() {
            Ok(p) if rx.can_splice() => rx.use_pipe(p),
            Ok(_) => {}
            Err(e) => debug!("{}: no pipe for READ data ({e}); copying it", self.name),
        }
        let mut slot = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        *self.cut.lock().unwrap_or_else(|p| p.into_inner()) = Some(cut.clone());
        if self.closing() {
            cut.shutdown();
            return None;
        }
        let readonly = self.up.read_only_fallback();
        let extended = tx.info().extended_headers;
        if extended != self.up.extended() {
            warn!(
                "{}: the upstream came back {} extended headers",
                self.name,
                if extended { "with" } else { "without" }
            );
        }
        let Replay {
            again,
            refused,
            unfit: cannot,
            resent,
        } = {
            let mut st = self.lock();
            let cannot = st.take_where(|p| !fit(&mut p.req, extended));
            let refused = match readonly {
                true => st.take_where(|p| modifies(p.req.command)),
                false => Vec::new(),
            };
            let resent = st.pending.values().filter(|p| p.sent).count();
            let again = st
                .pending
                .values_mut()
                .map(|p| {
                    p.sent = true;
                    (p.req, p.payload.clone())
                })
                .collect();
            Replay {
                again,
                refused,
                unfit: cannot,
                resent,
            }
        };
        for p in cannot {
            self.answer(p, unfit());
        }
        for p in refused {
            self.answer(
                p,
                Outcome::error(NbdErrno::Perm, "the upstream failed: read-only from now on"),
            );
        }
        self.client.flush();
        let ever = self.ever_up.swap(true, Relaxed);
        let replayed = again
            .iter()
            .try_for_each(|(req, payload)| tx.queue(*req, payload))
            .and_then(|_| tx.send_queued());
        if let Err(e) = replayed {
            warn!("{}: sending the requests again failed: {e}", self.name);
            cut.shutdown();
            return None;
        }
        if resent > 0 {
            self.up.resent(resent as u64);
            info!(
                "{}: upstream {} is back; sent {resent} request(s) again",
                self.name,
                self.up.endpoint(),
            );
        } else if ever {
            info!("{}: upstream {} is back", self.name, self.up.endpoint());
        }
        *slot = Some(tx);
        drop(slot);
        self.set_phase(Phase::Up);
        Some(rx)
    }
}

/// What a new connection takes over: the requests to send again (in order),
/// the writes refused under `--retry-readonly`, those its framing cannot
/// carry, and how many of those sent again had gone out before.
struct Replay {
    again: Vec<(Request, Arc<Vec<u8>>)>,
    refused: Vec<Pending>,
    unfit: Vec<Pending>,
    resent: usize,
}

/// Whether `req` can go on an upstream connection with (or without)
/// extended headers. A BLOCK_STATUS about more than compact headers carry
/// asks about less (an answer may cover less than was asked); a TRIM,
/// WRITE_ZEROES or CACHE over 4 GiB cannot go (an upstream that came back without
/// the extended headers it had).
fn fit(req: &mut Request, extended: bool) -> bool {
    if extended || req.length <= u64::from(u32::MAX) {
        return true;
    }
    if req.command == Command::BlockStatus {
        req.length = u64::from(u32::MAX) & !0xfff;
        return true;
    }
    false
}

fn unfit() -> Outcome {
    Outcome::error(
        NbdErrno::Inval,
        "a request over 4 GiB needs extended headers, which the upstream no longer offers",
    )
}

fn closing() -> Outcome {
    Outcome::error(NbdErrno::Shutdown, "the proxy is closing this connection")
}
