//! Live migration end to end with real processes: `flexnbd serve` (source) →
//! `flexnbd mirror` → `flexnbd listen` (destination). A 1 GiB image, a
//! migration under a random-write load, an 8 GiB sparse image, odd sizes,
//! rebinding, `--unlink`, status/speed/break while migrating, ACL changes made
//! while listening, and a listener stopped before any migration.
//!
//! Every test states its expected outcome and checks it on real data
//! (checksums, bytes read back over NBD, exit codes, status values, files).

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Tests that move gigabytes or measure time run one at a time (2 CPUs).
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

/// A source and a destination image of `size` bytes and the two daemons.
struct Pair {
    _dir: tempfile::TempDir,
    src_file: PathBuf,
    dst_file: PathBuf,
    src: Server,
    dst: Server,
}

impl Pair {
    fn marker(&self) -> PathBuf {
        marker_of(&self.dst_file)
    }
}

/// Creates the images (source: random; destination: sparse, same size) in
/// `dir` and starts `serve` on the source and `listen` (with `listen_args`)
/// on the destination.
fn pair_in(dir: tempfile::TempDir, size: u64, seed: u64, listen_args: &[&str]) -> Pair {
    let src_file = dir.path().join("src.img");
    let dst_file = dir.path().join("dst.img");
    create_random_file(&src_file, size, seed);
    create_sparse_file(&dst_file, size);
    let src = Daemon::serve(&src_file, &dir.path().join("src.sock")).start();
    let dst = Daemon::listen(&dst_file, &dir.path().join("dst.sock"))
        .args(listen_args)
        .start();
    Pair {
        _dir: dir,
        src_file,
        dst_file,
        src,
        dst,
    }
}

/// Waits for the hand-over: the source exits 0 (fails the test otherwise) and
/// the destination reports has_control=true. Returns how long it took.
#[track_caller]
fn wait_handed_over(src: &mut Server, dst: &Server, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    let st = src.wait_exit(timeout).unwrap_or_else(|| {
        panic!(
            "source did not hand over within {timeout:?}; source status {:?}; stderr:\n{}",
            try_status(src.ctl()),
            src.stderr()
        )
    });
    assert_eq!(
        st.code(),
        Some(0),
        "source exit status after the hand-over; stderr:\n{}",
        src.stderr()
    );
    let ctl = wait_until(Duration::from_secs(10), || {
        try_status(dst.ctl())
            .is_some_and(|s| s.get("has_control").map(String::as_str) == Some("true"))
    });
    assert!(
        ctl,
        "destination never reported has_control=true: {:?}; stderr:\n{}",
        try_status(dst.ctl()),
        dst.stderr()
    );
    t0.elapsed()
}

/// Checks the destination's state before any migration: no control, no
/// clients allowed, marker present, not mirroring.
#[track_caller]
fn assert_waiting(p: &Pair) {
    let st = status_map(p.dst.ctl());
    assert_eq!(st["has_control"], "false", "{st:?}");
    assert_eq!(st["clients_allowed"], "false", "{st:?}");
    assert_eq!(st["is_mirroring"], "false", "{st:?}");
    assert!(p.marker().exists(), "listen must create FILE.INCOMPLETE");
}

/// Checks the destination after the hand-over: control, clients allowed,
/// marker gone, control socket of the source gone.
#[track_caller]
fn assert_took_over(p: &Pair) {
    let st = status_map(p.dst.ctl());
    assert_eq!(st["has_control"], "true", "{st:?}");
    assert_eq!(st["clients_allowed"], "true", "{st:?}");
    assert!(!p.marker().exists(), "FILE.INCOMPLETE must be removed");
    assert!(
        !p.src.ctl().exists(),
        "the source's control socket must be removed at exit"
    );
}

/// Reads `len` bytes at `off` from an NBD server with the hand-written client.
fn nbd_read(addr: SocketAddr, off: u64, len: u32) -> Vec<u8> {
    let mut c = Raw::simple(addr);
    let d = c.read(1, off, len);
    c.req(CMD_DISC, 0, 2, 0, 0);
    d
}

// ---------------------------------------------------------------- 1 GiB

/// Expected: a 1 GiB random image migrates completely: `mirror --wait` prints
/// "Migration started" and exits 0, the source exits 0, the destination has
/// control with the marker removed, its file has the source's MD5, and an NBD
/// client reading the destination gets the source's bytes.
#[test]
fn one_gib_random_image_migrates() {
    let _h = heavy();
    let dir = big_tempdir(3 * GIB);
    let mut p = pair_in(dir, GIB, 0x1_61b, &[]);
    assert_waiting(&p);
    let src_md5 = md5_file(&p.src_file);

    let t = Instant::now();
    let out = run(
        Command::new(bin()).args([
            "mirror",
            "--addr",
            "127.0.0.1",
            "--port",
            &p.dst.port.unwrap().to_string(),
            "--sock",
            &p.src.ctl().display().to_string(),
            "--wait",
        ]),
        Duration::from_secs(180),
    );
    out.expect_success("mirror --wait");
    assert!(
        out.stdout_str().contains("Migration started"),
        "stdout: {}",
        out.stdout_str()
    );
    let took = wait_handed_over(&mut p.src, &p.dst, Duration::from_secs(60));
    eprintln!(
        "1 GiB: mirror --wait returned after {:?}, hand-over complete {:?} later",
        t.elapsed() - took,
        took
    );
    assert_took_over(&p);
    assert_eq!(md5_file(&p.dst_file), src_md5, "destination MD5");
    // Served by the new owner.
    for off in [0, 123 * MIB + 17, GIB - MIB] {
        let got = nbd_read(p.dst.addr(), off, MIB as u32);
        assert_bytes_eq(&got, &read_file_at(&p.src_file, off, MIB as usize), "read");
    }
}

