//! Pause, resume and snapshot: a pause freezes the image (every
//! acknowledged write in it, nothing changing) while requests wait, and is
//! always followed by a resume, on every path: its timeout, a held
//! connection killed, a snapshot command that fails, hangs or is killed, a
//! snapshot process stopped by SIGTERM or SIGKILL, overlapping pauses, a
//! pause during a migration, and a failure partway through several servers.

mod common;

use common::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SIZE: u64 = 16 * MIB;
/// The writer uses the first half; reads check the second, which nobody writes.
const WRITER_BLOCKS: u64 = SIZE / 2 / 4096;
const SIGHUP: i32 = 1;

/// A writer (python3-libnbd, 8 writes in flight, never two to one block)
/// that runs until STOP exists, keeps the count of acknowledged writes in
/// PROGRESS, writes the last acknowledged write of every block to
/// DUMP.json whenever DUMP exists, and at the end (all writes completed)
/// to REPORT. Each write's content is (id, block) repeated, as
/// [`load_block`]. Any failed write: exit 1. argv: URI BLOCKS PROGRESS DUMP
/// STOP REPORT.
const WRITER: &str = r#"
import random, struct, time
uri, nblocks, progress, dump, stop, report = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
h = connect(uri)
rng = random.Random(7)
inflight, busy, last_ok = {}, set(), {}
n_ok, next_id = 0, 1
def save(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)
def retire(c):
    global n_ok
    b, wid, _ = inflight.pop(c)
    busy.discard(b)
    h.aio_command_completed(c)  # raises on a failed write
    last_ok[b] = wid
    n_ok += 1
    if n_ok % 10 == 0:
        save(progress, n_ok)
stopping = False
while True:
    stopping = stopping or os.path.exists(stop)
    while not stopping and len(inflight) < 8:
        b = rng.randrange(nblocks)
        if b in busy:
            continue
        buf = nbd.Buffer.from_bytearray(bytearray(struct.pack(">QQ", next_id, b) * 256))
        inflight[h.aio_pwrite(buf, b * 4096)] = (b, next_id, buf)
        busy.add(b)
        next_id += 1
    if stopping and not inflight:
        break
    h.poll(100)
    while inflight:
        c = h.aio_peek_command_completed()
        if not c:
            break
        retire(c)
    if os.path.exists(dump) and not os.path.exists(dump + ".json"):
        save(dump + ".json", {"n_ok": n_ok, "last_ok": last_ok})
save(progress, n_ok)
save(report, {"n_ok": n_ok, "last_ok": last_ok})
"#;

struct Writer {
    bg: Background,
    dir: tempfile::TempDir,
}

impl Writer {
    fn start(uri: &str) -> Writer {
        let dir = tempdir();
        let p = |n: &str| dir.path().join(n).display().to_string();
        let bg = Background::python(
            WRITER,
            &[
                uri.to_owned(),
                WRITER_BLOCKS.to_string(),
                p("progress"),
                p("dump"),
                p("stop"),
                p("report"),
            ],
        );
        let w = Writer { bg, dir };
        w.wait_acked(300);
        w
    }

