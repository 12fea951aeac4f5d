//! Reading replies in the transmission phase: reply headers, simple replies and
//! structured reply chunks, with READ payloads streamed into a bounded sink.

use super::input::{Pipe, ReplyInput};
use super::{io_error, printable, ClientError};
use crate::proto::consts::*;
use crate::proto::reply::parse_error_payload;
use crate::proto::{be_u32, be_u64, ChunkHeader, NbdErrno, ReplyHeader, SimpleReply};
use std::io::{self, Write};
use std::time::Duration;

/// Largest error chunk payload accepted (the message is at most 4096 bytes).
const MAX_ERROR_CHUNK: u32 = 64 * 1024;
/// Largest BLOCK_STATUS chunk accepted (128 Ki descriptors).
const MAX_STATUS_CHUNK: u32 = 1 << 20;

/// Where the data of a READ reply goes.
pub(crate) enum Sink<'a> {
    /// The request returns no data.
    Nothing,
    /// Data lands in the slice (relative to the request offset).
    Slice(&'a mut [u8]),
    /// Data is passed to `out` in order, through `buf`.
    Writer {
        out: &'a mut dyn Write,
        buf: &'a mut [u8],
    },
    /// Data goes into the pipe, in order (holes as zeroes).
    Pipe(&'a Pipe),
    /// A BLOCK_STATUS reply: the (length, flags) descriptors of context `id`.
    Extents {
        id: u32,
        out: &'a mut Vec<(u64, u32)>,
    },
}

impl Sink<'_> {
    /// The reply carries READ data.
    fn takes_data(&self) -> bool {
        matches!(self, Sink::Slice(_) | Sink::Writer { .. } | Sink::Pipe(_))
    }
}

/// An error a server returned for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub errno: NbdErrno,
    pub message: Option<String>,
}

impl Failure {
    fn from_code(code: u32, message: Option<String>) -> Failure {
        Failure {
            errno: NbdErrno::from_code(code),
            message,
        }
    }

    pub(crate) fn into_error(self) -> ClientError {
        ClientError::Nbd {
            errno: self.errno,
            message: self.message,
        }
    }
}

/// Reads the next reply header: with `extended` headers only extended
/// chunks, else simple replies and compact chunks. `Ok(None)` means the
/// server closed the connection between replies. A timeout before the first
/// byte asks `idle` whether to keep waiting (nothing is in flight); any
/// other timeout is an error.
pub(crate) fn read_header(
    s: &mut dyn ReplyInput,
    extended: bool,
    timeout: Option<Duration>,
    idle: &dyn Fn() -> bool,
) -> Result<Option<ReplyHeader>, ClientError> {
    let mut buf = [0u8; EXTENDED_REPLY_LEN];
    let mut have = 0;
    let mut need = 4;
    while have < need {
        match s.read(&mut buf[have..need]) {
            Ok(0) if have == 0 => return Ok(None),
            Ok(0) => return Err(ClientError::Closed),
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if have == 0
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    )
                    && idle() => {}
            Err(e) => return Err(io_error(e, timeout)),
        }
        if have == 4 && need == 4 {
            need = match (be_u32(&buf, 0), extended) {
                (SIMPLE_REPLY_MAGIC, false) => SIMPLE_REPLY_LEN,
                (STRUCTURED_REPLY_MAGIC, false) => STRUCTURED_REPLY_LEN,
                (EXTENDED_REPLY_MAGIC, true) => EXTENDED_REPLY_LEN,
                (m, true) => {
                    return Err(ClientError::Protocol(format!(
                        "reply magic {m:#010x} where extended headers were agreed"
                    )))
                }
                _ => 4,
            };
        }
    }
    match ReplyHeader::decode(&buf[..need]) {
        Ok(Some((h, _))) => Ok(Some(h)),
        Ok(None) => Err(ClientError::Protocol("short reply header".into())),
        Err(e) => Err(ClientError::Protocol(format!("reply: {e}"))),
    }
}

/// The progress of the reply to one request.
#[derive(Debug)]
pub(crate) struct ReplyState {
    offset: u64,
    len: u64,
    /// Bytes of data delivered, from the start of the request, in order.
    delivered: u64,
    failure: Option<Failure>,
    timeout: Option<Duration>,
    /// Some chunks of this reply were taken in already.
    started: bool,
}

impl ReplyState {
    pub(crate) fn new(offset: u64, len: u64, timeout: Option<Duration>) -> ReplyState {
        ReplyState {
            offset,
            len,
            delivered: 0,
            failure: None,
            timeout,
            started: false,
        }
    }

    pub(crate) fn started(&self) -> bool {
        self.started
    }

    pub(crate) fn mark_started(&mut self) {
        self.started = true;
    }

