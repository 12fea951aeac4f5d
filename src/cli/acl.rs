//! `flexnbd acl`: replace the access control list of a running server.

use super::Global;
use std::path::PathBuf;

/// Set the access control list of the server with control socket SOCK.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The control socket of the server whose ACL to replace.
    #[arg(short = 's', long, value_name = "SOCK")]
    pub sock: PathBuf,
    #[command(flatten)]
    pub global: Global,
    /// The new entries: IP or IP/prefix, IPv4 or IPv6.
    #[arg(value_name = "ACL_ENTRY")]
    pub acl: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    args.global.apply();
    anyhow::bail!("acl is not available yet")
}
