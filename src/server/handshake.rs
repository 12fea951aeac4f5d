//! Server side of the handshake: greeting and option haggling up to the
//! transmission phase.

use super::conn::Deadline;
use crate::proto::consts::*;
use crate::proto::handshake::{
    export_name_reply, info_block_size, info_export, info_string, newstyle_greeting,
    oldstyle_greeting, option_reply, rep_meta_context, rep_server, valid_string, InfoRequest,
    MetaContextRequest,
};
use crate::proto::reply::Framing;
use crate::proto::{ClientFlags, OptionHeader, ProtoError};
use crate::stream::Stream;
use crate::tls::{ServerTls, TlsError, TlsMode};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Id of `base:allocation` in BLOCK_STATUS replies.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Block sizes advertised with NBD_INFO_BLOCK_SIZE.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Option data beyond this is discarded and refused; far beyond it the client is dropped.
const MAX_DISCARD: u32 = 16 << 20;

/// Every optional transmission flag the server implements (all of them
/// for a local image; the proxy passes on those of its upstream's).
pub const LOCAL_CAPS: u16 = FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_CAN_MULTI_CONN
    | FLAG_SEND_CACHE
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_SEND_FAST_ZERO
    | FLAG_SEND_DF;

/// The export's name as clients ask for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportNames {
    /// The one export name served (`--export-name`, default empty); a client
    /// asking for another is refused.
    pub name: String,
    /// `NBD_INFO_DESCRIPTION` and the `NBD_OPT_LIST` entry (`--description`).
    pub description: Option<String>,
}

/// What the export looks like to the handshake.
#[derive(Debug, Clone, Copy)]
pub struct ExportInfo {
    pub size: u64,
    pub read_only: bool,
    pub oldstyle: bool,
    /// The minimum block size advertised (a block device's logical block size).
    pub min_block: u32,
    /// The optional transmission flags the backend supports ([`LOCAL_CAPS`]
    /// for an image; what the upstream advertised for the proxy).
    pub caps: u16,
    /// Structured replies can be offered.
    pub structured: bool,
    /// Extended headers (64-bit lengths) can be offered (needs `structured`).
    pub extended: bool,
    /// The `base:allocation` meta context can be offered (needs `structured`).
    pub block_status: bool,
}

impl ExportInfo {
    /// A local image of `size` bytes, with every capability.
    pub fn local(size: u64, read_only: bool, oldstyle: bool, min_block: u32) -> ExportInfo {
        ExportInfo {
            size,
            read_only,
            oldstyle,
            min_block,
            caps: LOCAL_CAPS,
            structured: true,
            extended: true,
            block_status: true,
        }
    }
}

/// What was agreed for the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Simple replies, structured ones, or extended headers.
    pub framing: Framing,
    pub base_allocation: bool,
    pub flags: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("client closed the connection during the handshake")]
    Closed,
    #[error("client aborted the handshake")]
    Aborted,
    #[error("handshake not completed in time")]
    TimedOut,
    #[error("protocol violation: {0}")]
    Proto(#[from] ProtoError),
    #[error("{0}")]
    Refused(&'static str),
    #[error("the client asked for export {asked:?}; this server serves {served:?}")]
    UnknownExport { asked: String, served: String },
    #[error("{0}")]
    Tls(TlsError),
    #[error("I/O error: {0}")]
    Io(io::Error),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => HandshakeError::Closed,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => HandshakeError::TimedOut,
            _ => HandshakeError::Io(e),
        }
    }
}

impl Negotiated {
    /// Structured replies (compact or extended) are on.
    pub fn structured(&self) -> bool {
        self.framing.structured()
    }

    /// Extended headers are on.
    pub fn extended(&self) -> bool {
        self.framing == Framing::Extended
    }
}

/// Transmission flags for this export, given the framing agreed.
pub fn transmission_flags(info: &ExportInfo, framing: Framing) -> u16 {
    let caps = info.caps;
    let mut f = FLAG_HAS_FLAGS
        | (caps & (FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE));
    if info.read_only {
        f |= FLAG_READ_ONLY;
    } else {
        f |= caps & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO);
    }
    if framing.structured() {
        f |= caps & FLAG_SEND_DF;
    }
    if framing == Framing::Extended && info.block_status {
        f |= FLAG_BLOCK_STATUS_PAYLOAD;
    }
    f
}

