//! How a migration sees client writes: first only as dirty blocks, then, in
//! active mirroring, forwarded to the destination before they are acknowledged.

use super::dirty::DirtyMap;
use super::link::{Link, Waiter};
use crate::export::ChangeObserver;
use std::sync::atomic::{AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, RwLock};

const IDLE: u8 = 0;
const TRACKING: u8 = 1;
const FORWARDING: u8 = 2;

/// The export's change observer for the duration of a migration.
pub struct Observer {
    mode: AtomicU8,
    dirty: Arc<DirtyMap>,
    link: RwLock<Option<Arc<Link>>>,
}

impl Observer {
    pub fn new(dirty: Arc<DirtyMap>) -> Arc<Observer> {
        Arc::new(Observer {
            mode: AtomicU8::new(IDLE),
            dirty,
            link: RwLock::new(None),
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

    fn forward_change(&self, link: &Link, off: u64, len: u64, data: Option<&[u8]>) -> bool {
        if data.is_none() && !link.can_write_zeroes() {
            return false;
        }
        // Only one write per block may be in flight; otherwise leave it to the copier.
        let Some(claim) = link.inflight.try_claim(off, len) else {
            return false;
        };
        let waiter = Arc::new(Waiter::default());
        let bytes = data.map_or(0, |d| d.len() as u64);
        let sent = link.send(
            Some((off, len)),
            bytes,
            Some(claim),
            Some(waiter.clone()),
            |s, c| match data {
                Some(d) => s.write(c, off, d, false),
                None => s.write_zeroes(c, off, len, false),
            },
        );
        // On failure the link has already marked the range dirty.
        sent && waiter.wait()
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