// ---------------------------------------------------------------- under load

/// Expected: with a writer hammering the source (random 4 KiB writes, 8 in
/// flight, as fast as it can; see [`LOAD_WRITER`]) from before the mirror
/// starts until the source drops it at the hand-over, the migration converges
/// (hand-over within 120 s, in one attempt); the destination's file equals
/// the source's final file; every acknowledged write is in the destination;
/// no write failed before the hand-over began (the last status taken before
/// the first failure still showed clients admitted), no write got an error
/// reply (the only failures are the writes in flight when the connection was
/// dropped at the hand-over), and no write succeeded after the first failure.
#[test]
fn migration_under_random_write_load() {
    let _h = heavy();
    let size = GIB;
    let dir = big_tempdir(3 * size);
    let mut p = pair_in(dir, size, 0x10ad, &[]);
    let mut writer = LoadWriter::start(&p.src.uri(), 8, 7);
    let t_mirror = now_epoch();
    let t0 = Instant::now();
    let out = mirror_cmd(p.src.ctl(), p.dst.addr(), &[]);
    out.expect_success("mirror");
    assert_eq!(out.stdout_str().trim(), "Migration started");
    let poller = StatusPoller::start(p.src.ctl());

    // Converges: the source hands over within 120 s despite the load.
    let st = p.src.wait_exit(Duration::from_secs(120));
    let took = t0.elapsed();
    assert!(
        st.is_some(),
        "no hand-over within 120 s under load; source status {:?}; log:\n{}",
        try_status(p.src.ctl()),
        p.src.stderr()
    );
    assert_eq!(
        st.unwrap().code(),
        Some(0),
        "source exit; log:\n{}",
        p.src.stderr()
    );
    let polled = poller.finish();
    wait_handed_over(&mut p.src, &p.dst, Duration::from_secs(10));
    assert_took_over(&p);
    assert!(polled.mirroring, "status never showed is_mirroring=true");
    assert_eq!(polled.attempts, 1, "one attempt should have been enough");
    assert_eq!(polled.idle, None, "is_mirroring=false while migrating");

    // The writer ends when the source drops it.
    let r = writer.finish(Duration::from_secs(30));
    let during = load_acked_after(&r, t_mirror);
    eprintln!(
        "under load: hand-over after {took:?}; writer: {} acknowledged ({during} during the \
         migration), {} failed {}, {} issued",
        r["n_ok"], r["n_fail"], r["fails"], r["issued"]
    );
    assert!(
        during >= 1000,
        "the load must run during the migration ({during} writes acknowledged after it started)"
    );

    // Data: destination == source's final file; every acknowledged write is there.
    assert_eq!(
        md5_file(&p.dst_file),
        md5_file(&p.src_file),
        "destination vs final source"
    );
    let dst = std::fs::File::open(&p.dst_file).unwrap();
    let checked = check_acknowledged_writes(&r, |b| {
        let mut buf = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&dst, &mut buf, b * 4096).unwrap();
        buf
    });
    assert!(checked > 1000, "{checked} blocks checked");
    // Last, so that a failure here does not hide a data problem.
    check_load_failures(&r, polled.last_allowed);
}

// ---------------------------------------------------------------- sparse

/// Calls lseek(SEEK_DATA/SEEK_HOLE); `None` past the last data (ENXIO).
#[allow(unsafe_code)]
fn seek(f: &std::fs::File, off: u64, whence: i32) -> Option<u64> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: lseek(2) on a file descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}

/// Data ranges of a file (SEEK_DATA/SEEK_HOLE).
fn data_ranges(path: &Path) -> Vec<(u64, u64)> {
    let f = std::fs::File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut v = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(start) = seek(&f, pos, libc::SEEK_DATA) else {
            break;
        };
        let end = seek(&f, start, libc::SEEK_HOLE).unwrap_or(size);
        v.push((start, end));
        pos = end;
    }
    v
}

/// Whether two (sparse) files are byte-identical: equal sizes, and equal
/// bytes over the union of both files' data ranges (outside it both read as
/// zeroes). Returns the first difference.
fn sparse_compare(a: &Path, b: &Path) -> Result<(), String> {
    let (sa, sb) = (
        std::fs::metadata(a).unwrap().len(),
        std::fs::metadata(b).unwrap().len(),
    );
    if sa != sb {
        return Err(format!("sizes {sa} and {sb}"));
    }
    let mut ranges = data_ranges(a);
    ranges.extend(data_ranges(b));
    ranges.sort();
    let fa = std::fs::File::open(a).unwrap();
    let fb = std::fs::File::open(b).unwrap();
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut done = 0u64; // everything below this was compared
    for (s, e) in ranges {
        let mut pos = s.max(done);
        while pos < e {
            let n = ((e - pos) as usize).min(ba.len());
            std::os::unix::fs::FileExt::read_exact_at(&fa, &mut ba[..n], pos).unwrap();
            std::os::unix::fs::FileExt::read_exact_at(&fb, &mut bb[..n], pos).unwrap();
            if ba[..n] != bb[..n] {
                let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
                return Err(format!("differ at byte {}", pos + i as u64));
            }
            pos += n as u64;
        }
        done = done.max(e);
    }
    Ok(())
}

