//! Block devices: TRIM as `BLKDISCARD` and WRITE_ZEROES as `BLKZEROOUT`
//! (or a fast `fallocate`) on the part of a range aligned to the logical
//! block size, the unaligned edges written as zeroes, so requests need not
//! be aligned (the minimum block size a device is advertised with is its
//! logical block size, but clients may send less).

use super::{unsupported, Storage, ZeroError, ZeroMode};
use crate::sys::{self, BlockOp};
use std::io;

/// `[offset, offset + len)` split at `sector` boundaries: the unaligned head,
/// the aligned middle and the unaligned tail (any may be empty).
pub(super) fn split(offset: u64, len: u64, sector: u64) -> [(u64, u64); 3] {
    let end = offset + len;
    let mid_start = offset.div_ceil(sector) * sector;
    let mid_end = end / sector * sector;
    if mid_start >= mid_end {
        return [(offset, len), (mid_start.min(end), 0), (end, 0)];
    }
    [
        (offset, mid_start - offset),
        (mid_start, mid_end - mid_start),
        (mid_end, end - mid_end),
    ]
}

impl Storage {
    /// TRIM on a block device: discards the aligned part (the edges keep
    /// their data, which TRIM allows).
    pub(super) fn discard_device(&self, offset: u64, len: u64, sector: u32) -> io::Result<()> {
        let [_, (mo, ml), _] = split(offset, len, sector as u64);
        if ml == 0 {
            return Ok(());
        }
        sys::block_device_range(self.fd(), BlockOp::Discard, mo, ml).map_err(unsupported)
    }

    /// WRITE_ZEROES on a block device.
    pub(super) fn zero_device(
        &self,
        offset: u64,
        len: u64,
        mode: ZeroMode,
        fast_only: bool,
        sector: u32,
    ) -> Result<(), ZeroError> {
        let [head, (mo, ml), tail] = split(offset, len, sector as u64);
        if ml > 0 {
            if fast_only {
                // Only what the device does without writing zeroes itself.
                let how = match mode {
                    ZeroMode::MayTrim => sys::FALLOC_PUNCH_HOLE,
                    ZeroMode::NoHole => sys::FALLOC_ZERO_RANGE,
                };
                match sys::fallocate(self.fd(), how, mo, ml).map_err(unsupported) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                        return Err(ZeroError::NotFast)
                    }
                    Err(e) => return Err(e.into()),
                }
            } else {
                sys::block_device_range(self.fd(), BlockOp::ZeroOut, mo, ml)?;
            }
        }
        for (o, l) in [head, tail] {
            if l > 0 {
                self.write_zeroes(o, l)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn splits_at_sector_boundaries() {
        assert_eq!(split(0, 4096, 512), [(0, 0), (0, 4096), (4096, 0)]);
        assert_eq!(split(100, 1000, 512), [(100, 412), (512, 512), (1024, 76)]);
        assert_eq!(split(100, 200, 512), [(100, 200), (300, 0), (300, 0)]);
        assert_eq!(split(512, 100, 512), [(512, 100), (512, 0), (612, 0)]);
        assert_eq!(split(1000, 24, 512), [(1000, 24), (1024, 0), (1024, 0)]);
        for (o, l) in [(0u64, 1u64), (511, 2), (7, 9999), (4096, 8192)] {
            let parts = split(o, l, 512);
            let total: u64 = parts.iter().map(|p| p.1).sum();
            assert_eq!(total, l, "{o} {l}");
            let mid = parts[1];
            assert!(mid.1 == 0 || (mid.0.is_multiple_of(512) && mid.1.is_multiple_of(512)));
        }
    }
}
