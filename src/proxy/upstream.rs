//! The upstream server as the whole proxy sees it: where it is, how to
//! connect, what it looked like at start (size and flags, which a server
//! that comes back must match), the links of every client connection, the
//! multi-conn emulation across them, and the counters `status` reports.

use super::link::{Barrier, Link, Phase, Tag};
use super::retry::Retry;
use super::session;
use crate::addr::Endpoint;
use crate::client::{Cancel, ClientError, ConnectOptions, Connection, ExportInfo as UpInfo};
use crate::control::ProxyStatus;
use crate::proto::consts::*;
use crate::proto::{Command, Request};
use crate::server::handshake::{ExportInfo, Negotiated, LOCAL_CAPS};
use crate::server::{Backend, Client, End};
use crate::stream::Stream;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// Whether `CAN_MULTI_CONN` is offered to clients, and how it is kept true.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MultiConn {
    /// The upstream's flag; when it lacks it (and can flush), emulate.
    Auto,
    /// Always advertise it, replaying each client flush on every upstream connection.
    Emulate,
    /// Never advertise it.
    Disable,
}

/// Which upstream connections a replayed flush goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrackDirty {
    /// All of them, if any connection wrote since the last flush.
    Fast,
    /// Those that wrote since their last flush.
    Connection,
    /// All of them, always.
    Off,
}

/// How the proxy talks to its upstream.
#[derive(Debug, Clone)]
pub struct Settings {
    pub endpoint: Endpoint,
    /// Local address to connect from (TCP).
    pub bind: Option<std::net::IpAddr>,
    /// No progress for this long fails the upstream connection.
    pub timeout: Duration,
    pub retry: Retry,
    /// After the first failure, refuse writes (EPERM) and go on reading.
    pub retry_readonly: bool,
    pub multi_conn: MultiConn,
    pub track_dirty: TrackDirty,
    /// `--cache`: reads up to this many bytes fetch twice as much (0: off).
    pub cache: u32,
    /// TLS to the upstream (`--conn-tls`).
    pub tls: Option<Arc<crate::tls::ClientTls>>,
    /// The export asked for upstream (`--conn-export-name`).
    pub export_name: String,
}

/// Reads and writes larger than this are refused (the proxy keeps every
/// request's data until it is answered).
pub const MAX_REQUEST: u32 = crate::server::handshake::MAX_PAYLOAD;

