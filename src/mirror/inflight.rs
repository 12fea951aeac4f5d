//! Ranges with a write to the destination in flight. At most one write per
//! block is ever in flight, so the destination cannot apply two writes to the
//! same block out of order: a client write that would overlap one is left to
//! the dirty map instead of being forwarded.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

#[derive(Default)]
struct State {
    next: u64,
    ranges: Vec<(u64, u64, u64)>, // (id, offset, end)
    closed: bool,
}

/// The set of in-flight ranges of one migration attempt.
#[derive(Default)]
pub struct Inflight {
    state: Mutex<State>,
    cv: Condvar,
}

/// Registration of one range; dropping it ends the registration.
pub struct Claim {
    set: Arc<Inflight>,
    id: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut s = self.set.state.lock().unwrap_or_else(|p| p.into_inner());
        s.ranges.retain(|r| r.0 != self.id);
        self.set.cv.notify_all();
    }
}

fn overlaps(s: &State, off: u64, end: u64) -> bool {
    s.ranges.iter().any(|&(_, o, e)| o < end && off < e)
}

impl Inflight {
    pub fn new() -> Arc<Inflight> {
        Arc::new(Inflight::default())
    }

    fn add(self: &Arc<Self>, s: &mut State, off: u64, end: u64) -> Claim {
        s.next += 1;
        s.ranges.push((s.next, off, end));
        Claim {
            set: self.clone(),
            id: s.next,
        }
    }

    /// Claims the range if nothing overlapping is in flight (and the set is open).
    pub fn try_claim(self: &Arc<Self>, off: u64, len: u64) -> Option<Claim> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let end = off.saturating_add(len);
        if s.closed || overlaps(&s, off, end) {
            return None;
        }
        Some(self.add(&mut s, off, end))
    }

    /// Claims the range, waiting for overlapping claims to end (until
    /// `until`, when given). `None` once closed or at the deadline.
    pub fn claim(self: &Arc<Self>, off: u64, len: u64, until: Option<Instant>) -> Option<Claim> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let end = off.saturating_add(len);
        let (mut s, free) =
            crate::wait::until(&self.cv, s, until, |s| s.closed || !overlaps(s, off, end));
        if s.closed || !free {
            return None;
        }
        Some(self.add(&mut s, off, end))
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed
    }

    /// Refuses further claims and wakes waiters.
    pub fn close(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.closed = true;
        self.cv.notify_all();
    }

    pub fn is_empty(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ranges
            .is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn overlapping_claims_exclude_each_other() {
        let f = Inflight::new();
        let a = f.try_claim(0, 4096).unwrap();
        assert!(f.try_claim(4095, 10).is_none());
        let b = f.try_claim(4096, 4096).unwrap();
        drop(a);
        assert!(f.try_claim(0, 4096).is_some());
        drop(b);
        assert!(f.is_empty());
    }

    #[test]
    fn claim_waits_for_overlap_to_end() {
        let f = Inflight::new();
        let a = f.try_claim(0, 100).unwrap();
        let f2 = f.clone();
        let t = std::thread::spawn(move || f2.claim(50, 100, None).is_some());
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished());
        drop(a);
        assert!(t.join().unwrap());
    }

    #[test]
    fn close_wakes_waiters() {
        let f = Inflight::new();
        let _a = f.try_claim(0, 100).unwrap();
        let f2 = f.clone();
        let t = std::thread::spawn(move || f2.claim(0, 100, None).is_none());
        f.close();
        assert!(t.join().unwrap());
        assert!(f.try_claim(500, 1).is_none());
        assert!(f.is_closed());
    }

    #[test]
    fn claim_gives_up_at_its_deadline() {
        let f = Inflight::new();
        let _a = f.try_claim(0, 100).unwrap();
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(f.claim(10, 10, Some(soon)).is_none());
        assert!(!f.is_closed());
        assert!(f.claim(100, 10, Some(Instant::now())).is_some());
    }
}
