//! A negotiated client connection issuing one request at a time, with request
//! payloads (both directions) streamed through a bounded buffer.

use super::negotiate::negotiate;
use super::pipeline::{self, Receiver, Sender};
use super::reply::{read_header, Failure, ReplyState, Sink};
use super::transport::{self, ShutdownHandle, Stream};
use super::{
    io_error, unsupported, ClientError, ConnectOptions, ExportInfo, SMALL_WRITE, STREAM_CHUNK,
};
use crate::addr::Endpoint;
use crate::proto::consts::*;
use crate::proto::{Command, NbdErrno, ReplyHeader, Request};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::time::Duration;

/// How long to look for an error reply when the server stops taking a payload.
const EARLY_REPLY_WAIT: Duration = Duration::from_secs(1);

/// A connection in the transmission phase. Methods block until the reply arrives.
///
/// An error other than [`ClientError::Nbd`] or [`ClientError::Invalid`] leaves the
/// connection unusable: later requests fail with [`ClientError::Invalid`].
#[derive(Debug)]
pub struct Connection {
    stream: Arc<Stream>,
    info: ExportInfo,
    request_timeout: Option<Duration>,
    next_cookie: u64,
    broken: bool,
    buf: Vec<u8>,
}

impl Connection {
    /// Connects to `endpoint` and negotiates the export.
    pub fn connect(endpoint: &Endpoint, opts: &ConnectOptions) -> Result<Connection, ClientError> {
        let stream = transport::connect(endpoint, opts)?;
        let r = Connection::establish(stream, opts, &endpoint.tls_host());
        match &opts.cancel {
            Some(c) if c.finish() => Err(ClientError::Cancelled),
            _ => r,
        }
    }

    /// Negotiates the export on an already connected socket.
    pub(crate) fn establish(
        mut stream: Stream,
        opts: &ConnectOptions,
        host: &str,
    ) -> Result<Connection, ClientError> {
        let info = negotiate(&mut stream, opts, host)?;
        Ok(Connection {
            stream: Arc::new(stream),
            info,
            request_timeout: opts.request_timeout,
            next_cookie: 1,
            broken: false,
            buf: Vec::new(),
        })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Transmission flags (`NBD_FLAG_*`).
    pub fn flags(&self) -> u16 {
        self.info.flags
    }

    /// The server sent the old-style greeting.
    pub fn is_oldstyle(&self) -> bool {
        self.info.oldstyle
    }

    /// Structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.info.structured_replies
    }

    /// Gives the socket large buffers ([`crate::net::proxy_buffers`]), for a
    /// connection that data streams through.
    pub fn large_buffers(&self) {
        crate::net::proxy_buffers(self.stream.socket_fd());
    }

