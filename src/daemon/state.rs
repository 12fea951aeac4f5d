//! The running server as the control socket and a migration see it: status,
//! ACL changes, and starting, steering and stopping a migration.

use super::pause::{Owner, Pauses, Ticket};
use super::Event;
use crate::acl::AclEntry;
use crate::control::grammar::escape_value;
use crate::control::{
    Handler, Lease, MirrorRequest, PauseRequest, PauseStatus, Paused, Reply, Status,
};
use crate::export::Export;
use crate::mirror::{Finish, Hooks, Mirror, Spec};
use crate::server::Server;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// What the server is doing. Pauses are counted beside it (a pause is not
/// a phase: the image can be paused while serving and while mirroring).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// `listen`: waiting for the image to arrive; no clients.
    Waiting,
    /// Serving clients (and possibly migrating the image away).
    Serving,
    /// A migration holds requests while the last changes go out.
    HandingOver,
    /// Stopping: no new migration or pause is started.
    ShuttingDown,
}

/// The daemon's state, under one lock.
pub(super) struct State {
    pub phase: Phase,
    /// The current (or last) migration, from the moment it starts connecting.
    pub mirror: Option<Arc<Mirror>>,
}

pub(super) struct Daemon {
    pub server: Arc<Server>,
    pub export: Arc<Export>,
    pub file: PathBuf,
    pub state: Mutex<State>,
    pub pauses: Arc<Pauses>,
    pub events: Mutex<mpsc::Sender<Event>>,
    pub request_timeout: Duration,
    pub stall: Duration,
    /// The TCP addresses this server listens on (a migration to one of
    /// them would copy the image onto itself).
    pub own: Mutex<Vec<SocketAddr>>,
}

/// Why a pause was refused or failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum PauseError {
    #[error("this server has not received its image yet")]
    NoImage,
    #[error("a migration is handing the image over")]
    HandingOver,
    #[error("shutting down")]
    ShuttingDown,
    #[error("requests in flight did not complete within {0:.3} s; not paused")]
    Drain(f64),
    #[error("cannot flush the image: {0}; not paused")]
    Flush(crate::export::Error),
    #[error("the pause timed out before it was in force")]
    Expired,
}

impl Daemon {
    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn phase(&self) -> Phase {
        self.state().phase
    }

    pub fn set_phase(&self, p: Phase) {
        self.state().phase = p;
    }

    pub fn has_control(&self) -> bool {
        self.phase() != Phase::Waiting
    }

    /// The migration that has started and not ended.
    pub fn running_mirror(&self) -> Option<Arc<Mirror>> {
        self.state()
            .mirror
            .clone()
            .filter(|m| m.is_started() && m.finish().is_none())
    }

    /// A migration under way: started, or still connecting.
    pub fn active_mirror(&self) -> Option<Arc<Mirror>> {
        self.state().mirror.clone().filter(|m| m.finish().is_none())
    }

    /// Whether the last migration handed the image over.
    pub fn handed_over(&self) -> bool {
        self.state()
            .mirror
            .as_ref()
            .is_some_and(|m| m.finish() == Some(Finish::HandedOver))
    }

    fn is_own_address(&self, dest: SocketAddr) -> bool {
        let own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        crate::net::is_own_address(dest, &own)
    }

