//! `flexnbd proxy`: multi-conn emulation (flushes replayed across upstream connections, as
//! nbdkit's request log shows), the command line as the C flexnbd-proxy's, and `status`.

mod common;

use common::nbdkit::{Entry, Nbdkit};
use common::*;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where the three clients of [`THREE_CLIENTS`] read first (one 64 KiB slot
/// each), so their upstream connections can be told apart in the log.
const MARK: u64 = MIB;
/// Where client 1 writes and client 3 reads.
const DATA_AT: u64 = 64 * KIB;
const DATA_LEN: usize = 64 * 1024;
const LOCAL: &str = "127.0.0.1";

/// What the three clients' upstream connections got (see [`Seen::acts`]):
/// client 2's flush replayed on client 1's (it wrote), not on client 3's.
const REPLAY_ON_DIRTY: [&str; 3] = ["Read Write Flush", "Read Flush", "Read Read"];
/// ... replayed on both others.
const REPLAY_ON_ALL: [&str; 3] = ["Read Write Flush", "Read Flush", "Read Flush Read"];
/// ... not replayed.
const NO_REPLAY: [&str; 3] = ["Read Write", "Read Flush", "Read Read"];

// ---------------------------------------------------------------- three clients

/// Three libnbd handles: each reads its mark, then handle 1 writes (and gets
/// the reply), handle 2 flushes, handle 3 reads what handle 1 wrote.
/// argv: URI DIR (DIR/data is written, to DIR/got what is read); offsets
/// as [`MARK`] and [`DATA_AT`].
const THREE_CLIENTS: &str = r#"
uri, d = sys.argv[1], sys.argv[2]
mark, at = 1 << 20, 65536
data = open(d + "/data", "rb").read()
hs = [connect(uri) for _ in range(3)]
for i, h in enumerate(hs):
    h.pread(512, mark + i * 65536)
hs[0].pwrite(data, at)
hs[1].flush()
got = hs[2].pread(len(data), at)
open(d + "/got", "wb").write(got)
flags = [h.can_multi_conn() for h in hs]
for h in hs:
    h.shutdown()
out({"can_multi_conn": flags})
"#;

/// What [`THREE_CLIENTS`] saw and what nbdkit logged.
struct Seen {
    can_multi_conn: Vec<bool>,
    /// Per client: every request its upstream connection got, in order,
    /// space-separated ("Read Write Flush": the mark read first).
    acts: [String; 3],
    log: Vec<Entry>,
    /// Per client: its upstream connection's number in the log.
    conns: [u64; 3],
}

impl Seen {
    /// Where in the whole log client `c`'s upstream got `act` (at `offset`, if given).
    fn pos(&self, c: usize, act: &str, offset: Option<u64>) -> usize {
        let hit =
            |e: &Entry| e.0 == self.conns[c] && e.1 == act && offset.is_none_or(|o| e.2 == Some(o));
        let at = self.log.iter().position(hit);
        at.unwrap_or_else(|| panic!("client {}: no {act} in {:?}", c + 1, self.log))
    }
}

/// Runs [`THREE_CLIENTS`] through a proxy (with `proxy_args`) in front of
/// nbdkit in `nbdkit_mode`; checks the data and returns what nbdkit saw.
fn three_clients(nbdkit_mode: &str, proxy_args: &[&str]) -> Seen {
    let dir = tempdir();
    let img = image(&dir, 4 * MIB, 11);
    let data = random_bytes(12, DATA_LEN);
    let (data_file, got_file) = (dir.path().join("data"), dir.path().join("got"));
    std::fs::write(&data_file, &data).unwrap();
    let kit = Nbdkit::start(&img, nbdkit_mode);
    let direct = export(&format!("nbd://{LOCAL}:{}/", kit.port))["can_multi_conn"].clone();
    let own = nbdkit_mode == "plugin";
    assert_eq!(direct, own, "nbdkit's own multi-conn flag");
    let mut proxy = Serve::proxy(&kit.conn_args()).args(proxy_args).start();
    let args = [proxy.uri(), path_arg(dir.path())];
    let r = python_json(THREE_CLIENTS, &args, Duration::from_secs(30));
    let got = read_file(&got_file);
    assert_bytes_eq(&got, &data, "client 3 reads client 1's write");
    assert_bytes_eq(&read_file_at(&img, DATA_AT, DATA_LEN), &data, "the image");
    let flags = r["can_multi_conn"].as_array().unwrap().iter();
    let can_multi_conn = flags.map(|b| b.as_bool().unwrap()).collect();
    proxy.stop();
    let log = kit.finish();
    let conns = [0, 1, 2].map(|i| {
        let mark = Some(MARK + i * 64 * KIB);
        let marks = log.iter().filter(|e| e.1 == "Read" && e.2 == mark);
        let conns: Vec<u64> = marks.map(|e| e.0).collect();
        assert_eq!(conns.len(), 1, "one mark read at {mark:?} in {log:?}");
        conns[0]
    });
    let acts = conns.map(|c| {
        let mine = log.iter().filter(|e| e.0 == c);
        mine.map(|e| e.1.as_str()).collect::<Vec<_>>().join(" ")
    });
    Seen {
        can_multi_conn,
        acts,
        log,
        conns,
    }
}

/// The export `nbdinfo --json` shows at `uri`.
fn export(uri: &str) -> serde_json::Value {
    nbdinfo_json(uri)["exports"][0].clone()
}

#[test]
fn emulate_replays_a_flush_only_on_dirty_upstream_connections() {
    let s = three_clients("disable", &["--multi-conn", "emulate"]);
    assert_eq!(s.can_multi_conn, [true; 3]);
    assert_eq!(s.acts, REPLAY_ON_DIRTY, "{:?}", s.log);
    // The replayed flush reached nbdkit after the write, before client 3 read.
    let flush = s.pos(0, "Flush", None);
    assert!(s.pos(0, "Write", Some(DATA_AT)) < flush);
    assert!(flush < s.pos(2, "Read", Some(DATA_AT)), "{:?}", s.log);
}

#[test]
fn emulate_without_dirty_tracking_flushes_every_upstream_connection() {
    let off = ["--multi-conn", "emulate", "--multi-conn-track-dirty", "off"];
    let s = three_clients("disable", &off);
    assert_eq!(s.can_multi_conn, [true; 3]);
    assert_eq!(s.acts, REPLAY_ON_ALL, "{:?}", s.log);
    let read = s.pos(2, "Read", Some(DATA_AT));
    assert!(s.pos(0, "Flush", None) < read && s.pos(2, "Flush", None) < read);
}

#[test]
fn disable_hides_multi_conn_and_replays_nothing() {
    let s = three_clients("disable", &["--multi-conn", "disable"]);
    assert_eq!(s.can_multi_conn, [false; 3]);
    assert_eq!(s.acts, NO_REPLAY, "{:?}", s.log);
}

#[test]
fn auto_emulates_only_when_the_upstream_lacks_multi_conn() {
    // nbdkit without multi-conn: auto emulates it.
    let s = three_clients("disable", &[]);
    assert_eq!(s.can_multi_conn, [true; 3]);
    assert_eq!(s.acts, REPLAY_ON_DIRTY, "{:?}", s.log);
    // nbdkit with multi-conn (the file plugin's own): passed on, nothing replayed.
    let s = three_clients("plugin", &[]);
    assert_eq!(s.can_multi_conn, [true; 3]);
    assert_eq!(s.acts, NO_REPLAY, "{:?}", s.log);
    // flexnbd serve advertises multi-conn; the proxy passes it on.
    let dir = tempdir();
    let img = image(&dir, 4 * MIB, 13);
    let up = Serve::tcp(&img).start();
    assert_eq!(export(&up.uri())["can_multi_conn"], true);
    let info = export(&Serve::proxy(&up.conn_args()).start().uri());
    assert_eq!(info["can_multi_conn"], true, "{info}");
    assert_eq!(info["export-size"].as_u64(), Some(4 * MIB), "{info}");
}

// ---------------------------------------------------------------- command line

fn proxy_program() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flexnbd-proxy"))
}

