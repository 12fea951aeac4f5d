//! Where an image holds data and where holes: extents for BLOCK_STATUS and
//! the migration's sweep ([`Storage::extents`], exact, from `SEEK_DATA` and
//! `SEEK_HOLE`), and the data/hole layout of a read ([`Storage::data_map`]),
//! which must stay cheap on tmpfs, where `SEEK_HOLE` walks every page up to
//! the next hole: there the end of a data run is found by probing with
//! `SEEK_DATA` (cheap on data) every [`PROBE`] bytes and bisecting to the
//! page where a hole starts. A hole shorter than the probe step between
//! two probes that both land on data is reported as data (which reads as
//! the zeroes it holds).

use super::{Extent, Storage};
use crate::sys;
use std::io;

/// Probe step of [`Storage::data_map`] where `SEEK_HOLE` is dear.
pub const PROBE: u64 = 64 * 1024;
/// Hole granularity (a page).
const PAGE: u64 = 4096;

/// Where data starts at or after `pos` (`None`: no more data; a file system
/// without `SEEK_DATA` counts as all data).
fn next_data(s: &Storage, pos: u64) -> io::Result<Option<u64>> {
    match sys::seek_data(s.fd(), pos) {
        Ok(d) => Ok(d),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Some(pos)),
        Err(e) => Err(e),
    }
}

/// Appends a run, merging it with the previous one of the same kind.
fn push(out: &mut Vec<Extent>, len: u64, hole: bool) {
    if len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.hole == hole => last.len += len,
        _ => out.push(Extent { len, hole }),
    }
}

impl Storage {
    /// Allocation extents covering `[offset, offset + len)` (clipped to the file),
    /// at most `max` of them; the last one may stop short of the end.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let data = match sys::seek_data(self.fd(), pos) {
                Ok(d) => d,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Some(pos),
                Err(e) => return Err(e),
            };
            let (hole, next) = match data {
                None => (true, end),
                Some(d) if d > pos => (true, d.min(end)),
                Some(_) => {
                    let h = match sys::seek_hole(self.fd(), pos) {
                        Ok(h) => h.unwrap_or(end),
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => end,
                        Err(e) => return Err(e),
                    };
                    (false, h.clamp(pos + 1, end))
                }
            };
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len += next - pos,
                _ => out.push(Extent {
                    len: next - pos,
                    hole,
                }),
            }
            pos = next;
        }
        Ok(out)
    }

    /// The data and hole runs of `[offset, offset + len)` (clipped to the
    /// file), at most `max` of them, the last one reaching the end: the
    /// layout of a structured read. Exact where `SEEK_HOLE` is cheap; on
    /// tmpfs, by probing (see the module notes).
    pub fn data_map(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out = if self.cheap_seek_hole {
            self.extents(offset, end - offset.min(end), max)?
        } else {
            self.probe_map(offset, end, max)?
        };
        // The last run reaches the end.
        let covered: u64 = out.iter().map(|e| e.len).sum();
        let total = end.saturating_sub(offset);
        if covered < total {
            push(&mut out, total - covered, false);
        }
        Ok(out)
    }

    fn probe_map(&self, offset: u64, end: u64, max: usize) -> io::Result<Vec<Extent>> {
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let d = next_data(self, pos)?.unwrap_or(end).min(end);
            if d > pos {
                push(&mut out, d - pos, true);
                pos = d;
                continue;
            }
            // `pos` is in data: probe ahead for the first hole.
            let mut known = pos;
            let data_end = loop {
                let next = (known - known % PROBE + PROBE).min(end);
                if next >= end {
                    break end;
                }
                if next_data(self, next)? == Some(next) {
                    known = next;
                    continue;
                }
                // A hole starts somewhere in (known, next]: bisect by pages
                // (holes are whole pages; the page holding `known` is data).
                let (mut lo, mut hi) = (known / PAGE * PAGE, next);
                while hi - lo > PAGE {
                    let mid = (lo + (hi - lo) / 2) / PAGE * PAGE;
                    if next_data(self, mid)? == Some(mid) {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                break hi.clamp(pos + 1, end);
            };
            push(&mut out, data_end - pos, false);
            pos = data_end;
        }
        Ok(out)
    }
}
