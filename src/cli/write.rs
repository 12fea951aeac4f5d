//! `flexnbd write`: write bytes from stdin to an NBD server in one request.

use super::serve::{ip_arg, port_arg};
use super::Global;
use std::net::IpAddr;

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
    pub global: Global,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    args.global.apply();
    anyhow::bail!("write is not available yet")
}
