//! One connection to the destination for one migration attempt: pipelined
//! requests with a bounded window, a thread collecting replies, and failure
//! handling that returns every unconfirmed range to the dirty map.

use super::dirty::DirtyMap;
use super::inflight::{Claim, Inflight};
use crate::client::{ClientError, Completion, Connection, Receiver, Sender, ShutdownHandle};
use crate::proto::consts::{FLAG_SEND_FLUSH, FLAG_SEND_WRITE_ZEROES};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes of unconfirmed writes allowed on the wire.
const WINDOW_BYTES: u64 = 64 << 20;
/// Requests allowed on the wire.
const WINDOW_REQUESTS: usize = 16;

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

    /// True when the request succeeded.
    pub fn wait(&self) -> bool {
        let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(ok) = *d {
                return ok;
            }
            d = self.cv.wait(d).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What a request in flight covers.
struct Pending {
    /// Range to mark dirty again if the request is not confirmed.
    range: Option<(u64, u64)>,
    bytes: u64,
    _claim: Option<Claim>,
    waiter: Option<Arc<Waiter>>,
}

#[derive(Default)]
struct Window {
    bytes: u64,
    requests: usize,
    failed: Option<String>,
    pending: HashMap<u64, Pending>,
}

/// A live connection to the destination.
pub struct Link {
    sender: Mutex<Sender>,
    shutdown: ShutdownHandle,
    window: Mutex<Window>,
    cv: Condvar,
    next_cookie: AtomicU64,
    dirty: Arc<DirtyMap>,
    pub inflight: Arc<Inflight>,
    flags: u16,
    receiver: Mutex<Option<JoinHandle<()>>>,
}

impl Link {
    /// Starts using a negotiated connection.
    pub fn start(
        conn: Connection,
        dirty: Arc<DirtyMap>,
        timeout: Duration,
    ) -> Result<Arc<Link>, ClientError> {
        let flags = conn.flags();
        let (sender, receiver) = conn.into_pipeline(timeout)?;
        let link = Arc::new(Link {
            shutdown: sender.shutdown_handle(),
            sender: Mutex::new(sender),
            window: Mutex::new(Window::default()),
            cv: Condvar::new(),
            next_cookie: AtomicU64::new(1),
            dirty,
            inflight: Inflight::new(),
            flags,
            receiver: Mutex::new(None),
        });
        let l2 = link.clone();
        let h = std::thread::Builder::new()
            .name("mirror-replies".into())
            .spawn(move || l2.receive(receiver))
            .map_err(ClientError::Io)?;
        *link.receiver.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        Ok(link)
    }

    pub fn can_write_zeroes(&self) -> bool {
        self.flags & FLAG_SEND_WRITE_ZEROES != 0
    }

    pub fn can_flush(&self) -> bool {
        self.flags & FLAG_SEND_FLUSH != 0
    }

    /// Why the link failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed
            .clone()
    }

    fn receive(self: Arc<Self>, mut rx: Receiver) {
        loop {
            match rx.recv() {
                Ok(Some(Completion { cookie, result })) => {
                    if let Err(e) = result {
                        self.fail(format!("destination refused a write: {e}"));
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
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = w.pending.remove(&cookie) {
            w.bytes -= p.bytes;
            w.requests -= 1;
            if let Some(wt) = &p.waiter {
                wt.set(true);
            }
        }
        self.cv.notify_all();
    }

    /// Ends the link: every unconfirmed range becomes dirty again, every
    /// waiter is told, and the socket is shut down.
    pub fn fail(&self, why: String) {
        let pending = {
            let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            if w.failed.is_none() {
                w.failed = Some(why);
            }
            w.bytes = 0;
            w.requests = 0;
            std::mem::take(&mut w.pending)
        };
        for p in pending.into_values() {
            if let Some((off, len)) = p.range {
                self.dirty.mark(off, len);
            }
            if let Some(wt) = &p.waiter {
                wt.set(false);
            }
        }
        self.inflight.close();
        self.shutdown.shutdown();
        self.cv.notify_all();
    }

    /// Waits for room in the window. `false` when the link has failed.
    fn wait_room(&self, bytes: u64) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if w.failed.is_some() {
                return false;
            }
            let fits = w.requests < WINDOW_REQUESTS
                && (w.bytes + bytes <= WINDOW_BYTES || w.requests == 0);
            if fits {
                return true;
            }
            w = self.cv.wait(w).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Sends one request built by `send` (which gets the cookie), recording
    /// what to do if it is not confirmed. `false` when the link has failed.
    pub fn send(
        &self,
        range: Option<(u64, u64)>,
        bytes: u64,
        claim: Option<Claim>,
        waiter: Option<Arc<Waiter>>,
        send: impl FnOnce(&mut Sender, u64) -> Result<(), ClientError>,
    ) -> bool {
        if !self.wait_room(bytes) {
            if let Some((o, l)) = range {
                self.dirty.mark(o, l);
            }
            return false;
        }
        let cookie = self.next_cookie.fetch_add(1, SeqCst);
        {
            let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            if w.failed.is_some() {
                drop(w);
                if let Some((o, l)) = range {
                    self.dirty.mark(o, l);
                }
                return false;
            }
            w.bytes += bytes;
            w.requests += 1;
            w.pending.insert(
                cookie,
                Pending {
                    range,
                    bytes,
                    _claim: claim,
                    waiter,
                },
            );
        }
        let r = {
            let mut s = self.sender.lock().unwrap_or_else(|p| p.into_inner());
            send(&mut s, cookie)
        };
        if let Err(e) = r {
            self.fail(format!("sending to the destination failed: {e}"));
            return false;
        }
        true
    }

    /// Waits until every request sent so far is confirmed. `false` on failure.
    pub fn drain(&self) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if w.failed.is_some() {
                return false;
            }
            if w.requests == 0 {
                return true;
            }
            w = self.cv.wait(w).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Flushes the destination and waits for it. `false` on failure.
    pub fn flush(&self) -> bool {
        if !self.can_flush() {
            return self.drain();
        }
        let waiter = Arc::new(Waiter::default());
        if !self.send(None, 0, None, Some(waiter.clone()), |s, c| s.flush(c)) {
            return false;
        }
        waiter.wait()
    }

    /// Sends NBD_CMD_DISC: the destination takes over the image.
    pub fn disconnect(&self) -> Result<(), ClientError> {
        let mut s = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        s.disconnect()
    }

    /// Closes the connection and waits for the reply thread.
    pub fn close(&self, why: &str) {
        self.fail(why.into());
        let h = self
            .receiver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }
}
