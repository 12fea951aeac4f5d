//! NBD client: connection set-up, handshake detection (old-style and fixed newstyle),
//! blocking requests, and a pipelined sender/receiver pair for bulk copies.
//!
//! - [`Connection::connect`] opens TCP (optionally from a bound local address) or
//!   unix sockets and negotiates an export; [`ExportInfo`] describes it.
//! - [`Connection`] issues one request at a time; payloads of reads and writes are
//!   streamed through a bounded buffer, so a 1 GiB request needs about 1 MiB.
//! - [`Connection::into_pipeline`] splits a connection into a [`Sender`] and a
//!   [`Receiver`] for use from two threads, with many requests in flight.
//! - [`ShutdownHandle`] unblocks any thread stuck on the socket.

mod connection;
mod input;
mod negotiate;
mod pipeline;
mod reply;
mod transport;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests_handshake;
#[cfg(test)]
mod tests_pipeline;
#[cfg(test)]
mod tests_transfer;

pub use connection::Connection;
pub use input::Pipe;
pub use pipeline::{Body, Completion, Receiver, Sender};
pub use transport::{Cancel, ShutdownHandle};

use crate::proto::consts::*;
use crate::proto::reply::Head;
use crate::proto::{Command, NbdErrno, Request};
use std::io;
use std::net::IpAddr;
use std::time::Duration;

/// Default time allowed for a TCP connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Default time allowed for the greeting and each handshake reply.
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(5);
/// Size of the buffer request payloads are streamed through.
pub const STREAM_CHUNK: usize = 1 << 20;
/// Write payloads up to this size go out in one system call with their header.
const SMALL_WRITE: usize = 64 * 1024;

/// Everything that can go wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection could not be opened at all.
    #[error("failed to connect to {endpoint}: {cause}")]
    Connect { endpoint: String, cause: io::Error },
    /// The server accepted the connection and closed it before sending a full
    /// greeting (what a server does to a peer its access control list refuses).
    #[error("connection rejected: the server closed it without a greeting")]
    Rejected,
    /// No greeting (or handshake reply) in time.
    #[error("server failed to respond: {0}")]
    NoResponse(String),
    /// The peer sent something that is not an NBD greeting.
    #[error("not an NBD server: {0}")]
    BadGreeting(String),
    /// The server broke the protocol; the connection is unusable.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server refused a handshake option (unknown export, policy, ...).
    #[error("server refused {option}: {reply}{message}")]
    OptionRefused {
        option: &'static str,
        reply: &'static str,
        /// The server's explanation, prefixed with ": ", or empty.
        message: String,
    },
    /// The server closed the connection while a reply was expected.
    #[error("connection closed by the server")]
    Closed,
    /// A socket error other than a timeout or a close.
    #[error("I/O error: {0}")]
    Io(io::Error),
    /// The server answered a request with an error.
    #[error("server replied with error {errno}{}", .message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Nbd {
        errno: NbdErrno,
        message: Option<String>,
    },
    /// A reply whose handle matches no request in flight.
    #[error("reply with wrong handle {0:#x}")]
    WrongHandle(u64),
    /// No reply (or no progress on the socket) within the request timeout.
    #[error("no reply within {}s", .0.as_secs_f64())]
    Timeout(Duration),
    /// The data source of a streamed write ended early; the request could not be completed.
    #[error("input ended after {got} of {expected} bytes")]
    ShortInput { expected: u64, got: u64 },
    /// The data source of a streamed write failed.
    #[error("reading the data to send failed: {0}")]
    Input(io::Error),
    /// The destination of a streamed read failed.
    #[error("writing the data received failed: {0}")]
    Output(io::Error),
    /// The attempt was abandoned through its [`Cancel`].
    #[error("connection attempt cancelled")]
    Cancelled,
    /// TLS could not be set up (refused, certificate not trusted, ...).
    #[error("TLS: {0}")]
    Tls(String),
    /// The request cannot be sent (too long, not supported by the export, connection
    /// already failed).
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl ClientError {
    /// True when the error leaves the connection usable for further requests.
    pub fn connection_usable(&self) -> bool {
        matches!(self, ClientError::Nbd { .. } | ClientError::Invalid(_))
    }
}