    fn acked(&self) -> u64 {
        std::fs::read_to_string(self.dir.path().join("progress"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    #[track_caller]
    fn wait_acked(&self, n: u64) {
        assert!(
            wait_until(Duration::from_secs(30), || self.acked() >= n),
            "writer reached {} acknowledged writes, not {n}: {}",
            self.acked(),
            self.bg.stderr()
        );
    }

    /// The writer's last acknowledged write of every block, now.
    fn dump(&self) -> serde_json::Value {
        let out = self.dir.path().join("dump.json");
        let _ = std::fs::remove_file(&out);
        std::fs::write(self.dir.path().join("dump"), b"").unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || out.exists()),
            "no dump"
        );
        let v = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        std::fs::remove_file(self.dir.path().join("dump")).unwrap();
        v
    }

    /// Stops the writer; it must end without an error. Its final record.
    #[track_caller]
    fn finish(mut self) -> serde_json::Value {
        std::fs::write(self.dir.path().join("stop"), b"").unwrap();
        let st = self.bg.wait(Duration::from_secs(60));
        assert!(
            st.is_some_and(|s| s.success()),
            "writer failed ({st:?}): {}",
            self.bg.stderr()
        );
        serde_json::from_str(&std::fs::read_to_string(self.dir.path().join("report")).unwrap())
            .unwrap()
    }
}

/// Every block of `last_ok` holds its last acknowledged write in `image`.
#[track_caller]
fn check_writes(image: &[u8], record: &serde_json::Value, what: &str) {
    let last = record["last_ok"].as_object().unwrap();
    assert!(!last.is_empty());
    for (b, wid) in last {
        let b: u64 = b.parse().unwrap();
        let at = (b * 4096) as usize;
        assert_bytes_eq(
            &image[at..at + 4096],
            &load_block(wid.as_u64().unwrap(), b),
            &format!("{what}: block {b}"),
        );
    }
}

/// A READ of 4 KiB at `off` sent now; its reply is read by [`read_done`].
fn read_pending(addr: std::net::SocketAddr, off: u64) -> Raw {
    let mut c = Raw::simple(addr);
    c.req(CMD_READ, 0, 77, off, 4096);
    c
}

/// Whether the pending read's reply has arrived within `d` (reading it if so).
fn read_done(c: &mut Raw, d: Duration) -> Option<Vec<u8>> {
    c.s.set_read_timeout(Some(d)).unwrap();
    let mut h = [0u8; 16];
    match c.s.peek(&mut h) {
        Ok(n) if n > 0 => {}
        _ => return None,
    }
    c.s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.s.read_exact(&mut h).unwrap();
    assert_eq!(be32(&h, 0), SIMPLE_MAGIC);
    assert_eq!(be32(&h, 4), 0, "read error");
    assert_eq!(be64(&h, 8), 77);
    let mut data = vec![0u8; 4096];
    c.s.read_exact(&mut data).unwrap();
    Some(data)
}

fn serve(dir: &Path) -> (PathBuf, Server) {
    let img = dir.join("img");
    create_random_file(&img, SIZE, 0x9a05e);
    let srv = Daemon::serve(&img, &dir.join("ctl"))
        .args(&["--pause-control", dir.join("pc").to_str().unwrap()])
        .start();
    (img, srv)
}

#[track_caller]
fn ok(args: &[&str]) -> String {
    let out = flexnbd(args);
    assert!(out.success(), "flexnbd {args:?}: {out:?}");
    out.stdout_str()
}

#[track_caller]
fn paused(ctl: &Path) -> bool {
    status_map(ctl)["paused"] == "true"
}

#[track_caller]
fn wait_resumed(ctl: &Path, what: &str) {
    assert!(
        wait_until(Duration::from_secs(5), || !paused(ctl)),
        "{what}: still paused: {:?}",
        status_map(ctl)
    );
}

/// Expected: under a writer with 8 writes in flight, `pause` returns; the
/// image's md5 then stays the same for 3 s and holds every write the
/// writer saw acknowledged; no write is acknowledged meanwhile; a read sent
/// while paused is answered only after `resume`; status shows the pause and
/// counts the queued requests; the writer then goes on, finishes without an
/// error, and the image holds its last write of every block.
#[test]
fn pause_freezes_the_image_under_a_writer_and_resume_lets_it_go_on() {
    let dir = tempdir();
    let (img, srv) = serve(dir.path());
    let ctl = dir.path().join("ctl");
    let w = Writer::start(&srv.uri());
    let reply = ok(&["pause", "--sock", ctl.to_str().unwrap(), "--timeout", "30"]);
    assert!(reply.contains("paused"), "{reply}");
    let t = Instant::now();
    let m0 = md5_file(&img);
    let seen = w.dump();
    let acked = seen["n_ok"].as_u64().unwrap();
    let mut c = read_pending(srv.addr(), SIZE - 8192);
    assert!(
        read_done(&mut c, Duration::from_millis(500)).is_none(),
        "read answered while paused"
    );
    let st = status_map(&ctl);
    assert_eq!(st["paused"], "true", "{st:?}");
    assert_eq!(st["pause_holds"], "1", "{st:?}");
    assert!(st["paused_for"].parse::<f64>().unwrap() > 0.0, "{st:?}");
    let queued: u64 = st["queued_requests"].parse().unwrap();
    assert!(
        queued >= 1,
        "the read (and the writer's writes) wait: {st:?}"
    );
    while t.elapsed() < Duration::from_secs(3) {
        assert_eq!(md5_file(&img), m0, "the image changed while paused");
    }
    assert_eq!(
        w.dump()["n_ok"].as_u64(),
        Some(acked),
        "writes acknowledged while paused"
    );
    check_writes(&read_file(&img), &seen, "while paused");
    assert!(
        read_done(&mut c, Duration::from_millis(10)).is_none(),
        "read answered while paused"
    );

    ok(&["resume", "--sock", ctl.to_str().unwrap()]);
    let data = read_done(&mut c, Duration::from_secs(5)).expect("read answered after resume");
    assert_bytes_eq(
        &data,
        &read_file_at(&img, SIZE - 8192, 4096),
        "read after resume",
    );
    w.wait_acked(acked + 300);
    let rec = w.finish();
    check_writes(&read_file(&img), &rec, "at the end");
    assert!(!paused(&ctl));
}

/// Expected: a pause with `--timeout 1` ends by itself about a second
/// later, with a log line; the read waiting on it is then answered.
#[test]
fn a_pause_ends_at_its_timeout() {
    let dir = tempdir();
    let (img, srv) = serve(dir.path());
    let ctl = dir.path().join("ctl");
    let t = Instant::now();
    ok(&["pause", "-s", ctl.to_str().unwrap(), "-t", "1"]);
    let mut c = read_pending(srv.addr(), 0);
    let data = read_done(&mut c, Duration::from_secs(5)).expect("answered after the timeout");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "too early: {:?}",
        t.elapsed()
    );
    assert_bytes_eq(&data, &read_file_at(&img, 0, 4096), "read");
    wait_resumed(&ctl, "timeout");
    assert_eq!(srv.log_count("reached its timeout"), 1, "{}", srv.stderr());
}