#[track_caller]
fn assert_usage(out: &CmdOutput, msg: &str) {
    let err = out.stderr_str();
    assert_eq!(out.status.code(), Some(1), "stderr:\n{err}");
    assert_eq!(err.lines().next(), Some(msg), "stderr:\n{err}");
    let help = err.contains("Usage:") && err.contains("--conn-port");
    assert!(help, "no help:\n{err}");
    assert!(out.stdout.is_empty(), "stdout: {}", out.stdout_str());
}

#[test]
fn cli_missing_options_fail_as_the_c_proxy() {
    let program = |args: &[&str]| run(Command::new(proxy_program()).args(args), TOOL_TIMEOUT);
    let port = free_port().to_string();
    assert_usage(&flexnbd(&["proxy"]), "--addr is required.");
    assert_usage(&program(&[]), "--addr is required.");
    let both = "both --conn-addr and --conn-port are required.";
    assert_usage(&flexnbd(&["proxy", "--addr", LOCAL, "--port", &port]), both);
    let no_port = ["--addr", LOCAL, "--port", &port, "--conn-addr", LOCAL];
    assert_usage(&flexnbd(&[&["proxy"], &no_port[..]].concat()), both);
    assert_usage(&program(&["-l", LOCAL, "-p", &port, "-C", LOCAL]), both);
}

