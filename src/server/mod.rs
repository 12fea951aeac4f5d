//! The NBD server: listeners, access control at accept, and one session per
//! connection.

pub mod conn;
pub mod coverage;
mod exec;
pub mod handshake;
pub mod intake;
pub mod listener;
mod out;
pub(crate) mod reader;
pub mod session;
pub mod validate;
mod zerocopy;

pub use conn::SendLimit;
pub use intake::{Admit, Intake, SenderTrack, SessionEnd};
pub use listener::{Bound, InheritError, Listener};
pub use session::End;

use crate::acl::{Acl, AclEntry};
use crate::export::Export;
use crate::metrics::Metrics;
use crate::stream::{Stream, TlsInfo};
use crate::tls::ServerTls;
pub use handshake::ExportNames;
use handshake::{negotiate, ExportInfo, HandshakeError, Negotiated};
use session::Session;
use std::collections::HashMap;
use std::net::{IpAddr, Shutdown};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Default for [`Config::handshake_timeout`].
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`Config::send_timeout`].
pub const SEND_TIMEOUT: Duration = Duration::from_secs(120);
/// Default for [`Config::max_clients`].
pub const MAX_CLIENTS: usize = 512;
/// How long a new sender waits for the silent one it replaces to finish.
const REPLACE_WAIT: Duration = Duration::from_secs(30);
/// At most one "too many clients" log line per this interval.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Descriptors kept for the control socket, a migration, the image and
/// the listeners, whatever the clients take.
const RESERVED_FDS: u64 = 64;
/// Raises the soft descriptor limit to the hard one and fits `wanted`
/// clients of `per_client` descriptors each into it, leaving room for
/// everything else.
pub fn fit_clients(wanted: usize, per_client: u64) -> usize {
    let fds = match crate::sys::raise_nofile_limit() {
        Ok(n) => n,
        Err(e) => {
            warn!("cannot read the descriptor limit: {e}");
            return wanted;
        }
    };
    let fit = (fds.saturating_sub(RESERVED_FDS) / per_client).max(1);
    if (wanted as u64) > fit {
        warn!("only {fit} clients fit in the limit of {fds} open files; serving at most {fit}");
        return fit as usize;
    }
    wanted
}

/// Server-wide settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Send the old-style greeting instead of fixed newstyle.
    pub oldstyle: bool,
    /// The whole handshake must be over within this time.
    pub handshake_timeout: Duration,
    /// Sending one reply (or batch of replies) must be over within this time;
    /// a client that reads slower than that is dropped.
    pub send_timeout: Duration,
    /// Connections served at once; more are closed at accept, nothing read.
    pub max_clients: usize,
    /// TLS offered or required (`--tls`), with its certificates.
    pub tls: Option<Arc<ServerTls>>,
    /// The export name clients must ask for, and its description.
    pub names: ExportNames,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            oldstyle: false,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            send_timeout: SEND_TIMEOUT,
            max_clients: MAX_CLIENTS,
            tls: None,
            names: ExportNames::default(),
        }
    }
}

/// Connections refused for being over the limit, and when that was last logged.
#[derive(Default)]
struct Refusals {
    count: u64,
    logged: Option<Instant>,
}

struct Connected {
    peer: Option<IpAddr>,
    conn: Stream,
    /// The TLS session, once the handshake set one up.
    tls: Option<TlsInfo>,
}

/// What a server's connections are served from, after the handshake: the
/// local image ([`Export`], through [`Session`]) or, for the proxy, an
/// upstream server. The server does the rest (listeners, ACL, client limit,
/// handshake) the same way for both.
pub trait Backend: Send + Sync {
    /// The export as the handshake presents it.
    fn info(&self, oldstyle: bool) -> ExportInfo;
    /// Serves one connection in the transmission phase until it ends.
    fn serve(self: Arc<Self>, conn: Stream, neg: Negotiated, client: Client<'_>) -> End;
}

/// What a backend is told about the connection it serves.
pub struct Client<'a> {
    /// The name in log lines (`client-N`).
    pub name: &'a str,
    /// An incoming migration's sender, tracked by the destination.
    pub sender: Option<Arc<SenderTrack>>,
    /// How long sending one reply may take.
    pub send: SendLimit,
    /// The server's request counters (`--metrics`).
    pub metrics: Arc<Metrics>,
}

impl Backend for Export {
    fn info(&self, oldstyle: bool) -> ExportInfo {
        ExportInfo::local(self.size(), self.read_only(), oldstyle, self.min_block())
    }