    /// A handle that shuts this connection down from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::clone(&self.stream))
    }

    /// Reads `buf.len()` bytes at `offset` in one request.
    pub fn read_into(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let req = self.request(Command::Read, 0, offset, buf.len() as u64)?;
        self.send(&req, &[])?;
        let r = self.wait(&req, &mut Sink::Slice(buf));
        self.finish(r)
    }

    /// Reads `len` bytes at `offset` in one request and streams them to `out`.
    /// With structured replies, data chunks must arrive in order.
    pub fn read_to(
        &mut self,
        offset: u64,
        len: u64,
        out: &mut dyn Write,
    ) -> Result<(), ClientError> {
        let req = self.request(Command::Read, 0, offset, len)?;
        self.send(&req, &[])?;
        let mut buf = self.take_buf(len);
        let r = self.wait(&req, &mut Sink::Writer { out, buf: &mut buf });
        self.buf = buf;
        self.finish(r)
    }

    /// Writes `data` at `offset` in one request.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let req = self.request(
            Command::Write,
            self.fua_flag(fua)?,
            offset,
            data.len() as u64,
        )?;
        self.send(&req, data)?;
        let r = self.wait(&req, &mut Sink::Nothing);
        self.finish(r)
    }

    /// Writes `len` bytes read from `input` at `offset` in one request. If `input`
    /// ends early or fails, the request cannot be completed and the connection is
    /// closed.
    pub fn write_from(
        &mut self,
        offset: u64,
        len: u64,
        input: &mut dyn Read,
        fua: bool,
    ) -> Result<(), ClientError> {
        let req = self.request(Command::Write, self.fua_flag(fua)?, offset, len)?;
        self.send(&req, &[])?;
        let mut buf = self.take_buf(len);
        let sent = self.stream_payload(input, len, &mut buf);
        self.buf = buf;
        if let Err(e) = sent {
            let e = match e {
                ClientError::Io(_) | ClientError::Closed => self.early_refusal(&req).unwrap_or(e),
                e => e,
            };
            self.fail();
            return Err(e);
        }
        let r = self.wait(&req, &mut Sink::Nothing);
        self.finish(r)
    }

    /// Zeroes `len` bytes at `offset`; with `no_hole` the server must allocate them.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        no_hole: bool,
    ) -> Result<(), ClientError> {
        if !self.info.can_write_zeroes() {
            return Err(unsupported("WRITE_ZEROES"));
        }
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        self.simple_command(Command::WriteZeroes, flags, offset, len)
    }

    /// Discards `len` bytes at `offset`.
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<(), ClientError> {
        if !self.info.can_trim() {
            return Err(unsupported("TRIM"));
        }
        self.simple_command(Command::Trim, 0, offset, len)
    }

    /// Asks the server to make completed writes durable.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        if !self.info.can_flush() {
            return Err(unsupported("FLUSH"));
        }
        self.simple_command(Command::Flush, 0, 0, 0)
    }

    /// Sends NBD_CMD_DISC and closes the connection.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        if self.broken {
            return Ok(());
        }
        let req = Request::new(Command::Disc, 0, self.cookie(), 0, 0);
        let r = self.send(&req, &[]);
        self.stream.shutdown(Shutdown::Both);
        r
    }

    /// Splits the connection for use from two threads: one sending requests, one
    /// collecting replies. `request_timeout` bounds each wait on the socket.
    pub fn into_pipeline(
        self,
        request_timeout: Duration,
    ) -> Result<(Sender, Receiver), ClientError> {
        self.usable()?;
        self.stream
            .set_read_timeout(Some(request_timeout))
            .and_then(|_| self.stream.set_write_timeout(Some(request_timeout)))
            .map_err(ClientError::Io)?;
        Ok(pipeline::split(self.stream, self.info, request_timeout))
    }

    fn simple_command(
        &mut self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Result<(), ClientError> {
        let req = self.request(cmd, flags, offset, len)?;
        self.send(&req, &[])?;
        let r = self.wait(&req, &mut Sink::Nothing);
        self.finish(r)
    }

    fn usable(&self) -> Result<(), ClientError> {
        if self.broken {
            return Err(ClientError::Invalid(
                "the connection failed earlier and is closed".into(),
            ));
        }
        Ok(())
    }

    fn fua_flag(&self, fua: bool) -> Result<u16, ClientError> {
        match fua {
            false => Ok(0),
            true if self.info.can_fua() => Ok(CMD_FLAG_FUA),
            true => Err(unsupported("FUA")),
        }
    }

    fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        c
    }

    fn request(
        &mut self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Result<Request, ClientError> {
        self.usable()?;
        let length = self.info.check_range(offset, len)?;
        Ok(Request::new(cmd, flags, self.cookie(), offset, length))
    }

    /// Sends a request header and (for WRITE) an in-memory payload.
    fn send(&mut self, req: &Request, payload: &[u8]) -> Result<(), ClientError> {
        let header = self.info.header(req);
        let mut w = &*self.stream;
        let r = if payload.len() <= SMALL_WRITE && !payload.is_empty() {
            let mut b = Vec::with_capacity(header.len() + payload.len());
            b.extend_from_slice(&header);
            b.extend_from_slice(payload);
            w.write_all(&b)
        } else {
            w.write_all(&header).and_then(|_| w.write_all(payload))
        };
        r.and_then(|_| w.flush()).map_err(|e| {
            self.fail();
            io_error(e, self.request_timeout)
        })
    }

    fn stream_payload(
        &self,
        input: &mut dyn Read,
        len: u64,
        buf: &mut [u8],
    ) -> Result<(), ClientError> {
        let mut w = &*self.stream;
        let mut sent = 0u64;
        while sent < len {
            let want = usize::try_from(len - sent).map_or(buf.len(), |l| l.min(buf.len()));
            let n = match input.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(ClientError::ShortInput {
                        expected: len,
                        got: sent,
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ClientError::Input(e)),
            };
            w.write_all(&buf[..n])
                .map_err(|e| io_error(e, self.request_timeout))?;
            sent += n as u64;
        }
        w.flush().map_err(|e| io_error(e, self.request_timeout))
    }

    /// After the server stopped taking a payload: its error reply, if it sent one.
    fn early_refusal(&self, req: &Request) -> Option<ClientError> {
        self.stream.set_read_timeout(Some(EARLY_REPLY_WAIT)).ok()?;
        match read_header(
            &mut &*self.stream,
            self.info.extended_headers,
            None,
            &|| false,
        ) {
            Ok(Some(ReplyHeader::Simple(r))) if r.cookie == req.cookie && r.error != 0 => {
                Some(ClientError::Nbd {
                    errno: NbdErrno::from_code(r.error),
                    message: None,
                })
            }
            _ => None,
        }
    }

    /// Waits for the complete reply to `req`.
    fn wait(&self, req: &Request, sink: &mut Sink<'_>) -> Result<Result<(), Failure>, ClientError> {
        let mut r: &Stream = &self.stream;
        let s: &mut dyn super::input::ReplyInput = &mut r;
        let mut state = ReplyState::new(req.offset, req.length, self.request_timeout);
        loop {
            let h = read_header(s, self.info.extended_headers, self.request_timeout, &|| {
                false
            })?
            .ok_or(ClientError::Closed)?;
            if h.cookie() != req.cookie {
                return Err(ClientError::WrongHandle(h.cookie()));
            }
            match h {
                ReplyHeader::Simple(r) => {
                    if state.started() {
                        return Err(ClientError::Protocol(
                            "simple reply after structured chunks".into(),
                        ));
                    }
                    state.simple(s, r, sink)?;
                    return Ok(state.outcome());
                }
                ReplyHeader::Chunk(c) => {
                    if !self.info.structured_replies {
                        return Err(ClientError::Protocol(
                            "structured reply chunk without negotiation".into(),
                        ));
                    }
                    if state.chunk(s, c, sink)? {
                        return Ok(state.outcome());
                    }
                    state.mark_started();
                }
            }
        }
    }

    fn finish(&mut self, r: Result<Result<(), Failure>, ClientError>) -> Result<(), ClientError> {
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(f)) => Err(f.into_error()),
            Err(e) => {
                self.fail();
                Err(e)
            }
        }
    }

    fn fail(&mut self) {
        self.broken = true;
        self.stream.shutdown(Shutdown::Both);
    }

    /// The streaming buffer, at most [`STREAM_CHUNK`] bytes and no larger than needed.
    fn take_buf(&mut self, len: u64) -> Vec<u8> {
        let want = usize::try_from(len).map_or(STREAM_CHUNK, |l| l.clamp(1, STREAM_CHUNK));
        let mut buf = std::mem::take(&mut self.buf);
        if buf.len() < want {
            buf.resize(want, 0);
        }
        buf
    }
}
