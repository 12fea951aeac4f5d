//! Wiring: builds the export, starts listeners and the control socket, waits
//! for signals, and shuts down cleanly.

use crate::acl::Acl;
use crate::addr::Endpoint;
use crate::control::server::ControlServer;
use crate::export::Export;
use crate::incoming::{self, Incoming};
use crate::server::{self as srv, Bound, Listener, Server};
use crate::tls::TlsMode;
use anyhow::{bail, Context};
use signal_hook::consts::{SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// How long clients get to finish their in-flight requests at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long clients get to disconnect by themselves after ESHUTDOWN.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Listen,
}

/// What to run: `serve` and `listen` build it from their arguments.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    pub file: PathBuf,
    pub read_only: bool,
    /// Where to listen for clients (at least one).
    pub endpoints: Vec<Endpoint>,
    /// The control socket.
    pub sock: Option<PathBuf>,
    /// ACL entries as written (validated here).
    pub acl: Vec<String>,
    pub default_deny: bool,
    pub oldstyle: bool,
    pub handshake_timeout: Duration,
    pub max_clients: usize,
    /// `listen`: where to listen once the image has arrived.
    pub rebind: Option<Rebind>,
    /// The nbdkit-style pause-control socket.
    pub pause_control: Option<PathBuf>,
    /// TLS offered or required to clients (and to a migration's sender).
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    /// The export name clients ask for (`--export-name`) and its description.
    pub names: crate::server::ExportNames,
    /// `--run CMD`: run it once listening; its end ends the server.
    pub run: Option<String>,
    /// `--unix -`: the private directory the socket is in (removed at exit).
    pub private_dir: Option<Arc<captive::PrivateDir>>,
    /// `--metrics ADDR:PORT`: where Prometheus scrapes `/metrics`.
    pub metrics: Option<std::net::SocketAddr>,
}

/// Where to listen after an incoming migration has arrived.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rebind {
    pub addr: Option<std::net::IpAddr>,
    pub port: Option<u16>,
}

pub mod captive;
mod pause;
mod pause_control;
mod scrape;
mod state;

use state::{Control, Daemon, Phase, State};

/// Things the main thread waits for.
#[derive(Debug)]
enum Event {
    Signal(i32),
    /// An incoming migration completed: this server now owns the image.
    ControlArrived,
    /// An outgoing migration completed: the destination owns the image now.
    HandedOver,
    /// The `--run` command ended with this exit code.
    RunExited(i32),
}

/// A duration in seconds (fractions allowed) from the environment variable
/// `name`, or `default` when it is not set.
pub fn env_secs(name: &str, default: Duration) -> anyhow::Result<Duration> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Duration::from_secs_f64(s)),
            _ => bail!("{name}: not a positive number of seconds: {v:?}"),
        },
    }
}

/// The per-request timeout of a migration: `FLEXNBD_MS_REQUEST_LIMIT_SECS`,
/// 60 s by default.
fn request_timeout() -> anyhow::Result<Duration> {
    env_secs(
        "FLEXNBD_MS_REQUEST_LIMIT_SECS",
        crate::mirror::REQUEST_TIMEOUT,
    )
}

/// How long a client write forwarded to a migration's destination waits for
/// it: `FLEXNBD_MIRROR_STALL_MS` (milliseconds), 250 by default.
fn stall_budget() -> anyhow::Result<Duration> {
    match std::env::var("FLEXNBD_MIRROR_STALL_MS") {
        Err(_) => Ok(crate::mirror::STALL_BUDGET),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(ms) if (1..=3_600_000).contains(&ms) => Ok(Duration::from_millis(ms)),
            _ => bail!(
                "FLEXNBD_MIRROR_STALL_MS: not a number of milliseconds from 1 to 3600000: {v:?}"
            ),
        },
    }
}

/// Descriptors a client connection holds (its socket, the reader's and the
/// server's handles on it).
const FDS_PER_CLIENT: u64 = 3;

