//! `flexnbd proxy` end to end: it serves what its upstream serves (TCP and
//! unix, newstyle and old-style), and clients writing through it see no
//! error while the server behind it is killed and restarted, or migrated
//! to a listener that takes over its port; every acknowledged write is in
//! the final image. Also retry exhaustion, the read-only fallback and
//! request size limits with a real upstream.

mod common;

use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Proxy options that make reconnecting quick in tests.
const QUICK_RETRY: [&str; 6] = [
    "--retry-delay",
    "0.2",
    "--retry-exponential",
    "no",
    "--retries",
    "50",
];

fn epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The proxy's status keys.
fn proxy_status(p: &Server) -> std::collections::BTreeMap<String, String> {
    status_map(p.ctl())
}

fn attempts(p: &Server) -> u64 {
    proxy_status(p)["upstream_attempts"].parse().unwrap()
}

/// Waits until the proxy has connected again since it had made `before`
/// connection attempts.
#[track_caller]
fn wait_reconnected(p: &Server, before: u64) {
    let ok = wait_until(Duration::from_secs(30), || {
        let s = proxy_status(p);
        s["upstream"] == "connected" && s["upstream_attempts"].parse::<u64>().unwrap() > before
    });
    assert!(
        ok,
        "proxy did not reconnect: {:?}\n{}",
        proxy_status(p),
        p.stderr()
    );
}

/// No write failed before `t` (the proxy's own stop), and none succeeded after
/// the first failure.
#[track_caller]
fn no_failure_before(r: &serde_json::Value, t: f64) {
    if let Some(ff) = r["first_fail"].as_array() {
        assert!(
            ff[0].as_f64().unwrap() >= t,
            "a write failed while the proxy was up: {ff:?} (failures {})",
            r["fails"]
        );
    }
    assert_eq!(r["ok_after_fail"].as_u64(), Some(0), "{}", r["late_ok"]);
}

/// `flexnbd serve` on `file` with control socket `sock`, on `port` when
/// given (a restart takes the old server's port), old-style if asked.
fn upstream(file: &Path, sock: &Path, port: Option<u16>, oldstyle: bool) -> Server {
    let mut d = Daemon::serve(file, sock);
    if let Some(p) = port {
        d = d.port(p);
    }
    if oldstyle {
        d = d.arg("--oldstyle");
    }
    d.start()
}

/// SIGKILLs the server and waits for it to be gone.
#[track_caller]
fn kill(up: &mut Server) {
    up.signal(SIGKILL);
    assert!(up.wait_exit(Duration::from_secs(10)).is_some());
}

fn block_of(file: &Path) -> impl FnMut(u64) -> Vec<u8> + '_ {
    move |b| read_file_at(file, b * 4096, 4096)
}

#[test]
fn serves_what_the_upstream_serves() {
    let dir = tempdir();
    let file = dir.path().join("img");
    create_random_file(&file, 32 * MIB, 7);
    let up = Serve::tcp(&file).start();
    let p = Serve::proxy(&up.conn_args())
        .control(&dir.path().join("p.sock"))
        .start();
    let direct = nbdinfo_json(&up.uri());
    let proxied = nbdinfo_json(&p.uri());
    let (d, x) = (&direct["exports"][0], &proxied["exports"][0]);
    for k in [
        "export-size",
        "is_read_only",
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_df",
        "can_multi_conn",
    ] {
        assert_eq!(d[k], x[k], "{k}: direct {d} proxied {x}");
    }
    assert_eq!(x["contexts"], d["contexts"], "meta contexts passed through");
    assert_eq!(proxied["protocol"], direct["protocol"]);

    // Out through the proxy, then a new image in through it.
    let out = dir.path().join("out");
    let nbdcopy = require_tool("nbdcopy");
    run(Command::new(&nbdcopy).arg(p.uri()).arg(&out), TOOL_TIMEOUT).expect_success("nbdcopy out");
    assert_eq!(md5_file(&out), md5_file(&file));
    let src = dir.path().join("src");
    create_random_file(&src, 32 * MIB, 8);
    run(
        Command::new(&nbdcopy).arg("--flush").arg(&src).arg(p.uri()),
        TOOL_TIMEOUT,
    )
    .expect_success("nbdcopy in");
    assert_eq!(md5_file(&file), md5_file(&src));

    // qemu-img sees the same bytes through both.
    let qemu_img = require_tool("qemu-img");
    run(
        Command::new(&qemu_img)
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(p.uri())
            .arg(up.uri()),
        TOOL_TIMEOUT,
    )
    .expect_success("qemu-img compare");

    // Block status passes through: a trimmed range reads as a hole.
    let map = python_json(
        r#"
h = connect(sys.argv[1], meta=True)
h.trim(4 << 20, 8 << 20)
h.flush()
ext = []
def cb(meta, off, entries, err):
    ext.extend(entries)
    return 0
h.block_status(4 << 20, 8 << 20, cb)
print(json.dumps({"ext": ext, "data": list(h.pread(4096, 8 << 20)[:8])}))
"#,
        &[p.uri()],
        TOOL_TIMEOUT,
    );
    assert_eq!(map["data"], serde_json::json!([0, 0, 0, 0, 0, 0, 0, 0]));
    assert_eq!(map["ext"][1].as_u64().unwrap() & 1, 1, "a hole: {map}");
}

