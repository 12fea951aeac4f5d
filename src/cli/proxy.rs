//! `flexnbd proxy` (also the `flexnbd-proxy` program): serve clients from an
//! upstream NBD server, riding out its restarts and migrations.

use super::names::{export_name_arg, NameArgs};
use super::serve::{clients_arg, ip_arg, port_arg, seconds_arg};
use super::tls::ServerTlsArgs;
use super::Global;
use crate::addr::Endpoint;
use crate::proxy::{Config, MultiConn, Retry, Settings, TrackDirty, UPSTREAM_TIMEOUT};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Proxy NBD clients to an upstream server. When the upstream fails (it
/// restarts, migrates, or the network drops), the proxy reconnects and sends
/// the requests not yet answered again, so clients see only a delay. With
/// ACL entries, only the listed clients may connect.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The address to listen on; a path beginning with `/` is a unix socket.
    #[arg(short = 'l', long, value_name = "ADDR")]
    pub addr: Option<String>,
    /// The port to listen on.
    #[arg(short = 'p', long, value_name = "PORT", value_parser = port_arg)]
    pub port: Option<u16>,
    /// Listen on this unix socket (as well, or instead of --addr).
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,
    /// The upstream server's address; a path beginning with `/` is a unix socket.
    #[arg(short = 'C', long, value_name = "ADDR")]
    pub conn_addr: Option<String>,
    /// The upstream server's port.
    #[arg(short = 'P', long, value_name = "PORT", value_parser = port_arg)]
    pub conn_port: Option<u16>,
    /// The upstream server's unix socket.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["conn_addr", "conn_port"])]
    pub conn_unix: Option<PathBuf>,
    /// The export to ask the upstream for (default: the --export-name
    /// clients ask the proxy for).
    #[arg(long, value_name = "NAME", value_parser = export_name_arg)]
    pub conn_export_name: Option<String>,
    /// The local address to connect to the upstream from.
    #[arg(short = 'b', long, value_name = "ADDR", value_parser = ip_arg)]
    pub bind: Option<IpAddr>,
    /// Path to a control socket to open (for status and acl).
    #[arg(short = 's', long, value_name = "SOCK")]
    pub sock: Option<PathBuf>,
    /// Reconnection attempts after a failure before the requests in flight
    /// fail with EIO (the next request starts another round).
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub retries: u32,
    /// Seconds to wait before the first attempt (fractions allowed).
    #[arg(long, value_name = "SECONDS", default_value = "2", value_parser = delay_arg)]
    pub retry_delay: Duration,
    /// Double the wait before each further attempt.
    #[arg(long, value_name = "yes|no", default_value = "yes", value_parser = yes_no,
          action = clap::ArgAction::Set)]
    pub retry_exponential: bool,
    /// After the first failure, refuse writes, trims and zeroes (EPERM) and
    /// go on serving reads.
    #[arg(long, value_name = "yes|no", default_value = "no", value_parser = yes_no,
          action = clap::ArgAction::Set)]
    pub retry_readonly: bool,
    /// Reads of at most BYTES fetch twice as much; a later read inside the
    /// second half is answered from memory (until anything else is sent).
    #[arg(long, value_name = "BYTES", num_args = 0..=1, require_equals = true,
          default_missing_value = "4096",
          value_parser = clap::value_parser!(u32).range(0..=(16 << 20)))]
    pub cache: Option<u32>,
    /// Multi-conn: `auto` advertises it when the upstream does and emulates
    /// it otherwise; `emulate` replays each flush on every upstream
    /// connection; `disable` never advertises it.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub multi_conn: MultiConn,
    /// Which upstream connections a replayed flush goes to: `connection`
    /// (those that wrote since their last flush), `fast` (all, if any
    /// wrote), `off` (all).
    #[arg(long, value_name = "LEVEL", default_value = "connection")]
    pub multi_conn_track_dirty: TrackDirty,
    /// An empty access control list lets no client connect.
    #[arg(short = 'd', long)]
    pub default_deny: bool,
    /// A client must finish the whole handshake within this many seconds.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = seconds_arg)]
    pub handshake_timeout: Duration,
    /// Clients served at once; further connections are closed at once.
    #[arg(long, value_name = "N", default_value_t = crate::server::MAX_CLIENTS,
          value_parser = clients_arg)]
    pub max_clients: usize,
    #[command(flatten)]
    pub names: NameArgs,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// Connect to the upstream with TLS (NBD_OPT_STARTTLS).
    #[arg(long)]
    pub conn_tls: bool,
    /// The directory with the CA that signed the upstream's certificate
    /// (ca-cert.pem) and this proxy's client-cert.pem and client-key.pem.
    #[arg(long, value_name = "DIR")]
    pub conn_tls_certificates: Option<PathBuf>,
    /// The name the upstream's certificate must carry (default: its address).
    #[arg(long, value_name = "NAME")]
    pub conn_tls_hostname: Option<String>,
    #[command(flatten)]
    pub global: Global,
    /// Access control list entries: IP or IP/prefix, IPv4 or IPv6.
    #[arg(value_name = "ACL_ENTRY")]
    pub acl: Vec<String>,
}

