//! `flexnbd read`: read bytes from an NBD server to stdout in one request.

use super::serve::{ip_arg, port_arg, seconds_arg};
use super::tls::ClientTlsArgs;
use super::Global;
use crate::addr::Endpoint;
use crate::client::{ConnectOptions, Connection};
use anyhow::Context;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::time::Duration;

/// Largest offset `read` and `write` accept.
pub const MAX_FROM: u64 = 1 << 62;
/// Largest single request `read` and `write` send.
pub const MAX_SIZE: u64 = 1 << 30;

/// Connect to the server at ADDR:PORT and read SIZE bytes at OFFSET in a single
/// NBD request, writing them to stdout.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The address of the remote server.
    #[arg(short = 'l', long, value_name = "ADDR")]
    pub addr: String,
    /// The port of the remote server.
    #[arg(short = 'p', long, value_name = "PORT", value_parser = port_arg)]
    pub port: Option<u16>,
    /// The byte offset to start reading from (at most 2^62).
    #[arg(short = 'F', long, value_name = "OFFSET")]
    pub from: u64,
    /// The number of bytes to read (at most 2^30).
    #[arg(short = 'S', long, value_name = "SIZE")]
    pub size: u64,
    #[command(flatten)]
    pub conn: ConnectArgs,
    #[command(flatten)]
    pub global: Global,
}

/// How `read` and `write` connect: from where, how long they wait, which
/// export, and TLS.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// The local address to bind to (for a remote access control list).
    #[arg(short = 'b', long, value_name = "BIND_ADDR", value_parser = ip_arg)]
    pub bind: Option<IpAddr>,
    #[command(flatten)]
    pub timeouts: Timeouts,
    /// The export to ask a newstyle server for (default: the empty name).
    #[arg(long, value_name = "NAME", default_value = "",
          value_parser = super::names::export_name_arg)]
    pub export_name: String,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// How long `read` and `write` wait for the server (the C flexnbd's limits).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Timeouts {
    /// Seconds allowed to connect.
    #[arg(long, value_name = "SECONDS", default_value = "15", value_parser = seconds_arg)]
    pub connect_timeout: Duration,
    /// Seconds allowed for the greeting, and for each reply to start (and
    /// for each pause while data moves).
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = seconds_arg)]
    pub reply_timeout: Duration,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    args.global.apply();
    check_limits(args.from, args.size)?;
    let mut conn = args.conn.connect(&endpoint(&args.addr, args.port)?)?;
    if args.size > 0 {
        let mut out = std::fs::File::from(
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .context("cannot use stdout")?,
        );
        conn.read_to(args.from, args.size, &mut out)
            .with_context(|| format!("read of {} bytes at {} failed", args.size, args.from))?;
    }
    conn.disconnect().context("disconnect failed")?;
    Ok(0)
}

/// Checks `--from` and `--size` against the limits of the command line contract.
pub(crate) fn check_limits(from: u64, size: u64) -> anyhow::Result<()> {
    if from > MAX_FROM {
        anyhow::bail!("--from {from} is too large (at most 2^62)");
    }
    if size > MAX_SIZE {
        anyhow::bail!("--size {size} is too large (at most 2^30)");
    }
    Ok(())
}

/// The server to talk to: a path containing `/` is a unix socket, else IP and port.
pub(crate) fn endpoint(addr: &str, port: Option<u16>) -> anyhow::Result<Endpoint> {
    if !addr.contains('/') && port.is_none() {
        anyhow::bail!("--port is required with an IP address");
    }
    let port = port.map(|p| p.to_string());
    Ok(Endpoint::from_addr_port(addr, port.as_deref())?)
}

impl ConnectArgs {
    /// Connects and negotiates (simple replies) within the timeouts.
    pub(crate) fn connect(&self, endpoint: &Endpoint) -> anyhow::Result<Connection> {
        let t = self.timeouts;
        let opts = ConnectOptions {
            bind: self.bind,
            export_name: self.export_name.clone(),
            tls: self.tls.load()?,
            connect_timeout: t.connect_timeout,
            greeting_timeout: t.reply_timeout,
            request_timeout: Some(t.reply_timeout),
            ..ConnectOptions::default()
        };
        let conn = Connection::connect(endpoint, &opts)?;
        crate::debug!(
            "connected to {endpoint}: size {} flags {:#x}{}",
            conn.size(),
            conn.flags(),
            if conn.is_oldstyle() {
                " (old-style)"
            } else {
                ""
            }
        );
        Ok(conn)
    }
}
