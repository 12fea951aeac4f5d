//! Live migration, source side: copies the image to a destination server
//! while clients keep using it, then hands the image over.
//!
//! [`planner`], [`dirty`] and [`inflight`] are the pure parts; `link`
//! (connection), `observer` (client writes) and `copy` (the attempt loop) do I/O.

mod copy;
pub mod dirty;
pub mod inflight;
mod link;
mod observer;
pub mod planner;

use crate::addr::Endpoint;
use crate::client::{ClientError, ConnectOptions, Connection};
use crate::control::{MigrationStatus, MirrorAction};
use crate::export::Export;
use dirty::DirtyMap;
use link::Link;
use observer::Observer;
use planner::{seconds_left, RateLimit, SpeedMeter};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default time a destination has to answer a request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// The hand-over begins: no new client requests are taken.
    fn handover_started(&self);
    /// The hand-over was abandoned; clients are served again.
    fn handover_abandoned(&self);
    /// The migration ended.
    fn finished(&self, how: &Finish);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Sweep,
    Passes,
    Active,
    Handover,
}

struct Progress {
    started: Instant,
    attempts: u32,
    phase: Phase,
    /// During the first sweep: bytes of the image not yet sent.
    unswept: u64,
    meter: SpeedMeter,
    finish: Option<Finish>,
}

struct Shared {
    export: Arc<Export>,
    spec: Spec,
    dirty: Arc<DirtyMap>,
    observer: Arc<Observer>,
    hooks: Arc<dyn Hooks>,
    stop: AtomicBool,
    stop_lock: Mutex<()>,
    stop_cv: Condvar,
    limit: Mutex<RateLimit>,
    progress: Mutex<Progress>,
    link: Mutex<Option<Arc<Link>>>,
    done_cv: Condvar,
}

/// A running (or finished) migration.
pub struct Mirror {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Connects to the destination and checks its greeting and size.
fn connect(spec: &Spec, size: u64) -> Result<Connection, StartError> {
    let opts = ConnectOptions {
        bind: spec.bind,
        request_timeout: Some(spec.request_timeout),
        ..ConnectOptions::default()
    };
    let conn = Connection::connect(&Endpoint::Tcp(spec.dest), &opts).map_err(|e| {
        warn!("migration to {}: {e}", spec.dest);
        match e {
            ClientError::Connect { .. } => StartError::Connect,
            // As the C flexnbd: a greeting that is not NBD counts as a rejection.
            ClientError::Rejected | ClientError::Closed | ClientError::BadGreeting(_) => {
                StartError::Rejected
            }
            _ => StartError::NoResponse,
        }
    })?;
    if conn.size() != size {
        warn!(
            "migration to {}: remote size {} does not match local size {size}",
            spec.dest,
            conn.size()
        );
        return Err(StartError::SizeMismatch);
    }
    if conn.info().read_only() {
        warn!("migration to {}: the destination is read-only", spec.dest);
        return Err(StartError::Rejected);
    }
    Ok(conn)
}

impl Mirror {
    /// Connects to the destination (reporting failure at once) and starts
    /// copying on a thread of its own.
    pub fn start(
        export: Arc<Export>,
        spec: Spec,
        hooks: Arc<dyn Hooks>,
    ) -> Result<Arc<Mirror>, StartError> {
        let size = export.size();
        let conn = connect(&spec, size)?;
        let dirty = Arc::new(DirtyMap::new(size, dirty::block_size_for(size)));
        let observer = Observer::new(dirty.clone());
        export.set_observer(Some(observer.clone()));
        let shared = Arc::new(Shared {
            limit: Mutex::new(RateLimit::new(spec.max_bps)),
            export,
            spec,
            dirty,
            observer,
            hooks,
            stop: AtomicBool::new(false),
            stop_lock: Mutex::new(()),
            stop_cv: Condvar::new(),
            progress: Mutex::new(Progress {
                started: Instant::now(),
                attempts: 0,
                phase: Phase::Sweep,
                unswept: size,
                meter: SpeedMeter::new(Duration::from_secs(5)),
                finish: None,
            }),
            link: Mutex::new(None),
            done_cv: Condvar::new(),
        });
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mirror".into())
            .spawn(move || copy::run(s2, conn))
            .map_err(|e| {
                warn!("cannot start the migration thread: {e}");
                StartError::NoResponse
            })?;
        info!("migration to {} started", shared.spec.dest);
        Ok(Arc::new(Mirror {
            shared,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// The status keys of a running migration.
    pub fn status(&self) -> MigrationStatus {
        let s = &self.shared;
        let now = Instant::now();
        let mut p = s.progress.lock().unwrap_or_else(|e| e.into_inner());
        let started = p.started;
        let speed = p.meter.rate(now, started);
        let unswept = if p.phase == Phase::Sweep {
            p.unswept
        } else {
            0
        };
        let bytes_left = unswept + s.dirty.dirty_bytes();
        let limit = s.limit.lock().unwrap_or_else(|e| e.into_inner()).limit();
        // Under a limit, the limit bounds the speed to expect (and stands in
        // for it before there is a measurement).
        let expected = match limit {
            Some(l) if speed == 0 => l,
            Some(l) => speed.min(l),
            None => speed,
        };
        MigrationStatus {
            speed,
            duration: now.duration_since(p.started).as_secs(),
            seconds_left: seconds_left(bytes_left, expected),
            bytes_left,
            speed_limit: limit,
            attempts: p.attempts,
        }
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
        self.shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finish
            .clone()
    }

    /// Waits until the migration has ended.
    pub fn wait(&self) -> Finish {
        let mut p = self
            .shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(f) = &p.finish {
                return f.clone();
            }
            p = self
                .shared
                .done_cv
                .wait(p)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stops the migration and waits until the server is back to normal service.
    pub fn stop(&self) {
        self.shared.stop.store(true, SeqCst);
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

    fn wake(&self) {
        let _g = self.stop_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.stop_cv.notify_all();
    }

    /// Sleeps up to `d`; returns early (true) when stopped.
    fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut g = self.stop_lock.lock().unwrap_or_else(|e| e.into_inner());
        while !self.stopped() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .stop_cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    fn set_phase(&self, phase: Phase) {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .phase = phase;
    }

    fn sent(&self, bytes: u64) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.meter.add(bytes, Instant::now());
    }
}
