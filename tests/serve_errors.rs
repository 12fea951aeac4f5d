//! Error replies of `flexnbd serve` as libnbd sees them, through scripts run
//! in nbdsh: each refused request gets the exact errno, the image is
//! untouched, and the same connection keeps working afterwards.
//!
//! libnbd runs with `set_strict_mode(0)` so that bad requests reach the server;
//! a failure counts only if libnbd says "command failed" (a server reply).
//!
//! Not covered: FAST_ZERO → ENOTSUP. The server answers ENOTSUP only when the
//! file system can neither punch holes nor zero ranges (e.g. some network or
//! FUSE file systems); ext4, xfs, btrfs and tmpfs all can, and building such a
//! file system needs root and mounts, so no honest case can be made here.
//! FAST_ZERO is checked to succeed (and zero) in serve_clients.rs instead.

mod common;

use common::*;
use serde_json::Value;

const SIZE: u64 = 4 * MIB;

/// Runs `cases` (python calling `case(name, fn, *args)`) against a fresh
/// server started with `extra`; every case records the server's errno and
/// whether a read on the same connection still returns the right bytes.
fn run_cases(extra: &[&str], structured: bool, cases: &str) -> Value {
    let dir = tempdir();
    let img = dir.path().join("img");
    create_random_file(&img, SIZE, 0xe77);
    let original = read_file(&img);
    let mut srv = Serve::tcp(&img).args(extra).start();
    let script = format!(
        r#"
uri, path = sys.argv[1], sys.argv[2]
S = {SIZE}
h = nbd.NBD()
h.set_request_structured_replies({sr})
if {sr}:
    h.add_meta_context("base:allocation")
h.set_strict_mode(0)
h.connect_uri(uri)
res = {{"structured": h.get_structured_replies_negotiated()}}
def extent_cb(meta, off, entries, err):
    return 0
def chunk_cb(sub, off, status, err):
    return 0
def alive():
    return h.pread(4096, 8192) == file_bytes(path, 8192, 4096)
def case(name, f, *a):
    res[name] = server_err(f, *a)
    res[name + "/alive"] = alive()
{cases}
out(res)
"#,
        sr = if structured { "True" } else { "False" },
    );
    let r = nbdsh_json(
        &script,
        &[srv.uri(), img.display().to_string()],
        TOOL_TIMEOUT,
    );
    assert_eq!(
        r["structured"], structured,
        "structured replies negotiated: {r}"
    );
    srv.assert_alive();
    srv.stop();
    // Every case was refused: not one byte of the image may have changed.
    assert_bytes_eq(&read_file(&img), &original, "image after refused requests");
    r
}

/// Asserts each case got `errno` and the connection was fine afterwards.
#[track_caller]
fn expect(r: &Value, cases: &[(&str, u32)]) {
    for (name, errno) in cases {
        assert_eq!(
            r[*name].as_i64(),
            Some(*errno as i64),
            "{name}: expected errno {errno}, got {} (-1 = refused by libnbd itself); all: {r}",
            r[*name]
        );
        assert_eq!(
            r[format!("{name}/alive")],
            true,
            "{name}: connection broken afterwards"
        );
    }
}

const BOUNDS: &str = r#"
case("read_past_end", h.pread, 4096, S - 2048)
case("read_beyond_end", h.pread, 512, S + 4096)
case("read_offset_wraps", h.pread, 4096, (1 << 64) - 2048)
case("write_past_end", h.pwrite, b"\xee" * 4096, S - 2048)
case("write_beyond_end", h.pwrite, b"\xee" * 512, S + 4096)
case("write_offset_wraps", h.pwrite, b"\xee" * 4096, (1 << 64) - 2048)
"#;

#[test]
fn out_of_range_requests_get_einval_or_enospc() {
    let cases = format!(
        r#"{BOUNDS}
case("zero_past_end", h.zero, 4096, S - 2048)
case("trim_past_end", h.trim, 4096, S - 2048)
case("cache_past_end", h.cache, 4096, S - 2048)
case("block_status_past_end", h.block_status, 4096, S - 512, extent_cb)
case("block_status_beyond_end", h.block_status, 512, S + 512, extent_cb)
"#
    );
    let r = run_cases(&[], true, &cases);
    expect(
        &r,
        &[
            ("read_past_end", EINVAL),
            ("read_beyond_end", EINVAL),
            ("read_offset_wraps", EINVAL),
            ("write_past_end", ENOSPC),
            ("write_beyond_end", ENOSPC),
            ("write_offset_wraps", ENOSPC),
            ("zero_past_end", ENOSPC),
            ("trim_past_end", EINVAL),
            ("cache_past_end", EINVAL),
            ("block_status_past_end", EINVAL),
            ("block_status_beyond_end", EINVAL),
        ],
    );
}