/// Expected: an 8 GiB image holding 64 MiB of data (1 MiB chunks at random
/// offsets) migrates in about the time 64 MiB takes (< 10 s from `mirror` to
/// the hand-over), the destination stays sparse (< 80 MiB allocated) and its
/// contents equal the source's. Files on /tmp (ext4: real extents, as in
/// production; `st_blocks` is also meaningful on tmpfs).
#[test]
fn sparse_8gib_image_migrates_fast_and_stays_sparse() {
    let _h = heavy();
    let dir = tempfile::Builder::new()
        .prefix("flexnbd-test-")
        .tempdir_in("/tmp")
        .unwrap();
    let size = 8 * GIB;
    let src_file = dir.path().join("src.img");
    let dst_file = dir.path().join("dst.img");
    create_sparse_file(&src_file, size);
    let mut rng = Rng::new(0x5a45);
    let mut chunks = std::collections::BTreeSet::new();
    while chunks.len() < 64 {
        chunks.insert(rng.below(size / MIB));
    }
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&src_file)
            .unwrap();
        for &c in &chunks {
            std::os::unix::fs::FileExt::write_all_at(&f, &rng.bytes(MIB as usize), c * MIB)
                .unwrap();
        }
        f.sync_all().unwrap();
    }
    create_sparse_file(&dst_file, size);
    let src_alloc = allocated_bytes(&src_file);
    assert!(
        src_alloc <= 70 * MIB,
        "test setup: source has {src_alloc} allocated"
    );
    let mut src = Daemon::serve(&src_file, &dir.path().join("src.sock")).start();
    let dst = Daemon::listen(&dst_file, &dir.path().join("dst.sock")).start();

    let t = Instant::now();
    mirror_cmd(src.ctl(), dst.addr(), &[]).expect_success("mirror");
    wait_handed_over(&mut src, &dst, Duration::from_secs(60));
    let took = t.elapsed();
    let dst_alloc = allocated_bytes(&dst_file);
    eprintln!(
        "sparse 8 GiB/64 MiB: hand-over after {took:?}; allocated: source {} MiB, \
         destination {} MiB",
        src_alloc / MIB,
        dst_alloc / MIB
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        dst_alloc < 80 * MIB,
        "destination has {dst_alloc} bytes allocated (source {src_alloc})"
    );
    assert!(!marker_of(&dst_file).exists());
    sparse_compare(&src_file, &dst_file).expect("destination equals source");
    // And the chunks read back over NBD from the new owner.
    for &c in chunks.iter().take(4) {
        assert_bytes_eq(
            &nbd_read(dst.addr(), c * MIB, MIB as u32),
            &read_file_at(&src_file, c * MIB, MIB as usize),
            "chunk",
        );
    }
}

// ---------------------------------------------------------------- sizes

/// Expected: images of 0, 1, 511, 4095, 4097 and 1 MiB + 123 bytes migrate
/// exactly (the C version could not migrate sizes that are not multiples of
/// 4096): `mirror` succeeds, the source exits 0, the destination has control
/// and its file is byte-identical; the destination serves that size. A
/// 0-byte image is accepted by both servers and hands over like any other.
#[test]
fn odd_sizes_migrate_exactly() {
    for (i, size) in [0, 1, 511, 4095, 4097, MIB + 123].into_iter().enumerate() {
        let mut p = pair_in(tempdir(), size, 100 + i as u64, &[]);
        assert_waiting(&p);
        assert_eq!(status_u64(&status_map(p.dst.ctl()), "size"), size);
        let out = mirror_cmd(p.src.ctl(), p.dst.addr(), &[]);
        out.expect_success(&format!("mirror of {size} bytes"));
        wait_handed_over(&mut p.src, &p.dst, Duration::from_secs(30));
        assert_took_over(&p);
        let (s, d) = (read_file(&p.src_file), read_file(&p.dst_file));
        assert_eq!(d.len() as u64, size, "destination size");
        assert_bytes_eq(&d, &s, &format!("{size}-byte image"));
        let info = nbdinfo_json(&format!("nbd://127.0.0.1:{}/", p.dst.port.unwrap()));
        assert_eq!(
            info["exports"][0]["export-size"].as_u64(),
            Some(size),
            "size served after the hand-over"
        );
        if size > 0 {
            let n = size.min(MIB) as u32;
            let off = size - n as u64;
            assert_bytes_eq(
                &nbd_read(p.dst.addr(), off, n),
                &s[off as usize..],
                "tail read over NBD",
            );
        }
    }
}

// ---------------------------------------------------------------- rebind