#[test]
fn unix_to_unix() {
    let dir = tempdir();
    let file = dir.path().join("img");
    create_random_file(&file, 16 * MIB, 9);
    let up_sock = dir.path().join("up.nbd");
    let up = Serve::unix(&file, &up_sock).start();
    let mine = dir.path().join("proxy.nbd");
    let mut p = Serve::proxy(&up.conn_args());
    p.addr = None;
    p.unix = Some(mine.clone());
    let mut p = p.start();
    let uri = format!("nbd+unix:///?socket={}", mine.display());
    let out = dir.path().join("out");
    run(
        Command::new(require_tool("nbdcopy")).arg(&uri).arg(&out),
        TOOL_TIMEOUT,
    )
    .expect_success("nbdcopy over unix");
    assert_eq!(md5_file(&out), md5_file(&file));
    assert_eq!(p.stop_with(SIGTERM).code(), Some(0));
    assert!(!mine.exists(), "the proxy's socket file is removed at exit");
}

/// The story: a writer through the proxy the whole time, the server killed
/// with SIGKILL and restarted on the same file and port, then stopped with
/// SIGTERM (which answers requests in flight ESHUTDOWN) and restarted.
fn kill_and_restart(oldstyle: bool) {
    let dir = tempdir();
    let file = dir.path().join("img");
    create_sparse_file(&file, 64 * MIB);
    let sock = dir.path().join("up.sock");
    let mut up = upstream(&file, &sock, None, oldstyle);
    let port = up.port.unwrap();
    let p = Daemon::proxy(&dir.path().join("p.sock"), &up)
        .args(&QUICK_RETRY)
        .env("FLEXNBD_UPSTREAM_TIMEOUT", "5")
        .start();
    if oldstyle {
        // Old-style upstream, old-style greeting to the client: its size and flags.
        let mut raw = Raw::connect(p.addr());
        let g = raw.read_exact(152);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(be64(&g, 8), 0x0000_4202_8186_1253);
        assert_eq!(be64(&g, 16), 64 * MIB);
        assert_ne!(be32(&g, 24) & 1, 0, "flags: {:#x}", be32(&g, 24));
    }
    let mut w = LoadWriter::start(&p.uri(), 8, 11);
    for sig in [SIGKILL, SIGTERM] {
        let before = attempts(&p);
        up.signal(sig);
        assert!(up.wait_exit(Duration::from_secs(10)).is_some());
        up = upstream(&file, &sock, Some(port), oldstyle);
        wait_reconnected(&p, before);
    }
    // Let it write through the restarted server for a moment, then end it.
    let s = proxy_status(&p);
    assert_eq!(s["upstream_address"], format!("127.0.0.1:{port}"));
    assert!(s["upstream_attempts"].parse::<u64>().unwrap() >= 3, "{s:?}");
    let t_stop = epoch();
    drop(p);
    let r = w.finish(Duration::from_secs(60));
    no_failure_before(&r, t_stop);
    assert!(r["n_ok"].as_u64().unwrap() > 2000, "{}", r["n_ok"]);
    up.stop();
    let n = check_acknowledged_writes(&r, block_of(&file));
    assert!(n > 100, "only {n} blocks checked");
}

