//! `flexnbd status`: print the status of a running server.

use super::Global;
use crate::control::client::{print_reply, request};
use crate::control::grammar::status_text_to_json;
use anyhow::Context;
use std::io::Write;
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
    let reply = request(&args.sock, &["status"])?;
    if reply.code != 0 || !args.json {
        return Ok(print_reply(&reply));
    }
    let json = status_text_to_json(&reply.text)
        .with_context(|| format!("bad status from {}", args.sock.display()))?;
    let _ = writeln!(std::io::stdout().lock(), "{json}");
    Ok(0)
}
