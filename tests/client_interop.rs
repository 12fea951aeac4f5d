//! `flexnbd read` and `flexnbd write` against real NBD servers (nbdkit, qemu-nbd)
//! over TCP and unix sockets, and against an old-style server like the C flexnbd.

use flexnbd::proto::handshake::oldstyle_greeting;
use flexnbd::proto::{Command, NbdErrno, Request, SimpleReply};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command as Cmd, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const MINUTE: Duration = Duration::from_secs(60);

// ---------- processes ----------

/// Kills and reaps a child process when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn require(tool: &str) {
    let found = Cmd::new(tool).arg("--version").output().is_ok();
    assert!(
        found,
        "{tool} is required (Debian: nbdkit, qemu-utils) but was not found"
    );
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Polls `ready` until it holds; panics after 20 seconds.
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(what: &str, mut cmd: Cmd, mut ready: impl FnMut() -> bool) -> Guard {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let mut guard = Guard(child);
    wait_until(what, || {
        if let Ok(Some(st)) = guard.0.try_wait() {
            panic!("{what} exited early: {st}");
        }
        ready()
    });
    guard
}

/// Where a server under test listens.
enum Listen {
    Tcp(u16),
    Unix(PathBuf),
}

impl Listen {
    /// The server's own options for this address, given its TCP address and unix socket flags.
    fn server_opts(&self, ip_flag: &str, unix_flag: &str) -> Vec<String> {
        match self {
            Listen::Tcp(port) => strings(&[ip_flag, "127.0.0.1", "-p", &port.to_string()]),
            Listen::Unix(path) => strings(&[unix_flag, &path.display().to_string()]),
        }
    }

    /// `flexnbd read/write` options that reach this address.
    fn client_args(&self) -> Vec<String> {
        match self {
            Listen::Tcp(port) => tcp_args(*port),
            Listen::Unix(path) => strings(&["--addr", &path.display().to_string()]),
        }
    }

    fn ready(&self) -> bool {
        match self {
            Listen::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).is_ok(),
            Listen::Unix(path) => UnixStream::connect(path).is_ok(),
        }
    }
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn tcp_args(port: u16) -> Vec<String> {
    strings(&["--addr", "127.0.0.1", "--port", &port.to_string()])
}

/// A running server: the flexnbd arguments that reach it and what keeps it alive.
struct Server {
    args: Vec<String>,
    _guard: Option<Guard>,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    fn at(args: Vec<String>) -> Server {
        let (_guard, _dir) = (None, None);
        Server { args, _guard, _dir }
    }
}

/// Starts `tool` listening on TCP or a unix socket; `opts` builds its arguments.
fn spawn_server(
    tool: &str,
    unix: bool,
    opts: impl FnOnce(&Listen, &Path) -> Vec<String>,
) -> Server {
    require(tool);
    let dir = tempfile::tempdir().unwrap();
    let listen = match unix {
        true => Listen::Unix(dir.path().join("nbd.sock")),
        false => Listen::Tcp(free_port()),
    };
    let mut cmd = Cmd::new(tool);
    cmd.args(opts(&listen, dir.path()));
    let guard = start(tool, cmd, || listen.ready());
    let (_guard, _dir) = (Some(guard), Some(dir));
    Server {
        args: listen.client_args(),
        _guard,
        _dir,
    }
}

fn nbdkit(unix: bool, size: &str) -> Server {
    spawn_server("nbdkit", unix, |l, _| {
        let memory = strings(&["memory", &format!("size={size}")]);
        [
            strings(&["-f", "--exit-with-parent"]),
            l.server_opts("-i", "-U"),
            memory,
        ]
        .concat()
    })
}

/// qemu-nbd serving a new sparse raw file of `size` bytes, and the file's path.
fn qemu_nbd(unix: bool, size: u64) -> (Server, PathBuf) {
    let mut file = PathBuf::new();
    let s = spawn_server("qemu-nbd", unix, |l, dir| {
        file = dir.join("disk.img");
        File::create(&file).unwrap().set_len(size).unwrap();
        let image = strings(&[&file.display().to_string()]);
        [
            strings(&["-t", "-e", "4", "-f", "raw"]),
            l.server_opts("-b", "-k"),
            image,
        ]
        .concat()
    });
    (s, file)
}

// ---------- running flexnbd ----------

