//! The client side of the handshake: greeting detection (old-style or newstyle),
//! client flags, optional structured replies, NBD_OPT_GO with a fallback to
//! NBD_OPT_EXPORT_NAME.

use super::transport::Stream;
use super::{printable, BlockSize, ClientError, ConnectOptions, ExportInfo};
use crate::proto::consts::*;
use crate::proto::handshake::{InfoRequest, MetaContextRequest};
use crate::proto::{
    be_u16, be_u32, be_u64, ClientFlags, Greeting, OptionHeader, OptionReplyHeader,
};
use std::io::{self, Read, Write};
use std::time::Duration;

/// More replies than this to one option is a misbehaving server.
const MAX_REPLIES_PER_OPTION: usize = 64;

/// Runs the handshake on a freshly opened socket and leaves it in the
/// transmission phase, with the socket timeouts set to `opts.request_timeout`.
/// With `opts.tls`, NBD_OPT_STARTTLS comes first and `s` becomes a TLS
/// stream; `host` is the name the server's certificate must carry unless
/// another was configured.
pub(crate) fn negotiate(
    s: &mut Stream,
    opts: &ConnectOptions,
    host: &str,
) -> Result<ExportInfo, ClientError> {
    if opts.export_name.len() > MAX_STRING_LEN || opts.export_name.contains('\0') {
        return Err(ClientError::Invalid(
            "export name too long or has a NUL".into(),
        ));
    }
    s.set_read_timeout(Some(opts.greeting_timeout))
        .and_then(|_| s.set_write_timeout(Some(opts.greeting_timeout)))
        .map_err(ClientError::Io)?;
    let mut h = Haggle {
        s,
        timeout: opts.greeting_timeout,
        host,
    };
    let info = match h.greeting()? {
        Greeting::Oldstyle { .. } if opts.tls.is_some() => {
            return Err(ClientError::Tls(
                "the server greeted old-style, which has no TLS".into(),
            ))
        }
        Greeting::Oldstyle { size, flags } => ExportInfo {
            size,
            // The high half of the old-style flags field is reserved.
            flags: (flags & 0xffff) as u16,
            oldstyle: true,
            structured_replies: false,
            extended_headers: false,
            base_allocation: None,
            block_size: None,
        },
        Greeting::Newstyle { flags } => h.newstyle(flags, opts)?,
    };
    let s = &*h.s;
    s.set_read_timeout(opts.request_timeout)
        .and_then(|_| s.set_write_timeout(opts.request_timeout))
        .map_err(ClientError::Io)?;
    Ok(info)
}

struct Haggle<'a> {
    s: &'a mut Stream,
    timeout: Duration,
    host: &'a str,
}

