//! Shared harness for the `serve_*` integration tests: temp images, a guard
//! around a running `flexnbd serve`, commands with time limits, python-libnbd
//! scripts and a tiny hand-written NBD wire client for byte-level checks.
//!
//! Every process started here is stopped (SIGTERM, then SIGKILL after a
//! deadline) and reaped; every wait is bounded; readiness is polled.

#![allow(dead_code)]

pub mod certs;
pub mod fakeupstream;
pub mod migration;
pub mod nbdkit;
pub mod proxy;
#[allow(unused_imports)]
pub use migration::*;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test: this build's, or the one `FLEXNBD_TEST_BIN` names
/// (to run the suite against another build).
pub fn bin() -> PathBuf {
    match std::env::var_os("FLEXNBD_TEST_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_flexnbd")),
    }
}
/// The python that has the `nbd` module (python3-libnbd); never the first one on PATH.
pub const PYTHON: &str = "/usr/bin/python3";

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * 1024 * 1024;

/// How long a server gets to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server gets to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// Default limit for a client tool run.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// Read/write timeout of raw test sockets.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

pub const SIGINT: i32 = 2;
pub const SIGQUIT: i32 = 3;
pub const SIGKILL: i32 = 9;
pub const SIGTERM: i32 = 15;
pub const SIGCONT: i32 = 18;
pub const SIGSTOP: i32 = 19;

// ---------------------------------------------------------------- signals

/// Sends `sig` to process `pid`.
#[allow(unsafe_code)]
pub fn send_signal(pid: u32, sig: i32) -> bool {
    // SAFETY: kill(2) takes two integers and touches no memory of ours; the pid
    // is one of our own children, not yet reaped.
    unsafe { libc::kill(pid as libc::pid_t, sig) == 0 }
}

/// Polls `cond` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for a child to exit; `None` if it is still running at the deadline.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM, then SIGKILL after `grace`; always reaps.
pub fn terminate(child: &mut Child, grace: Duration) -> ExitStatus {
    if let Ok(Some(s)) = child.try_wait() {
        return s;
    }
    send_signal(child.id(), SIGTERM);
    if let Some(s) = wait_child(child, grace) {
        return s;
    }
    let _ = child.kill();
    child.wait().expect("reap child")
}

// ---------------------------------------------------------------- files

/// A free TCP port on 127.0.0.1 (bound and released; the caller retries on a race).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A fresh temporary directory (under $TMPDIR or /tmp).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("flexnbd-test-")
        .tempdir()
        .expect("create temp dir")
}

/// Free bytes on the file system holding `path` (via `df`).
pub fn free_bytes(path: &Path) -> Option<u64> {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// A temp dir for large images: /dev/shm when it has `need` bytes free, else the default.
pub fn big_tempdir(need: u64) -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && free_bytes(shm).is_some_and(|f| f >= need) {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("flexnbd-test-")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempdir()
}

/// A small deterministic PRNG (SplitMix64): reproducible images and fuzz input.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// `n` pseudo-random bytes from `seed` (a 4 KiB block of zeroes is vanishingly unlikely).
pub fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    Rng::new(seed).bytes(n)
}

/// Creates `path` with `size` pseudo-random bytes (fully allocated).
pub fn create_random_file(path: &Path, size: u64, seed: u64) {
    let mut f = File::create(path).expect("create image");
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write image");
        left -= n as u64;
    }
    f.sync_all().expect("sync image");
}

/// Creates `path` as an empty sparse file of `size` bytes.
pub fn create_sparse_file(path: &Path, size: u64) {
    let f = File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    f.sync_all().expect("sync image");
}

/// Writes `data` at `offset` of an existing file and syncs it.
pub fn write_file_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image for writing");
    f.write_all_at(data, offset).expect("write image");
    f.sync_all().expect("sync image");
}

/// Reads `len` bytes at `offset` (short at the end of the file).
pub fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).expect("open image");
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = f
            .read_at(&mut buf[done..], offset + done as u64)
            .expect("read image");
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    buf
}

pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read image")
}

/// Bytes actually allocated to the file (st_blocks * 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat image").blocks() * 512
}

/// MD5 of a file (`md5sum`), as hex.
pub fn md5_file(path: &Path) -> String {
    let out = run(Command::new("md5sum").arg(path), Duration::from_secs(300));
    assert!(out.status.success(), "md5sum failed: {}", out.stderr_str());
    out.stdout_str()
        .split_whitespace()
        .next()
        .expect("md5sum output")
        .to_owned()
}

/// FNV-1a of a byte slice: a cheap fingerprint for comparing small images.
pub fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Index and value of the first differing byte, for readable assertion messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<(usize, Option<u8>, Option<u8>)> {
    let n = a.len().max(b.len());
    (0..n)
        .find(|&i| a.get(i) != b.get(i))
        .map(|i| (i, a.get(i).copied(), b.get(i).copied()))
}

/// Asserts two byte slices are equal without dumping megabytes on failure.
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8], what: &str) {
    if let Some((i, a, e)) = first_difference(actual, expected) {
        panic!(
            "{what}: differs at byte {i} (actual {a:?}, expected {e:?}); lengths {} vs {}",
            actual.len(),
            expected.len()
        );
    }
}

// ---------------------------------------------------------------- commands

/// What a finished command produced.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl CmdOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics with both outputs unless the command exited 0.
    #[track_caller]
    pub fn expect_success(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what} failed with {:?}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout_str(),
            self.stderr_str()
        );
        self
    }
}

/// Runs a command with a time limit; a command that runs over is killed and the
/// test fails. stdin is closed.
#[track_caller]
pub fn run(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    run_with_stdin(cmd, None, timeout)
}

