//! Bounded resources under hostile clients: one deadline for the whole
//! handshake, a cap on connections (with the control socket still
//! answering), a real send deadline for clients that stop reading, extra
//! workers that go away when idle, control requests that must be complete
//! within a second, and `read`/`write` that give up on a silent server.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn image(dir: &Path, size: u64) -> std::path::PathBuf {
    let img = dir.join("img");
    create_random_file(&img, size, 0x11);
    img
}

/// The number of threads of process `pid` (from /proc).
fn threads(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads: in /proc/PID/status")
}

/// Reads until the peer closes (or `limit` passes); the bytes and whether it closed.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(_) => {}
        }
    }
    (got, false)
}

/// Expected: with `--handshake-timeout 1`, a client that sends one byte of
/// its client flags every 300 ms (each read of the server's succeeds) is
/// dropped about a second after connecting, and the log says the handshake
/// timed out (not an OS error text).
#[test]
fn the_whole_handshake_has_one_deadline() {
    let dir = tempdir();
    let img = image(dir.path(), MIB);
    let srv = Daemon::serve(&img, &dir.path().join("ctl"))
        .args(&["--handshake-timeout", "1"])
        .start();
    let t0 = Instant::now();
    let mut c = TcpStream::connect(srv.addr()).unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    // Client flags, then an option header, a byte at a time.
    let mut trickle = vec![0, 0, 0, 3];
    trickle.extend_from_slice(&option(7, &go_data(&[])));
    let mut closed = None;
    for b in trickle {
        std::thread::sleep(Duration::from_millis(300));
        if c.write_all(&[b]).is_err() {
            closed = Some(t0.elapsed());
            break;
        }
        let mut probe = [0u8; 64];
        c.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        if let Ok(0) = c.read(&mut probe) {
            closed = Some(t0.elapsed());
            break;
        }
    }
    let closed = closed.expect("a trickling client was never dropped");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(4),
        "dropped after {closed:?}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || srv
            .log_count("handshake timed out")
            >= 1),
        "log:\n{}",
        srv.stderr()
    );
    assert_eq!(
        srv.log_count("Resource temporarily unavailable"),
        0,
        "{}",
        srv.stderr()
    );
}

/// Expected: with `--max-clients 8`, eight held connections fill the
/// server; a ninth is closed at once with nothing sent, again and again,
/// with at most one log line about it; the control socket still answers;
/// once one of the eight leaves, a normal client is served. The soft limit
/// on open files has been raised to the hard one.
#[test]
fn connections_beyond_max_clients_are_closed_at_accept() {
    let dir = tempdir();
    let img = image(dir.path(), MIB);
    let ctl = dir.path().join("ctl");
    let srv = Daemon::serve(&img, &ctl)
        .args(&["--max-clients", "8", "--handshake-timeout", "60"])
        .start();
    let mut held: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(srv.addr()).unwrap();
            let mut g = [0u8; 18];
            s.read_exact(&mut g).unwrap();
            s
        })
        .collect();
    assert!(wait_until(Duration::from_secs(5), || {
        try_status(&ctl).is_some_and(|s| s["num_clients"] == "8")
    }));
    for i in 0..20 {
        let mut s = TcpStream::connect(srv.addr()).unwrap();
        let (got, closed) = read_until_closed(&mut s, Duration::from_secs(5));
        assert!(
            closed && got.is_empty(),
            "connection {i} over the limit got {got:?}"
        );
    }
    let st = status_map(&ctl);
    assert_eq!(st["num_clients"], "8", "{st:?}");
    let refusals = srv.log_count("the limit, --max-clients");
    assert!(
        (1..=2).contains(&refusals),
        "{refusals} log lines:\n{}",
        srv.stderr()
    );
    drop(held.pop());
    assert!(wait_until(Duration::from_secs(5), || {
        try_status(&ctl).is_some_and(|s| s["num_clients"] == "7")
    }));
    let mut c = Raw::simple(srv.addr());
    assert_bytes_eq(
        &c.read(1, 0, 4096),
        &read_file_at(&img, 0, 4096),
        "a client after one left",
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", srv.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let v: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(v[3], v[4], "soft limit raised to the hard one: {line}");
}

