//! The deadlines a client connection's handshake and replies are held to.

pub use crate::stream::{is_timeout, send_by, timed_out, Deadline};
use std::time::{Duration, Instant};

/// How long a transmission-phase send may take in all. The socket's send
/// timeout is only a slice of it, so each call returns now and then and the
/// deadline is checked even while a slow reader keeps taking a byte at a time.
#[derive(Debug, Clone, Copy)]
pub struct SendLimit {
    pub total: Duration,
}

impl SendLimit {
    /// The socket send timeout that makes calls return to check the deadline.
    pub fn slice(&self) -> Duration {
        self.total.min(Duration::from_secs(1))
    }

    /// The deadline of a send starting now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.total
    }
}
