//! Fake NBD peers for the migration fault tests, written from the protocol
//! text (independent of the crate's encoders):
//!
//! - [`FakeDest`]: a destination server (fixed newstyle, or old-style as
//!   either era of the C flexnbd: [`Era`]) that keeps an in-memory image,
//!   records what each connection sent, and misbehaves at one configured
//!   point per connection ([`Fault`]);
//! - [`Sender`]: a hand-driven migration sender for `flexnbd listen` that can
//!   stop at any byte, and [`c_source`], a sender that migrates an image the
//!   way each era of the C flexnbd does.
//!
//! Everything is bounded: sockets have timeouts, hanging connections are shut
//! down when the fake is dropped, threads are joined.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// The wire constants and header helpers shared with the other protocol tests.
use crate::common::{
    be16, be32, be64, request, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE,
    CMD_WRITE_ZEROES, EINVAL, ENOSPC, IHAVEOPT, NBDMAGIC, OLDSTYLE_MAGIC, OPT_ABORT,
    OPT_EXPORT_NAME, OPT_GO, OPT_INFO, REPLY_MAGIC, REP_ACK, REP_ERR_UNSUP, REP_INFO,
    REQUEST_MAGIC, SIMPLE_MAGIC,
};

pub const FLAG_HAS_FLAGS: u16 = 1;
pub const FLAG_SEND_FLUSH: u16 = 4;
pub const FLAG_SEND_FUA: u16 = 8;
pub const FLAG_SEND_TRIM: u16 = 32;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 64;
/// What the C flexnbd advertises (old-style): has-flags, flush, FUA.
pub const C_FLAGS: u16 = 0x0d;
/// The listen-era C flexnbd's ENTRUST request: its 32-bit type field.
pub const ENTRUST_TYPE: u32 = 0x0001_0000;

/// Which C flexnbd an old-style fake (or [`c_source`]) behaves as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Era {
    /// Mid-2012, the listen/rebind era: a 32-bit request type; ENTRUST
    /// (`0x10000`) is answered with error 0 and marks the connection
    /// entrusted; only a DISC on an entrusted connection hands the image over.
    ListenRebind,
    /// 0.5.0: 16-bit flags and type, so ENTRUST reads as a zero-length READ
    /// with FUA (answered with success); a DISC after the data hands over.
    V050,
}

/// How long a fake waits for a peer's bytes before giving up on it.
const PEER_TIMEOUT: Duration = Duration::from_secs(120);

/// The 152-byte old-style greeting.
pub fn oldstyle_greeting(size: u64, flags: u32) -> Vec<u8> {
    let mut g = Vec::with_capacity(152);
    g.extend_from_slice(&NBDMAGIC.to_be_bytes());
    g.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
    g.extend_from_slice(&size.to_be_bytes());
    g.extend_from_slice(&flags.to_be_bytes());
    g.extend_from_slice(&[0u8; 124]);
    g
}

fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

fn opt_reply(opt: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

// ---------------------------------------------------------------- destination

/// Where one connection of a [`FakeDest`] misbehaves. "Writes" count WRITE
/// and WRITE_ZEROES requests, 1-based.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Serves correctly.
    None,
    /// Accepts and never sends a greeting (keeps the socket open).
    HangBeforeGreeting,
    /// Closes the connection as soon as it is accepted (nothing sent).
    CloseAtAccept,
    /// Sends the greeting, then closes before option haggling.
    CloseAfterGreeting,
    /// Sends a greeting whose magic is wrong.
    BadMagic,
    /// Advertises a size this many bytes larger than the image.
    WrongSize(u64),
    /// Takes in write N (payload included) and closes without replying to it.
    CloseAtWrite(u64),
    /// Takes in write N and stops reading and replying (socket stays open).
    HangAtWrite(u64),
    /// Answers write N with this error (not applying it) and serves on.
    ErrorAtWrite(u64, u32),
    /// Answers write N (applied) with a cookie that was never sent.
    WrongCookieAtWrite(u64),
    /// Answers the first FLUSH with this error.
    ErrorAtFlush(u32),
    /// Closes when the first FLUSH arrives (without replying).
    CloseAtFlush,
    /// Stops reading and replying when the first FLUSH arrives.
    HangAtFlush,
    /// Answers the first FLUSH successfully after this many milliseconds.
    SlowFlush(u64),
    /// Serves correctly until [`FakeDest::trip`], then closes at the next request.
    CloseWhenTripped,
    /// Serves correctly until [`FakeDest::trip`], then stops reading and
    /// replying at the next request (socket stays open).
    HangWhenTripped,
    /// (Listen era) answers ENTRUST with this error.
    ErrorAtEntrust(u32),
    /// (Listen era) closes when ENTRUST arrives, without replying.
    CloseAtEntrust,
}

