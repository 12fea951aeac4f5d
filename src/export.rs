//! The served image: storage plus the request gate ([`crate::gate`]), flush
//! bookkeeping and the hook through which a migration sees every change.

use crate::gate::Gate;
use crate::storage::{Extent, Fetch, OpenError, Storage, ZeroError, ZeroMode};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, RwLock};

/// Why an export operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read beyond the end of the export")]
    ReadPastEnd,
    #[error("write beyond the end of the export")]
    WritePastEnd,
    #[error("the export is read-only")]
    ReadOnly,
    #[error("zeroing this range would not be fast")]
    NotFast,
    #[error("the server is shutting down")]
    Shutdown,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl From<crate::gate::Shut> for Error {
    fn from(_: crate::gate::Shut) -> Error {
        Error::Shutdown
    }
}

/// Sees every change to the image, after it is made and before it is acknowledged.
/// A migration uses it to track dirty ranges or to forward writes.
pub trait ChangeObserver: Send + Sync {
    /// `[offset, offset + len)` changed; `data` holds the new bytes for a write,
    /// `None` when the range now reads as zeroes.
    fn changed(&self, offset: u64, len: u64, data: Option<&[u8]>);
}

/// The served image.
pub struct Export {
    storage: Storage,
    read_only: bool,
    gate: Arc<Gate>,
    /// Modifying operations completed so far.
    changes: AtomicU64,
    /// Value of `changes` known to be durable.
    synced: AtomicU64,
    sync_lock: Mutex<()>,
    observer: RwLock<Option<Arc<dyn ChangeObserver>>>,
}

impl Export {
    /// Opens the image and takes its lock (see [`Storage::open`]).
    pub fn open(path: &Path, read_only: bool) -> Result<Export, OpenError> {
        Ok(Export::new(Storage::open(path, read_only)?, read_only))
    }

    pub fn new(storage: Storage, read_only: bool) -> Export {
        Export {
            read_only: read_only || !storage.writable(),
            storage,
            gate: Arc::new(Gate::default()),
            changes: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            sync_lock: Mutex::new(()),
            observer: RwLock::new(None),
        }
    }

    pub fn size(&self) -> u64 {
        self.storage.size()
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The smallest block the image can be addressed in (a block device's
    /// logical block size; 1 for files).
    pub fn min_block(&self) -> u32 {
        self.storage.min_block()
    }

    /// The descriptor reads can be sent from with `sendfile(2)`, if the
    /// backend has one (the capability a session checks before zero-copy).
    pub fn sendfile_source(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(self.storage.fd())
    }

    /// Where data and holes are in the range, at most `max` runs; `None`
    /// when the backend cannot tell (then the whole range is data).
    pub fn data_map(&self, offset: u64, len: u64, max: usize) -> Option<Vec<Extent>> {
        self.storage.data_map(offset, len, max).ok()
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// Installs (or removes) the change observer.
    pub fn set_observer(&self, o: Option<Arc<dyn ChangeObserver>>) {
        *self.observer.write().unwrap_or_else(|p| p.into_inner()) = o;
    }

    fn observe(&self, offset: u64, len: u64, data: Option<&[u8]>) {
        let o = self.observer.read().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = o.as_ref() {
            o.changed(offset, len, data);
        }
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.size())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), Error> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if !self.in_range(offset, len) {
            return Err(Error::WritePastEnd);
        }
        Ok(())
    }

    fn changed(&self, offset: u64, len: u64, data: Option<&[u8]>) {
        self.observe(offset, len, data);
        self.changes.fetch_add(1, SeqCst);
    }

    /// Checks a read range.
    fn check_read(&self, offset: u64, len: u64) -> Result<(), Error> {
        if self.in_range(offset, len) {
            Ok(())
        } else {
            Err(Error::ReadPastEnd)
        }
    }

    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        self.check_read(offset, buf.len() as u64)?;
        Ok(self.storage.read_at(buf, offset)?)
    }

    /// As [`read`](Self::read), telling whether the data was in memory
    /// ([`Storage::read_fetch`]).
    pub fn read_fetch(&self, buf: &mut [u8], offset: u64) -> Result<Fetch, Error> {
        self.check_read(offset, buf.len() as u64)?;
        Ok(self.storage.read_fetch(buf, offset)?)
    }

    /// Whether a read of the range would wait for the device, asked without
    /// reading ([`Storage::residency`]).
    pub fn residency(&self, offset: u64, len: u64) -> Fetch {
        self.storage.residency(offset, len)
    }

    /// The image lives in memory (tmpfs and the like): no request waits for a device.
    pub fn in_memory(&self) -> bool {
        self.storage.in_memory()
    }

    /// Writes `data`; zero blocks landing on holes keep the holes. With `fua`
    /// the data is durable when this returns.
    pub fn write(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), Error> {
        self.check_write(offset, data.len() as u64)?;
        self.storage.write_sparse_at(data, offset, fua)?;
        self.changed(offset, data.len() as u64, Some(data));
        Ok(())
    }

    /// Discards the range (punches a hole); contents then read as zeroes.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), Error> {
        self.check_write(offset, len)?;
        match self.storage.punch_hole(offset, len) {
            Ok(()) => {}
            // Trim is a hint: a file system that cannot punch keeps the data.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        self.changed(offset, len, None);
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes the range read as zeroes, deallocating unless `no_hole`.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), Error> {
        self.check_write(offset, len)?;
        let mode = if no_hole {
            ZeroMode::NoHole
        } else {
            ZeroMode::MayTrim
        };
        self.storage
            .zero(offset, len, mode, fast)
            .map_err(|e| match e {
                ZeroError::NotFast => Error::NotFast,
                ZeroError::Io(e) => Error::Io(e),
            })?;
        self.changed(offset, len, None);
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes every change completed so far durable. Returns at once when
    /// nothing changed since the last flush (on any connection).
    pub fn flush(&self) -> Result<(), Error> {
        let target = self.changes.load(SeqCst);
        if self.synced.load(SeqCst) >= target {
            return Ok(());
        }
        let _g = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.synced.load(SeqCst) >= target {
            return Ok(());
        }
        let covered = self.changes.load(SeqCst);
        self.storage.sync()?;
        self.synced.fetch_max(covered, SeqCst);
        Ok(())
    }

    /// Allocation status of the range (clipped to the export), at most `max` extents.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, Error> {
        self.check_read(offset, len)?;
        Ok(self.storage.extents(offset, len, max)?)
    }

    /// Prefetch hint; failures are ignored, as the protocol allows.
    pub fn cache(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.check_read(offset, len)?;
        let _ = self.storage.prefetch(offset, len);
        Ok(())
    }
}