/// Like [`run`], feeding `input` on stdin.
#[track_caller]
pub fn run_with_stdin(cmd: &mut Command, input: Option<Vec<u8>>, timeout: Duration) -> CmdOutput {
    let desc = format!("{cmd:?}");
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("cannot run {desc}: {e}"),
    };
    let feeder = input.map(|data| {
        let mut stdin = child.stdin.take().expect("stdin");
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        })
    });
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = match wait_child(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = t_err.join().unwrap_or_default();
            panic!(
                "{desc} timed out after {timeout:?} and was killed; stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    CmdOutput {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Finds `name` on PATH, in /usr/bin or in the sbin directories.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Finds `name` on PATH or fails the test with a clear message (CI installs it).
#[track_caller]
pub fn require_tool(name: &str) -> PathBuf {
    if let Some(p) = find_tool(name) {
        return p;
    }
    panic!(
        "required tool `{name}` is not installed (Debian: apt-get install libnbd-bin nbdkit \
         qemu-utils python3-libnbd fio); this test cannot run without it"
    );
}

/// Fails the test unless /usr/bin/python3 can `import nbd`.
#[track_caller]
pub fn require_python_nbd() {
    assert!(
        Path::new(PYTHON).is_file(),
        "{PYTHON} is missing: install python3 and python3-libnbd"
    );
    let out = run(
        Command::new(PYTHON).args(["-c", "import nbd"]),
        Duration::from_secs(30),
    );
    assert!(
        out.success(),
        "{PYTHON} cannot import nbd (install python3-libnbd): {}",
        out.stderr_str()
    );
}

/// Helpers every python script gets.
pub const PY_PRELUDE: &str = r#"
import nbd, sys, json, os, errno
def connect(uri, strict=None, meta=False):
    h = nbd.NBD()
    if meta:
        h.add_meta_context("base:allocation")
    if strict is not None:
        h.set_strict_mode(strict)
    # nbds:// URIs name a certificate directory.
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    return h
def server_err(f, *a, **k):
    """Runs f; returns the errno of a server-side failure, 0 on success.
    A client-side refusal (no 'command failed') is reported as -1."""
    try:
        f(*a, **k)
    except nbd.Error as e:
        if "command failed" not in (e.string or ""):
            sys.stderr.write("client-side error: %s\n" % e.string)
            return -1
        return e.errnum
    return 0
def file_bytes(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)
def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
"#;

/// Runs a python-libnbd script (with [`PY_PRELUDE`]) under a time limit.
/// `args` become `sys.argv[1:]`.
#[track_caller]
pub fn python(script: &str, args: &[String], timeout: Duration) -> CmdOutput {
    require_python_nbd();
    let full = format!("{PY_PRELUDE}\n{script}");
    run(Command::new(PYTHON).arg("-c").arg(full).args(args), timeout)
}

/// Runs a script that must exit 0 and whose last stdout line is JSON.
#[track_caller]
pub fn python_json(script: &str, args: &[String], timeout: Duration) -> serde_json::Value {
    last_line_json(&python(script, args, timeout))
}

/// Runs a script (with [`PY_PRELUDE`]) in `nbdsh`, libnbd's own shell, under
/// a time limit; `-n`: the script makes its handles itself. `args` become
/// `sys.argv[1:]`. nbdsh runs the first `python3` on PATH, so Debian's (the
/// one with the nbd module) is put first.
#[track_caller]
pub fn nbdsh(script: &str, args: &[String], timeout: Duration) -> CmdOutput {
    require_python_nbd();
    let nbdsh = require_tool("nbdsh");
    let full = format!(
        "{PY_PRELUDE}\nsys.argv = ['nbdsh'] + json.loads(os.environ['FLEXNBD_TEST_ARGV'])\n{script}"
    );
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    run(
        Command::new(nbdsh)
            .arg("-n")
            .arg("-c")
            .arg(full)
            .env("PATH", path)
            .env("FLEXNBD_TEST_ARGV", serde_json::to_string(args).unwrap()),
        timeout,
    )
}

/// Runs an [`nbdsh`] script that must exit 0 and whose last stdout line is JSON.
#[track_caller]
pub fn nbdsh_json(script: &str, args: &[String], timeout: Duration) -> serde_json::Value {
    last_line_json(&nbdsh(script, args, timeout))
}

#[track_caller]
fn last_line_json(out: &CmdOutput) -> serde_json::Value {
    out.expect_success("script");
    let text = out.stdout_str();
    let last = text.lines().last().unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("script output is not JSON ({e}): {text}"))
}

/// `nbdinfo --json URI`, parsed.
#[track_caller]
pub fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let tool = require_tool("nbdinfo");
    let out = run(Command::new(tool).args(["--json", uri]), TOOL_TIMEOUT);
    out.expect_success("nbdinfo --json");
    serde_json::from_slice(&out.stdout).expect("nbdinfo JSON")
}

// ---------------------------------------------------------------- server

/// How to start `flexnbd serve`.
#[derive(Debug, Clone, Default)]
pub struct Serve {
    pub file: PathBuf,
    /// TCP address to listen on (a free port is picked); `None` with `unix` only.
    pub addr: Option<String>,
    pub unix: Option<PathBuf>,
    pub sock: Option<PathBuf>,
    /// Extra arguments (flags, ACL entries) appended after the others.
    pub extra: Vec<String>,
    /// Run `flexnbd proxy` with these upstream arguments instead of serving `file`.
    pub proxy: Option<Vec<String>>,
    /// Environment variables set for the process.
    pub env: Vec<(String, String)>,
}

impl Serve {
    /// Serve `file` on 127.0.0.1 and a free port.
    pub fn tcp(file: &Path) -> Serve {
        Serve {
            file: file.to_owned(),
            addr: Some("127.0.0.1".into()),
            ..Serve::default()
        }
    }

    /// `flexnbd proxy` on 127.0.0.1 and a free port, to the upstream that
    /// `upstream` names (`--conn-addr A --conn-port P` or `--conn-unix S`).
    pub fn proxy(upstream: &[String]) -> Serve {
        Serve {
            addr: Some("127.0.0.1".into()),
            proxy: Some(upstream.to_vec()),
            ..Serve::default()
        }
    }

    /// Serve `file` on a unix socket only.
    pub fn unix(file: &Path, sock: &Path) -> Serve {
        Serve {
            file: file.to_owned(),
            unix: Some(sock.to_owned()),
            ..Serve::default()
        }
    }

    pub fn addr(mut self, a: &str) -> Serve {
        self.addr = Some(a.to_owned());
        self
    }

    pub fn control(mut self, sock: &Path) -> Serve {
        self.sock = Some(sock.to_owned());
        self
    }