    /// The outcome once the reply is complete.
    pub(crate) fn outcome(self) -> Result<(), Failure> {
        match self.failure {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    /// Takes in a simple reply (the whole reply) and its data, if any.
    pub(crate) fn simple(
        &mut self,
        s: &mut dyn ReplyInput,
        r: SimpleReply,
        sink: &mut Sink<'_>,
    ) -> Result<(), ClientError> {
        if r.error != 0 {
            self.failure = Some(Failure::from_code(r.error, None));
            return Ok(());
        }
        if sink.takes_data() {
            self.copy_in(s, sink, 0, self.len)?;
        } else if let Sink::Extents { .. } = sink {
            return Err(proto("simple reply to BLOCK_STATUS"));
        }
        Ok(())
    }

    /// Takes in one structured reply chunk; returns true when it was the last.
    pub(crate) fn chunk(
        &mut self,
        s: &mut dyn ReplyInput,
        c: ChunkHeader,
        sink: &mut Sink<'_>,
    ) -> Result<bool, ClientError> {
        match c.kind {
            REPLY_TYPE_NONE => {
                if c.length != 0 || !c.done() {
                    return Err(proto("NONE chunk with a payload or without the DONE flag"));
                }
            }
            REPLY_TYPE_BLOCK_STATUS => {
                let Sink::Extents { id, out } = sink else {
                    return Err(proto("block status chunk in reply to another request"));
                };
                if c.length < 12
                    || !(c.length - 4).is_multiple_of(8)
                    || c.length > MAX_STATUS_CHUNK as u64
                {
                    return Err(proto("BLOCK_STATUS chunk of a bad length"));
                }
                let mut p = vec![0u8; c.length as usize];
                self.read_exact(s, &mut p)?;
                if be_u32(&p, 0) != *id {
                    return Err(proto("BLOCK_STATUS chunk for a context not selected"));
                }
                out.extend(
                    p[4..]
                        .chunks_exact(8)
                        .map(|d| (u64::from(be_u32(d, 0)), be_u32(d, 4))),
                );
                self.delivered = self.len;
            }
            REPLY_TYPE_BLOCK_STATUS_EXT => {
                let Sink::Extents { id, out } = sink else {
                    return Err(proto("block status chunk in reply to another request"));
                };
                if c.length < 24
                    || !(c.length - 8).is_multiple_of(16)
                    || c.length > 2 * MAX_STATUS_CHUNK as u64
                {
                    return Err(proto("BLOCK_STATUS_EXT chunk of a bad length"));
                }
                let mut p = vec![0u8; c.length as usize];
                self.read_exact(s, &mut p)?;
                if be_u32(&p, 0) != *id {
                    return Err(proto("BLOCK_STATUS chunk for a context not selected"));
                }
                if be_u32(&p, 4) as usize != (p.len() - 8) / 16 {
                    return Err(proto(
                        "BLOCK_STATUS_EXT descriptor count differs from its length",
                    ));
                }
                // Flags are 32-bit (those of `base:allocation` are 2 bits).
                out.extend(
                    p[8..]
                        .chunks_exact(16)
                        .map(|d| (be_u64(d, 0), be_u64(d, 8) as u32)),
                );
                self.delivered = self.len;
            }
            REPLY_TYPE_OFFSET_DATA => {
                if !sink.takes_data() {
                    return Err(proto("data chunk in reply to a request without data"));
                }
                if c.length < 8 {
                    return Err(proto("OFFSET_DATA chunk too short"));
                }
                let mut b = [0u8; 8];
                self.read_exact(s, &mut b)?;
                let n = c.length - 8;
                let rel = self.place(be_u64(&b, 0), n)?;
                self.copy_in(s, sink, rel, n)?;
            }
            REPLY_TYPE_OFFSET_HOLE => {
                if !sink.takes_data() {
                    return Err(proto("hole chunk in reply to a request without data"));
                }
                if c.length != 12 {
                    return Err(proto("OFFSET_HOLE chunk of the wrong length"));
                }
                let mut b = [0u8; 12];
                self.read_exact(s, &mut b)?;
                let n = u64::from(be_u32(&b, 8));
                let rel = self.place(be_u64(&b, 0), n)?;
                self.zeroes(sink, rel, n)?;
            }
            k if k & 0x8000 != 0 => {
                if c.length > MAX_ERROR_CHUNK as u64 {
                    return Err(proto("error chunk too long"));
                }
                let mut p = vec![0u8; c.length as usize];
                self.read_exact(s, &mut p)?;
                let (code, msg) =
                    parse_error_payload(&p).map_err(|e| ClientError::Protocol(e.to_string()))?;
                if code == 0 {
                    return Err(proto("error chunk with error code 0"));
                }
                let msg = (!msg.is_empty()).then(|| printable(&msg));
                self.failure
                    .get_or_insert_with(|| Failure::from_code(code, msg));
            }
            k => {
                return Err(ClientError::Protocol(format!(
                    "unexpected reply chunk type {k}"
                )))
            }
        }
        if !c.done() {
            return Ok(false);
        }
        if self.failure.is_none() && !matches!(sink, Sink::Nothing) && self.delivered != self.len {
            if let Sink::Extents { .. } = sink {
                return Err(proto("block status reply without descriptors"));
            }
            return Err(ClientError::Protocol(format!(
                "read reply covered {} of {} bytes",
                self.delivered, self.len
            )));
        }
        Ok(true)
    }

    /// Checks that `n` bytes at `at` lie inside the request and come next in
    /// order; returns the position relative to the request.
    fn place(&self, at: u64, n: u64) -> Result<u64, ClientError> {
        let rel = at
            .checked_sub(self.offset)
            .filter(|rel| rel.checked_add(n).is_some_and(|end| end <= self.len))
            .ok_or_else(|| proto("reply chunk outside the requested range"))?;
        if self.failure.is_none() && rel != self.delivered {
            return Err(proto("read reply chunks out of order"));
        }
        Ok(rel)
    }

    /// Moves `n` bytes of data from the socket to the sink at `rel`.
    fn copy_in(
        &mut self,
        s: &mut dyn ReplyInput,
        sink: &mut Sink<'_>,
        rel: u64,
        n: u64,
    ) -> Result<(), ClientError> {
        let deliver = self.failure.is_none();
        match sink {
            Sink::Nothing | Sink::Extents { .. } => {
                return Err(proto("data for a request without data"))
            }
            Sink::Slice(b) => {
                let dst = range_mut(b, rel, n)?;
                self.read_exact(s, dst)?;
            }
            Sink::Pipe(p) => {
                // Chunks arrive in order (checked by `place`); a failure's
                // data is read and dropped.
                let n = usize::try_from(n).map_err(|_| proto("reply length out of range"))?;
                if deliver {
                    s.splice_to(p, n).map_err(|e| io_error(e, self.timeout))?;
                } else {
                    let mut scratch = vec![0u8; n.min(1 << 20)];
                    let mut left = n;
                    while left > 0 {
                        let k = left.min(scratch.len());
                        self.read_exact(s, &mut scratch[..k])?;
                        left -= k;
                    }
                }
            }
            Sink::Writer { out, buf } => {
                if buf.is_empty() && n > 0 {
                    return Err(ClientError::Invalid("no buffer for read data".into()));
                }
                let mut left = n;
                while left > 0 {
                    let k = chunk_len(left, buf.len());
                    self.read_exact(s, &mut buf[..k])?;
                    if deliver {
                        out.write_all(&buf[..k]).map_err(ClientError::Output)?;
                    }
                    left -= k as u64;
                }
            }
        }
        if deliver {
            self.delivered += n;
        }
        Ok(())
    }

    /// Delivers `n` zero bytes at `rel` (a hole).
    fn zeroes(&mut self, sink: &mut Sink<'_>, rel: u64, n: u64) -> Result<(), ClientError> {
        if self.failure.is_some() {
            return Ok(());
        }
        match sink {
            Sink::Nothing | Sink::Extents { .. } => {
                return Err(proto("hole for a request without data"))
            }
            Sink::Slice(b) => range_mut(b, rel, n)?.fill(0),
            Sink::Pipe(p) => {
                let n = usize::try_from(n).map_err(|_| proto("reply length out of range"))?;
                p.zeroes(n).map_err(ClientError::Output)?;
            }
            Sink::Writer { out, buf } => {
                if buf.is_empty() && n > 0 {
                    return Err(ClientError::Invalid("no buffer for read data".into()));
                }
                let zero_len = chunk_len(n, buf.len());
                buf[..zero_len].fill(0);
                let mut left = n;
                while left > 0 {
                    let k = chunk_len(left, zero_len);
                    out.write_all(&buf[..k]).map_err(ClientError::Output)?;
                    left -= k as u64;
                }
            }
        }
        self.delivered += n;
        Ok(())
    }

    fn read_exact(&self, s: &mut dyn ReplyInput, buf: &mut [u8]) -> Result<(), ClientError> {
        s.read_exact(buf).map_err(|e| io_error(e, self.timeout))
    }
}

fn range_mut(b: &mut [u8], rel: u64, n: u64) -> Result<&mut [u8], ClientError> {
    let start = usize::try_from(rel).map_err(|_| proto("reply offset out of range"))?;
    let end = usize::try_from(n)
        .ok()
        .and_then(|n| start.checked_add(n))
        .ok_or_else(|| proto("reply length out of range"))?;
    b.get_mut(start..end)
        .ok_or_else(|| proto("reply chunk outside the buffer"))
}

/// `min(left, cap)` as a usize (`cap` is never 0 for a non-empty buffer).
fn chunk_len(left: u64, cap: usize) -> usize {
    usize::try_from(left).map_or(cap, |l| l.min(cap))
}

fn proto(msg: &str) -> ClientError {
    ClientError::Protocol(msg.to_owned())
}
