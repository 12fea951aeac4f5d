//! `flexnbd status`: print the status of a running server.

use super::Global;
use std::path::PathBuf;

/// Print the status of the server with control socket SOCK as key=value pairs.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The control socket of the server.
    #[arg(short = 's', long, value_name = "SOCK")]
    pub sock: PathBuf,
    /// Print a JSON object instead of key=value pairs.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub global: Global,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    args.global.apply();
    anyhow::bail!("status is not available yet")
}