    pub fn arg(mut self, a: &str) -> Serve {
        self.extra.push(a.to_owned());
        self
    }

    pub fn args(mut self, a: &[&str]) -> Serve {
        self.extra.extend(a.iter().map(|s| s.to_string()));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Serve {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    pub fn start(self) -> Server {
        Server::start(self)
    }
}

/// A running `flexnbd serve`; dropping it stops and reaps the process.
pub struct Server {
    child: Child,
    pub port: Option<u16>,
    pub ip: Option<IpAddr>,
    pub unix: Option<PathBuf>,
    pub sock: Option<PathBuf>,
    pub file: PathBuf,
    log: PathBuf,
    _logdir: tempfile::TempDir,
    exited: Option<ExitStatus>,
}

impl Server {
    /// Starts the server and polls until it is ready; retries with another port
    /// if the picked one was taken meanwhile.
    #[track_caller]
    pub fn start(cfg: Serve) -> Server {
        let mut last_err = String::new();
        for _ in 0..5 {
            match Server::try_start(&cfg) {
                Ok(s) => return s,
                Err(e) => last_err = e,
            }
        }
        panic!("flexnbd did not start: {last_err}");
    }

    fn try_start(cfg: &Serve) -> Result<Server, String> {
        let logdir = tempdir();
        let log = logdir.path().join("server.stderr");
        let mut args: Vec<String> = vec![match cfg.proxy {
            Some(_) => "proxy".into(),
            None => "serve".into(),
        }];
        let mut port = None;
        let mut ip = None;
        if let Some(a) = &cfg.addr {
            let p = free_port();
            port = Some(p);
            ip = Some(
                a.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .map_err(|e| format!("test bug: bad addr {a}: {e}"))?,
            );
            args.extend(["--addr".into(), a.clone(), "--port".into(), p.to_string()]);
        }
        match &cfg.proxy {
            Some(up) => args.extend(up.iter().cloned()),
            None => args.extend(["--file".into(), cfg.file.display().to_string()]),
        }
        if let Some(u) = &cfg.unix {
            args.extend(["--unix".into(), u.display().to_string()]);
        }
        if let Some(s) = &cfg.sock {
            args.extend(["--sock".into(), s.display().to_string()]);
        }
        args.extend(cfg.extra.iter().cloned());
        let child = Command::new(bin())
            .args(&args)
            .envs(cfg.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", bin().display()))?;
        let mut s = Server {
            child,
            port,
            ip,
            unix: cfg.unix.clone(),
            sock: cfg.sock.clone(),
            file: cfg.file.clone(),
            log,
            _logdir: logdir,
            exited: None,
        };
        let ready = wait_until(READY_TIMEOUT, || {
            if s.child.try_wait().ok().flatten().is_some() {
                return true;
            }
            s.is_ready()
        });
        if let Ok(Some(st)) = s.child.try_wait() {
            s.exited = Some(st);
            return Err(format!(
                "exited early with {st:?}; args {args:?}; stderr:\n{}",
                s.stderr()
            ));
        }
        if !ready {
            return Err(format!(
                "not ready after {READY_TIMEOUT:?}; args {args:?}; stderr:\n{}",
                s.stderr()
            ));
        }
        Ok(s)
    }

    /// Ready means: the control socket exists (it appears only once the
    /// listeners are bound), or else every listener accepts a connection.
    fn is_ready(&self) -> bool {
        if let Some(sock) = &self.sock {
            return sock.exists();
        }
        if let Some(a) = self.tcp_addr() {
            if TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_err() {
                return false;
            }
        }
        if let Some(u) = &self.unix {
            if UnixStream::connect(u).is_err() {
                return false;
            }
        }
        true
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.ip?, self.port?))
    }

    pub fn addr(&self) -> SocketAddr {
        self.tcp_addr().expect("server has no TCP listener")
    }

    /// `nbd://HOST:PORT/` for the TCP listener.
    pub fn uri(&self) -> String {
        match self.addr() {
            SocketAddr::V4(a) => format!("nbd://{}:{}/", a.ip(), a.port()),
            SocketAddr::V6(a) => format!("nbd://[{}]:{}/", a.ip(), a.port()),
        }
    }

    /// `nbd+unix:///?socket=PATH` for the unix listener.
    pub fn unix_uri(&self) -> String {
        let p = self.unix.as_ref().expect("server has no unix listener");
        format!("nbd+unix:///?socket={}", p.display())
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        assert!(send_signal(self.pid(), sig), "cannot signal the server");
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(s)) => {
                self.exited = Some(s);
                false
            }
            _ => true,
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.exited {
            return Some(s);
        }
        let s = wait_child(&mut self.child, timeout);
        self.exited = s;
        s
    }

    /// Sends `sig` and waits for the exit; fails the test if it does not exit in time.
    #[track_caller]
    pub fn stop_with(&mut self, sig: i32) -> ExitStatus {
        if let Some(s) = self.exited {
            panic!(
                "server already exited with {s:?}; stderr:\n{}",
                self.stderr()
            );
        }
        self.signal(sig);
        match self.wait_exit(STOP_TIMEOUT) {
            Some(s) => s,
            None => {
                let _ = self.child.kill();
                let s = self.child.wait().ok();
                self.exited = s;
                panic!(
                    "server did not exit within {STOP_TIMEOUT:?} of signal {sig}; stderr:\n{}",
                    self.stderr()
                );
            }
        }
    }

    /// SIGTERM and a clean exit (status 0) are required.
    #[track_caller]
    pub fn stop(&mut self) {
        let st = self.stop_with(SIGTERM);
        assert!(
            st.success(),
            "server exited with {st:?} after SIGTERM; stderr:\n{}",
            self.stderr()
        );
    }

    /// Fails the test if the server died.
    #[track_caller]
    pub fn assert_alive(&mut self) {
        assert!(
            self.is_running(),
            "server died: {:?}; stderr:\n{}",
            self.exited,
            self.stderr()
        );
    }

    /// Lines of the log that contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.stderr().lines().filter(|l| l.contains(needle)).count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exited.is_none() {
            self.exited = Some(terminate(&mut self.child, Duration::from_secs(10)));
        }
        if std::thread::panicking() {
            let log = self.stderr();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- server stderr (last lines) ----");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

// ---------------------------------------------------------------- raw NBD

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_MAGIC: u32 = 0x6744_6698;
pub const CHUNK_MAGIC: u32 = 0x668e_33ef;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;

/// Encodes a request header by hand (independent of the crate's encoder).
pub fn request(cmd: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&length.to_be_bytes());
    b
}

