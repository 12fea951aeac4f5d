//! `flexnbd serve` driven by real NBD clients: nbdinfo, nbdcopy, qemu-img,
//! qemu-io and python-libnbd, over TCP and unix sockets, checking the image
//! bytes, its allocation and what the clients report.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The 1 GiB tests take the machine for themselves.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

/// A sparse image of `size` bytes with random data in `runs` (offset, len);
/// returns its path and the expected contents.
fn sparse_image(
    dir: &Path,
    name: &str,
    size: u64,
    runs: &[(u64, u64)],
    seed: u64,
) -> (PathBuf, Vec<u8>) {
    let path = dir.join(name);
    create_sparse_file(&path, size);
    let mut model = vec![0u8; size as usize];
    for (i, &(off, len)) in runs.iter().enumerate() {
        let data = random_bytes(seed + i as u64, len as usize);
        write_file_at(&path, off, &data);
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    (path, model)
}

fn flag(info: &Value, key: &str) -> bool {
    info[key]
        .as_bool()
        .unwrap_or_else(|| panic!("nbdinfo has no boolean {key}: {info}"))
}

fn export0(v: &Value) -> &Value {
    &v["exports"][0]
}

#[test]
fn nbdinfo_reports_capabilities() {
    let dir = tempdir();
    let size = 10 * MIB + 12 * KIB;
    let img = dir.path().join("img");
    create_random_file(&img, size, 1);
    let unix = dir.path().join("nbd.sock");
    let mut srv = Serve {
        unix: Some(unix.clone()),
        ..Serve::tcp(&img)
    }
    .start();

    for uri in [srv.uri(), srv.unix_uri()] {
        let v = nbdinfo_json(&uri);
        assert_eq!(v["protocol"], "newstyle-fixed", "{uri}: {v}");
        assert_eq!(v["structured"], true, "{uri}: {v}");
        let e = export0(&v);
        for key in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_fast_zero",
            "can_df",
            "can_multi_conn",
            "can_cache",
        ] {
            assert!(flag(e, key), "{uri}: {key} should be true: {e}");
        }
        assert!(!flag(e, "is_read_only"), "{uri}: {e}");
        assert_eq!(e["export-size"].as_u64(), Some(size), "{uri}: {e}");
        let contexts: Vec<&str> = e["contexts"]
            .as_array()
            .expect("contexts")
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        assert!(contexts.contains(&"base:allocation"), "{uri}: {contexts:?}");
        // The sizes the server promises in NBD_INFO_BLOCK_SIZE.
        assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{e}");
        assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{e}");
        assert_eq!(e["block_size_maximum"].as_u64(), Some(32 * MIB), "{e}");
    }
    srv.stop();
}

#[test]
fn nbdinfo_read_only_export() {
    let dir = tempdir();
    let img = dir.path().join("img");
    create_random_file(&img, 4 * MIB, 2);
    let mut srv = Serve::tcp(&img).arg("-r").start();
    let v = nbdinfo_json(&srv.uri());
    let e = export0(&v);
    assert!(flag(e, "is_read_only"), "{e}");
    assert!(!flag(e, "can_trim"), "{e}");
    assert!(!flag(e, "can_zero"), "{e}");
    assert!(!flag(e, "can_fast_zero"), "{e}");
    assert!(flag(e, "can_flush"), "{e}");
    assert_eq!(e["export-size"].as_u64(), Some(4 * MIB));
    srv.stop();

    // --read-only spelled out: a write is refused and the file is untouched.
    let before = read_file(&img);
    let srv = Serve::tcp(&img).arg("--read-only").start();
    let r = python_json(
        "h = connect(sys.argv[1], strict=0)\n\
         out({'write': server_err(h.pwrite, b'x' * 4096, 0), 'read': h.pread(4096, 0) == file_bytes(sys.argv[2], 0, 4096)})",
        &[srv.uri(), img.display().to_string()],
        TOOL_TIMEOUT,
    );
    assert_eq!(r["write"], 1, "EPERM expected: {r}");
    assert_eq!(r["read"], true);
    drop(srv);
    assert_bytes_eq(&read_file(&img), &before, "read-only image");
}

/// The nbdcopy variant: transport and number of connections.
#[derive(Debug, Clone, Copy)]
enum Via {
    Tcp,
    Unix,
}