    fn serve(self: Arc<Self>, conn: Stream, neg: Negotiated, client: Client<'_>) -> End {
        let name = client.name.to_owned();
        match Session::new(
            self,
            conn,
            neg,
            name.clone(),
            client.sender,
            client.send,
            client.metrics,
        ) {
            Ok(s) => s.run(),
            Err(e) => {
                warn!("{name}: {e}");
                End::Error(e.to_string())
            }
        }
    }
}

/// Shared state of all listeners and sessions.
pub struct Server {
    backend: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    config: Config,
    acl: RwLock<Acl>,
    clients: Mutex<HashMap<u64, Connected>>,
    clients_changed: Condvar,
    next_id: AtomicU64,
    shutting_down: AtomicBool,
    /// Who decides admissions while a migration is awaited; `None`: everyone
    /// the ACL allows is a client.
    intake: RwLock<Option<Arc<dyn Intake>>>,
    refusals: Mutex<Refusals>,
}

impl Server {
    /// A server of the local image.
    pub fn new(export: Arc<Export>, config: Config, acl: Acl) -> Arc<Server> {
        Server::with_backend(export, config, acl)
    }

    /// A server of any backend (the proxy's is an upstream server).
    pub fn with_backend(backend: Arc<dyn Backend>, config: Config, acl: Acl) -> Arc<Server> {
        Arc::new(Server {
            backend,
            config,
            acl: RwLock::new(acl),
            clients: Mutex::new(HashMap::new()),
            clients_changed: Condvar::new(),
            next_id: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            intake: RwLock::new(None),
            refusals: Mutex::new(Refusals::default()),
            metrics: Arc::new(Metrics::default()),
        })
    }

    /// The request counters every session adds to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The TLS settings, when TLS is offered or required.
    pub fn tls(&self) -> Option<&ServerTls> {
        self.config.tls.as_deref()
    }

    /// Installs (or, with `None`, removes) the hook that decides admissions.
    pub fn set_intake(&self, intake: Option<Arc<dyn Intake>>) {
        *self.intake.write().unwrap_or_else(|p| p.into_inner()) = intake;
    }