/// Expected: with `FLEXNBD_SEND_TIMEOUT_SECS=2`, a client that asks for
/// 64 MiB and then reads nothing, and one that reads 4 KiB every 200 ms, are
/// both dropped within a few seconds (a reply must go out within the limit,
/// however slowly the client keeps reading); other clients are served.
#[test]
fn clients_that_stop_reading_are_dropped() {
    let dir = tempdir();
    let img = image(dir.path(), 64 * MIB);
    let ctl = dir.path().join("ctl");
    let srv = Daemon::serve(&img, &ctl)
        .env("FLEXNBD_SEND_TIMEOUT_SECS", "2")
        .start();
    for trickle in [false, true] {
        let t0 = Instant::now();
        let mut c = Raw::simple(srv.addr());
        c.req(CMD_READ, 0, 1, 0, 64 * MIB as u32);
        let mut s = c.s.try_clone().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut closed = false;
        while t0.elapsed() < Duration::from_secs(20) {
            if trickle {
                // Kernel buffers hold megabytes, so the reader would see the
                // end only long after the server gave up; ask the server.
                let _ = s.read(&mut buf);
            }
            std::thread::sleep(Duration::from_millis(if trickle { 200 } else { 100 }));
            closed = try_status(&ctl).is_some_and(|st| st["num_clients"] == "0");
            if closed {
                break;
            }
        }
        let took = t0.elapsed();
        assert!(
            closed,
            "trickle={trickle}: the client was not dropped in {took:?}"
        );
        assert!(
            took < Duration::from_secs(10),
            "trickle={trickle}: dropped after {took:?}"
        );
    }
    assert!(srv.log_count("timed out") >= 1, "{}", srv.stderr());
    let mut c = Raw::simple(srv.addr());
    assert_bytes_eq(
        &c.read(2, 4096, 4096),
        &read_file_at(&img, 4096, 4096),
        "still serving",
    );
}

/// Expected: 20 connections that each send 8 pipelined FLUSHes (slow
/// requests: the connection takes extra workers) and then go idle are back
/// to one thread each within a few seconds.
#[test]
fn extra_workers_go_away_when_idle() {
    let dir = tempdir();
    let img = image(dir.path(), MIB);
    let srv = Daemon::serve(&img, &dir.path().join("ctl")).start();
    let pid = srv.pid();
    let base = threads(pid);
    let mut conns = Vec::new();
    for i in 0..20u64 {
        let mut c = Raw::simple(srv.addr());
        // Something to flush, then the flushes.
        assert_eq!(c.write(i * 100, i * 4096, &[1u8; 4096]), 0);
        for k in 0..8 {
            c.req(CMD_FLUSH, 0, i * 100 + 1 + k, 0, 0);
        }
        // Replies may come in any order: the flushes run on several workers.
        let mut cookies: Vec<u64> = (0..8)
            .map(|_| match c.reply() {
                Reply::Simple { error, cookie } => {
                    assert_eq!(error, 0, "flush");
                    cookie
                }
                r => panic!("expected a simple reply, got {r:?}"),
            })
            .collect();
        cookies.sort_unstable();
        assert_eq!(cookies, (1..=8).map(|k| i * 100 + k).collect::<Vec<_>>());
        conns.push(c);
    }
    let busy = threads(pid);
    let settled = wait_until(Duration::from_secs(15), || threads(pid) <= base + 20);
    assert!(
        settled,
        "threads: {base} before, {busy} after the flushes, {} now (20 idle connections)",
        threads(pid)
    );
    // The connections still work, and their workers come back when needed.
    for (i, c) in conns.iter_mut().enumerate() {
        c.req(CMD_FLUSH, 0, 9000 + i as u64, 0, 0);
        assert_eq!(c.simple_reply(9000 + i as u64), 0);
    }
}