impl Haggle<'_> {
    fn greeting(&mut self) -> Result<Greeting, ClientError> {
        let mut buf = [0u8; OLDSTYLE_GREETING_LEN];
        self.greeting_bytes(&mut buf[..16])?;
        let need = if buf[8..16] == OLDSTYLE_MAGIC.to_be_bytes() {
            OLDSTYLE_GREETING_LEN
        } else if buf[8..16] == IHAVEOPT.to_be_bytes() {
            NEWSTYLE_GREETING_LEN
        } else {
            16
        };
        self.greeting_bytes(&mut buf[16..need])?;
        match Greeting::decode(&buf[..need]) {
            Ok(Some((g, _))) => Ok(g),
            Ok(None) => Err(ClientError::NoResponse("incomplete greeting".into())),
            Err(e) => Err(ClientError::BadGreeting(e.to_string())),
        }
    }

    /// Reads greeting bytes: a close (or reset) here means the server turned us away.
    fn greeting_bytes(&mut self, buf: &mut [u8]) -> Result<(), ClientError> {
        let mut r = &*self.s;
        r.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => ClientError::Rejected,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::NoResponse(
                format!("no greeting within {}s", self.timeout.as_secs_f64()),
            ),
            _ => ClientError::Io(e),
        })
    }

    fn newstyle(&mut self, hflags: u16, opts: &ConnectOptions) -> Result<ExportInfo, ClientError> {
        let fixed = hflags & FLAG_FIXED_NEWSTYLE != 0;
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let cflags = ClientFlags {
            fixed_newstyle: fixed,
            no_zeroes,
        };
        self.send(&cflags.encode(), "client flags")?;
        let name = opts.export_name.as_str();
        if let Some(tls) = &opts.tls {
            if !fixed {
                return Err(ClientError::Tls(
                    "the server is not fixed newstyle, so it has no STARTTLS".into(),
                ));
            }
            self.start_tls(tls)?;
        }
        if !fixed {
            // A plain newstyle server may drop the connection on any other option.
            return self.export_name(name, no_zeroes, false);
        }
        // Extended headers include structured replies; a server without
        // them is asked for structured replies alone.
        let extended = opts.extended_headers && self.simple_option(OPT_EXTENDED_HEADERS)?;
        let structured =
            extended || (opts.structured_replies && self.simple_option(OPT_STRUCTURED_REPLY)?);
        let base_allocation = match structured && opts.base_allocation {
            true => self.base_allocation(name)?,
            false => None,
        };
        let info = match self.go(name, structured)? {
            Some(info) => info,
            // EXPORT_NAME cannot follow extended headers (and a server
            // that has them has GO).
            None if extended => {
                return Err(ClientError::Protocol(
                    "the server agreed to extended headers but refused NBD_OPT_GO".into(),
                ))
            }
            None => self.export_name(name, no_zeroes, structured)?,
        };
        Ok(ExportInfo {
            base_allocation,
            extended_headers: extended,
            ..info
        })
    }

    /// Selects `base:allocation` with NBD_OPT_SET_META_CONTEXT; its id, or
    /// `None` when the server has no such context (or refuses the option).
    fn base_allocation(&mut self, name: &str) -> Result<Option<u32>, ClientError> {
        let data = MetaContextRequest {
            name: name.to_owned(),
            queries: vec!["base:allocation".into()],
        }
        .encode();
        let req = OptionHeader::encode_with(OPT_SET_META_CONTEXT, &data);
        self.send(&req, "NBD_OPT_SET_META_CONTEXT")?;
        let mut id = None;
        for _ in 0..MAX_REPLIES_PER_OPTION {
            let (h, payload) = self.option_reply(OPT_SET_META_CONTEXT)?;
            match h.reply_type {
                REP_ACK => return Ok(id),
                REP_META_CONTEXT if payload.len() >= 4 => {
                    if &payload[4..] == b"base:allocation" {
                        id = Some(be_u32(&payload, 0));
                    }
                }
                _ if h.is_error() => return Ok(None),
                t => return Err(unexpected(t, OPT_SET_META_CONTEXT)),
            }
        }
        Err(ClientError::Protocol(
            "too many replies to NBD_OPT_SET_META_CONTEXT".into(),
        ))
    }

    /// NBD_OPT_STARTTLS, then the TLS handshake on the same socket.
    fn start_tls(&mut self, tls: &crate::tls::ClientTls) -> Result<(), ClientError> {
        let req = OptionHeader::encode_with(OPT_STARTTLS, &[]);
        self.send(&req, "NBD_OPT_STARTTLS")?;
        let (h, payload) = self.option_reply(OPT_STARTTLS)?;
        match h.reply_type {
            REP_ACK => {}
            t if h.is_error() => {
                return Err(ClientError::OptionRefused {
                    option: "NBD_OPT_STARTTLS",
                    reply: rep_name(t),
                    message: error_message(&payload),
                })
            }
            t => return Err(unexpected(t, OPT_STARTTLS)),
        }
        let plain = self.s.try_clone().map_err(ClientError::Io)?;
        let at = std::time::Instant::now() + self.timeout;
        *self.s = tls
            .connect(plain, self.host, at)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        Ok(())
    }

    /// An option without data (STRUCTURED_REPLY, EXTENDED_HEADERS): true
    /// if the server agreed, false if it refused.
    fn simple_option(&mut self, opt: u32) -> Result<bool, ClientError> {
        let req = OptionHeader::encode_with(opt, &[]);
        self.send(&req, opt_name(opt))?;
        let (h, _) = self.option_reply(opt)?;
        match h.reply_type {
            REP_ACK => Ok(true),
            _ if h.is_error() => Ok(false),
            t => Err(unexpected(t, opt)),
        }
    }

    /// NBD_OPT_GO; `Ok(None)` when the server does not know the option.
    fn go(&mut self, name: &str, structured: bool) -> Result<Option<ExportInfo>, ClientError> {
        let data = InfoRequest {
            name: name.to_owned(),
            infos: vec![INFO_BLOCK_SIZE],
        }
        .encode();
        self.send(&OptionHeader::encode_with(OPT_GO, &data), "NBD_OPT_GO")?;
        let mut export = None;
        let mut block_size = None;
        for _ in 0..MAX_REPLIES_PER_OPTION {
            let (h, payload) = self.option_reply(OPT_GO)?;
            match h.reply_type {
                REP_INFO => parse_info(&payload, &mut export, &mut block_size)?,
                REP_ACK => {
                    let (size, flags) = export.ok_or_else(|| {
                        ClientError::Protocol(
                            "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into(),
                        )
                    })?;
                    return Ok(Some(ExportInfo {
                        size,
                        flags,
                        oldstyle: false,
                        structured_replies: structured,
                        extended_headers: false,
                        base_allocation: None,
                        block_size,
                    }));
                }
                REP_ERR_UNSUP => return Ok(None),
                t if h.is_error() => {
                    return Err(ClientError::OptionRefused {
                        option: "NBD_OPT_GO",
                        reply: rep_name(t),
                        message: error_message(&payload),
                    })
                }
                t => return Err(unexpected(t, OPT_GO)),
            }
        }
        Err(ClientError::Protocol(
            "too many replies to NBD_OPT_GO".into(),
        ))
    }

    fn export_name(
        &mut self,
        name: &str,
        no_zeroes: bool,
        structured: bool,
    ) -> Result<ExportInfo, ClientError> {
        let req = OptionHeader::encode_with(OPT_EXPORT_NAME, name.as_bytes());
        self.send(&req, "NBD_OPT_EXPORT_NAME")?;
        let mut b = [0u8; 10 + 124];
        let n = if no_zeroes { 10 } else { b.len() };
        match self.read_exact(&mut b[..n], "NBD_OPT_EXPORT_NAME") {
            Err(ClientError::Closed) => {
                // The only way a server can refuse this option.
                return Err(ClientError::OptionRefused {
                    option: "NBD_OPT_EXPORT_NAME",
                    reply: "connection closed",
                    message: format!(": no export named {name:?}?"),
                });
            }
            r => r?,
        }
        Ok(ExportInfo {
            size: be_u64(&b, 0),
            flags: be_u16(&b, 8),
            oldstyle: false,
            structured_replies: structured,
            extended_headers: false,
            base_allocation: None,
            block_size: None,
        })
    }

    /// Reads one option reply to `option`, with its (bounded) payload.
    fn option_reply(&mut self, option: u32) -> Result<(OptionReplyHeader, Vec<u8>), ClientError> {
        let what = opt_name(option);
        let mut hb = [0u8; OPTION_REPLY_HEADER_LEN];
        self.read_exact(&mut hb, what)?;
        let h = match OptionReplyHeader::decode(&hb) {
            Ok(Some((h, _))) => h,
            Ok(None) => return Err(ClientError::Protocol("short option reply".into())),
            Err(e) => return Err(ClientError::Protocol(format!("reply to {what}: {e}"))),
        };
        if h.option != option {
            return Err(ClientError::Protocol(format!(
                "reply to option {} while waiting for {what}",
                h.option
            )));
        }
        if h.length > MAX_OPTION_LEN {
            return Err(ClientError::Protocol(format!(
                "reply to {what} of {} bytes exceeds the limit of {MAX_OPTION_LEN}",
                h.length
            )));
        }
        let mut payload = vec![0u8; h.length as usize];
        self.read_exact(&mut payload, what)?;
        Ok((h, payload))
    }

    fn read_exact(&mut self, buf: &mut [u8], during: &str) -> Result<(), ClientError> {
        let mut r = &*self.s;
        r.read_exact(buf).map_err(|e| self.map(e, during))
    }

    fn send(&mut self, buf: &[u8], what: &str) -> Result<(), ClientError> {
        let mut w = &*self.s;
        w.write_all(buf)
            .and_then(|_| w.flush())
            .map_err(|e| self.map(e, what))
    }

    fn map(&self, e: io::Error, during: &str) -> ClientError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ClientError::NoResponse(format!(
                    "stalled for {}s during {during}",
                    self.timeout.as_secs_f64()
                ))
            }
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => ClientError::Closed,
            _ => ClientError::Io(e),
        }
    }
}