/// Encodes an option request by hand.
pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Data of NBD_OPT_GO/INFO: empty export name and the given info requests.
pub fn go_data(infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&0u32.to_be_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Data of NBD_OPT_{LIST,SET}_META_CONTEXT: empty export name and the queries.
pub fn meta_data(queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&0u32.to_be_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// An option reply as read from the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

/// One reply of the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple { error: u32, cookie: u64 },
    Chunk(Chunk),
}

/// A hand-driven NBD connection with bounded reads and writes.
pub struct Raw {
    pub s: TcpStream,
}

/// What the server did when more bytes were expected.
#[derive(Debug, PartialEq, Eq)]
pub enum Eof {
    /// Orderly close (read returned 0) after this many bytes.
    Closed(usize),
    /// Connection reset.
    Reset(usize),
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect to server");
        Raw::from_stream(s)
    }

    pub fn from_stream(s: TcpStream) -> Raw {
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let _ = s.set_nodelay(true);
        Raw { s }
    }

    #[track_caller]
    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send to server");
    }

    /// Sends, tolerating a server that already closed.
    pub fn try_send(&mut self, b: &[u8]) -> bool {
        self.s.write_all(b).is_ok()
    }

    /// Reads exactly `n` bytes or reports how the stream ended. A timeout fails the test.
    #[track_caller]
    pub fn read_n(&mut self, n: usize) -> Result<Vec<u8>, Eof> {
        let mut buf = vec![0u8; n];
        let mut done = 0;
        while done < n {
            match self.s.read(&mut buf[done..]) {
                Ok(0) => return Err(Eof::Closed(done)),
                Ok(k) => done += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(Eof::Reset(done))
                }
                Err(e) => panic!("reading from the server: {e} after {done} of {n} bytes"),
            }
        }
        Ok(buf)
    }

    #[track_caller]
    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        match self.read_n(n) {
            Ok(b) => b,
            Err(e) => panic!("server ended the connection while {n} bytes were expected: {e:?}"),
        }
    }

    /// Expects the server to end the connection, sending nothing more.
    /// Returns the bytes that arrived before the end.
    #[track_caller]
    pub fn expect_closed(&mut self) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return got,
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
                Err(e) => panic!(
                    "server did not close the connection ({e}); {} bytes received",
                    got.len()
                ),
            }
        }
    }

    /// Reads and checks the 18-byte fixed-newstyle greeting; returns its flags.
    #[track_caller]
    pub fn newstyle_greeting(&mut self) -> u16 {
        let g = self.read_exact(18);
        assert_eq!(be64(&g, 0), NBDMAGIC, "greeting magic");
        assert_eq!(be64(&g, 8), IHAVEOPT, "greeting IHAVEOPT");
        be16(&g, 16)
    }

    /// Greeting plus client flags FIXED_NEWSTYLE | NO_ZEROES.
    #[track_caller]
    pub fn handshake(addr: SocketAddr) -> Raw {
        let mut r = Raw::connect(addr);
        let f = r.newstyle_greeting();
        assert_eq!(f, 3, "handshake flags: FIXED_NEWSTYLE | NO_ZEROES");
        r.send(&3u32.to_be_bytes());
        r
    }

    #[track_caller]
    pub fn opt_reply(&mut self) -> OptReply {
        let h = self.read_exact(20);
        assert_eq!(be64(&h, 0), REPLY_MAGIC, "option reply magic in {h:02x?}");
        let len = be32(&h, 16) as usize;
        assert!(len <= 64 * 1024, "option reply of {len} bytes");
        OptReply {
            option: be32(&h, 8),
            kind: be32(&h, 12),
            data: self.read_exact(len),
        }
    }

    /// Sends an option and collects replies up to the final one (ACK or error).
    #[track_caller]
    pub fn opt(&mut self, opt: u32, data: &[u8]) -> Vec<OptReply> {
        self.send(&option(opt, data));
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.option, opt, "option echoed in its reply");
            let last = r.kind == REP_ACK || r.kind & 0x8000_0000 != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// NBD_OPT_GO with no info requests; returns (size, transmission flags).
    #[track_caller]
    pub fn go(&mut self) -> (u64, u16) {
        let reps = self.opt(OPT_GO, &go_data(&[]));
        let last = reps.last().unwrap();
        assert_eq!(last.kind, REP_ACK, "GO answered {reps:?}");
        let export = reps
            .iter()
            .find(|r| r.kind == REP_INFO && be16(&r.data, 0) == 0)
            .expect("NBD_INFO_EXPORT before the ACK");
        assert_eq!(export.data.len(), 12, "NBD_INFO_EXPORT length");
        (be64(&export.data, 2), be16(&export.data, 10))
    }

    /// Handshake and GO, simple replies.
    #[track_caller]
    pub fn simple(addr: SocketAddr) -> Raw {
        let mut r = Raw::handshake(addr);
        r.go();
        r
    }

    /// Handshake, structured replies, base:allocation, GO.
    #[track_caller]
    pub fn structured(addr: SocketAddr) -> Raw {
        let mut r = Raw::handshake(addr);
        let sr = r.opt(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(sr.last().unwrap().kind, REP_ACK);
        let mc = r.opt(OPT_SET_META_CONTEXT, &meta_data(&["base:allocation"]));
        assert_eq!(mc.last().unwrap().kind, REP_ACK);
        r.go();
        r
    }

    #[track_caller]
    pub fn req(&mut self, cmd: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        self.send(&request(cmd, flags, cookie, offset, length));
    }

    /// Reads one reply header; simple replies carry no data here (see [`read_data`]).
    #[track_caller]
    pub fn reply(&mut self) -> Reply {
        let m = self.read_exact(4);
        match be32(&m, 0) {
            SIMPLE_MAGIC => {
                let r = self.read_exact(12);
                Reply::Simple {
                    error: be32(&r, 0),
                    cookie: be64(&r, 4),
                }
            }
            CHUNK_MAGIC => {
                let h = self.read_exact(16);
                let len = be32(&h, 12) as usize;
                assert!(len <= 64 << 20, "chunk of {len} bytes");
                Reply::Chunk(Chunk {
                    flags: be16(&h, 0),
                    kind: be16(&h, 2),
                    cookie: be64(&h, 4),
                    payload: self.read_exact(len),
                })
            }
            other => panic!("bad reply magic {other:#010x}"),
        }
    }

    /// Expects a simple reply with this cookie; returns its error.
    #[track_caller]
    pub fn simple_reply(&mut self, cookie: u64) -> u32 {
        match self.reply() {
            Reply::Simple { error, cookie: c } => {
                assert_eq!(c, cookie, "cookie echoed");
                error
            }
            r => panic!("expected a simple reply, got {r:?}"),
        }
    }

    /// A simple-reply READ: sends it, expects success and returns the data.
    #[track_caller]
    pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.req(CMD_READ, 0, cookie, offset, len);
        let e = self.simple_reply(cookie);
        assert_eq!(e, 0, "READ {offset}+{len} failed with {e}");
        self.read_exact(len as usize)
    }

    /// A simple-reply WRITE: returns the error.
    #[track_caller]
    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        let mut b = request(CMD_WRITE, 0, cookie, offset, data.len() as u32).to_vec();
        b.extend_from_slice(data);
        self.send(&b);
        self.simple_reply(cookie)
    }

    pub fn shutdown(&self) {
        let _ = self.s.shutdown(Shutdown::Both);
    }
}

