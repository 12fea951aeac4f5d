//! A fake old-style NBD upstream for the proxy fault tests, written from the
//! protocol text: an in-memory image shared by all its connections, every
//! request recorded per connection, and one scripted misbehaviour ([`Fault`])
//! on the first connection that gets a request (not the proxy's start-up
//! probe, which sends only DISC); later connections behave.
//!
//! Everything is bounded: sockets poll a stop flag, threads are joined on drop.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// HAS_FLAGS | SEND_FLUSH | SEND_FUA.
pub const FLAGS: u32 = 1 | 4 | 8;
/// A cookie the proxy never sends (its own are small sequence numbers).
pub const BAD_COOKIE: u64 = 0xbad0_c0de_0000_0001;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const READ: u16 = 0;
const WRITE: u16 = 1;
const DISC: u16 = 2;
const FLUSH: u16 = 3;
const EINVAL: u32 = 22;
/// How often blocked reads and the accept loop look at the stop flag.
const POLL: Duration = Duration::from_millis(20);

/// What the faulty connection does once it has read its batch of requests
/// (it never applies their writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Closes, answering nothing.
    Close,
    /// Sends 8 of the 16 bytes of the first request's reply, then closes.
    HalfHeader,
    /// Answers the batch's READ with its header and half its data, then closes.
    HalfData,
    /// Never answers; keeps the connection open until the peer closes it.
    Stall,
    /// Answers with a cookie that was never sent, then nothing more.
    WrongHandle,
    /// Closes; the next connection greets with this export size instead.
    Resize(u64),
    /// Stops listening for good, then closes.
    Vanish,
}

/// One request as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Req {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
    pub payload: Vec<u8>,
}

impl Req {
    /// Everything but the cookie (which is the proxy's own).
    pub fn key(&self) -> (u16, u16, u64, u32, &[u8]) {
        (
            self.flags,
            self.kind,
            self.offset,
            self.length,
            &self.payload,
        )
    }
}

/// One accepted connection: the size it was greeted with, what it received.
#[derive(Debug, Clone, Default)]
pub struct Conn {
    pub size: u64,
    pub requests: Vec<Req>,
}