/// Expected: `pause --hold` keeps the image paused while it runs; killed
/// with SIGKILL, its connection closes and the image resumes at once.
#[test]
fn a_held_pause_ends_when_its_holder_is_killed() {
    let dir = tempdir();
    let (_img, srv) = serve(dir.path());
    let ctl = dir.path().join("ctl");
    let mut holder = Background::spawn(Command::new(bin()).args([
        "pause",
        "--hold",
        "-t",
        "60",
        "-s",
        ctl.to_str().unwrap(),
    ]));
    assert!(wait_until(Duration::from_secs(10), || paused(&ctl)));
    let mut c = read_pending(srv.addr(), 0);
    assert!(read_done(&mut c, Duration::from_millis(300)).is_none());
    assert!(send_signal(holder.pid(), SIGKILL));
    holder.wait(Duration::from_secs(5));
    assert!(
        read_done(&mut c, Duration::from_secs(3)).is_some(),
        "read after the holder died"
    );
    wait_resumed(&ctl, "holder killed");
}

/// Expected: two pauses are counted; resuming either keeps the image
/// paused by the other; resuming the second one resumes it; `resume` when
/// not paused and a pause with a bad timeout get clear errors.
#[test]
fn overlapping_pauses_are_counted_in_either_order() {
    let dir = tempdir();
    let (_img, srv) = serve(dir.path());
    let ctl = dir.path().join("ctl");
    let c = ctl.to_str().unwrap();
    for first in [0, 1] {
        let ids: Vec<String> = (0..2)
            .map(|_| {
                let out = control_request(&ctl, &["pause", "30"]).unwrap();
                assert_eq!(out.0, 0, "{out:?}");
                let id = out
                    .1
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("id="))
                    .unwrap();
                id.to_owned()
            })
            .collect();
        assert_eq!(status_map(&ctl)["pause_holds"], "2");
        ok(&["resume", "-s", c, "--id", &ids[first]]);
        assert!(paused(&ctl), "one pause left");
        assert_eq!(status_map(&ctl)["pause_holds"], "1");
        let mut r = read_pending(srv.addr(), 0);
        assert!(read_done(&mut r, Duration::from_millis(200)).is_none());
        ok(&["resume", "-s", c, "--id", &ids[1 - first]]);
        assert!(read_done(&mut r, Duration::from_secs(3)).is_some());
        assert!(!paused(&ctl));
    }
    let out = flexnbd(&["resume", "-s", c]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr_str().contains("not paused"), "{out:?}");
    let out = control_request(&ctl, &["pause", "-1"]).unwrap();
    assert_eq!(out.0, 1, "{out:?}");
    let out = flexnbd(&["pause", "-s", c, "-t", "0"]);
    assert!(!out.success(), "{out:?}");
    assert!(!paused(&ctl));
}

