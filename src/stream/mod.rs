//! The one transport type: a connected TCP or unix stream socket, or a
//! TLS session over one ([`tls::Channel`] in user space, [`tls::Kernel`]
//! when the kernel runs the record layer), with the deadline-bounded send
//! loop every transmission-phase writer uses and the handshake's
//! [`Deadline`]. Zero-copy (`sendfile`, `splice`, `MSG_MORE`) is a
//! capability of a plain socket ([`Stream::plain_fd`]), which a TLS stream
//! lacks.

pub mod tls;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
pub use tls::TlsInfo;

/// A connected stream socket, TCP or unix, or TLS over one: the one
/// transport type of the server, the client and the proxy.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A TLS session (rustls in user space); clones share it.
    Tls(Arc<tls::Channel>),
    /// A TLS session whose record layer the kernel runs (kTLS); clones
    /// share it.
    Ktls(Arc<tls::Kernel>),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(c) => Stream::Tls(c.clone()),
            Stream::Ktls(k) => Stream::Ktls(k.clone()),
        })
    }

    pub fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tls(c) => {
                c.shutdown(how);
                Ok(())
            }
            Stream::Ktls(k) => {
                k.socket().shutdown(how);
                Ok(())
            }
        };
    }

    /// The socket itself (for socket options and timeouts).
    fn socket(&self) -> &Stream {
        match self {
            Stream::Tls(c) => c.socket(),
            Stream::Ktls(k) => k.socket(),
            s => s,
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self.socket() {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tls(_) | Stream::Ktls(_) => Ok(()),
        }
    }

    /// The receive timeout set on the socket (`None` for TLS streams).
    pub fn read_timeout(&self) -> Option<Duration> {
        match self.socket() {
            Stream::Tcp(s) => s.read_timeout().ok().flatten(),
            Stream::Unix(s) => s.read_timeout().ok().flatten(),
            Stream::Tls(_) | Stream::Ktls(_) => None,
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self.socket() {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tls(_) | Stream::Ktls(_) => Ok(()),
        }
    }

    /// The peer's IP address; `None` for unix sockets.
    pub fn peer_ip(&self) -> Option<IpAddr> {
        match self.socket() {
            Stream::Tcp(s) => s
                .peer_addr()
                .ok()
                .map(|a| crate::addr::canonical_ip(a.ip())),
            _ => None,
        }
    }

    /// A TCP socket that takes plaintext (plain, or kernel TLS): where
    /// `MSG_MORE` applies.
    pub fn is_tcp(&self) -> bool {
        matches!(self, Stream::Tcp(_) | Stream::Ktls(_))
    }

    /// The TCP socket underneath, TLS or not (for socket options).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self.socket() {
            Stream::Tcp(s) => Some(s),
            _ => None,
        }
    }

    /// The descriptor of the socket (TLS or not), for socket options only:
    /// bytes written to it bypass TLS.
    pub fn socket_fd(&self) -> BorrowedFd<'_> {
        match self.socket() {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
            Stream::Tls(c) => c.socket().socket_fd(),
            Stream::Ktls(k) => k.socket().socket_fd(),
        }
    }

    /// The descriptor to move data with `sendfile`/`splice`, if this
    /// stream has one (a plain socket, or kernel TLS; not a TLS session in
    /// user space). Data read from it this way skips the record-type check
    /// [`Read`] makes on kernel TLS, so only writes use it there.
    pub fn plain_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Stream::Tcp(s) => Some(s.as_fd()),
            Stream::Unix(s) => Some(s.as_fd()),
            Stream::Ktls(k) => Some(k.socket().socket_fd()),
            Stream::Tls(_) => None,
        }
    }

    /// The TLS session's details, when this is one.
    pub fn tls_info(&self) -> Option<&TlsInfo> {
        match self {
            Stream::Tls(c) => Some(c.info()),
            Stream::Ktls(k) => Some(k.info()),
            _ => None,
        }
    }

    /// A name for the peer, for log lines.
    pub fn peer_name(&self) -> String {
        match self.socket() {
            Stream::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            _ => "unix".into(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Tls(c) => c.read(buf),
            Stream::Ktls(k) => k.read(buf),
        }
    }
}

