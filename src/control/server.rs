//! Control socket loop: a unix listener on its own thread; each connection carries
//! one request (lines up to an empty line) and gets one reply line, then is closed.
//!
//! Framing decisions:
//! - A line ends at LF; one trailing CR is dropped, so CRLF clients work too.
//! - The request ends at the first empty line; anything after it is ignored.
//! - EOF also ends the request (as in the C server). A final line without its LF
//!   still counts, so a client that dies mid-line sends a malformed argument rather
//!   than a shorter, valid-looking list. EOF before any line is `9: missing command`.
//! - Bounds: [`Limits`]. Past a bound, or on invalid UTF-8, the reply is `1: <why>`
//!   and the connection is closed without running anything.

use super::grammar::{parse, run, Command};
use super::{Handler, Lease, Paused, Reply};
use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bounds on what one control connection may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest line in bytes, without its LF.
    pub max_line: usize,
    /// Most lines in a request (command plus arguments); an ACL is one line per entry.
    pub max_lines: usize,
    /// Most bytes in a request, all lines together.
    pub max_request: usize,
    /// Connections served at once; more are told so and closed.
    pub max_connections: usize,
    /// Time a client has to send its whole request.
    pub request_timeout: Duration,
    /// Time a client has to take the reply.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_line: 4096,
            max_lines: 1024,
            max_request: 256 * 1024,
            max_connections: 64,
            request_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a request was not read; `Display` is the reply text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("request line too long")]
    LineTooLong,
    #[error("too many request lines")]
    TooManyLines,
    #[error("request too long")]
    RequestTooLong,
    #[error("request is not valid UTF-8")]
    NotUtf8,
}

/// Splits a byte stream into request lines, enforcing [`Limits`]. Pure.
#[derive(Debug)]
pub struct RequestReader {
    limits: Limits,
    lines: Vec<String>,
    partial: Vec<u8>,
    total: usize,
}

impl RequestReader {
    pub fn new(limits: Limits) -> RequestReader {
        RequestReader {
            limits,
            lines: Vec::new(),
            partial: Vec::new(),
            total: 0,
        }
    }

    /// Takes more bytes; `Some(lines)` once the empty line has arrived.
    pub fn push(&mut self, mut bytes: &[u8]) -> Result<Option<Vec<String>>, FrameError> {
        while !bytes.is_empty() {
            let (chunk, end) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], Some(i + 1)),
                None => (bytes, None),
            };
            self.total = self
                .total
                .saturating_add(chunk.len() + usize::from(end.is_some()));
            if self.total > self.limits.max_request {
                return Err(FrameError::RequestTooLong);
            }
            // One byte of slack for a CR before the LF.
            if self.partial.len() + chunk.len() > self.limits.max_line + 1 {
                return Err(FrameError::LineTooLong);
            }
            self.partial.extend_from_slice(chunk);
            let Some(end) = end else { break };
            bytes = &bytes[end..];
            if self.end_line()? {
                return Ok(Some(std::mem::take(&mut self.lines)));
            }
        }
        Ok(None)
    }

    /// At EOF: the lines so far, including a last line that lacks its LF.
    pub fn finish(mut self) -> Result<Vec<String>, FrameError> {
        if !self.partial.is_empty() {
            self.end_line()?;
        }
        Ok(self.lines)
    }

    /// Completes the partial line; true if it was the empty line ending the request.
    fn end_line(&mut self) -> Result<bool, FrameError> {
        let mut raw = std::mem::take(&mut self.partial);
        if raw.last() == Some(&b'\r') {
            raw.pop();
        }
        if raw.is_empty() {
            return Ok(true);
        }
        if raw.len() > self.limits.max_line {
            return Err(FrameError::LineTooLong);
        }
        if self.lines.len() >= self.limits.max_lines {
            return Err(FrameError::TooManyLines);
        }
        let line = String::from_utf8(raw).map_err(|_| FrameError::NotUtf8)?;
        self.lines.push(line);
        Ok(false)
    }
}

