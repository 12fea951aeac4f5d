//! Scripted fake NBD servers on a socket pair, for the client's unit tests.

use super::transport::Stream;
use super::{ClientError, ConnectOptions, Connection};
use crate::proto::consts::*;
use crate::proto::handshake::{oldstyle_greeting, option_reply};
use crate::proto::{be_u32, be_u64, Command, Request, SimpleReply};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::Duration;

/// The server end of a socket pair.
pub(crate) struct Peer {
    pub s: UnixStream,
}

impl Peer {
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("fake server read");
        b
    }

    pub fn send(&mut self, b: &[u8]) {
        // The client may have hung up already; that is its right.
        let _ = self.s.write_all(b);
    }

    pub fn client_flags(&mut self) -> u32 {
        be_u32(&self.bytes(4), 0)
    }

    /// Reads an option request: (option, data).
    pub fn option(&mut self) -> (u32, Vec<u8>) {
        let h = self.bytes(OPTION_HEADER_LEN);
        assert_eq!(be_u64(&h, 0), IHAVEOPT);
        let len = be_u32(&h, 12) as usize;
        (be_u32(&h, 8), self.bytes(len))
    }

    pub fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        self.send(&option_reply(option, reply_type, data));
    }

    /// Reads a request header; `None` when the client closed the connection.
    pub fn request(&mut self) -> Option<Request> {
        let mut h = [0u8; REQUEST_LEN];
        self.s.read_exact(&mut h).ok()?;
        Request::decode(&h, false).ok().flatten().map(|(r, _)| r)
    }

    /// Sends `b`, ends the server's side of the stream, and takes in whatever
    /// the client sends until it closes.
    pub fn send_all_then_listen(&mut self, b: &[u8]) {
        self.send(b);
        let _ = self.s.shutdown(std::net::Shutdown::Write);
        self.wait_close();
    }

    /// Waits until the client closes its end.
    pub fn wait_close(&mut self) {
        let mut b = [0u8; 4096];
        while matches!(self.s.read(&mut b), Ok(n) if n > 0) {}
    }

    /// Old-style greeting for an export of `size` bytes with the C server's flags.
    pub fn oldstyle(&mut self, size: u64) {
        self.send(&oldstyle_greeting(size, 0x0d));
    }

    /// Serves READ, WRITE, FLUSH and DISC on `data` with simple replies until the
    /// client disconnects; returns the final contents.
    pub fn serve(&mut self, mut data: Vec<u8>) -> Vec<u8> {
        while let Some(r) = self.request() {
            let start = r.offset as usize;
            let end = start + r.length as usize;
            match r.command {
                Command::Read if end <= data.len() => {
                    self.send(&SimpleReply::ok(r.cookie).encode());
                    self.send(&data[start..end]);
                }
                Command::Write => {
                    let payload = self.bytes(r.length as usize);
                    if end <= data.len() {
                        data[start..end].copy_from_slice(&payload);
                        self.send(&SimpleReply::ok(r.cookie).encode());
                    } else {
                        self.send(
                            &SimpleReply::err(r.cookie, crate::proto::NbdErrno::NoSpc).encode(),
                        );
                    }
                }
                Command::Flush => self.send(&SimpleReply::ok(r.cookie).encode()),
                Command::Disc => break,
                _ => self.send(&SimpleReply::err(r.cookie, crate::proto::NbdErrno::Inval).encode()),
            }
        }
        data
    }
}

/// Flags of an export that takes everything the client can send.
pub(crate) const ALL_FLAGS: u16 =
    FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;

/// Starts `script` as the server of a new socket pair; returns the client end.
pub(crate) fn spawn<T, F>(script: F) -> (Stream, JoinHandle<T>)
where
    F: FnOnce(Peer) -> T + Send + 'static,
    T: Send + 'static,
{
    let (c, s) = UnixStream::pair().expect("socketpair");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let t = std::thread::spawn(move || script(Peer { s }));
    (Stream::Unix(c), t)
}

/// Runs the handshake against `script` with `opts`.
pub(crate) fn handshake<T, F>(
    opts: &ConnectOptions,
    script: F,
) -> (Result<Connection, ClientError>, JoinHandle<T>)
where
    F: FnOnce(Peer) -> T + Send + 'static,
    T: Send + 'static,
{
    let (c, t) = spawn(script);
    (Connection::establish(c, opts, "localhost"), t)
}

/// Options with short timeouts so failing tests end quickly.
pub(crate) fn quick() -> ConnectOptions {
    ConnectOptions {
        greeting_timeout: Duration::from_millis(300),
        request_timeout: Some(Duration::from_secs(5)),
        ..ConnectOptions::default()
    }
}