/// The TCP addresses of `listeners`.
fn tcp_addresses(listeners: &[Listener]) -> Vec<std::net::SocketAddr> {
    listeners
        .iter()
        .filter_map(|l| match l.endpoint() {
            Endpoint::Tcp(a) => Some(*a),
            Endpoint::Unix(_) => None,
        })
        .collect()
}

/// A listener's limits on senders: `FLEXNBD_MIGRATION_IDLE_SECS` (120 s by
/// default) for a whole request to arrive, `FLEXNBD_MIGRATION_STALE_SECS`
/// (5 s) of silence after which a new sender replaces the current one.
fn incoming_limits() -> anyhow::Result<incoming::Limits> {
    Ok(incoming::Limits {
        idle: env_secs("FLEXNBD_MIGRATION_IDLE_SECS", incoming::IDLE)?,
        stale: env_secs("FLEXNBD_MIGRATION_STALE_SECS", incoming::STALE)?,
    })
}

/// Binds `ep`, retrying every second until it works or a signal arrives.
fn bind_retrying(ep: &Endpoint, rx: &mpsc::Receiver<Event>) -> Result<Bound, i32> {
    let mut logged = false;
    loop {
        match Bound::bind(ep) {
            Ok(b) => return Ok(b),
            Err(e) => {
                if !logged {
                    warn!("cannot bind {ep}: {e}; retrying every second");
                    logged = true;
                }
            }
        }
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(Event::Signal(s)) => {
                info!("received signal {s} while rebinding");
                return Err(0);
            }
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(1),
        }
    }
}