/// Expected: a connection that took extra workers for slow requests (its
/// FLUSHes) and then goes on reading from memory without a pause gives them
/// back about ten seconds after its last slow request: requests served from
/// memory are best served by one thread, and the extra ones are not idle.
#[test]
fn extra_workers_go_away_when_requests_are_fast_again() {
    let dir = tempdir();
    let img = image(dir.path(), MIB);
    let want = read_file_at(&img, 0, MIB as usize);
    let srv = Daemon::serve(&img, &dir.path().join("ctl")).start();
    let pid = srv.pid();
    let mut c = Raw::simple(srv.addr());
    // One request first, so the connection's thread is there.
    assert_bytes_eq(&c.read(1, 0, 4096), &want[..4096], "first read");
    let base = threads(pid);
    for k in 0..8 {
        c.req(CMD_FLUSH, 0, 10 + k, 0, 0);
    }
    for _ in 0..8 {
        match c.reply() {
            Reply::Simple { error, .. } => assert_eq!(error, 0, "flush"),
            r => panic!("expected a simple reply, got {r:?}"),
        }
    }
    let mut most = threads(pid);
    let t0 = Instant::now();
    let mut cookie = 100u64;
    let mut back_to_one = None;
    // Reads, pipelined four at a time, with no pause a worker could retire in.
    while t0.elapsed() < Duration::from_secs(25) {
        let mut sent = std::collections::HashMap::new();
        for i in 0..4u64 {
            let off = (cookie * 4096 + i * 65536) % (MIB - 4096);
            c.req(CMD_READ, 0, cookie + i, off, 4096);
            sent.insert(cookie + i, off as usize);
        }
        for _ in 0..4 {
            let got = match c.reply() {
                Reply::Simple { error: 0, cookie } => cookie,
                r => panic!("expected a simple reply without error, got {r:?}"),
            };
            let off = sent.remove(&got).expect("a cookie that was sent");
            assert_bytes_eq(&c.read_exact(4096), &want[off..off + 4096], "read");
        }
        cookie += 4;
        let n = threads(pid);
        most = most.max(n);
        if n <= base {
            back_to_one = Some(t0.elapsed());
            break;
        }
    }
    assert!(
        most > base,
        "the flushes took no extra worker ({base} threads)"
    );
    let took = back_to_one.unwrap_or_else(|| {
        panic!(
            "still {} threads after 25 s of reads (one worker: {base})",
            threads(pid)
        )
    });
    assert!(
        took >= Duration::from_secs(8),
        "extra workers left after {took:?}, before the storage was fast for long"
    );
}

/// The image `img` (open as `f`) is on a file system with a page cache that
/// `cachestat(2)` can be asked about (not tmpfs, a kernel of 6.5 or later).
fn page_cache_answers(img: &Path, f: &std::fs::File) -> bool {
    use std::os::fd::AsFd;
    let in_memory = flexnbd::storage::Storage::open(img, true)
        .map(|s| s.in_memory())
        .unwrap_or(true);
    !in_memory && flexnbd::sys::cachestat(f.as_fd(), 0, 4096).is_ok()
}

