//! Pipelined use of a connection: a [`Sender`] that puts requests with
//! caller-chosen cookies on the wire and a [`Receiver`] that collects their
//! completions in whatever order the server answers, each on its own thread.
//! A READ's completion carries its data, a BLOCK_STATUS's its descriptors.

use super::input::{Input, Pipe, ReplyInput};
use super::reply::{read_header, ReplyState, Sink};
use super::transport::{ShutdownHandle, Stream};
use super::{io_error, unsupported, ClientError, ExportInfo, SMALL_WRITE};
use crate::proto::consts::*;
use crate::proto::{Command, ReplyHeader, Request};
use std::collections::HashMap;
use std::io::{IoSlice, Write};
use std::net::Shutdown;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// What the reply to a request in flight carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Nothing,
    /// READ data for `[offset, offset + len)`.
    Data {
        offset: u64,
        len: u32,
    },
    /// BLOCK_STATUS descriptors.
    Extents,
}

impl Expect {
    fn of(req: &Request) -> Expect {
        match req.command {
            Command::Read => Expect::Data {
                offset: req.offset,
                // The client sends READs of 32-bit lengths only.
                len: req.length as u32,
            },
            Command::BlockStatus => Expect::Extents,
            _ => Expect::Nothing,
        }
    }
}

/// The requests sent and not yet completed, by cookie.
#[derive(Debug, Default)]
struct InFlight(Mutex<HashMap<u64, Expect>>);

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Expect>> {
        // The set stays consistent even if a holder panicked.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The completion of one pipelined request.
#[derive(Debug)]
pub struct Completion {
    pub cookie: u64,
    /// `Err` is always [`ClientError::Nbd`]: the server refused this request.
    pub result: Result<(), ClientError>,
    /// What a successful READ or BLOCK_STATUS returned.
    pub body: Body,
}

/// The data a reply carried.
#[derive(Debug, Default)]
pub enum Body {
    #[default]
    Empty,
    /// A READ's data, holes as zeroes.
    Data(Vec<u8>),
    /// A READ's data (`len` bytes, holes as zeroes) waiting in the pipe set
    /// with [`Receiver::use_pipe`]: it must be taken out
    /// ([`Pipe::splice_out`], [`Pipe::read_out`] or [`Pipe::discard`])
    /// before the next [`Receiver::recv`].
    Piped { len: usize, pipe: Arc<Pipe> },
    /// BLOCK_STATUS descriptors: (length, flags).
    Extents(Vec<(u64, u32)>),
}

/// The sending half of a pipelined connection.
#[derive(Debug)]
pub struct Sender {
    stream: Arc<Stream>,
    info: ExportInfo,
    timeout: Duration,
    in_flight: Arc<InFlight>,
    scratch: Vec<u8>,
    /// Requests queued by [`Sender::queue`] and not yet written.
    queued: Vec<u8>,
}

/// Queued requests are written once they reach this size.
const QUEUE_CAP: usize = 256 * 1024;

/// The receiving half of a pipelined connection.
#[derive(Debug)]
pub struct Receiver {
    stream: Arc<Stream>,
    input: Input,
    /// READ data of at least [`PIPE_MIN`] bytes goes here, when set.
    pipe: Option<Arc<Pipe>>,
    info: ExportInfo,
    timeout: Duration,
    in_flight: Arc<InFlight>,
    partial: HashMap<u64, (ReplyState, Body)>,
    /// READ buffers given back with [`Receiver::recycle`].
    spare: Vec<Vec<u8>>,
}

/// READ buffers kept for reuse (large ones only: small ones are cheap).
const SPARE_BUFFERS: usize = 16;
const SPARE_MIN: usize = 64 * 1024;

pub(crate) fn split(
    stream: Arc<Stream>,
    info: ExportInfo,
    timeout: Duration,
) -> (Sender, Receiver) {
    let in_flight = Arc::new(InFlight::default());
    let sender = Sender {
        stream: Arc::clone(&stream),
        info,
        timeout,
        in_flight: Arc::clone(&in_flight),
        scratch: Vec::new(),
        queued: Vec::new(),
    };
    let receiver = Receiver {
        input: Input::new(Arc::clone(&stream)),
        pipe: None,
        stream,
        info,
        timeout,
        in_flight,
        partial: HashMap::new(),
        spare: Vec::new(),
    };
    (sender, receiver)
}

impl Sender {
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Number of requests sent and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().len()
    }

    /// A handle that shuts the connection down from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::clone(&self.stream))
    }

    /// Sends a WRITE of `data` at `offset`.
    pub fn write(
        &mut self,
        cookie: u64,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), ClientError> {
        let flags = match fua {
            true if !self.info.can_fua() => return Err(unsupported("FUA")),
            true => CMD_FLAG_FUA,
            false => 0,
        };
        let len = self.info.check_range(offset, data.len() as u64)?;
        self.send(
            Request::new(Command::Write, flags, cookie, offset, len),
            data,
        )
    }

    /// Sends a WRITE_ZEROES of `len` bytes at `offset`.
    pub fn write_zeroes(
        &mut self,
        cookie: u64,
        offset: u64,
        len: u64,
        no_hole: bool,
    ) -> Result<(), ClientError> {
        if !self.info.can_write_zeroes() {
            return Err(unsupported("WRITE_ZEROES"));
        }
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        let len = self.info.check_range(offset, len)?;
        self.send(
            Request::new(Command::WriteZeroes, flags, cookie, offset, len),
            &[],
        )
    }

    /// Sends a TRIM of `len` bytes at `offset`.
    pub fn trim(&mut self, cookie: u64, offset: u64, len: u64) -> Result<(), ClientError> {
        if !self.info.can_trim() {
            return Err(unsupported("TRIM"));
        }
        let len = self.info.check_range(offset, len)?;
        self.send(Request::new(Command::Trim, 0, cookie, offset, len), &[])
    }

    /// Sends a FLUSH.
    pub fn flush(&mut self, cookie: u64) -> Result<(), ClientError> {
        if !self.info.can_flush() {
            return Err(unsupported("FLUSH"));
        }
        self.send(Request::new(Command::Flush, 0, cookie, 0, 0), &[])
    }

    /// Sends ENTRUST, with which the listen-era C flexnbd ends a migration;
    /// it is answered like a zero-length READ.
    pub fn entrust(&mut self, cookie: u64) -> Result<(), ClientError> {
        self.send(Request::entrust(cookie), &[])
    }

    /// Sends a READ of `len` bytes at `offset`; the data comes with its completion.
    pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<(), ClientError> {
        self.info.check_range(offset, u64::from(len))?;
        self.send(
            Request::new(Command::Read, 0, cookie, offset, len.into()),
            &[],
        )
    }

    /// Sends any request as it is (the proxy forwards clients' requests this
    /// way): commands and flags the export did not advertise are refused.
    pub fn forward(&mut self, req: Request, payload: &[u8]) -> Result<(), ClientError> {
        self.queue(req, payload)?;
        self.send_queued()
    }

    /// [`forward`](Self::forward), except that a small request may wait in a
    /// buffer for the next ones, to go out in one write with them; the
    /// caller calls [`send_queued`](Self::send_queued) when no more follow at once.
    pub fn queue(&mut self, req: Request, payload: &[u8]) -> Result<(), ClientError> {
        let info = self.info;
        let has = |flag| info.flags & flag != 0;
        let ok = match req.command {
            Command::Read | Command::Write => true,
            Command::Flush => has(FLAG_SEND_FLUSH),
            Command::Trim => has(FLAG_SEND_TRIM),
            Command::WriteZeroes => has(FLAG_SEND_WRITE_ZEROES),
            Command::Cache => has(FLAG_SEND_CACHE),
            Command::BlockStatus => info.base_allocation.is_some(),
            _ => false,
        };
        if !ok {
            return Err(unsupported(req.command.name()));
        }
        if req.flags & CMD_FLAG_FUA != 0 && !info.can_fua() {
            return Err(unsupported("FUA"));
        }
        if req.command == Command::Write && payload.len() != req.length as usize {
            return Err(ClientError::Invalid(
                "payload length differs from the request's".into(),
            ));
        }
        self.info.check_range(req.offset, req.length)?;
        self.register(&req)?;
        if payload.len() <= SMALL_WRITE && self.queued.len() + payload.len() < QUEUE_CAP {
            self.queued.extend_from_slice(&self.info.header(&req));
            self.queued.extend_from_slice(payload);
            return Ok(());
        }
        self.send_queued()?;
        self.write_out(&req, payload)
    }

    /// Writes the requests [`queue`](Self::queue) held back.
    pub fn send_queued(&mut self) -> Result<(), ClientError> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let mut w = &*self.stream;
        let r = w.write_all(&self.queued).and_then(|_| w.flush());
        self.queued.clear();
        r.map_err(|e| io_error(e, Some(self.timeout)))
    }

    /// Sends NBD_CMD_DISC (which has no reply) and stops sending. The receiver
    /// still collects replies to earlier requests, then sees the end of the stream.
    pub fn disconnect(&mut self) -> Result<(), ClientError> {
        self.send_queued()?;
        let header = self.info.header(&Request::new(Command::Disc, 0, 0, 0, 0));
        let mut w = &*self.stream;
        w.write_all(&header)
            .and_then(|_| w.flush())
            .map_err(|e| io_error(e, Some(self.timeout)))?;
        self.stream.shutdown(Shutdown::Write);
        Ok(())
    }

    fn send(&mut self, req: Request, payload: &[u8]) -> Result<(), ClientError> {
        self.register(&req)?;
        self.send_queued()?;
        self.write_out(&req, payload)
    }

    /// Notes `req` as in flight.
    fn register(&mut self, req: &Request) -> Result<(), ClientError> {
        if self
            .in_flight
            .lock()
            .insert(req.cookie, Expect::of(req))
            .is_some()
        {
            return Err(ClientError::Invalid(format!(
                "cookie {:#x} is already in flight",
                req.cookie
            )));
        }
        Ok(())
    }

    /// Writes a request and its payload (in one write when small).
    fn write_out(&mut self, req: &Request, payload: &[u8]) -> Result<(), ClientError> {
        let header = self.info.header(req);
        let mut w = &*self.stream;
        let r = if !payload.is_empty() && payload.len() <= SMALL_WRITE {
            self.scratch.clear();
            self.scratch.extend_from_slice(&header);
            self.scratch.extend_from_slice(payload);
            w.write_all(&self.scratch)
        } else {
            // One vectored write: the header does not go out on its own
            // (a packet, and a wake-up of the server, for 28 bytes).
            let mut parts = [IoSlice::new(&header), IoSlice::new(payload)];
            let mut bufs = &mut parts[..];
            let mut r = Ok(());
            while !bufs.is_empty() {
                match w.write_vectored(bufs) {
                    Ok(0) => {
                        r = Err(std::io::ErrorKind::WriteZero.into());
                        break;
                    }
                    Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        r = Err(e);
                        break;
                    }
                }
            }
            r
        };
        r.and_then(|_| w.flush())
            .map_err(|e| io_error(e, Some(self.timeout)))
    }
}