/// Runs the handshake, all of it by `at`; `Ok` means the transmission
/// phase starts. With `tls`, NBD_OPT_STARTTLS turns `conn` into a TLS
/// stream (the transmission phase then runs over it).
pub fn negotiate(
    conn: &mut Stream,
    at: Instant,
    info: &ExportInfo,
    names: &ExportNames,
    tls: Option<&ServerTls>,
    shutting_down: &AtomicBool,
) -> Result<Negotiated, HandshakeError> {
    let d = Deadline::new(conn, at);
    let mut c = &d;
    if info.oldstyle {
        let flags = transmission_flags(info, Framing::Simple);
        c.write_all(&oldstyle_greeting(info.size, flags as u32))?;
        return Ok(Negotiated {
            framing: Framing::Simple,
            base_allocation: false,
            flags,
        });
    }
    let offered = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
    c.write_all(&newstyle_greeting(offered))?;
    let mut fb = [0u8; 4];
    c.read_exact(&mut fb)?;
    let cflags = match ClientFlags::decode(&fb, offered)? {
        Some((f, _)) => f,
        None => return Err(HandshakeError::Closed),
    };
    let mut h = Haggle {
        conn,
        at,
        info,
        names,
        tls,
        tls_up: false,
        tls_refused: false,
        cflags,
        framing: Framing::Simple,
        base_allocation: false,
        meta_export: None,
    };
    h.run(shutting_down)
}

struct Haggle<'a> {
    conn: &'a mut Stream,
    at: Instant,
    info: &'a ExportInfo,
    names: &'a ExportNames,
    tls: Option<&'a ServerTls>,
    /// STARTTLS succeeded: `conn` is a TLS stream.
    tls_up: bool,
    /// An option was refused with ERR_TLS_REQD.
    tls_refused: bool,
    cflags: ClientFlags,
    framing: Framing,
    base_allocation: bool,
    /// The export name the selected meta contexts were chosen for.
    meta_export: Option<String>,
}

