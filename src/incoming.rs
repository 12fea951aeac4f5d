//! The destination of a migration (`listen`): the `FILE.INCOMPLETE` marker,
//! the one sender slot, and the rule for when the image has arrived. Plugged
//! into the server as its [`Intake`]; the daemon hears of the arrival through
//! the callback given to [`Incoming::create`].
//!
//! - **Marker**: created before the listener opens, without following a
//!   symlink in its place; removed by the daemon once the image is durable.
//! - **One sender at a time.** Others are closed at accept, nothing sent,
//!   except that a new sender replaces one from which no whole request has
//!   arrived for [`Limits::stale`] (a half-open link whose source has given
//!   up and reconnected). A sender whose next request does not arrive whole
//!   within [`Limits::idle`] is dropped, so a trickle of bytes cannot hold
//!   the slot.
//! - **Arrival**: a clean `NBD_CMD_DISC` from a sender whose WRITEs,
//!   WRITE_ZEROES and TRIMs covered every byte of the image. Every source (C
//!   or ours) sends every byte, holes included. A sender that leaves earlier,
//!   or disconnects having covered less, hands nothing over: the listener
//!   waits for the next sender. A connection that wrote nothing (a probe such
//!   as `nbdinfo`) is harmless. The listen-era C source's ENTRUST request is
//!   answered with success by the session and logged; it is not needed.

use crate::server::{Admit, End, Intake, SenderTrack, SessionEnd};
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default for [`Limits::idle`].
pub const IDLE: Duration = Duration::from_secs(120);
/// Default for [`Limits::stale`].
pub const STALE: Duration = Duration::from_secs(5);

/// Time limits on senders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A sender's next request must arrive whole within this time, or the
    /// sender is dropped. Long enough for a sender pacing itself under a
    /// speed limit (4 KiB pieces keep coming within that time at any limit
    /// over 35 bytes/s), short enough that a hung sender frees the slot.
    pub idle: Duration,
    /// A new sender replaces one silent for longer than this.
    pub stale: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            idle: IDLE,
            stale: STALE,
        }
    }
}

/// Why listening for a migration cannot start.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("{0} is a symbolic link; refusing to follow it (remove it and try again)")]
    MarkerIsSymlink(PathBuf),
    #[error("{0} exists and is not a regular file")]
    MarkerNotAFile(PathBuf),
    #[error("cannot create {path}: {source}")]
    Marker {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `FILE.INCOMPLETE`, present while a listener has not received a whole migration.
pub fn marker_path(file: &Path) -> PathBuf {
    let mut p = file.as_os_str().to_owned();
    p.push(".INCOMPLETE");
    PathBuf::from(p)
}

/// Creates the marker (or keeps one left by an earlier listener), never
/// following a symlink and never blocking on a FIFO put in its place.
fn create_marker(path: &Path) -> Result<(), IncomingError> {
    let opened = OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .mode(0o644)
        .open(path);
    let f = match opened {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(IncomingError::MarkerIsSymlink(path.to_owned()))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            return Err(IncomingError::MarkerNotAFile(path.to_owned()))
        }
        Err(e) => {
            return Err(IncomingError::Marker {
                path: path.to_owned(),
                source: e,
            })
        }
    };
    let meta = f.metadata().map_err(|e| IncomingError::Marker {
        path: path.to_owned(),
        source: e,
    })?;
    if !meta.is_file() {
        return Err(IncomingError::MarkerNotAFile(path.to_owned()));
    }
    Ok(())
}

struct State {
    /// The sender being served: its connection id and what it sent.
    sender: Option<(u64, Arc<SenderTrack>)>,
    arrived: bool,
}

/// A listener's wait for its image.
pub struct Incoming {
    marker: PathBuf,
    size: u64,
    limits: Limits,
    state: Mutex<State>,
    on_arrival: Box<dyn Fn() + Send + Sync>,
}

