//! The image file: positional reads and writes, durability, holes and extents.
//! Knows nothing of NBD.

mod device;
mod lock;
mod map;
mod writeback;
mod zero;

pub use lock::OpenError;
pub use zero::is_zero;

use crate::sys;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// Granularity of hole detection: zero blocks of this size that land on a hole
/// are not written.
pub const BLOCK: u64 = 4096;

/// Largest single zero-filling write when a range must be zeroed by writing.
const ZERO_CHUNK: usize = 1 << 20;

/// Where a read's data came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// All of it was in memory (the page cache, or a file system in memory).
    Memory,
    /// Some of it had to be read from the device.
    Device,
    /// The file system cannot tell (`RWF_NOWAIT` is not supported).
    Unknown,
}

/// One run of the file with the same allocation status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Not allocated; reads as zeroes.
    pub hole: bool,
}

/// How [`Storage::zero`] may make a range read as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// Deallocate (punch a hole) if possible.
    MayTrim,
    /// Keep the range allocated.
    NoHole,
}

#[derive(Debug, thiserror::Error)]
pub enum ZeroError {
    /// Only a slow method (writing zeroes) would work, and a fast one was required.
    #[error("zeroing this range would not be fast")]
    NotFast,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// An open image file (or block device) of fixed size.
#[derive(Debug)]
pub struct Storage {
    file: File,
    size: u64,
    writable: bool,
    /// A block device's logical block size; `None` for a file.
    sector: Option<u32>,
    /// `SEEK_HOLE` costs little (not tmpfs, where it walks every page).
    cheap_seek_hole: bool,
    /// The file lives in memory: reads never wait for a device.
    in_memory: bool,
    /// Reads can ask the page cache alone first (`RWF_NOWAIT`); cleared
    /// the first time the file system refuses.
    nowait: AtomicBool,
    /// The page cache can be asked what it holds (`cachestat(2)`); cleared
    /// the first time the kernel refuses.
    cachestat: AtomicBool,
    /// Starts the writeback of sequential runs early (not for a file in memory).
    behind: Option<writeback::WriteBehind>,
}

impl Storage {
    /// Opens an existing file or block device; its current size is the
    /// export size. Character devices, FIFOs, directories and empty block
    /// devices are refused. Takes the image lock (qemu's scheme: read-only
    /// users share the image, a writer excludes other writers); a
    /// conflicting holder is [`OpenError::Locked`].
    pub fn open(path: &Path, read_only: bool) -> Result<Storage, OpenError> {
        let mut file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        let ft = meta.file_type();
        let (size, sector) = if ft.is_file() {
            (meta.len(), None)
        } else if ft.is_block_device() {
            let size = match sys::block_device_size(file.as_fd()) {
                Ok(n) => n,
                Err(_) => file.seek(SeekFrom::End(0))?,
            };
            if size == 0 {
                return Err(OpenError::NotServable(
                    "it is a block device of size 0 (an unattached loop device?)",
                ));
            }
            (
                size,
                Some(sys::block_device_sector(file.as_fd()).unwrap_or(512)),
            )
        } else if ft.is_dir() {
            return Err(OpenError::NotServable("it is a directory"));
        } else {
            return Err(OpenError::NotServable(
                "it is not a regular file or a block device (a character device such as \
                 /dev/zero, a FIFO or a socket cannot be served)",
            ));
        };
        lock::lock(&file, read_only)?;
        let in_memory = sys::in_memory_fs(file.as_fd());
        Ok(Storage {
            cheap_seek_hole: !sys::on_tmpfs(file.as_fd()),
            in_memory,
            nowait: AtomicBool::new(true),
            cachestat: AtomicBool::new(true),
            behind: (!in_memory).then(writeback::WriteBehind::default),
            file,
            size,
            writable: !read_only,
            sector,
        })
    }

