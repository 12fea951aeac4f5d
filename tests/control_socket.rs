//! Control socket end to end: the socket loop and the client against a fake daemon,
//! hostile clients, socket file life cycle, and the `flexnbd` CLI commands.

use flexnbd::acl::AclEntry;
use flexnbd::control::client::{request_with_timeout, ControlClientError};
use flexnbd::control::server::{ControlServer, Limits};
use flexnbd::control::{Handler, MigrationState, MigrationStatus, MirrorRequest, Reply, Status};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A daemon stand-in that records what it was asked.
#[derive(Default)]
struct Fake {
    acl: Mutex<Vec<String>>,
    mirror: Mutex<Vec<MirrorRequest>>,
    migrating: bool,
}

impl Handler for Fake {
    fn status(&self) -> Status {
        Status {
            pid: 42,
            size: 1 << 20,
            is_mirroring: self.migrating,
            clients_allowed: true,
            num_clients: 2,
            has_control: true,
            pause: None,
            proxy: None,
            tls: None,
            migration: self.migrating.then_some(MigrationStatus {
                speed: 1000,
                duration: 5,
                seconds_left: Some(7),
                bytes_left: 7000,
                speed_limit: Some(2000),
                attempts: 1,
                state: MigrationState::Copying,
                retry_in: None,
                last_error: None,
            }),
        }
    }
    fn set_acl(&self, entries: Vec<AclEntry>) {
        *self.acl.lock().unwrap() = entries.iter().map(|e| e.to_string()).collect();
    }
    fn start_mirror(&self, req: MirrorRequest) -> Reply {
        self.mirror.lock().unwrap().push(req);
        Reply::ok("Mirror started")
    }
    fn set_mirror_speed(&self, _bps: u64) -> Reply {
        Reply::err(1, "Not currently mirroring")
    }
    fn break_mirror(&self) -> Reply {
        Reply::err(1, "not mirroring")
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    fake: Arc<Fake>,
    server: Option<ControlServer>,
}

fn fixture_with(fake: Fake, limits: Limits) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let fake = Arc::new(fake);
    let handler: Arc<dyn Handler> = fake.clone();
    let server = ControlServer::start_with_limits(&sock, handler, limits).unwrap();
    Fixture {
        _dir: dir,
        sock,
        fake,
        server: Some(server),
    }
}

fn fixture() -> Fixture {
    fixture_with(Fake::default(), Limits::default())
}

fn ask(sock: &Path, lines: &[&str]) -> Reply {
    request_with_timeout(sock, lines, TIMEOUT).unwrap()
}

/// Sends raw bytes (optionally half-closing), returns whatever comes back.
fn raw(sock: &Path, bytes: &[u8], half_close: bool) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    read_all(&mut s)
}

