//! Listening sockets (TCP and unix) and their accept loops.

use super::Server;
use crate::addr::Endpoint;
use crate::stream::Stream;
use std::io;
use std::net::{Shutdown, TcpListener};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A bound socket, not yet accepting.
pub struct Bound {
    sock: Sock,
    /// Passed by the service manager (socket activation): it owns the
    /// socket, which outlives this process, so it is never shut down or
    /// unlinked here.
    inherited: bool,
}

enum Sock {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// How often an accept loop on an inherited socket looks whether it was
/// stopped (such a socket cannot be woken by shutting it down).
const INHERITED_POLL: Duration = Duration::from_millis(200);

impl Bound {
    /// Binds the endpoint. A stale unix socket file (no one listening) is replaced.
    pub fn bind(ep: &Endpoint) -> io::Result<Bound> {
        let sock = match ep {
            Endpoint::Tcp(a) => Sock::Tcp(TcpListener::bind(a)?),
            Endpoint::Unix(p) => {
                remove_stale_socket(p)?;
                Sock::Unix(UnixListener::bind(p)?, p.clone())
            }
        };
        Ok(Bound {
            sock,
            inherited: false,
        })
    }

    /// The listening sockets passed by the service manager
    /// (`LISTEN_FDS`/`LISTEN_PID`, systemd's socket activation), TCP or
    /// unix; none when not activated. The variables are removed, so
    /// commands started later do not take them for theirs.
    pub fn inherited() -> Result<Vec<Bound>, InheritError> {
        let fds = crate::sys::listen_fds().map_err(InheritError::Env)?;
        let mut out = Vec::new();
        for (n, fd) in fds.into_iter().enumerate() {
            let fdno = 3 + n;
            let sock = socket2::Socket::from(fd);
            let listening = sock.r#type().ok() == Some(socket2::Type::STREAM)
                && sock.is_listener().unwrap_or(false);
            if !listening {
                return Err(InheritError::NotListening(fdno));
            }
            let addr = sock
                .local_addr()
                .map_err(|e| InheritError::Socket(fdno, e))?;
            // Accepts wake up now and then to see whether they should stop.
            sock.set_read_timeout(Some(INHERITED_POLL))
                .map_err(|e| InheritError::Socket(fdno, e))?;
            let sock = match (addr.as_socket(), addr.as_pathname()) {
                (Some(_), _) => Sock::Tcp(sock.into()),
                (None, Some(p)) => Sock::Unix(sock.into(), p.to_owned()),
                (None, None) if addr.is_unnamed() || addr.as_abstract_namespace().is_some() => {
                    Sock::Unix(sock.into(), PathBuf::from("(unnamed)"))
                }
                (None, None) => return Err(InheritError::NotListening(fdno)),
            };
            out.push(Bound {
                sock,
                inherited: true,
            });
        }
        Ok(out)
    }

    /// The address actually bound (useful with port 0).
    pub fn local(&self) -> Endpoint {
        match &self.sock {
            Sock::Tcp(l) => match l.local_addr() {
                Ok(a) => Endpoint::Tcp(a),
                Err(_) => Endpoint::Unix(PathBuf::new()),
            },
            Sock::Unix(_, p) => Endpoint::Unix(p.clone()),
        }
    }

    /// Starts accepting connections on a thread of its own.
    pub fn start(self, server: Arc<Server>) -> io::Result<Listener> {
        let stop = Arc::new(AtomicBool::new(false));
        let (waker, path) = match (&self.sock, self.inherited) {
            (_, true) => (Waker::Poll, None),
            (Sock::Tcp(l), false) => (Waker::Tcp(l.try_clone()?), None),
            (Sock::Unix(l, p), false) => (Waker::Unix(l.try_clone()?), Some(p.clone())),
        };
        let endpoint = self.local();
        let s2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("serve".into())
            .spawn(move || accept_loop(self, server, s2))?;
        match path.is_none() && matches!(waker, Waker::Poll) {
            true => info!("listening on {endpoint} (passed by the service manager)"),
            false => info!("listening on {endpoint}"),
        }
        Ok(Listener {
            handle: Some(handle),
            stop,
            waker,
            path,
            endpoint,
        })
    }
}

/// Why the sockets passed by the service manager cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("LISTEN_FDS/LISTEN_PID: {0}")]
    Env(io::Error),
    #[error("socket activation: descriptor {0} is not a listening stream socket")]
    NotListening(usize),
    #[error("socket activation: descriptor {0}: {1}")]
    Socket(usize, io::Error),
}

/// Removes `p` if it is a socket nobody listens on; refuses to touch anything else.
fn remove_stale_socket(p: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", p.display()),
        ));
    }
    if UnixStream::connect(p).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running server", p.display()),
        ));
    }
    std::fs::remove_file(p)
}

enum Waker {
    Tcp(TcpListener),
    Unix(UnixListener),
    /// The accept loop notices `stop` by itself (an inherited socket).
    Poll,
}

/// An accepting listener; [`stop`](Self::stop) closes it.
pub struct Listener {
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    waker: Waker,
    path: Option<PathBuf>,
    endpoint: Endpoint,
}

impl Listener {
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Stops accepting, waits for the accept thread and removes a unix socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, SeqCst);
        // shutdown(2) on a listening socket wakes a blocked accept(2).
        let _ = match &self.waker {
            Waker::Tcp(l) => socket2::SockRef::from(l).shutdown(Shutdown::Both),
            Waker::Unix(l) => socket2::SockRef::from(l).shutdown(Shutdown::Both),
            Waker::Poll => Ok(()),
        };
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(bound: Bound, server: Arc<Server>, stop: Arc<AtomicBool>) {
    let mut failures = 0u32;
    while !stop.load(SeqCst) {
        let r = match &bound.sock {
            Sock::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Sock::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
        };
        // An accepted socket inherits the listener's receive timeout.
        let r = match (r, bound.inherited) {
            (Ok(c), true) => c.set_read_timeout(None).map(|_| c),
            (r, _) => r,
        };
        match r {
            Ok(conn) => {
                failures = 0;
                if stop.load(SeqCst) {
                    break;
                }
                server.accept(conn);
            }
            Err(_) if stop.load(SeqCst) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if bound.inherited
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
            Err(e) => {
                // Out of descriptors or similar: back off instead of spinning.
                failures += 1;
                if failures == 1 || failures.is_multiple_of(100) {
                    warn!("accept failed: {e}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
