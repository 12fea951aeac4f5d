//! The running server as the control socket and a migration see it: status,
//! ACL changes, and starting, steering and stopping a migration.

use super::Event;
use crate::acl::AclEntry;
use crate::control::{Handler, MirrorRequest, Reply, Status};
use crate::export::Export;
use crate::mirror::{Finish, Hooks, Mirror, Spec};
use crate::server::Server;
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
    /// A `mirror` command is connecting to its destination.
    pub starting: AtomicBool,
    pub mirror: Mutex<Option<Arc<Mirror>>>,
    pub events: Mutex<mpsc::Sender<Event>>,
    pub request_timeout: Duration,
}

impl Daemon {
    /// The current migration, if one is running.
    pub fn running_mirror(&self) -> Option<Arc<Mirror>> {
        self.mirror
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|m| m.finish().is_none())
    }
}

/// What a migration tells the daemon.
struct MirrorHooks {
    daemon: Arc<Daemon>,
}

impl Hooks for MirrorHooks {
    fn handover_started(&self) {
        self.daemon.clients_allowed.store(false, SeqCst);
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
        // Connecting can take seconds: the slot is not held meanwhile, so
        // `status` keeps answering; `starting` keeps a second start out.
        if d.running_mirror().is_some() || d.starting.swap(true, SeqCst) {
            return Reply::err(1, "mirror already running");
        }
        let spec = Spec {
            dest: req.dest,
            bind: req.bind,
            action: req.action,
            max_bps: req.max_bps,
            retries: req.retries,
            file: d.file.clone(),
            request_timeout: d.request_timeout,
        };
        let hooks = Arc::new(MirrorHooks { daemon: d.clone() });
        let started = Mirror::start(d.export.clone(), spec, hooks);
        let reply = match started {
            Ok(m) => {
                *d.mirror.lock().unwrap_or_else(|p| p.into_inner()) = Some(m.clone());
                if d.shutting_down.load(SeqCst) {
                    m.stop();
                    Reply::err(1, "shutting down")
                } else {
                    Reply::ok("Mirror started")
                }
            }
            Err(e) => Reply::err(1, e.to_string()),
        };
        d.starting.store(false, SeqCst);
        reply
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
        match self.0.running_mirror() {
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
        let m = self
            .0
            .mirror
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
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