    /// Pauses the image: takes a lease, waits for every request in flight
    /// and flushes the image, so a copy taken now holds every acknowledged
    /// write. The lease is released again on any failure.
    pub fn pause(&self, owner: Owner, timeout: Duration) -> Result<u64, PauseError> {
        let id = {
            let st = self.state();
            match st.phase {
                Phase::Waiting => return Err(PauseError::NoImage),
                Phase::HandingOver => return Err(PauseError::HandingOver),
                Phase::ShuttingDown => return Err(PauseError::ShuttingDown),
                Phase::Serving => {}
            }
            self.pauses.add(owner, timeout)
        };
        let fail = |e: PauseError| {
            self.pauses.release(id, "it failed");
            Err(e)
        };
        let started = std::time::Instant::now();
        if !self.export.gate().drain(Some(started + timeout)) {
            return fail(PauseError::Drain(timeout.as_secs_f64()));
        }
        if let Err(e) = self.export.flush() {
            return fail(PauseError::Flush(e));
        }
        if !self.pauses.is_active(id) {
            return Err(PauseError::Expired);
        }
        info!(
            "paused (pause {id}, {owner:?}, for at most {:.3} s) in {:.3} s",
            timeout.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        Ok(id)
    }
}

/// What a migration tells the daemon.
struct MirrorHooks {
    daemon: Arc<Daemon>,
}

impl Hooks for MirrorHooks {
    fn handover_started(&self) -> bool {
        let mut st = self.daemon.state();
        if self.daemon.pauses.is_paused() {
            return false;
        }
        if st.phase == Phase::Serving {
            st.phase = Phase::HandingOver;
        }
        true
    }

    fn handover_abandoned(&self) {
        let mut st = self.daemon.state();
        if st.phase == Phase::HandingOver {
            st.phase = Phase::Serving;
        }
    }

    fn finished(&self, how: &Finish) {
        if *how == Finish::HandedOver {
            let _ = self
                .daemon
                .events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(Event::HandedOver);
        }
    }
}

/// The control socket's view; a thin wrapper so the daemon can be shared.
pub(super) struct Control(pub Arc<Daemon>);

impl Handler for Control {
    fn status(&self) -> Status {
        let d = &self.0;
        let mirror = d.running_mirror();
        let phase = d.phase();
        Status {
            pid: std::process::id(),
            size: d.export.size(),
            is_mirroring: mirror.is_some(),
            clients_allowed: phase == Phase::Serving,
            num_clients: d.server.num_clients() as u64,
            has_control: phase != Phase::Waiting,
            migration: mirror.map(|m| m.status()),
            pause: d.pauses.state().map(|p| PauseStatus {
                paused_for: p.paused_for,
                holds: p.holds,
                queued_requests: d.export.gate().waiting(),
            }),
            proxy: None,
            tls: crate::control::TlsStatus::of(&d.server),
        }
    }

    fn set_acl(&self, entries: Vec<AclEntry>) {
        self.0.server.set_acl(entries);
    }

    fn start_mirror(&self, req: MirrorRequest) -> Reply {
        let d = &self.0;
        match d.phase() {
            Phase::ShuttingDown => return Reply::err(1, "shutting down"),
            Phase::Waiting => return Reply::err(1, "this server has not received its image yet"),
            Phase::Serving | Phase::HandingOver => {}
        }
        if d.is_own_address(req.dest) {
            warn!(
                "refusing to migrate to {}: this server's own address",
                req.dest
            );
            return Reply::err(
                1,
                format!(
                    "{} is this server's own address; refusing to mirror onto itself",
                    req.dest
                ),
            );
        }
        let tls = match &req.tls {
            None => None,
            Some(t) => {
                let own = d.server.tls().map(|s| s.dir.clone());
                let Some(dir) = t.certificates.clone().or(own) else {
                    return Reply::err(
                        1,
                        "mirror over TLS needs a certificate directory (tls-certificates, \
                         or --tls-certificates on this server)",
                    );
                };
                match crate::tls::ClientTls::load(&dir, t.hostname.clone()) {
                    Ok(c) => Some(Arc::new(c)),
                    Err(e) => {
                        warn!("refusing to migrate to {}: {e}", req.dest);
                        return Reply::err(1, format!("cannot set up TLS: {e}"));
                    }
                }
            }
        };
        let spec = Spec {
            tls,
            export_name: req.export_name.clone(),
            dest: req.dest,
            bind: req.bind,
            action: req.action,
            max_bps: req.max_bps,
            retries: req.retries,
            file: d.file.clone(),
            request_timeout: d.request_timeout,
            stall: d.stall,
        };
        // Registered before it connects, so `break` and signals find it.
        let m = {
            let mut st = d.state();
            if st.mirror.as_ref().is_some_and(|m| m.finish().is_none()) {
                return Reply::err(1, "mirror already running");
            }
            let hooks = Arc::new(MirrorHooks { daemon: d.clone() });
            let m = Mirror::start(d.export.clone(), spec, hooks);
            st.mirror = Some(m.clone());
            m
        };
        // Connecting can take seconds; `status` keeps answering meanwhile.
        match m.started() {
            Ok(()) if d.phase() == Phase::ShuttingDown => {
                m.stop();
                Reply::err(1, "shutting down")
            }
            Ok(()) => Reply::ok("Mirror started"),
            Err(e) => {
                // A failed start leaves no state behind.
                let mut st = d.state();
                if st.mirror.as_ref().is_some_and(|s| Arc::ptr_eq(s, &m)) {
                    st.mirror = None;
                }
                Reply::err(1, e.to_string())
            }
        }
    }

