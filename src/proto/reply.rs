//! Transmission-phase replies: simple replies and structured reply chunks,
//! with compact or (after NBD_OPT_EXTENDED_HEADERS) extended headers.
//! [`Replies`] builds every reply to one request in the framing agreed.

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
/// `offset` is the request's, echoed by extended headers only (0 in a
/// compact one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl ChunkHeader {
    /// A compact chunk header (`length` within 32 bits).
    pub fn new(kind: u16, done: bool, cookie: u64, length: u32) -> Self {
        ChunkHeader {
            flags: if done { REPLY_FLAG_DONE } else { 0 },
            kind,
            cookie,
            offset: 0,
            length: length as u64,
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

    /// The compact header into `b[..20]`.
    pub fn encode_into(&self, b: &mut [u8]) {
        debug_assert!(self.length <= u32::MAX as u64);
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&(self.length as u32).to_be_bytes());
    }

    /// The extended header into `b[..32]`.
    pub fn encode_extended_into(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.length.to_be_bytes());
    }
}

/// How replies are framed on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// Simple replies only (no structured replies agreed).
    #[default]
    Simple,
    /// Structured reply chunks with compact (20-byte) headers.
    Structured,
    /// Chunks with 32-byte headers: the request's offset echoed, 64-bit
    /// lengths, never a simple reply.
    Extended,
}

impl Framing {
    /// Bytes of a chunk header in this framing (a simple reply's in `Simple`).
    pub fn header_len(self) -> usize {
        match self {
            Framing::Simple => SIMPLE_REPLY_LEN,
            Framing::Structured => STRUCTURED_REPLY_LEN,
            Framing::Extended => EXTENDED_REPLY_LEN,
        }
    }

    /// Chunks (not simple replies) are sent.
    pub fn structured(self) -> bool {
        self != Framing::Simple
    }
}

/// Longest header [`Replies`] builds: an extended chunk header with an
/// OFFSET_HOLE payload.
const MAX_HEAD: usize = EXTENDED_REPLY_LEN + 12;

/// A message header (a reply's, with a fixed-size payload start, or a
/// request's), built on the stack.
#[derive(Clone, Copy)]
pub struct Head {
    buf: [u8; MAX_HEAD],
    len: usize,
}

impl Head {
    /// A header holding `b` (at most 44 bytes).
    pub fn of(b: &[u8]) -> Head {
        let mut head = Head {
            buf: [0; MAX_HEAD],
            len: b.len(),
        };
        head.buf[..b.len()].copy_from_slice(b);
        head
    }
}

impl std::ops::Deref for Head {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Builds the replies to one request in the framing agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replies {
    pub framing: Framing,
    pub cookie: u64,
    /// The request's offset (echoed in extended chunk headers).
    pub offset: u64,
}

impl Replies {
    pub fn new(framing: Framing, cookie: u64, offset: u64) -> Replies {
        Replies {
            framing,
            cookie,
            offset,
        }
    }

    /// A chunk header announcing `payload` bytes of `kind`, then `extra`
    /// bytes of the payload's start. Not for [`Framing::Simple`].
    fn chunk(&self, kind: u16, done: bool, payload: u64, extra: &[u8]) -> Head {
        let h = ChunkHeader {
            flags: if done { REPLY_FLAG_DONE } else { 0 },
            kind,
            cookie: self.cookie,
            offset: self.offset,
            length: payload,
        };
        let mut head = Head {
            buf: [0; MAX_HEAD],
            len: 0,
        };
        head.len = match self.framing {
            Framing::Extended => {
                h.encode_extended_into(&mut head.buf);
                EXTENDED_REPLY_LEN
            }
            _ => {
                h.encode_into(&mut head.buf);
                STRUCTURED_REPLY_LEN
            }
        };
        head.buf[head.len..head.len + extra.len()].copy_from_slice(extra);
        head.len += extra.len();
        head
    }

    fn simple(&self, error: u32) -> Head {
        let mut head = Head {
            buf: [0; MAX_HEAD],
            len: SIMPLE_REPLY_LEN,
        };
        head.buf[..SIMPLE_REPLY_LEN].copy_from_slice(
            &SimpleReply {
                error,
                cookie: self.cookie,
            }
            .encode(),
        );
        head
    }

