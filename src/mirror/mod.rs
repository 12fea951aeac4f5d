//! Live migration, source side: copies the image to a destination server
//! while clients keep using it, then hands the image over.
//!
//! [`planner`], [`dirty`], [`inflight`] and `progress` are the pure parts;
//! `link` (connection), `observer` (client writes) and `copy` (the attempt
//! loop) do I/O.
//!
//! [`Mirror::start`] returns at once with the migration registered, and its
//! thread opens the first connection; [`Mirror::started`] waits for that
//! outcome. So a `break` (or a signal) that comes while the source is still
//! connecting or checking the greeting finds the migration and stops it.

mod copy;
pub mod dirty;
pub mod inflight;
mod link;
mod observer;
pub mod planner;
mod progress;
mod status;

pub use status::{MigrationState, MigrationStatus, MirrorAction};

use crate::addr::Endpoint;
use crate::client::{Cancel, ClientError, ConnectOptions, Connection};
use crate::export::Export;
use crate::gate::Hold;
use crate::wait;
use dirty::DirtyMap;
use link::Link;
use observer::Observer;
use planner::RateLimit;
use progress::Progress;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default time a destination has to answer a request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a forwarded client write waits for the destination.
pub const STALL_BUDGET: Duration = Duration::from_millis(250);

/// What to migrate where.
#[derive(Debug, Clone)]
pub struct Spec {
    pub dest: SocketAddr,
    pub bind: Option<IpAddr>,
    pub action: MirrorAction,
    pub max_bps: Option<u64>,
    /// Failed attempts tolerated after the migration started (`None`: forever).
    pub retries: Option<u32>,
    /// The source file, removed before the hand-over with [`MirrorAction::Unlink`].
    pub file: PathBuf,
    /// How long the destination has to answer one request.
    pub request_timeout: Duration,
    /// How long a forwarded client write waits for the destination before it
    /// is acknowledged anyway and its blocks go back to the dirty map.
    pub stall: Duration,
    /// TLS to the destination.
    pub tls: Option<Arc<crate::tls::ClientTls>>,
    /// The export asked of the destination (`mirror --export-name`).
    pub export_name: String,
}

/// Why a migration could not start; the texts are the control socket replies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    #[error("Mirror failed to connect")]
    Connect,
    #[error("Mirror was rejected")]
    Rejected,
    #[error("Remote server failed to respond")]
    NoResponse,
    #[error("Remote size does not match local size")]
    SizeMismatch,
    #[error("Mirror was stopped before it started")]
    Stopped,
}

/// How a started migration ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// The destination took over; this server must stop serving.
    HandedOver,
    /// Copied completely without handing over (`nothing` action).
    Completed,
    /// Stopped by `break`.
    Stopped,
    /// Gave up.
    Failed(String),
}

/// What the migration tells the server it runs in.
pub trait Hooks: Send + Sync {
    /// The hand-over may begin (no new client requests are taken from now
    /// on): true, unless the image is paused (the hand-over then waits).
    fn handover_started(&self) -> bool;
    /// The hand-over was abandoned; clients are served again.
    fn handover_abandoned(&self);
    /// The migration ended.
    fn finished(&self, how: &Finish);
}

struct Shared {
    export: Arc<Export>,
    spec: Spec,
    dirty: Arc<DirtyMap>,
    observer: Arc<Observer>,
    hooks: Arc<dyn Hooks>,
    stop: AtomicBool,
    /// Abandons a connection attempt under way when stopped.
    cancel: Arc<Cancel>,
    stop_lock: Mutex<()>,
    stop_cv: Condvar,
    limit: Mutex<RateLimit>,
    progress: Mutex<Progress>,
    /// The first connection's outcome, once known.
    start: Mutex<Option<Result<(), StartError>>>,
    start_cv: Condvar,
    link: Mutex<Option<Arc<Link>>>,
    done_cv: Condvar,
    /// After a hand-over: the gate stays closed for as long as this exists.
    kept: Mutex<Option<Hold>>,
}

