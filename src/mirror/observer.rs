//! How a migration sees client writes: first only as dirty blocks, then, in
//! active mirroring, forwarded to the destination before they are
//! acknowledged. A forwarded write waits while the destination keeps
//! confirming requests (a slow destination paces the guest, so the copy
//! converges), but once the destination has confirmed nothing for the stall
//! budget it is taken as stalled: the write is acknowledged anyway (it is on
//! the source) and its blocks go back to the dirty map, so a hung
//! destination cannot stall the guest. Its request stays in flight, holding
//! its blocks, so at most one write per block is ever in flight.

use super::dirty::DirtyMap;
use super::link::{Class, Link, Op, Waiter};
use crate::export::ChangeObserver;
use std::sync::atomic::{AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, RwLock};
use std::time::Duration;

const IDLE: u8 = 0;
const TRACKING: u8 = 1;
const FORWARDING: u8 = 2;

/// The export's change observer for the duration of a migration.
pub struct Observer {
    mode: AtomicU8,
    dirty: Arc<DirtyMap>,
    link: RwLock<Option<Arc<Link>>>,
    /// How long a forwarded write waits for the destination.
    stall: Duration,
}

impl Observer {
    pub fn new(dirty: Arc<DirtyMap>, stall: Duration) -> Arc<Observer> {
        Arc::new(Observer {
            mode: AtomicU8::new(IDLE),
            dirty,
            link: RwLock::new(None),
            stall,
        })
    }

    /// Changes go to the dirty map only.
    pub fn track(&self) {
        self.mode.store(TRACKING, SeqCst);
    }

    /// Changes are forwarded over `link` (or marked dirty where they cannot be).
    pub fn forward(&self, link: Arc<Link>) {
        *self.link.write().unwrap_or_else(|p| p.into_inner()) = Some(link);
        self.mode.store(FORWARDING, SeqCst);
    }

    /// Back to tracking only (the link is going away).
    pub fn stop_forwarding(&self) {
        self.mode.store(TRACKING, SeqCst);
        *self.link.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Changes are ignored (between attempts: the next one copies everything).
    pub fn idle(&self) {
        self.stop_forwarding();
        self.mode.store(IDLE, SeqCst);
    }

    /// True when the destination confirmed the change within the budget.
    fn forward_change(&self, link: &Link, off: u64, len: u64, data: Option<&[u8]>) -> bool {
        if data.is_none() && !link.can_write_zeroes() {
            return false;
        }
        // Already stalled: do not even wait.
        if link.quiet_for(std::time::Instant::now()) >= self.stall {
            return false;
        }
        // Only one write per block may be in flight; otherwise leave it to the copier.
        let Some(claim) = link.inflight.try_claim(off, len) else {
            return false;
        };
        let waiter = Arc::new(Waiter::default());
        let (op, bytes) = match data {
            Some(d) => {
                let mut b = link.buffer(d.len());
                b.copy_from_slice(d);
                (Op::Write { off, data: b }, d.len() as u64)
            }
            None => (Op::Zeroes { off, len }, 0),
        };
        // No room in the window: the destination is behind; do not wait for it.
        let range = Some((off, len));
        let now = Some(std::time::Instant::now());
        let class = Class::Urgent;
        if link
            .send(
                range,
                bytes,
                Some(claim),
                Some(waiter.clone()),
                op,
                class,
                now,
            )
            .is_err()
        {
            return false;
        }
        let mut slice = self.stall;
        loop {
            if let Some(ok) = waiter.wait_for(slice) {
                return ok;
            }
            // Has the destination confirmed nothing for the whole budget?
            let quiet = link.quiet_for(std::time::Instant::now());
            if quiet >= self.stall {
                return false;
            }
            slice = self.stall - quiet;
        }
    }
}

impl ChangeObserver for Observer {
    fn changed(&self, offset: u64, len: u64, data: Option<&[u8]>) {
        match self.mode.load(SeqCst) {
            IDLE => {}
            TRACKING => self.dirty.mark(offset, len),
            _ => {
                let link = self.link.read().unwrap_or_else(|p| p.into_inner()).clone();
                let forwarded = match &link {
                    Some(l) => self.forward_change(l, offset, len, data),
                    None => false,
                };
                if !forwarded {
                    self.dirty.mark(offset, len);
                }
            }
        }
    }
}
