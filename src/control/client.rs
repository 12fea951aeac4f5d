//! Control socket client for the command line: send one request, read one reply,
//! and print it the way the C `flexnbd` client does.

use super::{Reply, ReplyParseError};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long [`request`] waits for a reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest reply line accepted from a server.
pub const MAX_REPLY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    #[error("no control socket at {0}")]
    NoSocket(PathBuf),
    #[error("nothing is listening on control socket {0}")]
    Refused(PathBuf),
    #[error("cannot connect to control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A line that cannot be sent: empty lines end a request and LF separates lines.
    #[error("request line {0:?} is empty or contains a newline")]
    BadLine(String),
    #[error("cannot send the request to {path}")]
    Send {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no reply from {path} within {} s", timeout.as_secs_f64())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("cannot read the reply from {path}")]
    Receive {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} closed the connection without replying")]
    NoReply(PathBuf),
    #[error("reply from {0} is too long")]
    ReplyTooLong(PathBuf),
    #[error("bad reply from {path}")]
    BadReply {
        path: PathBuf,
        #[source]
        source: ReplyParseError,
    },
}

/// Sends `lines` (command first) and waits up to [`DEFAULT_TIMEOUT`] for the reply.
pub fn request(sock: &Path, lines: &[&str]) -> Result<Reply, ControlClientError> {
    request_with_timeout(sock, lines, DEFAULT_TIMEOUT)
}

/// Sends `lines` plus the empty line that ends a request, then reads the one
/// reply line, waiting at most `timeout` from the start.
pub fn request_with_timeout(
    sock: &Path,
    lines: &[&str],
    timeout: Duration,
) -> Result<Reply, ControlClientError> {
    let deadline = Instant::now() + timeout;
    let mut c = Conversation::open(sock, lines, deadline)?;
    c.reply(Some(deadline))
}

/// One control connection: a request sent, its reply lines read one by one
/// (`mirror ... wait` gets two).
pub struct Conversation {
    stream: UnixStream,
    path: PathBuf,
    /// Bytes received and not yet returned as a line.
    buf: Vec<u8>,
    closed: bool,
}

impl Conversation {
    /// Connects and sends the request, within `deadline`.
    pub fn open(
        sock: &Path,
        lines: &[&str],
        deadline: Instant,
    ) -> Result<Conversation, ControlClientError> {
        let path = || sock.to_path_buf();
        let mut req = String::new();
        for l in lines {
            if l.is_empty() || l.contains('\n') {
                return Err(ControlClientError::BadLine((*l).to_owned()));
            }
            req.push_str(l);
            req.push('\n');
        }
        req.push('\n');
        let mut stream = UnixStream::connect(sock).map_err(|e| match e.kind() {
            ErrorKind::NotFound => ControlClientError::NoSocket(path()),
            ErrorKind::ConnectionRefused => ControlClientError::Refused(path()),
            _ => ControlClientError::Connect {
                path: path(),
                source: e,
            },
        })?;
        let timed_out = || ControlClientError::Timeout {
            path: path(),
            timeout: deadline.saturating_duration_since(Instant::now()),
        };
        stream
            .set_write_timeout(Some(left(deadline).ok_or_else(timed_out)?))
            .map_err(|e| ControlClientError::Send {
                path: path(),
                source: e,
            })?;
        if let Err(e) = stream.write_all(req.as_bytes()) {
            // A server that refuses a request may reply and close before reading it
            // all; its reply is still worth reading.
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                return Err(timed_out());
            }
            if !matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) {
                return Err(ControlClientError::Send {
                    path: path(),
                    source: e,
                });
            }
        }
        Ok(Conversation {
            stream,
            path: sock.to_path_buf(),
            buf: Vec::new(),
            closed: false,
        })
    }

    /// The next reply line, waiting until `deadline` (`None`: for ever).
    pub fn reply(&mut self, deadline: Option<Instant>) -> Result<Reply, ControlClientError> {
        let path = || self.path.clone();
        let mut chunk = [0u8; 1024];
        while !self.buf.contains(&b'\n') && !self.closed {
            if self.buf.len() > MAX_REPLY {
                return Err(ControlClientError::ReplyTooLong(path()));
            }
            let t = match deadline {
                None => None,
                Some(d) => Some(left(d).ok_or_else(|| ControlClientError::Timeout {
                    path: path(),
                    timeout: Duration::ZERO,
                })?),
            };
            let receive = |e| ControlClientError::Receive {
                path: self.path.clone(),
                source: e,
            };
            self.stream.set_read_timeout(t).map_err(receive)?;
            let n = match self.stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(ControlClientError::Timeout {
                        path: path(),
                        timeout: t.unwrap_or_default(),
                    })
                }
                // A server closing without reading the whole request resets the
                // connection; whatever it sent before that still counts.
                Err(e) if e.kind() == ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(receive(e)),
            };
            if n == 0 {
                self.closed = true;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        if self.buf.is_empty() {
            return Err(ControlClientError::NoReply(path()));
        }
        let end = self
            .buf
            .iter()
            .position(|&b| b == b'\n')
            .map_or(self.buf.len(), |i| i + 1);
        let line: Vec<u8> = self.buf.drain(..end).collect();
        if line.len() > MAX_REPLY {
            return Err(ControlClientError::ReplyTooLong(path()));
        }
        let text = String::from_utf8_lossy(&line);
        Reply::parse_line(&text).map_err(|e| ControlClientError::BadReply {
            path: path(),
            source: e,
        })
    }
}