fn read_all(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn assert_alive(sock: &Path) {
    assert_eq!(ask(sock, &["status"]).code, 0);
}

#[test]
fn status_line() {
    let f = fixture();
    let r = ask(&f.sock, &["status"]);
    assert_eq!(
        r,
        Reply::ok(
            "pid=42 size=1048576 is_mirroring=false clients_allowed=true num_clients=2 \
             has_control=true paused=false"
        )
    );
    assert_eq!(
        raw(&f.sock, b"status\n\n", false),
        "0: pid=42 size=1048576 is_mirroring=false clients_allowed=true num_clients=2 \
         has_control=true paused=false\n"
    );
    let f = fixture_with(
        Fake {
            migrating: true,
            ..Fake::default()
        },
        Limits::default(),
    );
    let text = ask(&f.sock, &["status"]).text;
    assert!(
        text.ends_with(
            "is_mirroring=true clients_allowed=true num_clients=2 has_control=true \
             paused=false migration_speed=1000 migration_duration=5 migration_seconds_left=7 \
             migration_bytes_left=7000 migration_speed_limit=2000 migration_attempts=1 \
             migration_state=copying"
        ),
        "{text}"
    );
}

#[test]
fn acl_update_and_bad_spec() {
    let f = fixture();
    let r = ask(&f.sock, &["acl", "127.0.0.1", "10.0.0.0/8"]);
    assert_eq!(r, Reply::ok("updated"));
    let want = vec!["127.0.0.1/32".to_string(), "10.0.0.0/8".to_string()];
    assert_eq!(*f.fake.acl.lock().unwrap(), want);
    let r = ask(&f.sock, &["acl", "127.0.0.2", "not-an-ip", "1.2.3.4/0"]);
    assert_eq!(r, Reply::err(1, "bad spec: not-an-ip"));
    assert_eq!(*f.fake.acl.lock().unwrap(), want, "old list kept");
}

#[test]
fn codes_for_unknown_and_empty() {
    let f = fixture();
    assert_eq!(ask(&f.sock, &["launch"]), Reply::err(10, "unknown command"));
    assert_eq!(raw(&f.sock, b"\n", false), "9: missing command\n");
    assert_eq!(raw(&f.sock, b"", true), "9: missing command\n");
    assert_eq!(ask(&f.sock, &["break"]), Reply::err(1, "not mirroring"));
    let r = ask(&f.sock, &["mirror_max_bps", "100"]);
    assert_eq!(r, Reply::err(1, "Not currently mirroring"));
}

#[test]
fn mirror_arguments() {
    let f = fixture();
    let cases: &[(&[&str], &str)] = &[
        (
            &["mirror", "127.0.0.1"],
            "mirror takes at least two parameters",
        ),
        (&["mirror", "localhost", "4000"], "bad IP address"),
        (&["mirror", "127.0.0.1", "70000"], "bad IP port number"),
        (
            &["mirror", "127.0.0.1", "1", "exit", "x"],
            "bad bind address",
        ),
        (
            &["mirror", "127.0.0.1", "1", "exit", "0", "1", "2", "3"],
            "unrecognised parameters to mirror",
        ),
    ];
    for (lines, text) in cases {
        assert_eq!(ask(&f.sock, lines), Reply::err(1, *text), "{lines:?}");
    }
    assert!(f.fake.mirror.lock().unwrap().is_empty());
    let r = ask(&f.sock, &["mirror", "::1", "4000", "unlink"]);
    assert_eq!(r, Reply::ok("Mirror started"));
    let got = f.fake.mirror.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].dest, "[::1]:4000".parse().unwrap());
}

