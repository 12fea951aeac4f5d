//! A TCP proxy for migration tests that breaks the link at chosen points:
//! it closes both sides in the middle of a request or payload, or goes
//! silent in one direction while keeping both connections open (a
//! half-open link). Each connection is armed with the next planned cut.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Close both connections (source side and destination side).
    Close,
    /// Stop forwarding the source's requests; keep both sides open.
    HangRequests,
    /// Stop forwarding the destination's replies; keep both sides open.
    HangReplies,
}

/// Break a connection once the source has sent `after` bytes over it.
#[derive(Debug, Clone, Copy)]
pub struct Cut {
    pub after: u64,
    pub kind: Kind,
}

/// What one proxied connection is doing.
const OPEN: u8 = 0;
const CLOSED: u8 = 1;
const HUNG: u8 = 2;

pub struct Proxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Cuts not yet used; each is armed on the next connection and put back
    /// if that connection ends before it fires (a refused attempt).
    queue: Arc<Mutex<VecDeque<Cut>>>,
    fired: Arc<Mutex<Vec<Cut>>>,
    pub accepted: Arc<Mutex<usize>>,
    /// Every socket it opened or accepted, shut down when it is dropped.
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// Forwards connections to `dest`; the n-th connection gets the n-th
    /// unused cut (an unfired cut passes to the next connection).
    pub fn start(dest: SocketAddr, cuts: Vec<Cut>) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let p = Proxy {
            addr: l.local_addr().unwrap(),
            stop: Arc::new(AtomicBool::new(false)),
            queue: Arc::new(Mutex::new(cuts.into())),
            fired: Arc::new(Mutex::new(Vec::new())),
            accepted: Arc::new(Mutex::new(0)),
            streams: Arc::new(Mutex::new(Vec::new())),
        };
        let (stop, queue, fired, accepted, streams) = (
            p.stop.clone(),
            p.queue.clone(),
            p.fired.clone(),
            p.accepted.clone(),
            p.streams.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                match l.accept() {
                    Ok((src, _)) => {
                        src.set_nonblocking(false).unwrap();
                        *accepted.lock().unwrap() += 1;
                        let Ok(dst) = TcpStream::connect(dest) else {
                            continue;
                        };
                        if let (Ok(a), Ok(b)) = (src.try_clone(), dst.try_clone()) {
                            streams.lock().unwrap().extend([a, b]);
                        }
                        let cut = queue.lock().unwrap().pop_front();
                        link(src, dst, cut, queue.clone(), fired.clone());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("proxy accept: {e}"),
                }
            }
        });
        p
    }

    /// The cuts that have fired.
    pub fn fired(&self) -> Vec<Cut> {
        self.fired.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Forwards one connection in both directions, breaking it as `cut` says.
fn link(
    src: TcpStream,
    dst: TcpStream,
    cut: Option<Cut>,
    queue: Arc<Mutex<VecDeque<Cut>>>,
    fired: Arc<Mutex<Vec<Cut>>>,
) {
    let state = Arc::new(AtomicU8::new(OPEN));
    let _ = src.set_nodelay(true);
    let _ = dst.set_nodelay(true);
    // Source -> destination: counts the bytes and fires the cut.
    {
        let (mut from, mut to) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let (src2, dst2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let state = state.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            let mut sent = 0u64;
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let hung = state.load(SeqCst) == HUNG;
                if hung && cut.is_some_and(|c| c.kind == Kind::HangRequests) {
                    continue; // swallow what the source still sends
                }
                if let Some(c) = cut.filter(|c| !hung && sent + n as u64 >= c.after) {
                    fired.lock().unwrap().push(c);
                    match c.kind {
                        Kind::Close => {
                            let _ = to.write_all(&buf[..(c.after - sent) as usize]);
                            state.store(CLOSED, SeqCst);
                            let _ = src2.shutdown(Shutdown::Both);
                            let _ = dst2.shutdown(Shutdown::Both);
                            return;
                        }
                        Kind::HangRequests => {
                            let _ = to.write_all(&buf[..(c.after - sent) as usize]);
                            state.store(HUNG, SeqCst);
                            continue;
                        }
                        Kind::HangReplies => state.store(HUNG, SeqCst),
                    }
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                sent += n as u64;
            }
            // The source left. A hung link keeps the destination's side open
            // (the destination must notice by itself); otherwise pass the
            // close on. An unfired cut goes back for the next connection.
            if state.load(SeqCst) == OPEN {
                if let Some(c) = cut {
                    queue.lock().unwrap().push_front(c);
                }
                let _ = dst2.shutdown(Shutdown::Write);
            }
        });
    }
    // Destination -> source.
    {
        let (mut from, mut to) = (dst, src);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let st = state.load(SeqCst);
                if st == HUNG && cut.is_some_and(|c| c.kind == Kind::HangReplies) {
                    continue;
                }
                if st == CLOSED || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            if state.load(SeqCst) != HUNG {
                let _ = to.shutdown(Shutdown::Write);
            }
        });
    }
}