/// Connects to `server` from a chosen local address (e.g. 127.0.0.2).
pub fn connect_from(local: IpAddr, server: SocketAddr) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let domain = if server.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SockAddr::from(SocketAddr::new(local, 0)))?;
    s.connect_timeout(&SockAddr::from(server), IO_TIMEOUT)?;
    Ok(s.into())
}

/// Whether ::1 is configured (an IPv6 loopback socket can be bound).
pub fn ipv6_loopback() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

/// Checks a log line against `^[DIWEF]:\d+ \S+ \S+:\d+: ` (returns the level).
pub fn log_level(line: &str) -> Option<char> {
    let (level, rest) = line.split_once(':')?;
    let lc = level.chars().next()?;
    if level.len() != 1 || !"DIWEF".contains(lc) {
        return None;
    }
    // rest = "PID THREAD FILE:LINE: MSG"
    let (pid, rest) = rest.split_once(' ')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (thread, rest) = rest.split_once(' ')?;
    if thread.is_empty() {
        return None;
    }
    let (loc, _msg) = rest.split_once(": ")?;
    if loc.contains(char::is_whitespace) {
        return None;
    }
    let (file, line_no) = loc.rsplit_once(':')?;
    if file.is_empty() || line_no.is_empty() || !line_no.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(lc)
}

// ---------------------------------------------------------------- migration (migrate_* tests)

/// How to start `flexnbd serve` or `flexnbd listen` for a migration test: a
/// TCP listener on `ip` (a free port unless one is given), a control socket
/// (readiness = the socket exists), `--verbose` so the log tells what happened,
/// and optional environment variables.
#[derive(Debug, Clone)]
pub struct Daemon {
    pub mode: &'static str,
    pub file: PathBuf,
    pub ip: IpAddr,
    pub port: Option<u16>,
    pub sock: PathBuf,
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Daemon {
    /// `flexnbd serve --addr 127.0.0.1 --port FREE --file FILE --sock SOCK -v`.
    pub fn serve(file: &Path, sock: &Path) -> Daemon {
        Daemon {
            mode: "serve",
            file: file.to_owned(),
            ip: IpAddr::from([127, 0, 0, 1]),
            port: None,
            sock: sock.to_owned(),
            extra: vec!["--verbose".into()],
            env: Vec::new(),
        }
    }

    /// `flexnbd proxy --addr 127.0.0.1 --port FREE --sock SOCK -v` to `upstream`.
    pub fn proxy(sock: &Path, upstream: &Server) -> Daemon {
        let mut d = Daemon {
            mode: "proxy",
            ..Daemon::serve(Path::new(""), sock)
        };
        d.extra.extend(upstream.conn_args());
        d
    }

    /// `flexnbd listen --addr 127.0.0.1 --port FREE --file FILE --sock SOCK -v`.
    pub fn listen(file: &Path, sock: &Path) -> Daemon {
        Daemon {
            mode: "listen",
            ..Daemon::serve(file, sock)
        }
    }

    pub fn ip(mut self, ip: &str) -> Daemon {
        self.ip = ip.parse().expect("test bug: bad IP");
        self
    }

    pub fn port(mut self, port: u16) -> Daemon {
        self.port = Some(port);
        self
    }

    pub fn arg(mut self, a: &str) -> Daemon {
        self.extra.push(a.to_owned());
        self
    }

    pub fn args(mut self, a: &[&str]) -> Daemon {
        self.extra.extend(a.iter().map(|s| s.to_string()));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Daemon {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    /// Starts it and polls until the control socket appears; retries with
    /// another port when a picked one was taken meanwhile.
    #[track_caller]
    pub fn start(self) -> Server {
        let mut last_err = String::new();
        let tries = if self.port.is_some() { 1 } else { 5 };
        for _ in 0..tries {
            match self.try_start() {
                Ok(s) => return s,
                Err(e) => last_err = e,
            }
        }
        panic!("flexnbd {} did not start: {last_err}", self.mode);
    }

    pub fn try_start(&self) -> Result<Server, String> {
        let logdir = tempdir();
        let log = logdir.path().join("server.stderr");
        let port = self.port.unwrap_or_else(free_port);
        // A socket file left by a killed process would look "ready" at once.
        let _ = std::fs::remove_file(&self.sock);
        let mut args: Vec<String> = vec![
            self.mode.into(),
            "--addr".into(),
            self.ip.to_string(),
            "--port".into(),
            port.to_string(),
            "--sock".into(),
            self.sock.display().to_string(),
        ];
        if self.mode != "proxy" {
            args.extend(["--file".into(), self.file.display().to_string()]);
        }
        args.extend(self.extra.iter().cloned());
        let mut cmd = Command::new(bin());
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).map_err(|e| e.to_string())?);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", bin().display()))?;
        let mut s = Server {
            child,
            port: Some(port),
            ip: Some(self.ip),
            unix: None,
            sock: Some(self.sock.clone()),
            file: self.file.clone(),
            log,
            _logdir: logdir,
            exited: None,
        };
        let sock = self.sock.clone();
        let ready = wait_until(READY_TIMEOUT, || {
            s.child.try_wait().ok().flatten().is_some() || sock.exists()
        });
        if let Ok(Some(st)) = s.child.try_wait() {
            s.exited = Some(st);
            return Err(format!(
                "exited early with {st:?}; args {args:?}; stderr:\n{}",
                s.stderr()
            ));
        }
        if !ready {
            return Err(format!(
                "not ready after {READY_TIMEOUT:?}; args {args:?}; stderr:\n{}",
                s.stderr()
            ));
        }
        Ok(s)
    }
}

impl Server {
    /// `--conn-addr IP --conn-port PORT` (or `--conn-unix PATH` for a
    /// unix-only server): how a proxy reaches this server.
    pub fn conn_args(&self) -> Vec<String> {
        match self.tcp_addr() {
            Some(a) => vec![
                "--conn-addr".into(),
                a.ip().to_string(),
                "--conn-port".into(),
                a.port().to_string(),
            ],
            None => vec![
                "--conn-unix".into(),
                self.unix
                    .as_ref()
                    .expect("server has no listener")
                    .display()
                    .to_string(),
            ],
        }
    }