struct Run {
    code: Option<i32>,
    stderr: String,
    /// Peak resident set size seen in /proc while it ran, in KiB.
    peak_rss_kib: u64,
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `flexnbd ARGS` with `feed` writing its stdin and `take` reading its stdout.
fn flexnbd<T: Send + 'static>(
    args: &[String],
    limit: Duration,
    feed: impl FnOnce(ChildStdin) + Send + 'static,
    take: impl FnOnce(ChildStdout) -> T + Send + 'static,
) -> (Run, T) {
    let mut child = Cmd::new(env!("CARGO_BIN_EXE_flexnbd"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let feeder = std::thread::spawn(move || feed(stdin));
    let taker = std::thread::spawn(move || take(stdout));
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut guard = Guard(child);
    let deadline = Instant::now() + limit;
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = vm_hwm_kib(pid) {
            peak = peak.max(kib);
        }
        if let Some(st) = guard.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "flexnbd {args:?} ran longer than {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(guard);
    feeder.join().unwrap();
    let out = taker.join().unwrap();
    let run = Run {
        code: status.code(),
        stderr: errs.join().unwrap(),
        peak_rss_kib: peak,
    };
    (run, out)
}

fn cmd_args(verb: &str, server: &[String], from: u64, size: u64) -> Vec<String> {
    let mut a = strings(&[verb]);
    a.extend(server.iter().cloned());
    a.extend(strings(&[
        "--from",
        &from.to_string(),
        "--size",
        &size.to_string(),
    ]));
    a
}

fn write(server: &[String], from: u64, data: Vec<u8>) -> Run {
    let args = cmd_args("write", server, from, data.len() as u64);
    let feed = move |mut i: ChildStdin| {
        let _ = i.write_all(&data);
    };
    flexnbd(&args, MINUTE, feed, |_| ()).0
}

fn read(server: &[String], from: u64, size: u64) -> (Run, Vec<u8>) {
    let args = cmd_args("read", server, from, size);
    let take = |mut o: ChildStdout| {
        let mut v = Vec::new();
        o.read_to_end(&mut v).unwrap();
        v
    };
    flexnbd(&args, MINUTE, drop, take)
}

fn ok(run: &Run) {
    assert_eq!(run.code, Some(0), "flexnbd failed: {}", run.stderr);
}

/// Checks a failed run: exit code 1 and exactly one line on stderr containing `needle`.
fn failed(run: &Run, needle: &str) {
    assert_eq!(run.code, Some(1), "stderr: {}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "stderr: {}", run.stderr);
    assert!(
        run.stderr.contains(needle),
        "expected {needle:?} in {:?}",
        run.stderr
    );
}

// ---------- test data ----------

/// Deterministic pseudo-random bytes; block `i` of a long stream is a rotation of one base block.
struct Pattern(Vec<u8>);

impl Pattern {
    fn new(seed: u64) -> Pattern {
        let mut x = seed | 1;
        let base = (0..MIB / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        Pattern(base)
    }

    /// Fills `out` with block `i` (at most 1 MiB).
    fn block(&self, i: u64, out: &mut [u8]) {
        let n = self.0.len();
        let rot = (i as usize).wrapping_mul(7919) % n;
        let mut done = 0;
        while done < out.len() {
            let from = (rot + done) % n;
            let k = (n - from).min(out.len() - done);
            out[done..done + k].copy_from_slice(&self.0[from..from + k]);
            done += k;
        }
    }

    fn bytes(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        for (i, c) in v.chunks_mut(MIB as usize).enumerate() {
            self.block(i as u64, c);
        }
        v
    }
}

fn roundtrip(server: &Server, from: u64, len: usize, seed: u64) -> Vec<u8> {
    let data = Pattern::new(seed).bytes(len);
    ok(&write(&server.args, from, data.clone()));
    let (run, back) = read(&server.args, from, len as u64);
    ok(&run);
    assert!(back == data, "read back differs from what was written");
    data
}

// ---------- nbdkit ----------

#[test]
fn nbdkit_tcp_write_then_read() {
    let s = nbdkit(false, "64M");
    roundtrip(&s, 12345, 3 * MIB as usize + 17, 1);
    let (run, zeros) = read(&s.args, 32 * MIB, 4096);
    ok(&run);
    assert!(zeros.iter().all(|&b| b == 0));
    // nbdkit takes requests of up to 64 MiB.
    roundtrip(&s, 0, 64 * MIB as usize, 2);
}

#[test]
fn nbdkit_unix_write_then_read() {
    let s = nbdkit(true, "16M");
    roundtrip(&s, 4096, MIB as usize, 3);
}

#[test]
fn read_past_the_end_reports_the_servers_error() {
    let s = nbdkit(false, "1M");
    let (run, out) = read(&s.args, MIB - 10, 100);
    failed(&run, "EINVAL");
    assert!(out.is_empty());
    // Size 0 just connects.
    let (run, out) = read(&s.args, 0, 0);
    ok(&run);
    assert!(out.is_empty());
    ok(&write(&s.args, 0, Vec::new()));
}

#[test]
fn short_stdin_fails_the_write() {
    let s = nbdkit(false, "4M");
    let args = cmd_args("write", &s.args, 0, MIB);
    let feed = |mut i: ChildStdin| {
        let _ = i.write_all(&[5u8; 1000]);
    };
    let (run, _) = flexnbd(&args, Duration::from_secs(30), feed, |_| ());
    failed(&run, "input ended after 1000 of 1048576 bytes");
}

#[test]
fn unreachable_server_fails_to_connect() {
    let (run, _) = read(&tcp_args(free_port()), 0, 10);
    failed(&run, "failed to connect");
}

#[test]
fn arguments_over_the_limits_fail_before_connecting() {
    // Nothing listens on the port: a connect attempt would give another message.
    let dead = tcp_args(free_port());
    let (run, _) = read(&dead, 0, GIB + 1);
    failed(&run, "--size");
    let (run, _) = read(&dead, (1 << 62) + 1, 10);
    failed(&run, "--from");
    let (run, _) = flexnbd(&cmd_args("write", &dead, 0, GIB + 1), MINUTE, drop, drop);
    failed(&run, "--size");
    let (run, _) = read(&strings(&["--addr", "127.0.0.1"]), 0, 10);
    failed(&run, "--port");
}

// ---------- qemu-nbd ----------

fn qemu_roundtrip(unix: bool) {
    let (s, image) = qemu_nbd(unix, 64 * MIB);
    let from = 3 * 4096 + 7;
    let data = roundtrip(&s, from, 2 * MIB as usize + 3, 5);
    // qemu-nbd takes requests of up to 32 MiB.
    let big = roundtrip(&s, 16 * MIB, 32 * MIB as usize, 6);
    let file = std::fs::read(image).unwrap();
    let at = |o: u64, n: usize| &file[o as usize..o as usize + n];
    assert!(at(from, data.len()) == data, "backing file differs");
    assert!(at(16 * MIB, big.len()) == big, "backing file differs");
}

#[test]
fn qemu_nbd_tcp_write_then_read() {
    qemu_roundtrip(false);
}

#[test]
fn qemu_nbd_unix_write_then_read() {
    qemu_roundtrip(true);
}

// ---------- an old-style server, as the C flexnbd speaks ----------

/// Serves a sparse temporary file with the old-style handshake and simple replies.
/// With `only`, other peers are closed on at once with nothing sent, as
/// flexnbd's access control list does.
fn oldstyle_server(size: u64, only: Option<IpAddr>) -> (Server, Arc<File>) {
    let file = Arc::new(tempfile::tempfile().unwrap());
    file.set_len(size).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let f = Arc::clone(&file);
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let peer = s.peer_addr().map(|a| a.ip()).ok();
            if only.is_some_and(|ip| peer != Some(ip)) {
                continue;
            }
            let f = Arc::clone(&f);
            std::thread::spawn(move || serve_oldstyle(s, &f, size));
        }
    });
    (Server::at(tcp_args(port)), file)
}

fn serve_oldstyle(mut s: TcpStream, f: &File, size: u64) -> Option<()> {
    s.write_all(&oldstyle_greeting(size, 0x0d)).ok()?;
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let mut h = [0u8; 28];
        s.read_exact(&mut h).ok()?;
        let (r, _) = Request::decode(&h, false).ok()??;
        let (off, len) = (r.offset, r.length);
        let inside = off.checked_add(len).is_some_and(|end| end <= size);
        match r.command {
            Command::Read if inside => {
                s.write_all(&SimpleReply::ok(r.cookie).encode()).ok()?;
                for at in (off..off + len).step_by(MIB as usize) {
                    let k = (off + len - at).min(MIB) as usize;
                    f.read_exact_at(&mut buf[..k], at).ok()?;
                    s.write_all(&buf[..k]).ok()?;
                }
            }
            Command::Write => {
                for at in (off..off + len).step_by(MIB as usize) {
                    let k = (off + len - at).min(MIB) as usize;
                    s.read_exact(&mut buf[..k]).ok()?;
                    if inside {
                        f.write_all_at(&buf[..k], at).ok()?;
                    }
                }
                let e = if inside {
                    SimpleReply::ok(r.cookie)
                } else {
                    SimpleReply::err(r.cookie, NbdErrno::NoSpc)
                };
                s.write_all(&e.encode()).ok()?;
            }
            Command::Flush => s.write_all(&SimpleReply::ok(r.cookie).encode()).ok()?,
            Command::Disc => return Some(()),
            _ => s
                .write_all(&SimpleReply::err(r.cookie, NbdErrno::Inval).encode())
                .ok()?,
        }
    }
}