impl Incoming {
    /// Creates the marker for `file` (of `size` bytes) and starts waiting;
    /// `on_arrival` runs once, when a sender has delivered the whole image.
    pub fn create(
        file: &Path,
        size: u64,
        limits: Limits,
        on_arrival: Box<dyn Fn() + Send + Sync>,
    ) -> Result<Arc<Incoming>, IncomingError> {
        let marker = marker_path(file);
        create_marker(&marker)?;
        Ok(Arc::new(Incoming {
            marker,
            size,
            limits,
            state: Mutex::new(State {
                sender: None,
                arrived: false,
            }),
            on_arrival,
        }))
    }

    pub fn marker(&self) -> &Path {
        &self.marker
    }

    /// Removes the marker: the image is complete and durable.
    pub fn remove_marker(&self) -> io::Result<()> {
        match std::fs::remove_file(&self.marker) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides on a new connection at `now` (see [`Intake::admit`]).
    fn admit_at(&self, id: u64, now: Instant) -> Admit {
        let mut st = self.lock();
        if st.arrived {
            return Admit::Refuse("the image has arrived and is being made durable");
        }
        let replaces = match &st.sender {
            None => None,
            Some((old, t)) if t.silent_for(now) > self.limits.stale => Some(*old),
            Some(_) => return Admit::Refuse("a migration is already arriving"),
        };
        let track = Arc::new(SenderTrack::new(Some(self.limits.idle)));
        st.sender = Some((id, track.clone()));
        Admit::Sender { track, replaces }
    }
}

impl Intake for Incoming {
    fn admit(&self, id: u64) -> Admit {
        self.admit_at(id, Instant::now())
    }

