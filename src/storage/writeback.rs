//! Write-behind: the writeback of data written in sequence is started as
//! soon as a few MiB of the run are in, by a thread of its own, so the disk
//! works while the rest arrives and a FLUSH at the end of a long copy (or a
//! migration's hand-over) has little left to write. Random writes are left
//! to the kernel's own writeback, which may coalesce rewrites of hot blocks.
//! Durability is unchanged: only FLUSH and FUA (`fdatasync`) promise it.

use crate::sys;
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Bytes of one sequential run written before its writeback is started.
pub const KICK: u64 = 8 << 20;
/// How far out of order a run's writes may complete (a few workers'
/// batches of 256 KiB of payload each).
const SLACK: u64 = 2 << 20;
/// Sequential runs followed at once (one per writer, as readahead does).
const RUNS: usize = 8;
/// Ranges waiting for the thread. Beyond this the device is far behind,
/// and what cannot be queued is left to the kernel's writeback.
const QUEUED: usize = 64;

#[derive(Debug, Clone, Copy, Default)]
struct Run {
    end: u64,
    /// Writeback was started up to here.
    started: u64,
    /// When the run was last written (a tick of [`Runs`]).
    used: u64,
}

#[derive(Debug, Default)]
struct Runs {
    tick: u64,
    runs: [Run; RUNS],
}

#[derive(Debug, Default)]
struct Queue {
    ranges: VecDeque<(u64, u64)>,
    stop: bool,
}

type Shared = (Mutex<Queue>, Condvar);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Follows the sequential runs of one file's writes and starts their writeback.
#[derive(Debug, Default)]
pub struct WriteBehind {
    runs: Mutex<Runs>,
    shared: Arc<Shared>,
    /// Started with the first range to write back; holds a duplicate of the
    /// file's descriptor until the file is closed.
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl WriteBehind {
    /// Notes a completed write of `len` bytes at `off` to `file`; a run that
    /// has grown by [`KICK`] bytes since its writeback last started is
    /// handed to the thread.
    pub fn wrote(&self, file: &File, off: u64, len: u64) {
        let start = {
            let mut g = lock(&self.runs);
            g.tick += 1;
            let tick = g.tick;
            let runs = &mut g.runs;
            // Near a run's end: several workers finish one writer's
            // requests a little out of order.
            let near = |r: &Run| off.abs_diff(r.end) <= SLACK && r.used > 0;
            let i = runs.iter().position(near).unwrap_or_else(|| {
                // A new run takes the place of the one written least recently.
                let i = (0..RUNS).min_by_key(|&i| runs[i].used).unwrap_or(0);
                runs[i] = Run {
                    end: off,
                    started: off,
                    used: 0,
                };
                i
            });
            let r = &mut runs[i];
            r.started = r.started.min(off);
            r.end = r.end.max(off.saturating_add(len));
            r.used = tick;
            (r.end - r.started >= KICK).then(|| {
                let range = (r.started, r.end - r.started);
                r.started = r.end;
                range
            })
        };
        if let Some((off, len)) = start {
            self.queue(file, off, len);
        }
    }

    fn queue(&self, file: &File, off: u64, len: u64) {
        let (q, cv) = &*self.shared;
        {
            let mut g = lock(q);
            let full = g.ranges.len() >= QUEUED;
            match g.ranges.back_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += len,
                _ if !full => g.ranges.push_back((off, len)),
                _ => {}
            }
        }
        cv.notify_one();
        let mut t = lock(&self.thread);
        if t.is_none() {
            let Ok(f) = file.try_clone() else { return };
            let shared = self.shared.clone();
            *t = std::thread::Builder::new()
                .name("writeback".into())
                .spawn(move || write_back(f, &shared))
                .ok();
        }
    }
}

/// The thread: starts the writeback of each queued range in turn.
fn write_back(file: File, shared: &Shared) {
    let (q, cv) = shared;
    loop {
        let (off, len) = {
            let mut g = lock(q);
            loop {
                if g.stop {
                    return;
                }
                if let Some(r) = g.ranges.pop_front() {
                    break r;
                }
                g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        };
        // Only starts the writes. Without a WAIT flag this does not look at
        // (nor consume) the file's writeback error state, so an error in
        // these writes is still reported by the next FLUSH's fdatasync.
        let _ = sys::start_writeback(file.as_fd(), off, len);
    }
}

impl Drop for WriteBehind {
    /// Stops the thread; the file's descriptor is closed when this returns.
    fn drop(&mut self) {
        {
            let mut g = lock(&self.shared.0);
            g.stop = true;
            g.ranges.clear();
        }
        self.shared.1.notify_all();
        let t = self.thread.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = t.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(w: &WriteBehind) -> Vec<(u64, u64)> {
        lock(&w.shared.0).ranges.iter().copied().collect()
    }

    /// A WriteBehind whose thread never starts (so the queue can be seen).
    fn unstarted() -> WriteBehind {
        let w = WriteBehind::default();
        *lock(&w.thread) = Some(std::thread::spawn(|| {}));
        w
    }

    #[test]
    fn sequential_runs_are_written_back_every_few_mib() {
        let f = tempfile::tempfile().unwrap();
        let w = unstarted();
        // Two writers in sequence at once, interleaved, plus random writes.
        let piece = 256 << 10;
        for i in 0..64u64 {
            w.wrote(&f, i * piece, piece);
            w.wrote(&f, (1 << 30) + i * piece, piece);
            w.wrote(&f, (7 << 30) + (i * 7919 % 4096) * 4096 * 3, 4096);
        }
        // 16 MiB each: two ranges of 8 MiB per run; the random writes none.
        let mut q = queued(&w);
        q.sort();
        assert_eq!(
            q,
            vec![
                (0, 8 << 20),
                (8 << 20, 8 << 20),
                (1 << 30, 8 << 20),
                ((1 << 30) + (8 << 20), 8 << 20)
            ]
        );
    }

    #[test]
    fn writes_finished_a_little_out_of_order_still_make_a_run() {
        let f = tempfile::tempfile().unwrap();
        let w = unstarted();
        let piece = 256 << 10;
        // Four workers, each finishing its request in turn, backwards.
        for i in (0..40u64).step_by(4) {
            for k in (0..4).rev() {
                w.wrote(&f, (i + k) * piece, piece);
            }
        }
        // The first 8 MiB and more, from the start.
        let q = queued(&w);
        assert_eq!(q.len(), 1, "{q:?}");
        assert_eq!(q[0].0, 0);
        assert!(q[0].1 >= 8 << 20 && q[0].1 <= 10 << 20, "{q:?}");
    }

    #[test]
    fn random_writes_start_no_writeback() {
        let f = tempfile::tempfile().unwrap();
        let w = unstarted();
        for i in 0..10_000u64 {
            w.wrote(&f, (i * 104_729 % 262_144) * 4096, 4096);
        }
        assert!(queued(&w).is_empty());
    }
}
