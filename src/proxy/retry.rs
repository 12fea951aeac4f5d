//! The retry policy of an upstream connection (pure): how many attempts a
//! round of reconnecting makes and how long it waits before each, as
//! nbdkit's retry filter (5 retries, 2 s, doubling: about a minute in all).

use std::time::Duration;

/// Longest wait before one attempt, however far the doubling goes.
const MAX_DELAY: Duration = Duration::from_secs(3600);

/// `--retries`, `--retry-delay`, `--retry-exponential`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retry {
    /// Attempts per round after a failure (0: fail at once).
    pub retries: u32,
    /// Wait before the first attempt.
    pub delay: Duration,
    /// Double the wait before each further attempt.
    pub exponential: bool,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            retries: 5,
            delay: Duration::from_secs(2),
            exponential: true,
        }
    }
}

impl Retry {
    /// The wait before attempt `n` (0-based) of a round, or `None` when the
    /// round is over (retries exhausted).
    pub fn delay_before(&self, n: u32) -> Option<Duration> {
        if n >= self.retries {
            return None;
        }
        if !self.exponential {
            return Some(self.delay);
        }
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        Some(
            self.delay
                .checked_mul(factor)
                .unwrap_or(MAX_DELAY)
                .min(MAX_DELAY),
        )
    }

    /// How long a whole round waits in all (the time until the pending
    /// requests get EIO when the upstream never comes back, connect
    /// attempts aside).
    pub fn total(&self) -> Duration {
        (0..self.retries)
            .filter_map(|n| self.delay_before(n))
            .fold(Duration::ZERO, |a, d| a.saturating_add(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_wait_about_a_minute() {
        let r = Retry::default();
        let waits: Vec<_> = (0..6).map(|n| r.delay_before(n)).collect();
        let s = Duration::from_secs;
        assert_eq!(
            waits,
            vec![
                Some(s(2)),
                Some(s(4)),
                Some(s(8)),
                Some(s(16)),
                Some(s(32)),
                None
            ]
        );
        assert_eq!(r.total(), s(62));
    }

    #[test]
    fn constant_and_none() {
        let r = Retry {
            retries: 3,
            delay: Duration::from_millis(250),
            exponential: false,
        };
        assert_eq!(r.delay_before(2), Some(Duration::from_millis(250)));
        assert_eq!(r.delay_before(3), None);
        assert_eq!(r.total(), Duration::from_millis(750));
        let none = Retry { retries: 0, ..r };
        assert_eq!(none.delay_before(0), None);
        assert_eq!(none.total(), Duration::ZERO);
    }

    #[test]
    fn doubling_is_capped() {
        let r = Retry {
            retries: 100,
            delay: Duration::from_secs(2),
            exponential: true,
        };
        assert_eq!(r.delay_before(99), Some(MAX_DELAY));
        assert_eq!(r.delay_before(12), Some(MAX_DELAY));
        assert_eq!(r.delay_before(10), Some(Duration::from_secs(2048)));
    }
}
