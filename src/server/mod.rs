//! The NBD server: listeners, access control at accept, and one session per
//! connection.

pub mod conn;
pub mod coverage;
mod exec;
pub mod handshake;
pub mod listener;
mod out;
mod reader;
pub mod session;
pub mod validate;
mod zerocopy;

pub use conn::Conn;
pub use listener::{Bound, Listener};
pub use session::End;

use crate::acl::{Acl, AclEntry};
use crate::export::Export;
use handshake::{negotiate, ExportInfo, HandshakeError};
use session::Session;
use std::collections::HashMap;
use std::net::{IpAddr, Shutdown};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// A client that does not finish the handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that stops reading replies for this long is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(120);

/// Server-wide settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct Config {
    /// Send the old-style greeting instead of fixed newstyle.
    pub oldstyle: bool,
    /// An incoming migration that sends nothing for this long is dropped, so a
    /// hung sender cannot hold the one migration slot for ever.
    pub migration_idle: Option<Duration>,
}

/// How a session ended, as the end hook sees it.
#[derive(Debug, Clone)]
pub struct SessionEnd {
    pub end: End,
    /// The session was an incoming migration.
    pub migration: bool,
    /// Bytes of the image an incoming migration never wrote.
    pub missing: u64,
    /// Size of the image.
    pub size: u64,
}

/// Called when a session ends.
pub type EndHook = Box<dyn Fn(&SessionEnd) + Send + Sync>;

/// Who may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Ordinary clients, any number.
    Clients,
    /// One incoming migration at a time; nobody else.
    Migration,
}

struct Client {
    peer: Option<IpAddr>,
    conn: Conn,
}

/// Shared state of all listeners and sessions.
pub struct Server {
    export: Arc<Export>,
    config: Config,
    acl: RwLock<Acl>,
    clients: Mutex<HashMap<u64, Client>>,
    clients_changed: Condvar,
    next_id: AtomicU64,
    shutting_down: AtomicBool,
    end_hook: RwLock<Option<EndHook>>,
    admission: Mutex<(Admission, Option<u64>)>,
}

impl Server {
    pub fn new(export: Arc<Export>, config: Config, acl: Acl) -> Arc<Server> {
        Arc::new(Server {
            export,
            config,
            acl: RwLock::new(acl),
            clients: Mutex::new(HashMap::new()),
            clients_changed: Condvar::new(),
            next_id: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            end_hook: RwLock::new(None),
            admission: Mutex::new((Admission::Clients, None)),
        })
    }

    /// Sets who may connect from now on.
    pub fn set_admission(&self, a: Admission) {
        self.admission.lock().unwrap_or_else(|p| p.into_inner()).0 = a;
    }

    pub fn admission(&self) -> Admission {
        self.admission.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Admits a connection: `Some(is_migration)`, or `None` to refuse it.
    fn admit(&self, id: u64) -> Option<bool> {
        let mut a = self.admission.lock().unwrap_or_else(|p| p.into_inner());
        match *a {
            (Admission::Clients, _) => Some(false),
            (Admission::Migration, Some(_)) => None,
            (Admission::Migration, None) => {
                a.1 = Some(id);
                Some(true)
            }
        }
    }

    fn release_sender(&self, id: u64) {
        let mut a = self.admission.lock().unwrap_or_else(|p| p.into_inner());
        if a.1 == Some(id) {
            a.1 = None;
        }
    }

    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }

    pub fn acl(&self) -> Acl {
        self.acl.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the ACL entries and stops the clients it no longer allows
    /// (they finish the requests in flight first).
    pub fn set_acl(&self, entries: Vec<AclEntry>) {
        let acl = {
            let mut a = self.acl.write().unwrap_or_else(|p| p.into_inner());
            a.entries = entries;
            a.clone()
        };
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        for (id, c) in clients.iter() {
            if let Some(ip) = c.peer {
                if !acl.allows(ip) {
                    info!("client {id} ({ip}) is no longer allowed: disconnecting");
                    c.conn.shutdown(Shutdown::Read);
                }
            }
        }
    }

    /// Whether a peer may connect now.
    pub fn allows(&self, peer: IpAddr) -> bool {
        self.acl
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .allows(peer)
    }

    pub fn num_clients(&self) -> usize {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Installs a hook run when each session ends.
    pub fn set_end_hook(&self, hook: Option<EndHook>) {
        *self.end_hook.write().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// Stops every client from sending further requests; in-flight ones are answered.
    pub fn disconnect_all(&self) {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        for c in clients.values() {
            c.conn.shutdown(Shutdown::Read);
        }
    }

    /// Closes every connection in both directions at once: requests not yet
    /// answered never will be, so their clients see the connection drop (as
    /// after a network failure) rather than an error reply.
    pub fn cut_all(&self) {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        for c in clients.values() {
            c.conn.shutdown(Shutdown::Both);
        }
    }

    /// Marks the server as shutting down: new connections are closed and
    /// options get ERR_SHUTDOWN.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, SeqCst);
    }

    /// Waits until no client is connected; false on timeout.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        while !clients.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            clients = self
                .clients_changed
                .wait_timeout(clients, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Takes a new connection: refused peers are closed with nothing sent.
    pub fn accept(self: &Arc<Self>, conn: Conn) {
        let peer = conn.peer_ip();
        if let Some(ip) = peer {
            if !self.allows(ip) {
                info!("refused connection from {ip} by the access control list");
                conn.shutdown(Shutdown::Both);
                return;
            }
        }
        if self.shutting_down.load(SeqCst) {
            conn.shutdown(Shutdown::Both);
            return;
        }
        if let Conn::Tcp(s) = &conn {
            tune_tcp(s);
        }
        let id = self.next_id.fetch_add(1, SeqCst);
        let Some(migration) = self.admit(id) else {
            info!(
                "refused connection from {}: a migration is already arriving",
                conn.peer_name()
            );
            conn.shutdown(Shutdown::Both);
            return;
        };
        let clone = match conn.try_clone() {
            Ok(c) => c,
            Err(e) => {
                warn!("cannot take connection: {e}");
                return;
            }
        };
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Client { peer, conn: clone });
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("client-{id}"))
            .spawn(move || {
                let end = me.serve_client(id, conn, migration);
                me.release_sender(id);
                if let Some(h) = me
                    .end_hook
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                {
                    h(&end);
                }
                me.forget(id);
            });
        if let Err(e) = spawned {
            warn!("cannot start a client thread: {e}");
            self.release_sender(id);
            self.forget(id);
        }
    }

    fn forget(&self, id: u64) {
        let mut c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = c.remove(&id) {
            c.conn.shutdown(Shutdown::Both);
        }
        self.clients_changed.notify_all();
    }

    fn serve_client(&self, id: u64, conn: Conn, migration: bool) -> SessionEnd {
        let name = format!("client-{id}");
        let size = self.export.size();
        let ended = |end: End, missing: u64| SessionEnd {
            end,
            migration,
            missing,
            size,
        };
        info!("{name}: connected from {}", conn.peer_name());
        let info = ExportInfo {
            size: self.export.size(),
            read_only: self.export.read_only(),
            oldstyle: self.config.oldstyle,
        };
        let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        let _ = conn.set_write_timeout(Some(SEND_TIMEOUT));
        let neg = match negotiate(&conn, &info, &self.shutting_down) {
            Ok(n) => n,
            Err(HandshakeError::Closed | HandshakeError::Aborted) => {
                info!("{name}: closed during the handshake");
                return ended(End::Closed, size);
            }
            Err(e) => {
                warn!("{name}: handshake failed: {e}");
                return ended(End::Error(e.to_string()), size);
            }
        };
        let idle = if migration {
            self.config.migration_idle
        } else {
            None
        };
        let _ = conn.set_read_timeout(idle);
        debug!("{name}: negotiated {neg:?}");
        let session = match Session::new(self.export.clone(), conn, neg, name.clone(), migration) {
            Ok(s) => s,
            Err(e) => {
                warn!("{name}: {e}");
                return ended(End::Error(e.to_string()), size);
            }
        };
        let end = session.run();
        match &end {
            // A connection cut at shutdown or hand-over ends with an error by design.
            End::Error(e) if !self.shutting_down.load(SeqCst) => warn!("{name}: ended: {e}"),
            e => info!("{name}: ended: {e:?}"),
        }
        ended(end, session.missing().unwrap_or(0))
    }
}

/// TCP_NODELAY and keepalive (idle 30 s, interval 10 s, 3 probes).
fn tune_tcp(s: &std::net::TcpStream) {
    let _ = s.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = socket2::SockRef::from(s).set_tcp_keepalive(&ka);
}