#[test]
fn server_killed_and_restarted_is_invisible() {
    kill_and_restart(false);
}

#[test]
fn oldstyle_server_killed_and_restarted_is_invisible() {
    kill_and_restart(true);
}

/// Source on port P, destination listening elsewhere and taking over P
/// after the hand-over; the proxy points at P.
struct Migration {
    src: Source,
    dst: Listener,
    proxy: Server,
}

fn migration_setup(size: u64) -> Migration {
    migration_setup_styled(size, false)
}

/// [`migration_setup`], with both servers old-style when `oldstyle`.
fn migration_setup_styled(size: u64, oldstyle: bool) -> Migration {
    let style: &[&str] = if oldstyle { &["--oldstyle"] } else { &[] };
    let src = source_with(size, 21, style);
    let port = src.srv.port.unwrap().to_string();
    let dst = listener(size, &[&["--rebind-port", &port], style].concat());
    let proxy = Daemon::proxy(&src._dir.path().join("p.sock"), &src.srv)
        .args(&QUICK_RETRY)
        .env("FLEXNBD_UPSTREAM_TIMEOUT", "5")
        .start();
    Migration { src, dst, proxy }
}

impl Migration {
    /// Migrates, waits for the hand-over and for the proxy to be back.
    fn migrate(&mut self) {
        let out = mirror_cmd(self.src.srv.ctl(), self.dst.srv.addr(), &["--wait"]);
        out.expect_success("mirror --wait");
        assert!(self.src.srv.wait_exit(Duration::from_secs(30)).is_some());
        self.dst.assert_took_control();
        let port = self.src.srv.port.unwrap();
        let back = wait_until(Duration::from_secs(30), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
                && proxy_status(&self.proxy)["upstream"] == "connected"
        });
        assert!(back, "the destination did not take over port {port}");
    }
}

#[test]
fn migration_with_rebind_is_invisible_to_a_writer() {
    migration_under_a_writer(false);
}

#[test]
fn oldstyle_migration_with_rebind_is_invisible_to_a_writer() {
    migration_under_a_writer(true);
}

fn migration_under_a_writer(oldstyle: bool) {
    let mut m = migration_setup_styled(64 * MIB, oldstyle);
    let mut w = LoadWriter::start(&m.proxy.uri(), 8, 31);
    m.migrate();
    let t_stop = epoch();
    drop(m.proxy);
    let r = w.finish(Duration::from_secs(60));
    no_failure_before(&r, t_stop);
    let n = check_acknowledged_writes(&r, block_of(&m.dst.file));
    assert!(n > 100, "only {n} blocks checked");
}

