//! `flexnbd break`: stop a running migration.

use super::Global;
use crate::control::client::{print_reply, request};
use std::path::PathBuf;

/// Stop the migration running on the server with control socket SOCK.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The control socket of the server whose migration to stop.
    #[arg(short = 's', long, value_name = "SOCK")]
    pub sock: PathBuf,
    #[command(flatten)]
    pub global: Global,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    args.global.apply();
    Ok(print_reply(&request(&args.sock, &["break"])?))
}
