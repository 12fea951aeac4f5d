//! Pure decisions of a migration, with time passed in: retry back-off, the
//! speed limit, the speed estimate and when to switch to active mirroring.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Delay before retry `n` (1-based): 1 s doubling up to 30 s.
pub fn backoff(n: u32) -> Duration {
    let secs = 1u64 << n.saturating_sub(1).min(5);
    Duration::from_secs(secs.min(30))
}

/// Paces bytes to a limit in bytes per second (no limit when `None` or 0).
#[derive(Debug, Clone)]
pub struct RateLimit {
    bps: Option<u64>,
    next_free: Option<Instant>,
}

impl RateLimit {
    pub fn new(bps: Option<u64>) -> RateLimit {
        RateLimit {
            bps: bps.filter(|&b| b > 0),
            next_free: None,
        }
    }

    pub fn limit(&self) -> Option<u64> {
        self.bps
    }

    pub fn set(&mut self, bps: Option<u64>) {
        self.bps = bps.filter(|&b| b > 0);
        self.next_free = None;
    }

    /// Largest piece worth sending at once under the limit (a quarter second's worth).
    pub fn piece(&self, max: u64) -> u64 {
        match self.bps {
            Some(b) => (b / 4).clamp(4096, max.max(4096)).min(max),
            None => max,
        }
    }

    /// Accounts `bytes` to be sent; returns how long to wait before sending them.
    pub fn reserve(&mut self, bytes: u64, now: Instant) -> Duration {
        let Some(bps) = self.bps else {
            return Duration::ZERO;
        };
        let start = match self.next_free {
            Some(t) if t > now => t,
            _ => now,
        };
        let cost = Duration::from_secs_f64(bytes as f64 / bps as f64);
        self.next_free = Some(start + cost);
        start - now
    }
}

/// Bytes per second over a sliding window.
#[derive(Debug, Clone)]
pub struct SpeedMeter {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
    total: u64,
}

impl SpeedMeter {
    pub fn new(window: Duration) -> SpeedMeter {
        SpeedMeter {
            window,
            samples: VecDeque::new(),
            total: 0,
        }
    }

    pub fn add(&mut self, bytes: u64, now: Instant) {
        self.samples.push_back((now, bytes));
        self.total += bytes;
        self.expire(now);
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(t, b)) = self.samples.front() {
            if now.duration_since(t) <= self.window {
                break;
            }
            self.samples.pop_front();
            self.total -= b;
        }
    }

    /// Bytes per second over the window ending at `now`, measured from
    /// `started` when that is more recent.
    pub fn rate(&mut self, now: Instant, started: Instant) -> u64 {
        self.expire(now);
        let span = now.duration_since(started).min(self.window).as_secs_f64();
        if span < 0.05 {
            return 0;
        }
        (self.total as f64 / span) as u64
    }
}

/// Decides, pass after pass, when copying dirty data has stopped paying off
/// and client writes must be mirrored synchronously instead.
#[derive(Debug, Clone)]
pub struct Convergence {
    passes: u32,
    last_remaining: Option<u64>,
}

/// Most copy passes over the dirty map before switching to active mirroring.
pub const MAX_PASSES: u32 = 8;
/// Dirty data small enough to finish under active mirroring at once.
pub const SMALL_REMAINDER: u64 = 8 << 20;

impl Default for Convergence {
    fn default() -> Self {
        Convergence::new()
    }
}

impl Convergence {
    pub fn new() -> Convergence {
        Convergence {
            passes: 0,
            last_remaining: None,
        }
    }

    /// Called after each pass with the dirty bytes left; true means switch to
    /// active mirroring now.
    pub fn after_pass(&mut self, remaining: u64) -> bool {
        self.passes += 1;
        let shrinking = match self.last_remaining {
            // Keep passing only while each pass at least halves what is left.
            Some(prev) => remaining < prev / 2,
            None => true,
        };
        self.last_remaining = Some(remaining);
        remaining <= SMALL_REMAINDER || !shrinking || self.passes >= MAX_PASSES
    }

    pub fn passes(&self) -> u32 {
        self.passes
    }
}

/// Seconds left at `speed` bytes per second (0 when the speed is unknown).
pub fn seconds_left(bytes_left: u64, speed: u64) -> u64 {
    if speed == 0 {
        0
    } else {
        bytes_left.div_ceil(speed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_thirty() {
        let s: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(s, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX).as_secs(), 30);
    }

    #[test]
    fn rate_limit_paces() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(Some(1000));
        assert_eq!(r.reserve(500, t0), Duration::ZERO);
        assert_eq!(r.reserve(500, t0), Duration::from_millis(500));
        // After the backlog has passed, no wait.
        assert_eq!(r.reserve(10, t0 + Duration::from_secs(5)), Duration::ZERO);
        let mut none = RateLimit::new(None);
        assert_eq!(none.reserve(1 << 30, t0), Duration::ZERO);
        assert_eq!(RateLimit::new(Some(0)).limit(), None);
        assert_eq!(RateLimit::new(Some(4_000_000)).piece(8 << 20), 1_000_000);
        assert_eq!(RateLimit::new(Some(100)).piece(8 << 20), 4096);
    }

    #[test]
    fn speed_over_window() {
        let t0 = Instant::now();
        let mut m = SpeedMeter::new(Duration::from_secs(2));
        m.add(1000, t0);
        m.add(1000, t0 + Duration::from_secs(1));
        assert_eq!(m.rate(t0 + Duration::from_secs(1), t0), 2000);
        m.add(1000, t0 + Duration::from_secs(4));
        assert_eq!(m.rate(t0 + Duration::from_secs(4), t0), 500);
    }

    #[test]
    fn convergence_switches_when_not_shrinking() {
        let mut c = Convergence::new();
        assert!(!c.after_pass(1 << 30));
        assert!(!c.after_pass(100 << 20));
        assert!(c.after_pass(90 << 20));
        let mut c = Convergence::new();
        assert!(c.after_pass(1 << 20));
        let mut c = Convergence::new();
        let mut v = 1u64 << 40;
        let mut n = 0;
        while !c.after_pass(v) {
            v /= 3;
            n += 1;
        }
        assert!(n < MAX_PASSES);
    }

    #[test]
    fn eta() {
        assert_eq!(seconds_left(100, 0), 0);
        assert_eq!(seconds_left(101, 10), 11);
    }
}
