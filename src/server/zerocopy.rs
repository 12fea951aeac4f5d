//! Read replies sent straight from the page cache with `sendfile(2)`: the
//! data is not copied through the server's memory.

use super::conn::{is_timeout, send_by, timed_out};
use super::exec::errno;
use super::out::MAX_BUFFERED_READ;
use super::session::{Session, Worker};
use crate::export;
use crate::proto::Request;
use crate::sys;
use std::io;
use std::time::Instant;

/// Reads at least this long are sent with `sendfile`.
pub(super) const ZERO_COPY_MIN: usize = 64 * 1024;

/// Zeroes for the part of a reply past the end of a file that shrank.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

impl Session {
    /// Writes a small header that the data will follow at once.
    pub(super) fn send_header(&self, hdr: &[u8]) -> io::Result<()> {
        let (true, Some(fd)) = (self.conn.is_tcp(), self.conn.plain_fd()) else {
            return self.send_all(hdr);
        };
        send_by(hdr.len(), self.send.deadline(), |done| {
            sys::send_more(fd, &hdr[done..])
        })
    }

    /// Sends `len` bytes of the image at `off` after a header already sent.
    /// The outer error ends the connection; the inner one is a failure to read
    /// the image after some bytes were sent (the rest is padded with zeroes).
    /// Each reply-buffer's worth must go out within the send limit.
    pub(super) fn splice(&self, off: u64, len: usize) -> io::Result<Result<(), export::Error>> {
        let (Some(file), Some(sock)) = (self.export.sendfile_source(), self.conn.plain_fd()) else {
            return self.copy_out(off, len);
        };
        let mut sent = 0usize;
        let mut failed = None;
        let mut deadline = self.send.deadline();
        let mut piece_end = len.min(MAX_BUFFERED_READ);
        while sent < len {
            if failed.is_none() {
                match sys::sendfile(sock, file, off + sent as u64, len - sent) {
                    Ok(0) => failed = Some(Ok(())), // past the end: zeroes follow
                    Ok(n) => {
                        sent += n;
                        if sent >= piece_end {
                            deadline = self.send.deadline();
                            piece_end = sent + MAX_BUFFERED_READ;
                        } else if Instant::now() >= deadline {
                            return Err(timed_out("sending to the client"));
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if is_timeout(&e) => {
                        if Instant::now() >= deadline {
                            return Err(timed_out("sending to the client"));
                        }
                        continue;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => failed = Some(Err(e)),
                    Err(e) => return Err(e),
                }
            }
            let n = (len - sent).min(ZEROES.len());
            self.send_all(&ZEROES[..n])?;
            sent += n;
        }
        Ok(match failed {
            Some(Err(e)) => Err(export::Error::Io(e)),
            _ => Ok(()),
        })
    }

    /// [`splice`](Self::splice) for a backend without a descriptor to send
    /// from: the data is read into a buffer and sent, piece by piece.
    fn copy_out(&self, off: u64, len: usize) -> io::Result<Result<(), export::Error>> {
        let mut buf = vec![0u8; len.min(ZEROES.len())];
        let mut sent = 0usize;
        let mut failed = None;
        while sent < len {
            let n = (len - sent).min(buf.len());
            if failed.is_none() {
                if let Err(e) = self.export.read(&mut buf[..n], off + sent as u64) {
                    buf.fill(0);
                    failed = Some(e);
                }
            }
            self.send_all(&buf[..n])?;
            sent += n;
        }
        Ok(failed.map_or(Ok(()), Err))
    }

    /// A whole read reply (one data chunk, or a simple reply) sent with `sendfile`.
    pub(super) fn read_zero_copy(&self, w: &mut Worker, req: &Request) -> io::Result<()> {
        let len = req.length as usize;
        w.out.send(&self.conn, &self.writer, self.send)?;
        let _g = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.replies(req);
        if self.neg.structured() {
            // Not final: a read error can still show up while the data goes out.
            self.send_header(&r.data(req.offset, len as u32, false))?;
            match self.splice(req.offset, len)? {
                Ok(()) => self.send_all(&r.ok()),
                Err(e) => self.send_all(&r.error(errno(&e), &e.to_string())),
            }
        } else {
            self.send_header(&r.ok())?;
            match self.splice(req.offset, len)? {
                Ok(()) => Ok(()),
                // The reply already promised the data: only a hard disconnect is left.
                Err(e) => Err(io::Error::other(format!("read failed mid-reply: {e}"))),
            }
        }
    }
}
