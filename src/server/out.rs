//! Reply bytes gathered by one worker and sent with a single write.

use super::conn::SendLimit;
use crate::stream::Stream;
use std::io;
use std::sync::Mutex;

/// Capacity of a worker's reply buffer.
pub const OUT_CAP: usize = 1 << 20;
/// Bytes of buffer kept between batches; a batch that needed more gives the
/// rest back once sent, so an idle connection holds little memory.
const KEEP: usize = 256 << 10;
/// Largest read answered from the reply buffer in one piece; longer reads are streamed.
pub const MAX_BUFFERED_READ: usize = OUT_CAP - 64 * 1024;

/// A reusable buffer of up to [`OUT_CAP`] bytes, grown as replies need it
/// and initialised once (no zero-filling per reply).
pub struct Out {
    buf: Vec<u8>,
    used: usize,
}

impl Out {
    pub fn new() -> Out {
        Out {
            buf: Vec::new(),
            used: 0,
        }
    }

    pub fn room(&self) -> usize {
        OUT_CAP - self.used
    }

    /// Makes the first `n` bytes past `used` addressable.
    fn grow(&mut self, n: usize) {
        let want = self.used + n;
        if self.buf.len() < want {
            self.buf
                .resize(want.next_power_of_two().clamp(4096, OUT_CAP.max(want)), 0);
        }
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
        self.grow(b.len());
        self.buf[self.used..self.used + b.len()].copy_from_slice(b);
        self.used += b.len();
    }

    /// Claims `n` bytes to be filled in place.
    pub fn claim(&mut self, n: usize) -> &mut [u8] {
        self.grow(n);
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
        if self.buf.len() > KEEP {
            self.buf.truncate(KEEP);
            self.buf.shrink_to_fit();
        }
        r
    }
}

impl Default for Out {
    fn default() -> Self {
        Out::new()
    }
}
