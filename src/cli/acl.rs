//! `flexnbd acl`: replace the access control list of a running server.

use super::Global;
use crate::control::client::{print_reply, request};
use std::io::Write;
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
    // An empty line would end the request early (and so shorten the list), and a
    // newline would split an entry in two: refuse both before sending anything.
    if let Some(bad) = args.acl.iter().find(|e| e.is_empty() || e.contains('\n')) {
        let _ = writeln!(std::io::stderr().lock(), "bad spec: {}", bad.escape_debug());
        return Ok(1);
    }
    let mut lines = vec!["acl"];
    lines.extend(args.acl.iter().map(String::as_str));
    Ok(print_reply(&request(&args.sock, &lines)?))
}
