//! `flexnbd listen`: wait for an inbound migration, then serve the image.

use super::serve::{ip_arg, port_arg, ServeOpts};
use crate::daemon::{Mode, Rebind};
use std::net::IpAddr;

/// Listen for an inbound migration, then serve it once it has completed.
///
/// Creates FILE.INCOMPLETE before listening and removes it once the migration
/// has arrived. Only one sender may connect at a time; no ordinary client is
/// served until the hand-over.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub opts: ServeOpts,
    /// The address to rebind to once the migration has completed.
    #[arg(short = 'L', long, value_name = "REBIND_ADDR", value_parser = ip_arg)]
    pub rebind_addr: Option<IpAddr>,
    /// The port to rebind to once the migration has completed.
    #[arg(short = 'P', long, value_name = "REBIND_PORT", value_parser = port_arg)]
    pub rebind_port: Option<u16>,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    args.opts.global.apply();
    let rebind = Rebind {
        addr: args.rebind_addr,
        port: args.rebind_port,
    };
    crate::daemon::run(&args.opts.config(Mode::Listen, Some(rebind))?)
}