    /// Success without data: a simple reply or a final NONE chunk.
    pub fn ok(&self) -> Head {
        match self.framing {
            Framing::Simple => self.simple(0),
            _ => self.chunk(REPLY_TYPE_NONE, true, 0, &[]),
        }
    }

    /// A failure: a simple reply, or a final ERROR chunk with `msg`
    /// (truncated to 4096 bytes).
    pub fn error(&self, err: NbdErrno, msg: &str) -> Vec<u8> {
        if self.framing == Framing::Simple {
            return self.simple(err.code()).to_vec();
        }
        let msg = truncate_utf8(msg, MAX_STRING_LEN);
        let mut start = [0u8; 6];
        start[..4].copy_from_slice(&err.code().to_be_bytes());
        start[4..].copy_from_slice(&(msg.len() as u16).to_be_bytes());
        let head = self.chunk(REPLY_TYPE_ERROR, true, 6 + msg.len() as u64, &start);
        let mut b = Vec::with_capacity(head.len() + msg.len());
        b.extend_from_slice(&head);
        b.extend_from_slice(msg.as_bytes());
        b
    }

    /// What goes before `len` bytes of READ data at `offset`: a simple
    /// reply, or an OFFSET_DATA chunk header with its offset.
    pub fn data(&self, offset: u64, len: u32, done: bool) -> Head {
        match self.framing {
            Framing::Simple => self.simple(0),
            _ => self.chunk(
                REPLY_TYPE_OFFSET_DATA,
                done,
                8 + len as u64,
                &offset.to_be_bytes(),
            ),
        }
    }

    /// A complete OFFSET_HOLE chunk (structured framings only).
    pub fn hole(&self, offset: u64, len: u32, done: bool) -> Head {
        let mut p = [0u8; 12];
        p[..8].copy_from_slice(&offset.to_be_bytes());
        p[8..].copy_from_slice(&len.to_be_bytes());
        self.chunk(REPLY_TYPE_OFFSET_HOLE, done, 12, &p)
    }

    /// A block status chunk for `context`: BLOCK_STATUS with compact
    /// headers (each length within 32 bits), BLOCK_STATUS_EXT with
    /// extended ones.
    pub fn block_status(&self, context: u32, extents: &[(u64, u32)], done: bool) -> Vec<u8> {
        let ext = self.framing == Framing::Extended;
        let (kind, each, start) = match ext {
            true => (REPLY_TYPE_BLOCK_STATUS_EXT, 16, 8),
            false => (REPLY_TYPE_BLOCK_STATUS, 8, 4),
        };
        let payload = start + each * extents.len();
        let mut s = [0u8; 8];
        s[..4].copy_from_slice(&context.to_be_bytes());
        s[4..].copy_from_slice(&(extents.len() as u32).to_be_bytes());
        let head = self.chunk(kind, done, payload as u64, &s[..start]);
        let mut b = Vec::with_capacity(head.len() + payload);
        b.extend_from_slice(&head);
        for &(l, f) in extents {
            match ext {
                true => {
                    b.extend_from_slice(&l.to_be_bytes());
                    b.extend_from_slice(&(f as u64).to_be_bytes());
                }
                false => {
                    debug_assert!(l <= u32::MAX as u64);
                    b.extend_from_slice(&(l as u32).to_be_bytes());
                    b.extend_from_slice(&f.to_be_bytes());
                }
            }
        }
        b
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
                    offset: 0,
                    length: be_u32(buf, 16) as u64,
                };
                Ok(Some((ReplyHeader::Chunk(c), STRUCTURED_REPLY_LEN)))
            }
            EXTENDED_REPLY_MAGIC => {
                if buf.len() < EXTENDED_REPLY_LEN {
                    return Ok(None);
                }
                let c = ChunkHeader {
                    flags: be_u16(buf, 4),
                    kind: be_u16(buf, 6),
                    cookie: be_u64(buf, 8),
                    offset: be_u64(buf, 16),
                    length: be_u64(buf, 24),
                };
                Ok(Some((ReplyHeader::Chunk(c), EXTENDED_REPLY_LEN)))
            }
            got => Err(ProtoError::BadMagic {
                expected: SIMPLE_REPLY_MAGIC as u64,
                got: got as u64,
            }),
        }
    }
}

