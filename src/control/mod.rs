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

    /// The reply as sent: `CODE: text\n`, always one line (CR and LF in the text
    /// become spaces).
    pub fn to_line(&self) -> String {
        format!("{}: {}\n", self.code, self.text.replace(['\r', '\n'], " "))
    }

    /// Parses `CODE: text`; a trailing LF or CRLF is allowed and only the first
    /// line counts.
    pub fn parse_line(line: &str) -> Result<Reply, ReplyParseError> {
        let line = line.split('\n').next().unwrap_or("");
        let line = line.strip_suffix('\r').unwrap_or(line);
        let bad = || ReplyParseError(line.chars().take(200).collect());
        let (code, rest) = line.split_once(':').ok_or_else(bad)?;
        let digits = !code.is_empty() && code.bytes().all(|b| b.is_ascii_digit());
        let code: u32 = code.parse().ok().filter(|_| digits).ok_or_else(bad)?;
        let text = rest.strip_prefix(' ').unwrap_or(rest);
        Ok(Reply::err(code, text))
    }
}

/// A reply line that is not `CODE: text`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a reply line: {0:?}")]
pub struct ReplyParseError(pub String);

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
    /// Present only while the image is paused.
    pub pause: Option<PauseStatus>,
    /// Present only for a proxy.
    pub proxy: Option<ProxyStatus>,
    /// Present only when TLS is offered or required.
    pub tls: Option<TlsStatus>,
}

/// The TLS keys of `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsStatus {
    /// `on` or `require`.
    pub mode: &'static str,
    pub verify_peer: bool,
    /// Each connected client by id: its TLS version and the subject of its
    /// certificate, or `None` for a plain connection.
    pub clients: Vec<(u64, Option<TlsSession>)>,
}

/// A client's TLS version and the subject of its certificate, if any.
pub type TlsSession = (String, Option<String>);

impl TlsStatus {
    /// What a server reports.
    pub fn of(server: &crate::server::Server) -> Option<TlsStatus> {
        let t = server.tls()?;
        Some(TlsStatus {
            mode: t.mode.as_str(),
            verify_peer: t.verify_peer,
            clients: server
                .client_tls()
                .into_iter()
                .map(|(id, i)| (id, i.map(|i| (i.version, i.peer_subject))))
                .collect(),
        })
    }
}

/// The proxy keys of `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyStatus {
    /// The upstream server's address.
    pub upstream_address: String,
    /// `connected`, `reconnecting` or `failed`.
    pub upstream: &'static str,
    /// Connection attempts made to the upstream (start-up and reconnects).
    pub attempts: u64,
    /// Requests sent again after a reconnect.
    pub requests_resent: u64,
    /// Client requests sent upstream and not yet answered.
    pub in_flight: u64,
    /// Why the upstream last failed, if it did.
    pub last_error: Option<String>,
}

/// The pause keys of `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PauseStatus {
    pub paused_for: std::time::Duration,
    /// Leases in force (the image resumes when the last one ends).
    pub holds: usize,
    /// Requests waiting for the resume.
    pub queued_requests: usize,
}

/// A validated `pause` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PauseRequest {
    /// The lease: the pause ends by itself after this.
    pub timeout: std::time::Duration,
    /// The pause also ends when the control connection closes.
    pub hold: bool,
}

/// A held pause, kept by the control connection that asked for it; it ends
/// when dropped.
pub trait Lease: Send {
    /// Whether it already ended by other means (`resume`, its timeout).
    fn ended(&self) -> bool;
}

/// A pause in force: the reply, and for a held pause its lease.
pub struct Paused {
    pub reply: Reply,
    pub lease: Option<Box<dyn Lease>>,
}

pub use crate::mirror::{MigrationState, MigrationStatus, MirrorAction};

/// A validated `mirror` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorRequest {
    pub dest: SocketAddr,
    pub action: MirrorAction,
    pub bind: Option<IpAddr>,
    pub max_bps: Option<u64>,
    pub retries: Option<u32>,
    /// Keep the connection and send a second line with the outcome.
    pub wait: bool,
    /// Migrate over TLS.
    pub tls: Option<MirrorTls>,
    /// The export to ask the destination for (default: the empty name).
    pub export_name: String,
}

/// TLS for a migration: the certificate directory (default: the server's
/// own `--tls-certificates`) and the name the destination's certificate
/// must carry (default: its IP address).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorTls {
    pub certificates: Option<std::path::PathBuf>,
    pub hostname: Option<String>,
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
    /// Blocks until the running migration ends; `0` only when it succeeded.
    fn wait_mirror(&self) -> Reply {
        Reply::err(1, "not mirroring")
    }
    /// Pauses the image; answers once requests in flight are done and the
    /// image is flushed.
    fn pause(&self, _req: PauseRequest) -> Result<Paused, Reply> {
        Err(Reply::err(1, "pause is not supported here"))
    }
    /// Ends pause `id`, or every pause.
    fn resume(&self, _id: Option<u64>) -> Reply {
        Reply::err(1, "not paused")
    }
}

#[cfg(test)]
mod tests {
    use super::Reply;
    use proptest::prelude::*;

    #[test]
    fn reply_lines() {
        let ok = |line| Reply::parse_line(line).unwrap();
        assert_eq!(ok("0: updated\n"), Reply::ok("updated"));
        assert_eq!(
            ok("10: unknown command\r\n"),
            Reply::err(10, "unknown command")
        );
        assert_eq!(ok("1:x"), Reply::err(1, "x"));
        assert_eq!(ok("0: a: b\nmore"), Reply::ok("a: b"));
        assert_eq!(ok("0: "), Reply::ok(""));
        for bad in [
            "",
            "updated",
            ": x",
            "-1: x",
            "x1: y",
            "99999999999: z",
            " 0: x",
        ] {
            assert!(Reply::parse_line(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Reply::err(3, "a\r\nb").to_line(), "3: a  b\n");
    }

    proptest! {
        #[test]
        fn reply_round_trip(code in any::<u32>(), text in ".{0,60}") {
            let r = Reply::parse_line(&Reply::err(code, text.clone()).to_line()).unwrap();
            prop_assert_eq!(r.code, code);
            prop_assert_eq!(r.text, text.replace(['\r', '\n'], " "));
        }

        #[test]
        fn parse_line_never_panics(text in ".{0,80}") {
            let _ = Reply::parse_line(&text);
        }
    }
}
