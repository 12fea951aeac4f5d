//! `flexnbd mirror`: ask a running server to migrate its image to another server.

use super::serve::{ip_arg, port_arg};
use super::Global;
use std::net::IpAddr;
use std::path::PathBuf;

/// Start a migration from the server with control socket SOCK to the server
/// listening at ADDR:PORT. Returns "Migration started" once the local server has
/// connected to the destination and checked its greeting and size.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The address of the remote server to migrate to.
    #[arg(short = 'l', long, value_name = "ADDR", value_parser = ip_arg)]
    pub addr: IpAddr,
    /// The port of the remote server to migrate to.
    #[arg(short = 'p', long, value_name = "PORT", value_parser = port_arg)]
    pub port: u16,
    /// The control socket of the local server to migrate from.
    #[arg(short = 's', long, value_name = "SOCK")]
    pub sock: PathBuf,
    /// The local address to bind to (for a remote access control list).
    #[arg(short = 'b', long, value_name = "BIND_ADDR", value_parser = ip_arg)]
    pub bind: Option<IpAddr>,
    /// Remove the source file just before handing over.
    #[arg(short = 'u', long)]
    pub unlink: bool,
    /// Limit the migration to this many bytes per second.
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub max_speed: Option<u64>,
    /// Give up after this many failed attempts (default: retry forever).
    #[arg(long, value_name = "N")]
    pub retries: Option<u32>,
    /// Keep running with a progress display until the migration ends; exit 0 only on success.
    #[arg(short = 'w', long)]
    pub wait: bool,
    #[command(flatten)]
    pub global: Global,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    args.global.apply();
    anyhow::bail!("mirror is not available yet")
}