#[test]
fn oldstyle_server_is_detected() {
    let (s, file) = oldstyle_server(8 * MIB, None);
    let data = roundtrip(&s, 777, 300_000, 7);
    let mut back = vec![0u8; data.len()];
    file.read_exact_at(&mut back, 777).unwrap();
    assert!(back == data);
    let (run, _) = read(&s.args, 8 * MIB - 1, 2);
    failed(&run, "EINVAL");
}

#[test]
fn bind_address_passes_a_remote_acl() {
    let allowed: IpAddr = "127.0.0.2".parse().unwrap();
    let (s, _file) = oldstyle_server(MIB, Some(allowed));
    let bound = [s.args.clone(), strings(&["--bind", "127.0.0.2"])].concat();
    roundtrip(&Server::at(bound), 0, 4096, 4);
    let (run, _) = read(&s.args, 0, 4096);
    failed(&run, "rejected");
}

/// A single 1 GiB request each way at offset 1 MiB, with the data streamed
/// through stdin and stdout, and the client's memory staying small.
fn one_gib_each_way(s: &Server, file: &File) {
    let pattern = Arc::new(Pattern::new(8));
    let p = Arc::clone(&pattern);
    let feed = move |mut i: ChildStdin| {
        let mut b = vec![0u8; MIB as usize];
        for blk in 0..GIB / MIB {
            p.block(blk, &mut b);
            if i.write_all(&b).is_err() {
                return;
            }
        }
    };
    let limit = Duration::from_secs(300);
    let (w, _) = flexnbd(&cmd_args("write", &s.args, MIB, GIB), limit, feed, |_| ());
    ok(&w);

    let (mut want, mut got) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    for blk in [0, 1, 511, 1023] {
        pattern.block(blk, &mut want);
        file.read_exact_at(&mut got, MIB + blk * MIB).unwrap();
        assert!(got == want, "file block {blk} differs");
    }

    let p = Arc::clone(&pattern);
    let take = move |mut o: ChildStdout| -> Result<(), String> {
        let (mut want, mut got) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
        for blk in 0..GIB / MIB {
            o.read_exact(&mut got)
                .map_err(|e| format!("block {blk}: {e}"))?;
            p.block(blk, &mut want);
            if got != want {
                return Err(format!("block {blk} differs"));
            }
        }
        match o.read(&mut got) {
            Ok(0) => Ok(()),
            other => Err(format!("output goes on: {other:?}")),
        }
    };
    let (r, checked) = flexnbd(&cmd_args("read", &s.args, MIB, GIB), limit, drop, take);
    ok(&r);
    checked.unwrap();

    eprintln!(
        "{:?}: peak RSS: write 1 GiB {} KiB, read 1 GiB {} KiB",
        s.args, w.peak_rss_kib, r.peak_rss_kib
    );
    for kib in [w.peak_rss_kib, r.peak_rss_kib] {
        assert!(kib > 0 && kib < 64 * 1024, "peak RSS {kib} KiB");
    }
}

#[test]
fn one_gib_single_request_to_an_oldstyle_server() {
    let (s, file) = oldstyle_server(GIB + MIB, None);
    one_gib_each_way(&s, &file);
}

/// The product's own server, in its default and its old-style handshake.
#[test]
fn one_gib_single_request_to_flexnbd_serve() {
    for extra in [&[][..], &["--oldstyle"]] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let file = File::options()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&image)
            .unwrap();
        file.set_len(GIB + MIB).unwrap();
        let port = free_port();
        let mut cmd = Cmd::new(env!("CARGO_BIN_EXE_flexnbd"));
        cmd.args([
            "serve",
            "--addr",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--file",
        ]);
        cmd.arg(&image).args(extra);
        let guard = start("flexnbd serve", cmd, || Listen::Tcp(port).ready());
        let s = Server {
            _guard: Some(guard),
            _dir: Some(dir),
            ..Server::at(tcp_args(port))
        };
        one_gib_each_way(&s, &file);
    }
}