/// Expected: large reads of an image that is not in the page cache (sent
/// with sendfile, which no timing can see into) make the connection serve
/// with several workers, so the waits for the device overlap: the server
/// asks the page cache what it holds before sending.
#[test]
fn large_reads_from_the_device_take_extra_workers() {
    let dir = tempdir();
    let img = image(dir.path(), 16 * MIB);
    let want = read_file_at(&img, 0, 16 * MIB as usize);
    let f = std::fs::File::open(&img).unwrap();
    use std::os::fd::AsFd;
    if !page_cache_answers(&img, &f) {
        eprintln!("image in memory, or no cachestat(2): the page cache cannot be asked");
        return;
    }
    let srv = Daemon::serve(&img, &dir.path().join("ctl")).start();
    let pid = srv.pid();
    let mut c = Raw::simple(srv.addr());
    assert_bytes_eq(&c.read(1, 0, 4096), &want[..4096], "first read");
    let base = threads(pid);
    // Out of the page cache.
    f.sync_all().unwrap();
    // GNU dd with `iflag=nocache count=0` drops the whole file's cached pages.
    let dd = Command::new("dd")
        .arg(format!("if={}", img.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status()
        .unwrap();
    assert!(dd.success(), "dd: {dd}");
    assert_eq!(
        flexnbd::sys::cachestat(f.as_fd(), MIB, 15 * MIB)
            .unwrap()
            .cached,
        0,
        "the image is still in the page cache"
    );
    let len = 256 * 1024u32;
    let offs: Vec<u64> = (0..8u64).map(|i| MIB + i * 2 * MIB - 4096 * i).collect();
    for (i, &off) in offs.iter().enumerate() {
        c.req(CMD_READ, 0, 10 + i as u64, off, len);
    }
    let mut most = threads(pid);
    for _ in 0..offs.len() {
        let got = match c.reply() {
            Reply::Simple { error: 0, cookie } => cookie,
            r => panic!("expected a simple reply without error, got {r:?}"),
        };
        let off = offs[(got - 10) as usize] as usize;
        assert_bytes_eq(
            &c.read_exact(len as usize),
            &want[off..off + len as usize],
            "read",
        );
        most = most.max(threads(pid));
    }
    assert!(
        most > base,
        "reads that waited for the device took no extra worker ({base} threads)"
    );
}

/// Expected: a long sequential write (a copy, a migration's destination)
/// does not pile up in the page cache until a FLUSH: its writeback starts
/// every few MiB, so without any FLUSH the written data is soon on its way
/// to the device, while random writes are left to the kernel. Seen in the
/// image's own page-cache counters (`cachestat(2)`).
#[test]
fn sequential_writes_are_written_back_before_any_flush() {
    use std::os::fd::AsFd;
    let dir = tempdir();
    let img = dir.path().join("img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let f = std::fs::File::open(&img).unwrap();
    if !page_cache_answers(&img, &f) {
        eprintln!("image in memory, or no cachestat(2): nothing is written back");
        return;
    }
    let srv = Daemon::serve(&img, &dir.path().join("ctl")).start();
    let mut c = Raw::simple(srv.addr());
    let piece: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251 + 1) as u8).collect();
    // 32 MiB in order, then a few scattered blocks elsewhere.
    for i in 0..128u64 {
        assert_eq!(c.write(i, i * piece.len() as u64, &piece), 0, "write {i}");
    }
    for i in 0..8u64 {
        assert_eq!(c.write(1000 + i, 40 * MIB + i * 3 * MIB, &piece[..4096]), 0);
    }
    let unwritten = || {
        let st = flexnbd::sys::cachestat(f.as_fd(), 0, 32 * MIB).unwrap();
        st.dirty * 4096
    };
    let t0 = Instant::now();
    let mut left = unwritten();
    while left > 8 * MIB && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
        left = unwritten();
    }
    assert!(
        left <= 8 * MIB,
        "{} MiB of the sequential write still dirty {:?} later, without a FLUSH",
        left / MIB,
        t0.elapsed()
    );
    // Random writes are not pushed out early.
    let scattered = flexnbd::sys::cachestat(f.as_fd(), 40 * MIB, 24 * MIB).unwrap();
    assert!(
        scattered.dirty > 0,
        "scattered writes were written back: {scattered:?}"
    );
    // And the data is what was written.
    let back = read_file_at(&img, 0, 32 * MIB as usize);
    for (i, chunk) in back.chunks(piece.len()).enumerate() {
        assert_bytes_eq(chunk, &piece, &format!("piece {i}"));
    }
}

/// Expected: sixteen control connections that send nothing do not lock the
/// control socket: `status` is answered at once meanwhile, and each idle one
/// is told "timed out waiting for the request" after about a second.
#[test]
fn idle_control_connections_time_out_within_a_second() {
    let dir = tempdir();
    let img = image(dir.path(), MIB);
    let ctl = dir.path().join("ctl");
    let _srv = Daemon::serve(&img, &ctl).start();
    let t0 = Instant::now();
    let idle: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(&ctl).unwrap())
        .collect();
    let t = Instant::now();
    let st = status_map(&ctl);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "status took {:?}",
        t.elapsed()
    );
    assert_eq!(st["size"], MIB.to_string());
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "1: timed out waiting for the request\n");
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "idle connections held for {took:?}"
    );
}

/// A fake NBD server that sends an old-style greeting and then nothing.
fn silent_server() -> (TcpListener, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let l2 = l.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        if let Ok((mut s, _)) = l2.accept() {
            let mut g = NBDMAGIC.to_be_bytes().to_vec();
            g.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
            g.extend_from_slice(&MIB.to_be_bytes());
            g.extend_from_slice(&0x0du32.to_be_bytes());
            g.extend_from_slice(&[0u8; 124]);
            let _ = s.write_all(&g);
            let mut sink = [0u8; 65536];
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            while let Ok(n) = s.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
        }
    });
    (l, t)
}

