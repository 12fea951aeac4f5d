//! The pause-control socket (`--pause-control PATH`), which speaks nbdkit's
//! pause filter protocol so existing scripts (`echo p | nc -U SOCK`) work:
//! one character per command, `p` answered `P` once requests in flight are
//! done and the image is flushed, `r` answered `R`, anything else `X`
//! (whitespace, such as the newline `echo` adds, is skipped). A pause taken
//! here is a lease like any other (60 s unless resumed), and it is not
//! ended when the connection that took it closes.

use super::pause::Owner;
use super::state::Daemon;
use crate::control::grammar::PAUSE_TIMEOUT;
use crate::control::server::{ControlServer, Serve};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

/// Connections served at once.
const MAX_CONNECTIONS: usize = 16;
/// How often a waiting connection looks at the stop flag.
const POLL: Duration = Duration::from_millis(200);

pub(super) fn start(path: &Path, daemon: Arc<Daemon>) -> io::Result<ControlServer> {
    let serve: Serve = Arc::new(move |mut s, stop| serve(&mut s, &daemon, stop));
    ControlServer::start_service(
        "pause-control socket",
        path,
        MAX_CONNECTIONS,
        serve,
        Arc::new(drop),
    )
}

/// The answer to one command byte (`None`: skipped).
fn answer(d: &Daemon, b: u8) -> Option<u8> {
    match b {
        b'p' => {
            if d.pauses.has(Owner::PauseControl) {
                return Some(b'P');
            }
            match d.pause(Owner::PauseControl, PAUSE_TIMEOUT) {
                Ok(_) => Some(b'P'),
                Err(e) => {
                    warn!("pause-control: cannot pause: {e}");
                    Some(b'X')
                }
            }
        }
        b'r' => {
            d.pauses
                .release_all(Some(Owner::PauseControl), "resumed by 'r'");
            Some(b'R')
        }
        b if b.is_ascii_whitespace() => None,
        _ => Some(b'X'),
    }
}

fn serve(s: &mut UnixStream, d: &Daemon, stop: &AtomicBool) {
    let _ = s.set_read_timeout(Some(POLL));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 64];
    loop {
        if stop.load(SeqCst) {
            return;
        }
        let n = match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        for &b in &buf[..n] {
            if let Some(a) = answer(d, b) {
                if s.write_all(&[a]).is_err() {
                    return;
                }
            }
        }
    }
}