pub fn run(opts: &Config) -> anyhow::Result<i32> {
    // Taken first, while this is the only thread (the variables are removed).
    let inherited = Bound::inherited()?;
    let (mode, rebind, eps) = (opts.mode, opts.rebind, &opts.endpoints);
    if eps.is_empty() && inherited.is_empty() {
        bail!("--addr and --port (or --unix) are required");
    }
    if opts.oldstyle && opts.tls.as_ref().is_some_and(|t| t.mode != TlsMode::Off) {
        bail!("--oldstyle cannot be used with --tls: the old-style handshake has no STARTTLS");
    }
    let request_timeout = request_timeout()?;
    let stall = stall_budget()?;
    let limits = incoming_limits()?;
    let acl = Acl::parse(&opts.acl, opts.default_deny)?;
    if !opts.file.exists() {
        bail!("{}: file does not exist", opts.file.display());
    }
    let export = Export::open(&opts.file, opts.read_only)
        .with_context(|| format!("cannot open {}", opts.file.display()))?;
    let export = Arc::new(export);
    let max_clients = crate::server::fit_clients(opts.max_clients, FDS_PER_CLIENT);
    let server = Server::new(
        export.clone(),
        srv::Config {
            oldstyle: opts.oldstyle,
            handshake_timeout: opts.handshake_timeout,
            send_timeout: env_secs("FLEXNBD_SEND_TIMEOUT_SECS", crate::server::SEND_TIMEOUT)?,
            max_clients,
            tls: opts.tls.clone(),
            names: opts.names.clone(),
        },
        acl,
    );

    let (tx, rx) = mpsc::channel::<Event>();
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGQUIT]).context("cannot install signal handlers")?;
    let signal_handle = signals.handle();
    let stx = tx.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if stx.send(Event::Signal(s)).is_err() {
                    break;
                }
            }
        })
        .context("cannot start the signal thread")?;

    let incoming = match mode {
        Mode::Serve => None,
        Mode::Listen => {
            let atx = std::sync::Mutex::new(tx.clone());
            let arrived = Box::new(move || {
                let _ = atx
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send(Event::ControlArrived);
            });
            let inc = Incoming::create(&opts.file, export.size(), limits, arrived)?;
            server.set_intake(Some(inc.clone()));
            Some(inc)
        }
    };

    let mut bound = Vec::new();
    if inherited.is_empty() {
        for ep in eps {
            bound.push(Bound::bind(ep).with_context(|| format!("cannot listen on {ep}"))?);
        }
    } else {
        if !eps.is_empty() {
            info!("socket activation: serving on the passed sockets, not on --addr/--unix");
        }
        bound = inherited;
    }
    let mut listeners: Vec<Listener> = Vec::new();
    for b in bound {
        listeners.push(b.start(server.clone())?);
    }

    let daemon = Arc::new(Daemon {
        server: server.clone(),
        export: export.clone(),
        file: opts.file.clone(),
        state: std::sync::Mutex::new(State {
            phase: match mode {
                Mode::Serve => Phase::Serving,
                Mode::Listen => Phase::Waiting,
            },
            mirror: None,
        }),
        pauses: pause::Pauses::start(export.gate().clone())
            .context("cannot start the pause thread")?,
        events: std::sync::Mutex::new(tx.clone()),
        request_timeout,
        stall,
        own: std::sync::Mutex::new(tcp_addresses(&listeners)),
    });
    let control = match &opts.sock {
        Some(p) => Some(
            ControlServer::start(p, Arc::new(Control(daemon.clone())))
                .with_context(|| format!("cannot open control socket {}", p.display()))?,
        ),
        None => None,
    };

    let metrics = match opts.metrics {
        Some(addr) => {
            let (server, status) = (server.clone(), Control(daemon.clone()));
            let render: crate::metrics::http::Render = Arc::new(move || {
                let mut out = String::new();
                server.metrics().encode(&mut out);
                scrape::encode_status(&mut out, &crate::control::Handler::status(&status));
                out
            });
            Some(
                crate::metrics::http::MetricsServer::start(addr, render)
                    .with_context(|| format!("cannot serve metrics on {addr}"))?,
            )
        }
        None => None,
    };

    let pause_control = match &opts.pause_control {
        Some(p) => Some(
            pause_control::start(p, daemon.clone())
                .with_context(|| format!("cannot open pause-control socket {}", p.display()))?,
        ),
        None => None,
    };

    let captive = match &opts.run {
        Some(cmd) => {
            let endpoints: Vec<Endpoint> = listeners.iter().map(|l| l.endpoint().clone()).collect();
            let addr = captive::Address {
                endpoints: &endpoints,
                export_name: &opts.names.name,
                tls: opts.tls.as_ref().map_or(TlsMode::Off, |t| t.mode),
            };
            let rtx = std::sync::Mutex::new(tx.clone());
            let exited = Box::new(move |code| {
                let _ = rtx
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send(Event::RunExited(code));
            });
            Some(
                captive::Captive::start(cmd, &addr.env(), exited)
                    .with_context(|| format!("cannot run {cmd:?}"))?,
            )
        }
        None => None,
    };

    let serving = |what: &str, listeners: &[Listener]| {
        let on: Vec<String> = listeners.iter().map(|l| l.endpoint().to_string()).collect();
        format!("{what} {} on {}", opts.file.display(), on.join(", "))
    };
    let what = match mode {
        Mode::Serve => "serving",
        Mode::Listen => "waiting for a migration into",
    };
    crate::sys::notify(true, false, &serving(what, &listeners));

    let mut signalled = false;
    let code = loop {
        match rx.recv() {
            Ok(Event::RunExited(c)) => {
                info!("--run: the command exited with status {c}: shutting down");
                break c;
            }
            Ok(Event::Signal(s)) => {
                info!("received signal {s}: shutting down");
                signalled = true;
                if daemon.has_control() {
                    break 0;
                }
                if let Some(inc) = &incoming {
                    warn!(
                        "stopped before a migration arrived; {} stays",
                        inc.marker().display()
                    );
                }
                break 1;
            }
            Ok(Event::HandedOver) => {
                info!("image handed over: shutting down");
                break 0;
            }
            Ok(Event::ControlArrived) => {
                if let Err(e) = export.flush() {
                    error!("cannot make the received image durable: {e}");
                    break 1;
                }
                if let Some(inc) = &incoming {
                    if let Err(e) = inc.remove_marker() {
                        warn!("cannot remove {}: {e}", inc.marker().display());
                    }
                }
                server.set_intake(None);
                daemon.set_phase(Phase::Serving);
                info!("took control of the image");
                if let Some(r) = rebind.filter(|r| r.addr.is_some() || r.port.is_some()) {
                    match rebind_listeners(&mut listeners, r, &server, &rx) {
                        Ok(()) => {
                            *daemon.own.lock().unwrap_or_else(|p| p.into_inner()) =
                                tcp_addresses(&listeners);
                        }
                        Err(code) => break code,
                    }
                }
                crate::sys::notify(false, false, &serving("serving", &listeners));
            }
            Err(_) => break 1,
        }
    };

    daemon.set_phase(Phase::ShuttingDown);
    crate::sys::notify(false, true, "shutting down");
    if let Some(c) = &captive {
        c.stop();
    }
    // Paused requests are let go (they meet the shutdown below).
    daemon.pauses.stop();
    for l in listeners {
        l.stop();
    }
    // A migration under way (connecting, copying or handing over) is
    // stopped; if its hand-over got through first, the destination owns the
    // image. A signal during a migration is not a clean stop: exit 1.
    let under_way = daemon.active_mirror();
    if let Some(m) = &under_way {
        info!("stopping the migration");
        m.stop();
    }
    let handed_over = daemon.handed_over();
    let code = match () {
        _ if handed_over => 0,
        _ if signalled && under_way.is_some() => {
            warn!("stopped by a signal during a migration; the image stays here");
            1
        }
        _ => code,
    };
    server.begin_shutdown();
    if handed_over {
        // The destination owns the image now. Requests held back during the
        // hand-over were never executed here: the connections are closed
        // without answering them, so clients see a dropped connection, which
        // a reconnecting client (qemu with reconnect-delay, the kernel with a
        // dead-connection timeout) retries against the new server, instead
        // of an I/O error passed up to the VM.
        server.cut_all();
        export.gate().shut();
    } else {
        // Requests from now on get ESHUTDOWN, upon which clients disconnect;
        // requests already executing finish. Then the remaining connections
        // are closed.
        export.gate().shut();
        if server.num_clients() > 0 {
            server.wait_idle(SHUTDOWN_GRACE);
        }
        server.disconnect_all();
    }
    if !server.wait_idle(DRAIN_TIMEOUT) {
        warn!("clients still connected after {DRAIN_TIMEOUT:?}; exiting anyway");
    }
    if let Err(e) = export.flush() {
        error!("final flush failed: {e}");
        return Ok(1);
    }
    if let Some(c) = control {
        c.stop();
    }
    if let Some(c) = pause_control {
        c.stop();
    }
    if let Some(m) = metrics {
        m.stop();
    }
    signal_handle.close();
    Ok(code)
}

/// Moves the TCP listeners to the rebind address and/or port.
fn rebind_listeners(
    listeners: &mut Vec<Listener>,
    r: Rebind,
    server: &Arc<Server>,
    rx: &mpsc::Receiver<Event>,
) -> Result<(), i32> {
    let mut kept = Vec::new();
    let mut targets = Vec::new();
    for l in listeners.drain(..) {
        match l.endpoint().clone() {
            Endpoint::Tcp(a) => {
                let ip = r.addr.unwrap_or(a.ip());
                let port = r.port.unwrap_or(a.port());
                targets.push(Endpoint::Tcp(std::net::SocketAddr::new(ip, port)));
                l.stop();
            }
            Endpoint::Unix(_) => kept.push(l),
        }
    }
    *listeners = kept;
    for ep in targets {
        let b = bind_retrying(&ep, rx)?;
        match b.start(server.clone()) {
            Ok(l) => {
                info!("rebound to {ep}");
                listeners.push(l);
            }
            Err(e) => {
                error!("cannot serve on {ep}: {e}");
                return Err(1);
            }
        }
    }
    Ok(())
}
