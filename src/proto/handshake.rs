//! Handshake messages: greetings, options, option replies and their payloads.

use super::consts::*;
use super::{be_u16, be_u32, be_u64, ProtoError};

/// What a server says first, as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    /// 152 bytes: size and 32-bit flags, no option haggling follows.
    Oldstyle { size: u64, flags: u32 },
    /// 18 bytes: handshake flags; option haggling follows.
    Newstyle { flags: u16 },
}

impl Greeting {
    pub fn decode(buf: &[u8]) -> Result<Option<(Greeting, usize)>, ProtoError> {
        if buf.len() < 16 {
            return Ok(None);
        }
        let magic = be_u64(buf, 0);
        if magic != NBD_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: NBD_MAGIC,
                got: magic,
            });
        }
        match be_u64(buf, 8) {
            OLDSTYLE_MAGIC => {
                if buf.len() < OLDSTYLE_GREETING_LEN {
                    return Ok(None);
                }
                let g = Greeting::Oldstyle {
                    size: be_u64(buf, 16),
                    flags: be_u32(buf, 24),
                };
                Ok(Some((g, OLDSTYLE_GREETING_LEN)))
            }
            IHAVEOPT => {
                if buf.len() < NEWSTYLE_GREETING_LEN {
                    return Ok(None);
                }
                let g = Greeting::Newstyle {
                    flags: be_u16(buf, 16),
                };
                Ok(Some((g, NEWSTYLE_GREETING_LEN)))
            }
            got => Err(ProtoError::BadMagic {
                expected: IHAVEOPT,
                got,
            }),
        }
    }
}

/// The 152-byte old-style greeting.
pub fn oldstyle_greeting(size: u64, flags: u32) -> [u8; OLDSTYLE_GREETING_LEN] {
    let mut b = [0u8; OLDSTYLE_GREETING_LEN];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
    b[16..24].copy_from_slice(&size.to_be_bytes());
    b[24..28].copy_from_slice(&flags.to_be_bytes());
    b
}

/// The 18-byte fixed-newstyle greeting.
pub fn newstyle_greeting(handshake_flags: u16) -> [u8; NEWSTYLE_GREETING_LEN] {
    let mut b = [0u8; NEWSTYLE_GREETING_LEN];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// The client's 32-bit flags after the newstyle greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// Decodes the flags; a flag the server did not offer is an error (the
    /// server must then drop the connection).
    pub fn decode(buf: &[u8], offered: u16) -> Result<Option<(ClientFlags, usize)>, ProtoError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let f = be_u32(buf, 0);
        let mut known = FLAG_C_FIXED_NEWSTYLE;
        if offered & FLAG_NO_ZEROES != 0 {
            known |= FLAG_C_NO_ZEROES;
        }
        if f & !known != 0 {
            return Err(ProtoError::Malformed("client flags"));
        }
        Ok(Some((
            ClientFlags {
                fixed_newstyle: f & FLAG_C_FIXED_NEWSTYLE != 0,
                no_zeroes: f & FLAG_C_NO_ZEROES != 0,
            },
            4,
        )))
    }

    pub fn encode(&self) -> [u8; 4] {
        let mut f = 0u32;
        if self.fixed_newstyle {
            f |= FLAG_C_FIXED_NEWSTYLE;
        }
        if self.no_zeroes {
            f |= FLAG_C_NO_ZEROES;
        }
        f.to_be_bytes()
    }
}

/// An option request header; `length` bytes of option data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub fn decode(buf: &[u8]) -> Result<Option<(OptionHeader, usize)>, ProtoError> {
        if buf.len() < OPTION_HEADER_LEN {
            return Ok(None);
        }
        let magic = be_u64(buf, 0);
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                expected: IHAVEOPT,
                got: magic,
            });
        }
        let h = OptionHeader {
            option: be_u32(buf, 8),
            length: be_u32(buf, 12),
        };
        Ok(Some((h, OPTION_HEADER_LEN)))
    }

    /// Encodes the header and data of an option request.
    pub fn encode_with(option: u32, data: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }
}

/// An option reply header; `length` bytes of reply data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub fn decode(buf: &[u8]) -> Result<Option<(OptionReplyHeader, usize)>, ProtoError> {
        if buf.len() < OPTION_REPLY_HEADER_LEN {
            return Ok(None);
        }
        let magic = be_u64(buf, 0);
        if magic != OPT_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: OPT_REPLY_MAGIC,
                got: magic,
            });
        }
        let h = OptionReplyHeader {
            option: be_u32(buf, 8),
            reply_type: be_u32(buf, 12),
            length: be_u32(buf, 16),
        };
        Ok(Some((h, OPTION_REPLY_HEADER_LEN)))
    }

    pub fn is_error(&self) -> bool {
        self.reply_type & REP_FLAG_ERROR != 0
    }
}

/// Encodes an option reply (header and data).
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply_type.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The reply to NBD_OPT_EXPORT_NAME: size, flags and (unless NO_ZEROES) 124 zeroes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(10 + 124);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// NBD_INFO_EXPORT payload.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// NBD_INFO_BLOCK_SIZE payload.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b
}