pub struct Upstream {
    set: Settings,
    info: UpInfo,
    emulate: bool,
    links: Mutex<HashMap<u64, Weak<Link>>>,
    next_link: AtomicU64,
    readonly_fallback: AtomicBool,
    /// Some connection wrote since the last replayed flush (`fast` tracking).
    any_dirty: AtomicBool,
    /// Bumped by every write on any link: a read-ahead from before is stale.
    generation: AtomicU64,
    attempts: AtomicU64,
    resent: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Upstream {
    /// Connects to the upstream once (the start-up check: no proxy without
    /// one) and learns the export's size and flags; each client connection
    /// then gets an upstream connection of its own.
    pub fn open(set: Settings) -> Result<Arc<Upstream>, ClientError> {
        let attempts = AtomicU64::new(0);
        let c = connect(&set, None, &attempts)?;
        let info = *c.info();
        let _ = c.disconnect();
        let can_flush = info.can_flush();
        let has = info.flags & FLAG_CAN_MULTI_CONN != 0;
        let emulate = can_flush
            && match set.multi_conn {
                MultiConn::Auto => !has,
                MultiConn::Emulate => true,
                MultiConn::Disable => false,
            };
        Ok(Arc::new(Upstream {
            set,
            info,
            emulate,
            links: Mutex::new(HashMap::new()),
            next_link: AtomicU64::new(1),
            readonly_fallback: AtomicBool::new(false),
            any_dirty: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            attempts,
            resent: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }))
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.set.endpoint
    }

    pub fn size(&self) -> u64 {
        self.info.size
    }

    pub fn flags(&self) -> u16 {
        self.info.flags
    }

    /// The upstream export is read-only.
    pub fn info_read_only(&self) -> bool {
        self.info.read_only()
    }

    /// The upstream agreed to extended headers (64-bit lengths).
    pub fn extended(&self) -> bool {
        self.info.extended_headers
    }

    /// The upstream greeted old-style.
    pub fn oldstyle(&self) -> bool {
        self.info.oldstyle
    }

    pub fn retry(&self) -> Retry {
        self.set.retry
    }

    pub fn timeout(&self) -> Duration {
        self.set.timeout
    }

    pub fn settings(&self) -> &Settings {
        &self.set
    }

    /// Flushes are replayed across upstream connections.
    pub fn emulates_multi_conn(&self) -> bool {
        self.emulate
    }

    /// Opens and negotiates a new upstream connection.
    pub fn connect(&self, cancel: Option<Arc<Cancel>>) -> Result<Connection, ClientError> {
        connect(&self.set, cancel, &self.attempts)
    }

    pub fn next_link_id(&self) -> u64 {
        self.next_link.fetch_add(1, Relaxed)
    }

    pub fn register(&self, link: &Arc<Link>) {
        self.lock_links().insert(link.id, Arc::downgrade(link));
    }

    pub fn unregister(&self, id: u64) {
        self.lock_links().remove(&id);
    }

    fn lock_links(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Weak<Link>>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn links(&self) -> Vec<Arc<Link>> {
        self.lock_links()
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// An upstream connection failed (or a round of retries ended).
    pub fn failed(&self, why: &str) {
        if self.set.retry_readonly && !self.readonly_fallback.swap(true, Relaxed) {
            warn!("--retry-readonly: the upstream failed; writes are refused from now on");
        }
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_owned());
    }

    pub fn read_only_fallback(&self) -> bool {
        self.readonly_fallback.load(Relaxed)
    }

    pub fn resent(&self, n: u64) {
        self.resent.fetch_add(n, Relaxed);
    }

    /// A write was answered on some link.
    pub fn wrote(&self) {
        self.any_dirty.store(true, Relaxed);
        self.generation.fetch_add(1, Relaxed);
    }

    /// Marks every read-ahead taken before now stale (a write was sent).
    pub fn bump_generation(&self) -> u64 {
        self.generation.fetch_add(1, Relaxed) + 1
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }

    /// The multi-conn emulation: before a client's FLUSH (or FUA write) on
    /// `own` is answered, a flush goes to every other upstream connection
    /// that needs one, and is waited for. False if one of them failed.
    pub fn flush_others(&self, own: u64) -> bool {
        let links: Vec<Arc<Link>> = self.links().into_iter().filter(|l| l.id != own).collect();
        let targets: Vec<Arc<Link>> = match self.set.track_dirty {
            TrackDirty::Off => links,
            TrackDirty::Fast => match self.any_dirty.swap(false, Relaxed) {
                true => links,
                false => Vec::new(),
            },
            TrackDirty::Connection => links.into_iter().filter(|l| l.take_dirty()).collect(),
        };
        if targets.is_empty() {
            return true;
        }
        let b = Barrier::new(targets.len());
        for l in &targets {
            let flush = Request::new(Command::Flush, 0, 0, 0, 0);
            l.submit(flush, Vec::new(), Tag::Barrier(b.clone()), false);
        }
        b.wait()
    }

    pub fn status(&self) -> ProxyStatus {
        let links = self.links();
        let phases: Vec<Phase> = links.iter().map(|l| l.phase()).collect();
        let upstream = if phases.contains(&Phase::Reconnecting) {
            "reconnecting"
        } else if phases.contains(&Phase::Failed) {
            "failed"
        } else {
            "connected"
        };
        ProxyStatus {
            upstream_address: self.set.endpoint.to_string(),
            upstream,
            attempts: self.attempts.load(Relaxed),
            requests_resent: self.resent.load(Relaxed),
            in_flight: links.iter().map(|l| l.in_flight() as u64).sum(),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

fn connect(
    set: &Settings,
    cancel: Option<Arc<Cancel>>,
    attempts: &AtomicU64,
) -> Result<Connection, ClientError> {
    attempts.fetch_add(1, Relaxed);
    let opts = ConnectOptions {
        bind: set.bind,
        connect_timeout: set.timeout.min(crate::client::CONNECT_TIMEOUT),
        greeting_timeout: set.timeout,
        export_name: set.export_name.clone(),
        structured_replies: true,
        base_allocation: true,
        // 64-bit lengths, passed on to clients that agree to them too.
        extended_headers: true,
        request_timeout: Some(set.timeout),
        migration: false,
        cancel,
        tls: set.tls.clone(),
    };
    Connection::connect(&set.endpoint, &opts)
}

impl Backend for Upstream {
    fn info(&self, oldstyle: bool) -> ExportInfo {
        let f = if self.info.flags & FLAG_HAS_FLAGS != 0 {
            self.info.flags
        } else {
            0
        };
        // What the server side implements is all the proxy can pass on.
        let mut caps = f & LOCAL_CAPS;
        match (self.emulate, self.set.multi_conn) {
            (true, _) => caps |= FLAG_CAN_MULTI_CONN,
            (false, MultiConn::Disable) => caps &= !FLAG_CAN_MULTI_CONN,
            _ => {}
        }
        ExportInfo {
            size: self.info.size,
            read_only: f & FLAG_READ_ONLY != 0,
            oldstyle,
            min_block: self.info.block_size.map_or(1, |b| b.minimum.max(1)),
            caps,
            structured: self.info.structured_replies,
            // 64-bit lengths for clients only when the upstream takes them.
            extended: self.info.extended_headers,
            block_status: self.info.base_allocation.is_some(),
        }
    }

    fn serve(self: Arc<Self>, conn: Stream, neg: Negotiated, client: Client<'_>) -> End {
        session::run(self, conn, neg, client)
    }
}