/// How a [`FakeDest`] behaves.
#[derive(Debug, Clone)]
pub struct DestConfig {
    pub size: u64,
    /// Old-style greeting (152 bytes) instead of fixed newstyle.
    pub oldstyle: bool,
    /// How an old-style fake reads request types and when it takes control.
    pub era: Era,
    /// Transmission flags advertised.
    pub flags: u16,
    /// Fault of connection i (0-based); connections beyond use `then`.
    pub faults: Vec<Fault>,
    pub then: Fault,
}

impl DestConfig {
    /// A well-behaved fixed-newstyle destination with WRITE_ZEROES and FLUSH.
    pub fn newstyle(size: u64) -> DestConfig {
        DestConfig {
            size,
            oldstyle: false,
            era: Era::V050,
            flags: FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES,
            faults: Vec::new(),
            then: Fault::None,
        }
    }

    /// An old-style destination like the C flexnbd 0.5.0 (flags 0x0D).
    pub fn oldstyle(size: u64) -> DestConfig {
        DestConfig {
            oldstyle: true,
            flags: C_FLAGS,
            ..DestConfig::newstyle(size)
        }
    }

    /// An old-style destination like the listen-era C flexnbd: it takes
    /// control only after ENTRUST and DISC.
    pub fn listen_era(size: u64) -> DestConfig {
        DestConfig {
            era: Era::ListenRebind,
            ..DestConfig::oldstyle(size)
        }
    }

    pub fn faults(mut self, f: &[Fault]) -> DestConfig {
        self.faults = f.to_vec();
        self
    }

    /// Every connection (after those in `faults`) gets `f`.
    pub fn then(mut self, f: Fault) -> DestConfig {
        self.then = f;
        self
    }

    fn fault(&self, conn: usize) -> Fault {
        self.faults.get(conn).cloned().unwrap_or(self.then.clone())
    }
}

/// What one connection did.
#[derive(Debug, Clone, Default)]
pub struct ConnRecord {
    pub fault: Option<Fault>,
    /// Reached the transmission phase.
    pub negotiated: bool,
    pub writes: u64,
    pub write_bytes: u64,
    pub zeroes: u64,
    pub zero_bytes: u64,
    pub flushes: u64,
    pub reads: u64,
    /// ENTRUST requests seen (listen era) and answered with success.
    pub entrusts: u64,
    pub entrusted: bool,
    /// A zero-length READ with FUA (how 0.5.0 reads ENTRUST) came before DISC.
    pub empty_fua_read: bool,
    pub disc: bool,
    /// What came in, in order: "W" write, "Z" write zeroes, "F" flush, "E"
    /// ENTRUST, "D" DISC (consecutive repeats collapsed).
    pub sequence: String,
    /// Bytes of the image this connection's WRITEs and WRITE_ZEROES covered.
    pub covered: u64,
    /// How it ended.
    pub end: String,
}

struct State {
    data: Vec<u8>,
    conns: Vec<ConnRecord>,
    /// Image contents when a connection handed the image over: DISC having
    /// covered everything (after ENTRUST, in the listen era).
    completed: Option<Vec<u8>>,
}

struct Inner {
    cfg: DestConfig,
    state: Mutex<State>,
    cv: Condvar,
    stop: AtomicBool,
    tripped: AtomicBool,
    streams: Mutex<Vec<TcpStream>>,
}