impl Receiver {
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Number of requests sent and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().len()
    }

    /// A handle that shuts the connection down from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::clone(&self.stream))
    }

    /// Whether READ data can be moved off this connection with `splice(2)`
    /// (a plain socket, not TLS).
    pub fn can_splice(&self) -> bool {
        self.stream.plain_fd().is_some()
    }

    /// From now on, READ data of at least [`PIPE_MIN`] bytes that fits the
    /// pipe goes into it, to be passed on without a copy.
    pub fn use_pipe(&mut self, pipe: Pipe) {
        self.pipe = Some(Arc::new(pipe));
    }

    /// Gives a READ's data buffer back, to take the data of a later one.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() >= SPARE_MIN && self.spare.len() < SPARE_BUFFERS {
            self.spare.push(buf);
        }
    }

    /// Whether the next reply header has already arrived (so
    /// [`recv`](Self::recv) will not wait for the network to start it).
    pub fn reply_buffered(&self) -> bool {
        self.input.buffered() >= SIMPLE_REPLY_LEN
    }

    /// Waits for the next completed request. `Ok(None)`: the connection ended
    /// with nothing in flight (after a disconnect or a shutdown). While requests
    /// are in flight, silence longer than the request timeout is
    /// [`ClientError::Timeout`]. Any `Err` means the connection is finished.
    pub fn recv(&mut self) -> Result<Option<Completion>, ClientError> {
        let s: &mut dyn ReplyInput = &mut self.input;
        let timeout = Some(self.timeout);
        loop {
            let in_flight = &self.in_flight;
            let idle = || in_flight.lock().is_empty();
            let Some(h) = read_header(s, self.info.extended_headers, timeout, &idle)? else {
                return if idle() {
                    Ok(None)
                } else {
                    Err(ClientError::Closed)
                };
            };
            let cookie = h.cookie();
            let Some(expect) = self.in_flight.lock().get(&cookie).copied() else {
                return Err(ClientError::WrongHandle(cookie));
            };
            if !self.partial.is_empty() && !self.partial.contains_key(&cookie) {
                // Replies interleave: the pipe holds one reply at a time.
                unpipe(&mut self.partial)?;
            }
            let (mut state, mut body) = match self.partial.remove(&cookie) {
                Some(st) => st,
                None => match expect {
                    Expect::Data { offset, len } => (
                        ReplyState::new(offset, u64::from(len), timeout),
                        match &self.pipe {
                            Some(p)
                                if len as usize >= PIPE_MIN
                                    && len as usize <= p.capacity()
                                    && p.held() == 0 =>
                            {
                                Body::Piped {
                                    len: len as usize,
                                    pipe: p.clone(),
                                }
                            }
                            _ => Body::Data(take_buffer(&mut self.spare, len as usize)),
                        },
                    ),
                    Expect::Extents => (ReplyState::new(0, 1, timeout), Body::Extents(Vec::new())),
                    Expect::Nothing => (ReplyState::new(0, 0, timeout), Body::Empty),
                },
            };
            let context = self.info.base_allocation.unwrap_or(0);
            let mut sink = match &mut body {
                Body::Empty => Sink::Nothing,
                Body::Data(d) => Sink::Slice(d),
                Body::Piped { pipe, .. } => Sink::Pipe(pipe),
                Body::Extents(e) => Sink::Extents {
                    id: context,
                    out: e,
                },
            };
            let done = match h {
                ReplyHeader::Simple(r) => {
                    if state.started() {
                        return Err(ClientError::Protocol(
                            "simple reply after structured chunks".into(),
                        ));
                    }
                    state.simple(s, r, &mut sink)?;
                    true
                }
                ReplyHeader::Chunk(c) => {
                    if !self.info.structured_replies {
                        return Err(ClientError::Protocol(
                            "structured reply chunk without negotiation".into(),
                        ));
                    }
                    state.chunk(s, c, &mut sink)?
                }
            };
            if done {
                self.in_flight.lock().remove(&cookie);
                let result = state.outcome().map_err(|f| f.into_error());
                if result.is_err() {
                    if let Body::Piped { pipe, .. } = &body {
                        pipe.discard();
                    }
                    body = Body::Empty;
                }
                if !matches!(body, Body::Piped { .. }) {
                    self.input.read_ahead();
                }
                return Ok(Some(Completion {
                    cookie,
                    result,
                    body,
                }));
            }
            state.mark_started();
            self.partial.insert(cookie, (state, body));
        }
    }
}

/// A buffer of `len` bytes for READ data: a spare one large enough if there
/// is one (its old bytes are all overwritten: the reply must cover the whole
/// range, holes included), else a new one.
fn take_buffer(spare: &mut Vec<Vec<u8>>, len: usize) -> Vec<u8> {
    match spare.iter().position(|b| b.capacity() >= len) {
        Some(i) => {
            let mut b = spare.swap_remove(i);
            b.resize(len, 0);
            b
        }
        None => vec![0u8; len],
    }
}

/// READ data smaller than this is copied (a pipe costs two more system
/// calls per reply, which only pays for large data).
pub const PIPE_MIN: usize = 64 * 1024;

/// Turns a partial reply whose data is in the pipe into one in memory (when
/// another reply's chunks arrive in between).
fn unpipe(partial: &mut HashMap<u64, (ReplyState, Body)>) -> Result<(), ClientError> {
    for (_, body) in partial.values_mut() {
        if let Body::Piped { len, pipe } = body {
            let mut d = pipe.read_out(pipe.held()).map_err(ClientError::Io)?;
            d.resize(*len, 0);
            *body = Body::Data(d);
        }
    }
    Ok(())
}