#[test]
fn migration_with_rebind_is_invisible_to_nbdcopy_and_fio() {
    let size = 64 * MIB;
    let mut m = migration_setup(size);
    // nbdcopy streams an image in from a pipe, fed slowly enough to span the
    // hand-over; fio verifies what it writes as it goes.
    let data = random_bytes(77, size as usize);
    let mut copy = Command::new(require_tool("nbdcopy"))
        .args(["--flush", "-", &m.proxy.uri()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = copy.stdin.take().unwrap();
    let half = data.len() / 2;
    stdin.write_all(&data[..half]).unwrap();
    let fio = require_tool("fio");
    let mut fio = Background::spawn(Command::new(&fio).args([
        "--name=proxy",
        "--ioengine=nbd",
        &format!("--uri={}", m.proxy.uri()),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=8",
        "--size=8M",
        "--offset=0",
        "--verify=crc32c",
        "--verify_backlog=64",
        "--verify_state_save=0",
        "--time_based",
        "--runtime=8",
        "--output-format=json",
    ]));
    m.migrate();
    let restarted = Instant::now();
    stdin.write_all(&data[half..]).unwrap();
    drop(stdin);
    let st = wait_child(&mut copy, TOOL_TIMEOUT).expect("nbdcopy finished");
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(copy.stderr.as_mut().unwrap(), &mut err);
    assert!(st.success(), "nbdcopy failed across the migration: {err}");
    let st = fio.wait(Duration::from_secs(60)).expect("fio finished");
    assert!(
        st.success(),
        "fio failed: {}\n{}",
        fio.stderr(),
        fio.stdout()
    );
    let out = fio.stdout();
    let json_at = out.find("\n{").map_or(0, |i| i + 1);
    let report: serde_json::Value =
        serde_json::from_str(&out[json_at..]).unwrap_or_else(|e| panic!("fio JSON: {e}: {out}"));
    assert_eq!(report["jobs"][0]["error"], 0, "{}", fio.stderr());
    assert!(report["jobs"][0]["write"]["io_bytes"].as_u64().unwrap() > 0);
    assert!(restarted.elapsed() < Duration::from_secs(60));
    // fio wrote the first 8 MiB last (nbdcopy finished before it ended);
    // the rest is nbdcopy's.
    let got = read_file_at(&m.dst.file, 8 * MIB, (size - 8 * MIB) as usize);
    assert_bytes_eq(&got, &data[8 * MIB as usize..], "image after the migration");
}

#[test]
fn retries_exhausted_then_a_new_round() {
    let dir = tempdir();
    let file = dir.path().join("img");
    create_random_file(&file, 8 * MIB, 3);
    let sock = dir.path().join("up.sock");
    let mut up = upstream(&file, &sock, None, false);
    let port = up.port.unwrap();
    let p = Daemon::proxy(&dir.path().join("p.sock"), &up)
        .args(&[
            "--retries",
            "2",
            "--retry-delay",
            "0.3",
            "--retry-exponential",
            "no",
        ])
        .start();
    let script = r#"
h = connect(sys.argv[1])
assert len(h.pread(4096, 0)) == 4096
open(sys.argv[2], "w").close()
while not os.path.exists(sys.argv[3]):
    time.sleep(0.01)
t = time.time()
try:
    h.pread(4096, 4096)
    res = {"ok": True}
except nbd.Error as e:
    res = {"ok": False, "errno": e.errnum, "msg": e.string}
res["took"] = time.time() - t
open(sys.argv[4], "w").close()
while not os.path.exists(sys.argv[5]):
    time.sleep(0.01)
res["after"] = list(h.pread(8, 4096))
print(json.dumps(res))
"#;
    let f = |n: &str| dir.path().join(n).display().to_string();
    let mut bg = Background::python(
        &format!("import os, time\n{script}"),
        &[
            p.uri(),
            f("connected"),
            f("killed"),
            f("failed"),
            f("restarted"),
        ],
    );
    assert!(wait_until(Duration::from_secs(20), || dir
        .path()
        .join("connected")
        .exists()));
    kill(&mut up);
    std::fs::File::create(dir.path().join("killed")).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || dir
            .path()
            .join("failed")
            .exists()),
        "the read was not failed: {}",
        bg.stderr()
    );
    assert!(p.stderr().contains("gave up"), "{}", p.stderr());
    assert_eq!(proxy_status(&p)["upstream"], "failed");
    let _up = upstream(&file, &sock, Some(port), false);
    std::fs::File::create(dir.path().join("restarted")).unwrap();
    assert!(
        bg.wait(Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "{}",
        bg.stderr()
    );
    let r: serde_json::Value = serde_json::from_str(bg.stdout().trim()).unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["errno"], 5, "EIO: {r}");
    let took = r["took"].as_f64().unwrap();
    assert!(
        (0.5..5.0).contains(&took),
        "EIO after {took}s (two 0.3 s waits)"
    );
    let want: Vec<u8> = read_file_at(&file, 4096, 8);
    assert_eq!(
        r["after"],
        serde_json::json!(want),
        "the next request starts a new round"
    );
}