/// Header of a compact OFFSET_DATA chunk carrying `data_len` bytes at
/// `offset` (the chunk header plus the 8-byte offset; the data follows).
pub fn offset_data_header(cookie: u64, offset: u64, data_len: u32, done: bool) -> [u8; 28] {
    let mut b = [0u8; 28];
    b.copy_from_slice(&Replies::new(Framing::Structured, cookie, 0).data(offset, data_len, done));
    b
}

/// A complete compact OFFSET_HOLE chunk.
pub fn offset_hole_chunk(cookie: u64, offset: u64, len: u32, done: bool) -> [u8; 32] {
    let mut b = [0u8; 32];
    b.copy_from_slice(&Replies::new(Framing::Structured, cookie, 0).hole(offset, len, done));
    b
}

/// A final compact NONE chunk.
pub fn none_chunk(cookie: u64) -> [u8; STRUCTURED_REPLY_LEN] {
    ChunkHeader::new(REPLY_TYPE_NONE, true, cookie, 0).encode()
}

/// A final compact ERROR chunk with a human-readable message (truncated
/// to 4096 bytes).
pub fn error_chunk(cookie: u64, err: NbdErrno, msg: &str) -> Vec<u8> {
    Replies::new(Framing::Structured, cookie, 0).error(err, msg)
}

/// A compact BLOCK_STATUS chunk: context id, then (length, flags) descriptors.
pub fn block_status_chunk(
    cookie: u64,
    context: u32,
    extents: &[(u32, u32)],
    done: bool,
) -> Vec<u8> {
    let ext: Vec<(u64, u32)> = extents.iter().map(|&(l, f)| (l as u64, f)).collect();
    Replies::new(Framing::Structured, cookie, 0).block_status(context, &ext, done)
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
    fn extended_layouts() {
        let r = Replies::new(Framing::Extended, 7, 1 << 40);
        let ok = r.ok();
        assert_eq!(ok.len(), 32);
        assert_eq!(be_u32(&ok, 0), EXTENDED_REPLY_MAGIC);
        assert_eq!(be_u16(&ok, 4), REPLY_FLAG_DONE);
        assert_eq!(be_u16(&ok, 6), REPLY_TYPE_NONE);
        assert_eq!(be_u64(&ok, 8), 7);
        assert_eq!(be_u64(&ok, 16), 1 << 40);
        assert_eq!(be_u64(&ok, 24), 0);
        let d = r.data((1 << 40) + 512, 4096, true);
        assert_eq!(d.len(), 40);
        assert_eq!(be_u16(&d, 6), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(be_u64(&d, 24), 4096 + 8);
        assert_eq!(be_u64(&d, 32), (1 << 40) + 512);
        let b = r.block_status(1, &[(5 << 40, 3), (4096, 0)], true);
        assert_eq!(b.len(), 32 + 8 + 2 * 16);
        assert_eq!(be_u16(&b, 6), REPLY_TYPE_BLOCK_STATUS_EXT);
        assert_eq!(be_u64(&b, 24), 8 + 32);
        assert_eq!((be_u32(&b, 32), be_u32(&b, 36)), (1, 2));
        assert_eq!((be_u64(&b, 40), be_u64(&b, 48)), (5 << 40, 3));
        let e = r.error(NbdErrno::Inval, "no");
        let (h, n) = ReplyHeader::decode(&e).unwrap().unwrap();
        let ReplyHeader::Chunk(c) = h else {
            panic!("not a chunk")
        };
        assert_eq!(
            (n, c.kind, c.offset, c.length),
            (32, REPLY_TYPE_ERROR, 1 << 40, 8)
        );
        assert_eq!(parse_error_payload(&e[n..]).unwrap(), (22, "no".into()));
        // Simple framing never builds chunks for ok and errors.
        let s = Replies::new(Framing::Simple, 7, 0);
        assert_eq!(&*s.ok(), &SimpleReply::ok(7).encode());
        assert_eq!(
            s.error(NbdErrno::Io, "x"),
            SimpleReply::err(7, NbdErrno::Io).encode()
        );
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
