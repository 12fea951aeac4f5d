//! The proxy (`flexnbd proxy`, also installed as `flexnbd-proxy`): a server
//! whose backend is an upstream NBD server, reached through a reconnecting
//! client, so its clients ride out the upstream restarting or migrating.
//!
//! Where a request travels:
//! 1. `server` (listener, ACL, client limit, handshake) as for an image; the
//!    backend is [`upstream::Upstream`], which presents the upstream's size
//!    and flags (old-style to clients when the upstream greeted old-style).
//! 2. [`session`]: read and checked as by the server; refused ones answered
//!    at once; `--cache` read-ahead answered from memory; a FLUSH or FUA
//!    write first replays a flush on the other upstream connections when
//!    multi-conn is emulated ([`upstream::Upstream::flush_others`]).
//! 3. [`link`]: one upstream connection per client connection; the request
//!    is kept, with its data, until answered; the link's thread receives the
//!    answers (`client::Receiver`) and hands them to the session, which
//!    writes them to the client encoded for what the client negotiated.
//! 4. On an upstream failure the link reconnects ([`retry`]), checks the
//!    size, and sends every unanswered request again in the order it was
//!    first sent; a round of retries that fails answers them EIO.

pub mod link;
pub mod retry;
pub mod session;
pub mod upstream;

pub use retry::Retry;
pub use upstream::{MultiConn, Settings, TrackDirty, Upstream};

use crate::acl::{Acl, AclEntry, BadSpec};
use crate::addr::Endpoint;
use crate::client::ClientError;
use crate::control::server::ControlServer;
use crate::control::{Handler, MirrorRequest, Reply, Status};
use crate::server::{self as srv, Bound, Listener, Server};
use signal_hook::consts::{SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Default of `FLEXNBD_UPSTREAM_TIMEOUT`: no progress for this long fails
/// the upstream connection.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Descriptors a proxied client holds: its socket and the server's, the
/// session's reader and writer handles, and the upstream connection.
const FDS_PER_CLIENT: u64 = 6;
/// How long clients get to go at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything `flexnbd proxy` was asked to do.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where clients connect.
    pub listen: Vec<Endpoint>,
    pub upstream: Settings,
    /// The control socket (`status`, `acl`).
    pub sock: Option<PathBuf>,
    pub acl: Vec<String>,
    pub default_deny: bool,
    pub handshake_timeout: Duration,
    pub max_clients: usize,
    pub send_timeout: Duration,
    /// TLS towards the proxy's clients (`--tls`).
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    /// The export name the proxy's clients ask for (`--export-name`).
    pub names: srv::ExportNames,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Acl(#[from] BadSpec),
    #[error("cannot reach the upstream server {endpoint}: {cause}")]
    Upstream {
        endpoint: Endpoint,
        cause: ClientError,
    },
    #[error("cannot listen on {endpoint}: {cause}")]
    Listen {
        endpoint: Endpoint,
        cause: io::Error,
    },
    #[error("cannot open control socket {}: {cause}", .path.display())]
    Control { path: PathBuf, cause: io::Error },
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error(transparent)]
    Inherit(#[from] srv::InheritError),
    #[error(
        "the upstream {0} is old-style, so its clients are greeted old-style, \
         which has no STARTTLS: --tls cannot be used"
    )]
    OldstyleTls(Endpoint),
}

