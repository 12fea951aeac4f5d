//! `flexnbd serve`: serve a file over NBD until signalled or migrated away.

use super::names::NameArgs;
use super::tls::ServerTlsArgs;
use super::Global;
use crate::addr::{parse_ip, parse_port, Endpoint};
use crate::daemon::captive::PrivateDir;
use crate::daemon::{Config, Mode, Rebind};
use anyhow::{anyhow, bail, Context};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// Options shared by `serve` and `listen`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeOpts {
    /// The address to listen on (IPv4 or IPv6; `0` means all IPv4 addresses; a path
    /// containing `/` is taken as a unix socket).
    #[arg(short = 'l', long, value_name = "ADDR")]
    pub addr: Option<String>,
    /// The port to listen on.
    #[arg(short = 'p', long, value_name = "PORT", value_parser = port_arg)]
    pub port: Option<u16>,
    /// The file to serve. Must already exist.
    #[arg(short = 'f', long, value_name = "FILE")]
    pub file: PathBuf,
    /// Path to a control socket to open (for status, acl, mirror and break).
    #[arg(short = 's', long, value_name = "SOCK")]
    pub sock: Option<PathBuf>,
    /// Path to a pause-control socket speaking nbdkit's pause filter
    /// protocol (`p` pauses, `r` resumes; answered `P`, `R`, or `X`).
    #[arg(long, value_name = "PATH")]
    pub pause_control: Option<PathBuf>,
    /// An empty access control list lets no client connect.
    #[arg(short = 'd', long)]
    pub default_deny: bool,
    /// Also listen on this unix socket (for nbd+unix:// clients); `-` makes
    /// a private one in a new directory under $TMPDIR, removed at exit
    /// (for --run).
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,
    /// Once listening, run CMD with /bin/sh -c, and when it ends shut down
    /// and exit with its status (captive mode, as nbdkit's --run). CMD finds
    /// the server in $uri (nbd://…, nbd+unix://…), $nbd (nbd:…), $port,
    /// $unixsocket, $exportname and $tls (0, 1, 2 for off, on, require).
    #[arg(long, value_name = "CMD")]
    pub run: Option<String>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics: requests, bytes
    /// and latency by command, errors by errno, clients, migration and pause.
    #[arg(long, value_name = "ADDR:PORT", value_parser = metrics_arg)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Serve the file read-only.
    #[arg(short = 'r', long)]
    pub read_only: bool,
    /// Speak the old-style handshake of the original C flexnbd instead of fixed newstyle.
    #[arg(long)]
    pub oldstyle: bool,
    /// A client must finish the whole handshake within this many seconds.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = seconds_arg)]
    pub handshake_timeout: std::time::Duration,
    /// Clients served at once; further connections are closed at once.
    #[arg(long, value_name = "N", default_value_t = crate::server::MAX_CLIENTS,
          value_parser = clients_arg)]
    pub max_clients: usize,
    #[command(flatten)]
    pub names: NameArgs,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    #[command(flatten)]
    pub global: Global,
    /// Access control list entries: IP or IP/prefix, IPv4 or IPv6.
    #[arg(value_name = "ACL_ENTRY")]
    pub acl: Vec<String>,
}

/// Serve a file. With ACL entries, only the listed clients may connect.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub opts: ServeOpts,
}

/// A positive number of seconds (fractions allowed), at most a day.
pub fn seconds_arg(s: &str) -> Result<std::time::Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => {
            Ok(std::time::Duration::from_secs_f64(v))
        }
        _ => Err(format!(
            "not a number of seconds above 0 and at most 86400: {s:?}"
        )),
    }
}

/// A number of clients from 1 to a million.
pub fn clients_arg(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
        _ => Err(format!("not a number of clients from 1 to 1000000: {s:?}")),
    }
}

/// An IP address and port (`127.0.0.1:9100`, `[::1]:9100`).
fn metrics_arg(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("not an IP address and port (such as 127.0.0.1:9100): {s:?}"))
}

pub fn port_arg(s: &str) -> Result<u16, String> {
    parse_port(s).map_err(|e| e.to_string())
}

pub fn ip_arg(s: &str) -> Result<IpAddr, String> {
    parse_ip(s).map_err(|e| e.to_string())
}

/// The endpoints to listen on from `--addr`/`--port` and `--unix` (`-`: a
/// socket in `private`, made here).
fn endpoints(
    opts: &ServeOpts,
    private: &mut Option<Arc<PrivateDir>>,
) -> anyhow::Result<Vec<Endpoint>> {
    let mut eps = Vec::new();
    match (&opts.addr, opts.port) {
        (Some(a), p) => {
            let port = p.map(|p| p.to_string());
            let ep = Endpoint::from_addr_port(a, port.as_deref()).map_err(|e| match e {
                crate::addr::AddrError::BadPort(_) if p.is_none() => {
                    anyhow!("--port is required with an IP address in --addr")
                }
                e => anyhow!(e),
            })?;
            eps.push(ep);
        }
        (None, Some(_)) => bail!("--addr is required with --port"),
        (None, None) => {}
    }
    match &opts.unix {
        Some(u) if u.as_os_str() == "-" => {
            let d = PrivateDir::create().context("cannot make a directory for --unix -")?;
            eps.push(Endpoint::Unix(d.path().join("socket")));
            *private = Some(Arc::new(d));
        }
        Some(u) => eps.push(Endpoint::Unix(u.clone())),
        None => {}
    }
    // Socket activation passes the sockets instead.
    if eps.is_empty() && std::env::var_os("LISTEN_FDS").is_none() {
        bail!("--addr and --port (or --unix) are required");
    }
    Ok(eps)
}

impl ServeOpts {
    /// The daemon's configuration from these options.
    pub fn config(&self, mode: Mode, rebind: Option<Rebind>) -> anyhow::Result<Config> {
        let mut private_dir = None;
        let endpoints = endpoints(self, &mut private_dir)?;
        Ok(Config {
            mode,
            file: self.file.clone(),
            read_only: self.read_only,
            endpoints,
            sock: self.sock.clone(),
            acl: self.acl.clone(),
            default_deny: self.default_deny,
            oldstyle: self.oldstyle,
            handshake_timeout: self.handshake_timeout,
            max_clients: self.max_clients,
            rebind,
            pause_control: self.pause_control.clone(),
            tls: self.tls.load()?,
            names: self.names.names(),
            run: self.run.clone(),
            private_dir,
            metrics: self.metrics,
        })
    }
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    args.opts.global.apply();
    crate::daemon::run(&args.opts.config(Mode::Serve, None)?)
}
