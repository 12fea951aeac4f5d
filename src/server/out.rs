//! Reply bytes gathered by one worker and sent with a single write.

use super::conn::SendLimit;
use crate::stream::Stream;
use std::io;
use std::sync::Mutex;

/// Capacity of a worker's reply buffer.
pub const OUT_CAP: usize = 1 << 20;
/// Largest read answered from the reply buffer in one piece; longer reads are streamed.
pub const MAX_BUFFERED_READ: usize = OUT_CAP - 64 * 1024;

/// A reusable, already-initialised buffer (no zero-filling per reply).
pub struct Out {
    buf: Box<[u8]>,
    used: usize,
}

impl Out {
    pub fn new() -> Out {
        Out {
            buf: vec![0u8; OUT_CAP].into_boxed_slice(),
            used: 0,
        }
    }

    pub fn room(&self) -> usize {
        self.buf.len() - self.used
    }

    /// Position to roll back to with [`truncate`](Self::truncate).
    pub fn mark(&self) -> usize {
        self.used
    }

    pub fn truncate(&mut self, mark: usize) {
        self.used = mark.min(self.used);
    }

    /// Appends bytes; the caller has checked [`room`](Self::room).
    pub fn push(&mut self, b: &[u8]) {
        self.buf[self.used..self.used + b.len()].copy_from_slice(b);
        self.used += b.len();
    }

    /// Claims `n` bytes to be filled in place.
    pub fn claim(&mut self, n: usize) -> &mut [u8] {
        let s = self.used;
        self.used += n;
        &mut self.buf[s..s + n]
    }

    /// Sends everything gathered, under the connection's writer lock,
    /// within the send limit.
    pub fn send(&mut self, conn: &Stream, writer: &Mutex<()>, limit: SendLimit) -> io::Result<()> {
        if self.used == 0 {
            return Ok(());
        }
        let _g = writer.lock().unwrap_or_else(|p| p.into_inner());
        let r = conn.send_all(&self.buf[..self.used], limit.deadline());
        self.used = 0;
        r
    }
}

impl Default for Out {
    fn default() -> Self {
        Out::new()
    }
}