impl Haggle<'_> {
    fn deadline(&self) -> Deadline<'_> {
        Deadline::new(self.conn, self.at)
    }

    fn send(&self, b: &[u8]) -> io::Result<()> {
        let d = self.deadline();
        let mut c = &d;
        c.write_all(b)?;
        c.flush()
    }

    fn reply(&self, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        self.send(&option_reply(option, kind, data))
    }

    /// TLS is required and not up yet.
    fn tls_missing(&self) -> bool {
        !self.tls_up && self.tls.is_some_and(|t| t.mode == TlsMode::Require)
    }

    /// NBD_OPT_STARTTLS: ACK, then the TLS handshake on the same socket.
    /// What was negotiated before is forgotten, as the spec requires.
    fn start_tls(&mut self, opt: u32, data: &[u8]) -> Result<(), HandshakeError> {
        let tls = match self.tls {
            Some(t) if t.mode != TlsMode::Off => t,
            _ => {
                self.error(opt, REP_ERR_POLICY, "TLS is not configured on this server")?;
                return Ok(());
            }
        };
        if self.tls_up {
            self.error(opt, REP_ERR_INVALID, "TLS is already on")?;
            return Ok(());
        }
        if !data.is_empty() {
            self.error(opt, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")?;
            return Ok(());
        }
        self.reply(opt, REP_ACK, &[])?;
        let plain = self.conn.try_clone()?;
        *self.conn = tls.accept(plain, self.at).map_err(HandshakeError::Tls)?;
        self.tls_up = true;
        self.framing = Framing::Simple;
        self.base_allocation = false;
        self.meta_export = None;
        Ok(())
    }

    /// The message for a client asking for an export this server lacks.
    fn unknown(&self, asked: &str) -> String {
        warn!(
            "a client asked for export {asked:?}; this server serves {:?}",
            self.names.name
        );
        format!(
            "no export named {asked:?} here; this server serves {:?}",
            self.names.name
        )
    }

    fn error(&self, option: u32, kind: u32, msg: &str) -> io::Result<()> {
        self.reply(option, kind, msg.as_bytes())
    }

    /// What the transmission phase for export `name` gets: contexts chosen
    /// for another export name do not carry over.
    fn negotiated(&self, name: &str) -> Negotiated {
        Negotiated {
            framing: self.framing,
            base_allocation: self.base_allocation && self.meta_export.as_deref() == Some(name),
            flags: transmission_flags(self.info, self.framing),
        }
    }

    fn run(&mut self, shutting_down: &AtomicBool) -> Result<Negotiated, HandshakeError> {
        let r = self.haggle(shutting_down);
        match r {
            // A plain client that gave up after ERR_TLS_REQD: say why.
            Err(HandshakeError::Closed | HandshakeError::Aborted) if self.tls_refused => Err(
                HandshakeError::Refused("TLS is required and the client did not start it"),
            ),
            r => r,
        }
    }

    fn haggle(&mut self, shutting_down: &AtomicBool) -> Result<Negotiated, HandshakeError> {
        loop {
            let d = self.deadline();
            let mut c = &d;
            let mut hb = [0u8; OPTION_HEADER_LEN];
            c.read_exact(&mut hb)?;
            let hdr = match OptionHeader::decode(&hb)? {
                Some((h, _)) => h,
                None => return Err(HandshakeError::Closed),
            };
            if hdr.length > MAX_OPTION_LEN {
                if hdr.option == OPT_EXPORT_NAME || hdr.length > MAX_DISCARD {
                    return Err(HandshakeError::Refused("option data too long"));
                }
                io::copy(&mut c.take(hdr.length as u64), &mut io::sink())?;
                self.error(hdr.option, REP_ERR_TOO_BIG, "option data too long")?;
                continue;
            }
            let mut data = vec![0u8; hdr.length as usize];
            c.read_exact(&mut data)?;
            if !self.cflags.fixed_newstyle && hdr.option != OPT_EXPORT_NAME {
                return Err(HandshakeError::Refused("option without fixed newstyle"));
            }
            if shutting_down.load(Ordering::Relaxed) && hdr.option != OPT_ABORT {
                if hdr.option == OPT_EXPORT_NAME {
                    return Err(HandshakeError::Refused("server is shutting down"));
                }
                self.error(hdr.option, REP_ERR_SHUTDOWN, "server is shutting down")?;
                continue;
            }
            if self.tls_missing() && !matches!(hdr.option, OPT_STARTTLS | OPT_ABORT) {
                if hdr.option == OPT_EXPORT_NAME {
                    return Err(HandshakeError::Refused(
                        "TLS is required (NBD_OPT_STARTTLS)",
                    ));
                }
                self.tls_refused = true;
                self.error(
                    hdr.option,
                    REP_ERR_TLS_REQD,
                    "TLS is required: send NBD_OPT_STARTTLS first",
                )?;
                continue;
            }
            if let Some(n) = self.option(hdr.option, &data)? {
                return Ok(n);
            }
        }
    }

    /// Handles one option; `Some` enters transmission.
    fn option(&mut self, opt: u32, data: &[u8]) -> Result<Option<Negotiated>, HandshakeError> {
        match opt {
            OPT_EXPORT_NAME => {
                // It cannot say which headers follow: not after extended ones.
                if self.framing == Framing::Extended {
                    return Err(HandshakeError::Refused(
                        "NBD_OPT_EXPORT_NAME after extended headers were agreed",
                    ));
                }
                let Some(name) = valid_string(data) else {
                    return Err(HandshakeError::Refused("bad export name"));
                };
                // EXPORT_NAME has no error reply: an unknown name is a close.
                if name != self.names.name {
                    return Err(HandshakeError::UnknownExport {
                        asked: name.to_owned(),
                        served: self.names.name.clone(),
                    });
                }
                let n = self.negotiated(name);
                self.send(&export_name_reply(
                    self.info.size,
                    n.flags,
                    self.cflags.no_zeroes,
                ))?;
                Ok(Some(n))
            }
            OPT_ABORT => {
                // The client may already have gone; the reply is best effort.
                let _ = self.reply(opt, REP_ACK, &[]);
                Err(HandshakeError::Aborted)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                } else {
                    let desc = self.names.description.as_deref().unwrap_or("");
                    self.reply(opt, REP_SERVER, &rep_server(&self.names.name, desc))?;
                    self.reply(opt, REP_ACK, &[])?;
                }
                Ok(None)
            }
            OPT_STARTTLS => {
                self.start_tls(opt, data)?;
                Ok(None)
            }
            OPT_INFO | OPT_GO => self.info_go(opt, data),
            OPT_STRUCTURED_REPLY => {
                if !self.info.structured {
                    self.error(opt, REP_ERR_UNSUP, "structured replies are not available")?;
                } else if !data.is_empty() {
                    self.error(
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                } else if self.framing == Framing::Extended {
                    self.error(
                        opt,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers were already agreed",
                    )?;
                } else {
                    self.framing = Framing::Structured;
                    self.reply(opt, REP_ACK, &[])?;
                }
                Ok(None)
            }
            OPT_EXTENDED_HEADERS => {
                if !(self.info.structured && self.info.extended) {
                    self.error(opt, REP_ERR_UNSUP, "extended headers are not available")?;
                } else if !data.is_empty() {
                    self.error(
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_EXTENDED_HEADERS takes no data",
                    )?;
                } else if self.framing == Framing::Extended {
                    self.error(opt, REP_ERR_INVALID, "extended headers were already agreed")?;
                } else {
                    // They include structured replies; contexts chosen stay.
                    self.framing = Framing::Extended;
                    self.reply(opt, REP_ACK, &[])?;
                }
                Ok(None)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(opt, data)?;
                Ok(None)
            }
            _ => {
                self.error(opt, REP_ERR_UNSUP, "option not supported")?;
                Ok(None)
            }
        }
    }

    fn info_go(&mut self, opt: u32, data: &[u8]) -> Result<Option<Negotiated>, HandshakeError> {
        let req = match InfoRequest::parse(data) {
            Ok(r) => r,
            Err(_) => {
                self.error(opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data")?;
                return Ok(None);
            }
        };
        if req.name != self.names.name {
            let msg = self.unknown(&req.name);
            self.error(opt, REP_ERR_UNKNOWN, &msg)?;
            return Ok(None);
        }
        let n = self.negotiated(&req.name);
        self.reply(opt, REP_INFO, &info_export(self.info.size, n.flags))?;
        // Block sizes are always sent: clients that did not ask may ignore them.
        self.reply(
            opt,
            REP_INFO,
            &info_block_size(
                self.info.min_block.max(MIN_BLOCK),
                PREFERRED_BLOCK.max(self.info.min_block),
                MAX_PAYLOAD,
            ),
        )?;
        if req.infos.contains(&INFO_NAME) {
            self.reply(opt, REP_INFO, &info_string(INFO_NAME, &self.names.name))?;
        }
        if req.infos.contains(&INFO_DESCRIPTION) {
            if let Some(d) = &self.names.description {
                self.reply(opt, REP_INFO, &info_string(INFO_DESCRIPTION, d))?;
            }
        }
        self.reply(opt, REP_ACK, &[])?;
        Ok(if opt == OPT_GO { Some(n) } else { None })
    }

    fn meta_context(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        if opt == OPT_SET_META_CONTEXT {
            // SET replaces every context chosen before, even when it fails.
            self.base_allocation = false;
            self.meta_export = None;
        }
        if !self.framing.structured() {
            return self.error(
                opt,
                REP_ERR_INVALID,
                "structured replies must be negotiated first",
            );
        }
        let req = match MetaContextRequest::parse(data) {
            Ok(r) => r,
            Err(_) => return self.error(opt, REP_ERR_INVALID, "malformed meta context data"),
        };
        if req.name != self.names.name {
            let msg = self.unknown(&req.name);
            return self.error(opt, REP_ERR_UNKNOWN, &msg);
        }
        if req.queries.iter().any(|q| !q.contains(':')) {
            return self.error(opt, REP_ERR_INVALID, "a query must start with a namespace");
        }
        let list = opt == OPT_LIST_META_CONTEXT;
        let selected = self.info.block_status
            && if list {
                req.queries.is_empty()
                    || req
                        .queries
                        .iter()
                        .any(|q| q == "base:" || q == BASE_ALLOCATION)
            } else {
                req.queries.iter().any(|q| q == BASE_ALLOCATION)
            };
        if selected {
            let id = if list { 0 } else { BASE_ALLOCATION_ID };
            self.reply(
                opt,
                REP_META_CONTEXT,
                &rep_meta_context(id, BASE_ALLOCATION),
            )?;
        }
        if !list {
            self.base_allocation = selected;
            self.meta_export = Some(req.name.clone());
        }
        self.reply(opt, REP_ACK, &[])
    }
}
