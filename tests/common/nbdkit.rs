//! `nbdkit file` behind the log filter (and the multi-conn filter): the
//! upstream whose log shows each request the proxy sent, per connection.

use super::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `nbdkit file` with the log filter outermost (it logs each request as the
/// proxy sent it, per upstream connection); killed and reaped when dropped.
pub struct Nbdkit {
    pub port: u16,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Nbdkit {
    /// `multi-conn-mode=disable` hides the file plugin's multi-conn; `plugin` keeps it.
    pub fn start(file: &Path, mode: &str) -> Nbdkit {
        let (nbdkit, nbdinfo) = (require_tool("nbdkit"), require_tool("nbdinfo"));
        let opts = "--exit-with-parent -f -i 127.0.0.1 --filter=log --filter=multi-conn -p";
        for _ in 0..5 {
            let dir = tempdir();
            let log = dir.path().join("requests.log");
            let port = free_port();
            let mut child = Command::new(&nbdkit)
                .args(opts.split(' '))
                .arg(port.to_string())
                .arg("file")
                .arg(file)
                .arg(format!("multi-conn-mode={mode}"))
                .arg(format!("logfile={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .expect("start nbdkit");
            let uri = format!("nbd://127.0.0.1:{port}/");
            let ready = wait_until(READY_TIMEOUT, || {
                matches!(child.try_wait(), Ok(Some(_)))
                    || run(Command::new(&nbdinfo).args(["--size", &uri]), IO_TIMEOUT).success()
            });
            if ready && matches!(child.try_wait(), Ok(None)) {
                let _dir = dir;
                return Nbdkit {
                    child,
                    port,
                    log,
                    _dir,
                };
            }
            terminate(&mut child, Duration::from_secs(5)); // the port was taken: again
        }
        panic!("nbdkit did not start (see its stderr above)");
    }

    pub fn conn_args(&self) -> Vec<String> {
        let port = self.port.to_string();
        ["--conn-addr", "127.0.0.1", "--conn-port", &port]
            .map(String::from)
            .to_vec()
    }

    /// Stops nbdkit (SIGTERM, reaped) so that its log is complete, and parses it.
    pub fn finish(mut self) -> Vec<Entry> {
        terminate(&mut self.child, Duration::from_secs(10));
        parse_log(&std::fs::read_to_string(&self.log).expect("nbdkit log"))
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// A request as nbdkit's log filter saw it arrive: connection, action, offset.
pub type Entry = (u64, String, Option<u64>);

/// The `connection=N Act id=.. [offset=0x..]` lines (not the `...Act` returns).
pub fn parse_log(text: &str) -> Vec<Entry> {
    const REQUESTS: [&str; 7] = ["Read", "Write", "Flush", "Trim", "Zero", "Extents", "Cache"];
    let mut v = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(conn) = f.get(2).and_then(|c| c.strip_prefix("connection=")) else {
            continue;
        };
        let act = f.get(3).copied().unwrap_or("");
        if REQUESTS.contains(&act) {
            let offset = f.iter().find_map(|x| x.strip_prefix("offset=0x"));
            let offset = offset.map(|h| u64::from_str_radix(h, 16).expect("hex offset"));
            v.push((conn.parse().expect("connection"), act.to_owned(), offset));
        }
    }
    v
}