    /// The control socket (panics when the server has none).
    pub fn ctl(&self) -> &Path {
        self.sock.as_deref().expect("server has no control socket")
    }

    /// The exit status if the process has exited (without waiting).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.is_running();
        self.exited
    }

    /// SIGKILL, reaped at once (simulates a crash).
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        let _ = self.child.kill();
        let s = self.child.wait().expect("reap killed server");
        self.exited = Some(s);
        s
    }
}

/// Sends one control request (`lines`, then the empty line) and returns the
/// reply `(code, text)`; bounded by [`IO_TIMEOUT`].
pub fn control_request(sock: &Path, lines: &[&str]) -> std::io::Result<(u32, String)> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut req = String::new();
    for l in lines {
        req.push_str(l);
        req.push('\n');
    }
    req.push('\n');
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let line = text.strip_suffix('\n').unwrap_or(&text);
    let (code, rest) = line.split_once(": ").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad reply {text:?}"),
        )
    })?;
    let code = code.parse::<u32>().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad reply code {text:?}"),
        )
    })?;
    Ok((code, rest.to_owned()))
}

/// `key=value` pairs of a status line, in order.
pub fn parse_status_line(text: &str) -> Vec<(String, String)> {
    text.split_whitespace()
        .map(|f| {
            let (k, v) = f
                .split_once('=')
                .unwrap_or_else(|| panic!("status field without '=': {f:?} in {text:?}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// A server's status as a map; `None` when its control socket does not answer.
pub fn try_status(sock: &Path) -> Option<std::collections::BTreeMap<String, String>> {
    match control_request(sock, &["status"]) {
        Ok((0, text)) => Some(parse_status_line(&text).into_iter().collect()),
        _ => None,
    }
}

/// A server's status as a map; the server must answer.
#[track_caller]
pub fn status_map(sock: &Path) -> std::collections::BTreeMap<String, String> {
    match control_request(sock, &["status"]) {
        Ok((0, text)) => parse_status_line(&text).into_iter().collect(),
        other => panic!("status of {} failed: {other:?}", sock.display()),
    }
}

/// One numeric status value; panics when missing or not a number.
#[track_caller]
pub fn status_u64(st: &std::collections::BTreeMap<String, String>, key: &str) -> u64 {
    st.get(key)
        .unwrap_or_else(|| panic!("status has no {key}: {st:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("status {key} is not a number: {st:?}"))
}

/// Runs `flexnbd ARGS...` under [`TOOL_TIMEOUT`].
#[track_caller]
pub fn flexnbd(args: &[&str]) -> CmdOutput {
    run(Command::new(bin()).args(args), TOOL_TIMEOUT)
}

/// `flexnbd mirror --addr ADDR --port PORT --sock SOCK EXTRA...`.
#[track_caller]
pub fn mirror_cmd(src: &Path, dest: SocketAddr, extra: &[&str]) -> CmdOutput {
    let ip = dest.ip().to_string();
    let port = dest.port().to_string();
    let sock = src.display().to_string();
    let mut args = vec!["mirror", "--addr", &ip, "--port", &port, "--sock", &sock];
    args.extend_from_slice(extra);
    flexnbd(&args)
}

/// A background process (e.g. a python load generator) with its output in
/// files; killed and reaped when dropped.
pub struct Background {
    child: Child,
    dir: tempfile::TempDir,
    pub status: Option<ExitStatus>,
}

impl Background {
    /// Starts `cmd` with stdout and stderr going to files.
    pub fn spawn(cmd: &mut Command) -> Background {
        let dir = tempdir();
        let out = File::create(dir.path().join("stdout")).expect("stdout file");
        let err = File::create(dir.path().join("stderr")).expect("stderr file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Background {
            child,
            dir,
            status: None,
        }
    }

    /// A python-libnbd script (with [`PY_PRELUDE`]) in the background.
    pub fn python(script: &str, args: &[String]) -> Background {
        require_python_nbd();
        let full = format!("{PY_PRELUDE}\n{script}");
        Background::spawn(Command::new(PYTHON).arg("-c").arg(full).args(args))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        if self.status.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(s)) => {
                self.status = Some(s);
                false
            }
            _ => true,
        }
    }

    /// Waits for the exit; `None` if still running at the deadline.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = wait_child(&mut self.child, timeout);
        }
        self.status
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

/// `FILE.INCOMPLETE`: the marker a listener keeps until a migration arrives.
pub fn marker_of(file: &Path) -> PathBuf {
    let mut p = file.as_os_str().to_owned();
    p.push(".INCOMPLETE");
    PathBuf::from(p)
}

/// Whether a TCP connection to `addr` is accepted within a second.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

// ---------------------------------------------------------------- write load (migrate_* tests)

/// A random 4 KiB writer (python3-libnbd, QD in flight, never two writes to
/// one block in flight at once). Each write's content names it: (write id,
/// block) big-endian, repeated. It runs until the server drops it (or the
/// connection fails) and writes a JSON report: the last acknowledged write of
/// every block, the writes whose outcome is unknown or failed after it,
/// failure counts by errno, the first failure, whether any write succeeded
/// after the first failure, [epoch, acknowledged] marks every 200
/// acknowledgements, and [issued at, latency] of every write that took over
/// 100 ms. argv: URI REPORT QD SEED STARTED-FLAG (created after
/// 2000 acknowledgements) [FIRST-ID (1)].
pub const LOAD_WRITER: &str = r#"
import random, struct, time
uri, outpath, qd, seed, flag = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
first_id = int(sys.argv[6]) if len(sys.argv) > 6 else 1
h = connect(uri)
nblocks = h.get_size() // 4096
rng = random.Random(seed)
inflight = {}          # cookie -> (block, id, buffer, issued at)
busy = set()
last_ok = {}           # block -> id of its last acknowledged write
unsure = {}            # block -> ids issued after that which did not succeed
n_ok = n_fail = ok_after_fail = 0
first_fail = None      # [epoch, errno, message, server_side]
late_ok = []           # [acknowledged at, issued at, id, block] of successes after first_fail
fails = {}             # "errno/server_side" -> count
marks = []             # [epoch, n_ok] every 200 acknowledgements
slow = []              # [issued at, latency] of writes that took over 100 ms
next_id = first_id
dead = None
t0 = time.time()

def content(wid, block):
    return struct.pack(">QQ", wid, block) * 256

def retire(c):
    global n_ok, n_fail, ok_after_fail, first_fail
    block, wid, _, issued = inflight.pop(c)
    busy.discard(block)
    err = None
    try:
        h.aio_command_completed(c)
    except nbd.Error as e:
        err = (e.errnum, e.string or "", "command failed" in (e.string or ""))
    now = time.time()
    if now - issued > 0.1 and len(slow) < 5000:
        slow.append([issued, now - issued])
    if err is None:
        n_ok += 1
        if first_fail is not None:
            ok_after_fail += 1
            if len(late_ok) < 20:
                late_ok.append([now, issued, wid, block])
        last_ok[block] = wid
        unsure.pop(block, None)
        if n_ok % 200 == 0:
            marks.append([now, n_ok])
        if n_ok == 2000:
            open(flag, "w").close()
    else:
        n_fail += 1
        if first_fail is None:
            first_fail = [now, err[0], err[1], err[2]]
        k = "%s/%s" % (err[0], "server" if err[2] else "client")
        fails[k] = fails.get(k, 0) + 1
        unsure.setdefault(block, []).append(wid)

try:
    while True:
        while len(inflight) < qd:
            b = rng.randrange(nblocks)
            if b in busy:
                continue
            wid = next_id
            next_id += 1
            buf = nbd.Buffer.from_bytearray(bytearray(content(wid, b)))
            c = h.aio_pwrite(buf, b * 4096)
            inflight[c] = (b, wid, buf, time.time())
            busy.add(b)
        h.poll(-1)
        while True:
            c = h.aio_peek_command_completed()
            if not c:
                break
            retire(c)
except nbd.Error as e:
    dead = [time.time(), e.errnum, e.string]
# Retire what completed before the end; the rest has an unknown outcome.
try:
    while True:
        c = h.aio_peek_command_completed()
        if not c:
            break
        retire(c)
except nbd.Error:
    pass
for c, (b, wid, _, _) in list(inflight.items()):
    unsure.setdefault(b, []).append(wid)
with open(outpath, "w") as f:
    json.dump({"last_ok": last_ok, "unsure": unsure, "n_ok": n_ok, "n_fail": n_fail,
               "ok_after_fail": ok_after_fail, "late_ok": late_ok, "first_fail": first_fail, "fails": fails,
               "marks": marks, "slow": slow, "dead": dead, "issued": next_id - first_id, "t0": t0,
               "t1": time.time()}, f)
"#;

/// What [`LOAD_WRITER`] writes for write `wid` to `block`.
pub fn load_block(wid: u64, block: u64) -> Vec<u8> {
    let mut one = [0u8; 16];
    one[..8].copy_from_slice(&wid.to_be_bytes());
    one[8..].copy_from_slice(&block.to_be_bytes());
    one.repeat(256)
}

pub const ESHUTDOWN: i64 = 108;
pub const ENOTCONN: i64 = 107;

/// A running [`LOAD_WRITER`].
pub struct LoadWriter {
    pub bg: Background,
    pub report: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoadWriter {
    /// Starts the writer on `uri` and waits until it has 2000 writes acknowledged.
    #[track_caller]
    pub fn start(uri: &str, qd: u32, seed: u64) -> LoadWriter {
        LoadWriter::start_from(uri, qd, seed, 1)
    }

    /// Like [`start`](Self::start), numbering its writes from `first_id`
    /// (so a second writer's writes can be told from the first one's).
    #[track_caller]
    pub fn start_from(uri: &str, qd: u32, seed: u64, first_id: u64) -> LoadWriter {
        let dir = tempdir();
        let report = dir.path().join("writer.json");
        let flag = dir.path().join("writer.started");
        let mut bg = Background::python(
            LOAD_WRITER,
            &[
                uri.to_owned(),
                report.display().to_string(),
                qd.to_string(),
                seed.to_string(),
                flag.display().to_string(),
                first_id.to_string(),
            ],
        );
        assert!(
            wait_until(Duration::from_secs(60), || flag.exists()
                || !bg.is_running()),
            "writer did not get going"
        );
        assert!(bg.is_running(), "writer died early: {}", bg.stderr());
        LoadWriter {
            bg,
            report,
            _dir: dir,
        }
    }

    /// Waits for the writer to end by itself (the server dropped it) and
    /// returns its report.
    #[track_caller]
    pub fn finish(&mut self, timeout: Duration) -> serde_json::Value {
        let st = self.bg.wait(timeout);
        assert!(st.is_some(), "writer still running after {timeout:?}");
        assert!(st.unwrap().success(), "writer failed: {}", self.bg.stderr());
        let text = std::fs::read_to_string(&self.report).expect("writer report");
        serde_json::from_str(&text).expect("writer report JSON")
    }
}

/// The worst latency (seconds) of a write in flight at some time in
/// `[from, to]` (epoch seconds), from the report's slow writes; 0.1 when
/// none took longer.
pub fn load_worst_latency(r: &serde_json::Value, from: f64, to: f64) -> f64 {
    r["slow"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w[0].as_f64().unwrap(), w[1].as_f64().unwrap()))
        .filter(|&(issued, took)| issued <= to && issued + took >= from)
        .map(|(_, took)| took)
        .fold(0.1, f64::max)
}

/// Acknowledged writes after epoch time `t` (from the report's marks; to
/// within 200).
pub fn load_acked_after(r: &serde_json::Value, t: f64) -> u64 {
    let n_ok = r["n_ok"].as_u64().unwrap();
    let before = r["marks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m[0].as_f64().unwrap() < t)
        .map(|m| m[1].as_u64().unwrap())
        .max()
        .unwrap_or(0);
    n_ok - before
}

/// Checks a writer's failures across a hand-over: none before `not_before`
/// (epoch seconds), none succeeded after the first failure, and every failure
/// is ENOTCONN: libnbd failing what was in flight when the server closed the
/// connection (NBD has no such error code, so it cannot be a server reply).
/// Requests held back during a hand-over are never answered with an error
/// (ESHUTDOWN would reach a VM as an I/O error; a dropped connection is
/// retried by a reconnecting client).
#[track_caller]
pub fn check_load_failures(r: &serde_json::Value, not_before: f64) {
    if let Some(ff) = r["first_fail"].as_array() {
        let t_fail = ff[0].as_f64().unwrap();
        assert!(
            t_fail >= not_before,
            "a write failed ({ff:?}) {:.3}s before the hand-over began",
            not_before - t_fail
        );
    }
    for (k, n) in r["fails"].as_object().unwrap() {
        let errno: i64 = k.split_once('/').unwrap().0.parse().unwrap();
        assert!(
            errno == ENOTCONN,
            "write failures other than the disconnection: {k} x{n} ({})",
            r["fails"]
        );
    }
    assert_eq!(
        r["ok_after_fail"].as_u64(),
        Some(0),
        "writes succeeded after the first failure {} (failures {}); late \
         acknowledgements [acked at, issued at, id, block]: {}",
        r["first_fail"],
        r["fails"],
        r["late_ok"]
    );
}

/// Checks that every acknowledged write is in the image (`read_block(b)`
/// returns block b's 4096 bytes): the block holds that write, or a later
/// write to it whose outcome is unknown. Returns the blocks checked.
#[track_caller]
pub fn check_acknowledged_writes(
    r: &serde_json::Value,
    read_block: impl FnMut(u64) -> Vec<u8>,
) -> u64 {
    check_acknowledged_writes_before(r, read_block, u64::MAX)
}

/// Like [`check_acknowledged_writes`] for a writer followed by another
/// whose write ids start at `later_ids`: a block may also hold a write of
/// the later one (to that block), which superseded this one's.
#[track_caller]
pub fn check_acknowledged_writes_before(
    r: &serde_json::Value,
    mut read_block: impl FnMut(u64) -> Vec<u8>,
    later_ids: u64,
) -> u64 {
    let unsure: std::collections::HashMap<u64, Vec<u64>> = r["unsure"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(b, v)| {
            (
                b.parse().unwrap(),
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
                    .collect(),
            )
        })
        .collect();
    let mut checked = 0;
    for (b, wid) in r["last_ok"].as_object().unwrap() {
        let b: u64 = b.parse().unwrap();
        let wid = wid.as_u64().unwrap();
        let got = read_block(b);
        let acked = load_block(wid, b);
        let id = be64(&got, 0);
        if id >= later_ids && got == load_block(id, b) {
            checked += 1;
            continue;
        }
        match unsure.get(&b) {
            None => assert!(
                got == acked,
                "acknowledged write {wid} to block {b} is missing (found id {})",
                be64(&got, 0)
            ),
            Some(later) => assert!(
                got == acked || later.iter().any(|&u| got == load_block(u, b)),
                "block {b}: neither acknowledged write {wid} nor a later one {later:?}"
            ),
        }
        checked += 1;
    }
    checked
}

/// Seconds since the epoch (comparable with python's time.time()).
pub fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What a [`StatusPoller`] saw.
#[derive(Debug, Clone, Default)]
pub struct Polled {
    /// Request time (epoch) of the last answer with clients_allowed=true.
    pub last_allowed: f64,
    /// Whether is_mirroring=true was seen.
    pub mirroring: bool,
    /// Highest migration_attempts seen.
    pub attempts: u64,
    /// The first answer with is_mirroring=false and clients_allowed=true
    /// (not migrating, not in or past a hand-over), if any.
    pub idle: Option<String>,
}

/// Polls a server's status every 10 ms on a thread until finished or the
/// control socket disappears.
pub struct StatusPoller {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Polled>>,
}

impl StatusPoller {
    pub fn start(sock: &Path) -> StatusPoller {
        use std::sync::atomic::Ordering::SeqCst;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let sock = sock.to_owned();
        let thread = std::thread::spawn(move || {
            let mut p = Polled::default();
            while !s2.load(SeqCst) {
                let t = now_epoch();
                match try_status(&sock) {
                    Some(st) => {
                        let allowed = st.get("clients_allowed").map(String::as_str) == Some("true");
                        let mirroring = st.get("is_mirroring").map(String::as_str) == Some("true");
                        if allowed {
                            p.last_allowed = t;
                        }
                        p.mirroring |= mirroring;
                        if allowed && !mirroring && p.idle.is_none() {
                            p.idle = Some(format!("{st:?}"));
                        }
                        if let Some(a) = st.get("migration_attempts") {
                            p.attempts = p.attempts.max(a.parse().unwrap_or(0));
                        }
                    }
                    None if !sock.exists() => break,
                    None => {}
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            p
        });
        StatusPoller {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> Polled {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().expect("status poller")
    }
}

impl Drop for StatusPoller {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