/// Runs the proxy until SIGINT, SIGTERM or SIGQUIT; returns the exit code.
pub fn run(cfg: &Config) -> Result<i32, ProxyError> {
    // Taken first, while this is the only thread (the variables are removed).
    let inherited = Bound::inherited()?;
    let acl = Acl::parse(&cfg.acl, cfg.default_deny)?;
    let endpoint = cfg.upstream.endpoint.clone();
    let up = Upstream::open(cfg.upstream.clone()).map_err(|cause| ProxyError::Upstream {
        endpoint: endpoint.clone(),
        cause,
    })?;
    let tls_on = cfg
        .tls
        .as_ref()
        .is_some_and(|t| t.mode != crate::tls::TlsMode::Off);
    if up.oldstyle() && tls_on {
        return Err(ProxyError::OldstyleTls(endpoint));
    }
    info!(
        "upstream {endpoint}: {} bytes, flags {:#x}, {}{}",
        up.size(),
        up.flags(),
        if up.oldstyle() {
            "old-style"
        } else {
            "newstyle"
        },
        if up.emulates_multi_conn() {
            ", multi-conn emulated"
        } else {
            ""
        }
    );
    let server = Server::with_backend(
        up.clone(),
        srv::Config {
            oldstyle: up.oldstyle(),
            handshake_timeout: cfg.handshake_timeout,
            send_timeout: cfg.send_timeout,
            max_clients: srv::fit_clients(cfg.max_clients, FDS_PER_CLIENT),
            tls: cfg.tls.clone(),
            names: cfg.names.clone(),
        },
        acl,
    );
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGQUIT]).map_err(ProxyError::Signals)?;
    let mut bound = Vec::new();
    for ep in cfg.listen.iter().filter(|_| inherited.is_empty()) {
        let b = Bound::bind(ep).map_err(|cause| ProxyError::Listen {
            endpoint: ep.clone(),
            cause,
        })?;
        bound.push(b);
    }
    if !inherited.is_empty() {
        if !cfg.listen.is_empty() {
            info!("socket activation: serving on the passed sockets, not on --addr/--unix");
        }
        bound = inherited;
    }
    let mut listeners: Vec<Listener> = Vec::new();
    for b in bound {
        let endpoint = b.local();
        let l = b
            .start(server.clone())
            .map_err(|cause| ProxyError::Listen { endpoint, cause })?;
        listeners.push(l);
    }
    let control = match &cfg.sock {
        Some(p) => Some(
            ControlServer::start(
                p,
                Arc::new(Control {
                    server: server.clone(),
                    up: up.clone(),
                }),
            )
            .map_err(|cause| ProxyError::Control {
                path: p.clone(),
                cause,
            })?,
        ),
        None => None,
    };
    let on: Vec<String> = listeners.iter().map(|l| l.endpoint().to_string()).collect();
    crate::sys::notify(
        true,
        false,
        &format!("proxying {} for clients on {}", endpoint, on.join(", ")),
    );
    if let Some(s) = signals.forever().next() {
        info!("received signal {s}: shutting down");
    }
    crate::sys::notify(false, true, "shutting down");
    for l in listeners {
        l.stop();
    }
    server.begin_shutdown();
    server.disconnect_all();
    if !server.wait_idle(DRAIN_TIMEOUT) {
        warn!("clients still connected after {DRAIN_TIMEOUT:?}; exiting anyway");
    }
    if let Some(c) = control {
        c.stop();
    }
    Ok(0)
}

/// The proxy's control socket: `status` and `acl`; no image to migrate.
struct Control {
    server: Arc<Server>,
    up: Arc<Upstream>,
}

const NO_IMAGE: &str = "a proxy has no image of its own to migrate";

impl Handler for Control {
    fn status(&self) -> Status {
        Status {
            pid: std::process::id(),
            size: self.up.size(),
            is_mirroring: false,
            clients_allowed: true,
            num_clients: self.server.num_clients() as u64,
            has_control: true,
            migration: None,
            pause: None,
            proxy: Some(self.up.status()),
            tls: crate::control::TlsStatus::of(&self.server),
        }
    }

    fn set_acl(&self, entries: Vec<AclEntry>) {
        self.server.set_acl(entries);
    }

    fn start_mirror(&self, _req: MirrorRequest) -> Reply {
        Reply::err(1, NO_IMAGE)
    }

    fn set_mirror_speed(&self, _bytes_per_sec: u64) -> Reply {
        Reply::err(1, NO_IMAGE)
    }

    fn break_mirror(&self) -> Reply {
        Reply::err(1, NO_IMAGE)
    }
}