/// Expected: `flexnbd read` and `write` against a server that greets and
/// then never replies give up after `--reply-timeout` (1 s here; 10 s by
/// default) with a clear error and exit 1.
#[test]
fn read_and_write_give_up_on_a_silent_server() {
    for (cmd, input) in [("read", None), ("write", Some(vec![7u8; 4096]))] {
        let (l, t) = silent_server();
        let port = l.local_addr().unwrap().port().to_string();
        let t0 = Instant::now();
        let out = run_with_stdin(
            Command::new(bin()).args([
                cmd,
                "--addr",
                "127.0.0.1",
                "--port",
                &port,
                "--from",
                "0",
                "--size",
                "4096",
                "--reply-timeout",
                "1",
            ]),
            input,
            Duration::from_secs(30),
        );
        let took = t0.elapsed();
        assert_eq!(out.status.code(), Some(1), "{cmd}: {out:?}");
        assert!(took < Duration::from_secs(5), "{cmd} took {took:?}");
        assert!(
            out.stderr_str().contains("no reply within 1s"),
            "{cmd}: {}",
            out.stderr_str()
        );
        drop(l);
        let _ = t.join();
    }
}

/// Expected: a client that asks for 16 MiB and vanishes without reading is
/// logged as an info line (the client left), not as a warning.
#[test]
fn a_client_that_vanishes_is_not_a_warning() {
    let dir = tempdir();
    let img = image(dir.path(), 32 * MIB);
    let ctl = dir.path().join("ctl");
    let srv = Daemon::serve(&img, &ctl).start();
    let mut c = Raw::simple(srv.addr());
    c.req(CMD_READ, 0, 1, 0, 16 * MIB as u32);
    let s = c.s.try_clone().unwrap();
    // Read a little, then reset the connection (close with data unread).
    let mut b = [0u8; 100];
    let _ = (&s).read(&mut b);
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    drop(c);
    assert!(wait_until(Duration::from_secs(10), || {
        try_status(&ctl).is_some_and(|st| st["num_clients"] == "0")
    }));
    let warnings: Vec<String> = srv
        .stderr()
        .lines()
        .filter(|l| l.starts_with("W:") || l.starts_with("E:"))
        .map(String::from)
        .collect();
    assert!(
        warnings.is_empty(),
        "warnings for a client that left: {warnings:?}"
    );
    assert!(srv.log_count("ended: Closed") >= 1, "{}", srv.stderr());
}

/// Expected: under a descriptor limit of 200 (soft and hard), the server
/// caps its clients where they fit (3 descriptors each, 64 kept for the
/// rest: 45) and says so once at start; of 80 connections, 45 are admitted
/// and the rest closed at accept; meanwhile the control socket answers and
/// a migration of the image to a `listen`ing server completes intact.
#[test]
fn control_and_migration_work_when_client_descriptors_run_out() {
    let prlimit = require_tool("prlimit");
    let dir = tempdir();
    let img = image(dir.path(), 4 * MIB);
    let ctl = dir.path().join("ctl");
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut srv = Background::spawn(
        Command::new(prlimit)
            .args(["--nofile=200:200", "--"])
            .arg(bin())
            .args(["serve", "--addr", "127.0.0.1", "--port", &port.to_string()])
            .arg("--file")
            .arg(&img)
            .arg("--sock")
            .arg(&ctl)
            .args(["--handshake-timeout", "60"]),
    );
    assert!(
        wait_until(READY_TIMEOUT, || try_status(&ctl).is_some()
            || !srv.is_running()),
        "server did not start"
    );
    assert!(srv.is_running(), "server exited: {}", srv.stderr());
    assert!(
        srv.stderr()
            .contains("only 45 clients fit in the limit of 200 open files"),
        "{}",
        srv.stderr()
    );
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..80 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut g = [0u8; 18];
        match s.read_exact(&mut g) {
            Ok(()) => held.push(s),
            Err(_) => refused += 1,
        }
    }
    assert_eq!((held.len(), refused), (45, 35), "admitted, refused");
    let st = status_map(&ctl);
    assert_eq!(st["num_clients"], "45", "{st:?}");

    let dst = common::migration::listener(4 * MIB, &[]);
    mirror_cmd(&ctl, dst.srv.addr(), &[]).expect_success("mirror with every client slot taken");
    assert_eq!(
        srv.wait(Duration::from_secs(60)).and_then(|s| s.code()),
        Some(0),
        "source after the hand-over: {}",
        srv.stderr()
    );
    dst.assert_took_control();
    assert_bytes_eq(&read_file(&dst.file), &read_file(&img), "migrated image");
    drop(held);
}