/// `flexnbd-proxy`: the same options as a program of its own.
#[derive(Debug, clap::Parser)]
#[command(name = "flexnbd-proxy", version)]
pub struct ProxyCli {
    #[command(flatten)]
    pub args: Args,
}

fn yes_no(s: &str) -> Result<bool, String> {
    match s {
        "yes" | "true" | "on" | "1" => Ok(true),
        "no" | "false" | "off" | "0" => Ok(false),
        _ => Err(format!("expected yes or no, not {s:?}")),
    }
}

/// Seconds from 0 to an hour, fractions allowed.
fn delay_arg(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3600.0).contains(&v) => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("not a number of seconds from 0 to 3600: {s:?}")),
    }
}

/// A missing option, reported as the C flexnbd-proxy does: the message and
/// the help on stderr, exit 1.
fn usage(msg: &str) -> i32 {
    use clap::{Args as _, Command};
    let mut cmd = Args::augment_args(Command::new("flexnbd-proxy"));
    eprintln!("{msg}");
    eprintln!("{}", cmd.render_help());
    1
}

fn endpoint(addr: &str, port: Option<u16>, what: &str) -> Result<Endpoint, String> {
    if addr.starts_with('/') {
        return Ok(Endpoint::Unix(PathBuf::from(addr)));
    }
    let port = port.map(|p| p.to_string());
    Endpoint::from_addr_port(addr, port.as_deref()).map_err(|e| format!("{what}: {e}"))
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    args.global.apply();
    let mut listen = Vec::new();
    if let Some(a) = &args.addr {
        if !a.starts_with('/') && args.port.is_none() {
            return Ok(usage("--port is required with an IP address in --addr."));
        }
        listen.push(endpoint(a, args.port, "--addr").map_err(anyhow::Error::msg)?);
    }
    if let Some(u) = &args.unix {
        listen.push(Endpoint::Unix(u.clone()));
    }
    // Socket activation passes the sockets instead.
    if listen.is_empty() && std::env::var_os("LISTEN_FDS").is_none() {
        return Ok(usage("--addr is required."));
    }
    let upstream = match (&args.conn_unix, &args.conn_addr, args.conn_port) {
        (Some(p), _, _) => Endpoint::Unix(p.clone()),
        (None, Some(a), _) if a.starts_with('/') => Endpoint::Unix(PathBuf::from(a)),
        (None, Some(a), Some(p)) => {
            endpoint(a, Some(p), "--conn-addr").map_err(anyhow::Error::msg)?
        }
        _ => return Ok(usage("both --conn-addr and --conn-port are required.")),
    };
    let timeout = crate::daemon::env_secs("FLEXNBD_UPSTREAM_TIMEOUT", UPSTREAM_TIMEOUT)?;
    let cfg = Config {
        listen,
        upstream: Settings {
            endpoint: upstream,
            bind: args.bind,
            timeout,
            retry: Retry {
                retries: args.retries,
                delay: args.retry_delay,
                exponential: args.retry_exponential,
            },
            retry_readonly: args.retry_readonly,
            multi_conn: args.multi_conn,
            track_dirty: args.multi_conn_track_dirty,
            cache: args.cache.unwrap_or(0),
            export_name: args
                .conn_export_name
                .clone()
                .unwrap_or_else(|| args.names.export_name.clone()),
            tls: super::tls::client_tls(
                args.conn_tls,
                args.conn_tls_certificates.as_deref(),
                args.conn_tls_hostname.as_deref(),
                "--conn-tls",
            )?,
        },
        sock: args.sock,
        acl: args.acl,
        default_deny: args.default_deny,
        handshake_timeout: args.handshake_timeout,
        max_clients: args.max_clients,
        tls: args.tls.load()?,
        names: args.names.names(),
        send_timeout: crate::daemon::env_secs(
            "FLEXNBD_SEND_TIMEOUT_SECS",
            crate::server::SEND_TIMEOUT,
        )?,
    };
    Ok(crate::proxy::run(&cfg)?)
}
