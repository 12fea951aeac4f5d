//! Client sockets: TCP (optionally bound, with a connect timeout) or unix stream,
//! and the handle that shuts one down from another thread.

use super::ClientError;
use crate::addr::Endpoint;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

/// A connected client socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => {
                let mut r: &TcpStream = s;
                r.read(buf)
            }
            Stream::Unix(s) => {
                let mut r: &UnixStream = s;
                r.read(buf)
            }
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => {
                let mut w: &TcpStream = s;
                w.write(buf)
            }
            Stream::Unix(s) => {
                let mut w: &UnixStream = s;
                w.write(buf)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Opens a socket to `endpoint`. Any failure is [`ClientError::Connect`].
pub(crate) fn connect(
    endpoint: &Endpoint,
    bind: Option<IpAddr>,
    timeout: Duration,
) -> Result<Stream, ClientError> {
    let fail = |cause: io::Error| ClientError::Connect {
        endpoint: endpoint.to_string(),
        cause,
    };
    match endpoint {
        Endpoint::Tcp(addr) => connect_tcp(*addr, bind, timeout).map_err(fail),
        Endpoint::Unix(path) => {
            if bind.is_some() {
                return Err(fail(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a bind address applies to TCP connections only",
                )));
            }
            UnixStream::connect(path).map(Stream::Unix).map_err(fail)
        }
    }
}

fn connect_tcp(addr: SocketAddr, bind: Option<IpAddr>, timeout: Duration) -> io::Result<Stream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(ip) = bind {
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    socket.connect_timeout(&SockAddr::from(addr), timeout)?;
    socket.set_nodelay(true)?;
    Ok(Stream::Tcp(socket.into()))
}

/// Shuts a connection down from any thread, waking whoever is blocked on it.
/// The socket stays open (and its descriptor valid) until every user drops it.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(pub(crate) Arc<Stream>);

impl ShutdownHandle {
    /// Shuts both directions down; errors (already shut down, peer gone) are ignored.
    pub fn shutdown(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}
