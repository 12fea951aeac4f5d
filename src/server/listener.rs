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
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Bound {
    /// Binds the endpoint. A stale unix socket file (no one listening) is replaced.
    pub fn bind(ep: &Endpoint) -> io::Result<Bound> {
        match ep {
            Endpoint::Tcp(a) => Ok(Bound::Tcp(TcpListener::bind(a)?)),
            Endpoint::Unix(p) => {
                remove_stale_socket(p)?;
                Ok(Bound::Unix(UnixListener::bind(p)?, p.clone()))
            }
        }
    }

    /// The address actually bound (useful with port 0).
    pub fn local(&self) -> Endpoint {
        match self {
            Bound::Tcp(l) => match l.local_addr() {
                Ok(a) => Endpoint::Tcp(a),
                Err(_) => Endpoint::Unix(PathBuf::new()),
            },
            Bound::Unix(_, p) => Endpoint::Unix(p.clone()),
        }
    }

    /// Starts accepting connections on a thread of its own.
    pub fn start(self, server: Arc<Server>) -> io::Result<Listener> {
        let stop = Arc::new(AtomicBool::new(false));
        let (waker, path) = match &self {
            Bound::Tcp(l) => (Waker::Tcp(l.try_clone()?), None),
            Bound::Unix(l, p) => (Waker::Unix(l.try_clone()?), Some(p.clone())),
        };
        let endpoint = self.local();
        let s2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("serve".into())
            .spawn(move || accept_loop(self, server, s2))?;
        info!("listening on {endpoint}");
        Ok(Listener {
            handle: Some(handle),
            stop,
            waker,
            path,
            endpoint,
        })
    }
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
        let r = match &bound {
            Bound::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Bound::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
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