    fn set_mirror_speed(&self, bytes_per_sec: u64) -> Reply {
        match self.0.running_mirror() {
            Some(m) => {
                m.set_speed(bytes_per_sec);
                Reply::ok("updated")
            }
            None => Reply::err(1, "Not currently mirroring"),
        }
    }

    fn break_mirror(&self) -> Reply {
        match self.0.active_mirror() {
            Some(m) => {
                m.stop();
                match m.finish() {
                    Some(Finish::HandedOver) => {
                        Reply::err(1, "too late: the migration was already handed over")
                    }
                    _ => Reply::ok("mirror stopped"),
                }
            }
            None => Reply::err(1, "not mirroring"),
        }
    }

    fn pause(&self, req: PauseRequest) -> Result<Paused, Reply> {
        let d = &self.0;
        let owner = if req.hold { Owner::Held } else { Owner::Timed };
        let id = d
            .pause(owner, req.timeout)
            .map_err(|e| Reply::err(1, e.to_string()))?;
        let holds = d.pauses.state().map_or(1, |p| p.holds);
        let reply = Reply::ok(format!(
            "paused id={id} holds={holds} timeout={:.3} size={} file={}",
            req.timeout.as_secs_f64(),
            d.export.size(),
            escape_value(&d.file.display().to_string())
        ));
        let lease: Option<Box<dyn Lease>> = match req.hold {
            true => Some(Box::new(Ticket {
                pauses: d.pauses.clone(),
                id,
            })),
            false => None,
        };
        Ok(Paused { reply, lease })
    }

    fn resume(&self, id: Option<u64>) -> Reply {
        let p = &self.0.pauses;
        match id {
            Some(id) if p.release(id, "resumed") => Reply::ok(match p.state() {
                Some(s) => format!("pause {id} ended; still paused by {} more", s.holds),
                None => format!("pause {id} ended; resumed"),
            }),
            Some(id) => Reply::err(1, format!("no pause {id} (it ended, or never was)")),
            None => match p.release_all(None, "resumed") {
                0 => Reply::err(1, "not paused"),
                n => Reply::ok(format!("resumed ({n} pause(s) ended)")),
            },
        }
    }

    fn wait_mirror(&self) -> Reply {
        let m = self.0.state().mirror.clone();
        let Some(m) = m else {
            return Reply::err(1, "not mirroring");
        };
        match m.wait() {
            Finish::HandedOver => Reply::ok("migration complete: handed over"),
            Finish::Completed => Reply::ok("migration complete"),
            Finish::Stopped => Reply::err(1, "migration stopped"),
            Finish::Failed(why) => Reply::err(1, format!("migration failed: {why}")),
        }
    }
}

impl Lease for Ticket {
    fn ended(&self) -> bool {
        Ticket::ended(self)
    }
}
