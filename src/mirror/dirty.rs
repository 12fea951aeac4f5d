//! The dirty map: which blocks of the image changed since they were last sent.
//! Marked from client threads, taken by the copier; lock-free.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

/// A bitmap of fixed-size blocks over an image.
pub struct DirtyMap {
    size: u64,
    shift: u32,
    words: Box<[AtomicU64]>,
    dirty_blocks: AtomicU64,
}

/// Block size for an image: 4 KiB, larger for huge images so the map stays
/// under 32 MiB.
pub fn block_size_for(size: u64) -> u64 {
    let mut b = 4096u64;
    while size / b > (1 << 28) {
        b *= 2;
    }
    b
}

impl DirtyMap {
    pub fn new(size: u64, block: u64) -> DirtyMap {
        assert!(block.is_power_of_two());
        let blocks = size.div_ceil(block);
        let words = (0..blocks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        DirtyMap {
            size,
            shift: block.trailing_zeros(),
            words,
            dirty_blocks: AtomicU64::new(0),
        }
    }

    pub fn block_size(&self) -> u64 {
        1 << self.shift
    }

    fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block_size())
    }

    /// Block range `[first, end)` covering the byte range, clipped to the image.
    fn block_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return (0, 0);
        }
        (offset >> self.shift, ((end - 1) >> self.shift) + 1)
    }

    /// Applies `f(word, mask)` to each word touched by blocks `[first, end)`.
    fn for_words(&self, first: u64, end: u64, mut f: impl FnMut(&AtomicU64, u64)) {
        let mut b = first;
        while b < end {
            let w = (b / 64) as usize;
            let lo = b % 64;
            let hi = (end - (b - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            f(&self.words[w], mask);
            b = b - lo + hi;
        }
    }

    /// Marks the blocks covering `[offset, offset + len)` dirty.
    pub fn mark(&self, offset: u64, len: u64) {
        let (first, end) = self.block_range(offset, len);
        let mut added = 0u64;
        self.for_words(first, end, |w, mask| {
            let old = w.fetch_or(mask, SeqCst);
            added += (mask & !old).count_ones() as u64;
        });
        self.dirty_blocks.fetch_add(added, SeqCst);
    }

    /// Marks every block dirty.
    pub fn mark_all(&self) {
        self.mark(0, self.size);
    }

    /// Clears every block.
    pub fn clear_all(&self) {
        let mut removed = 0u64;
        for w in self.words.iter() {
            removed += w.swap(0, SeqCst).count_ones() as u64;
        }
        self.dirty_blocks.fetch_sub(removed, SeqCst);
    }

    /// Finds the first dirty run at or after byte `from`, clears up to
    /// `max_len` bytes of it and returns it as a byte range; `None` when
    /// nothing is dirty at or after `from`.
    pub fn take_after(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        if self.dirty_blocks.load(SeqCst) == 0 {
            return None;
        }
        let blocks = self.blocks();
        let start = (from >> self.shift).min(blocks);
        let first = self.find_set(start, blocks)?;
        let max_blocks = (max_len >> self.shift).max(1);
        let mut end = first + 1;
        while end < blocks && end - first < max_blocks && self.is_set(end) {
            end += 1;
        }
        let mut removed = 0u64;
        self.for_words(first, end, |w, mask| {
            let old = w.fetch_and(!mask, SeqCst);
            removed += (mask & old).count_ones() as u64;
        });
        self.dirty_blocks.fetch_sub(removed, SeqCst);
        if removed == 0 {
            // Taken by someone else in the meantime.
            return self.take_after(from, max_len);
        }
        let off = first << self.shift;
        let len = ((end << self.shift).min(self.size)) - off;
        Some((off, len))
    }

    fn is_set(&self, b: u64) -> bool {
        self.words[(b / 64) as usize].load(SeqCst) & (1 << (b % 64)) != 0
    }

    /// First set block in `[from, to)`.
    fn find_set(&self, from: u64, to: u64) -> Option<u64> {
        let mut b = from;
        while b < to {
            let w = self.words[(b / 64) as usize].load(SeqCst) & (u64::MAX << (b % 64));
            if w != 0 {
                let found = b - b % 64 + w.trailing_zeros() as u64;
                return (found < to).then_some(found);
            }
            b = b - b % 64 + 64;
        }
        None
    }

    /// Bytes of the image in dirty blocks (a short last block counts for
    /// what it covers), never more than the image size.
    pub fn dirty_bytes(&self) -> u64 {
        let n = self.dirty_blocks.load(SeqCst);
        if n == 0 {
            return 0;
        }
        let blocks = self.blocks();
        let tail = (blocks << self.shift) - self.size;
        let short = if blocks > 0 && self.is_set(blocks - 1) {
            tail
        } else {
            0
        };
        ((n << self.shift) - short).min(self.size)
    }

    /// Bytes of the image before `pos` in dirty blocks (a block straddling
    /// `pos` counts for its part before it). Walks the map: for status, not
    /// for the data path.
    pub fn dirty_bytes_below(&self, pos: u64) -> u64 {
        let pos = pos.min(self.size);
        let full = pos >> self.shift;
        let mut n = 0u64;
        if full > 0 {
            self.for_words(0, full, |w, mask| {
                n += (w.load(SeqCst) & mask).count_ones() as u64;
            });
        }
        let part = pos - (full << self.shift);
        let straddle = if part > 0 && self.is_set(full) {
            part
        } else {
            0
        };
        (n << self.shift) + straddle
    }

    pub fn is_clean(&self) -> bool {
        self.dirty_blocks.load(SeqCst) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mark_and_take() {
        let m = DirtyMap::new(1 << 20, 4096);
        assert!(m.take_after(0, 1 << 20).is_none());
        m.mark(5000, 10);
        assert_eq!(m.dirty_bytes(), 4096);
        assert_eq!(m.dirty_bytes_below(4096), 0);
        assert_eq!(m.dirty_bytes_below(5000), 5000 - 4096);
        assert_eq!(m.dirty_bytes_below(1 << 30), 4096);
        m.mark(4096 * 10, 4096 * 3 + 1);
        assert_eq!(m.take_after(0, 1 << 20), Some((4096, 4096)));
        assert_eq!(m.take_after(0, 8192), Some((4096 * 10, 8192)));
        assert_eq!(m.take_after(0, 1 << 20), Some((4096 * 12, 8192)));
        assert!(m.is_clean());
    }

    #[test]
    fn clips_to_size() {
        let m = DirtyMap::new(10_000, 4096);
        m.mark(0, 1);
        m.mark(9_999, 1);
        assert_eq!(m.dirty_bytes(), 4096 + 10_000 - 8192);
        assert_eq!(m.take_after(5000, 1 << 20), Some((8192, 10_000 - 8192)));
        assert_eq!(m.take_after(9000, 1 << 20), None);
        assert_eq!(m.take_after(0, 1 << 20), Some((0, 4096)));
        m.mark_all();
        assert_eq!(m.dirty_bytes(), 10_000);
        m.clear_all();
        assert!(m.is_clean());
        m.mark(20_000, 5);
        assert!(m.is_clean());
    }

    #[test]
    fn take_after_does_not_wrap() {
        let m = DirtyMap::new(1 << 20, 4096);
        m.mark(0, 1);
        assert_eq!(m.take_after(8192, 4096), None);
        assert_eq!(m.take_after(0, 4096), Some((0, 4096)));
    }

    #[test]
    fn block_size_grows_for_huge_images() {
        assert_eq!(block_size_for(1 << 30), 4096);
        assert_eq!(block_size_for(1 << 40), 4096);
        assert_eq!(block_size_for(1 << 41), 8192);
    }

    proptest! {
        /// Against a Vec<bool> model: marks then takes return exactly the marked blocks.
        #[test]
        fn matches_model(size in 1u64..300_000, marks in proptest::collection::vec((0u64..320_000, 0u64..40_000), 0..30), from in 0u64..300_000, chunk in 1u64..100_000) {
            // Takes from `from` to the end, then from 0 to the end again.
            let m = DirtyMap::new(size, 4096);
            let nblocks = size.div_ceil(4096) as usize;
            let mut model = vec![false; nblocks];
            for &(o, l) in &marks {
                m.mark(o, l);
                let end = (o + l).min(size);
                if l > 0 && o < end {
                    for b in (o / 4096)..=((end - 1) / 4096) {
                        model[b as usize] = true;
                    }
                }
            }
            let bytes_in = |end: u64| -> u64 {
                (0..end).filter(|&x| model[(x / 4096) as usize]).count() as u64
            };
            prop_assert_eq!(m.dirty_bytes(), bytes_in(size));
            let below = from.min(size);
            prop_assert_eq!(m.dirty_bytes_below(below), bytes_in(below));
            let mut seen = vec![false; nblocks];
            let mut pos = from;
            let mut restarted = false;
            loop {
                let Some((o, l)) = m.take_after(pos, chunk) else {
                    if restarted {
                        break;
                    }
                    restarted = true;
                    pos = 0;
                    continue;
                };
                prop_assert!(l > 0 && o + l <= size);
                for b in (o / 4096)..=((o + l - 1) / 4096) {
                    prop_assert!(model[b as usize], "block {} was not marked", b);
                    prop_assert!(!seen[b as usize], "block {} taken twice", b);
                    seen[b as usize] = true;
                }
                pos = o + l;
            }
            prop_assert_eq!(seen, model);
            prop_assert!(m.is_clean());
        }
    }
}