#[test]
fn read_only_fallback_after_a_failure() {
    let dir = tempdir();
    let file = dir.path().join("img");
    create_random_file(&file, 8 * MIB, 4);
    let sock = dir.path().join("up.sock");
    let mut up = upstream(&file, &sock, None, false);
    let port = up.port.unwrap();
    let p = Daemon::proxy(&dir.path().join("p.sock"), &up)
        .args(&QUICK_RETRY)
        .args(&["--retry-readonly", "yes"])
        .start();
    let script = r#"
import os, time
h = connect(sys.argv[1])
h.pwrite(b"\x5a" * 4096, 0)
open(sys.argv[2], "w").close()
while not os.path.exists(sys.argv[3]):
    time.sleep(0.01)
res = {"read": list(h.pread(4, 0))}
try:
    h.pwrite(b"\x33" * 4096, 8192)
    res["write"] = "ok"
except nbd.Error as e:
    res["write"] = e.errnum
try:
    h.trim(4096, 65536)
    res["trim"] = "ok"
except nbd.Error as e:
    res["trim"] = e.errnum
print(json.dumps(res))
"#;
    let f = |n: &str| dir.path().join(n).display().to_string();
    let mut bg = Background::python(script, &[p.uri(), f("wrote"), f("restarted")]);
    assert!(wait_until(Duration::from_secs(20), || dir
        .path()
        .join("wrote")
        .exists()));
    let before = read_file_at(&file, 8192, 4096);
    kill(&mut up);
    let _up = upstream(&file, &sock, Some(port), false);
    std::fs::File::create(dir.path().join("restarted")).unwrap();
    assert!(
        bg.wait(Duration::from_secs(30))
            .is_some_and(|s| s.success()),
        "{}",
        bg.stderr()
    );
    let r: serde_json::Value = serde_json::from_str(bg.stdout().trim()).unwrap();
    assert_eq!(
        r["read"],
        serde_json::json!([0x5a, 0x5a, 0x5a, 0x5a]),
        "{r}"
    );
    assert_eq!(r["write"], 1, "EPERM after the failure: {r}");
    assert_eq!(r["trim"], 1, "EPERM after the failure: {r}");
    assert_eq!(
        read_file_at(&file, 8192, 4096),
        before,
        "the refused write changed nothing"
    );
}

#[test]
fn large_and_pipelined_requests() {
    let dir = tempdir();
    let file = dir.path().join("img");
    create_random_file(&file, 96 * MIB, 5);
    let up = Serve::tcp(&file).start();
    let p = Serve::proxy(&up.conn_args()).start();
    let r = python_json(
        r#"
import random, hashlib
h = connect(sys.argv[1])
big = random.Random(1).randbytes(32 << 20)
h.pwrite(big, 1 << 20)
back = h.pread(32 << 20, 1 << 20)
res = {"big": back == big}
try:
    h.pread((32 << 20) + 1, 0)
    res["over"] = "ok"
except nbd.Error as e:
    res["over"] = e.errnum
# 64 reads in flight, answered in any order.
rng = random.Random(2)
offs = [rng.randrange(0, (96 << 20) - 65536) for _ in range(64)]
bufs = [nbd.Buffer(65536) for _ in offs]
cookies = [h.aio_pread(b, o) for b, o in zip(bufs, offs)]
assert h.aio_in_flight() > 1
for c in cookies:
    while not h.aio_command_completed(c):
        h.poll(-1)
res["reads"] = [[o, hashlib.md5(b.to_bytearray()).hexdigest()] for b, o in zip(bufs, offs)]
print(json.dumps(res))
"#,
        &[p.uri()],
        TOOL_TIMEOUT,
    );
    assert_eq!(r["big"], true, "32 MiB round trip");
    assert_eq!(r["over"], 22, "a read over 32 MiB is EINVAL: {r}");
    for e in r["reads"].as_array().unwrap() {
        let off = e[0].as_u64().unwrap();
        let want = md5_of(&read_file_at(&file, off, 65536));
        assert_eq!(e[1].as_str().unwrap(), want, "read at {off}");
    }
}