fn serve_via(via: Via, file: &Path, dir: &Path, extra: &[&str]) -> Server {
    let ctl = dir.join("ctl.sock");
    let cfg = match via {
        Via::Tcp => Serve::tcp(file),
        Via::Unix => Serve::unix(file, &dir.join("nbd.sock")),
    };
    // Ready on the control socket, so no probe connection shows up in the log.
    cfg.control(&ctl).arg("-v").args(extra).start()
}

fn uri_via(via: Via, srv: &Server) -> String {
    match via {
        Via::Tcp => srv.uri(),
        Via::Unix => srv.unix_uri(),
    }
}

fn nbdcopy(conns: u32, src: &str, dst: &str) -> Duration {
    let tool = require_tool("nbdcopy");
    let t = Instant::now();
    let n = conns.to_string();
    run(
        Command::new(tool).args(["-C", &n, "-T", &n, src, dst]),
        Duration::from_secs(600),
    )
    .expect_success("nbdcopy");
    t.elapsed()
}

#[test]
fn nbdcopy_1gib_in_and_out_over_tcp_and_unix() {
    let _g = heavy();
    require_tool("nbdcopy");
    let dir = big_tempdir(3 * GIB + 512 * MIB);
    let src = dir.path().join("src.img");
    create_random_file(&src, GIB, 0x5eed);
    let src_md5 = md5_file(&src);
    let src_s = src.display().to_string();

    for via in [Via::Tcp, Via::Unix] {
        for conns in [1u32, 4] {
            // IN: the source image copied to an empty sparse export.
            let sub = tempfile::Builder::new().tempdir_in(dir.path()).unwrap();
            let dst = sub.path().join("in.img");
            create_sparse_file(&dst, GIB);
            let mut srv = serve_via(via, &dst, sub.path(), &[]);
            let before = srv.log_count("connected from");
            let took = nbdcopy(conns, &src_s, &uri_via(via, &srv));
            let used = srv.log_count("connected from") - before;
            srv.stop();
            eprintln!("nbdcopy IN  {via:?} -C {conns}: {took:?}, {used} connections");
            assert_eq!(used, conns as usize, "connections nbdcopy made ({via:?})");
            assert_eq!(md5_file(&dst), src_md5, "IN {via:?} -C {conns}: checksum");
            std::fs::remove_file(&dst).unwrap();

            // OUT: the source image served read-only, copied to a local file.
            let out = sub.path().join("out.img");
            let mut srv = serve_via(via, &src, sub.path(), &["-r"]);
            let before = srv.log_count("connected from");
            let took = nbdcopy(conns, &uri_via(via, &srv), &out.display().to_string());
            let used = srv.log_count("connected from") - before;
            srv.stop();
            eprintln!("nbdcopy OUT {via:?} -C {conns}: {took:?}, {used} connections");
            assert_eq!(used, conns as usize, "connections nbdcopy made ({via:?})");
            assert_eq!(std::fs::metadata(&out).unwrap().len(), GIB);
            assert_eq!(md5_file(&out), src_md5, "OUT {via:?} -C {conns}: checksum");
            std::fs::remove_file(&out).unwrap();
        }
    }
}

/// Reads of 256 KiB should cost about the same wherever they land. Structured
/// reads >= 64 KiB look for holes in their range; SEEK_HOLE on tmpfs walks the
/// page cache up to the next hole, so a server that used it per read made a
/// read near the start of a fully allocated tmpfs image scan the whole file
/// (16 ms per read, 25 s for a 1 GiB nbdcopy instead of 2 s). Regression guard.
#[test]
fn reads_cost_the_same_at_any_offset_of_a_large_image() {
    let _g = heavy();
    let dir = big_tempdir(GIB + 256 * MIB);
    let img = dir.path().join("big.img");
    create_random_file(&img, GIB, 77);
    let fs = run(
        Command::new("stat").args(["-f", "-c", "%T"]).arg(&img),
        TOOL_TIMEOUT,
    )
    .stdout_str();
    eprintln!("image on a {} file system", fs.trim());
    let srv = Serve::tcp(&img).arg("-r").start();
    let script = r#"
import time
h = connect(sys.argv[1])
size = h.get_size()
n = 256 * 1024
def timed(off, reps):
    t = time.monotonic()
    for _ in range(reps):
        b = h.pread(n, off)
    return time.monotonic() - t, b
timed(size - n, 5)
end, b_end = timed(size - n, 40)
start, b_start = timed(0, 40)
out({"end": end, "start": start,
     "ok": b_end == file_bytes(sys.argv[2], size - n, n) and b_start == file_bytes(sys.argv[2], 0, n)})
"#;
    let r = python_json(
        script,
        &[srv.uri(), img.display().to_string()],
        Duration::from_secs(300),
    );
    assert_eq!(r["ok"], true, "read data differs from the file");
    let start = r["start"].as_f64().unwrap();
    let end = r["end"].as_f64().unwrap();
    eprintln!("40 reads of 256 KiB: at offset 0 {start:.3}s, at the end {end:.3}s");
    assert!(
        start <= 4.0 * end + 0.1,
        "reads at the start of a 1 GiB image take {start:.3}s vs {end:.3}s at the end: \
         the cost grows with the distance to the next hole"
    );
}

