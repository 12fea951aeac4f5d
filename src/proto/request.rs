//! Transmission-phase requests (28-byte header, optional WRITE payload).

use super::consts::*;
use super::{be_u16, be_u32, be_u64, ProtoError};

/// The command of a request. Unknown codes are data, answered with EINVAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_code(code: u16) -> Command {
        match code {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn code(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Unknown(c) => c,
        }
    }

    /// Command flags that are meaningful for this command (FUA is accepted everywhere).
    pub fn allowed_flags(self) -> u16 {
        CMD_FLAG_FUA
            | match self {
                Command::Read => CMD_FLAG_DF,
                Command::WriteZeroes => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                Command::BlockStatus => CMD_FLAG_REQ_ONE,
                _ => 0,
            }
    }

    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "READ",
            Command::Write => "WRITE",
            Command::Disc => "DISC",
            Command::Flush => "FLUSH",
            Command::Trim => "TRIM",
            Command::Cache => "CACHE",
            Command::WriteZeroes => "WRITE_ZEROES",
            Command::BlockStatus => "BLOCK_STATUS",
            Command::Unknown(_) => "UNKNOWN",
        }
    }
}

/// A request header. For WRITE, `length` payload bytes follow it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn new(command: Command, flags: u16, cookie: u64, offset: u64, length: u32) -> Self {
        Request {
            flags,
            command,
            cookie,
            offset,
            length,
        }
    }

    /// An ENTRUST request ([`ENTRUST_TYPE`]): the listen-era C hand-over.
    pub fn entrust(cookie: u64) -> Self {
        let [flags, code] = [(ENTRUST_TYPE >> 16) as u16, ENTRUST_TYPE as u16];
        Request::new(Command::from_code(code), flags, cookie, 0, 0)
    }

    /// Whether this header is an ENTRUST (the same bits as a zero-length READ
    /// with FUA at offset 0).
    pub fn is_entrust(&self) -> bool {
        let field = (u32::from(self.flags) << 16) | u32::from(self.command.code());
        field == ENTRUST_TYPE && self.offset == 0 && self.length == 0
    }

    /// Decodes a request header. A wrong magic is fatal for the stream.
    pub fn decode(buf: &[u8]) -> Result<Option<(Request, usize)>, ProtoError> {
        if buf.len() < REQUEST_LEN {
            return Ok(None);
        }
        let magic = be_u32(buf, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: REQUEST_MAGIC as u64,
                got: magic as u64,
            });
        }
        let req = Request {
            flags: be_u16(buf, 4),
            command: Command::from_code(be_u16(buf, 6)),
            cookie: be_u64(buf, 8),
            offset: be_u64(buf, 16),
            length: be_u32(buf, 24),
        };
        Ok(Some((req, REQUEST_LEN)))
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.code().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Number of payload bytes that follow this header on the wire.
    pub fn payload_len(&self) -> u64 {
        if self.command == Command::Write {
            self.length as u64
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn needs_more_bytes() {
        let r = Request::new(Command::Read, 0, 7, 4096, 512).encode();
        for n in 0..REQUEST_LEN {
            assert_eq!(Request::decode(&r[..n]), Ok(None));
        }
    }

    #[test]
    fn bad_magic_is_an_error() {
        let mut r = Request::new(Command::Read, 0, 7, 4096, 512).encode();
        r[0] ^= 0xff;
        assert!(matches!(
            Request::decode(&r),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn unknown_command_is_data() {
        let r = Request::new(Command::Unknown(99), 0, 1, 0, 0).encode();
        let (d, _) = Request::decode(&r).unwrap().unwrap();
        assert_eq!(d.command, Command::Unknown(99));
    }

    #[test]
    fn entrust_is_a_zero_length_fua_read_on_the_wire() {
        let b = Request::entrust(9).encode();
        assert_eq!(be_u32(&b, 4), ENTRUST_TYPE);
        let (d, _) = Request::decode(&b).unwrap().unwrap();
        assert!(d.is_entrust());
        assert_eq!(
            (d.command, d.flags, d.length),
            (Command::Read, CMD_FLAG_FUA, 0)
        );
        assert!(!Request::new(Command::Read, CMD_FLAG_FUA, 9, 0, 1).is_entrust());
        assert!(!Request::new(Command::Read, 0, 9, 0, 0).is_entrust());
    }

    proptest! {
        #[test]
        fn roundtrip(flags: u16, code: u16, cookie: u64, offset: u64, length: u32, extra in proptest::collection::vec(any::<u8>(), 0..40)) {
            let req = Request::new(Command::from_code(code), flags, cookie, offset, length);
            let mut bytes = req.encode().to_vec();
            bytes.extend_from_slice(&extra);
            let (d, used) = Request::decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, REQUEST_LEN);
            prop_assert_eq!(d, req);
            prop_assert_eq!(d.command.code(), code);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Request::decode(&bytes);
        }
    }
}