/// How to open and negotiate a connection.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Local address to connect from (TCP only).
    pub bind: Option<IpAddr>,
    /// Time allowed for the TCP connect.
    pub connect_timeout: Duration,
    /// Time allowed for the greeting and for each reply during option haggling.
    pub greeting_timeout: Duration,
    /// The export to ask a newstyle server for.
    pub export_name: String,
    /// Ask a newstyle server for structured replies.
    pub structured_replies: bool,
    /// Also select the `base:allocation` meta context (for BLOCK_STATUS);
    /// only with structured replies.
    pub base_allocation: bool,
    /// Ask for extended headers first (64-bit lengths: WRITE_ZEROES and
    /// TRIM of any size in one request; they include structured replies).
    /// A server without them gets asked for what `structured_replies` says.
    pub extended_headers: bool,
    /// Socket timeout while waiting for a reply in the transmission phase; `None` waits forever.
    pub request_timeout: Option<Duration>,
    /// A migration link: TCP keepalive and `TCP_USER_TIMEOUT` notice a dead peer fast.
    pub migration: bool,
    /// Lets another thread abandon the connect and handshake.
    pub cancel: Option<std::sync::Arc<Cancel>>,
    /// Upgrade to TLS with NBD_OPT_STARTTLS before anything else.
    pub tls: Option<std::sync::Arc<crate::tls::ClientTls>>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            bind: None,
            connect_timeout: CONNECT_TIMEOUT,
            greeting_timeout: GREETING_TIMEOUT,
            export_name: String::new(),
            structured_replies: false,
            base_allocation: false,
            extended_headers: false,
            request_timeout: None,
            migration: false,
            cancel: None,
            tls: None,
        }
    }
}

/// Block size constraints a server announced with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// What the handshake established about the export and the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// The server sent the old-style greeting (no option haggling happened).
    pub oldstyle: bool,
    /// Structured replies were negotiated.
    pub structured_replies: bool,
    /// Extended headers were negotiated (32-byte requests and replies,
    /// 64-bit lengths; implies structured replies).
    pub extended_headers: bool,
    /// The id the server gave `base:allocation`, when it was selected.
    pub base_allocation: Option<u32>,
    /// Block size constraints, if the server sent them.
    pub block_size: Option<BlockSize>,
}

impl ExportInfo {
    fn has(&self, flag: u16) -> bool {
        self.flags & FLAG_HAS_FLAGS != 0 && self.flags & flag != 0
    }

    pub fn read_only(&self) -> bool {
        self.has(FLAG_READ_ONLY)
    }

    pub fn can_flush(&self) -> bool {
        self.has(FLAG_SEND_FLUSH)
    }

    pub fn can_fua(&self) -> bool {
        self.has(FLAG_SEND_FUA)
    }

    pub fn can_trim(&self) -> bool {
        self.has(FLAG_SEND_TRIM)
    }

    pub fn can_write_zeroes(&self) -> bool {
        self.has(FLAG_SEND_WRITE_ZEROES)
    }

    /// The longest WRITE_ZEROES or TRIM one request may ask for.
    pub fn max_effect_len(&self) -> u64 {
        match self.extended_headers {
            true => i64::MAX as u64,
            false => u32::MAX as u64,
        }
    }

    /// `req`'s header as this connection frames requests: compact, or
    /// extended (where a WRITE says its payload length, `PAYLOAD_LEN`).
    pub(crate) fn header(&self, req: &Request) -> Head {
        if !self.extended_headers {
            return Head::of(&req.encode());
        }
        let mut r = *req;
        if r.command == Command::Write {
            r.flags |= CMD_FLAG_PAYLOAD_LEN;
        }
        Head::of(&r.encode_extended())
    }

    /// Checks that `len` bytes at `offset` form a valid request range here
    /// (32-bit lengths without extended headers).
    fn check_range(&self, offset: u64, len: u64) -> Result<u64, ClientError> {
        check_range(offset, len, self.extended_headers)
    }
}

/// Checks that `len` bytes at `offset` form a valid request range.
fn check_range(offset: u64, len: u64, extended: bool) -> Result<u64, ClientError> {
    if !extended && len > u32::MAX as u64 {
        return Err(ClientError::Invalid(format!(
            "length {len} exceeds the NBD limit"
        )));
    }
    offset
        .checked_add(len)
        .filter(|end| *end <= i64::MAX as u64)
        .ok_or_else(|| ClientError::Invalid(format!("offset {offset} + length {len} overflows")))?;
    Ok(len)
}

fn unsupported(what: &str) -> ClientError {
    ClientError::Invalid(format!("the server does not support {what}"))
}

/// Replaces control characters in text a server sent, so messages stay on one line.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Maps a socket error during the transmission phase.
fn io_error(e: io::Error, timeout: Option<Duration>) -> ClientError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            ClientError::Timeout(timeout.unwrap_or_default())
        }
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => ClientError::Closed,
        _ => ClientError::Io(e),
    }
}
