//! The receiving half's input: replies read through a buffer (one `recv`
//! takes in many small replies), and READ data moved into a [`Pipe`] with
//! `splice(2)`, so a proxy can pass it on without copying it through user
//! memory.

use crate::stream::Stream;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Where reply bytes are read from, and whether READ data can be spliced.
pub(crate) trait ReplyInput: Read {
    /// Moves the next `n` bytes into `pipe` (which has room for them).
    fn splice_to(&mut self, _pipe: &Pipe, _n: usize) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl ReplyInput for &Stream {}

/// Replies are read through a buffer this large. Larger reads go straight
/// to their destination once the buffer is empty.
const BUF: usize = 64 * 1024;

/// While READ data goes into the pipe, a refill of the buffer takes no more
/// than the end of one reply (a 20-byte chunk) and the next one's header
/// with its offset, so the next reply's data is not copied through the
/// buffer before it is spliced.
const HEADER_AHEAD: usize = 64;

/// A buffered reader of a stream shared with the sending half.
#[derive(Debug)]
pub(crate) struct Input {
    stream: Arc<Stream>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// How much a refill of the buffer asks for.
    ahead: usize,
}

impl Input {
    pub(crate) fn new(stream: Arc<Stream>) -> Input {
        Input {
            stream,
            buf: vec![0u8; BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            ahead: BUF,
        }
    }

    /// A reply's data did not go into the pipe: refills take as much as
    /// is there again (many small replies per `recv`).
    pub(crate) fn read_ahead(&mut self) {
        self.ahead = BUF;
    }

    /// Bytes already read from the socket and not yet taken.
    pub(crate) fn buffered(&self) -> usize {
        self.end - self.start
    }
}

impl Read for Input {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            if out.len() >= self.buf.len() {
                return (&*self.stream).read(out);
            }
            self.start = 0;
            self.end = (&*self.stream).read(&mut self.buf[..self.ahead])?;
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

impl ReplyInput for Input {
    fn splice_to(&mut self, pipe: &Pipe, n: usize) -> io::Result<()> {
        let k = n.min(self.end - self.start);
        if k > 0 {
            pipe.put(&self.buf[self.start..self.start + k])?;
            self.start += k;
        }
        let mut left = n - k;
        let Some(from) = self.stream.plain_fd() else {
            return Err(io::ErrorKind::Unsupported.into());
        };
        // The replies that follow are likely READ data for the pipe too.
        self.ahead = HEADER_AHEAD;
        // The pipe's room is counted in slots, not bytes: data that arrived
        // in small pieces fills it before `capacity` bytes. What does not
        // fit waits in memory after it, so the pipe never has to be drained
        // before the reply is complete.
        while left > 0 {
            if pipe.spilling() {
                let mut rest = vec![0u8; left];
                self.read_exact(&mut rest)?;
                return pipe.put(&rest);
            }
            // The pipe's write end does not block: a full pipe is
            // `WouldBlock` (and so is an empty unix socket).
            match crate::sys::splice(from, pipe.w.as_fd(), left, true) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(m) => {
                    left -= m;
                    pipe.held.fetch_add(m, Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !crate::sys::writable_now(pipe.w.as_fd())? {
                        pipe.lock_spill().spilling = true;
                    } else if !crate::sys::wait_readable(from, self.stream.read_timeout())? {
                        // As a blocking read that reached the socket's timeout.
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A pipe that READ data waits in until it is passed on: kernel pages, not
/// a copy in user memory. Replies of at most [`Pipe::capacity`] bytes are
/// put in it; the part of one that finds the pipe full (its slots taken by
/// data that came in small pieces) waits in memory after what the pipe holds.
#[derive(Debug)]
pub struct Pipe {
    r: File,
    /// Non-blocking: a full pipe is noticed, never waited on.
    w: File,
    capacity: usize,
    /// Bytes in the kernel pipe.
    held: AtomicUsize,
    spill: Mutex<Spill>,
}

/// Bytes that follow those in the pipe.
#[derive(Debug, Default)]
struct Spill {
    /// The pipe was full: everything else of this reply goes to `data`.
    spilling: bool,
    data: Vec<u8>,
}

/// The pipe buffer asked for: the largest READ a proxy forwards.
const PIPE_WANTED: usize = 32 << 20;

impl Pipe {
    /// A pipe as large as the kernel allows, up to 32 MiB.
    pub fn new() -> io::Result<Pipe> {
        let (r, w) = crate::sys::pipe()?;
        crate::sys::set_nonblocking(w.as_fd())?;
        let capacity = [PIPE_WANTED, 1 << 20]
            .into_iter()
            .find_map(|len| crate::sys::set_pipe_size(w.as_fd(), len).ok())
            .unwrap_or(64 * 1024);
        Ok(Pipe {
            r: File::from(r),
            w: File::from(w),
            capacity,
            held: AtomicUsize::new(0),
            spill: Mutex::new(Spill::default()),
        })
    }

    fn lock_spill(&self) -> MutexGuard<'_, Spill> {
        self.spill.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spilling(&self) -> bool {
        self.lock_spill().spilling
    }

    /// Appends `b`: into the pipe while it has room, then to memory.
    fn put(&self, mut b: &[u8]) -> io::Result<()> {
        let mut spill = self.lock_spill();
        while !spill.spilling && !b.is_empty() {
            match (&self.w).write(b) {
                Ok(m) => {
                    self.held.fetch_add(m, Relaxed);
                    b = &b[m..];
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => spill.spilling = true,
                Err(e) => return Err(e),
            }
        }
        spill.data.extend_from_slice(b);
        Ok(())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes waiting: in the pipe and after it in memory.
    pub fn held(&self) -> usize {
        self.held.load(Relaxed) + self.lock_spill().data.len()
    }

    /// Writes `n` zero bytes into the pipe (a hole in READ data).
    pub(crate) fn zeroes(&self, mut n: usize) -> io::Result<()> {
        static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];
        while n > 0 {
            let k = n.min(ZEROES.len());
            self.put(&ZEROES[..k])?;
            n -= k;
        }
        Ok(())
    }

    /// Moves `n` bytes out to the socket `to` by `deadline` (whose send
    /// timeout makes each call return to check it).
    pub fn splice_out(&self, to: BorrowedFd<'_>, n: usize, deadline: Instant) -> io::Result<()> {
        let piped = n.min(self.held.load(Relaxed));
        let r = crate::stream::send_by(piped, deadline, |done| {
            let m = crate::sys::splice(self.r.as_fd(), to, piped - done, false)?;
            self.held.fetch_sub(m, Relaxed);
            Ok(m)
        })
        .and_then(|_| {
            let rest = n - piped;
            let mut spill = self.lock_spill();
            if rest > spill.data.len() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let r = crate::stream::send_by(rest, deadline, |done| {
                crate::sys::send(to, &spill.data[done..rest])
            });
            spill.data.drain(..rest);
            spill.spilling &= !spill.data.is_empty();
            r
        });
        if r.is_err() {
            self.discard();
        }
        r
    }

    /// Reads `n` bytes out into memory.
    pub fn read_out(&self, n: usize) -> io::Result<Vec<u8>> {
        let piped = n.min(self.held.load(Relaxed));
        let mut v = vec![0u8; piped];
        (&self.r).read_exact(&mut v)?;
        self.held.fetch_sub(piped, Relaxed);
        let mut spill = self.lock_spill();
        let rest = n - piped;
        if rest > spill.data.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        v.extend(spill.data.drain(..rest));
        spill.spilling &= !spill.data.is_empty();
        Ok(v)
    }

    /// Drops whatever the pipe holds.
    pub fn discard(&self) {
        let mut scratch = [0u8; 64 * 1024];
        while self.held.load(Relaxed) > 0 {
            let k = self.held.load(Relaxed).min(scratch.len());
            match (&self.r).read(&mut scratch[..k]) {
                Ok(0) | Err(_) => break,
                Ok(m) => {
                    self.held.fetch_sub(m, Relaxed);
                }
            }
        }
        *self.lock_spill() = Spill::default();
    }
}