#[derive(Default)]
struct State {
    conns: Vec<Conn>,
    /// The connection that misbehaved.
    faulty: Option<usize>,
    /// The wrong size was given (once).
    resized: bool,
    vanish: bool,
    listener_gone: bool,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    fault: Fault,
    /// Requests the faulty connection reads before it misbehaves.
    batch: usize,
    image: Mutex<Vec<u8>>,
    st: Mutex<State>,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn image(&self) -> MutexGuard<'_, Vec<u8>> {
        self.image.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Fake {
    pub addr: SocketAddr,
    sh: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Fake {
    /// Serves `image` on 127.0.0.1; the first connection that gets a request
    /// reads `batch` of them, then misbehaves as `fault` says.
    pub fn start(image: Vec<u8>, fault: Fault, batch: usize) -> Fake {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the fake upstream");
        l.set_nonblocking(true).expect("non-blocking listener");
        let addr = l.local_addr().unwrap();
        let sh = Arc::new(Shared {
            fault,
            batch: batch.max(1),
            image: Mutex::new(image),
            st: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
        });
        let s2 = sh.clone();
        let acceptor = std::thread::spawn(move || accept_loop(&s2, l));
        Fake {
            addr,
            sh,
            acceptor: Some(acceptor),
        }
    }

    /// `--conn-addr 127.0.0.1 --conn-port PORT`.
    pub fn conn_args(&self) -> Vec<String> {
        vec![
            "--conn-addr".into(),
            self.addr.ip().to_string(),
            "--conn-port".into(),
            self.addr.port().to_string(),
        ]
    }

    pub fn image(&self) -> Vec<u8> {
        self.sh.image().clone()
    }

    pub fn conns(&self) -> Vec<Conn> {
        self.sh.lock().conns.clone()
    }

    /// The connection that misbehaved, and what it received.
    pub fn faulty(&self) -> Option<(usize, Vec<Req>)> {
        let st = self.sh.lock();
        st.faulty.map(|i| (i, st.conns[i].requests.clone()))
    }

    /// The first connection after the faulty one that received a request
    /// other than DISC, and what it received.
    pub fn replay(&self) -> Option<(usize, Vec<Req>)> {
        let st = self.sh.lock();
        let f = st.faulty?;
        st.conns
            .iter()
            .enumerate()
            .skip(f + 1)
            .find(|(_, c)| c.requests.iter().any(|r| r.kind != DISC))
            .map(|(i, c)| (i, c.requests.clone()))
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.sh.stop.store(true, SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        let threads = std::mem::take(&mut self.sh.lock().threads);
        for h in threads {
            let _ = h.join();
        }
    }
}

fn accept_loop(sh: &Arc<Shared>, l: TcpListener) {
    while !sh.stop.load(SeqCst) {
        if sh.lock().vanish {
            drop(l);
            sh.lock().listener_gone = true;
            return;
        }
        match l.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(POLL));
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                let _ = s.set_nodelay(true);
                let mut st = sh.lock();
                let idx = st.conns.len();
                st.conns.push(Conn::default());
                let s2 = sh.clone();
                st.threads
                    .push(std::thread::spawn(move || serve(&s2, idx, s)));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn greeting(size: u64) -> [u8; 152] {
    let mut g = [0u8; 152];
    g[0..8].copy_from_slice(b"NBDMAGIC");
    g[8..16].copy_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
    g[16..24].copy_from_slice(&size.to_be_bytes());
    g[24..28].copy_from_slice(&FLAGS.to_be_bytes());
    g
}

fn reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Reads exactly `n` bytes; `None` at the end of the stream, an error or stop.
fn read_full(sh: &Shared, s: &mut TcpStream, n: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; n];
    let mut have = 0;
    while have < n {
        match s.read(&mut buf[have..]) {
            Ok(0) => return None,
            Ok(k) => have += k,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if sh.stop.load(SeqCst) {
                    return None;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(buf)
}

/// Reads one request (and a WRITE's payload) and records it.
fn next_request(sh: &Shared, idx: usize, s: &mut TcpStream) -> Option<Req> {
    let h = read_full(sh, s, 28)?;
    let be = |a: usize, n: usize| h[a..a + n].iter().fold(0u64, |v, &b| v << 8 | u64::from(b));
    if be(0, 4) as u32 != REQUEST_MAGIC {
        return None;
    }
    let mut r = Req {
        flags: be(4, 2) as u16,
        kind: be(6, 2) as u16,
        cookie: be(8, 8),
        offset: be(16, 8),
        length: be(24, 4) as u32,
        payload: Vec::new(),
    };
    if r.kind == WRITE {
        r.payload = read_full(sh, s, r.length as usize)?;
    }
    sh.lock().conns[idx].requests.push(r.clone());
    Some(r)
}

fn serve(sh: &Shared, idx: usize, mut s: TcpStream) {
    let size = {
        let mut st = sh.lock();
        let size = match sh.fault {
            Fault::Resize(n) if st.faulty.is_some() && !st.resized => {
                st.resized = true;
                n
            }
            _ => sh.image().len() as u64,
        };
        st.conns[idx].size = size;
        size
    };
    if s.write_all(&greeting(size)).is_err() {
        return;
    }
    let mut checked = false;
    let mut batch = Vec::new();
    while let Some(r) = next_request(sh, idx, &mut s) {
        if r.kind == DISC {
            return;
        }
        if !checked {
            checked = true;
            let mut st = sh.lock();
            if st.faulty.is_none() {
                st.faulty = Some(idx);
                batch.push(r);
                drop(st);
                if sh.batch == 1 {
                    return misbehave(sh, idx, s, batch);
                }
                continue;
            }
        }
        if !batch.is_empty() {
            batch.push(r);
            if batch.len() == sh.batch {
                return misbehave(sh, idx, s, batch);
            }
            continue;
        }
        if s.write_all(&answer(sh, &r)).is_err() {
            return;
        }
    }
}

/// A well-behaved answer: reply header and, for a successful READ, the data.
fn answer(sh: &Shared, r: &Req) -> Vec<u8> {
    let mut img = sh.image();
    let end = r.offset.checked_add(u64::from(r.length));
    let range = match end {
        Some(e) if e <= img.len() as u64 => r.offset as usize..e as usize,
        _ => return reply(EINVAL, r.cookie).to_vec(),
    };
    match r.kind {
        READ => {
            let mut b = reply(0, r.cookie).to_vec();
            b.extend_from_slice(&img[range]);
            b
        }
        WRITE => {
            img[range].copy_from_slice(&r.payload);
            reply(0, r.cookie).to_vec()
        }
        FLUSH => reply(0, r.cookie).to_vec(),
        _ => reply(EINVAL, r.cookie).to_vec(),
    }
}

fn misbehave(sh: &Shared, idx: usize, mut s: TcpStream, batch: Vec<Req>) {
    match sh.fault {
        Fault::Close | Fault::Resize(_) => {}
        Fault::HalfHeader => {
            let _ = s.write_all(&reply(0, batch[0].cookie)[..8]);
        }
        Fault::HalfData => {
            let r = batch
                .iter()
                .find(|r| r.kind == READ)
                .expect("test bug: HalfData needs a READ in the batch");
            let full = answer(sh, r);
            let _ = s.write_all(&full[..16 + r.length as usize / 2]);
        }
        Fault::Stall => {
            // Keep reading (and recording) until the peer gives up on us.
            while next_request(sh, idx, &mut s).is_some() {}
        }
        Fault::WrongHandle => {
            let _ = s.write_all(&reply(0, BAD_COOKIE));
            while next_request(sh, idx, &mut s).is_some() {}
        }
        Fault::Vanish => {
            sh.lock().vanish = true;
            // Close only once nobody can connect any more.
            super::wait_until(Duration::from_secs(5), || {
                sh.lock().listener_gone || sh.stop.load(SeqCst)
            });
        }
    }
    let _ = s.shutdown(Shutdown::Both);
}