#[test]
fn qemu_img_compare_and_qemu_io_patterns() {
    let qemu_img = require_tool("qemu-img");
    let qemu_io = require_tool("qemu-io");
    let dir = tempdir();
    let img = dir.path().join("img");
    create_random_file(&img, 16 * MIB, 3);
    let mut model = read_file(&img);
    let mut srv = Serve::tcp(&img).start();
    let uri = srv.uri();

    let compare = |other: &Path| {
        run(
            Command::new(&qemu_img)
                .args(["compare", "-U", "-f", "raw", "-F", "raw", &uri])
                .arg(other),
            TOOL_TIMEOUT,
        )
    };
    let same = compare(&img);
    same.expect_success("qemu-img compare");
    assert!(
        same.stdout_str().contains("Images are identical"),
        "{}",
        same.stdout_str()
    );

    // The comparison sees a one-byte difference (against a modified copy).
    let copy = dir.path().join("copy");
    std::fs::copy(&img, &copy).unwrap();
    write_file_at(&copy, 5_000_000, &[model[5_000_000] ^ 0xff]);
    let diff = compare(&copy);
    assert_eq!(
        diff.status.code(),
        Some(1),
        "qemu-img compare should find the difference: {diff:?}"
    );
    // qemu-img reports the start of the differing 512-byte sector.
    let text = diff.stdout_str();
    let at: u64 = text
        .trim()
        .strip_prefix("Content mismatch at offset ")
        .and_then(|r| r.trim_end_matches('!').parse().ok())
        .unwrap_or_else(|| panic!("unexpected qemu-img compare output: {text}"));
    assert_eq!(at, 5_000_000 / 512 * 512, "{text}");

    let cmds: &[(&str, u64, u64, Option<u8>)] = &[
        // (qemu-io command, offset, length, pattern written: None = zeroes)
        ("write -P 0xab 0 1M", 0, MIB, Some(0xab)),
        ("write -P 0xcd 3M 64k", 3 * MIB, 64 * KIB, Some(0xcd)),
        ("write -z 5M 1M", 5 * MIB, MIB, None),
        ("write -P 0x11 7340544 4608", 7_340_544, 4608, Some(0x11)),
        ("write -z 9437696 1000", 9_437_696, 1000, None),
    ];
    let mut args: Vec<String> = vec!["-f".into(), "raw".into(), uri.clone()];
    for (c, off, len, pat) in cmds {
        args.push("-c".into());
        args.push((*c).into());
        args.push("-c".into());
        args.push(format!("read -P {} {off} {len}", pat.unwrap_or(0)));
    }
    args.extend(["-c".into(), "flush".into()]);
    let out = run(Command::new(&qemu_io).args(&args), TOOL_TIMEOUT);
    out.expect_success("qemu-io");
    let text = out.stdout_str() + &out.stderr_str();
    assert!(
        !text.contains("failed") && !text.to_lowercase().contains("error"),
        "qemu-io reported a problem:\n{text}"
    );
    assert_eq!(text.matches("wrote ").count(), cmds.len(), "{text}");
    assert_eq!(text.matches("read ").count(), cmds.len(), "{text}");

    for (_, off, len, pat) in cmds {
        model[*off as usize..(*off + *len) as usize].fill(pat.unwrap_or(0));
    }
    assert_bytes_eq(&read_file(&img), &model, "image after qemu-io writes");

    // A wrong pattern is noticed: the read checks above were real checks.
    let neg = run(
        Command::new(&qemu_io).args(["-f", "raw", &uri, "-c", "read -P 0x99 0 4k"]),
        TOOL_TIMEOUT,
    );
    assert!(
        (neg.stdout_str() + &neg.stderr_str()).contains("Pattern verification failed"),
        "{neg:?}"
    );

    let again = compare(&img);
    again.expect_success("qemu-img compare after writes");
    srv.stop();
}

