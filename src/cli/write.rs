//! `flexnbd write`: write bytes from stdin to an NBD server in one request.

use super::read::{check_limits, endpoint, ConnectArgs};
use super::serve::port_arg;
use super::Global;
use anyhow::Context;
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
    #[command(flatten)]
    pub conn: ConnectArgs,
    #[command(flatten)]
    pub global: Global,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    args.global.apply();
    check_limits(args.from, args.size)?;
    let mut conn = args.conn.connect(&endpoint(&args.addr, args.port)?)?;
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
