//! The deadlines a client connection's handshake and replies are held to.

use crate::stream::Stream;
pub use crate::stream::{is_timeout, send_by, timed_out};
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// A connection whose every read and write must be over by one deadline
/// (the handshake's): each call's socket timeout is the time left, so a
/// peer trickling one byte at a time gains nothing.
pub struct Deadline<'a> {
    conn: &'a Stream,
    at: Instant,
}

impl<'a> Deadline<'a> {
    pub fn new(conn: &'a Stream, at: Instant) -> Deadline<'a> {
        Deadline { conn, at }
    }

    fn left(&self) -> io::Result<Duration> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out("handshake"));
        }
        Ok(left)
    }
}

impl Read for &Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.conn.set_read_timeout(Some(self.left()?))?;
        (&*self.conn).read(buf).map_err(|e| match is_timeout(&e) {
            true => timed_out("handshake"),
            false => e,
        })
    }
}

impl Write for &Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.conn.set_write_timeout(Some(self.left()?))?;
        (&*self.conn).write(buf).map_err(|e| match is_timeout(&e) {
            true => timed_out("handshake"),
            false => e,
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

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
