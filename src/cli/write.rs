//! `flexnbd write`: write bytes from stdin to an NBD server in one request.

use super::read::{check_limits, connect, endpoint, Timeouts};
use super::serve::{ip_arg, port_arg};
use super::tls::ClientTlsArgs;
use super::Global;
use anyhow::Context;
use std::net::IpAddr;
use std::os::fd::AsFd;

/// Connect to the server at ADDR:PORT and write SIZE bytes from stdin at OFFSET
/// in a single NBD request.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The address of the remote server.
    #[arg(short = 'l', long, value_name = "ADDR")]
    pub addr: String,
    /// The port of the remote server.
    #[arg(short = 'p', long, value_name = "PORT", value_parser = port_arg)]
    pub port: Option<u16>,
    /// The byte offset to start writing at (at most 2^62).
    #[arg(short = 'F', long, value_name = "OFFSET")]
    pub from: u64,
    /// The number of bytes to write (at most 2^30).
    #[arg(short = 'S', long, value_name = "SIZE")]
    pub size: u64,
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
    #[command(flatten)]
    pub global: Global,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    args.global.apply();
    check_limits(args.from, args.size)?;
    let endpoint = endpoint(&args.addr, args.port)?;
    let mut conn = connect(
        &endpoint,
        args.bind,
        args.timeouts,
        &args.tls,
        &args.export_name,
    )?;
    if args.size > 0 {
        let mut input = std::fs::File::from(
            std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .context("cannot use stdin")?,
        );
        conn.write_from(args.from, args.size, &mut input, false)
            .with_context(|| format!("write of {} bytes at {} failed", args.size, args.from))?;
        // The data is only as safe as the server's cache until it is flushed.
        if conn.info().can_flush() {
            conn.flush().context("flush after the write failed")?;
        }
    }
    conn.disconnect().context("disconnect failed")?;
    Ok(0)
}
