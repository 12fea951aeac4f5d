//! Executing a worker's batch against the export and building the replies.

use super::out::{MAX_BUFFERED_READ, OUT_CAP};
use super::reader::Reader;
use super::session::{Session, Worker, PAYLOAD_CAP, SLOW_REQUEST};
use super::validate::{Op, Refusal};
use super::zerocopy::ZERO_COPY_MIN;
use crate::export::{self, Export};
use crate::proto::consts::{STATE_HOLE, STATE_ZERO};
use crate::proto::reply::{Framing, Replies};
use crate::proto::{NbdErrno, Request};
use crate::server::handshake::{BASE_ALLOCATION_ID, MAX_PAYLOAD};
use crate::storage::{Extent, Fetch};
use std::io;
use std::sync::Arc;
use std::time::Instant;

/// Reads at least this long are checked for holes (sent as hole chunks).
const HOLE_READ_MIN: usize = 64 * 1024;
/// Most descriptors in one BLOCK_STATUS reply.
const MAX_EXTENTS: usize = 1 << 14;
/// Room kept for one error reply.
const ERROR_ROOM: usize = 4200;
/// Most chunks a structured read is split into (the rest of the read is
/// one more data chunk).
const MAX_READ_CHUNKS: usize = 64;

/// The one place that maps export errors to NBD errors.
pub fn errno(e: &export::Error) -> NbdErrno {
    match e {
        export::Error::ReadPastEnd => NbdErrno::Inval,
        export::Error::WritePastEnd => NbdErrno::NoSpc,
        export::Error::ReadOnly => NbdErrno::Perm,
        export::Error::NotFast => NbdErrno::NotSup,
        export::Error::Shutdown => NbdErrno::Shutdown,
        export::Error::Io(e) => NbdErrno::from_os(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

fn slow(op: &Op) -> bool {
    matches!(
        op,
        Op::Flush | Op::Write { fua: true } | Op::Trim { fua: true } | Op::Zero { fua: true, .. }
    )
}

impl Session {
    fn ensure_room(&self, w: &mut Worker, n: usize) -> io::Result<()> {
        if w.out.room() < n {
            w.out.send(&self.conn, &self.writer, self.send)?;
        }
        Ok(())
    }

    /// The replies to `req`, framed as agreed.
    pub(super) fn replies(&self, req: &Request) -> Replies {
        Replies::new(self.neg.framing, req.cookie, req.offset)
    }

    fn reply_ok(&self, w: &mut Worker, req: &Request) -> io::Result<()> {
        let head = self.replies(req).ok();
        self.ensure_room(w, head.len())?;
        w.out.push(&head);
        Ok(())
    }

    fn reply_err(
        &self,
        w: &mut Worker,
        req: &Request,
        errno: NbdErrno,
        msg: &str,
    ) -> io::Result<()> {
        self.metrics.error(errno);
        self.ensure_room(w, ERROR_ROOM)?;
        w.out.push(&self.replies(req).error(errno, msg));
        Ok(())
    }

    fn reply(&self, w: &mut Worker, req: &Request, r: Result<(), export::Error>) -> io::Result<()> {
        match r {
            Ok(()) => self.reply_ok(w, req),
            Err(e) => {
                let n = errno(&e);
                if matches!(e, export::Error::Io(_)) {
                    warn!("{}: request failed: {e}", self.name);
                }
                self.reply_err(w, req, n, &e.to_string())
            }
        }
    }

    /// Executes the gathered batch, appending replies to the worker's buffer.
    pub(super) fn execute(self: &Arc<Self>, w: &mut Worker) -> io::Result<()> {
        let batch = std::mem::take(&mut w.batch);
        let r = self.execute_items(w, &batch);
        w.batch = batch;
        r
    }

    fn execute_items(
        self: &Arc<Self>,
        w: &mut Worker,
        batch: &[super::session::Item],
    ) -> io::Result<()> {
        let ex: &Export = &self.export;
        for item in batch {
            let req = &item.req;
            let op = match item.op {
                Ok(Op::Disc) => continue,
                Ok(op) => op,
                Err(Refusal { errno, msg }) => {
                    self.reply_err(w, req, errno, msg)?;
                    continue;
                }
            };
            if slow(&op) {
                // Replies already made need not wait for the disk, nor other requests.
                w.out.send(&self.conn, &self.writer, self.send)?;
                self.slow_request_seen();
            }
            let gate = ex.gate();
            let entered = match gate.try_enter() {
                Some(p) => Ok(p),
                None => {
                    // Requests are held (a hand-over or a pause): replies made so
                    // far must not wait with them.
                    w.out.send(&self.conn, &self.writer, self.send)?;
                    gate.enter()
                }
            };
            let _pass = match entered {
                Ok(p) => p,
                Err(e) => {
                    self.reply(w, req, Err(e.into()))?;
                    continue;
                }
            };
            let (off, len) = (req.offset, req.length);
            let started = Instant::now();
            match op {
                Op::Read { .. } if req.is_entrust() && !self.neg.structured() => {
                    self.entrusted();
                    self.reply_ok(w, req)?;
                }
                Op::Read { df } => self.read(w, req, df)?,
                Op::Write { fua } => {
                    let data = &w.payload[item.at..item.at + req.length as usize];
                    let started = Instant::now();
                    let r = ex.write(data, off, fua);
                    self.timed(started);
                    if r.is_ok() {
                        self.covered(off, len);
                    }
                    self.reply(w, req, r)?;
                }
                Op::Flush => self.reply(w, req, ex.flush())?,
                Op::Trim { fua } => {
                    let r = ex.trim(off, len, fua);
                    if r.is_ok() {
                        self.covered(off, len);
                    }
                    self.reply(w, req, r)?;
                }
                Op::Zero { no_hole, fast, fua } => {
                    let r = ex.write_zeroes(off, len, no_hole, fast, fua);
                    if r.is_ok() {
                        self.covered(off, len);
                    }
                    self.reply(w, req, r)?;
                }
                Op::Cache => self.reply(w, req, ex.cache(off, len))?,
                Op::BlockStatus { one } => self.block_status(w, req, one)?,
                Op::Disc => {}
            }
            let covered = if matches!(op, Op::Flush) { 0 } else { len };
            self.metrics
                .request(req.command, covered, started.elapsed());
            if gate.is_closed() {
                // Whoever closed the gate waits for this pass: by then every
                // executed request's reply is on the wire, before any ESHUTDOWN.
                w.out.send(&self.conn, &self.writer, self.send)?;
            }
        }
        Ok(())
    }

    fn block_status(&self, w: &mut Worker, req: &Request, one: bool) -> io::Result<()> {
        let max = if one { 1 } else { MAX_EXTENTS };
        let ext = match self.export.extents(req.offset, req.length, max) {
            Ok(e) if !e.is_empty() => e,
            Ok(_) => vec![Extent {
                len: req.length,
                hole: false,
            }],
            Err(e) => return self.reply(w, req, Err(e)),
        };
        // Compact descriptors hold 32-bit lengths: a longer extent (from a
        // request over 4 GiB, extended headers only) is cut at 4 GiB - 4 KiB.
        let most = match self.neg.framing {
            Framing::Extended => u64::MAX,
            _ => u32::MAX as u64 & !0xfff,
        };
        let desc: Vec<(u64, u32)> = ext
            .iter()
            .map(|e| {
                let flags = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
                (e.len.min(most), flags)
            })
            .collect();
        let chunk = self
            .replies(req)
            .block_status(BASE_ALLOCATION_ID, &desc, true);
        if chunk.len() > OUT_CAP {
            w.out.send(&self.conn, &self.writer, self.send)?;
            let _g = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            return self.send_all(&chunk);
        }
        self.ensure_room(w, chunk.len())?;
        w.out.push(&chunk);
        Ok(())
    }

    /// Notes how long a request took at the storage; a slow one means the
    /// image is not (all) in memory, so requests should overlap. An image
    /// in memory is never slow: a long request there was preempted.
    fn timed(self: &Arc<Self>, started: Instant) {
        if started.elapsed() > SLOW_REQUEST && !self.export.in_memory() {
            self.slow_request_seen();
        }
    }

    fn read(self: &Arc<Self>, w: &mut Worker, req: &Request, df: bool) -> io::Result<()> {
        let len = req.length as usize;
        let structured = self.neg.structured();
        if structured && len == 0 {
            return self.reply_ok(w, req);
        }
        // Large reads go from the page cache to the socket unseen: ask first
        // whether the data is there, so a wait for the device overlaps
        // other requests as a buffered read's does.
        if len >= ZERO_COPY_MIN && self.export.residency(req.offset, len as u64) == Fetch::Device {
            self.slow_request_seen();
        }
        if structured && !df && len >= HOLE_READ_MIN {
            // Chunks on the real data/hole boundaries.
            let map = self
                .export
                .data_map(req.offset, len as u64, MAX_READ_CHUNKS)
                .unwrap_or_default();
            let all_data = map.len() <= 1 && map.first().is_none_or(|e| !e.hole);
            if !all_data {
                return match len > MAX_BUFFERED_READ {
                    true => self.stream_read(w, req, &map),
                    false => self.read_sparse(w, req, &map),
                };
            }
        }
        // Beyond the maximum payload (only the C flexnbd's `read` asks for
        // that much), data comes in chunks of at most that size.
        if structured && len > MAX_PAYLOAD as usize {
            let all = [Extent {
                len: len as u64,
                hole: false,
            }];
            return self.stream_read(w, req, &all);
        }
        // One data chunk (DF, up to the maximum payload), or a simple reply.
        if len >= ZERO_COPY_MIN || len > MAX_BUFFERED_READ {
            return self.read_zero_copy(w, req);
        }
        let head = self.replies(req).data(req.offset, len as u32, true);
        let hdr = head.len();
        self.ensure_room(w, hdr + len)?;
        let mark = w.out.mark();
        let slot = w.out.claim(hdr + len);
        let started = Instant::now();
        let r = self.export.read_fetch(&mut slot[hdr..], req.offset);
        match r {
            // The page cache says where the data was: a long read that found
            // it in memory was held up by the CPU, not by the storage.
            Ok(Fetch::Device) => self.slow_request_seen(),
            Ok(Fetch::Unknown) => self.timed(started),
            Ok(Fetch::Memory) | Err(_) => {}
        }
        match r {
            Ok(_) => {
                slot[..hdr].copy_from_slice(&head);
                Ok(())
            }
            Err(e) => {
                w.out.truncate(mark);
                self.reply(w, req, Err(e))
            }
        }
    }

    /// A structured read as hole and data chunks following the extents.
    fn read_sparse(&self, w: &mut Worker, req: &Request, ext: &[Extent]) -> io::Result<()> {
        let len = req.length;
        let r = self.replies(req);
        self.ensure_room(w, len as usize + 48 * (ext.len() + 1))?;
        let mark = w.out.mark();
        let mut pos = req.offset;
        let end = req.offset + len;
        let covered: u64 = ext.iter().map(|e| e.len).sum();
        // Extents may stop short; the rest is sent as data.
        let tail = (covered < len).then_some(Extent {
            len: len - covered,
            hole: false,
        });
        for e in ext.iter().copied().chain(tail) {
            let elen = e.len.min(end - pos);
            let last = pos + elen == end;
            if e.hole {
                w.out.push(&r.hole(pos, elen as u32, last));
            } else {
                let head = r.data(pos, elen as u32, last);
                let slot = w.out.claim(head.len() + elen as usize);
                if let Err(err) = self.export.read(&mut slot[head.len()..], pos) {
                    w.out.truncate(mark);
                    return self.reply(w, req, Err(err));
                }
                slot[..head.len()].copy_from_slice(&head);
            }
            pos += elen;
            if last {
                break;
            }
        }
        Ok(())
    }

    /// A structured read too large for the reply buffer, as hole and data
    /// chunks following `map`, the data straight from the page cache. Ends
    /// with a NONE chunk (a read error can still show up as the data goes out).
    fn stream_read(&self, w: &mut Worker, req: &Request, map: &[Extent]) -> io::Result<()> {
        w.out.send(&self.conn, &self.writer, self.send)?;
        let _g = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.replies(req);
        let mut pos = req.offset;
        for e in map {
            if e.hole {
                let mut left = e.len;
                while left > 0 {
                    let n = left.min(u32::MAX as u64 & !0xfff);
                    self.send_all(&r.hole(pos, n as u32, false))?;
                    pos += n;
                    left -= n;
                }
                continue;
            }
            let end = pos + e.len;
            while pos < end {
                let n = (end - pos).min(MAX_PAYLOAD as u64);
                self.send_header(&r.data(pos, n as u32, false))?;
                if let Err(err) = self.splice(pos, n as usize)? {
                    self.metrics.error(errno(&err));
                    return self.send_all(&r.error(errno(&err), &err.to_string()));
                }
                pos += n;
            }
        }
        self.send_all(&r.ok())
    }

    /// A write too large to gather, executed while its payload streams in.
    /// Called with the reader held; the reply goes to the worker's buffer.
    pub(super) fn stream_write(
        &self,
        rd: &mut Reader,
        w: &mut Worker,
        req: &Request,
    ) -> io::Result<()> {
        let fua = matches!(
            super::validate::validate(req, &self.neg, self.export.size(), self.export.read_only()),
            Ok(Op::Write { fua: true })
        );
        let started = Instant::now();
        if w.payload.len() < PAYLOAD_CAP {
            w.payload.resize(PAYLOAD_CAP, 0);
        }
        let pass = self.export.gate().enter();
        let mut result = pass
            .as_ref()
            .map(|_| ())
            .map_err(|_| export::Error::Shutdown);
        let end = req.offset + req.length;
        let mut pos = req.offset;
        while pos < end {
            let n = ((end - pos) as usize).min(PAYLOAD_CAP);
            if let Err(e) = rd.read_exact(&mut w.payload[..n]) {
                return Err(io::Error::other(e.to_string()));
            }
            if result.is_ok() {
                result = self.export.write(&w.payload[..n], pos, fua);
            }
            pos += n as u64;
        }
        drop(pass);
        if result.is_ok() {
            self.covered(req.offset, req.length);
        }
        let r = self.reply(w, req, result);
        self.metrics
            .request(req.command, req.length, started.elapsed());
        r
    }
}