/// Runs `cmd` (a proxy whose upstream at 127.0.0.1:`up` is unusable) and
/// polls it: it must never hold a listening socket, and must exit non-zero
/// within 10 s with one line on stderr naming the upstream. Returns how long it ran.
#[track_caller]
fn fails_before_listening(cmd: &mut Command, up: &str) -> Duration {
    let t0 = Instant::now();
    let mut bg = Background::spawn(cmd);
    let mut listened = false;
    let exited = wait_until(Duration::from_secs(10), || {
        listened |= listening(bg.pid());
        !bg.is_running()
    });
    assert!(exited, "the proxy did not give up: {}", bg.stderr());
    let (st, err) = (bg.wait(Duration::ZERO).unwrap(), bg.stderr());
    assert!(!st.success(), "exit {st:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line:\n{err}");
    let named = err.contains(&format!("{LOCAL}:{up}"));
    assert!(named, "no upstream address:\n{err}");
    assert!(!listened, "the proxy listened without a usable upstream");
    t0.elapsed()
}

/// Whether process `pid` holds a TCP socket in the LISTEN state (/proc).
fn listening(pid: u32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let links = fds
        .flatten()
        .filter_map(|f| std::fs::read_link(f.path()).ok());
    let links: Vec<String> = links.map(|l| l.display().to_string()).collect();
    ["tcp", "tcp6"].iter().any(|t| {
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).unwrap_or_default();
        table.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 9 && f[3] == "0A" && links.contains(&format!("socket:[{}]", f[9]))
        })
    })
}

#[test]
fn cli_unreachable_upstream_fails_before_listening() {
    let port = free_port().to_string();
    // Nobody listens on the upstream port.
    let dead = free_port().to_string();
    let mut cmd = Command::new(bin());
    cmd.args(["proxy", "--addr", LOCAL, "--port", &port]).args([
        "--conn-addr",
        LOCAL,
        "--conn-port",
        &dead,
    ]);
    fails_before_listening(&mut cmd, &dead);
    // An upstream that accepts and never greets: the proxy waits for the
    // greeting (1 s), and all that time does not listen itself.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = silent.local_addr().unwrap().port().to_string();
    let mut cmd = Command::new(proxy_program());
    cmd.args(short_opts(&port, &up))
        .env("FLEXNBD_UPSTREAM_TIMEOUT", "1");
    let took = fails_before_listening(&mut cmd, &up);
    assert!(took >= Duration::from_millis(900), "did not wait: {took:?}");
}

/// The C proxy's short options: listen on 127.0.0.1:`port`, upstream 127.0.0.1:`up`.
fn short_opts(port: &str, up: &str) -> [String; 8] {
    ["-l", LOCAL, "-p", port, "-C", LOCAL, "-P", up].map(String::from)
}

/// Starts a proxy program (`cmd` with the listen port `p` filled in) and waits
/// until `ready` holds; retries with another port if it exits early.
fn start_proxy(
    program: PathBuf,
    args: impl Fn(u16) -> Vec<String>,
    ready: impl Fn(u16) -> bool,
) -> (Background, u16) {
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port();
        let mut bg = Background::spawn(Command::new(&program).args(args(port)));
        if wait_until(READY_TIMEOUT, || !bg.is_running() || ready(port)) && bg.is_running() {
            return (bg, port);
        }
        last = bg.stderr();
    }
    panic!("the proxy did not start: {last}");
}

/// SIGTERM; the proxy must exit 0 within the stop timeout.
#[track_caller]
fn sigterm_exits_zero(bg: &mut Background) {
    assert!(send_signal(bg.pid(), SIGTERM));
    let st = bg.wait(STOP_TIMEOUT).expect("no exit after SIGTERM");
    assert!(st.success(), "exit {st:?} after SIGTERM: {}", bg.stderr());
}