/// Time left until `d`, `None` once it has passed.
fn left(d: Instant) -> Option<Duration> {
    Some(d.saturating_duration_since(Instant::now())).filter(|t| !t.is_zero())
}

/// The process exit code for a reply code: the code itself, or 255 if it does not
/// fit (so that a failure never wraps round to success).
pub fn exit_code(code: u32) -> i32 {
    i32::try_from(code)
        .ok()
        .filter(|c| *c <= 255)
        .unwrap_or(255)
}

/// Prints the reply text, newline-terminated, on stdout for code 0 and on stderr
/// otherwise, as the C client does; returns the exit code.
pub fn print_reply(reply: &Reply) -> i32 {
    if reply.code == 0 {
        let _ = writeln!(io::stdout().lock(), "{}", reply.text);
    } else {
        let _ = writeln!(io::stderr().lock(), "{}", reply.text);
    }
    exit_code(reply.code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(10), 10);
        assert_eq!(exit_code(255), 255);
        assert_eq!(exit_code(256), 255);
        assert_eq!(exit_code(u32::MAX), 255);
    }

    #[test]
    fn connection_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.sock");
        let e = request(&missing, &["status"]).unwrap_err();
        assert!(matches!(e, ControlClientError::NoSocket(_)), "{e}");
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let e = request(&stale, &["status"]).unwrap_err();
        assert!(matches!(e, ControlClientError::Refused(_)), "{e}");
        let e = request(&stale, &["acl", ""]).unwrap_err();
        assert!(matches!(e, ControlClientError::BadLine(_)), "{e}");
        let e = request(&stale, &["acl", "a\nb"]).unwrap_err();
        assert!(matches!(e, ControlClientError::BadLine(_)), "{e}");
    }

    /// A one-shot server that answers whatever it is sent with `reply` (or nothing).
    fn answer(reply: Option<&'static [u8]>) -> Result<Reply, ControlClientError> {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            if let Some(r) = reply {
                s.write_all(r).unwrap();
            }
        });
        let got = request_with_timeout(&sock, &["status"], Duration::from_secs(10));
        server.join().unwrap();
        got
    }

    #[test]
    fn bad_replies() {
        assert_eq!(answer(Some(b"0: fine\n")).unwrap(), Reply::ok("fine"));
        assert_eq!(
            answer(Some(b"3: no newline")).unwrap(),
            Reply::err(3, "no newline")
        );
        let e = answer(Some(b"garbage\n")).unwrap_err();
        assert!(matches!(e, ControlClientError::BadReply { .. }), "{e}");
        let e = answer(Some(b"\xff\xfe: x\n")).unwrap_err();
        assert!(matches!(e, ControlClientError::BadReply { .. }), "{e}");
        let e = answer(None).unwrap_err();
        assert!(matches!(e, ControlClientError::NoReply(_)), "{e}");
        let e = answer(Some(&[b'x'; MAX_REPLY + 10])).unwrap_err();
        assert!(matches!(e, ControlClientError::ReplyTooLong(_)), "{e}");
    }
}
