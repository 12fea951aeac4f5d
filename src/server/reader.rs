//! Buffered reading of requests and payloads from a client connection.

use super::validate::{block_status_payload, Refusal, MAX_BLOCK_STATUS_PAYLOAD};
use crate::proto::consts::{EXTENDED_REQUEST_LEN, REQUEST_LEN};
use crate::proto::{ProtoError, Request};
use crate::stream::Stream;
use std::io::{self, Read};
use std::time::Instant;

const BUF_LEN: usize = 128 * 1024;
/// Most bytes taken from the socket at once while looking for a request: enough
/// for dozens of small requests, while most of a large write's payload is read
/// straight into its own buffer instead of being copied through this one.
const FILL_MAX: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("client closed the connection")]
    Eof,
    #[error("no complete request from the client within the idle limit")]
    Idle,
    #[error("{0}")]
    Proto(#[from] ProtoError),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl ReadError {
    fn from_io(e: io::Error) -> ReadError {
        match e.kind() {
            io::ErrorKind::ConnectionReset => ReadError::Eof,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ReadError::Idle,
            _ => ReadError::Io(e),
        }
    }
}

/// One `read(2)` from the connection, failing with [`ReadError::Idle`] once
/// `deadline` has passed.
fn recv(conn: &Stream, deadline: Option<Instant>, dst: &mut [u8]) -> Result<usize, ReadError> {
    if let Some(d) = deadline {
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::Idle);
        }
        conn.set_read_timeout(Some(left))?;
    }
    let mut c = conn;
    loop {
        match c.read(dst) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::from_io(e)),
        }
    }
}

/// Reads requests through a buffer so that one `recv` serves many small requests.
pub struct Reader {
    conn: Stream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Reads fail with [`ReadError::Idle`] past this instant.
    deadline: Option<Instant>,
    /// Requests come with extended (32-byte) headers.
    extended: bool,
}

impl Reader {
    pub fn new(conn: Stream) -> Reader {
        Reader {
            conn,
            buf: vec![0u8; BUF_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
            deadline: None,
            extended: false,
        }
    }

    /// Requests come with extended headers from now on (as agreed).
    pub fn set_extended(&mut self, extended: bool) {
        self.extended = extended;
    }

    /// Bytes of a request header on this connection.
    pub fn header_len(&self) -> usize {
        match self.extended {
            true => EXTENDED_REQUEST_LEN,
            false => REQUEST_LEN,
        }
    }

    /// Bounds every read from now on: past `deadline` they fail with
    /// [`ReadError::Idle`], however many bytes trickle in meanwhile. `None`
    /// removes the bound (and costs nothing per read).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        if deadline.is_none() && self.deadline.is_some() {
            let _ = self.conn.set_read_timeout(None);
        }
        self.deadline = deadline;
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads more bytes from the connection; `Eof` when it is closed.
    fn fill(&mut self) -> Result<(), ReadError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < FILL_MAX {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let limit = (self.end + FILL_MAX).min(self.buf.len());
        match recv(&self.conn, self.deadline, &mut self.buf[self.end..limit])? {
            0 => Err(ReadError::Eof),
            n => {
                self.end += n;
                Ok(())
            }
        }
    }

    /// The next request header without consuming it. With `wait`, blocks until
    /// one arrives; without, returns `None` unless a whole header is buffered.
    pub fn peek(&mut self, wait: bool) -> Result<Option<Request>, ReadError> {
        let mut yielded = false;
        loop {
            if let Some((req, _)) = Request::decode(self.buffered(), self.extended)? {
                return Ok(Some(req));
            }
            if !wait {
                return Ok(None);
            }
            if !yielded {
                // Before sleeping in recv, let the client (or whoever shares
                // this CPU) run: its next requests are then often there
                // already, and a sleep and a wake-up are saved.
                std::thread::yield_now();
                yielded = true;
            }
            self.fill()?;
        }
    }

    /// The handle field of the buffered header (valid after `peek` failed on a
    /// bad magic, when a whole header is buffered).
    pub fn raw_cookie(&self) -> Option<u64> {
        let b = self.buffered();
        (b.len() >= 16).then(|| {
            let mut c = [0u8; 8];
            c.copy_from_slice(&b[8..16]);
            u64::from_be_bytes(c)
        })
    }

    /// Consumes the header returned by the last `peek`.
    pub fn consume_header(&mut self) {
        self.start += self.header_len();
    }

    /// How many bytes are buffered past the current position.
    pub fn buffered_len(&self) -> usize {
        self.end - self.start
    }

    /// Fills `dst` from the buffer, then straight from the connection.
    pub fn read_exact(&mut self, dst: &mut [u8]) -> Result<(), ReadError> {
        let have = self.buffered_len().min(dst.len());
        dst[..have].copy_from_slice(&self.buf[self.start..self.start + have]);
        self.start += have;
        let mut done = have;
        while done < dst.len() {
            match recv(&self.conn, self.deadline, &mut dst[done..])? {
                0 => return Err(ReadError::Eof),
                n => done += n,
            }
        }
        Ok(())
    }

    /// A BLOCK_STATUS that carries a payload (`PAYLOAD_LEN`, extended
    /// headers), whose header the last `peek` returned: consumes the header
    /// and the payload and gives the request as the plain range it names,
    /// or why it is refused. A payload too long to be one is a protocol
    /// error (nothing after it can be trusted).
    pub fn block_status_with_payload(
        &mut self,
        req: &Request,
    ) -> Result<Result<Request, Refusal>, ReadError> {
        if req.length > MAX_BLOCK_STATUS_PAYLOAD {
            return Err(ReadError::Proto(ProtoError::TooLong {
                what: "BLOCK_STATUS payload",
                len: req.length,
                max: MAX_BLOCK_STATUS_PAYLOAD,
            }));
        }
        self.consume_header();
        let mut p = vec![0u8; req.length as usize];
        self.read_exact(&mut p)?;
        Ok(block_status_payload(req, &p))
    }

    /// Reads and drops `n` bytes (the payload of a refused write).
    pub fn skip(&mut self, mut n: u64) -> Result<(), ReadError> {
        while n > 0 {
            if self.start == self.end {
                self.fill()?;
            }
            let take = (self.buffered_len() as u64).min(n) as usize;
            self.start += take;
            n -= take as u64;
        }
        Ok(())
    }
}
