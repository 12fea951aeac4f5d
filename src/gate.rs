//! The request gate of an export: requests pass while nobody holds it
//! closed. Whoever closes it (a pause, a migration's hand-over, shutdown)
//! takes a [`Hold`]; requests are admitted again only once every hold has
//! been dropped, so a pause and a hand-over can each hold the gate without
//! one reopening what the other closed. A hold is released when it is
//! dropped, on every path: return, error, panic, a lease running out.

use crate::wait;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The gate refuses requests for good: the server is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the server is shutting down")]
pub struct Shut;

#[derive(Default)]
pub struct Gate {
    /// Requests between [`Gate::enter`] and the drop of their [`Pass`].
    inflight: AtomicUsize,
    /// Holds not yet dropped (shutdown keeps one for ever).
    holds: AtomicUsize,
    /// Requests waiting for the gate to open.
    waiting: AtomicUsize,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

/// Held while a request is in flight.
pub struct Pass<'a>(&'a Gate);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// Keeps the gate closed until dropped.
#[must_use = "the gate reopens when the hold is dropped"]
pub struct Hold {
    gate: Arc<Gate>,
}

impl Hold {
    /// Waits until no request is in flight, or until `deadline`; true when none is.
    pub fn drain(&self, deadline: Option<Instant>) -> bool {
        self.gate.drain(deadline)
    }

    /// [`Hold::drain`] with a timeout.
    pub fn drain_for(&self, timeout: Duration) -> bool {
        self.drain(Some(Instant::now() + timeout))
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.gate.holds.fetch_sub(1, SeqCst) == 1 {
            let _g = self.gate.lock();
            self.gate.cv.notify_all();
        }
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hold")
    }
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the gate (or keeps it closed) until the returned hold is dropped.
    /// Requests already in flight go on; [`Hold::drain`] waits for them.
    pub fn hold(self: &Arc<Self>) -> Hold {
        self.holds.fetch_add(1, SeqCst);
        Hold { gate: self.clone() }
    }

    /// Waits until no request is in flight, or until `deadline`; true when
    /// none is. Meaningful while a hold keeps new requests out.
    pub fn drain(&self, deadline: Option<Instant>) -> bool {
        let g = self.lock();
        wait::until(&self.cv, g, deadline, |_| self.inflight.load(SeqCst) == 0).1
    }

    /// Admits one request if the gate is open, without waiting.
    pub fn try_enter(&self) -> Option<Pass<'_>> {
        self.inflight.fetch_add(1, SeqCst);
        if self.holds.load(SeqCst) == 0 {
            return Some(Pass(self));
        }
        self.leave();
        None
    }

    /// Admits one request, waiting while the gate is held. Fails once shut.
    pub fn enter(&self) -> Result<Pass<'_>, Shut> {
        loop {
            if let Some(p) = self.try_enter() {
                return Ok(p);
            }
            if self.shutdown.load(SeqCst) {
                return Err(Shut);
            }
            self.waiting.fetch_add(1, SeqCst);
            let g = self.lock();
            let _ = wait::until(&self.cv, g, None, |_| {
                self.holds.load(SeqCst) == 0 || self.shutdown.load(SeqCst)
            });
            self.waiting.fetch_sub(1, SeqCst);
            if self.shutdown.load(SeqCst) {
                return Err(Shut);
            }
        }
    }

    fn leave(&self) {
        if self.inflight.fetch_sub(1, SeqCst) == 1 && self.holds.load(SeqCst) > 0 {
            let _g = self.lock();
            self.cv.notify_all();
        }
    }

    /// Whether requests are being held (or refused).
    pub fn is_closed(&self) -> bool {
        self.holds.load(SeqCst) > 0
    }

    /// Holds not yet released (shutdown counts as one).
    pub fn holds(&self) -> usize {
        self.holds.load(SeqCst)
    }

    /// Requests waiting for the gate to open.
    pub fn waiting(&self) -> usize {
        self.waiting.load(SeqCst)
    }

    /// Requests in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.load(SeqCst)
    }

    /// Refuses every waiting and future request for good.
    pub fn shut(&self) {
        if !self.shutdown.swap(true, SeqCst) {
            // A hold nobody releases.
            self.holds.fetch_add(1, SeqCst);
        }
        let _g = self.lock();
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    /// Spins (yielding) until `cond`, failing after 10 s: a readiness check, not a sleep.
    fn until(cond: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < end, "condition never became true");
            thread::yield_now();
        }
    }

    /// A thread entering the gate; reports once it got through.
    fn enterer(g: &Arc<Gate>) -> (mpsc::Receiver<bool>, thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let g = g.clone();
        let t = thread::spawn(move || {
            let r = g.enter().map(|_| ());
            tx.send(r.is_ok()).unwrap();
        });
        (rx, t)
    }

    #[test]
    fn a_hold_blocks_new_requests_until_dropped() {
        let g = Arc::new(Gate::default());
        assert!(g.try_enter().is_some());
        let h = g.hold();
        assert!(g.is_closed());
        assert!(g.try_enter().is_none());
        let (rx, t) = enterer(&g);
        until(|| g.waiting() == 1);
        assert!(rx.try_recv().is_err(), "passed a held gate");
        drop(h);
        assert!(rx.recv().unwrap());
        t.join().unwrap();
        assert!(!g.is_closed());
        assert_eq!((g.holds(), g.waiting(), g.inflight()), (0, 0, 0));
    }

    #[test]
    fn drain_waits_for_requests_in_flight() {
        let g = Arc::new(Gate::default());
        let p = g.enter().unwrap();
        let h = g.hold();
        assert!(
            !h.drain(Some(Instant::now())),
            "drained with a request in flight"
        );
        let g2 = g.clone();
        let (tx, rx) = mpsc::channel();
        let t = thread::spawn(move || {
            let h2 = g2.hold();
            tx.send(h2.drain(None)).unwrap();
        });
        until(|| g.holds() == 2);
        assert!(rx.try_recv().is_err());
        drop(p);
        assert!(rx.recv().unwrap());
        t.join().unwrap();
        assert!(h.drain(Some(Instant::now())));
    }

    #[test]
    fn holds_are_counted_and_released_in_either_order() {
        for first_a in [true, false] {
            let g = Arc::new(Gate::default());
            let a = g.hold();
            let b = g.hold();
            let (rx, t) = enterer(&g);
            until(|| g.waiting() == 1);
            let (first, second) = if first_a { (a, b) } else { (b, a) };
            drop(first);
            assert!(g.is_closed(), "one hold left");
            assert_eq!(g.waiting(), 1);
            assert!(rx.try_recv().is_err(), "admitted while still held");
            drop(second);
            assert!(rx.recv().unwrap());
            t.join().unwrap();
        }
    }

    #[test]
    fn a_panic_releases_its_hold() {
        let g = Arc::new(Gate::default());
        let g2 = g.clone();
        let r = thread::spawn(move || {
            let _h = g2.hold();
            panic!("owner died");
        })
        .join();
        assert!(r.is_err());
        assert!(!g.is_closed());
        assert!(g.try_enter().is_some());
    }

    #[test]
    fn shut_refuses_waiters_and_outlasts_every_hold() {
        let g = Arc::new(Gate::default());
        let h = g.hold();
        let (rx, t) = enterer(&g);
        until(|| g.waiting() == 1);
        g.shut();
        assert!(!rx.recv().unwrap(), "a waiter is refused at shutdown");
        t.join().unwrap();
        drop(h);
        assert!(g.is_closed());
        assert!(g.enter().is_err());
        g.shut();
        assert_eq!(g.holds(), 1);
    }
}
