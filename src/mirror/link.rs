//! One connection to the destination for one migration attempt: requests go
//! out through queues drained by a sending thread, within a bounded window;
//! a receiving thread collects the replies. No caller ever blocks on the
//! socket itself, so a forwarded client write can give up waiting after a
//! short budget while its request stays in flight. Forwarded client writes
//! ([`Class::Urgent`]) go out ahead of queued copies ([`Class::Bulk`]),
//! and a copy may be held to a smaller share of the window, so a client
//! write waits behind little data. (Reordering is safe: at most one write
//! per block is ever in flight.) Any failure returns every unconfirmed range
//! to the dirty map.

use super::dirty::DirtyMap;
use super::inflight::{Claim, Inflight};
use crate::client::{ClientError, Completion, Connection, Receiver, Sender, ShutdownHandle};
use crate::proto::consts::{FLAG_SEND_FLUSH, FLAG_SEND_WRITE_ZEROES};
use crate::wait;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes of unconfirmed writes allowed on the wire.
const WINDOW_BYTES: u64 = 64 << 20;
/// Requests allowed on the wire.
const WINDOW_REQUESTS: usize = 16;
/// Payload buffers kept for reuse.
const SPARE_BUFFERS: usize = 12;

/// Waits for one request's reply.
#[derive(Default)]
pub struct Waiter {
    done: Mutex<Option<bool>>,
    cv: Condvar,
}

impl Waiter {
    fn set(&self, ok: bool) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = Some(ok);
        self.cv.notify_all();
    }

    /// Whether the request succeeded, once known or at `deadline`.
    fn wait_until(&self, deadline: Option<Instant>) -> Option<bool> {
        let d = self.done.lock().unwrap_or_else(|p| p.into_inner());
        let (d, _) = wait::until(&self.cv, d, deadline, |d| d.is_some());
        *d
    }

    /// True when the request succeeded.
    pub fn wait(&self) -> bool {
        self.wait_until(None).unwrap_or(false)
    }

    /// Like [`wait`](Self::wait), but `None` once `budget` has passed.
    pub fn wait_for(&self, budget: Duration) -> Option<bool> {
        self.wait_until(Some(Instant::now() + budget))
    }
}

/// Which queue a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A forwarded client write: sent before any queued bulk request.
    Urgent,
    /// Copier traffic, queued only while unconfirmed bulk requests carry at
    /// most `in_flight` bytes (the first one always fits).
    Bulk { in_flight: u64 },
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSent {
    /// The window stayed full until the deadline.
    NoRoom,
    /// The link has failed.
    Failed,
}

/// How a wait for the destination ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    Done,
    Failed,
    TimedOut,
}

/// A request for the destination.
pub enum Op {
    Write {
        off: u64,
        data: Vec<u8>,
    },
    Zeroes {
        off: u64,
        len: u64,
    },
    Flush,
    /// The listen-era C hand-over request (answered like an empty READ).
    Entrust,
    /// `NBD_CMD_DISC`: no reply; the waiter hears whether it was sent.
    Disc,
}

struct Outgoing {
    cookie: u64,
    op: Op,
    /// For `Disc`: told once it is on the wire (or failed).
    sent: Option<Arc<Waiter>>,
}

/// What a request in flight covers.
struct Pending {
    /// Range to mark dirty again if the request is not confirmed.
    range: Option<(u64, u64)>,
    bytes: u64,
    bulk: bool,
    _claim: Option<Claim>,
    waiter: Option<Arc<Waiter>>,
}

#[derive(Default)]
struct Window {
    bytes: u64,
    /// Of `bytes`, those of bulk requests.
    bulk_bytes: u64,
    requests: usize,
    failed: Option<String>,
    pending: HashMap<u64, Pending>,
    urgent: VecDeque<Outgoing>,
    queue: VecDeque<Outgoing>,
}