#[test]
fn flexnbd_proxy_program_short_options_serve_an_image() {
    let nbdcopy = require_tool("nbdcopy");
    let dir = tempdir();
    let img = image(&dir, 16 * MIB, 21);
    let up = Serve::tcp(&img).start();
    let upport = up.addr().port().to_string();
    let args = |p: u16| short_opts(&p.to_string(), &upport).to_vec();
    let ready = |p| accepts(SocketAddr::from(([127, 0, 0, 1], p)));
    let (mut bg, port) = start_proxy(proxy_program(), args, ready);
    let uri = format!("nbd://{LOCAL}:{port}/");
    let info = export(&uri);
    assert_eq!(info["export-size"].as_u64(), Some(16 * MIB), "{info}");
    let copy = dir.path().join("copy.img");
    run(Command::new(nbdcopy).arg(&uri).arg(&copy), TOOL_TIMEOUT).expect_success("nbdcopy");
    let (copied, orig) = (md5_file(&copy), md5_file(&img));
    assert_eq!(copied, orig, "the copy via flexnbd-proxy");
    sigterm_exits_zero(&mut bg);
}

/// Reads 64 KiB at argv[2] of argv[1] into argv[3].
const READ_AT: &str = r#"
h = connect(sys.argv[1])
open(sys.argv[3], "wb").write(h.pread(65536, int(sys.argv[2])))
h.shutdown()
out({"ok": True})
"#;

#[test]
fn unix_addr_listens_and_is_removed_on_sigterm() {
    let dir = tempdir();
    let img = image(&dir, 4 * MIB, 31);
    let up = Serve::tcp(&img).start();
    let sock = dir.path().join("proxy.sock");
    let listen = ["proxy".into(), "--addr".into(), path_arg(&sock)];
    let args = |_| [&listen[..], &up.conn_args()].concat();
    let (mut bg, _) = start_proxy(bin(), args, |_| UnixStream::connect(&sock).is_ok());
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let info = export(&uri);
    assert_eq!(info["export-size"].as_u64(), Some(4 * MIB), "{info}");
    let got = dir.path().join("got");
    let args = [uri, (3 * MIB).to_string(), path_arg(&got)];
    python_json(READ_AT, &args, Duration::from_secs(30));
    let want = read_file_at(&img, 3 * MIB, 65536);
    assert_bytes_eq(&read_file(&got), &want, "read via the unix socket");
    sigterm_exits_zero(&mut bg);
    assert!(!sock.exists(), "{} left behind", sock.display());
}

// ---------------------------------------------------------------- status

/// `flexnbd status --sock CTL` (a process), parsed.
#[track_caller]
fn status_cmd(ctl: &Path) -> Status {
    let out = flexnbd(&["status", "--sock", &ctl.display().to_string()]);
    out.expect_success("flexnbd status");
    parse_status_line(out.stdout_str().trim())
        .into_iter()
        .collect()
}