/// Expected: `listen --rebind-addr 127.0.0.2` serves the migrated image on
/// 127.0.0.2 (same port) after the hand-over and no longer accepts on
/// 127.0.0.1; the source exited 0 and the marker is gone. nbdinfo and a raw
/// client read the migrated data there.
#[test]
fn rebind_to_another_address_after_handover() {
    let size = 4 * MIB + 4096;
    let mut p = pair_in(tempdir(), size, 0x4eb1, &["--rebind-addr", "127.0.0.2"]);
    let port = p.dst.port.unwrap();
    let old = p.dst.addr();
    let new: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    assert!(!accepts(new), "nothing listens on the rebind address yet");
    mirror_cmd(p.src.ctl(), old, &[]).expect_success("mirror");
    wait_handed_over(&mut p.src, &p.dst, Duration::from_secs(30));
    assert_took_over(&p);
    assert!(
        wait_until(Duration::from_secs(10), || accepts(new)),
        "destination never listened on {new}; log:\n{}",
        p.dst.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(10), || !accepts(old)),
        "destination still accepts on {old} after rebinding"
    );
    let info = nbdinfo_json(&format!("nbd://127.0.0.2:{port}/"));
    assert_eq!(info["exports"][0]["export-size"].as_u64(), Some(size));
    assert_bytes_eq(
        &nbd_read(new, 0, size as u32),
        &read_file(&p.src_file),
        "data at the rebind address",
    );
    assert_eq!(read_file(&p.dst_file), read_file(&p.src_file));
}

/// Expected: a VM's view of a migration. qemu's NBD driver with
/// `reconnect-delay` (here in qemu-io, writing 4 KiB blocks with a pattern
/// per write, one after another) is connected to the source when the
/// migration starts; the destination rebinds to the source's address and
/// port after the hand-over. Every write succeeds: the write in flight at the
/// hand-over is not answered with an error but the connection is dropped, and
/// qemu reconnects (to the destination) and resends it. Writes keep
/// succeeding after the source has exited. The destination's image is the
/// source's original with every write applied in order.
#[test]
fn qemu_reconnecting_client_sees_no_error_across_the_handover() {
    let _h = heavy();
    let qemu_io = require_tool("qemu-io");
    let size = 16 * MIB;
    let blocks = size / 4096;
    let dir = tempdir();
    let src_file = dir.path().join("src.img");
    let dst_file = dir.path().join("dst.img");
    create_random_file(&src_file, size, 0x9e);
    create_sparse_file(&dst_file, size);
    let original = read_file(&src_file);
    let port = free_port();
    let mut src = Daemon::serve(&src_file, &dir.path().join("src.sock"))
        .port(port)
        .start();
    let dst = Daemon::listen(&dst_file, &dir.path().join("dst.sock"))
        .args(&[
            "--rebind-addr",
            "127.0.0.1",
            "--rebind-port",
            &port.to_string(),
        ])
        .start();
    let out_path = dir.path().join("qemu-io.out");
    let mut qemu = Command::new(qemu_io)
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},reconnect-delay=60"
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let mut stdin = qemu.stdin.take().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || {
            try_status(src.ctl()).is_some_and(|s| s["num_clients"] == "1")
        }),
        "qemu-io never connected to the source"
    );

    // Writes go on until the source has exited, then 200 more.
    let handed_over = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = handed_over.clone();
    let writer = std::thread::spawn(move || {
        use std::io::Write as _;
        let mut rng = Rng::new(0x9f);
        let mut log: Vec<(u64, u8)> = Vec::new();
        let mut after = 0;
        while after < 200 {
            if flag.load(std::sync::atomic::Ordering::SeqCst) {
                after += 1;
            }
            let block = rng.below(blocks);
            let pat = 1 + (log.len() % 255) as u8;
            let cmd = format!("write -P {pat} {} 4096\n", block * 4096);
            if stdin.write_all(cmd.as_bytes()).is_err() {
                break;
            }
            log.push((block, pat));
        }
        let _ = stdin.write_all(b"quit\n");
        log
    });

    mirror_cmd(src.ctl(), dst.addr(), &[]).expect_success("mirror");
    wait_handed_over(&mut src, &dst, Duration::from_secs(60));
    handed_over.store(true, std::sync::atomic::Ordering::SeqCst);
    let log = writer.join().unwrap();
    let st = wait_child(&mut qemu, Duration::from_secs(120));
    let out = std::fs::read_to_string(&out_path).unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(qemu.stderr.as_mut().unwrap(), &mut err);
    assert!(
        st.is_some_and(|s| s.success()),
        "qemu-io: {st:?}; stderr: {err}; last output: {}",
        &out[out.len().saturating_sub(2000)..]
    );
    let failed: Vec<&str> = out
        .lines()
        .filter(|l| l.to_lowercase().contains("fail") || l.to_lowercase().contains("error"))
        .collect();
    assert!(
        failed.is_empty(),
        "qemu saw errors: {failed:?}; stderr: {err}"
    );
    let wrote = out.matches("wrote 4096/4096 bytes").count();
    assert_eq!(wrote, log.len(), "every write acknowledged; stderr: {err}");
    eprintln!("qemu-io: {wrote} writes, all acknowledged, across the hand-over");

    let mut expected = original;
    for (block, pat) in &log {
        expected[(*block * 4096) as usize..][..4096].fill(*pat);
    }
    assert_bytes_eq(
        &read_file(&dst_file),
        &expected,
        "destination after every write",
    );
}