    fn intake(&self) -> Option<Arc<dyn Intake>> {
        self.intake
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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

    /// Each connected client (by id) and its TLS session, if it has one.
    pub fn client_tls(&self) -> Vec<(u64, Option<TlsInfo>)> {
        let c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = c.iter().map(|(id, c)| (*id, c.tls.clone())).collect();
        v.sort_by_key(|(id, _)| *id);
        v
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
        self.wait_clients(timeout, |c| c.is_empty())
    }

    /// Waits (up to `timeout`) until `done` holds of the connected clients.
    fn wait_clients(
        &self,
        timeout: Duration,
        done: impl Fn(&HashMap<u64, Connected>) -> bool,
    ) -> bool {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Some(Instant::now() + timeout);
        crate::wait::until(&self.clients_changed, clients, deadline, |c| done(c)).1
    }

    /// Takes a new connection: refused peers are closed with nothing sent.
    pub fn accept(self: &Arc<Self>, conn: Stream) {
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
        if self.num_clients() >= self.config.max_clients {
            self.refuse_over_limit(&conn);
            return;
        }
        if let Stream::Tcp(s) = &conn {
            crate::net::tune_client_tcp(s);
        }
        let id = self.next_id.fetch_add(1, SeqCst);
        let intake = self.intake();
        let (sender, replaces) = match intake.as_ref().map(|i| i.admit(id)) {
            None | Some(Admit::Client) => (None, None),
            Some(Admit::Sender { track, replaces }) => (Some(track), replaces),
            Some(Admit::Refuse(why)) => {
                info!("refused connection from {}: {why}", conn.peer_name());
                conn.shutdown(Shutdown::Both);
                return;
            }
        };
        if let Some(old) = replaces {
            info!(
                "client-{old}: silent incoming migration replaced by a new sender from {}",
                conn.peer_name()
            );
            self.cut(old);
        }
        let clone = match conn.try_clone() {
            Ok(c) => c,
            Err(e) => {
                warn!("cannot take connection: {e}");
                if let Some(i) = &intake {
                    i.ended(&SessionEnd {
                        id,
                        end: End::Error(e.to_string()),
                        sender,
                    });
                }
                return;
            }
        };
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                Connected {
                    peer,
                    conn: clone,
                    tls: None,
                },
            );
        let me = self.clone();
        let i2 = intake.clone();
        let s2 = sender.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("client-{id}"))
            .spawn(move || {
                // Never two senders writing at once: the replaced one's
                // last requests finish first.
                let end = match replaces {
                    Some(old) if !me.wait_gone(old, REPLACE_WAIT) => {
                        warn!("client-{old}: still busy {REPLACE_WAIT:?} after being replaced; refusing client-{id}");
                        conn.shutdown(Shutdown::Both);
                        End::Error("the replaced sender is still busy".into())
                    }
                    _ => me.serve_client(id, conn, s2.clone()),
                };
                if let Some(i) = &i2 {
                    i.ended(&SessionEnd {
                        id,
                        end,
                        sender: s2,
                    });
                }
                me.forget(id);
            });
        if let Err(e) = spawned {
            warn!("cannot start a client thread: {e}");
            if let Some(i) = &intake {
                i.ended(&SessionEnd {
                    id,
                    end: End::Error(e.to_string()),
                    sender,
                });
            }
            self.forget(id);
        }
    }

    /// Closes a connection over the client limit, logging that at most
    /// once per [`REFUSAL_LOG_INTERVAL`] (with how many were refused).
    fn refuse_over_limit(&self, conn: &Stream) {
        // Named first: a shut-down socket has no peer address any more.
        let peer = conn.peer_name();
        conn.shutdown(Shutdown::Both);
        let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        r.count += 1;
        let now = Instant::now();
        if r.logged
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_INTERVAL)
        {
            warn!(
                "{} clients connected (the limit, --max-clients): refused {} connection(s), \
                 the last from {}",
                self.config.max_clients, r.count, peer
            );
            r.count = 0;
            r.logged = Some(now);
        }
    }

    /// Closes connection `id` in both directions.
    fn cut(&self, id: u64) {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&id) {
            c.conn.shutdown(Shutdown::Both);
        }
    }

    /// Waits (up to `timeout`) until session `id` has ended.
    fn wait_gone(&self, id: u64, timeout: Duration) -> bool {
        self.wait_clients(timeout, |c| !c.contains_key(&id))
    }

    fn forget(&self, id: u64) {
        let mut c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = c.remove(&id) {
            c.conn.shutdown(Shutdown::Both);
        }
        self.clients_changed.notify_all();
    }

    fn serve_client(&self, id: u64, conn: Stream, sender: Option<Arc<SenderTrack>>) -> End {
        let name = format!("client-{id}");
        info!("{name}: connected from {}", conn.peer_name());
        if sender.is_some() {
            if let Stream::Tcp(s) = &conn {
                crate::net::tune_migration_tcp(s);
            }
        }
        let info = self.backend.info(self.config.oldstyle);
        let mut conn = conn;
        let at = Instant::now() + self.config.handshake_timeout;
        let tls = self.config.tls.as_deref();
        let names = &self.config.names;
        let neg = match negotiate(&mut conn, at, &info, names, tls, &self.shutting_down) {
            Ok(n) => n,
            Err(HandshakeError::Closed | HandshakeError::Aborted) => {
                info!("{name}: closed during the handshake");
                return End::Closed;
            }
            Err(HandshakeError::TimedOut) => {
                info!(
                    "{name}: handshake timed out after {}s",
                    self.config.handshake_timeout.as_secs_f64()
                );
                return End::Error("handshake timed out".into());
            }
            Err(e) => {
                warn!("{name}: handshake failed: {e}");
                return End::Error(e.to_string());
            }
        };
        if let Some(t) = conn.tls_info() {
            info!(
                "{name}: {} {}, peer certificate: {}",
                t.version,
                t.cipher,
                t.peer_subject.as_deref().unwrap_or("none")
            );
            let mut c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = c.get_mut(&id) {
                c.tls = Some(t.clone());
            }
        }
        let limit = SendLimit {
            total: self.config.send_timeout,
        };
        let _ = conn.set_read_timeout(None);
        let _ = conn.set_write_timeout(Some(limit.slice()));
        debug!("{name}: negotiated {neg:?}");
        if neg.extended() {
            info!("{name}: extended headers (64-bit lengths)");
        }
        if let Some(t) = &sender {
            t.request_arrived();
        }
        let client = Client {
            name: &name,
            sender,
            send: limit,
            metrics: self.metrics.clone(),
        };
        let end = self.backend.clone().serve(conn, neg, client);
        match &end {
            // A connection cut at shutdown or hand-over ends with an error by design.
            End::Error(e) if !self.shutting_down.load(SeqCst) => warn!("{name}: ended: {e}"),
            e => info!("{name}: ended: {e:?}"),
        }
        end
    }
}
