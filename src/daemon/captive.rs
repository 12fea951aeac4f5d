//! `serve --run CMD` (nbdkit's captive mode): once the server listens, CMD
//! runs under `/bin/sh -c` with the server's address in its environment;
//! when it ends the server shuts down and exits with CMD's status.
//!
//! The environment, as nbdkit sets it: `uri` (`nbd://…`, `nbd+unix://…`,
//! `nbds…` with TLS), `nbd` (qemu's older `nbd:…` form), `port` (TCP),
//! `unixsocket` (unix), `exportname`, and `tls` (`0`, `1` or `2` for off,
//! on and require).

use crate::addr::Endpoint;
use crate::tls::TlsMode;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Between SIGTERM and SIGKILL when the server stops before CMD.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How often the waiting thread looks at CMD.
const POLL: Duration = Duration::from_millis(20);

/// The running command.
pub struct Captive {
    child: Arc<Mutex<Option<Child>>>,
}

/// What the command is told about the server.
pub struct Address<'a> {
    /// Where the server listens (the first TCP and first unix one are used).
    pub endpoints: &'a [Endpoint],
    pub export_name: &'a str,
    pub tls: TlsMode,
}

impl Address<'_> {
    /// The environment variables for CMD.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let tcp = self.endpoints.iter().find_map(|e| match e {
            Endpoint::Tcp(a) => Some(*a),
            Endpoint::Unix(_) => None,
        });
        let unix = self.endpoints.iter().find_map(|e| match e {
            Endpoint::Unix(p) => Some(p.as_path()),
            Endpoint::Tcp(_) => None,
        });
        let s = if self.tls == TlsMode::Off { "" } else { "s" };
        let name = uri_path(self.export_name);
        let mut env = Vec::new();
        // A unix socket is preferred for `uri`, as nbdkit does.
        if let Some(p) = unix {
            let sock = p.display().to_string();
            env.push((
                "uri",
                format!("nbd{s}+unix:///{name}?socket={}", uri_query(&sock)),
            ));
            env.push((
                "nbd",
                format!("nbd:unix:{sock}:exportname={}", self.export_name),
            ));
            env.push(("unixsocket", sock));
        }
        if let Some(a) = tcp {
            let host = host_of(a);
            if unix.is_none() {
                env.push(("uri", format!("nbd{s}://{host}:{}/{name}", a.port())));
                env.push((
                    "nbd",
                    format!("nbd:{host}:{}:exportname={}", a.port(), self.export_name),
                ));
            }
            env.push(("port", a.port().to_string()));
        }
        env.push(("exportname", self.export_name.to_owned()));
        let tls = match self.tls {
            TlsMode::Off => "0",
            TlsMode::On => "1",
            TlsMode::Require => "2",
        };
        env.push(("tls", tls.into()));
        env
    }
}

/// Where a client connects to `a`: a wildcard address means this host.
fn host_of(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v) if v.ip().is_unspecified() => "127.0.0.1".into(),
        SocketAddr::V4(v) => v.ip().to_string(),
        SocketAddr::V6(v) if v.ip().is_unspecified() => "[::1]".into(),
        SocketAddr::V6(v) => format!("[{}]", v.ip()),
    }
}

/// Percent-encodes what a URI path or query cannot hold as it is.
fn encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn uri_path(name: &str) -> String {
    encode(name, b"/:@!$&'()*+,;=")
}

fn uri_query(v: &str) -> String {
    encode(v, b"/:@!$'()*+,;")
}

impl Captive {
    /// Starts `sh -c cmd` with `env`; `exited` is called with its exit code
    /// (a shell's: 128 plus the signal if one killed it) when it ends.
    pub fn start(
        cmd: &str,
        env: &[(&'static str, String)],
        exited: Box<dyn FnOnce(i32) + Send>,
    ) -> std::io::Result<Captive> {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(cmd).process_group(0);
        // The service manager's socket is the server's, not the command's.
        c.env_remove("NOTIFY_SOCKET");
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn()?;
        info!("--run: started {cmd:?} (pid {})", child.id());
        let child = Arc::new(Mutex::new(Some(child)));
        let watched = child.clone();
        std::thread::Builder::new()
            .name("run".into())
            .spawn(move || loop {
                let mut g = watched.lock().unwrap_or_else(|p| p.into_inner());
                let Some(ch) = g.as_mut() else {
                    return; // stopped by the server
                };
                match ch.try_wait() {
                    Ok(None) => {}
                    Ok(Some(st)) => {
                        *g = None;
                        drop(g);
                        exited(crate::child::exit_code(st));
                        return;
                    }
                    Err(e) => {
                        warn!("--run: cannot wait for the command: {e}");
                        *g = None;
                        drop(g);
                        exited(1);
                        return;
                    }
                }
                drop(g);
                std::thread::sleep(POLL);
            })?;
        Ok(Captive { child })
    }

    /// Stops the command if it is still running (the server is stopping
    /// for another reason).
    pub fn stop(&self) {
        let mut g = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut ch) = g.take() {
            info!("--run: stopping the command (pid {})", ch.id());
            crate::child::kill_group(&mut ch, KILL_GRACE);
        }
    }
}

/// A private directory for `--unix -`: created mode 0700 under the
/// temporary directory, removed with what is in it at drop.
#[derive(Debug)]
pub struct PrivateDir(std::path::PathBuf);

impl PrivateDir {
    pub fn create() -> std::io::Result<PrivateDir> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        let mut n = 0u32;
        loop {
            let p = base.join(format!("flexnbd-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&p) {
                Ok(()) => return Ok(PrivateDir(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(eps: &[Endpoint], name: &str, tls: TlsMode) -> Vec<(&'static str, String)> {
        Address {
            endpoints: eps,
            export_name: name,
            tls,
        }
        .env()
    }

    fn get<'a>(env: &'a [(&'static str, String)], k: &str) -> Option<&'a str> {
        env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn tcp_unix_names_and_tls_make_the_uris_clients_expect() {
        let tcp = Endpoint::Tcp("0.0.0.0:10809".parse().unwrap());
        let e = env_of(std::slice::from_ref(&tcp), "", TlsMode::Off);
        assert_eq!(get(&e, "uri"), Some("nbd://127.0.0.1:10809/"));
        assert_eq!(get(&e, "nbd"), Some("nbd:127.0.0.1:10809:exportname="));
        assert_eq!(get(&e, "port"), Some("10809"));
        assert_eq!(get(&e, "unixsocket"), None);
        assert_eq!(get(&e, "tls"), Some("0"));

        let v6 = Endpoint::Tcp("[::1]:7000".parse().unwrap());
        let e = env_of(&[v6], "a b/c", TlsMode::Require);
        assert_eq!(get(&e, "uri"), Some("nbds://[::1]:7000/a%20b/c"));
        assert_eq!(get(&e, "exportname"), Some("a b/c"));
        assert_eq!(get(&e, "tls"), Some("2"));

        let unix = Endpoint::Unix("/tmp/x y/s".into());
        let e = env_of(&[tcp, unix], "disk", TlsMode::On);
        assert_eq!(
            get(&e, "uri"),
            Some("nbds+unix:///disk?socket=/tmp/x%20y/s")
        );
        assert_eq!(get(&e, "unixsocket"), Some("/tmp/x y/s"));
        assert_eq!(get(&e, "nbd"), Some("nbd:unix:/tmp/x y/s:exportname=disk"));
        assert_eq!(get(&e, "port"), Some("10809"));
    }
}