/// `flexnbd status --sock CTL --json` (a process), parsed.
#[track_caller]
fn status_json_cmd(ctl: &Path) -> serde_json::Value {
    let out = flexnbd(&["status", "--sock", &ctl.display().to_string(), "--json"]);
    out.expect_success("flexnbd status --json");
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// Connects, reads once, says so (argv[2]), waits for argv[3], then sends one
/// aio_pread of 64 KiB at 2 MiB and waits for it; the data goes to argv[4].
const OUTSTANDING_READ: &str = r#"
import time
uri, ready, go, got = sys.argv[1:5]
h = connect(uri)
h.pread(4096, 0)
open(ready, "w").close()
deadline = time.time() + 40
while not os.path.exists(go):
    if time.time() > deadline:
        sys.exit("never told to go")
    time.sleep(0.01)
buf = nbd.Buffer(65536)
c = h.aio_pread(buf, 2 * 1048576)
while not h.aio_command_completed(c):
    if time.time() > deadline:
        sys.exit("the read did not complete")
    h.poll(100)
open(got, "wb").write(buf.to_bytearray())
h.shutdown()
out({"ok": True})
"#;

/// The counters of a proxy's `status`.
const COUNTERS: [&str; 4] = [
    "upstream_attempts",
    "requests_resent",
    "num_clients",
    "in_flight",
];

/// Both forms of `status` (two processes): the upstream's address and state,
/// `in_flight` and `num_clients` as given, every counter a number (a JSON
/// number in JSON). Returns the text form.
#[track_caller]
fn check_status(ctl: &Path, addr: &str, state: &str, in_flight: u64, clients: u64) -> Status {
    let (st, j) = (status_cmd(ctl), status_json_cmd(ctl));
    for (k, v) in [("upstream_address", addr), ("upstream", state)] {
        assert_eq!(
            (st[k].as_str(), j[k].as_str()),
            (v, Some(v)),
            "{k}: {st:?} {j}"
        );
    }
    for (k, v) in [("in_flight", in_flight), ("num_clients", clients)] {
        assert_eq!(
            (status_u64(&st, k), j[k].as_u64()),
            (v, Some(v)),
            "{k}: {st:?} {j}"
        );
    }
    for k in COUNTERS {
        status_u64(&st, k);
        assert!(j[k].is_u64(), "{k} is not a JSON number: {j}");
    }
    st
}

type Status = BTreeMap<String, String>;

/// Polls `status` (the process) until `key` is `value`, for at most 20 s.
#[track_caller]
fn wait_status(ctl: &Path, key: &str, value: &str) {
    let ok = wait_until(Duration::from_secs(20), || status_cmd(ctl)[key] == value);
    assert!(ok, "{key} is not {value}: {:?}", status_cmd(ctl));
}

#[test]
fn status_reports_the_upstream_through_a_crash_and_restart() {
    let dir = tempdir();
    let img = image(&dir, 4 * MIB, 41);
    let up_sock = dir.path().join("up.ctl");
    let mut up = Daemon::serve(&img, &up_sock).start();
    let upport = up.addr().port();
    let ctl = dir.path().join("proxy.ctl");
    let retry = ["--retries", "8", "--retry-delay", "0.1"];
    let proxy = Serve::proxy(&up.conn_args()).control(&ctl).args(&retry);
    let proxy = proxy.start();
    let addr = format!("{LOCAL}:{upport}");
    let st = check_status(&ctl, &addr, "connected", 0, 0);
    assert!(status_u64(&st, "upstream_attempts") >= 1, "{st:?}");
    assert_eq!(status_u64(&st, "requests_resent"), 0, "{st:?}");

    let [ready, go, got] = ["ready", "go", "got"].map(|f| dir.path().join(f));
    let args = [proxy.uri(), path_arg(&ready), path_arg(&go), path_arg(&got)];
    let mut client = Background::python(OUTSTANDING_READ, &args);
    wait_until(IO_TIMEOUT, || ready.exists() || !client.is_running());
    assert!(ready.exists(), "client failed: {}", client.stderr());
    check_status(&ctl, &addr, "connected", 0, 1);

    // A stopped upstream takes the read (the kernel queues it): in flight, still connected.
    up.signal(SIGSTOP);
    assert!(wait_until(IO_TIMEOUT, || stopped(up.pid())), "not stopped");
    std::fs::write(&go, b"").unwrap();
    let sent = wait_until(IO_TIMEOUT, || status_cmd(&ctl)["in_flight"] == "1");
    assert!(sent, "no read in flight: {}", client.stderr());
    let st = check_status(&ctl, &addr, "connected", 1, 1);
    let attempts = status_u64(&st, "upstream_attempts");
    // Killed: the proxy reconnects, the read waits.
    up.kill();
    wait_status(&ctl, "upstream", "reconnecting");
    check_status(&ctl, &addr, "reconnecting", 1, 1);
    assert!(
        client.is_running(),
        "the client gave up: {}",
        client.stderr()
    );
    // Back on the same port: the read is sent again and answered.
    let _up = Daemon::serve(&img, &up_sock).port(upport).start();
    wait_status(&ctl, "upstream", "connected");
    let done = client.wait(IO_TIMEOUT).is_some_and(|s| s.success());
    assert!(done, "client: {}", client.stderr());
    let want = read_file_at(&img, 2 * MIB, 65536);
    assert_bytes_eq(&read_file(&got), &want, "the re-sent read");
    wait_status(&ctl, "num_clients", "0");
    let st = check_status(&ctl, &addr, "connected", 0, 0);
    assert!(status_u64(&st, "requests_resent") >= 1, "{st:?}");
    assert!(status_u64(&st, "upstream_attempts") > attempts, "{st:?}");
}

#[test]
fn mirror_on_the_proxy_control_socket_is_refused() {
    let dir = tempdir();
    let img = image(&dir, MIB, 51);
    let up = Serve::tcp(&img).start();
    let ctl = dir.path().join("proxy.ctl");
    let mut proxy = Serve::proxy(&up.conn_args()).control(&ctl).start();
    let out = mirror_cmd(&ctl, up.addr(), &[]);
    assert!(!out.success(), "mirror succeeded: {}", out.stdout_str());
    let err = out.stderr_str();
    assert!(err.contains("proxy has no image"), "unclear error:\n{err}");
    proxy.assert_alive();
    assert_eq!(status_cmd(&ctl)["upstream"], "connected");
}

/// Every thread of process `pid` is stopped (state `T` in /proc).
fn stopped(pid: u32) -> bool {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc");
    tasks.flatten().all(|t| {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        state == Some(Some('T'))
    })
}

/// A random image of `size` bytes in `dir`.
fn image(dir: &tempfile::TempDir, size: u64, seed: u64) -> PathBuf {
    let img = dir.path().join("disk.img");
    create_random_file(&img, size, seed);
    img
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}