/// A TLS stream may hold ciphertext back after a write returns (when the
/// socket timed out part-way): [`flush`](Write::flush) sends it, and
/// [`Stream::send_all`] does so before it returns.
impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
            Stream::Tls(c) => c.write(buf),
            Stream::Ktls(k) => k.socket().write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write_vectored(bufs),
            Stream::Unix(s) => (&*s).write_vectored(bufs),
            Stream::Ktls(k) => k.socket().write_vectored(bufs),
            Stream::Tls(c) => match bufs.iter().find(|b| !b.is_empty()) {
                Some(b) => c.write(b),
                None => Ok(0),
            },
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(c) => c.flush(),
            _ => Ok(()),
        }
    }
}

/// A connection whose every read and write must be over by one deadline
/// (a handshake's): each call's socket timeout is the time left, so a
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

    fn mapped(e: io::Error) -> io::Error {
        match is_timeout(&e) {
            true => timed_out("handshake"),
            false => e,
        }
    }
}

impl Read for &Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.conn.set_read_timeout(Some(self.left()?))?;
        (&*self.conn).read(buf).map_err(Deadline::mapped)
    }
}

impl Write for &Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.conn.set_write_timeout(Some(self.left()?))?;
        (&*self.conn).write(buf).map_err(Deadline::mapped)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.set_write_timeout(Some(self.left()?))?;
        (&*self.conn).flush().map_err(Deadline::mapped)
    }
}

/// Whether an I/O error is a socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO`).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

pub fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} timed out"))
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

/// The parts of `parts` left after the first `done` bytes, as slices for
/// one vectored write.
fn rest_of<'a>(parts: &[&'a [u8]], mut done: usize) -> Vec<io::IoSlice<'a>> {
    let mut v = Vec::with_capacity(parts.len());
    for p in parts {
        if done >= p.len() {
            done -= p.len();
            continue;
        }
        v.push(io::IoSlice::new(&p[done..]));
        done = 0;
    }
    v
}

impl Stream {
    /// Writes all of `buf` by `deadline`.
    pub fn send_all(&self, buf: &[u8], deadline: Instant) -> io::Result<()> {
        self.send_all_parts(&[buf], deadline)
    }

    /// Writes `parts` one after the other by `deadline`, with one vectored
    /// write when the socket has room for them all: a header never goes
    /// out as a packet of its own ahead of its data.
    pub fn send_all_parts(&self, parts: &[&[u8]], deadline: Instant) -> io::Result<()> {
        let mut w = self;
        let total = parts.iter().map(|p| p.len()).sum();
        send_by(total, deadline, |done| match parts {
            [one] => w.write(&one[done..]),
            _ => w.write_vectored(&rest_of(parts, done)),
        })?;
        if let Stream::Tls(c) = self {
            // What the last write held back, within the same deadline (one
            // unit of work: done once a flush gets it all out).
            send_by(1, deadline, |_| c.flush().map(|_| 1))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn rest_of_skips_what_was_sent() {
        let (a, b, c) = (&b"head"[..], &b""[..], &b"payload"[..]);
        let flat = |v: Vec<io::IoSlice<'_>>| v.iter().flat_map(|s| s.to_vec()).collect::<Vec<u8>>();
        assert_eq!(flat(rest_of(&[a, b, c], 0)), b"headpayload");
        assert_eq!(flat(rest_of(&[a, b, c], 3)), b"dpayload");
        assert_eq!(flat(rest_of(&[a, b, c], 4)), b"payload");
        assert_eq!(flat(rest_of(&[a, b, c], 6)), b"yload");
        assert!(rest_of(&[a, b, c], 11).is_empty());
    }

    /// More than the socket holds at once: the parts arrive whole and in order.
    #[test]
    fn send_all_parts_sends_every_part_in_order() {
        let (x, mut y) = UnixStream::pair().unwrap();
        let s = Stream::Unix(x);
        let head = [7u8; 28];
        let body: Vec<u8> = (0..4 << 20).map(|i| (i % 253) as u8).collect();
        let tail = [9u8; 5];
        let want: Vec<u8> = [&head[..], &body, &tail].concat();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            y.read_to_end(&mut got).unwrap();
            got
        });
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        s.send_all_parts(&[&head, &body, &tail], deadline).unwrap();
        drop(s);
        assert!(reader.join().unwrap() == want, "the bytes differ");
    }
}