/// Takes in one NBD_REP_INFO payload; unknown info types are skipped.
fn parse_info(
    p: &[u8],
    export: &mut Option<(u64, u16)>,
    block_size: &mut Option<BlockSize>,
) -> Result<(), ClientError> {
    if p.len() < 2 {
        return Err(ClientError::Protocol("empty NBD_REP_INFO".into()));
    }
    let bad = |what: &str| ClientError::Protocol(format!("{what} of {} bytes", p.len()));
    match be_u16(p, 0) {
        INFO_EXPORT => {
            if p.len() != 12 {
                return Err(bad("NBD_INFO_EXPORT"));
            }
            *export = Some((be_u64(p, 2), be_u16(p, 10)));
        }
        INFO_BLOCK_SIZE => {
            if p.len() != 14 {
                return Err(bad("NBD_INFO_BLOCK_SIZE"));
            }
            *block_size = Some(BlockSize {
                minimum: be_u32(p, 2),
                preferred: be_u32(p, 6),
                maximum: be_u32(p, 10),
            });
        }
        _ => {}
    }
    Ok(())
}

fn error_message(payload: &[u8]) -> String {
    if payload.is_empty() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&payload[..payload.len().min(MAX_STRING_LEN)]);
    format!(": {}", printable(&text))
}

fn unexpected(reply_type: u32, option: u32) -> ClientError {
    ClientError::Protocol(format!(
        "unexpected reply {} to {}",
        rep_name(reply_type),
        opt_name(option)
    ))
}

fn opt_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "an option",
    }
}

fn rep_name(reply_type: u32) -> &'static str {
    match reply_type {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        t if t & REP_FLAG_ERROR != 0 => "an unknown error reply",
        _ => "an unknown reply",
    }
}