/// Expected: with `--rebind-port Q` while another listener (held by the test)
/// occupies 127.0.0.1:Q, the destination takes control, keeps retrying the
/// bind (the port stays ours: our listener accepts a connection there; the
/// old port is closed) and, once the port is released, binds it within 3 s
/// (it retries every second) and serves the migrated data there.
#[test]
fn rebind_waits_for_an_occupied_port() {
    let size = 2 * MIB;
    let blocker = TcpListener::bind("127.0.0.1:0").unwrap();
    let q = blocker.local_addr().unwrap();
    let qs = q.port().to_string();
    let mut p = pair_in(tempdir(), size, 0x0cc, &["--rebind-port", &qs]);
    let old = p.dst.addr();
    mirror_cmd(p.src.ctl(), old, &[]).expect_success("mirror");
    wait_handed_over(&mut p.src, &p.dst, Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(10), || p.dst.log_count("cannot bind")
            > 0),
        "no bind failure logged; log:\n{}",
        p.dst.stderr()
    );
    // For a while (several retry periods) the port stays ours.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(2500) {
        p.dst.assert_alive();
        std::thread::sleep(Duration::from_millis(250));
    }
    let probe = TcpStream::connect_timeout(&q, IO_TIMEOUT).expect("connect to our listener");
    blocker.set_nonblocking(false).unwrap();
    let (_acc, from) = blocker.accept().expect("our listener still owns the port");
    assert_eq!(probe.local_addr().unwrap(), from);
    drop(probe);
    assert!(
        !accepts(old),
        "old port still accepting after the rebind began"
    );
    assert_eq!(status_map(p.dst.ctl())["has_control"], "true");

    drop(_acc);
    drop(blocker);
    let released = Instant::now();
    let mut bound = false;
    while released.elapsed() < Duration::from_secs(10) {
        if let Ok(mut s) = TcpStream::connect_timeout(&q, Duration::from_secs(1)) {
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut g = [0u8; 8];
            if std::io::Read::read_exact(&mut s, &mut g).is_ok() && g == NBDMAGIC.to_be_bytes() {
                bound = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = released.elapsed();
    assert!(
        bound,
        "destination never bound {q}; log:\n{}",
        p.dst.stderr()
    );
    eprintln!("rebind: bound {after:?} after the port was released");
    assert!(after < Duration::from_secs(3), "took {after:?}");
    assert_bytes_eq(
        &nbd_read(q, 0, size as u32),
        &read_file(&p.src_file),
        "data",
    );
}

// ---------------------------------------------------------------- unlink

/// Expected: `mirror --unlink`: the source file is removed at the hand-over,
/// the source exits 0, the destination has the data (as read before the
/// migration) and control.
#[test]
fn unlink_removes_the_source_file() {
    let size = 3 * MIB + 512;
    let mut p = pair_in(tempdir(), size, 0x041c, &[]);
    let data = read_file(&p.src_file);
    mirror_cmd(p.src.ctl(), p.dst.addr(), &["--unlink"]).expect_success("mirror --unlink");
    wait_handed_over(&mut p.src, &p.dst, Duration::from_secs(30));
    assert_took_over(&p);
    assert!(
        !p.src_file.exists(),
        "source file still exists after --unlink"
    );
    assert_bytes_eq(&read_file(&p.dst_file), &data, "destination file");
    assert_bytes_eq(&nbd_read(p.dst.addr(), 0, size as u32), &data, "served");
}

// ---------------------------------------------------------------- status, speed, break

/// Keys always present while migrating (`migration_seconds_left` only while
/// data moves: speed above 0).
const MIGRATION_KEYS: [&str; 6] = [
    "migration_speed",
    "migration_duration",
    "migration_bytes_left",
    "migration_speed_limit",
    "migration_attempts",
    "migration_state",
];

/// Checks the keys of a status taken while migrating.
#[track_caller]
fn check_migration_keys(s: &BTreeMap<String, String>) {
    for k in MIGRATION_KEYS {
        assert!(s.contains_key(k), "status lacks {k}: {s:?}");
    }
    let moving = status_u64(s, "migration_speed") > 0;
    assert_eq!(
        s.contains_key("migration_seconds_left"),
        moving,
        "an ETA exactly while data moves: {s:?}"
    );
    assert!(
        ["copying", "active", "handover"].contains(&s["migration_state"].as_str()),
        "{s:?}"
    );
}

/// Status samples every 250 ms for `d`.
fn sample_status(ctl: &Path, d: Duration) -> Vec<(Instant, BTreeMap<String, String>)> {
    let t0 = Instant::now();
    let mut v = Vec::new();
    while t0.elapsed() < d {
        v.push((Instant::now(), status_map(ctl)));
        std::thread::sleep(Duration::from_millis(250));
    }
    v
}

/// Expected, on a 256 MiB image migrated at `--max-speed 20000000`:
/// - status: is_mirroring=true, every migration_* key present,
///   migration_speed_limit=20000000, migration_attempts=1, speed within 2x
///   of the limit, bytes_left never growing and lower after 4 s,
///   seconds_left about bytes_left/speed; `status --json` has the same keys
///   and typed values;
/// - a second `mirror` fails with "mirror already running" (exit 1);
/// - `break` prints "mirror stopped": is_mirroring=false, no migration keys,
///   the source keeps serving and a client write succeeds; the destination
///   is untouched (no control, marker kept); `break` again: "not mirroring",
///   `mirror-speed`: "Not currently mirroring";
/// - a new migration at 20 MB/s raised to 100 MB/s by `mirror-speed` after
///   1 s shows the new limit in status and finishes well before the 13.4 s
///   that 256 MiB take at 20 MB/s (< 8 s), carrying the client's write.
#[test]
fn status_speed_limit_and_break_during_a_slow_migration() {
    let _h = heavy();
    let size = 256 * MIB;
    let dir = big_tempdir(3 * size);
    let mut p = pair_in(dir, size, 0x5bee, &[]);
    let ctl = p.src.ctl().to_owned();
    let ctl_s = ctl.display().to_string();
    let st = status_map(&ctl);
    assert_eq!(st["is_mirroring"], "false");
    assert!(st.keys().all(|k| !k.starts_with("migration_")), "{st:?}");

    let out = mirror_cmd(&ctl, p.dst.addr(), &["--max-speed", "20000000"]);
    out.expect_success("mirror --max-speed");
    assert_eq!(out.stdout_str().trim(), "Migration started");

    let samples = sample_status(&ctl, Duration::from_secs(4));
    for (_, s) in &samples {
        assert_eq!(s["is_mirroring"], "true", "{s:?}");
        check_migration_keys(s);
        assert_eq!(s["migration_speed_limit"], "20000000");
        assert_eq!(s["migration_attempts"], "1");
        assert_eq!(s["has_control"], "true");
        assert_eq!(s["clients_allowed"], "true");
        assert!(status_u64(s, "migration_bytes_left") <= size);
    }
    let left: Vec<u64> = samples
        .iter()
        .map(|(_, s)| status_u64(s, "migration_bytes_left"))
        .collect();
    assert!(
        left.windows(2).all(|w| w[1] <= w[0]),
        "bytes_left must not grow without client writes: {left:?}"
    );
    assert!(
        left.last() < left.first(),
        "bytes_left did not decrease in 4 s: {left:?}"
    );
    let sb = &samples.last().unwrap().1;
    let speed = status_u64(sb, "migration_speed");
    assert!(
        (10_000_000..=40_000_000).contains(&speed),
        "migration_speed {speed} not within 2x of the 20 MB/s limit: {sb:?}"
    );
    let secs_left = status_u64(sb, "migration_seconds_left");
    let expect_left = status_u64(sb, "migration_bytes_left").div_ceil(speed);
    assert!(
        secs_left + 2 >= expect_left && secs_left <= expect_left + 2,
        "seconds_left {secs_left} vs bytes_left/speed {expect_left}: {sb:?}"
    );
    assert!(status_u64(sb, "migration_duration") >= 3, "{sb:?}");

    // JSON form: the same keys, typed.
    let out = flexnbd(&["status", "--sock", &ctl_s, "--json"]);
    out.expect_success("status --json");
    let j: Value = serde_json::from_str(out.stdout_str().trim()).expect("status JSON");
    let text = status_map(&ctl);
    let mut jkeys: Vec<&String> = j.as_object().unwrap().keys().collect();
    jkeys.sort();
    assert_eq!(jkeys, text.keys().collect::<Vec<_>>(), "status --json keys");
    assert_eq!(j["is_mirroring"], Value::Bool(true));
    assert_eq!(j["has_control"], Value::Bool(true));
    assert_eq!(j["migration_speed_limit"].as_u64(), Some(20_000_000));
    assert_eq!(j["size"].as_u64(), Some(size));
    for k in MIGRATION_KEYS.iter().filter(|k| **k != "migration_state") {
        assert!(j[k].is_u64(), "{k} in JSON: {j}");
    }
    assert_eq!(j["migration_state"], "copying", "{j}");

    // One migration at a time.
    let out = mirror_cmd(&ctl, p.dst.addr(), &[]);
    assert_eq!(out.status.code(), Some(1), "second mirror: {out:?}");
    assert!(
        out.stderr_str().contains("mirror already running"),
        "stderr: {}",
        out.stderr_str()
    );
    assert_eq!(status_map(&ctl)["migration_attempts"], "1");

    // Break: the source goes back to normal service.
    let out = flexnbd(&["break", "--sock", &ctl_s]);
    out.expect_success("break");
    assert_eq!(out.stdout_str().trim(), "mirror stopped");
    let s = status_map(&ctl);
    assert_eq!(s["is_mirroring"], "false", "{s:?}");
    assert_eq!(s["clients_allowed"], "true", "{s:?}");
    assert_eq!(s["has_control"], "true", "{s:?}");
    assert!(s.keys().all(|k| !k.starts_with("migration_")), "{s:?}");
    p.src.assert_alive();
    let mut c = Raw::simple(p.src.addr());
    let patch = random_bytes(77, 64 * 1024);
    assert_eq!(c.write(9, 5 * MIB, &patch), 0, "write after break");
    assert_bytes_eq(
        &c.read(10, 5 * MIB, patch.len() as u32),
        &patch,
        "read back",
    );
    c.req(CMD_DISC, 0, 11, 0, 0);
    // A broken migration must not hand over (watched for a second: a
    // hand-over is processed asynchronously).
    let gave = wait_until(Duration::from_secs(1), || {
        try_status(p.dst.ctl()).is_some_and(|d| d["has_control"] != "false")
    });
    assert!(
        !gave,
        "a broken migration handed over: {:?}",
        try_status(p.dst.ctl())
    );
    assert!(p.marker().exists());
    let out = flexnbd(&["break", "--sock", &ctl_s]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr_str().contains("not mirroring"), "{out:?}");
    let out = flexnbd(&["mirror-speed", "--sock", &ctl_s, "--max-speed", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr_str().contains("Not currently mirroring"),
        "{out:?}"
    );

    // Again at 20 MB/s, raised to 100 MB/s after a second.
    let t0 = Instant::now();
    mirror_cmd(&ctl, p.dst.addr(), &["--max-speed", "20000000"]).expect_success("mirror again");
    std::thread::sleep(Duration::from_secs(1)); // one second at the low limit
    let out = flexnbd(&["mirror-speed", "--sock", &ctl_s, "--max-speed", "100000000"]);
    out.expect_success("mirror-speed");
    let s1 = status_map(&ctl);
    assert_eq!(s1["migration_speed_limit"], "100000000", "{s1:?}");
    wait_handed_over(&mut p.src, &p.dst, Duration::from_secs(60));
    let took = t0.elapsed();
    eprintln!("256 MiB with the limit raised from 20 to 100 MB/s after 1 s: {took:?}");
    assert!(
        took < Duration::from_secs(8),
        "raising the limit did not speed the migration up: {took:?} (13.4 s at 20 MB/s)"
    );
    assert_took_over(&p);
    assert_eq!(md5_file(&p.dst_file), md5_file(&p.src_file));
    assert_bytes_eq(
        &read_file_at(&p.dst_file, 5 * MIB, patch.len()),
        &patch,
        "the write made after break",
    );
}

/// Expected: at 20 MB/s, `migration_bytes_left` visibly falls between status
/// polls a second apart (progress granularity well under the 20 MB sent per
/// second), and `migration_seconds_left` does not grow while data flows.
#[test]
fn status_bytes_left_moves_every_second_at_20_mbps() {
    let _h = heavy();
    let size = 256 * MIB;
    let dir = big_tempdir(3 * size);
    let p = pair_in(dir, size, 0x5bef, &[]);
    let ctl = p.src.ctl().to_owned();
    mirror_cmd(&ctl, p.dst.addr(), &["--max-speed", "20000000"]).expect_success("mirror");
    let samples = sample_status(&ctl, Duration::from_secs(4));
    flexnbd(&["break", "--sock", &ctl.display().to_string()]).expect_success("break");
    // The first sample may come before anything was measured (no ETA yet).
    let left: Vec<(f64, u64, u64)> = samples
        .iter()
        .filter(|(_, s)| status_u64(s, "migration_speed") > 0)
        .map(|(t, s)| {
            (
                t.duration_since(samples[0].0).as_secs_f64(),
                status_u64(s, "migration_bytes_left"),
                status_u64(s, "migration_seconds_left"),
            )
        })
        .collect();
    assert!(
        left.len() + 2 >= samples.len(),
        "no speed measured: {samples:?}"
    );
    for (i, a) in left.iter().enumerate() {
        if let Some(b) = left[i..].iter().find(|b| b.0 - a.0 >= 1.2) {
            assert!(
                b.1 < a.1,
                "bytes_left did not move between {:.2}s and {:.2}s at 20 MB/s \
                 (samples: time, bytes_left, seconds_left: {left:?})",
                a.0,
                b.0
            );
            assert!(
                b.2 <= a.2,
                "seconds_left grew from {} to {} while data was flowing ({left:?})",
                a.2,
                b.2
            );
        }
    }
}

// ---------------------------------------------------------------- ACL

/// Expected: `flexnbd acl --sock DEST 127.0.0.2` while listening applies at
/// once (a peer from 127.0.0.1 is closed with nothing sent; the migration
/// must come from 127.0.0.2, via `mirror --bind`) and carries over the
/// hand-over: afterwards 127.0.0.1 is still refused with nothing sent, and a
/// client from 127.0.0.2 reads the migrated data.
#[test]
fn acl_set_while_listening_applies_after_handover() {
    let size = MIB;
    let mut p = pair_in(tempdir(), size, 0xac1, &[]);
    let dctl = p.dst.ctl().display().to_string();
    let out = flexnbd(&["acl", "--sock", &dctl, "127.0.0.2"]);
    out.expect_success("acl");
    let ip1: IpAddr = "127.0.0.1".parse().unwrap();
    let ip2: IpAddr = "127.0.0.2".parse().unwrap();
    let refused = |addr| {
        let s = connect_from(ip1, addr).expect("connect");
        Raw::from_stream(s).expect_closed()
    };
    assert!(
        refused(p.dst.addr()).is_empty(),
        "refused before the hand-over"
    );

    // Without --bind, the source comes from 127.0.0.1 and is turned away.
    let out = mirror_cmd(p.src.ctl(), p.dst.addr(), &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr_str().contains("Mirror was rejected"),
        "{}",
        out.stderr_str()
    );
    assert_eq!(status_map(p.src.ctl())["is_mirroring"], "false");

    mirror_cmd(p.src.ctl(), p.dst.addr(), &["--bind", "127.0.0.2"])
        .expect_success("mirror --bind 127.0.0.2");
    wait_handed_over(&mut p.src, &p.dst, Duration::from_secs(30));
    assert_took_over(&p);

    let got = refused(p.dst.addr());
    assert!(
        got.is_empty(),
        "127.0.0.1 got {} bytes after the hand-over",
        got.len()
    );
    let mut c = Raw::from_stream(connect_from(ip2, p.dst.addr()).unwrap());
    assert_eq!(c.newstyle_greeting(), 3);
    c.send(&3u32.to_be_bytes());
    c.go();
    assert_bytes_eq(&c.read(1, 0, size as u32), &read_file(&p.src_file), "data");
}

// ---------------------------------------------------------------- stopped early

/// Expected: a listener stopped (SIGTERM, and SIGINT) before any migration
/// exits 1 and keeps FILE.INCOMPLETE; its control socket is removed.
#[test]
fn listener_stopped_before_migration_exits_1_and_keeps_marker() {
    for sig in [SIGTERM, SIGINT] {
        let dir = tempdir();
        let f = dir.path().join("dst.img");
        create_sparse_file(&f, MIB);
        let mut dst = Daemon::listen(&f, &dir.path().join("dst.sock")).start();
        assert!(marker_of(&f).exists(), "marker created before listening");
        assert!(accepts(dst.addr()));
        let st = dst.stop_with(sig);
        assert_eq!(st.code(), Some(1), "signal {sig}; log:\n{}", dst.stderr());
        assert!(marker_of(&f).exists(), "marker must stay");
        assert!(!dst.ctl().exists(), "control socket removed");
    }
}

/// A writer that rewrites the same four blocks as fast as it can (4 in
/// flight), recording the last acknowledged content of each block.
const HOT_WRITER: &str = r#"
import struct
uri, outpath, flag = sys.argv[1], sys.argv[2], sys.argv[3]
h = connect(uri)
last_ok = {}
inflight = {}
n = 0
err = None
try:
    while True:
        while len(inflight) < 4:
            n += 1
            b = n % 4
            if b in inflight.values():
                break
            buf = nbd.Buffer.from_bytearray(bytearray(struct.pack(">QQ", n, b) * 256))
            inflight[h.aio_pwrite(buf, b * 4096)] = b
            inflight_ids[b] = n
        h.poll(-1)
        for c in list(inflight):
            if h.aio_command_completed(c):
                b = inflight.pop(c)
                last_ok[b] = inflight_ids[b]
                if len(last_ok) == 4 and not os.path.exists(flag):
                    open(flag, "w").close()
except nbd.Error as e:
    err = e.string
json.dump({"last_ok": last_ok, "error": err}, open(outpath, "w"))
"#;

/// Expected: a client rewriting the same few blocks as fast as it can does
/// not keep the migration from converging (its writes keep overlapping the
/// copies in flight): the hand-over happens within 60 s, the destination
/// equals the source, and each hot block holds its last acknowledged write.
#[test]
fn migration_converges_while_a_client_rewrites_a_hot_block() {
    let _h = heavy();
    let size = 64 * MIB;
    let dir = big_tempdir(3 * size);
    let mut p = pair_in(dir, size, 0x4070, &[]);
    let work = tempdir();
    let report = work.path().join("hot.json");
    let flag = work.path().join("hot.started");
    let script = format!("inflight_ids = {{}}\n{HOT_WRITER}");
    let mut bg = Background::python(
        &script,
        &[
            p.src.uri(),
            report.display().to_string(),
            flag.display().to_string(),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(30), || flag.exists()
            || !bg.is_running()),
        "hot writer did not start: {}",
        bg.stderr()
    );
    mirror_cmd(p.src.ctl(), p.dst.addr(), &[]).expect_success("mirror");
    wait_handed_over(&mut p.src, &p.dst, Duration::from_secs(60));
    assert_took_over(&p);
    assert!(
        bg.wait(Duration::from_secs(30)).is_some(),
        "writer still running"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).unwrap();
    assert_eq!(md5_file(&p.dst_file), md5_file(&p.src_file));
    let last = r["last_ok"].as_object().expect("last_ok");
    assert_eq!(last.len(), 4, "{r}");
    for (b, id) in last {
        let b: u64 = b.parse().unwrap();
        let got = read_file_at(&p.dst_file, b * 4096, 16);
        let id = id.as_u64().unwrap();
        // The block holds its last acknowledged write or a later one whose
        // reply was lost at the hand-over.
        let got_id = u64::from_be_bytes(got[..8].try_into().unwrap());
        assert!(
            got_id >= id,
            "block {b}: destination has write {got_id}, acknowledged {id}"
        );
        assert_eq!(u64::from_be_bytes(got[8..16].try_into().unwrap()), b);
    }
}
