//! Serving block devices, and refusing what cannot be served.
//!
//! On a block device the minimum block size advertised is the device's
//! logical block size, and TRIM and WRITE_ZEROES at any byte offset work
//! (the aligned middle by `BLKDISCARD`/`BLKZEROOUT`, the edges written as
//! zeroes). Character devices, directories and empty (unattached) loop
//! devices are refused at start with a clear error.
//!
//! The loop-device tests need root and `losetup`; where the machine has no
//! loop devices they print why and check only the refusals.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const INFO_BLOCK_SIZE: u16 = 3;

/// `losetup`, when this machine has it.
fn losetup() -> Option<PathBuf> {
    find_tool("losetup")
}

/// An attached loop device, detached on drop.
struct Loop(PathBuf);

impl Loop {
    /// Attaches `file` with this logical block size; None when this machine
    /// cannot (not root, no losetup, no loop devices).
    fn attach(file: &Path, sector: u32) -> Option<Loop> {
        let out = run(
            Command::new(losetup()?).args([
                "--find",
                "--show",
                "--sector-size",
                &sector.to_string(),
                file.to_str().unwrap(),
            ]),
            TOOL_TIMEOUT,
        );
        if !out.success() {
            eprintln!("no loop device here: {}", out.stderr_str().trim());
            return None;
        }
        Some(Loop(PathBuf::from(out.stdout_str().trim())))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(l) = losetup() {
            let _ = Command::new(l).arg("-d").arg(&self.0).status();
        }
    }
}

/// Expects `serve --file path` to exit 1 at once, with `why` in its error.
fn refused(path: &Path, why: &str) {
    let port = free_port().to_string();
    let out = flexnbd(&[
        "serve",
        "--addr",
        "127.0.0.1",
        "--port",
        &port,
        "--file",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}: {out:?}", path.display());
    let err = out.stderr_str();
    assert!(err.contains(why), "{}: {err}", path.display());
    assert!(
        err.contains(path.to_str().unwrap()),
        "names the file: {err}"
    );
}

/// Expected: /dev/null and /dev/zero (character devices) and a directory are
/// refused with an error that says why; nothing listens.
#[test]
fn character_devices_and_directories_are_refused() {
    refused(Path::new("/dev/null"), "character device");
    refused(Path::new("/dev/zero"), "character device");
    let dir = tempdir();
    refused(dir.path(), "directory");
}

/// Expected: an unattached loop device (size 0) is refused.
#[test]
fn an_unattached_loop_device_is_refused() {
    let Some(l) = losetup() else {
        eprintln!("SKIPPED: no losetup here");
        return;
    };
    let out = run(Command::new(l).arg("--find"), TOOL_TIMEOUT);
    let dev = out.stdout_str().trim().to_string();
    if !out.success() || !Path::new(&dev).exists() {
        eprintln!(
            "SKIPPED: no free loop device here: {}",
            out.stderr_str().trim()
        );
        return;
    }
    refused(Path::new(&dev), "size 0");
}

/// The minimum block size the server advertises (NBD_INFO_BLOCK_SIZE).
fn min_block(c: &mut Raw) -> u32 {
    let reps = c.opt(OPT_GO, &go_data(&[INFO_BLOCK_SIZE]));
    assert_eq!(reps.last().unwrap().kind, REP_ACK, "{reps:?}");
    let bs = reps
        .iter()
        .find(|r| r.kind == REP_INFO && be16(&r.data, 0) == INFO_BLOCK_SIZE)
        .expect("NBD_INFO_BLOCK_SIZE");
    be32(&bs.data, 2)
}

/// Checks `got` against the model: WRITE_ZEROES ranges are zero and the rest
/// is intact; a trimmed byte may read as before or as zero (TRIM is advice:
/// the aligned part is discarded, which a loop device turns into a hole,
/// while the edges keep their data).
fn check(got: &[u8], model: &[u8], trimmed: &[bool], base: usize, what: &str) {
    assert_eq!(got.len(), model.len(), "{what}: length");
    for (i, (&g, &m)) in got.iter().zip(model).enumerate() {
        let ok = g == m || (trimmed[base + i] && g == 0);
        assert!(ok, "{what}: byte {} is {g}, expected {m}", base + i);
    }
}

/// Expected: on loop devices of 512- and 4096-byte sectors, the advertised
/// minimum block is the sector size, the export size is the device's, and
/// TRIM and WRITE_ZEROES (with and without NO_HOLE) at unaligned offsets and
/// lengths succeed; WRITE_ZEROES leaves exactly its range zero and nothing
/// else changes, read back through the server and from the device itself.
#[test]
fn unaligned_trim_and_zeroes_on_block_devices() {
    const SIZE: u64 = 8 * MIB;
    for sector in [512u32, 4096] {
        let dir = tempdir();
        let backing = dir.path().join("backing");
        create_random_file(&backing, SIZE, 0xb10c + sector as u64);
        let Some(dev) = Loop::attach(&backing, sector) else {
            eprintln!("SKIPPED: block device serving (needs root and loop devices)");
            return;
        };
        let mut model = read_file(&backing);
        let mut trimmed = vec![false; SIZE as usize];
        let srv = Serve::tcp(&dev.0).start();
        let mut c = Raw::handshake(srv.addr());
        assert_eq!(min_block(&mut c), sector, "advertised minimum block");
        drop(c);
        let mut c = Raw::handshake(srv.addr());
        let (size, _flags) = c.go();
        assert_eq!(size, SIZE, "export size from BLKGETSIZE64");
        let ops: [(u16, u16, u64, u32); 6] = [
            (CMD_TRIM, 0, 100, 1000),
            (CMD_TRIM, 0, MIB - 7, 3 * 4096 + 11),
            (CMD_WRITE_ZEROES, 0, 2 * MIB + 1, 70_000),
            (CMD_WRITE_ZEROES, 2, 3 * MIB + 4095, 2), // NO_HOLE
            (CMD_WRITE_ZEROES, 0, 4 * MIB, 512 * 1024 + 1),
            (CMD_TRIM, 0, SIZE - 1234, 1234),
        ];
        for (i, (cmd, flags, off, len)) in ops.into_iter().enumerate() {
            c.req(cmd, flags, i as u64 + 10, off, len);
            assert_eq!(
                c.simple_reply(i as u64 + 10),
                0,
                "sector {sector}: cmd {cmd} at {off}+{len}"
            );
            let r = off as usize..(off + len as u64) as usize;
            if cmd == CMD_TRIM {
                trimmed[r].fill(true);
            } else {
                model[r].fill(0);
            }
        }
        // Data around the zeroed ranges is intact, through the server ...
        for off in (0..SIZE).step_by(MIB as usize) {
            let got = c.read(100 + off / MIB, off, MIB as u32);
            let o = off as usize;
            check(
                &got,
                &model[o..o + MIB as usize],
                &trimmed,
                o,
                &format!("sector {sector}: MiB at {off} via the server"),
            );
        }
        // ... and on the device itself.
        c.req(CMD_FLUSH, 0, 999, 0, 0);
        assert_eq!(c.simple_reply(999), 0);
        check(
            &read_file(&dev.0),
            &model,
            &trimmed,
            0,
            &format!("sector {sector}: the device"),
        );
        drop(c);
        drop(srv);
    }
}
