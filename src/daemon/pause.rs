//! Pauses: every pause is a lease on a hold of the export's gate. A lease
//! ends when it is resumed, when its timeout passes (a reaper thread ends
//! it and logs so), or, for a held pause, when its owner's control
//! connection closes (its [`Ticket`] is dropped). The image is paused while
//! any lease is left; the gate reopens when the last one ends.

use crate::gate::{Gate, Hold};
use crate::wait;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A pause this long gets a warning: kernel clients and VMs time out.
pub const LONG_PAUSE: Duration = Duration::from_secs(30);

/// Who owns a pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// `pause`: until `resume` or the timeout.
    Timed,
    /// `pause --hold`: until its control connection closes, `resume` or the timeout.
    Held,
    /// The nbdkit-style pause-control socket: until `r` or the timeout.
    PauseControl,
}

struct Lease {
    id: u64,
    owner: Owner,
    started: Instant,
    deadline: Instant,
    _hold: Hold,
}

#[derive(Default)]
struct Inner {
    leases: Vec<Lease>,
    next: u64,
    /// When the image was paused (the first of the current leases began).
    since: Option<Instant>,
    warned: bool,
    stopped: bool,
}

/// The pauses of one export.
pub struct Pauses {
    gate: Arc<Gate>,
    inner: Mutex<Inner>,
    cv: Condvar,
}

/// What `status` shows of a pause.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PauseState {
    pub paused_for: Duration,
    pub holds: usize,
}