#[test]
fn out_of_range_requests_with_simple_replies() {
    let r = run_cases(&[], false, BOUNDS);
    expect(
        &r,
        &[
            ("read_past_end", EINVAL),
            ("read_beyond_end", EINVAL),
            ("read_offset_wraps", EINVAL),
            ("write_past_end", ENOSPC),
            ("write_beyond_end", ENOSPC),
            ("write_offset_wraps", ENOSPC),
        ],
    );
}

const FLAGS: &str = r#"
case("read_unknown_flag", h.pread, 512, 0, 0x80)
case("read_high_flag", h.pread, 512, 0, 0x8000)
case("write_unknown_flag", h.pwrite, b"\xee" * 512, 0, 0x100)
case("write_no_hole", h.pwrite, b"\xee" * 512, 0, nbd.CMD_FLAG_NO_HOLE)
case("write_df", h.pwrite, b"\xee" * 512, 0, nbd.CMD_FLAG_DF)
case("read_req_one", h.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE)
case("trim_fast_zero", h.trim, 4096, 0, nbd.CMD_FLAG_FAST_ZERO)
case("trim_no_hole", h.trim, 4096, 0, nbd.CMD_FLAG_NO_HOLE)
case("flush_unknown_flag", h.flush, 0x40)
"#;

#[test]
fn unknown_or_inapplicable_flags_get_einval() {
    let cases = format!(
        r#"{FLAGS}
case("zero_unknown_flag", h.zero, 4096, 0, 0x20)
case("block_status_df", h.block_status, 4096, 0, extent_cb, nbd.CMD_FLAG_DF)
"#
    );
    let r = run_cases(&[], true, &cases);
    let mut want: Vec<(&str, u32)> = [
        "read_unknown_flag",
        "read_high_flag",
        "write_unknown_flag",
        "write_no_hole",
        "write_df",
        "read_req_one",
        "trim_fast_zero",
        "trim_no_hole",
        "flush_unknown_flag",
        "zero_unknown_flag",
        "block_status_df",
    ]
    .iter()
    .map(|n| (*n, EINVAL))
    .collect();
    expect(&r, &want);

    // Without structured replies DF is not advertised, so it is a bad flag too.
    let r = run_cases(
        &[],
        false,
        &format!("{FLAGS}\ncase(\"read_df\", h.pread, 512, 0, nbd.CMD_FLAG_DF)\n"),
    );
    want.retain(|(n, _)| !["zero_unknown_flag", "block_status_df"].contains(n));
    want.push(("read_df", EINVAL));
    expect(&r, &want);
}

/// Expected: DF reads up to the maximum payload (32 MiB, more than this
/// 4 MiB export) are answered; without DF too.
#[test]
fn df_reads_up_to_the_maximum_payload_are_answered() {
    let r = run_cases(
        &[],
        true,
        r#"
case("df_64k", h.pread_structured, 65536, 0, chunk_cb, nbd.CMD_FLAG_DF)
case("df_2m", h.pread_structured, 2 << 20, 0, chunk_cb, nbd.CMD_FLAG_DF)
case("df_whole", h.pread_structured, S, 0, chunk_cb, nbd.CMD_FLAG_DF)
case("no_df_2m", h.pread_structured, 2 << 20, 0, chunk_cb)
"#,
    );
    expect(
        &r,
        &[
            ("df_64k", 0),
            ("df_2m", 0),
            ("df_whole", 0),
            ("no_df_2m", 0),
        ],
    );
}

#[test]
fn writes_to_a_read_only_export_get_eperm() {
    for ro in ["-r", "--read-only"] {
        let r = run_cases(
            &[ro],
            true,
            r#"
case("write", h.pwrite, b"\xee" * 4096, 0)
case("write_fua", h.pwrite, b"\xee" * 4096, 4096, nbd.CMD_FLAG_FUA)
case("trim", h.trim, 4096, 0)
case("zero", h.zero, 4096, 0)
case("zero_no_hole", h.zero, 4096, 0, nbd.CMD_FLAG_NO_HOLE)
case("flush", h.flush)
case("read", h.pread, 4096, 0)
case("cache", h.cache, 4096, 0)
"#,
        );
        expect(
            &r,
            &[
                ("write", EPERM),
                ("write_fua", EPERM),
                ("trim", EPERM),
                ("zero", EPERM),
                ("zero_no_hole", EPERM),
                ("flush", 0),
                ("read", 0),
                ("cache", 0),
            ],
        );
    }
}

#[test]
fn zero_length_requests_do_not_disconnect() {
    for structured in [true, false] {
        let r = run_cases(
            &[],
            structured,
            r#"
case("read0", h.pread, 0, 4096)
case("read0_at_end", h.pread, 0, S)
case("write0", h.pwrite, b"", 4096)
case("trim0", h.trim, 0, 4096)
case("zero0", h.zero, 0, 4096)
case("cache0", h.cache, 0, 4096)
"#,
        );
        expect(
            &r,
            &[
                ("read0", 0),
                ("read0_at_end", 0),
                ("write0", 0),
                ("trim0", 0),
                ("zero0", 0),
                ("cache0", 0),
            ],
        );
    }
}