/// A running control socket. Stopping it (or dropping it) ends the accept thread and
/// removes the socket file if it is still the one this server bound.
pub struct ControlServer {
    path: PathBuf,
    /// Device and inode of the socket file at bind time.
    file_id: (u64, u64),
    /// A handle on the listening socket, used to wake the accept thread.
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Connections being served.
    busy: Arc<AtomicUsize>,
}

/// How long stopping waits for requests already being answered.
const FINISH_TIMEOUT: Duration = Duration::from_secs(2);

impl ControlServer {
    /// Binds `path` with default [`Limits`] and starts serving.
    pub fn start(path: impl AsRef<Path>, handler: Arc<dyn Handler>) -> io::Result<ControlServer> {
        ControlServer::start_with_limits(path, handler, Limits::default())
    }

    /// Binds `path` and starts serving. A stale socket file nobody listens on is
    /// replaced; a live one, or a path that is not a socket, is an error. Errors do
    /// not repeat the path: callers add it.
    pub fn start_with_limits(
        path: impl AsRef<Path>,
        handler: Arc<dyn Handler>,
        limits: Limits,
    ) -> io::Result<ControlServer> {
        let serve: Serve =
            Arc::new(move |stream, stop| serve_connection(stream, handler.as_ref(), limits, stop));
        let refuse = move |stream| {
            crate::warn!("too many control connections; refusing one");
            send_reply(
                stream,
                &Reply::err(1, "too many control connections"),
                limits,
            );
        };
        ControlServer::start_service(
            "control socket",
            path,
            limits.max_connections,
            serve,
            Arc::new(refuse),
        )
    }

    /// A unix socket service of another protocol (the pause-control socket):
    /// `serve` gets each connection on a thread of its own (and the stop
    /// flag), at most `max_connections` at once; `refuse` gets the others.
    /// Stale sockets are replaced as for the control socket.
    pub fn start_service(
        what: &str,
        path: impl AsRef<Path>,
        max_connections: usize,
        serve: Serve,
        refuse: Arc<dyn Fn(UnixStream) + Send + Sync>,
    ) -> io::Result<ControlServer> {
        let path = path.as_ref().to_path_buf();
        remove_stale(&path)?;
        let listener = UnixListener::bind(&path)?;
        let meta = fs::symlink_metadata(&path)?;
        let file_id = (meta.dev(), meta.ino());
        let stop = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicUsize::new(0));
        let spawned = listener.try_clone().and_then(|accepting| {
            let stop = Arc::clone(&stop);
            let busy = Arc::clone(&busy);
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || accept_loop(accepting, serve, refuse, max_connections, stop, busy))
        });
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
        };
        crate::info!("{what} listening at {}", path.display());
        Ok(ControlServer {
            path,
            file_id,
            listener,
            stop,
            thread: Some(thread),
            busy,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, waits for the accept thread and (briefly) for requests
    /// already being answered, and removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // shutdown(2) on the listening socket wakes the blocked accept(2) on Linux.
        let _ = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Both);
        let _ = thread.join();
        let deadline = std::time::Instant::now() + FINISH_TIMEOUT;
        while self.busy.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.file_id {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Removes a socket file left by a dead server; refuses to touch a live one or a
/// file that is not a socket.
fn remove_stale(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            ErrorKind::AddrInUse,
            "another server is already listening on it",
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            crate::info!("replacing stale control socket {}", path.display());
            match fs::remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Decrements the count of busy connections when a connection thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves one connection of a unix socket service; the flag says the service stops.
pub type Serve = Arc<dyn Fn(UnixStream, &AtomicBool) + Send + Sync>;

fn accept_loop(
    listener: UnixListener,
    serve: Serve,
    refuse: Arc<dyn Fn(UnixStream) + Send + Sync>,
    max_connections: usize,
    stop: Arc<AtomicBool>,
    busy: Arc<AtomicUsize>,
) {
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == ErrorKind::InvalidInput => {
                crate::error!("control socket closed: {e}");
                break;
            }
            Err(e) => {
                // Out of descriptors or memory: let things settle rather than spin.
                crate::warn!("control accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::SeqCst) >= max_connections {
            busy.fetch_sub(1, Ordering::SeqCst);
            refuse(stream);
            continue;
        }
        let slot = Slot(Arc::clone(&busy));
        let serve = Arc::clone(&serve);
        let stop = Arc::clone(&stop);
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                let _slot = slot;
                serve(stream, &stop);
            });
        if let Err(e) = spawned {
            crate::warn!("cannot start a control connection thread: {e}");
        }
    }
}

/// Why reading a request stopped without a request.
enum ReadError {
    Frame(FrameError),
    Timeout,
    Io(io::Error),
}

fn read_request(stream: &mut UnixStream, limits: Limits) -> Result<Vec<String>, ReadError> {
    let deadline = Instant::now() + limits.request_timeout;
    let mut reader = RequestReader::new(limits);
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::Timeout);
        }
        stream.set_read_timeout(Some(left)).map_err(ReadError::Io)?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(ReadError::Timeout)
            }
            Err(e) => return Err(ReadError::Io(e)),
        };
        if n == 0 {
            return reader.finish().map_err(ReadError::Frame);
        }
        if let Some(lines) = reader.push(&buf[..n]).map_err(ReadError::Frame)? {
            return Ok(lines);
        }
    }
}

