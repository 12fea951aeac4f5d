//! Transmission-phase requests: the 28-byte header, or the 32-byte one with
//! a 64-bit length once extended headers are agreed; a WRITE payload (or,
//! with extended headers, any payload flagged `PAYLOAD_LEN`) follows.

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
                Command::BlockStatus => CMD_FLAG_REQ_ONE | CMD_FLAG_PAYLOAD_LEN,
                Command::Write => CMD_FLAG_PAYLOAD_LEN,
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

/// A request header. For WRITE, `length` payload bytes follow it on the
/// wire. `length` is 64-bit; the compact header carries 32 bits of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl Request {
    pub fn new(command: Command, flags: u16, cookie: u64, offset: u64, length: u64) -> Self {
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

    /// Decodes a request header, compact or (`extended`) the extended one.
    /// A wrong magic is fatal for the stream.
    pub fn decode(buf: &[u8], extended: bool) -> Result<Option<(Request, usize)>, ProtoError> {
        let (magic, len) = match extended {
            false => (REQUEST_MAGIC, REQUEST_LEN),
            true => (EXTENDED_REQUEST_MAGIC, EXTENDED_REQUEST_LEN),
        };
        // The magic is checked as soon as it is there: a header of the
        // other kind (shorter or longer) is refused without waiting for more.
        if buf.len() >= 4 && be_u32(buf, 0) != magic {
            return Err(ProtoError::BadMagic {
                expected: magic as u64,
                got: be_u32(buf, 0) as u64,
            });
        }
        if buf.len() < len {
            return Ok(None);
        }
        let req = Request {
            flags: be_u16(buf, 4),
            command: Command::from_code(be_u16(buf, 6)),
            cookie: be_u64(buf, 8),
            offset: be_u64(buf, 16),
            length: match extended {
                false => be_u32(buf, 24) as u64,
                true => be_u64(buf, 24),
            },
        };
        Ok(Some((req, len)))
    }

    /// The compact header; the caller keeps `length` within 32 bits.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        debug_assert!(self.length <= u32::MAX as u64);
        let mut b = [0u8; REQUEST_LEN];
        self.encode_start(&mut b, REQUEST_MAGIC);
        b[24..28].copy_from_slice(&(self.length as u32).to_be_bytes());
        b
    }

    /// The extended header (64-bit length).
    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_LEN] {
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        self.encode_start(&mut b, EXTENDED_REQUEST_MAGIC);
        b[24..32].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    fn encode_start(&self, b: &mut [u8], magic: u32) {
        b[0..4].copy_from_slice(&magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.code().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
    }

    /// Number of payload bytes that follow this header on the wire: a
    /// WRITE's data, and with extended headers whatever `PAYLOAD_LEN` flags.
    pub fn payload_len(&self, extended: bool) -> u64 {
        let flagged = extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0;
        if self.command == Command::Write || flagged {
            self.length
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
            assert_eq!(Request::decode(&r[..n], false), Ok(None));
        }
        let e = Request::new(Command::Read, 0, 7, 4096, 512).encode_extended();
        for n in 0..EXTENDED_REQUEST_LEN {
            assert_eq!(Request::decode(&e[..n], true), Ok(None));
        }
        // A compact header where an extended one is due is refused at once.
        assert!(Request::decode(&r[..4], true).is_err());
        assert!(Request::decode(&e[..4], false).is_err());
    }

    #[test]
    fn bad_magic_is_an_error() {
        let mut r = Request::new(Command::Read, 0, 7, 4096, 512).encode();
        r[0] ^= 0xff;
        assert!(matches!(
            Request::decode(&r, false),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn unknown_command_is_data() {
        let r = Request::new(Command::Unknown(99), 0, 1, 0, 0).encode();
        let (d, _) = Request::decode(&r, false).unwrap().unwrap();
        assert_eq!(d.command, Command::Unknown(99));
    }

    #[test]
    fn entrust_is_a_zero_length_fua_read_on_the_wire() {
        let b = Request::entrust(9).encode();
        assert_eq!(be_u32(&b, 4), ENTRUST_TYPE);
        let (d, _) = Request::decode(&b, false).unwrap().unwrap();
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
            let req = Request::new(Command::from_code(code), flags, cookie, offset, length as u64);
            let mut bytes = req.encode().to_vec();
            bytes.extend_from_slice(&extra);
            let (d, used) = Request::decode(&bytes, false).unwrap().unwrap();
            prop_assert_eq!(used, REQUEST_LEN);
            prop_assert_eq!(d, req);
            prop_assert_eq!(d.command.code(), code);
            // Each header is refused where the other is expected.
            prop_assert!(Request::decode(&bytes, true).is_err() || bytes.len() < EXTENDED_REQUEST_LEN);
        }

        #[test]
        fn extended_roundtrip(flags: u16, code: u16, cookie: u64, offset: u64, length: u64, extra in proptest::collection::vec(any::<u8>(), 0..40)) {
            let req = Request::new(Command::from_code(code), flags, cookie, offset, length);
            let mut bytes = req.encode_extended().to_vec();
            bytes.extend_from_slice(&extra);
            let (d, used) = Request::decode(&bytes, true).unwrap().unwrap();
            prop_assert_eq!(used, EXTENDED_REQUEST_LEN);
            prop_assert_eq!(d, req);
            prop_assert!(Request::decode(&bytes, false).is_err());
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), extended: bool) {
            let _ = Request::decode(&bytes, extended);
        }
    }
}