/// A fake migration destination on 127.0.0.1 (port picked by the OS).
pub struct FakeDest {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    accept: Option<JoinHandle<()>>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl FakeDest {
    pub fn start(cfg: DestConfig) -> FakeDest {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind fake destination");
        FakeDest::start_on(l, cfg)
    }

    pub fn start_on(l: TcpListener, cfg: DestConfig) -> FakeDest {
        let addr = l.local_addr().unwrap();
        l.set_nonblocking(true).unwrap();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                data: vec![0u8; cfg.size as usize],
                conns: Vec::new(),
                completed: None,
            }),
            cfg,
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            tripped: AtomicBool::new(false),
            streams: Mutex::new(Vec::new()),
        });
        let workers: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (i2, w2) = (inner.clone(), workers.clone());
        let accept = std::thread::spawn(move || {
            while !i2.stop.load(SeqCst) {
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        let n = {
                            let mut st = i2.state.lock().unwrap();
                            st.conns.push(ConnRecord::default());
                            st.conns.len() - 1
                        };
                        i2.streams.lock().unwrap().push(s.try_clone().unwrap());
                        i2.cv.notify_all();
                        let i3 = i2.clone();
                        let h = std::thread::spawn(move || i3.serve(n, s));
                        w2.lock().unwrap().push(h);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeDest {
            addr,
            inner,
            accept: Some(accept),
            workers,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Arms the `*WhenTripped` faults.
    pub fn trip(&self) {
        self.inner.tripped.store(true, SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.inner.state.lock().unwrap().conns.len()
    }

    pub fn records(&self) -> Vec<ConnRecord> {
        self.inner.state.lock().unwrap().conns.clone()
    }

    pub fn data(&self) -> Vec<u8> {
        self.inner.state.lock().unwrap().data.clone()
    }

    /// Waits until `cond` holds on the records (or the timeout passes).
    pub fn wait_for(&self, timeout: Duration, cond: impl Fn(&[ConnRecord]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.state.lock().unwrap();
        loop {
            if cond(&st.conns) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self.inner.cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// Waits for a connection that covered the whole image and sent DISC;
    /// returns the image as it was then.
    pub fn wait_completed(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut st = self.inner.state.lock().unwrap();
        loop {
            if let Some(d) = &st.completed {
                return Some(d.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = self.inner.cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }
}

impl Drop for FakeDest {
    fn drop(&mut self) {
        self.inner.stop.store(true, SeqCst);
        self.inner.cv.notify_all();
        for s in self.inner.streams.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        let ws: Vec<_> = self.workers.lock().unwrap().drain(..).collect();
        for w in ws {
            let _ = w.join();
        }
    }
}

/// The bytes a connection's writes covered: disjoint merged ranges
/// (start -> end), kept merged as writes arrive.
#[derive(Default)]
struct Covered(BTreeMap<u64, u64>);

impl Covered {
    fn add(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (mut start, mut end) = (off, off + len);
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.0.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.0.range(start..=end).next() {
            end = end.max(e);
            self.0.remove(&s);
        }
        self.0.insert(start, end);
    }

    /// Bytes covered within `[0, size)`.
    fn within(&self, size: u64) -> u64 {
        self.0
            .iter()
            .map(|(&s, &e)| e.min(size).saturating_sub(s.min(size)))
            .sum()
    }
}

impl Inner {
    fn record(&self, n: usize, f: impl FnOnce(&mut ConnRecord)) {
        let mut st = self.state.lock().unwrap();
        f(&mut st.conns[n]);
        drop(st);
        self.cv.notify_all();
    }

    /// Appends a request kind to the connection's sequence (collapsing repeats).
    fn note(&self, n: usize, c: char) {
        self.record(n, |r| {
            if !r.sequence.ends_with(c) {
                r.sequence.push(c);
            }
        });
    }

    /// Blocks (without reading) until the fake is dropped.
    fn hang(&self) {
        let mut st = self.state.lock().unwrap();
        while !self.stop.load(SeqCst) {
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap()
                .0;
        }
    }

    fn serve(&self, n: usize, mut s: TcpStream) {
        let fault = self.cfg.fault(n);
        self.record(n, |r| r.fault = Some(fault.clone()));
        let _ = s.set_read_timeout(Some(PEER_TIMEOUT));
        let _ = s.set_write_timeout(Some(PEER_TIMEOUT));
        let _ = s.set_nodelay(true);
        let end = match self.session(n, &mut s, &fault) {
            Ok(why) => why,
            Err(e) => format!("error: {e}"),
        };
        self.record(n, |r| r.end = end);
        let _ = s.shutdown(Shutdown::Both);
    }

    fn session(&self, n: usize, s: &mut TcpStream, fault: &Fault) -> std::io::Result<String> {
        let size = match fault {
            Fault::WrongSize(d) => self.cfg.size + d,
            _ => self.cfg.size,
        };
        match fault {
            Fault::HangBeforeGreeting => {
                self.hang();
                return Ok("hung before the greeting".into());
            }
            Fault::CloseAtAccept => return Ok("closed at accept".into()),
            Fault::BadMagic => {
                let mut g = oldstyle_greeting(size, self.cfg.flags as u32);
                g[0] ^= 0x20; // "nBDMAGIC"
                s.write_all(&g)?;
                let mut b = [0u8; 64];
                let _ = s.read(&mut b);
                return Ok("sent a bad magic".into());
            }
            _ => {}
        }
        if self.cfg.oldstyle {
            s.write_all(&oldstyle_greeting(size, self.cfg.flags as u32))?;
        } else {
            let mut g = Vec::new();
            g.extend_from_slice(&NBDMAGIC.to_be_bytes());
            g.extend_from_slice(&IHAVEOPT.to_be_bytes());
            g.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
            s.write_all(&g)?;
            if *fault == Fault::CloseAfterGreeting {
                return Ok("closed after the greeting".into());
            }
            if !self.haggle(s, size)? {
                return Ok("aborted during option haggling".into());
            }
        }
        if self.cfg.oldstyle && *fault == Fault::CloseAfterGreeting {
            return Ok("closed after the greeting".into());
        }
        self.record(n, |r| r.negotiated = true);
        self.transmission(n, s, fault, size)
    }

    /// Option haggling; true when the transmission phase begins.
    fn haggle(&self, s: &mut TcpStream, size: u64) -> std::io::Result<bool> {
        let mut cf = [0u8; 4];
        s.read_exact(&mut cf)?;
        let no_zeroes = be32(&cf, 0) & 2 != 0;
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h)?;
            if be64(&h, 0) != IHAVEOPT {
                return Err(std::io::Error::other("bad option magic"));
            }
            let opt = be32(&h, 8);
            let len = be32(&h, 12) as usize;
            if len > 1 << 20 {
                return Err(std::io::Error::other("option too long"));
            }
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            match opt {
                OPT_EXPORT_NAME => {
                    let mut b = Vec::new();
                    b.extend_from_slice(&size.to_be_bytes());
                    b.extend_from_slice(&self.cfg.flags.to_be_bytes());
                    if !no_zeroes {
                        b.extend_from_slice(&[0u8; 124]);
                    }
                    s.write_all(&b)?;
                    return Ok(true);
                }
                OPT_GO | OPT_INFO => {
                    let mut info = Vec::new();
                    info.extend_from_slice(&0u16.to_be_bytes()); // NBD_INFO_EXPORT
                    info.extend_from_slice(&size.to_be_bytes());
                    info.extend_from_slice(&self.cfg.flags.to_be_bytes());
                    s.write_all(&opt_reply(opt, REP_INFO, &info))?;
                    s.write_all(&opt_reply(opt, REP_ACK, &[]))?;
                    if opt == OPT_GO {
                        return Ok(true);
                    }
                }
                OPT_ABORT => {
                    let _ = s.write_all(&opt_reply(opt, REP_ACK, &[]));
                    return Ok(false);
                }
                _ => s.write_all(&opt_reply(opt, REP_ERR_UNSUP, &[]))?,
            }
        }
    }

    fn transmission(
        &self,
        n: usize,
        s: &mut TcpStream,
        fault: &Fault,
        size: u64,
    ) -> std::io::Result<String> {
        let mut writes = 0u64;
        let mut ranges = Covered::default();
        let mut payload = Vec::new();
        loop {
            let mut h = [0u8; 28];
            match s.read_exact(&mut h) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok("sender closed".into())
                }
                Err(e) => return Err(e),
            }
            if be32(&h, 0) != REQUEST_MAGIC {
                return Err(std::io::Error::other("bad request magic"));
            }
            if self.tripped.load(SeqCst) {
                match fault {
                    Fault::CloseWhenTripped => return Ok("closed when tripped".into()),
                    Fault::HangWhenTripped => {
                        self.hang();
                        return Ok("hung when tripped".into());
                    }
                    _ => {}
                }
            }
            let cmd = be16(&h, 6);
            let cookie = be64(&h, 8);
            if self.cfg.oldstyle && self.cfg.era == Era::ListenRebind && be32(&h, 4) == ENTRUST_TYPE
            {
                self.note(n, 'E');
                match fault {
                    Fault::CloseAtEntrust => return Ok("closed at ENTRUST".into()),
                    Fault::ErrorAtEntrust(e) => {
                        s.write_all(&simple_reply(*e, cookie))?;
                        continue;
                    }
                    _ => {}
                }
                self.record(n, |r| {
                    r.entrusts += 1;
                    r.entrusted = true;
                });
                s.write_all(&simple_reply(0, cookie))?;
                continue;
            }
            let off = be64(&h, 16);
            let len = be32(&h, 24) as u64;
            let in_range = off.checked_add(len).is_some_and(|e| e <= self.cfg.size);
            match cmd {
                CMD_WRITE | CMD_WRITE_ZEROES => {
                    self.note(n, if cmd == CMD_WRITE { 'W' } else { 'Z' });
                    if cmd == CMD_WRITE {
                        payload.resize(len as usize, 0);
                        s.read_exact(&mut payload)?;
                    }
                    writes += 1;
                    let this = writes;
                    match fault {
                        Fault::CloseAtWrite(k) if *k == this => {
                            self.record(n, |r| r.writes = this);
                            return Ok(format!("closed at write {this}"));
                        }
                        Fault::HangAtWrite(k) if *k == this => {
                            self.record(n, |r| r.writes = this);
                            self.hang();
                            return Ok(format!("hung at write {this}"));
                        }
                        Fault::ErrorAtWrite(k, errno) if *k == this => {
                            self.record(n, |r| r.writes = this);
                            s.write_all(&simple_reply(*errno, cookie))?;
                            continue;
                        }
                        _ => {}
                    }
                    let err = if !in_range {
                        ENOSPC
                    } else {
                        let mut st = self.state.lock().unwrap();
                        let d = &mut st.data[off as usize..(off + len) as usize];
                        if cmd == CMD_WRITE {
                            d.copy_from_slice(&payload);
                        } else {
                            d.fill(0);
                        }
                        0
                    };
                    if err == 0 {
                        ranges.add(off, len);
                    }
                    let cov = ranges.within(self.cfg.size);
                    self.record(n, |r| {
                        r.writes = this;
                        if cmd == CMD_WRITE {
                            r.write_bytes += len;
                        } else {
                            r.zeroes += 1;
                            r.zero_bytes += len;
                        }
                        r.covered = cov;
                    });
                    let reply_cookie = match fault {
                        Fault::WrongCookieAtWrite(k) if *k == this => cookie ^ 0x5a5a_0000_0000,
                        _ => cookie,
                    };
                    s.write_all(&simple_reply(err, reply_cookie))?;
                }
                CMD_READ => {
                    let fua_empty = be16(&h, 4) == 1 && len == 0;
                    self.record(n, |r| {
                        r.reads += 1;
                        r.empty_fua_read |= fua_empty;
                    });
                    if !in_range || len > 32 << 20 {
                        s.write_all(&simple_reply(EINVAL, cookie))?;
                    } else {
                        let mut b = simple_reply(0, cookie).to_vec();
                        let st = self.state.lock().unwrap();
                        b.extend_from_slice(&st.data[off as usize..(off + len) as usize]);
                        drop(st);
                        s.write_all(&b)?;
                    }
                }
                CMD_FLUSH => {
                    self.note(n, 'F');
                    self.record(n, |r| r.flushes += 1);
                    match fault {
                        Fault::CloseAtFlush => return Ok("closed at the flush".into()),
                        Fault::HangAtFlush => {
                            self.hang();
                            return Ok("hung at the flush".into());
                        }
                        Fault::ErrorAtFlush(e) => s.write_all(&simple_reply(*e, cookie))?,
                        Fault::SlowFlush(ms) => {
                            std::thread::sleep(Duration::from_millis(*ms));
                            s.write_all(&simple_reply(0, cookie))?
                        }
                        _ => s.write_all(&simple_reply(0, cookie))?,
                    }
                }
                CMD_TRIM => {
                    if in_range {
                        let mut st = self.state.lock().unwrap();
                        st.data[off as usize..(off + len) as usize].fill(0);
                    }
                    s.write_all(&simple_reply(if in_range { 0 } else { EINVAL }, cookie))?;
                }
                CMD_DISC => {
                    self.note(n, 'D');
                    let mut complete = ranges.within(self.cfg.size) == self.cfg.size;
                    {
                        let mut st = self.state.lock().unwrap();
                        st.conns[n].disc = true;
                        if self.cfg.oldstyle && self.cfg.era == Era::ListenRebind {
                            complete &= st.conns[n].entrusted;
                        }
                        if complete && size == self.cfg.size {
                            st.completed = Some(st.data.clone());
                        }
                    }
                    self.cv.notify_all();
                    return Ok("disconnected (DISC)".into());
                }
                _ => s.write_all(&simple_reply(EINVAL, cookie))?,
            }
        }
    }
}

// ---------------------------------------------------------------- sender

/// A hand-driven migration sender (the client side of NBD) for tests of
/// `flexnbd listen`; every read is bounded.
pub struct Sender {
    pub s: TcpStream,
}

/// The greeting a sender saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Greeting {
    Newstyle { flags: u16 },
    Oldstyle { size: u64, flags: u32, raw: Vec<u8> },
}

impl Sender {
    pub fn connect(addr: SocketAddr) -> Sender {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
        Sender::from_stream(s)
    }

    pub fn from_stream(s: TcpStream) -> Sender {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
        let _ = s.set_nodelay(true);
        Sender { s }
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send to listener");
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("read from listener");
        b
    }

    /// Everything until the peer closes (bounded by the read timeout).
    pub fn read_to_close(&mut self) -> std::io::Result<Vec<u8>> {
        let mut v = Vec::new();
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return Ok(v),
                Ok(k) => v.extend_from_slice(&b[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(v),
                Err(e) => return Err(e),
            }
        }
    }

    pub fn greeting(&mut self) -> Greeting {
        let g = self.read_exact(16);
        assert_eq!(be64(&g, 0), NBDMAGIC, "greeting magic");
        match be64(&g, 8) {
            IHAVEOPT => Greeting::Newstyle {
                flags: be16(&self.read_exact(2), 0),
            },
            OLDSTYLE_MAGIC => {
                let rest = self.read_exact(152 - 16);
                let mut raw = g.clone();
                raw.extend_from_slice(&rest);
                Greeting::Oldstyle {
                    size: be64(&raw, 16),
                    flags: be32(&raw, 24),
                    raw,
                }
            }
            m => panic!("unknown greeting magic {m:#x}"),
        }
    }

    /// Newstyle handshake up to the transmission phase (NBD_OPT_GO, simple
    /// replies); returns (size, transmission flags).
    pub fn handshake(addr: SocketAddr) -> (Sender, u64, u16) {
        let mut c = Sender::connect(addr);
        match c.greeting() {
            Greeting::Newstyle { flags } => assert_eq!(flags & 1, 1, "fixed newstyle"),
            g => panic!("expected a newstyle greeting, got {g:?}"),
        }
        c.send(&3u32.to_be_bytes());
        let mut go = Vec::new();
        go.extend_from_slice(&IHAVEOPT.to_be_bytes());
        go.extend_from_slice(&OPT_GO.to_be_bytes());
        go.extend_from_slice(&6u32.to_be_bytes());
        go.extend_from_slice(&[0u8; 6]); // empty name, no info requests
        c.send(&go);
        let mut export = None;
        loop {
            let h = c.read_exact(20);
            assert_eq!(be64(&h, 0), REPLY_MAGIC);
            let kind = be32(&h, 12);
            let data = c.read_exact(be32(&h, 16) as usize);
            match kind {
                REP_INFO if be16(&data, 0) == 0 => export = Some((be64(&data, 2), be16(&data, 10))),
                REP_INFO => {}
                REP_ACK => break,
                k => panic!("NBD_OPT_GO refused: {k:#x}"),
            }
        }
        let (size, flags) = export.expect("NBD_INFO_EXPORT");
        (c, size, flags)
    }

    pub fn req(&mut self, cmd: u16, cookie: u64, off: u64, len: u32) {
        self.send(&request(cmd, 0, cookie, off, len));
    }

    /// Reads a simple reply: (error, cookie).
    pub fn reply(&mut self) -> (u32, u64) {
        let r = self.read_exact(16);
        assert_eq!(be32(&r, 0), SIMPLE_MAGIC, "simple reply magic");
        (be32(&r, 4), be64(&r, 8))
    }

    /// WRITE and its reply's error.
    pub fn write(&mut self, cookie: u64, off: u64, data: &[u8]) -> u32 {
        let mut b = request(CMD_WRITE, 0, cookie, off, data.len() as u32).to_vec();
        b.extend_from_slice(data);
        self.send(&b);
        let (e, c) = self.reply();
        assert_eq!(c, cookie, "cookie echoed");
        e
    }

    /// Writes `data` at 0 in pieces of `piece` bytes, pipelined, then
    /// collects the replies; all must succeed.
    pub fn write_all_pipelined(&mut self, data: &[u8], piece: usize) {
        let mut n = 0u64;
        for (i, c) in data.chunks(piece).enumerate() {
            let mut b = request(
                CMD_WRITE,
                0,
                i as u64 + 1,
                (i * piece) as u64,
                c.len() as u32,
            )
            .to_vec();
            b.extend_from_slice(c);
            self.send(&b);
            n += 1;
            // Keep at most 8 replies outstanding so neither side blocks.
            if n >= 8 {
                let (e, _) = self.reply();
                assert_eq!(e, 0, "write refused");
                n -= 1;
            }
        }
        for _ in 0..n {
            let (e, _) = self.reply();
            assert_eq!(e, 0, "write refused");
        }
    }

    pub fn disc(&mut self) {
        self.send(&request(CMD_DISC, 0, 0xd15c, 0, 0));
    }

    /// ENTRUST (the listen-era hand-over request) and its reply's error.
    pub fn entrust(&mut self, cookie: u64) -> u32 {
        let mut h = request(0, 0, cookie, 0, 0);
        h[4..8].copy_from_slice(&ENTRUST_TYPE.to_be_bytes());
        self.send(&h);
        let (e, c) = self.reply();
        assert_eq!(c, cookie, "ENTRUST's handle echoed");
        e
    }
}

/// Migrates `image` into the old-style server at `addr` as the C flexnbd
/// of `era` does: the 152-byte greeting (size checked), every byte of the
/// image as WRITEs of at most 8 MiB (holes included, as zero data), then
/// ENTRUST and its successful reply (listen era only), then DISC.
pub fn c_source(addr: SocketAddr, image: &[u8], era: Era) {
    let mut s = Sender::connect(addr);
    match s.greeting() {
        Greeting::Oldstyle { size, .. } => assert_eq!(size, image.len() as u64, "size"),
        g => panic!("the C flexnbd needs an old-style greeting, got {g:?}"),
    }
    s.write_all_pipelined(image, 8 << 20);
    if era == Era::ListenRebind {
        assert_eq!(s.entrust(0xe7), 0, "ENTRUST refused");
    }
    s.disc();
    let rest = s.read_to_close().expect("closed after DISC");
    assert!(rest.is_empty(), "{} bytes after DISC", rest.len());
}