/// What follows the reply on the same connection.
enum FollowUp {
    None,
    /// `mirror ... wait`: the outcome of the migration.
    MirrorOutcome,
    /// `pause SECONDS hold`: the pause lasts while the connection is open.
    Hold(Box<dyn Lease>),
}

fn serve_connection(
    mut stream: UnixStream,
    handler: &dyn Handler,
    limits: Limits,
    stop: &AtomicBool,
) {
    let (reply, follow_up) = match read_request(&mut stream, limits) {
        Ok(lines) => {
            let name: String = lines
                .first()
                .map_or("", |l| l.as_str())
                .chars()
                .take(40)
                .collect();
            crate::info!("{name:?} command received");
            catch_unwind(AssertUnwindSafe(|| answer(&lines, handler))).unwrap_or_else(|_| {
                crate::error!("control command {name:?} failed unexpectedly");
                (Reply::err(1, "internal error"), FollowUp::None)
            })
        }
        Err(ReadError::Frame(e)) => {
            crate::warn!("bad control request: {e}");
            (Reply::err(1, e.to_string()), FollowUp::None)
        }
        Err(ReadError::Timeout) => {
            crate::warn!("control client sent no complete request in time");
            (
                Reply::err(1, "timed out waiting for the request"),
                FollowUp::None,
            )
        }
        Err(ReadError::Io(e)) => {
            crate::debug!("control connection failed: {e}");
            return;
        }
    };
    let sent = send_line(&mut stream, &reply, limits);
    match follow_up {
        FollowUp::MirrorOutcome if sent => {
            // `mirror ... wait`: the outcome follows on the same connection, and
            // is sent before the server exits at a hand-over.
            let outcome = catch_unwind(AssertUnwindSafe(|| handler.wait_mirror()))
                .unwrap_or_else(|_| Reply::err(1, "internal error"));
            send_line(&mut stream, &outcome, limits);
        }
        FollowUp::Hold(lease) if sent => hold_open(&mut stream, lease.as_ref(), limits, stop),
        // Dropping a lease here (the reply did not reach its owner) ends the pause.
        _ => {}
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Keeps a held pause while its connection stays open: returns when the
/// peer closes (or sends anything), when the pause ended by other means
/// (then says so in a second line), or when the control socket stops.
fn hold_open(stream: &mut UnixStream, lease: &dyn Lease, limits: Limits, stop: &AtomicBool) {
    let mut buf = [0u8; 64];
    let _ = stream.set_read_timeout(Some(HOLD_POLL));
    loop {
        if lease.ended() {
            send_line(
                stream,
                &Reply::err(1, "pause ended: resumed or timed out"),
                limits,
            );
            return;
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match stream.read(&mut buf) {
            Ok(_) => return,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// How often a held pause's connection is checked.
const HOLD_POLL: Duration = Duration::from_millis(100);

/// Runs a request: its reply, and what follows it on the connection.
fn answer(lines: &[String], handler: &dyn Handler) -> (Reply, FollowUp) {
    match parse(lines) {
        Ok(Command::Pause(req)) => match handler.pause(req) {
            Ok(Paused {
                reply,
                lease: Some(l),
            }) if req.hold => (reply, FollowUp::Hold(l)),
            Ok(p) => (p.reply, FollowUp::None),
            Err(r) => (r, FollowUp::None),
        },
        Ok(cmd) => {
            let wait = matches!(&cmd, Command::Mirror(r) if r.wait);
            let reply = run(cmd, handler);
            let follow = if wait && reply.code == 0 {
                FollowUp::MirrorOutcome
            } else {
                FollowUp::None
            };
            (reply, follow)
        }
        Err(e) => (e.to_reply(), FollowUp::None),
    }
}

/// Writes one reply line; false if the client is gone.
fn send_line(stream: &mut UnixStream, reply: &Reply, limits: Limits) -> bool {
    let _ = stream.set_write_timeout(Some(limits.write_timeout));
    match stream.write_all(reply.to_line().as_bytes()) {
        Ok(()) => true,
        Err(e) => {
            crate::debug!("cannot send control reply: {e}");
            false
        }
    }
}

fn send_reply(mut stream: UnixStream, reply: &Reply, limits: Limits) {
    send_line(&mut stream, reply, limits);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn small() -> Limits {
        Limits {
            max_line: 8,
            max_lines: 3,
            max_request: 30,
            ..Limits::default()
        }
    }

    #[test]
    fn framing() {
        let mut r = RequestReader::new(small());
        assert_eq!(r.push(b"stat").unwrap(), None);
        assert_eq!(r.push(b"us\r\nx\n").unwrap(), None);
        let got = r.push(b"\r\nignored").unwrap();
        assert_eq!(got, Some(vec!["status".to_string(), "x".to_string()]));

        let mut r = RequestReader::new(small());
        assert_eq!(r.push(b"acl\n1.2.3").unwrap(), None);
        assert_eq!(r.finish().unwrap(), vec!["acl", "1.2.3"]);
        assert!(RequestReader::new(small()).finish().unwrap().is_empty());
        let mut r = RequestReader::new(small());
        assert_eq!(r.push(b"\n").unwrap(), Some(vec![]));
    }

    #[test]
    fn bounds() {
        let push = |b: &[u8]| RequestReader::new(small()).push(b);
        assert_eq!(
            push(b"12345678\n\n").unwrap(),
            Some(vec!["12345678".into()])
        );
        assert_eq!(push(b"123456789").unwrap(), None, "room for a CR");
        assert_eq!(push(b"1234567890"), Err(FrameError::LineTooLong));
        assert_eq!(push(b"123456789\n"), Err(FrameError::LineTooLong));
        assert_eq!(push(b"a\nb\nc\nd\n"), Err(FrameError::TooManyLines));
        assert_eq!(push(b"a\nb\nc\n\n").unwrap().map(|v| v.len()), Some(3));
        assert_eq!(push(b"\xff\xfe\n"), Err(FrameError::NotUtf8));
        let mut r = RequestReader::new(Limits {
            max_lines: 100,
            ..small()
        });
        assert_eq!(r.push(&b"a\n".repeat(16)), Err(FrameError::RequestTooLong));
    }

    proptest! {
        #[test]
        fn framing_never_panics_and_respects_bounds(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 0..8)
        ) {
            let mut r = RequestReader::new(small());
            let mut done = None;
            for c in &chunks {
                match r.push(c) {
                    Ok(Some(lines)) => { done = Some(lines); break; }
                    Ok(None) => {}
                    Err(_) => return Ok(()),
                }
            }
            let lines = match done {
                Some(l) => l,
                None => match r.finish() { Ok(l) => l, Err(_) => return Ok(()) },
            };
            prop_assert!(lines.len() <= 3);
            prop_assert!(lines.iter().all(|l| !l.is_empty() && l.len() <= 8 && !l.contains('\n')));
        }
    }
}