#[test]
fn garbage_never_stops_the_server() {
    let f = fixture();
    // Deterministic pseudo-random bytes.
    let mut x: u32 = 0x1234_5678;
    let noise: Vec<u8> = (0..10_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let r = raw(&f.sock, &noise, true);
    assert!(
        r.is_empty() || r.starts_with("1") || r.starts_with("9"),
        "{r:?}"
    );
    assert_alive(&f.sock);

    let r = raw(&f.sock, b"st\xffatus\n\n", false);
    assert_eq!(r, "1: request is not valid UTF-8\n");
    assert_alive(&f.sock);

    let big = vec![b'a'; 1 << 20];
    let r = raw(&f.sock, &big, false);
    assert_eq!(r, "1: request line too long\n");
    assert_alive(&f.sock);

    let many = "acl\n".to_string() + &"127.0.0.1\n".repeat(2000) + "\n";
    let r = raw(&f.sock, many.as_bytes(), false);
    assert_eq!(r, "1: too many request lines\n");
    assert_alive(&f.sock);

    // Connects, sends nothing, goes away.
    drop(UnixStream::connect(&f.sock).unwrap());
    assert_alive(&f.sock);
}

#[test]
fn eof_ends_a_request() {
    let f = fixture();
    assert!(raw(&f.sock, b"status\n", true).starts_with("0: pid=42 "));
    // A last line without its LF still counts: a cut-off entry is refused.
    assert_eq!(
        raw(&f.sock, b"acl\n127.0.0.1\n10.0", true),
        "1: bad spec: 10.0\n"
    );
    assert!(f.fake.acl.lock().unwrap().is_empty());
    assert_eq!(raw(&f.sock, b"break\r\n\r\n", false), "1: not mirroring\n");
}

#[test]
fn slow_clients_time_out_and_are_bounded() {
    let limits = Limits {
        request_timeout: Duration::from_secs(2),
        max_connections: 2,
        ..Limits::default()
    };
    let f = fixture_with(Fake::default(), limits);
    let start = Instant::now();
    // Never sends the empty line.
    let mut slow = UnixStream::connect(&f.sock).unwrap();
    slow.set_read_timeout(Some(TIMEOUT)).unwrap();
    slow.write_all(b"status\n").unwrap();
    // Sends nothing at all.
    let mut idle = UnixStream::connect(&f.sock).unwrap();
    idle.set_read_timeout(Some(TIMEOUT)).unwrap();
    // Connections are accepted in order, so both slots are taken now: a third
    // client is told so at once rather than queued.
    let third = raw(&f.sock, b"status\n\n", false);
    assert_eq!(third, "1: too many control connections\n");
    assert!(
        start.elapsed() < limits.request_timeout,
        "refusal was not immediate"
    );
    let timed_out = "1: timed out waiting for the request\n";
    assert_eq!(read_all(&mut slow), timed_out);
    assert_eq!(read_all(&mut idle), timed_out);
    assert!(start.elapsed() < TIMEOUT);
    // The slots come free as the connection threads end.
    let deadline = Instant::now() + TIMEOUT;
    while raw(&f.sock, b"status\n\n", false).starts_with("1: too many") {
        assert!(Instant::now() < deadline, "slots never freed");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_alive(&f.sock);
}

#[test]
fn socket_file_life_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    // A stale socket file from a dead server is replaced.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let handler: Arc<dyn Handler> = Arc::new(Fake::default());
    let server = ControlServer::start(&sock, handler.clone()).unwrap();
    assert_alive(&sock);
    // A live one is not stolen.
    let e = ControlServer::start(&sock, handler.clone()).err().unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    assert_alive(&sock);
    // Stopping removes the file and closes the socket.
    server.stop();
    assert!(!sock.exists());
    // A regular file is not a socket to replace.
    std::fs::write(&sock, b"data").unwrap();
    assert!(ControlServer::start(&sock, handler.clone()).is_err());
    assert_eq!(std::fs::read(&sock).unwrap(), b"data");
    std::fs::remove_file(&sock).unwrap();
    // The file is left alone if someone else has put theirs in its place.
    let server = ControlServer::start(&sock, handler.clone()).unwrap();
    std::fs::remove_file(&sock).unwrap();
    let other = UnixListener::bind(&sock).unwrap();
    drop(server);
    assert!(sock.exists());
    drop(other);
}

#[test]
fn stop_with_a_client_connected() {
    let mut f = fixture();
    let mut s = UnixStream::connect(&f.sock).unwrap();
    s.write_all(b"status\n").unwrap();
    let start = Instant::now();
    f.server.take().unwrap().stop();
    assert!(start.elapsed() < TIMEOUT);
    assert!(!f.sock.exists());
    let e = request_with_timeout(&f.sock, &["status"], TIMEOUT).unwrap_err();
    assert!(matches!(e, ControlClientError::NoSocket(_)), "{e}");
}

/// Runs the real binary, killed if it outlives the test's patience.
fn flexnbd(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flexnbd"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("flexnbd {args:?} did not finish");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn cli_commands() {
    let f = fixture();
    let sock = f.sock.to_str().unwrap();

    let out = flexnbd(&["status", "--sock", sock]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout),
        "pid=42 size=1048576 is_mirroring=false clients_allowed=true num_clients=2 \
         has_control=true paused=false\n"
    );

    let out = flexnbd(&["status", "--json", "--sock", sock]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "{\"pid\":42,\"size\":1048576,\"is_mirroring\":false,\"clients_allowed\":true,\
         \"num_clients\":2,\"has_control\":true,\"paused\":false}\n"
    );

    let out = flexnbd(&["acl", "--sock", sock, "127.0.0.1", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "bad spec: nope\n");
    assert!(out.stdout.is_empty());

    let out = flexnbd(&["acl", "-s", sock, "::1", "10.0.0.0/8"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "updated\n");
    assert_eq!(*f.fake.acl.lock().unwrap(), vec!["::1/128", "10.0.0.0/8"]);

    let out = flexnbd(&["break", "--sock", sock]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "not mirroring\n");

    let out = flexnbd(&["mirror-speed", "--sock", sock, "--max-speed", "1000"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "Not currently mirroring\n");

    let missing = f.sock.with_file_name("missing.sock");
    let out = flexnbd(&["status", "--sock", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("flexnbd: ") && err.lines().count() == 1,
        "{err}"
    );
    assert!(out.stdout.is_empty());
}
