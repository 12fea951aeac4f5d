//! A TLS session over a plain stream socket, in user space (rustls): the
//! [`Stream::Tls`](super::Stream::Tls) variant. One reader and any number
//! of writers may use it at once from different threads, as with a plain
//! socket.
//!
//! The rustls state is locked only to decrypt or encrypt, never across a
//! socket call, so a writer blocked on a slow peer does not stop the reader
//! (a peer that waits for its requests to be read before it reads replies
//! would otherwise deadlock). Ciphertext is sent in the order it was
//! encrypted: rustls queues records in sequence, and they leave its queue
//! only under the sending lock, which is held from there to the socket
//! (writers take the sending lock, then the session; the reader only tries
//! the sending lock while it holds the session).

use super::{is_timeout, Stream};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::{Mutex, MutexGuard};

/// What is known about an established TLS session, for status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: String,
    pub cipher: String,
    /// The subject of the certificate the peer presented, if it did.
    pub peer_subject: Option<String>,
    /// The kernel does the record layer (kTLS): the socket carries plain
    /// data as far as this process is concerned.
    pub kernel: bool,
}

/// Ciphertext read from the socket and not yet taken by rustls.
struct Rx {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// Ciphertext encrypted and not yet sent (`buf[sent..]`).
#[derive(Default)]
struct Tx {
    buf: Vec<u8>,
    sent: usize,
}

/// Plaintext taken per write call (records of up to 16 KiB each).
const WRITE_CHUNK: usize = 256 * 1024;
/// Ciphertext read from the socket per call.
const READ_CHUNK: usize = 64 * 1024;

/// A rustls session over a plain socket (TCP or unix, never another TLS).
pub struct Channel {
    sock: Stream,
    conn: Mutex<rustls::Connection>,
    rx: Mutex<Rx>,
    tx: Mutex<Tx>,
    info: TlsInfo,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("info", &self.info).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl Channel {
    /// Takes over a session whose handshake is complete on `sock`.
    pub fn new(sock: Stream, mut conn: rustls::Connection, info: TlsInfo) -> Channel {
        // Each write call bounds what it hands over (WRITE_CHUNK).
        conn.set_buffer_limit(None);
        Channel {
            sock,
            conn: Mutex::new(conn),
            rx: Mutex::new(Rx {
                buf: vec![0u8; READ_CHUNK].into_boxed_slice(),
                start: 0,
                end: 0,
            }),
            tx: Mutex::new(Tx::default()),
            info,
        }
    }

    pub fn info(&self) -> &TlsInfo {
        &self.info
    }

    /// The plain socket underneath (for socket options and shutdown).
    pub fn socket(&self) -> &Stream {
        &self.sock
    }

    pub fn read(&self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        loop {
            let more = {
                let mut c = lock(&self.conn);
                match c.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if rx.start == rx.end {
                    false
                } else {
                    let mut s = &rx.buf[rx.start..rx.end];
                    let before = s.len();
                    c.read_tls(&mut s)?;
                    if s.len() == before {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "TLS: the record layer took no data",
                        ));
                    }
                    rx.start += before - s.len();
                    let r = c.process_new_packets();
                    // What rustls has to say (an alert, a key update) stays in
                    // its queue, in sequence with what writers encrypt, and
                    // goes out now if no writer is busy, else with the next
                    // write or flush. (try_lock: never waits while holding
                    // the session, so the lock order of writers is safe.)
                    let mut tx = match c.wants_write() {
                        true => self.tx.try_lock().ok(),
                        false => None,
                    };
                    if let Some(tx) = tx.as_mut() {
                        while c.wants_write() {
                            if c.write_tls(&mut tx.buf).is_err() {
                                break;
                            }
                        }
                    }
                    drop(c);
                    if let Some(mut tx) = tx {
                        // Best effort: a timeout leaves the rest for later.
                        let _ = drain(&self.sock, &mut tx);
                    }
                    if let Err(e) = r {
                        return Err(tls_error(e));
                    }
                    true
                }
            };
            match more {
                true => {}
                false => {
                    let n = (&self.sock).read(&mut rx.buf)?;
                    if n == 0 {
                        // The socket closed (with or without close_notify).
                        return Ok(0);
                    }
                    rx.start = 0;
                    rx.end = n;
                }
            }
        }
    }

    /// Takes up to [`WRITE_CHUNK`] bytes of `buf` once the ciphertext of
    /// earlier writes is out. The ciphertext of this one may still be partly
    /// unsent after a socket timeout: [`flush`](Self::flush) or the next
    /// write sends it.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        let mut tx = lock(&self.tx);
        drain(&self.sock, &mut tx)?;
        let n = {
            let mut c = lock(&self.conn);
            let n = c.writer().write(&buf[..buf.len().min(WRITE_CHUNK)])?;
            while c.wants_write() {
                c.write_tls(&mut tx.buf)?;
            }
            n
        };
        match drain(&self.sock, &mut tx) {
            Err(e) if !is_timeout(&e) => Err(e),
            _ => Ok(n),
        }
    }

    /// Sends whatever ciphertext is still unsent (including what rustls
    /// queued while reading).
    pub fn flush(&self) -> io::Result<()> {
        let mut tx = lock(&self.tx);
        {
            let mut c = lock(&self.conn);
            while c.wants_write() {
                c.write_tls(&mut tx.buf)?;
            }
        }
        drain(&self.sock, &mut tx)
    }

    /// Shuts the socket down. Shutting the write side first says
    /// close_notify when no writer is busy (never waiting for one).
    pub fn shutdown(&self, how: Shutdown) {
        if how != Shutdown::Read {
            if let Ok(mut tx) = self.tx.try_lock() {
                if let Ok(mut c) = self.conn.try_lock() {
                    c.send_close_notify();
                    while c.wants_write() {
                        if c.write_tls(&mut tx.buf).is_err() {
                            break;
                        }
                    }
                }
                if how == Shutdown::Write {
                    let _ = drain(&self.sock, &mut tx);
                }
            }
        }
        self.sock.shutdown(how);
    }
}

/// Writes out `tx`'s unsent ciphertext; a timeout leaves the rest for later.
fn drain(sock: &Stream, tx: &mut Tx) -> io::Result<()> {
    while tx.sent < tx.buf.len() {
        match (&*sock).write(&tx.buf[tx.sent..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => tx.sent += m,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    tx.buf.clear();
    tx.sent = 0;
    Ok(())
}

/// A TLS session whose record layer the kernel runs (kTLS): plaintext goes
/// straight to and from the socket, so `sendfile` and `splice` work as on a
/// plain one. Reads check each record's type: an alert ends the stream.
pub struct Kernel {
    sock: Stream,
    info: TlsInfo,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel").field("info", &self.info).finish()
    }
}

impl Kernel {
    /// `sock` is a plain TCP socket whose TX and RX state was handed to the kernel.
    pub fn new(sock: Stream, info: TlsInfo) -> Kernel {
        Kernel { sock, info }
    }

    pub fn info(&self) -> &TlsInfo {
        &self.info
    }

    pub fn socket(&self) -> &Stream {
        &self.sock
    }

    pub fn read(&self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let fd = self.sock.socket_fd();
        let (n, kind) = crate::sys::recv_tls_record(fd, out)?;
        match kind {
            crate::sys::TLS_RECORD_DATA => Ok(n),
            // close_notify (or a fatal alert): the peer is done.
            crate::sys::TLS_RECORD_ALERT => Ok(0),
            k => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("TLS: unexpected record of type {k} after the handshake"),
            )),
        }
    }
}
