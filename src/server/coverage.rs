//! Which byte ranges a connection has written: an incoming migration counts
//! as complete only when its sender wrote every byte of the image.

use std::collections::BTreeMap;

/// A set of disjoint, merged byte ranges.
#[derive(Debug, Default, Clone)]
pub struct Coverage {
    /// start -> end (exclusive); ranges never touch or overlap.
    ranges: BTreeMap<u64, u64>,
}

impl Coverage {
    pub fn add(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut start = off;
        let mut end = off.saturating_add(len);
        // Merge with a range starting at or before `start` that reaches it.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.ranges.remove(&s);
            }
        }
        // Swallow ranges starting inside [start, end].
        while let Some((&s, &e)) = self.ranges.range(start..=end).next() {
            end = end.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(start, end);
    }

    /// Number of disjoint ranges.
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }

    /// Whether `[0, size)` is covered.
    pub fn covers(&self, size: u64) -> bool {
        size == 0 || self.ranges.get(&0).is_some_and(|&e| e >= size)
    }

    /// Bytes of `[0, size)` not covered.
    pub fn missing(&self, size: u64) -> u64 {
        let covered: u64 = self
            .ranges
            .iter()
            .map(|(&s, &e)| e.min(size).saturating_sub(s.min(size)))
            .sum();
        size - covered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn merges() {
        let mut c = Coverage::default();
        c.add(10, 10);
        c.add(0, 5);
        assert!(!c.covers(20));
        assert_eq!(c.missing(20), 5);
        c.add(5, 5);
        assert!(c.covers(20));
        assert!(!c.covers(21));
        assert!(Coverage::default().covers(0));
    }

    proptest! {
        #[test]
        fn matches_model(adds in proptest::collection::vec((0u64..200, 0u64..50), 0..40), size in 0u64..250) {
            let mut c = Coverage::default();
            let mut model = vec![false; 250];
            for &(o, l) in &adds {
                c.add(o, l);
                for b in o..(o + l).min(250) {
                    model[b as usize] = true;
                }
            }
            let missing = model[..size as usize].iter().filter(|&&x| !x).count() as u64;
            prop_assert_eq!(c.missing(size), missing);
            prop_assert_eq!(c.covers(size), missing == 0);
        }
    }
}
