//! The running server as the control socket and a migration see it: status,
//! ACL changes, and starting, steering and stopping a migration.

use super::Event;
use crate::acl::AclEntry;
use crate::control::{Handler, MirrorRequest, Reply, Status};
use crate::export::Export;
use crate::mirror::{Finish, Hooks, Mirror, Spec};
use crate::server::Server;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

pub(super) struct Daemon {
    pub server: Arc<Server>,
    pub export: Arc<Export>,
    pub file: PathBuf,
    pub has_control: AtomicBool,
    pub clients_allowed: AtomicBool,
    pub shutting_down: AtomicBool,
    /// The current (or last) migration, from the moment it starts connecting.
    pub mirror: Mutex<Option<Arc<Mirror>>>,
    pub events: Mutex<mpsc::Sender<Event>>,
    pub request_timeout: Duration,
    pub stall: Duration,
    /// The TCP addresses this server listens on (a migration to one of
    /// them would copy the image onto itself).
    pub own: Mutex<Vec<SocketAddr>>,
}

impl Daemon {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<Mirror>>> {
        self.mirror.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The migration that has started and not ended.
    pub fn running_mirror(&self) -> Option<Arc<Mirror>> {
        self.slot()
            .clone()
            .filter(|m| m.is_started() && m.finish().is_none())
    }

    /// A migration under way: started, or still connecting.
    pub fn active_mirror(&self) -> Option<Arc<Mirror>> {
        self.slot().clone().filter(|m| m.finish().is_none())
    }

    /// Whether the last migration handed the image over.
    pub fn handed_over(&self) -> bool {
        self.slot()
            .as_ref()
            .is_some_and(|m| m.finish() == Some(Finish::HandedOver))
    }

    fn is_own_address(&self, dest: SocketAddr) -> bool {
        let own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        crate::net::is_own_address(dest, &own)
    }
}

/// What a migration tells the daemon.
struct MirrorHooks {
    daemon: Arc<Daemon>,
}

impl Hooks for MirrorHooks {
    fn handover_started(&self) -> bool {
        self.daemon.clients_allowed.store(false, SeqCst);
        true
    }

    fn handover_abandoned(&self) {
        self.daemon.clients_allowed.store(true, SeqCst);
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
        Status {
            pid: std::process::id(),
            size: d.export.size(),
            is_mirroring: mirror.is_some(),
            clients_allowed: d.clients_allowed.load(SeqCst),
            num_clients: d.server.num_clients() as u64,
            has_control: d.has_control.load(SeqCst),
            migration: mirror.map(|m| m.status()),
        }
    }

    fn set_acl(&self, entries: Vec<AclEntry>) {
        self.0.server.set_acl(entries);
    }

    fn start_mirror(&self, req: MirrorRequest) -> Reply {
        let d = &self.0;
        if d.shutting_down.load(SeqCst) {
            return Reply::err(1, "shutting down");
        }
        if !d.has_control.load(SeqCst) {
            return Reply::err(1, "this server has not received its image yet");
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
        let spec = Spec {
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
            let mut slot = d.slot();
            if slot.as_ref().is_some_and(|m| m.finish().is_none()) {
                return Reply::err(1, "mirror already running");
            }
            let hooks = Arc::new(MirrorHooks { daemon: d.clone() });
            let m = Mirror::start(d.export.clone(), spec, hooks);
            *slot = Some(m.clone());
            m
        };
        // Connecting can take seconds; `status` keeps answering meanwhile.
        match m.started() {
            Ok(()) if d.shutting_down.load(SeqCst) => {
                m.stop();
                Reply::err(1, "shutting down")
            }
            Ok(()) => Reply::ok("Mirror started"),
            Err(e) => {
                // A failed start leaves no state behind.
                let mut slot = d.slot();
                if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &m)) {
                    *slot = None;
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

    fn wait_mirror(&self) -> Reply {
        let m = self.0.slot().clone();
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
