//! Control socket: the command grammar ([`grammar`], pure), the socket loop
//! ([`server`]) and the command-line side ([`client`]).
//!
//! Framing: LF-terminated lines ended by an empty line; line 1 is the command,
//! each further line an argument. Reply: one line `CODE: text`, 0 = success.

pub mod client;
pub mod grammar;
pub mod server;

use crate::acl::AclEntry;
use std::net::{IpAddr, SocketAddr};

/// One reply line: `CODE: text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u32,
    pub text: String,
}

impl Reply {
    pub fn ok(text: impl Into<String>) -> Reply {
        Reply {
            code: 0,
            text: text.into(),
        }
    }

    pub fn err(code: u32, text: impl Into<String>) -> Reply {
        Reply {
            code,
            text: text.into(),
        }
    }
}

/// What `status` reports, in wire order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub pid: u32,
    pub size: u64,
    pub is_mirroring: bool,
    pub clients_allowed: bool,
    pub num_clients: u64,
    pub has_control: bool,
    /// Present only while a migration is running.
    pub migration: Option<MigrationStatus>,
}

/// The migration keys of `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// Bytes per second over the recent past.
    pub speed: u64,
    /// Seconds since the migration started.
    pub duration: u64,
    pub seconds_left: u64,
    pub bytes_left: u64,
    /// Present when a limit is set.
    pub speed_limit: Option<u64>,
    /// Attempts so far, including the running one.
    pub attempts: u32,
}

/// What the source does once the migration has been handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorAction {
    /// Exit (the default).
    Exit,
    /// Remove the source file just before the final disconnect, then exit.
    Unlink,
    /// Keep serving (no hand-over).
    Nothing,
}

/// A validated `mirror` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorRequest {
    pub dest: SocketAddr,
    pub action: MirrorAction,
    pub bind: Option<IpAddr>,
    pub max_bps: Option<u64>,
    pub retries: Option<u32>,
}

/// What the daemon does for each control command. Replies are built by the
/// daemon for mirror commands; `status` and `acl` replies are built by the grammar.
pub trait Handler: Send + Sync {
    fn status(&self) -> Status;
    /// Replaces the ACL (entries already validated) and drops clients it no longer allows.
    fn set_acl(&self, entries: Vec<AclEntry>);
    fn start_mirror(&self, req: MirrorRequest) -> Reply;
    fn set_mirror_speed(&self, bytes_per_sec: u64) -> Reply;
    fn break_mirror(&self) -> Reply;
}
