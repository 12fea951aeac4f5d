//! A client connection over TCP or a unix socket, and the deadlines its
//! reads and writes are held to.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(how),
            Conn::Unix(s) => s.shutdown(how),
        };
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_write_timeout(t),
            Conn::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// The peer's IP address; `None` for unix sockets.
    pub fn peer_ip(&self) -> Option<IpAddr> {
        match self {
            Conn::Tcp(s) => s
                .peer_addr()
                .ok()
                .map(|a| crate::addr::canonical_ip(a.ip())),
            Conn::Unix(_) => None,
        }
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self, Conn::Tcp(_))
    }

    /// A name for the peer, for log lines.
    pub fn peer_name(&self) -> String {
        match self {
            Conn::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Conn::Unix(_) => "unix".into(),
        }
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Tcp(s) => s.as_fd(),
            Conn::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).read(buf),
            Conn::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).write(buf),
            Conn::Unix(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => (&*s).write_vectored(bufs),
            Conn::Unix(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether an I/O error is a socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO`).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

pub(super) fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
}

/// A connection whose every read and write must be over by one deadline
/// (the handshake's): each call's socket timeout is the time left, so a
/// peer trickling one byte at a time gains nothing.
pub struct Deadline<'a> {
    conn: &'a Conn,
    at: Instant,
}

impl<'a> Deadline<'a> {
    pub fn new(conn: &'a Conn, at: Instant) -> Deadline<'a> {
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

/// Runs `op` (one write-like system call returning bytes done) until `len`
/// bytes are done, retrying after each socket timeout until `deadline`.
pub fn send_by(
    len: usize,
    deadline: Instant,
    mut op: impl FnMut(usize) -> io::Result<usize>,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        match op(done) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
        // Progress, however slow, does not move the deadline.
        if done < len && Instant::now() >= deadline {
            return Err(timed_out("sending to the client"));
        }
    }
    Ok(())
}

impl Conn {
    /// Writes all of `buf` by `deadline`.
    pub fn send_all(&self, buf: &[u8], deadline: Instant) -> io::Result<()> {
        let mut w = self;
        send_by(buf.len(), deadline, |done| w.write(&buf[done..]))
    }
}