    /// The smallest block clients should address: a block device's logical
    /// block size, 1 for a file.
    pub fn min_block(&self) -> u32 {
        self.sector.unwrap_or(1)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn writable(&self) -> bool {
        self.writable
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Fills `buf` from `offset`; bytes past the end of the file read as zeroes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_from_file(buf, offset).map(|_| ())
    }

    /// As [`read_at`](Self::read_at), telling where the data came from:
    /// the page cache is asked first (`RWF_NOWAIT`), and only what it does
    /// not hold is read with a wait. A server uses this to tell slow
    /// storage from a busy CPU (both make a read take long).
    pub fn read_fetch(&self, buf: &mut [u8], offset: u64) -> io::Result<Fetch> {
        if self.in_memory {
            self.read_at(buf, offset)?;
            return Ok(Fetch::Memory);
        }
        if self.nowait.load(Relaxed) && !buf.is_empty() {
            loop {
                match sys::pread_nowait(self.fd(), buf, offset) {
                    Ok(n) if n == buf.len() => return Ok(Fetch::Memory),
                    Ok(n) => {
                        // The end of the file, or the rest is not cached.
                        let waited = self.read_from_file(&mut buf[n..], offset + n as u64)?;
                        return Ok(if waited > 0 {
                            Fetch::Device
                        } else {
                            Fetch::Memory
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.read_at(buf, offset)?;
                        return Ok(Fetch::Device);
                    }
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                        self.nowait.store(false, Relaxed);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.read_at(buf, offset)?;
        Ok(Fetch::Unknown)
    }

    /// Where a read of `[offset, offset + len)` would find its data, asked
    /// of the page cache without reading (`cachestat(2)`): for data sent
    /// straight from the page cache, which [`read_fetch`](Self::read_fetch)
    /// cannot watch. `Unknown` where the kernel cannot tell.
    pub fn residency(&self, offset: u64, len: u64) -> Fetch {
        if self.in_memory {
            return Fetch::Memory;
        }
        // Past the end of the image there is nothing to fetch.
        let end = offset.saturating_add(len).min(self.size);
        if end <= offset {
            return Fetch::Memory;
        }
        if !self.cachestat.load(Relaxed) {
            return Fetch::Unknown;
        }
        let page = sys::page_size();
        let pages = (end - 1) / page - offset / page + 1;
        match sys::cachestat(self.fd(), offset, end - offset).map(|c| c.cached) {
            Ok(n) if n >= pages => Fetch::Memory,
            Ok(_) => Fetch::Device,
            Err(_) => {
                self.cachestat.store(false, Relaxed);
                Fetch::Unknown
            }
        }
    }

    /// Fills `buf` from `offset`, zeroes past the end of the file; returns
    /// how many bytes came from the file.
    fn read_from_file(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(done);
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// The file lives in memory (tmpfs and the like): nothing waits for a device.
    pub fn in_memory(&self) -> bool {
        self.in_memory
    }

    /// Writes `buf` at `offset`; with `durable`, returns only once it is on stable storage.
    pub fn write_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        if !durable {
            return self.file.write_all_at(buf, offset);
        }
        let mut done = 0;
        while done < buf.len() {
            match sys::pwrite_dsync(self.fd(), &buf[done..], offset + done as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.file.write_all_at(&buf[done..], offset + done as u64)?;
                    return self.sync();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Like [`write_at`](Self::write_at), but 4 KiB-aligned blocks of zeroes that
    /// land on a hole are skipped, so the hole stays a hole.
    pub fn write_sparse_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        self.write_sparse(buf, offset, durable)?;
        if let (Some(b), false) = (&self.behind, durable) {
            b.wrote(&self.file, offset, buf.len() as u64);
        }
        Ok(())
    }

    fn write_sparse(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let first = offset.div_ceil(BLOCK) * BLOCK;
        if first >= end || end - first < BLOCK {
            return self.write_at(buf, offset, durable);
        }
        // Split into [pending data run] and [zero runs], checking each zero run for holes.
        let mut run_start = offset; // start of the bytes not yet written
        let mut pos = first;
        while pos + BLOCK <= end {
            let s = (pos - offset) as usize;
            if !is_zero(&buf[s..s + BLOCK as usize]) {
                pos += BLOCK;
                continue;
            }
            // A run of zero blocks starting at pos.
            let zstart = pos;
            let mut zend = pos + BLOCK;
            while zend + BLOCK <= end {
                let s = (zend - offset) as usize;
                if !is_zero(&buf[s..s + BLOCK as usize]) {
                    break;
                }
                zend += BLOCK;
            }
            if self.is_hole(zstart, zend - zstart)? {
                if zstart > run_start {
                    let a = (run_start - offset) as usize;
                    let b = (zstart - offset) as usize;
                    self.write_at(&buf[a..b], run_start, durable)?;
                }
                run_start = zend;
            }
            pos = zend;
        }
        if run_start < end {
            let a = (run_start - offset) as usize;
            self.write_at(&buf[a..], run_start, durable)?;
        }
        Ok(())
    }

    /// Makes every completed write durable (`fdatasync`).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Whether `[offset, offset + len)` lies entirely in a hole.
    pub fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        match sys::seek_data(self.fd(), offset) {
            Ok(None) => Ok(true),
            Ok(Some(d)) => Ok(d >= offset + len),
            // No SEEK_DATA support: everything counts as data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Length of the hole at the start of `[offset, offset + len)` (0 when data
    /// starts there). One `SEEK_DATA`, which stays cheap on every file system;
    /// unlike `SEEK_HOLE`, which on tmpfs walks every page up to the next hole.
    pub fn leading_hole(&self, offset: u64, len: u64) -> io::Result<u64> {
        match sys::seek_data(self.fd(), offset) {
            Ok(None) => Ok(len),
            Ok(Some(d)) => Ok(d.saturating_sub(offset).min(len)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Deallocates the range; in a file it then reads as zeroes, on a block
    /// device its contents are undefined. Unsupported → `Unsupported` error.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if let Some(sector) = self.sector {
            return self.discard_device(offset, len, sector);
        }
        sys::fallocate(self.fd(), sys::FALLOC_PUNCH_HOLE, offset, len).map_err(unsupported)
    }

    /// Makes the range read as zeroes. With `fast_only`, fails with
    /// [`ZeroError::NotFast`] instead of writing zeroes.
    pub fn zero(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        fast_only: bool,
    ) -> Result<(), ZeroError> {
        if len == 0 {
            return Ok(());
        }
        if let Some(sector) = self.sector {
            return self.zero_device(offset, len, mode, fast_only, sector);
        }
        let fast = match mode {
            ZeroMode::MayTrim => self.punch_hole(offset, len),
            ZeroMode::NoHole => sys::fallocate(self.fd(), sys::FALLOC_ZERO_RANGE, offset, len)
                .map_err(unsupported)
                .or_else(|e| {
                    if e.kind() != io::ErrorKind::Unsupported {
                        return Err(e);
                    }
                    self.punch_hole(offset, len)?;
                    sys::fallocate(self.fd(), sys::FALLOC_ALLOCATE, offset, len)
                        .map_err(unsupported)
                }),
        };
        match fast {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                if fast_only {
                    return Err(ZeroError::NotFast);
                }
                self.write_zeroes(offset, len).map_err(ZeroError::Io)
            }
            Err(e) => Err(ZeroError::Io(e)),
        }
    }

    /// Makes the range read as zeroes by writing zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = ((end - pos) as usize).min(zeros.len());
            self.file.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Hints that the range will be read soon.
    pub fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        sys::fadvise_willneed(self.fd(), offset, len)
    }
}

fn unsupported(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => io::ErrorKind::Unsupported.into(),
        _ => e,
    }
}

#[cfg(test)]
mod tests;