/// A live connection to the destination.
pub struct Link {
    shutdown: ShutdownHandle,
    window: Mutex<Window>,
    /// Room in the window, replies, failure.
    cv: Condvar,
    /// Work for the sending thread.
    queued: Condvar,
    next_cookie: AtomicU64,
    dirty: Arc<DirtyMap>,
    pub inflight: Arc<Inflight>,
    flags: u16,
    oldstyle: bool,
    /// The longest WRITE_ZEROES the destination takes in one request.
    max_zeroes: u64,
    /// Bytes of writes the destination confirmed.
    confirmed: AtomicU64,
    /// When the destination last confirmed anything (ms after `epoch`).
    epoch: Instant,
    last_confirm_ms: AtomicU64,
    /// When requests were last put in flight with none in flight before.
    busy_since_ms: AtomicU64,
    spare: Mutex<Vec<Vec<u8>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Told the length of each copied range the destination confirms.
    on_copied: Box<dyn Fn(u64) + Send + Sync>,
}

impl Link {
    /// Starts using a negotiated connection.
    pub fn start(
        conn: Connection,
        dirty: Arc<DirtyMap>,
        timeout: Duration,
        on_copied: Box<dyn Fn(u64) + Send + Sync>,
    ) -> Result<Arc<Link>, ClientError> {
        let flags = conn.flags();
        let oldstyle = conn.is_oldstyle();
        let max_zeroes = conn.info().max_effect_len();
        let (sender, receiver) = conn.into_pipeline(timeout)?;
        let link = Arc::new(Link {
            shutdown: sender.shutdown_handle(),
            window: Mutex::new(Window::default()),
            cv: Condvar::new(),
            queued: Condvar::new(),
            next_cookie: AtomicU64::new(1),
            dirty,
            inflight: Inflight::new(),
            flags,
            oldstyle,
            max_zeroes,
            confirmed: AtomicU64::new(0),
            epoch: Instant::now(),
            last_confirm_ms: AtomicU64::new(0),
            busy_since_ms: AtomicU64::new(0),
            spare: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            on_copied,
        });
        let (l1, l2) = (link.clone(), link.clone());
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(ClientError::Io)
        };
        let rx = spawn("mirror-replies", Box::new(move || l1.receive(receiver)))?;
        let tx = match spawn("mirror-send", Box::new(move || l2.transmit(sender))) {
            Ok(t) => t,
            Err(e) => {
                link.fail("cannot start the sending thread".into());
                let _ = rx.join();
                return Err(e);
            }
        };
        link.lock_threads().extend([rx, tx]);
        Ok(link)
    }

    fn lock(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The longest WRITE_ZEROES one request may ask for (any length with
    /// extended headers, 32 bits without).
    pub fn max_zeroes(&self) -> u64 {
        self.max_zeroes
    }

    pub fn can_write_zeroes(&self) -> bool {
        self.flags & FLAG_SEND_WRITE_ZEROES != 0
    }

    pub fn can_flush(&self) -> bool {
        self.flags & FLAG_SEND_FLUSH != 0
    }

    /// The destination greeted old-style (the C flexnbd).
    pub fn is_oldstyle(&self) -> bool {
        self.oldstyle
    }

    /// Bytes of writes the destination has confirmed.
    pub fn confirmed_bytes(&self) -> u64 {
        self.confirmed.load(Relaxed)
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// How long the destination has had requests in flight without
    /// confirming any (zero while nothing is in flight).
    pub fn quiet_for(&self, now: Instant) -> Duration {
        if self.lock().requests == 0 {
            return Duration::ZERO;
        }
        let since = self
            .last_confirm_ms
            .load(Relaxed)
            .max(self.busy_since_ms.load(Relaxed));
        Duration::from_millis(self.ms(now).saturating_sub(since))
    }

    /// Why the link failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// A buffer of `len` bytes for a WRITE's payload (reused when possible).
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        let mut b = self
            .spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        b.resize(len, 0);
        b
    }

    /// Returns a buffer from [`buffer`](Self::buffer) that was not sent.
    pub fn recycle(&self, b: Vec<u8>) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < SPARE_BUFFERS {
            spare.push(b);
        }
    }

    /// The sending thread: puts queued requests on the wire in order.
    fn transmit(&self, mut tx: Sender) {
        loop {
            let next = {
                let (mut w, _) = wait::until(&self.queued, self.lock(), None, |w| {
                    w.failed.is_some() || !w.urgent.is_empty() || !w.queue.is_empty()
                });
                if w.failed.is_some() {
                    return;
                }
                match w.urgent.pop_front().or_else(|| w.queue.pop_front()) {
                    Some(o) => o,
                    None => continue,
                }
            };
            let Outgoing { cookie, op, sent } = next;
            let r = match op {
                Op::Write { off, data } => {
                    let r = tx.write(cookie, off, &data, false);
                    self.recycle(data);
                    r
                }
                Op::Zeroes { off, len } => tx.write_zeroes(cookie, off, len, false),
                Op::Flush => tx.flush(cookie),
                Op::Entrust => tx.entrust(cookie),
                Op::Disc => tx.disconnect(),
            };
            if let Some(s) = &sent {
                s.set(r.is_ok());
            }
            if let Err(e) = r {
                self.fail(format!("sending to the destination failed: {e}"));
                return;
            }
        }
    }

    fn receive(&self, mut rx: Receiver) {
        loop {
            match rx.recv() {
                Ok(Some(Completion { cookie, result, .. })) => {
                    if let Err(e) = result {
                        self.fail(format!("the destination refused a request: {e}"));
                        return;
                    }
                    self.complete(cookie);
                }
                Ok(None) => {
                    self.fail("connection to the destination closed".into());
                    return;
                }
                Err(e) => {
                    self.fail(format!("{e}"));
                    return;
                }
            }
        }
    }

    fn complete(&self, cookie: u64) {
        let mut w = self.lock();
        let done = w.pending.remove(&cookie);
        if let Some(p) = &done {
            w.bytes -= p.bytes;
            if p.bulk {
                w.bulk_bytes -= p.bytes;
            }
            w.requests -= 1;
            self.confirmed.fetch_add(p.bytes, Relaxed);
            self.last_confirm_ms
                .fetch_max(self.ms(Instant::now()), Relaxed);
            if let Some(wt) = &p.waiter {
                wt.set(true);
            }
        }
        self.cv.notify_all();
        drop(w);
        if let Some(Pending {
            range: Some((_, len)),
            bulk: true,
            ..
        }) = done
        {
            (self.on_copied)(len);
        }
    }

    /// Ends the link: every unconfirmed range becomes dirty again, every
    /// waiter is told, and the socket is shut down.
    pub fn fail(&self, why: String) {
        let (pending, queue) = {
            let mut w = self.lock();
            if w.failed.is_none() {
                w.failed = Some(why);
            }
            w.bytes = 0;
            w.bulk_bytes = 0;
            w.requests = 0;
            let mut queued = std::mem::take(&mut w.queue);
            queued.extend(std::mem::take(&mut w.urgent));
            (std::mem::take(&mut w.pending), queued)
        };
        for p in pending.into_values() {
            if let Some((off, len)) = p.range {
                self.dirty.mark(off, len);
            }
            if let Some(wt) = &p.waiter {
                wt.set(false);
            }
        }
        for o in queue {
            if let Some(s) = &o.sent {
                s.set(false);
            }
        }
        self.inflight.close();
        self.shutdown.shutdown();
        self.cv.notify_all();
        self.queued.notify_all();
    }

    /// Queues one request, recording what to do if it is not confirmed.
    /// Waits for room in the window until `until` (`None`: as long as it
    /// takes; a past instant: not at all). On [`NotSent::Failed`] the range
    /// has been marked dirty; on [`NotSent::NoRoom`] that is the caller's to do.
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &self,
        range: Option<(u64, u64)>,
        bytes: u64,
        claim: Option<Claim>,
        waiter: Option<Arc<Waiter>>,
        op: Op,
        class: Class,
        until: Option<Instant>,
    ) -> Result<(), NotSent> {
        let fits = |w: &mut Window| {
            let share = match class {
                Class::Urgent => true,
                Class::Bulk { in_flight } => w.bulk_bytes == 0 || w.bulk_bytes + bytes <= in_flight,
            };
            share
                && w.requests < WINDOW_REQUESTS
                && (w.bytes + bytes <= WINDOW_BYTES || w.requests == 0)
        };
        let (mut w, room) = wait::until(&self.cv, self.lock(), until, |w| {
            w.failed.is_some() || fits(w)
        });
        if w.failed.is_some() {
            drop(w);
            if let Some((o, l)) = range {
                self.dirty.mark(o, l);
            }
            return Err(NotSent::Failed);
        }
        if !room {
            return Err(NotSent::NoRoom);
        }
        let cookie = self.next_cookie.fetch_add(1, Relaxed);
        let bulk = class != Class::Urgent;
        if w.requests == 0 {
            self.busy_since_ms.store(self.ms(Instant::now()), Relaxed);
        }
        w.bytes += bytes;
        if bulk {
            w.bulk_bytes += bytes;
        }
        w.requests += 1;
        w.pending.insert(
            cookie,
            Pending {
                range,
                bytes,
                bulk,
                _claim: claim,
                waiter,
            },
        );
        let out = Outgoing {
            cookie,
            op,
            sent: None,
        };
        match bulk {
            true => w.queue.push_back(out),
            false => w.urgent.push_back(out),
        }
        self.queued.notify_one();
        Ok(())
    }

    /// Waits until every request sent so far is confirmed, or until `until`.
    pub fn drain(&self, until: Option<Instant>) -> Drained {
        let (w, _) = wait::until(&self.cv, self.lock(), until, |w| {
            w.failed.is_some() || w.requests == 0
        });
        match (w.failed.is_some(), w.requests) {
            (true, _) => Drained::Failed,
            (false, 0) => Drained::Done,
            _ => Drained::TimedOut,
        }
    }

    /// Sends `op` alone and waits for its reply until `until`.
    fn request(&self, op: Op, until: Option<Instant>) -> Drained {
        let waiter = Arc::new(Waiter::default());
        let class = Class::Bulk {
            in_flight: u64::MAX,
        };
        if let Err(e) = self.send(None, 0, None, Some(waiter.clone()), op, class, until) {
            return match e {
                NotSent::Failed => Drained::Failed,
                NotSent::NoRoom => Drained::TimedOut,
            };
        }
        let ok = match until {
            None => Some(waiter.wait()),
            Some(t) => waiter.wait_for(t.saturating_duration_since(Instant::now())),
        };
        match ok {
            Some(true) => Drained::Done,
            Some(false) => Drained::Failed,
            None => Drained::TimedOut,
        }
    }

    /// Flushes the destination and waits for it (until `until`).
    pub fn flush(&self, until: Option<Instant>) -> Drained {
        if !self.can_flush() {
            return self.drain(until);
        }
        self.request(Op::Flush, until)
    }

    /// Sends ENTRUST and waits for its successful reply (until `until`). An
    /// error reply, a wrong handle or a lost connection fail the link.
    pub fn entrust(&self, until: Option<Instant>) -> Drained {
        self.request(Op::Entrust, until)
    }

    /// Sends NBD_CMD_DISC after everything queued: the destination takes
    /// over the image. `false` if it could not be sent.
    pub fn disconnect(&self) -> bool {
        let sent = Arc::new(Waiter::default());
        {
            let mut w = self.lock();
            if w.failed.is_some() {
                return false;
            }
            w.queue.push_back(Outgoing {
                cookie: 0,
                op: Op::Disc,
                sent: Some(sent.clone()),
            });
            self.queued.notify_one();
        }
        sent.wait()
    }

    /// Closes the connection and waits for its threads.
    pub fn close(&self, why: &str) {
        self.fail(why.into());
        let threads: Vec<_> = self.lock_threads().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}
