//! `flexnbd mirror-speed`: change the speed limit of a running migration.

use super::Global;
use crate::control::client::{print_reply, request};
use std::path::PathBuf;

/// Change the speed limit of the migration running on the server with control socket SOCK.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The control socket of the migrating server.
    #[arg(short = 's', long, value_name = "SOCK")]
    pub sock: PathBuf,
    /// The new limit in bytes per second (0 removes the limit).
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub max_speed: u64,
    #[command(flatten)]
    pub global: Global,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    args.global.apply();
    let speed = args.max_speed.to_string();
    Ok(print_reply(&request(
        &args.sock,
        &["mirror_max_bps", &speed],
    )?))
}