/// A running (or finished) migration.
pub struct Mirror {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A failed connection attempt: the control reply, and what happened.
struct ConnectFailure {
    kind: StartError,
    detail: String,
}

/// Connects to the destination and checks its greeting and size.
fn connect(s: &Shared) -> Result<Connection, ConnectFailure> {
    let spec = &s.spec;
    let size = s.export.size();
    let opts = ConnectOptions {
        bind: spec.bind,
        request_timeout: Some(spec.request_timeout),
        migration: true,
        cancel: Some(s.cancel.clone()),
        tls: spec.tls.clone(),
        export_name: spec.export_name.clone(),
        // Holes of any size are then zeroed in one request.
        extended_headers: true,
        ..ConnectOptions::default()
    };
    let fail = |kind, detail: String| {
        warn!("migration to {}: {detail}", spec.dest);
        ConnectFailure { kind, detail }
    };
    let conn = Connection::connect(&Endpoint::Tcp(spec.dest), &opts).map_err(|e| {
        let kind = match e {
            ClientError::Connect { .. } => StartError::Connect,
            ClientError::Cancelled => StartError::Stopped,
            // As the C flexnbd: a greeting that is not NBD counts as a rejection.
            ClientError::Rejected | ClientError::Closed | ClientError::BadGreeting(_) => {
                StartError::Rejected
            }
            // TLS refused, or a certificate not accepted, either way.
            ClientError::Tls(_) => StartError::Rejected,
            // No export of that name there (NBD_REP_ERR_UNKNOWN).
            ClientError::OptionRefused { .. } => StartError::Rejected,
            _ => StartError::NoResponse,
        };
        fail(kind, e.to_string())
    })?;
    if conn.size() != size {
        let d = format!(
            "remote size {} does not match local size {size}",
            conn.size()
        );
        return Err(fail(StartError::SizeMismatch, d));
    }
    if conn.info().read_only() {
        let d = "the destination is read-only".to_string();
        return Err(fail(StartError::Rejected, d));
    }
    Ok(conn)
}

impl Mirror {
    /// Registers a migration and starts its thread, which connects to the
    /// destination; [`started`](Self::started) tells how that went.
    pub fn start(export: Arc<Export>, spec: Spec, hooks: Arc<dyn Hooks>) -> Arc<Mirror> {
        let size = export.size();
        let dirty = Arc::new(DirtyMap::new(size, dirty::block_size_for(size)));
        let observer = Observer::new(dirty.clone(), spec.stall);
        let shared = Arc::new(Shared {
            limit: Mutex::new(RateLimit::new(spec.max_bps)),
            export,
            spec,
            dirty,
            observer,
            hooks,
            stop: AtomicBool::new(false),
            cancel: Cancel::new(),
            stop_lock: Mutex::new(()),
            stop_cv: Condvar::new(),
            progress: Mutex::new(Progress::new(Instant::now())),
            start: Mutex::new(None),
            start_cv: Condvar::new(),
            link: Mutex::new(None),
            done_cv: Condvar::new(),
            kept: Mutex::new(None),
        });
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mirror".into())
            .spawn(move || copy::run(s2));
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                warn!("cannot start the migration thread: {e}");
                shared.set_start(Err(StartError::NoResponse));
                let mut p = shared.progress();
                p.finish = Some(Finish::Failed(format!("no migration thread: {e}")));
                None
            }
        };
        Arc::new(Mirror {
            shared,
            thread: Mutex::new(thread),
        })
    }

    /// Waits until the first connection is up (the migration has started) or
    /// has failed (the migration is over, nothing was changed).
    pub fn started(&self) -> Result<(), StartError> {
        let st = self.shared.start.lock().unwrap_or_else(|e| e.into_inner());
        let (st, _) = wait::until(&self.shared.start_cv, st, None, |s| s.is_some());
        st.clone().unwrap_or(Err(StartError::NoResponse))
    }

    /// Whether the first connection is up.
    pub fn is_started(&self) -> bool {
        matches!(
            *self.shared.start.lock().unwrap_or_else(|e| e.into_inner()),
            Some(Ok(()))
        )
    }

    /// The status keys of a running migration.
    pub fn status(&self) -> MigrationStatus {
        let s = &self.shared;
        let limit = s.limit.lock().unwrap_or_else(|e| e.into_inner()).limit();
        let dirty = s.dirty.dirty_bytes();
        s.progress().status(
            Instant::now(),
            s.export.size(),
            dirty,
            |pos| s.dirty.dirty_bytes_below(pos),
            limit,
        )
    }

    /// Changes the speed limit (0 removes it).
    pub fn set_speed(&self, bps: u64) {
        self.shared
            .limit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set(Some(bps));
        self.shared.wake();
    }

    /// How it ended, once it has.
    pub fn finish(&self) -> Option<Finish> {
        self.shared.progress().finish.clone()
    }

    /// Waits until the migration has ended.
    pub fn wait(&self) -> Finish {
        let p = self.shared.progress();
        let (p, _) = wait::until(&self.shared.done_cv, p, None, |p| p.finish.is_some());
        p.finish.clone().unwrap_or(Finish::Stopped)
    }

    /// Stops the migration (also while it is still connecting) and waits
    /// until the server is back to normal service.
    pub fn stop(&self) {
        self.shared.stop.store(true, SeqCst);
        self.shared.cancel.cancel();
        self.shared.wake();
        if let Some(l) = self
            .shared
            .link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            l.fail("migration stopped".into());
        }
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(SeqCst)
    }

    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_start(&self, r: Result<(), StartError>) {
        *self.start.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.start_cv.notify_all();
    }

    fn wake(&self) {
        let _g = self.stop_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.stop_cv.notify_all();
    }

    /// Sleeps up to `d`; returns early (true) when stopped.
    fn sleep(&self, d: Duration) -> bool {
        let g = self.stop_lock.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Some(Instant::now() + d);
        wait::until(&self.stop_cv, g, deadline, |_| self.stopped()).1
    }

    /// The destination confirmed `bytes` of the copy.
    fn sent(&self, bytes: u64) {
        self.progress().sent(bytes, Instant::now());
    }
}
