//! The one hook through which the destination of a migration plugs into the
//! server: [`Intake`] decides who a new connection is (an ordinary client, the
//! migration's sender, or nobody) and hears how each session ended; a
//! sender's session reports what it has received through its [`SenderTrack`].

use super::coverage::Coverage;
use super::session::End;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to do with a connection that passed the access control list.
pub enum Admit {
    /// Serve it as an ordinary client.
    Client,
    /// Serve it as the sender of an incoming migration. `replaces`: a
    /// sender's connection (by id) to close first, because it went silent.
    Sender {
        track: Arc<SenderTrack>,
        replaces: Option<u64>,
    },
    /// Close it with nothing sent, logging why.
    Refuse(&'static str),
}

/// Decides admissions while the server waits for a migration.
pub trait Intake: Send + Sync {
    /// Connection `id` was accepted and passed the ACL.
    fn admit(&self, id: u64) -> Admit;
    /// A session admitted by [`Intake::admit`] ended (handshake failures included).
    fn ended(&self, end: &SessionEnd);
}

/// How a session ended, as the intake sees it.
#[derive(Debug, Clone)]
pub struct SessionEnd {
    pub id: u64,
    pub end: End,
    /// What a sender's session received; `None` for an ordinary client.
    pub sender: Option<Arc<SenderTrack>>,
}

/// Most disjoint written ranges tracked for one sender (a few MiB of
/// memory). Every real source writes large runs that merge; a sender that
/// scatters more is not delivering an image, and is never given control.
const MAX_RANGES: usize = 1 << 16;

/// What one sender's session has received so far. Updated by the session,
/// read by the intake.
#[derive(Debug)]
pub struct SenderTrack {
    epoch: Instant,
    coverage: Mutex<Coverage>,
    /// Milliseconds after `epoch` at which the last whole request arrived
    /// (or the connection was admitted).
    last_request_ms: AtomicU64,
    entrusted: AtomicBool,
    /// Its writes were too scattered to track: it cannot hand an image over.
    scattered: AtomicBool,
    /// A request (header and payload) must arrive whole within this time.
    idle: Option<Duration>,
}

impl SenderTrack {
    pub fn new(idle: Option<Duration>) -> SenderTrack {
        SenderTrack {
            epoch: Instant::now(),
            coverage: Mutex::new(Coverage::default()),
            last_request_ms: AtomicU64::new(0),
            entrusted: AtomicBool::new(false),
            scattered: AtomicBool::new(false),
            idle,
        }
    }

    /// The time a whole request has to arrive in.
    pub fn idle_limit(&self) -> Option<Duration> {
        self.idle
    }

    /// `[off, off + len)` was written, zeroed or trimmed.
    pub fn covered(&self, off: u64, len: u64) {
        if self.scattered.load(Relaxed) {
            return;
        }
        let mut c = self.coverage.lock().unwrap_or_else(|p| p.into_inner());
        c.add(off, len);
        if c.ranges() > MAX_RANGES {
            self.scattered.store(true, Relaxed);
            *c = Coverage::default();
        }
    }

    /// Bytes of an image of `size` bytes not covered yet (all of them, for
    /// a sender whose writes were too scattered to track).
    pub fn missing(&self, size: u64) -> u64 {
        if self.scattered.load(Relaxed) {
            return size;
        }
        self.coverage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .missing(size)
    }

    /// Whether its writes were too scattered to track.
    pub fn scattered(&self) -> bool {
        self.scattered.load(Relaxed)
    }

    /// A whole request has arrived.
    pub fn request_arrived(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_request_ms.fetch_max(ms, Relaxed);
    }

    /// How long since the last whole request arrived (or since admission).
    pub fn silent_for(&self, now: Instant) -> Duration {
        let last = self.epoch + Duration::from_millis(self.last_request_ms.load(Relaxed));
        now.saturating_duration_since(last)
    }

    /// The sender sent ENTRUST (the listen-era C hand-over request).
    pub fn entrust(&self) {
        self.entrusted.store(true, Relaxed);
    }

    pub fn entrusted(&self) -> bool {
        self.entrusted.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_coverage_and_silence() {
        let t = SenderTrack::new(Some(Duration::from_secs(3)));
        assert_eq!(t.missing(100), 100);
        t.covered(0, 60);
        t.covered(50, 50);
        assert_eq!(t.missing(100), 0);
        let later = Instant::now() + Duration::from_secs(10);
        assert!(t.silent_for(later) >= Duration::from_secs(9));
        t.request_arrived();
        assert!(t.silent_for(t.epoch) == Duration::ZERO);
        assert!(!t.entrusted());
        t.entrust();
        assert!(t.entrusted());
        assert_eq!(t.idle_limit(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn scattered_writes_are_not_tracked_and_never_complete() {
        let t = SenderTrack::new(None);
        for i in 0..=MAX_RANGES as u64 {
            t.covered(i * 2, 1);
        }
        assert!(t.scattered());
        t.covered(0, 1 << 30);
        assert_eq!(t.missing(1 << 30), 1 << 30);
    }
}