/// Whether process `pid` exists (and is not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// Expected: `snapshot` runs the command paused, with FLEXNBD_FILE and
/// FLEXNBD_SIZE set, and resumes whatever it does: exits 0 (status 0), fails
/// (its status), is killed (128+9), hangs past --timeout (killed with its
/// whole process group, status 124, clear error).
#[test]
fn snapshot_resumes_whatever_the_command_does() {
    let dir = tempdir();
    let (img, srv) = serve(dir.path());
    let ctl = dir.path().join("ctl");
    let c = ctl.to_str().unwrap();
    let copy = dir.path().join("copy");
    let script = format!(
        "test \"$FLEXNBD_SIZE\" = {SIZE} && cp \"$FLEXNBD_FILE\" {} && {} status -s {c}",
        copy.display(),
        bin().display()
    );
    let out = flexnbd(&["snapshot", "-s", c, "--", "sh", "-c", &script]);
    assert!(out.success(), "{out:?}");
    assert!(
        out.stdout_str().contains("paused=true"),
        "ran while paused: {out:?}"
    );
    assert_eq!(md5_file(&copy), md5_file(&img));
    assert!(!paused(&ctl));

    let out = flexnbd(&["snapshot", "-s", c, "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(!paused(&ctl));

    let out = flexnbd(&["snapshot", "-s", c, "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    assert!(!paused(&ctl));

    let pidfile = dir.path().join("pid");
    let hang = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
    let t = Instant::now();
    let out = flexnbd(&["snapshot", "-s", c, "-t", "1", "--", "sh", "-c", &hang]);
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(
        out.stderr_str().contains("did not finish within 1.000 s"),
        "{out:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    let child: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || !alive(child)),
        "the group was not killed"
    );
    assert!(!paused(&ctl));

    let out = flexnbd(&["snapshot", "-s", c, "--", "/nonexistent/command"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr_str().contains("cannot run"), "{out:?}");
    assert!(!paused(&ctl));
    let mut r = Raw::simple(srv.addr());
    assert_bytes_eq(
        &r.read(1, 0, 4096),
        &read_file_at(&img, 0, 4096),
        "still serving",
    );
}

/// Expected: a snapshot process stopped by SIGTERM, SIGINT or SIGHUP kills
/// its command and resumes (status 128 + the signal); one killed by SIGKILL
/// leaves its command running, but its control connection closes and the
/// server resumes by itself.
#[test]
fn snapshot_interrupted_by_sigterm_or_sigkill_resumes() {
    let dir = tempdir();
    let (_img, srv) = serve(dir.path());
    let ctl = dir.path().join("ctl");
    for sig in [SIGTERM, SIGINT, SIGHUP, SIGKILL] {
        let pidfile = dir.path().join(format!("pid{sig}"));
        let cmd = format!("echo $$ > {}; exec sleep 60", pidfile.display());
        let mut snap = Background::spawn(Command::new(bin()).args([
            "snapshot",
            "-s",
            ctl.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &cmd,
        ]));
        assert!(wait_until(Duration::from_secs(10), || pidfile.exists()
            && std::fs::metadata(&pidfile).is_ok_and(|m| m.len() > 0)));
        let child: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(paused(&ctl));
        let mut r = read_pending(srv.addr(), 0);
        assert!(send_signal(snap.pid(), sig));
        let st = snap.wait(Duration::from_secs(10)).expect("snapshot ended");
        if sig != SIGKILL {
            assert_eq!(st.code(), Some(128 + sig), "{}", snap.stderr());
            assert!(
                wait_until(Duration::from_secs(5), || !alive(child)),
                "command not killed"
            );
        } else {
            send_signal(child, SIGKILL);
        }
        assert!(
            read_done(&mut r, Duration::from_secs(5)).is_some(),
            "sig {sig}: read answered"
        );
        wait_resumed(&ctl, &format!("snapshot killed by {sig}"));
    }
}

/// Expected: pausing three servers of which the third cannot be paused (a
/// `listen`ing server before its image arrived): the command never runs,
/// the error names the third, the first two are resumed.
#[test]
fn several_servers_are_paused_all_or_none() {
    let dirs: Vec<_> = (0..2).map(|_| tempdir()).collect();
    let srvs: Vec<_> = dirs.iter().map(|d| serve(d.path())).collect();
    let dst = common::migration::listener(MIB, &[]);
    let socks: Vec<PathBuf> = dirs.iter().map(|d| d.path().join("ctl")).collect();
    let third = dst.srv.ctl().to_path_buf();
    let ran = dirs[0].path().join("ran");
    let mut args = vec!["snapshot".to_string()];
    for s in socks.iter().chain([&third]) {
        args.push("-s".into());
        args.push(s.display().to_string());
    }
    args.extend(["--".into(), "touch".into(), ran.display().to_string()]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = flexnbd(&a);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = out.stderr_str();
    assert!(
        err.contains(&format!("cannot pause {}", third.display())),
        "{err}"
    );
    assert!(err.contains("has not received its image"), "{err}");
    assert!(!ran.exists(), "the command ran");
    for s in &socks {
        assert!(!paused(s), "{} left paused", s.display());
    }
    // All three when all can: the command sees every image.
    let script = "test -n \"$FLEXNBD_FILE_1\" && test -n \"$FLEXNBD_FILE_2\"";
    let out = flexnbd(&[
        "snapshot",
        "-s",
        socks[0].to_str().unwrap(),
        "-s",
        socks[1].to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert!(out.success(), "{out:?}");
    drop(srvs);
}

/// Expected: the nbdkit-compatible socket, driven by `nc -U`: `p` is
/// answered `P` once paused, an unknown character `X`, `r` `R`; the pause
/// outlives the connection that took it.
#[test]
fn the_pause_control_socket_speaks_the_nbdkit_protocol() {
    let nc = require_tool("nc");
    let dir = tempdir();
    let (_img, srv) = serve(dir.path());
    let ctl = dir.path().join("ctl");
    let pc = dir.path().join("pc");
    let send = |input: &str| {
        let out = run_with_stdin(
            Command::new(&nc).args(["-U", "-N"]).arg(&pc),
            Some(input.as_bytes().to_vec()),
            TOOL_TIMEOUT,
        );
        assert!(out.success(), "{out:?}");
        out.stdout_str()
    };
    assert_eq!(send("p\n"), "P");
    assert!(paused(&ctl), "the pause outlives its connection");
    let mut r = read_pending(srv.addr(), 0);
    assert!(read_done(&mut r, Duration::from_millis(300)).is_none());
    assert_eq!(send("pz\n"), "PX");
    assert_eq!(status_map(&ctl)["pause_holds"], "1");
    assert_eq!(send("r\n"), "R");
    assert!(read_done(&mut r, Duration::from_secs(3)).is_some());
    assert!(!paused(&ctl));
}

/// Expected: a pause during a migration: the mirror keeps copying, but the
/// hand-over waits (the destination does not take control while paused);
/// after `resume` the migration completes and the images are equal.
#[test]
fn a_hand_over_waits_for_the_resume() {
    let mut src = common::migration::source(32 * MIB, 0x51);
    let dst = common::migration::listener(32 * MIB, &[]);
    let sctl = src.srv.ctl().to_path_buf();
    ok(&["pause", "-s", sctl.to_str().unwrap(), "-t", "60"]);
    mirror_cmd(&sctl, dst.srv.addr(), &[]).expect_success("mirror while paused");
    assert!(
        wait_until(Duration::from_secs(30), || try_status(&sctl).is_some_and(
            |s| s.get("migration_state").is_some_and(|v| v == "active")
        )),
        "the copy did not reach the hand-over: {:?}",
        try_status(&sctl)
    );
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(1) {
        let st = status_map(dst.srv.ctl());
        assert_eq!(st["has_control"], "false", "handed over while paused");
    }
    assert!(paused(&sctl));
    ok(&["resume", "-s", sctl.to_str().unwrap()]);
    assert_eq!(
        src.srv
            .wait_exit(Duration::from_secs(60))
            .and_then(|s| s.code()),
        Some(0),
        "{}",
        src.srv.stderr()
    );
    dst.assert_took_control();
    assert_bytes_eq(
        &read_file(&dst.file),
        &read_file(&src.file),
        "migrated image",
    );
}

/// Expected: `break` while a hand-over waits for the resume ends the
/// migration: the destination never takes control, the source keeps
/// serving (still paused until `resume`, then answering reads).
#[test]
fn break_ends_a_migration_waiting_for_the_resume() {
    let src = common::migration::source(8 * MIB, 0x52);
    let mut dst = common::migration::listener(8 * MIB, &[]);
    let sctl = src.srv.ctl().to_path_buf();
    let c = sctl.to_str().unwrap();
    ok(&["pause", "-s", c, "-t", "60"]);
    mirror_cmd(&sctl, dst.srv.addr(), &[]).expect_success("mirror while paused");
    assert!(
        wait_until(Duration::from_secs(30), || try_status(&sctl).is_some_and(
            |s| s.get("migration_state").is_some_and(|v| v == "active")
        )),
        "{:?}",
        try_status(&sctl)
    );
    ok(&["break", "-s", c]);
    assert!(
        wait_until(Duration::from_secs(10), || status_map(&sctl)
            ["is_mirroring"]
            == "false"),
        "{:?}",
        status_map(&sctl)
    );
    assert!(paused(&sctl), "break does not end the pause");
    let mut r = read_pending(src.srv.addr(), 0);
    assert!(read_done(&mut r, Duration::from_millis(300)).is_none());
    ok(&["resume", "-s", c]);
    let data = read_done(&mut r, Duration::from_secs(5)).expect("read after resume");
    assert_bytes_eq(
        &data,
        &read_file_at(&src.file, 0, 4096),
        "source still serves",
    );
    dst.assert_waiting();
}