/// `nbdinfo --map` lines as (offset, length, type).
fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u32)> {
    let tool = require_tool("nbdinfo");
    let out = run(Command::new(tool).args(["--map", uri]), TOOL_TIMEOUT);
    out.expect_success("nbdinfo --map");
    out.stdout_str()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn nbdinfo_map_of_a_sparse_image() {
    let dir = tempdir();
    let runs = [
        (MIB, 2 * MIB),
        (10 * MIB, MIB),
        (20 * MIB + 64 * KIB, 192 * KIB),
        (63 * MIB, MIB),
    ];
    let (img, model) = sparse_image(dir.path(), "sparse", 64 * MIB, &runs, 10);
    let mut srv = Serve::tcp(&img).start();
    let map = nbdinfo_map(&srv.uri());
    let (h, d) = (3, 0);
    let expected = vec![
        (0, MIB, h),
        (MIB, 2 * MIB, d),
        (3 * MIB, 7 * MIB, h),
        (10 * MIB, MIB, d),
        (11 * MIB, 9 * MIB + 64 * KIB, h),
        (20 * MIB + 64 * KIB, 192 * KIB, d),
        (20 * MIB + 256 * KIB, 42 * MIB + 768 * KIB, h),
        (63 * MIB, MIB, d),
    ];
    assert_eq!(map, expected);
    // Reading it all back gives the same bytes.
    let r = python_json(
        "h = connect(sys.argv[1])\nout({'same': h.pread(64 << 20, 0) == file_bytes(sys.argv[2], 0, 64 << 20)})",
        &[srv.uri(), img.display().to_string()],
        TOOL_TIMEOUT,
    );
    assert_eq!(r["same"], true);
    assert_bytes_eq(&read_file(&img), &model, "image");
    srv.stop();
}

/// Block status of a range as a flat [len, flags, len, flags, ...] list.
const PY_EXTENTS: &str = r#"
def extents(h, count, off):
    ext = []
    def cb(meta, o, entries, err):
        if meta == "base:allocation":
            ext.extend(entries)
        return 0
    h.block_status(count, off, cb)
    return ext
"#;

#[test]
fn trim_punches_a_hole_that_reads_as_zeroes() {
    let dir = tempdir();
    let (img, mut model) = sparse_image(dir.path(), "img", 64 * MIB, &[(4 * MIB, 2 * MIB)], 20);
    let mut srv = Serve::tcp(&img).start();
    let before = allocated_bytes(&img);
    let script = format!(
        "{PY_EXTENTS}\nh = connect(sys.argv[1], meta=True)\n\
         h.trim(1 << 20, 4 << 20)\nh.flush()\n\
         out({{'zeros': h.pread(1 << 20, 4 << 20) == bytes(1 << 20), 'ext': extents(h, 2 << 20, 4 << 20)}})"
    );
    let r = python_json(&script, &[srv.uri()], TOOL_TIMEOUT);
    let after = allocated_bytes(&img);
    assert_eq!(r["zeros"], true, "trimmed range must read as zeroes");
    assert_eq!(
        r["ext"],
        serde_json::json!([MIB, 3, MIB, 0]),
        "block status after the trim"
    );
    assert_eq!(
        before - after,
        MIB,
        "allocation dropped by the trimmed MiB ({before} -> {after})"
    );
    model[4 * MIB as usize..5 * MIB as usize].fill(0);
    assert_bytes_eq(&read_file(&img), &model, "image after trim");
    srv.stop();
}

#[test]
fn write_zeroes_punches_unless_no_hole() {
    let dir = tempdir();
    let (img, mut model) = sparse_image(
        dir.path(),
        "img",
        64 * MIB,
        &[(4 * MIB, 2 * MIB), (8 * MIB, 2 * MIB)],
        30,
    );
    let mut srv = Serve::tcp(&img).start();
    let uri = srv.uri();
    let zero = |off: u64, len: u64, flags: &str| {
        let r = python_json(
            &format!(
                "h = connect(sys.argv[1])\nh.zero({len}, {off}, {flags})\n\
                 out({{'zeros': h.pread({len}, {off}) == bytes({len})}})"
            ),
            std::slice::from_ref(&uri),
            TOOL_TIMEOUT,
        );
        assert_eq!(
            r["zeros"], true,
            "zeroed range {off}+{len} ({flags}) must read as zeroes"
        );
    };

    let a0 = allocated_bytes(&img);
    zero(4 * MIB, MIB, "0");
    let a1 = allocated_bytes(&img);
    assert_eq!(
        a0 - a1,
        MIB,
        "WRITE_ZEROES without NO_HOLE punches ({a0} -> {a1})"
    );

    zero(8 * MIB, MIB, "nbd.CMD_FLAG_NO_HOLE");
    let a2 = allocated_bytes(&img);
    assert_eq!(a2, a1, "WRITE_ZEROES with NO_HOLE keeps the allocation");

    // FAST_ZERO is possible on this file system: it succeeds and zeroes.
    zero(5 * MIB, 64 * KIB, "nbd.CMD_FLAG_FAST_ZERO");
    zero(
        9 * MIB,
        64 * KIB,
        "nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE",
    );
    let a3 = allocated_bytes(&img);
    assert_eq!(
        a2 - a3,
        64 * KIB,
        "only the FAST_ZERO without NO_HOLE punched"
    );

    for (off, len) in [
        (4 * MIB, MIB),
        (8 * MIB, MIB),
        (5 * MIB, 64 * KIB),
        (9 * MIB, 64 * KIB),
    ] {
        model[off as usize..(off + len) as usize].fill(0);
    }
    assert_bytes_eq(&read_file(&img), &model, "image after write zeroes");
    srv.stop();
}

#[test]
fn zero_writes_into_holes_keep_the_holes() {
    let dir = tempdir();
    let (img, mut model) = sparse_image(dir.path(), "img", 64 * MIB, &[(4 * MIB, 2 * MIB)], 40);
    let mut srv = Serve::tcp(&img).start();
    let uri = srv.uri();
    let write = |off: u64, data_expr: &str| {
        let r = python_json(
            &format!(
                "h = connect(sys.argv[1])\nd = {data_expr}\nh.pwrite(d, {off})\n\
                 out({{'back': h.pread(len(d), {off}) == d}})"
            ),
            std::slice::from_ref(&uri),
            TOOL_TIMEOUT,
        );
        assert_eq!(r["back"], true, "read back of the write at {off}");
    };

    // A MiB of zeroes into a hole: nothing gets allocated.
    let a0 = allocated_bytes(&img);
    write(10 * MIB, "bytes(1 << 20)");
    assert_eq!(
        allocated_bytes(&img),
        a0,
        "zero write into a hole allocated blocks"
    );

    // One zero block and one data block: exactly one block gets allocated.
    write(12 * MIB, "bytes(4096) + b'\\x5a' * 4096");
    let a1 = allocated_bytes(&img);
    assert_eq!(a1 - a0, 4096, "only the non-zero block is allocated");
    model[(12 * MIB + 4096) as usize..(12 * MIB + 8192) as usize].fill(0x5a);

    // Zeroes over data do overwrite it.
    write(4 * MIB, "bytes(1 << 20)");
    model[4 * MIB as usize..5 * MIB as usize].fill(0);
    assert_bytes_eq(&read_file(&img), &model, "image after zero writes");

    // The map still shows the holes where only zeroes were written.
    let map = nbdinfo_map(&uri);
    let is_data = |off: u64| {
        map.iter()
            .find(|(o, l, _)| *o <= off && off < o + l)
            .map(|e| e.2 == 0)
            .unwrap()
    };
    assert!(!is_data(10 * MIB), "{map:?}");
    assert!(!is_data(12 * MIB), "{map:?}");
    assert!(is_data(12 * MIB + 4096), "{map:?}");
    assert!(is_data(5 * MIB), "{map:?}");
    srv.stop();
}

#[test]
fn structured_reads_send_holes_as_hole_chunks() {
    let dir = tempdir();
    let runs = [(4 * MIB, MIB), (12 * MIB, MIB)];
    let (img, _) = sparse_image(dir.path(), "img", 64 * MIB, &runs, 50);
    let mut srv = Serve::tcp(&img).start();
    let script = r#"
h = connect(sys.argv[1])
path = sys.argv[2]
def sread(count, off, flags=0):
    chunks = []
    def cb(sub, o, st, err):
        chunks.append([o, len(sub), st])
        return 0
    buf = h.pread_structured(count, off, cb, flags)
    return {"chunks": chunks, "same": buf == file_bytes(path, off, count)}
M = 1 << 20
K = 1024
out({
  "hole_then_data": sread(512 * K, 4 * M - 256 * K),
  "data_then_hole": sread(256 * K, 5 * M - 128 * K),
  "all_hole": sread(512 * K, 8 * M),
  "df": sread(512 * K, 4 * M - 256 * K, nbd.CMD_FLAG_DF),
  "large": sread(16 * M, 0),
})
"#;
    let r = python_json(
        script,
        &[srv.uri(), img.display().to_string()],
        TOOL_TIMEOUT,
    );
    let (data, hole) = (1u64, 2u64);
    let chunks = |k: &str| -> Vec<(u64, u64, u64)> {
        assert_eq!(
            r[k]["same"], true,
            "{k}: reassembled bytes differ from the file"
        );
        r[k]["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c[0].as_u64().unwrap(),
                    c[1].as_u64().unwrap(),
                    c[2].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let mut c = chunks("hole_then_data");
    c.sort();
    assert_eq!(
        c,
        vec![
            (4 * MIB - 256 * KIB, 256 * KIB, hole),
            (4 * MIB, 256 * KIB, data)
        ]
    );
    // A trailing hole may be sent as zeroes in the data chunk (the server
    // only looks for a leading hole, to keep reads cheap on tmpfs).
    let mut c = chunks("data_then_hole");
    c.sort();
    let split = vec![
        (5 * MIB - 128 * KIB, 128 * KIB, data),
        (5 * MIB, 128 * KIB, hole),
    ];
    let whole = vec![(5 * MIB - 128 * KIB, 256 * KIB, data)];
    assert!(c == split || c == whole, "data then hole: {c:?}");
    assert_eq!(chunks("all_hole"), vec![(8 * MIB, 512 * KIB, hole)]);
    assert_eq!(
        chunks("df"),
        vec![(4 * MIB - 256 * KIB, 512 * KIB, data)],
        "DF: exactly one data chunk"
    );

    // A read larger than one reply buffer: chunks tile the range exactly, no
    // data is reported as a hole, and most of the holes are sent as holes.
    let mut c = chunks("large");
    c.sort();
    let mut pos = 0;
    let mut hole_bytes = 0;
    for &(o, l, st) in &c {
        assert_eq!(
            o, pos,
            "chunks must tile the range without gaps or overlaps: {c:?}"
        );
        assert!(l > 0);
        if st == hole {
            hole_bytes += l;
            for &(ro, rl) in &runs {
                assert!(
                    o + l <= ro || o >= ro + rl,
                    "hole chunk {o}+{l} covers data"
                );
            }
        } else {
            assert_eq!(st, data);
        }
        pos = o + l;
    }
    assert_eq!(pos, 16 * MIB);
    assert!(
        hole_bytes >= 7 * MIB,
        "only {hole_bytes} of 14 MiB of holes sent as holes: {c:?}"
    );
    srv.stop();
}

#[test]
fn flush_and_fua_succeed() {
    let dir = tempdir();
    let img = dir.path().join("img");
    create_random_file(&img, 8 * MIB, 60);
    let mut model = read_file(&img);
    let mut srv = Serve::tcp(&img).start();
    let script = r#"
h = connect(sys.argv[1])
res = {}
res["flush_clean"] = server_err(h.flush)
res["write_fua"] = server_err(h.pwrite, b"\x77" * 65536, 1 << 20, nbd.CMD_FLAG_FUA)
res["flush"] = server_err(h.flush)
res["zero_fua"] = server_err(h.zero, 65536, 2 << 20, nbd.CMD_FLAG_FUA)
res["trim_fua"] = server_err(h.trim, 65536, 3 << 20, nbd.CMD_FLAG_FUA)
res["write"] = server_err(h.pwrite, b"\x88" * 4096, 4 << 20)
res["flush2"] = server_err(h.flush)
res["flush3"] = server_err(h.flush)
res["cache"] = server_err(h.cache, 1 << 20, 0)
res["back"] = h.pread(65536, 1 << 20) == b"\x77" * 65536
out(res)
"#;
    let r = python_json(script, &[srv.uri()], TOOL_TIMEOUT);
    for k in [
        "flush_clean",
        "write_fua",
        "flush",
        "zero_fua",
        "trim_fua",
        "write",
        "flush2",
        "flush3",
        "cache",
    ] {
        assert_eq!(r[k], 0, "{k} failed: {r}");
    }
    assert_eq!(r["back"], true);
    model[MIB as usize..(MIB + 65536) as usize].fill(0x77);
    model[2 * MIB as usize..(2 * MIB + 65536) as usize].fill(0);
    model[3 * MIB as usize..(3 * MIB + 65536) as usize].fill(0);
    model[4 * MIB as usize..(4 * MIB + 4096) as usize].fill(0x88);
    assert_bytes_eq(&read_file(&img), &model, "image after FUA writes");
    srv.stop();
}

/// The pattern block `k` of client `i` writes (same formula as the script).
fn pattern(i: u64, k: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (((j % 256) as u64 * 7 + i * 31 + k * 13) & 0xff) as u8)
        .collect()
}

#[test]
fn concurrent_clients_write_distinct_regions() {
    let dir = tempdir();
    let img = dir.path().join("img");
    const REGION: u64 = 8 * MIB;
    const BS: u64 = 64 * KIB;
    // Four client regions, then a reference region nobody writes.
    create_random_file(&img, 5 * REGION, 70);
    let original = read_file(&img);
    let mut srv = Serve::tcp(&img).start();
    let script = r#"
import random
uri, path, i = sys.argv[1], sys.argv[2], int(sys.argv[3])
REG, BS = 8 << 20, 64 << 10
ref = 4 * REG
h = connect(uri)
rnd = random.Random(i)
errs = []
for k in range(REG // BS):
    pat = bytes(((j * 7 + i * 31 + k * 13) & 0xff) for j in range(256)) * (BS // 256)
    off = i * REG + k * BS
    h.pwrite(pat, off, nbd.CMD_FLAG_FUA if k % 16 == 0 else 0)
    if h.pread(BS, off) != pat:
        errs.append(["readback", off])
    r = ref + rnd.randrange(0, REG - BS)
    if h.pread(BS, r) != file_bytes(path, r, BS):
        errs.append(["reference", r])
h.flush()
out({"errors": errs, "writes": REG // BS})
"#;
    let uri = srv.uri();
    let path = img.display().to_string();
    let results: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let args = vec![uri.clone(), path.clone(), i.to_string()];
                s.spawn(move || python_json(script, &args, TOOL_TIMEOUT))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["errors"], serde_json::json!([]), "client {i}: {r}");
        assert_eq!(r["writes"], 128);
    }
    let got = read_file(&img);
    for i in 0..4u64 {
        for k in 0..REGION / BS {
            let off = (i * REGION + k * BS) as usize;
            assert_bytes_eq(
                &got[off..off + BS as usize],
                &pattern(i, k, BS as usize),
                &format!("client {i} block {k}"),
            );
        }
    }
    let r0 = (4 * REGION) as usize;
    assert_bytes_eq(&got[r0..], &original[r0..], "reference region");

    // Multi-conn: a write flushed on one connection is seen on another.
    let mc = python_json(
        "a = connect(sys.argv[1]); b = connect(sys.argv[1])\n\
         a.pwrite(b'\\xa1' * 4096, 0); a.flush()\n\
         b.pwrite(b'\\xb2' * 4096, 4096); b.flush()\n\
         out({'b_sees_a': b.pread(4096, 0) == b'\\xa1' * 4096, 'a_sees_b': a.pread(4096, 4096) == b'\\xb2' * 4096})",
        &[uri],
        TOOL_TIMEOUT,
    );
    assert_eq!(mc["b_sees_a"], true);
    assert_eq!(mc["a_sees_b"], true);
    srv.stop();
}

#[test]
fn oldstyle_export_works_with_nbdinfo_and_libnbd() {
    let dir = tempdir();
    let img = dir.path().join("img");
    create_random_file(&img, 4 * MIB + 512, 80);
    let mut srv = Serve::tcp(&img).arg("--oldstyle").start();
    let v = nbdinfo_json(&srv.uri());
    assert_eq!(v["protocol"], "oldstyle", "{v}");
    let e = export0(&v);
    assert_eq!(e["export-size"].as_u64(), Some(4 * MIB + 512));
    assert!(!flag(e, "is_read_only"));
    assert!(flag(e, "can_flush"));
    assert!(flag(e, "can_fua"));
    let r = python_json(
        "h = connect(sys.argv[1])\n\
         a = h.pread(65536, 1 << 20) == file_bytes(sys.argv[2], 1 << 20, 65536)\n\
         t = h.pread(512, 4 << 20) == file_bytes(sys.argv[2], 4 << 20, 512)\n\
         h.pwrite(b'\\x42' * 1000, 777); h.flush()\n\
         out({'read': a, 'tail': t, 'write': file_bytes(sys.argv[2], 777, 1000) == b'\\x42' * 1000})",
        &[srv.uri(), img.display().to_string()],
        TOOL_TIMEOUT,
    );
    assert_eq!(r["read"], true);
    assert_eq!(r["tail"], true);
    assert_eq!(r["write"], true);
    srv.stop();
}

#[test]
fn oldstyle_greeting_bytes() {
    let dir = tempdir();
    let img = dir.path().join("img");
    let size = 3 * MIB + 4096;
    create_random_file(&img, size, 81);
    let mut srv = Serve::tcp(&img).arg("--oldstyle").start();
    let mut c = Raw::connect(srv.addr());
    let g = c.read_exact(152);
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(be64(&g, 8), OLDSTYLE_MAGIC, "cliserv magic");
    assert_eq!(be64(&g, 16), size, "export size");
    let flags = be32(&g, 24);
    assert_eq!(
        flags & 0xffff_0000,
        0,
        "flags {flags:#x}: only 16 bits defined"
    );
    assert_eq!(
        flags & 0b1101,
        0b1101,
        "flags {flags:#x}: HAS_FLAGS, FLUSH and FUA"
    );
    assert_eq!(flags & 0x2, 0, "flags {flags:#x}: not read-only");
    assert_eq!(
        flags & 0x80,
        0,
        "flags {flags:#x}: DF needs structured replies"
    );
    assert!(g[28..].iter().all(|&b| b == 0), "124 zero bytes");
    // No option haggling: requests work at once, with simple replies.
    let data = c.read(0x1122_3344_5566_7788, 4096, 512);
    assert_bytes_eq(&data, &read_file_at(&img, 4096, 512), "oldstyle read");
    c.req(CMD_FLUSH, 0, 9, 0, 0);
    assert_eq!(c.simple_reply(9), 0);
    c.req(CMD_DISC, 0, 10, 0, 0);
    assert!(c.expect_closed().is_empty(), "no reply to DISC");
    srv.stop();
}

#[test]
fn fio_random_writes_verify() {
    let fio = require_tool("fio");
    let dir = tempdir();
    let img = dir.path().join("img");
    create_sparse_file(&img, 64 * MIB);
    let mut srv = Serve::tcp(&img).start();
    let uri = srv.uri();
    let out = run(
        Command::new(fio).current_dir(dir.path()).args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=32",
            "--size=64M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--do_verify=1",
            "--output-format=json",
        ]),
        Duration::from_secs(300),
    );
    out.expect_success("fio");
    let text = out.stdout_str();
    let json = &text[text.find('{').expect("fio JSON")..];
    let v: Value = serde_json::from_str(json).expect("fio JSON");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"].as_u64(), Some(64 * MIB), "{job}");
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap_or(0) >= 64 * MIB,
        "the verify pass read everything back: {job}"
    );
    srv.stop();
    // fio's blocks carry their offset in a verify header: spot-check a few in the file.
    let data = read_file(&img);
    assert!(data.iter().any(|&b| b != 0), "fio's data is in the file");
}

#[test]
fn offsets_beyond_4_gib_of_a_1_tib_sparse_export() {
    let dir = tempdir();
    let img = dir.path().join("img");
    let size: u64 = 1 << 40;
    create_sparse_file(&img, size);
    let mut srv = Serve::tcp(&img).start();
    let script = r#"
h = connect(sys.argv[1], meta=True)
T = 1 << 40
h.pwrite(b"z" * 8192, T - 8192)
h.pwrite(b"y" * 4096, 5 << 30)
ext = []
h.block_status((1 << 32) - 4096, (5 << 30) - 8192, lambda m, o, e, err: ext.extend(e))
out({"size": h.get_size(), "end": h.pread(8192, T - 8192) == b"z" * 8192,
     "mid": h.pread(4096, 5 << 30) == b"y" * 4096, "ext": ext})
"#;
    let r = python_json(script, &[srv.uri()], TOOL_TIMEOUT);
    assert_eq!(r["size"].as_u64(), Some(size));
    assert_eq!(r["end"], true);
    assert_eq!(r["mid"], true);
    assert_eq!(
        r["ext"],
        serde_json::json!([8192, 3, 4096, 0, (1u64 << 32) - 4096 - 8192 - 4096, 3])
    );
    let map = nbdinfo_map(&srv.uri());
    assert_eq!(
        map,
        vec![
            (0, 5 * GIB, 3),
            (5 * GIB, 4096, 0),
            (5 * GIB + 4096, size - 8192 - 5 * GIB - 4096, 3),
            (size - 8192, 8192, 0),
        ]
    );
    srv.stop();
    assert_eq!(read_file_at(&img, 5 * GIB, 4096), vec![b'y'; 4096]);
    assert_eq!(read_file_at(&img, size - 8192, 8192), vec![b'z'; 8192]);
    assert_eq!(allocated_bytes(&img), 12 * KIB);
}