    fn ended(&self, e: &SessionEnd) {
        let name = format!("client-{}", e.id);
        let Some(track) = &e.sender else { return };
        let mut st = self.lock();
        if st.sender.as_ref().map(|s| s.0) != Some(e.id) {
            // A silent sender replaced by a newer one: whatever it sent is moot.
            info!("{name}: replaced sender gone ({:?})", e.end);
            return;
        }
        st.sender = None;
        let missing = track.missing(self.size);
        match &e.end {
            End::Disconnect if missing == 0 => {
                info!("{name}: migration received ({} bytes)", self.size);
                st.arrived = true;
                drop(st);
                (self.on_arrival)();
            }
            End::Disconnect if track.scattered() => error!(
                "{name}: the sender's writes were too scattered to be an image; \
                 waiting for the next sender"
            ),
            End::Disconnect if missing == self.size => {
                warn!("{name}: disconnected without writing anything; waiting for a sender")
            }
            End::Disconnect => error!(
                "{name}: the sender disconnected having sent {} of {} bytes{}; the image \
                 is incomplete and stays unserved; waiting for the next sender",
                self.size - missing,
                self.size,
                if track.entrusted() {
                    " (after ENTRUST)"
                } else {
                    ""
                }
            ),
            End::Closed => {
                warn!("{name}: sender went away before finishing; waiting for it to reconnect")
            }
            End::Error(err) => {
                warn!("{name}: migration connection failed ({err}); waiting for the sender to reconnect")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

    fn incoming(dir: &Path, size: u64) -> (Arc<Incoming>, Arc<AtomicU32>) {
        let arrivals = Arc::new(AtomicU32::new(0));
        let a2 = arrivals.clone();
        let limits = Limits {
            idle: Duration::from_secs(60),
            stale: Duration::from_secs(5),
        };
        let inc = Incoming::create(
            &dir.join("img"),
            size,
            limits,
            Box::new(move || {
                a2.fetch_add(1, SeqCst);
            }),
        )
        .unwrap();
        (inc, arrivals)
    }

    fn sender(a: Admit) -> (Arc<SenderTrack>, Option<u64>) {
        match a {
            Admit::Sender { track, replaces } => (track, replaces),
            Admit::Client => panic!("admitted as a client"),
            Admit::Refuse(why) => panic!("refused: {why}"),
        }
    }

    fn end(id: u64, end: End, t: &Arc<SenderTrack>) -> SessionEnd {
        SessionEnd {
            id,
            end,
            sender: Some(t.clone()),
        }
    }

    #[test]
    fn only_a_complete_sender_hands_the_image_over() {
        let dir = tempfile::tempdir().unwrap();
        let (inc, arrivals) = incoming(dir.path(), 100);
        assert!(inc.marker().exists());
        // A probe, a partial sender and one that drops: nothing arrives.
        let (t, _) = sender(inc.admit(1));
        inc.ended(&end(1, End::Disconnect, &t));
        let (t, _) = sender(inc.admit(2));
        t.covered(0, 99);
        inc.ended(&end(2, End::Disconnect, &t));
        let (t, _) = sender(inc.admit(3));
        t.covered(0, 100);
        inc.ended(&end(3, End::Closed, &t));
        assert_eq!(arrivals.load(SeqCst), 0);
        // Every byte, by writes, zeroes and trims in any order, then DISC.
        let (t, _) = sender(inc.admit(4));
        t.covered(40, 60);
        t.covered(0, 41);
        inc.ended(&end(4, End::Disconnect, &t));
        assert_eq!(arrivals.load(SeqCst), 1);
        assert!(matches!(inc.admit(5), Admit::Refuse(_)));
        inc.remove_marker().unwrap();
        assert!(!inc.marker().exists());
    }

    #[test]
    fn one_sender_at_a_time_unless_it_went_silent() {
        let dir = tempfile::tempdir().unwrap();
        let (inc, arrivals) = incoming(dir.path(), 10);
        let (t1, _) = sender(inc.admit(1));
        let now = Instant::now();
        assert!(matches!(inc.admit_at(2, now), Admit::Refuse(_)));
        t1.request_arrived();
        assert!(matches!(
            inc.admit_at(3, now + Duration::from_secs(4)),
            Admit::Refuse(_)
        ));
        let (t4, replaced) = sender(inc.admit_at(4, now + Duration::from_secs(6)));
        assert_eq!(replaced, Some(1));
        // The replaced sender's end changes nothing, even a complete one.
        t1.covered(0, 10);
        inc.ended(&end(1, End::Disconnect, &t1));
        assert_eq!(arrivals.load(SeqCst), 0);
        assert!(matches!(inc.admit(5), Admit::Refuse(_)));
        t4.covered(0, 10);
        inc.ended(&end(4, End::Disconnect, &t4));
        assert_eq!(arrivals.load(SeqCst), 1);
    }

    #[test]
    fn an_empty_image_arrives_with_a_bare_disc() {
        let dir = tempfile::tempdir().unwrap();
        let (inc, arrivals) = incoming(dir.path(), 0);
        let (t, _) = sender(inc.admit(1));
        inc.ended(&end(1, End::Disconnect, &t));
        assert_eq!(arrivals.load(SeqCst), 1);
    }

    #[test]
    fn marker_never_follows_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let file = dir.path().join("img");
        std::os::unix::fs::symlink(&victim, marker_path(&file)).unwrap();
        let e = Incoming::create(&file, 1, Limits::default(), Box::new(|| {}))
            .err()
            .unwrap();
        assert!(matches!(e, IncomingError::MarkerIsSymlink(_)), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // A directory or a FIFO in the way: a clear error, no hang.
        let f2 = dir.path().join("img2");
        std::fs::create_dir(marker_path(&f2)).unwrap();
        assert!(Incoming::create(&f2, 1, Limits::default(), Box::new(|| {})).is_err());
        let f3 = dir.path().join("img3");
        let made = std::process::Command::new("mkfifo")
            .arg(marker_path(&f3))
            .status()
            .unwrap();
        assert!(made.success());
        let e = Incoming::create(&f3, 1, Limits::default(), Box::new(|| {}))
            .err()
            .unwrap();
        assert!(matches!(e, IncomingError::MarkerNotAFile(_)), "{e}");
        // A marker left by an earlier listener is kept as it is.
        let f4 = dir.path().join("img4");
        std::fs::write(marker_path(&f4), b"").unwrap();
        assert!(Incoming::create(&f4, 1, Limits::default(), Box::new(|| {})).is_ok());
    }
}
