//! NBD wire format: constants, messages, encoders and decoders. No I/O, no clock.
//!
//! Decoders take a byte slice and return `Ok(None)` when more bytes are needed,
//! `Ok(Some((message, consumed)))` when a message is complete, or an error when
//! the bytes can never form a valid message (bad magic, impossible lengths).

pub mod consts;
pub mod handshake;
pub mod reply;
pub mod request;

pub use handshake::{ClientFlags, Greeting, OptionHeader, OptionReplyHeader};
pub use reply::{ChunkHeader, ReplyHeader, SimpleReply};
pub use request::{Command, Request};

/// A byte stream that can never become a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("bad magic {got:#x} (expected {expected:#x})")]
    BadMagic { expected: u64, got: u64 },
    #[error("{what} length {len} exceeds the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// The error values an NBD reply may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NbdErrno {
    Perm,
    Io,
    NoMem,
    Inval,
    NoSpc,
    Overflow,
    NotSup,
    Shutdown,
}

impl NbdErrno {
    /// The value sent on the wire.
    pub fn code(self) -> u32 {
        match self {
            NbdErrno::Perm => 1,
            NbdErrno::Io => 5,
            NbdErrno::NoMem => 12,
            NbdErrno::Inval => 22,
            NbdErrno::NoSpc => 28,
            NbdErrno::Overflow => 75,
            NbdErrno::NotSup => 95,
            NbdErrno::Shutdown => 108,
        }
    }

    /// Reads a wire value; unknown values are treated as EINVAL, as the spec says.
    pub fn from_code(code: u32) -> NbdErrno {
        match code {
            1 => NbdErrno::Perm,
            5 => NbdErrno::Io,
            12 => NbdErrno::NoMem,
            28 => NbdErrno::NoSpc,
            75 => NbdErrno::Overflow,
            95 => NbdErrno::NotSup,
            108 => NbdErrno::Shutdown,
            _ => NbdErrno::Inval,
        }
    }

    /// Maps an OS error number to the closest NBD error.
    pub fn from_os(errno: i32) -> NbdErrno {
        match errno {
            libc::EPERM | libc::EACCES | libc::EROFS => NbdErrno::Perm,
            libc::ENOMEM => NbdErrno::NoMem,
            libc::EINVAL => NbdErrno::Inval,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NbdErrno::NoSpc,
            libc::EOVERFLOW => NbdErrno::Overflow,
            libc::ENOTSUP => NbdErrno::NotSup,
            libc::ESHUTDOWN => NbdErrno::Shutdown,
            _ => NbdErrno::Io,
        }
    }

    /// The usual C name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            NbdErrno::Perm => "EPERM",
            NbdErrno::Io => "EIO",
            NbdErrno::NoMem => "ENOMEM",
            NbdErrno::Inval => "EINVAL",
            NbdErrno::NoSpc => "ENOSPC",
            NbdErrno::Overflow => "EOVERFLOW",
            NbdErrno::NotSup => "ENOTSUP",
            NbdErrno::Shutdown => "ESHUTDOWN",
        }
    }
}

impl std::fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub(crate) fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}