impl Pauses {
    /// The pauses of the export behind `gate`, with their reaper thread.
    pub fn start(gate: Arc<Gate>) -> std::io::Result<Arc<Pauses>> {
        let p = Arc::new(Pauses {
            gate,
            inner: Mutex::new(Inner::default()),
            cv: Condvar::new(),
        });
        let r = p.clone();
        std::thread::Builder::new()
            .name("pauses".into())
            .spawn(move || r.reap())?;
        Ok(p)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a new lease (the gate closes now); its id.
    pub fn add(&self, owner: Owner, timeout: Duration) -> u64 {
        let now = Instant::now();
        let mut g = self.lock();
        g.next += 1;
        let id = g.next;
        if g.leases.is_empty() {
            g.since = Some(now);
            g.warned = false;
        }
        g.leases.push(Lease {
            id,
            owner,
            started: now,
            deadline: now + timeout,
            _hold: self.gate.hold(),
        });
        self.cv.notify_all();
        id
    }

    /// Ends lease `id`; false if it had already ended.
    pub fn release(&self, id: u64, why: &str) -> bool {
        let mut g = self.lock();
        let Some(i) = g.leases.iter().position(|l| l.id == id) else {
            return false;
        };
        let l = g.leases.remove(i);
        self.ended(&mut g, l, why);
        true
    }

    /// Ends every lease of `owner` (every lease with `None`); how many.
    pub fn release_all(&self, owner: Option<Owner>, why: &str) -> usize {
        let mut g = self.lock();
        let (gone, kept): (Vec<Lease>, Vec<Lease>) = std::mem::take(&mut g.leases)
            .into_iter()
            .partition(|l| owner.is_none_or(|o| l.owner == o));
        g.leases = kept;
        let n = gone.len();
        for l in gone {
            self.ended(&mut g, l, why);
        }
        n
    }

    fn ended(&self, g: &mut Inner, l: Lease, why: &str) {
        info!(
            "pause {} ended ({why}) after {:.3} s",
            l.id,
            l.started.elapsed().as_secs_f64()
        );
        drop(l);
        if g.leases.is_empty() {
            if let Some(t) = g.since.take() {
                info!("resumed after {:.3} s paused", t.elapsed().as_secs_f64());
            }
        }
    }

    /// Whether lease `id` is still in force.
    pub fn is_active(&self, id: u64) -> bool {
        self.lock().leases.iter().any(|l| l.id == id)
    }

    /// Whether a lease of `owner` is in force.
    pub fn has(&self, owner: Owner) -> bool {
        self.lock().leases.iter().any(|l| l.owner == owner)
    }

    pub fn is_paused(&self) -> bool {
        !self.lock().leases.is_empty()
    }

    pub fn state(&self) -> Option<PauseState> {
        let g = self.lock();
        g.since
            .filter(|_| !g.leases.is_empty())
            .map(|t| PauseState {
                paused_for: t.elapsed(),
                holds: g.leases.len(),
            })
    }

    /// Ends every lease and the reaper (at shutdown).
    pub fn stop(&self) {
        self.release_all(None, "shutting down");
        self.lock().stopped = true;
        self.cv.notify_all();
    }

    /// Ends leases whose time is up, and warns once about a long pause.
    fn reap(&self) {
        let mut g = self.lock();
        loop {
            if g.stopped {
                return;
            }
            let now = Instant::now();
            let expired: Vec<u64> = g
                .leases
                .iter()
                .filter(|l| l.deadline <= now)
                .map(|l| l.id)
                .collect();
            for id in expired {
                if let Some(i) = g.leases.iter().position(|l| l.id == id) {
                    let l = g.leases.remove(i);
                    warn!(
                        "pause {id} reached its timeout of {:.3} s: resuming",
                        (l.deadline - l.started).as_secs_f64()
                    );
                    self.ended(&mut g, l, "timed out");
                }
            }
            if let Some(t) = g.since {
                if !g.warned && now.duration_since(t) >= LONG_PAUSE {
                    warn!(
                        "the image has been paused for {:.0} s: clients (kernel NBD, VMs) may \
                         time out",
                        now.duration_since(t).as_secs_f64()
                    );
                    g.warned = true;
                }
            }
            let mut next = g.leases.iter().map(|l| l.deadline).min();
            if let (Some(t), false) = (g.since, g.warned) {
                next = Some(next.map_or(t + LONG_PAUSE, |n| n.min(t + LONG_PAUSE)));
            }
            let before = (g.next, g.leases.len());
            g = wait::until(&self.cv, g, next, |i| {
                i.stopped || (i.next, i.leases.len()) != before
            })
            .0;
        }
    }
}

/// A held pause: ends when dropped (its control connection closed).
pub struct Ticket {
    pub pauses: Arc<Pauses>,
    pub id: u64,
}

impl Ticket {
    /// Whether the pause ended by other means (timeout, `resume`).
    pub fn ended(&self) -> bool {
        !self.pauses.is_active(self.id)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.pauses
            .release(self.id, "its control connection closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_counted_and_expire() {
        let gate = Arc::new(Gate::default());
        let p = Pauses::start(gate.clone()).unwrap();
        let a = p.add(Owner::Timed, Duration::from_secs(60));
        let b = p.add(Owner::Held, Duration::from_millis(1));
        assert!(gate.is_closed());
        // The reaper ends `b` at its deadline; `a` stays.
        let end = Instant::now() + Duration::from_secs(10);
        while p.is_active(b) {
            assert!(Instant::now() < end, "lease never expired");
            std::thread::yield_now();
        }
        assert!(p.is_active(a) && gate.is_closed());
        assert_eq!(p.state().unwrap().holds, 1);
        assert!(p.release(a, "test"));
        assert!(!p.release(a, "test"), "released twice");
        assert!(!gate.is_closed() && p.state().is_none());
        let t = Ticket {
            pauses: p.clone(),
            id: p.add(Owner::Held, Duration::from_secs(60)),
        };
        assert!(gate.is_closed() && !t.ended());
        drop(t);
        assert!(!gate.is_closed());
        p.add(Owner::PauseControl, Duration::from_secs(60));
        p.add(Owner::Timed, Duration::from_secs(60));
        assert_eq!(p.release_all(Some(Owner::PauseControl), "r"), 1);
        assert!(gate.is_closed());
        p.stop();
        assert!(!gate.is_closed());
    }
}
