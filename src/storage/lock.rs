//! The image lock, in qemu's own scheme (`file-posix`), so flexnbd, qemu,
//! qemu-nbd and qemu-img see each other: shared open-file-description locks
//! on single bytes, byte `100 + p` for each permission `p` held and byte
//! `200 + p` for each permission not shared with others. A server with
//! write access holds read and write and shares neither write nor resize, so
//! a second writer (or a reader that needs a stable image) is refused,
//! while `qemu-img -U` may still read; a read-only server holds read and
//! does not share write, so read-only servers share an image and keep
//! writers out. On a conflict the holder is looked up in `/proc/*/fdinfo`,
//! which lists each descriptor's locks.

use crate::sys::{self, LockKind};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

/// Lock byte of a permission that is held.
const PERM_BASE: u64 = 100;
/// Lock byte of a permission that is not shared.
const SHARED_BASE: u64 = 200;

/// qemu's permission bits, by their lock byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    Read = 0,
    Write = 1,
    WriteUnchanged = 2,
    Resize = 3,
}

impl Perm {
    const ALL: [Perm; 4] = [Perm::Read, Perm::Write, Perm::WriteUnchanged, Perm::Resize];

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Permissions held and not shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Access {
    hold: u8,
    unshare: u8,
}

impl Access {
    fn for_use(read_only: bool) -> Access {
        let unshare = Perm::Write.bit() | Perm::Resize.bit();
        match read_only {
            true => Access {
                hold: Perm::Read.bit(),
                unshare,
            },
            false => Access {
                hold: Perm::Read.bit() | Perm::Write.bit(),
                unshare,
            },
        }
    }
}

/// What another holder has that conflicts with this use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// It holds a permission this use does not share.
    Holds(Perm),
    /// It does not share a permission this use needs.
    Unshares(Perm),
}

impl Conflict {
    fn byte(self) -> u64 {
        match self {
            Conflict::Holds(p) => PERM_BASE + p as u64,
            Conflict::Unshares(p) => SHARED_BASE + p as u64,
        }
    }
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = |p: Perm| match p {
            Perm::Read => "read",
            Perm::Write | Perm::WriteUnchanged => "write",
            Perm::Resize => "resize",
        };
        match self {
            Conflict::Holds(Perm::Write) => f.write_str("is writing to it"),
            Conflict::Holds(p) => write!(f, "may {} it", what(*p)),
            Conflict::Unshares(p) => write!(f, "does not let others {} it", what(*p)),
        }
    }
}

/// Why an image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    NotServable(&'static str),
    #[error("it is in use by {}, which {conflict}", holder_name(*.holder))]
    Locked {
        /// The holder's process id, when it can be known.
        holder: Option<u32>,
        conflict: Conflict,
    },
}

fn holder_name(pid: Option<u32>) -> String {
    match pid {
        Some(p) => format!("another process (pid {p})"),
        None => "another process".into(),
    }
}

/// Takes the locks for read-only or read-write use of `file` and checks that
/// nobody else's conflict; fails at once if someone's do. The locks last as
/// long as `file` is open.
pub fn lock(file: &File, read_only: bool) -> Result<(), OpenError> {
    let r = try_lock(file, Access::for_use(read_only));
    if r.is_err() {
        // Leave nothing behind for a file that stays open.
        let _ = sys::ofd_unlock(file.as_fd(), PERM_BASE, SHARED_BASE + 64 - PERM_BASE);
    }
    r
}

fn try_lock(file: &File, access: Access) -> Result<(), OpenError> {
    let fd = file.as_fd();
    let apply = || -> io::Result<()> {
        for p in Perm::ALL {
            if access.hold & p.bit() != 0 {
                sys::ofd_lock(fd, LockKind::Shared, PERM_BASE + p as u64, 1)?;
            }
            if access.unshare & p.bit() != 0 {
                sys::ofd_lock(fd, LockKind::Shared, SHARED_BASE + p as u64, 1)?;
            }
        }
        Ok(())
    };
    match apply() {
        Ok(()) => {}
        // A file system without locks (some network ones): serve unlocked.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOLCK) | Some(libc::EINVAL)) => {
            warn!("cannot lock the image ({e}); serving it without a lock");
            return Ok(());
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
            // Someone holds an exclusive lock on a byte: nothing qemu-like does.
            return Err(OpenError::Locked {
                holder: holder_of(file, None),
                conflict: Conflict::Unshares(Perm::Read),
            });
        }
        Err(e) => return Err(e.into()),
    }
    // Someone using what this use does not share, then someone not sharing
    // what this use needs.
    let holds = Perm::ALL
        .iter()
        .filter(|p| access.unshare & p.bit() != 0)
        .map(|&p| Conflict::Holds(p));
    let unshares = Perm::ALL
        .iter()
        .filter(|p| access.hold & p.bit() != 0)
        .map(|&p| Conflict::Unshares(p));
    for conflict in holds.chain(unshares) {
        if sys::ofd_conflicts(fd, LockKind::Exclusive, conflict.byte(), 1)? {
            return Err(OpenError::Locked {
                holder: holder_of(file, Some(conflict.byte())),
                conflict,
            });
        }
    }
    Ok(())
}

/// Most descriptor entries looked at when searching for the holder.
const SCAN_LIMIT: usize = 200_000;

/// The process (other than this one) with a lock on `file` (covering byte
/// `at`, when given), from the `lock:` lines of `/proc/PID/fdinfo/FD`:
/// `lock: N: OFDLCK ADVISORY READ PID MAJ:MIN:INODE START END`, device
/// numbers in hex.
fn holder_of(file: &File, at: Option<u64>) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let key = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let covers = |line: &str| {
        let w: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = w.iter().position(|x| *x == key) else {
            return false;
        };
        let Some(at) = at else { return true };
        let start = w.get(i + 1).and_then(|s| s.parse::<u64>().ok());
        let end = w.get(i + 2).map(|s| s.parse::<u64>().unwrap_or(u64::MAX));
        matches!((start, end), (Some(s), Some(e)) if s <= at && at <= e)
    };
    let me = std::process::id();
    let mut seen = 0usize;
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            seen += 1;
            if seen > SCAN_LIMIT {
                return None;
            }
            let Ok(text) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            if text.lines().filter(|l| l.starts_with("lock:")).any(covers) {
                return Some(pid);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(p: &std::path::Path) -> File {
        OpenOptions::new().read(true).write(true).open(p).unwrap()
    }

    #[test]
    fn writers_exclude_everyone_readers_share() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let a = open(f.path());
        lock(&a, false).unwrap();
        let b = open(f.path());
        let e = lock(&b, false).unwrap_err();
        assert!(
            matches!(
                e,
                OpenError::Locked {
                    conflict: Conflict::Holds(Perm::Write),
                    ..
                }
            ),
            "{e}"
        );
        let c = open(f.path());
        let e = lock(&c, true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "it is in use by another process, which is writing to it"
        );
        drop((a, b, c));
        let r1 = open(f.path());
        lock(&r1, true).unwrap();
        let r2 = open(f.path());
        lock(&r2, true).unwrap();
        let w = open(f.path());
        let e = lock(&w, false).unwrap_err();
        assert!(
            e.to_string().contains("does not let others write it"),
            "{e}"
        );
        drop((r1, r2));
        // The failed attempts hold nothing: `w` can lock now.
        lock(&w, false).unwrap();
        drop(w);
        lock(&open(f.path()), false).unwrap();
    }
}
