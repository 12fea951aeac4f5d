//! Opening client sockets ([`Stream`]): TCP (optionally bound, with a connect timeout) or unix stream,
//! the handle that shuts one down from another thread, and the cancellation of
//! an attempt under way.

use super::{ClientError, ConnectOptions};
use crate::addr::Endpoint;
pub(crate) use crate::stream::Stream;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

/// Opens a socket to `endpoint` as `opts` say (bind address, connect
/// timeout, migration tuning, cancellation). Any failure is
/// [`ClientError::Connect`], or [`ClientError::Cancelled`].
pub(crate) fn connect(endpoint: &Endpoint, opts: &ConnectOptions) -> Result<Stream, ClientError> {
    let fail = |cause: io::Error| ClientError::Connect {
        endpoint: endpoint.to_string(),
        cause,
    };
    match endpoint {
        Endpoint::Tcp(addr) => connect_tcp(*addr, opts).map_err(|e| match e {
            Opened::Cancelled => ClientError::Cancelled,
            Opened::Failed(e) => fail(e),
        }),
        Endpoint::Unix(path) => {
            if opts.bind.is_some() {
                return Err(fail(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a bind address applies to TCP connections only",
                )));
            }
            let s = UnixStream::connect(path).map_err(fail)?;
            if let Some(c) = &opts.cancel {
                let dup = s.try_clone().map(Stream::Unix).map_err(fail)?;
                if !c.register(dup) {
                    return Err(ClientError::Cancelled);
                }
            }
            Ok(Stream::Unix(s))
        }
    }
}

enum Opened {
    Cancelled,
    Failed(io::Error),
}

impl From<io::Error> for Opened {
    fn from(e: io::Error) -> Self {
        Opened::Failed(e)
    }
}

fn connect_tcp(addr: SocketAddr, opts: &ConnectOptions) -> Result<Stream, Opened> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(ip) = opts.bind {
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    if let Some(c) = &opts.cancel {
        let dup: TcpStream = socket.try_clone()?.into();
        if !c.register(Stream::Tcp(dup)) {
            return Err(Opened::Cancelled);
        }
    }
    socket.connect_timeout(&SockAddr::from(addr), opts.connect_timeout)?;
    let s: TcpStream = socket.into();
    if opts.migration {
        crate::net::tune_migration_tcp(&s);
    } else {
        crate::net::tune_outgoing_tcp(&s)?;
    }
    Ok(Stream::Tcp(s))
}

/// Lets one thread abandon another's connection attempt: [`Cancel::cancel`]
/// shuts the socket down, which wakes a blocked `connect(2)` or read. One
/// attempt at a time; [`Connection::connect`](super::Connection::connect)
/// registers its socket and lets go of it when done.
#[derive(Debug, Default)]
pub struct Cancel {
    state: Mutex<CancelState>,
}

#[derive(Debug, Default)]
struct CancelState {
    cancelled: bool,
    socket: Option<Stream>,
}

impl Cancel {
    pub fn new() -> Arc<Cancel> {
        Arc::new(Cancel::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CancelState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Abandons the attempt under way and any later one.
    pub fn cancel(&self) {
        let mut st = self.lock();
        st.cancelled = true;
        if let Some(s) = st.socket.take() {
            s.shutdown(Shutdown::Both);
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }

    /// Registers the socket of an attempt; false if already cancelled.
    fn register(&self, s: Stream) -> bool {
        let mut st = self.lock();
        if st.cancelled {
            s.shutdown(Shutdown::Both);
            return false;
        }
        st.socket = Some(s);
        true
    }

    /// Ends the attempt's registration; true if it was cancelled.
    pub(crate) fn finish(&self) -> bool {
        let mut st = self.lock();
        st.socket = None;
        st.cancelled
    }
}

/// Shuts a connection down from any thread, waking whoever is blocked on it.
/// The socket stays open (and its descriptor valid) until every user drops it.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(pub(crate) Arc<Stream>);

impl ShutdownHandle {
    /// Shuts both directions down; errors (already shut down, peer gone) are ignored.
    pub fn shutdown(&self) {
        self.0.shutdown(Shutdown::Both);
    }
}