/// READs as large as the proxy's pipe (1 MiB where the pipe cannot grow
/// beyond the system's limit, 32 MiB where it can), many in flight, over a
/// TCP and a unix upstream: data arriving in more pieces than the pipe has
/// slots waits in memory instead of stalling the connection, and every byte
/// arrives.
#[test]
fn reads_as_large_as_the_pipe_stream_through() {
    let dir = tempdir();
    let file = dir.path().join("img");
    create_random_file(&file, 96 * MIB, 6);
    let want = md5_file(&file);
    let copy = dir.path().join("copy");
    std::fs::copy(&file, &copy).unwrap();
    let up_sock = dir.path().join("up.nbd");
    let tcp_up = Serve::tcp(&file).start();
    let tcp = Serve::proxy(&tcp_up.conn_args()).start();
    let unix_up = Serve::unix(&copy, &up_sock).start();
    let unix = Serve::proxy(&unix_up.conn_args()).start();
    for p in [&tcp, &unix] {
        for size in ["1048576", "4194304", "33554432"] {
            let out = dir.path().join("out");
            run(
                Command::new(require_tool("nbdcopy"))
                    .args(["-C", "1", "--request-size", size])
                    .arg(p.uri())
                    .arg(&out),
                TOOL_TIMEOUT,
            )
            .expect_success("nbdcopy through the proxy");
            assert_eq!(md5_file(&out), want, "{size}-byte reads via {}", p.uri());
            std::fs::remove_file(&out).unwrap();
        }
    }
}

fn md5_of(data: &[u8]) -> String {
    let dir = tempdir();
    let f = dir.path().join("d");
    std::fs::write(&f, data).unwrap();
    md5_file(&f)
}

/// The proxy offers what the upstream offers and no more: against nbdkit
/// without WRITE_ZEROES, neither does the proxy, and such requests are
/// refused without reaching the upstream.
#[test]
fn advertises_only_what_the_upstream_offers() {
    let nbdkit = require_tool("nbdkit");
    let nbdinfo = require_tool("nbdinfo");
    let port = free_port();
    let mut kit = Background::spawn(Command::new(&nbdkit).args([
        "--exit-with-parent",
        "-f",
        "-i",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "--filter=noextents",
        "--filter=nozero",
        "memory",
        "16M",
        "zeromode=none",
    ]));
    let uri = format!("nbd://127.0.0.1:{port}/");
    assert!(
        wait_until(READY_TIMEOUT, || !kit.is_running()
            || run(Command::new(&nbdinfo).args(["--size", &uri]), IO_TIMEOUT)
                .success()),
        "nbdkit did not start"
    );
    assert!(kit.is_running(), "nbdkit: {}", kit.stderr());
    let up = ["--conn-addr", "127.0.0.1", "--conn-port", &port.to_string()].map(String::from);
    let p = Serve::proxy(&up).start();
    let direct = nbdinfo_json(&uri);
    let proxied = nbdinfo_json(&p.uri());
    let (d, x) = (&direct["exports"][0], &proxied["exports"][0]);
    for k in [
        "can_zero",
        "can_fast_zero",
        "can_fua",
        "can_flush",
        "can_trim",
        "can_cache",
        "can_df",
        "can_multi_conn",
        "is_read_only",
    ] {
        assert_eq!(d[k], x[k], "{k}: direct {d} proxied {x}");
    }
    assert_eq!(x["can_zero"], false);
    assert_eq!(x["contexts"], d["contexts"]);
    // Raw requests the export did not advertise: EINVAL, the stream goes on.
    let mut raw = Raw::structured(p.addr());
    raw.req(6, 0, 1, 0, 4096); // WRITE_ZEROES
    assert_eq!(errno(raw.reply()), (1, 22));
    raw.req(1, 0x10, 2, 0, 512); // WRITE with FAST_ZERO: a flag not for writes
    raw.send(&[0x11; 512]);
    assert_eq!(errno(raw.reply()), (2, 22));
    assert_eq!(raw.write(3, 0, &[0x22; 512]), 0);
    raw.req(0, 0, 4, 0, 512);
    match raw.reply() {
        Reply::Chunk(c) => {
            assert_eq!((c.cookie, c.kind), (4, 1), "one data chunk");
            assert_eq!(&c.payload[8..], &[0x22; 512][..]);
        }
        r => panic!("a READ answered {r:?}"),
    }
}

/// The cookie and error of a simple reply or an error chunk.
fn errno(r: Reply) -> (u64, u32) {
    match r {
        Reply::Simple { error, cookie } => (cookie, error),
        Reply::Chunk(c) => (c.cookie, be32(&c.payload, 0)),
    }
}