/// NBD_INFO_NAME or NBD_INFO_DESCRIPTION payload.
pub fn info_string(info: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&info.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// NBD_REP_SERVER payload for NBD_OPT_LIST.
pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

/// NBD_REP_META_CONTEXT payload.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// Data of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

impl InfoRequest {
    pub fn parse(data: &[u8]) -> Result<InfoRequest, ProtoError> {
        const WHAT: &str = "NBD_OPT_GO/INFO data";
        let mut r = Cursor::new(data);
        let name = r.string(WHAT)?;
        let n = r.u16(WHAT)? as usize;
        if r.remaining() != 2 * n {
            return Err(ProtoError::Malformed(WHAT));
        }
        let mut infos = Vec::with_capacity(n);
        for _ in 0..n {
            infos.push(r.u16(WHAT)?);
        }
        Ok(InfoRequest { name, infos })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&(self.infos.len() as u16).to_be_bytes());
        for i in &self.infos {
            b.extend_from_slice(&i.to_be_bytes());
        }
        b
    }
}

/// Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn parse(data: &[u8]) -> Result<MetaContextRequest, ProtoError> {
        const WHAT: &str = "meta context data";
        let mut r = Cursor::new(data);
        let name = r.string(WHAT)?;
        let n = r.u32(WHAT)? as usize;
        // Each query takes at least 4 bytes: reject absurd counts before allocating.
        if n > r.remaining() / 4 {
            return Err(ProtoError::Malformed(WHAT));
        }
        let mut queries = Vec::with_capacity(n);
        for _ in 0..n {
            queries.push(r.string(WHAT)?);
        }
        if r.remaining() != 0 {
            return Err(ProtoError::Malformed(WHAT));
        }
        Ok(MetaContextRequest { name, queries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q.as_bytes());
        }
        b
    }
}

/// Checks that `s` is a string the protocol allows: UTF-8, no NUL, at most 4096 bytes.
pub fn valid_string(s: &[u8]) -> Option<&str> {
    if s.len() > MAX_STRING_LEN || s.contains(&0) {
        return None;
    }
    std::str::from_utf8(s).ok()
}

struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, at: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        if self.remaining() < 2 {
            return Err(ProtoError::Malformed(what));
        }
        let v = be_u16(self.buf, self.at);
        self.at += 2;
        Ok(v)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        if self.remaining() < 4 {
            return Err(ProtoError::Malformed(what));
        }
        let v = be_u32(self.buf, self.at);
        self.at += 4;
        Ok(v)
    }

    fn string(&mut self, what: &'static str) -> Result<String, ProtoError> {
        let len = self.u32(what)? as usize;
        if len > self.remaining() {
            return Err(ProtoError::Malformed(what));
        }
        let s =
            valid_string(&self.buf[self.at..self.at + len]).ok_or(ProtoError::Malformed(what))?;
        self.at += len;
        Ok(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn oldstyle_greeting_is_152_bytes_and_decodes() {
        let g = oldstyle_greeting(1 << 30, 0x0d);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert!(g[28..].iter().all(|&b| b == 0));
        assert_eq!(
            Greeting::decode(&g).unwrap(),
            Some((
                Greeting::Oldstyle {
                    size: 1 << 30,
                    flags: 0x0d
                },
                152
            ))
        );
        assert_eq!(Greeting::decode(&g[..151]).unwrap(), None);
    }

    #[test]
    fn newstyle_greeting_decodes() {
        let g = newstyle_greeting(3);
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(
            Greeting::decode(&g).unwrap(),
            Some((Greeting::Newstyle { flags: 3 }, 18))
        );
    }

    #[test]
    fn unknown_client_flags_rejected() {
        assert!(ClientFlags::decode(&4u32.to_be_bytes(), 3).is_err());
        assert!(ClientFlags::decode(&2u32.to_be_bytes(), 1).is_err());
        let (f, _) = ClientFlags::decode(&3u32.to_be_bytes(), 3)
            .unwrap()
            .unwrap();
        assert!(f.fixed_newstyle && f.no_zeroes);
    }

    #[test]
    fn info_request_roundtrip() {
        let r = InfoRequest {
            name: "disk".into(),
            infos: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        assert_eq!(InfoRequest::parse(&r.encode()).unwrap(), r);
        let mut bad = r.encode();
        bad.push(0);
        assert!(InfoRequest::parse(&bad).is_err());
    }

    #[test]
    fn meta_request_roundtrip() {
        let r = MetaContextRequest {
            name: "".into(),
            queries: vec!["base:allocation".into(), "qemu:".into()],
        };
        assert_eq!(MetaContextRequest::parse(&r.encode()).unwrap(), r);
    }

    #[test]
    fn huge_query_count_rejected_without_allocating() {
        let mut b = Vec::new();
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(MetaContextRequest::parse(&b).is_err());
    }

    #[test]
    fn string_with_nul_rejected() {
        let mut b = Vec::new();
        b.extend_from_slice(&3u32.to_be_bytes());
        b.extend_from_slice(b"a\0b");
        b.extend_from_slice(&0u16.to_be_bytes());
        assert!(InfoRequest::parse(&b).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = InfoRequest::parse(&bytes);
            let _ = MetaContextRequest::parse(&bytes);
            let _ = Greeting::decode(&bytes);
            let _ = OptionHeader::decode(&bytes);
            let _ = OptionReplyHeader::decode(&bytes);
            let _ = ClientFlags::decode(&bytes, 3);
        }
    }
}
