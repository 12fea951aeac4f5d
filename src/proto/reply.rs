//! Transmission-phase replies: simple replies and structured reply chunks.

use super::consts::*;
use super::{be_u16, be_u32, be_u64, NbdErrno, ProtoError};

/// A simple reply header; for a successful READ the data follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn ok(cookie: u64) -> Self {
        SimpleReply { error: 0, cookie }
    }

    pub fn err(cookie: u64, e: NbdErrno) -> Self {
        SimpleReply {
            error: e.code(),
            cookie,
        }
    }

    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }
}

/// A structured reply chunk header; `length` payload bytes follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub fn new(kind: u16, done: bool, cookie: u64, length: u32) -> Self {
        ChunkHeader {
            flags: if done { REPLY_FLAG_DONE } else { 0 },
            kind,
            cookie,
            length,
        }
    }

    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    pub fn encode(&self) -> [u8; STRUCTURED_REPLY_LEN] {
        let mut b = [0u8; STRUCTURED_REPLY_LEN];
        self.encode_into(&mut b);
        b
    }

    pub fn encode_into(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
    }
}

/// Either kind of reply header, as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple(SimpleReply),
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple(s) => s.cookie,
            ReplyHeader::Chunk(c) => c.cookie,
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Option<(ReplyHeader, usize)>, ProtoError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        match be_u32(buf, 0) {
            SIMPLE_REPLY_MAGIC => {
                if buf.len() < SIMPLE_REPLY_LEN {
                    return Ok(None);
                }
                let r = SimpleReply {
                    error: be_u32(buf, 4),
                    cookie: be_u64(buf, 8),
                };
                Ok(Some((ReplyHeader::Simple(r), SIMPLE_REPLY_LEN)))
            }
            STRUCTURED_REPLY_MAGIC => {
                if buf.len() < STRUCTURED_REPLY_LEN {
                    return Ok(None);
                }
                let c = ChunkHeader {
                    flags: be_u16(buf, 4),
                    kind: be_u16(buf, 6),
                    cookie: be_u64(buf, 8),
                    length: be_u32(buf, 16),
                };
                Ok(Some((ReplyHeader::Chunk(c), STRUCTURED_REPLY_LEN)))
            }
            got => Err(ProtoError::BadMagic {
                expected: SIMPLE_REPLY_MAGIC as u64,
                got: got as u64,
            }),
        }
    }
}

/// Header of an OFFSET_DATA chunk carrying `data_len` bytes at `offset`
/// (the chunk header plus the 8-byte offset; the data follows).
pub fn offset_data_header(cookie: u64, offset: u64, data_len: u32, done: bool) -> [u8; 28] {
    let mut b = [0u8; 28];
    ChunkHeader::new(REPLY_TYPE_OFFSET_DATA, done, cookie, data_len + 8).encode_into(&mut b);
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A complete OFFSET_HOLE chunk.
pub fn offset_hole_chunk(cookie: u64, offset: u64, len: u32, done: bool) -> [u8; 32] {
    let mut b = [0u8; 32];
    ChunkHeader::new(REPLY_TYPE_OFFSET_HOLE, done, cookie, 12).encode_into(&mut b);
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b[28..32].copy_from_slice(&len.to_be_bytes());
    b
}

/// A final NONE chunk.
pub fn none_chunk(cookie: u64) -> [u8; STRUCTURED_REPLY_LEN] {
    ChunkHeader::new(REPLY_TYPE_NONE, true, cookie, 0).encode()
}

/// A final ERROR chunk with a human-readable message (truncated to 4096 bytes).
pub fn error_chunk(cookie: u64, err: NbdErrno, msg: &str) -> Vec<u8> {
    let msg = truncate_utf8(msg, MAX_STRING_LEN);
    let mut b = Vec::with_capacity(STRUCTURED_REPLY_LEN + 6 + msg.len());
    b.extend_from_slice(
        &ChunkHeader::new(REPLY_TYPE_ERROR, true, cookie, 6 + msg.len() as u32).encode(),
    );
    b.extend_from_slice(&err.code().to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg.as_bytes());
    b
}

/// A BLOCK_STATUS chunk: context id, then (length, flags) descriptors.
pub fn block_status_chunk(
    cookie: u64,
    context: u32,
    extents: &[(u32, u32)],
    done: bool,
) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut b = Vec::with_capacity(STRUCTURED_REPLY_LEN + len);
    b.extend_from_slice(
        &ChunkHeader::new(REPLY_TYPE_BLOCK_STATUS, done, cookie, len as u32).encode(),
    );
    b.extend_from_slice(&context.to_be_bytes());
    for &(l, f) in extents {
        b.extend_from_slice(&l.to_be_bytes());
        b.extend_from_slice(&f.to_be_bytes());
    }
    b
}

/// Parses the payload of an ERROR or ERROR_OFFSET chunk into (errno, message).
pub fn parse_error_payload(p: &[u8]) -> Result<(u32, String), ProtoError> {
    if p.len() < 6 {
        return Err(ProtoError::Malformed("error chunk"));
    }
    let code = be_u32(p, 0);
    let mlen = be_u16(p, 4) as usize;
    if 6 + mlen > p.len() {
        return Err(ProtoError::Malformed("error chunk message length"));
    }
    Ok((code, String::from_utf8_lossy(&p[6..6 + mlen]).into_owned()))
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn simple_roundtrip() {
        let r = SimpleReply::err(42, NbdErrno::NoSpc);
        let (h, n) = ReplyHeader::decode(&r.encode()).unwrap().unwrap();
        assert_eq!(n, SIMPLE_REPLY_LEN);
        assert_eq!(h, ReplyHeader::Simple(r));
    }

    #[test]
    fn error_chunk_layout() {
        let b = error_chunk(9, NbdErrno::Inval, "bad");
        let (h, n) = ReplyHeader::decode(&b).unwrap().unwrap();
        let ReplyHeader::Chunk(c) = h else {
            panic!("not a chunk")
        };
        assert!(c.done());
        assert_eq!(c.kind, REPLY_TYPE_ERROR);
        assert_eq!(c.length as usize, b.len() - n);
        assert_eq!(parse_error_payload(&b[n..]).unwrap(), (22, "bad".into()));
    }

    #[test]
    fn block_status_layout() {
        let b = block_status_chunk(1, 5, &[(4096, 0), (8192, 3)], true);
        assert_eq!(b.len(), 20 + 4 + 16);
        assert_eq!(be_u32(&b, 16), 20);
        assert_eq!(be_u32(&b, 20), 5);
        assert_eq!(be_u32(&b, 32), 8192);
        assert_eq!(be_u32(&b, 36), 3);
    }

    #[test]
    fn truncation_keeps_utf8() {
        let s = "é".repeat(3000);
        let t = truncate_utf8(&s, 4096);
        assert!(t.len() <= 4096);
        assert!(t.is_char_boundary(t.len()));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = ReplyHeader::decode(&bytes);
            let _ = parse_error_payload(&bytes);
        }
    }
}
