//! One migration from start to end: attempts (a full copy each), passes over
//! the dirty map, active mirroring, and the hand-over.

use super::link::Link;
use super::planner::{backoff, Convergence};
use super::{connect, Finish, Phase, Shared};
use crate::client::Connection;
use crate::control::MirrorAction;
use crate::storage::is_zero;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Dirty data left for the hand-over to send while clients wait.
const HANDOVER_REMAINDER: u64 = 4 << 20;
/// Largest single WRITE sent to the destination.
const MAX_WRITE: u64 = 8 << 20;
/// Largest single WRITE_ZEROES sent to the destination.
const MAX_ZEROES: u64 = 1 << 30;
/// Extents looked up at a time during the first sweep.
const SWEEP_EXTENTS: usize = 1024;

/// Why an attempt ended without success.
enum Stop {
    /// `break` was asked for.
    Stopped,
    /// The destination failed; try again from scratch.
    Retry(String),
    /// Nothing more can be done.
    Fatal(String),
}

enum Done {
    HandedOver,
    Completed,
}

/// The migration thread.
pub(super) fn run(s: Arc<Shared>, first: Connection) {
    let finish = attempts(&s, first);
    s.observer.idle();
    s.export.set_observer(None);
    *s.link.lock().unwrap_or_else(|e| e.into_inner()) = None;
    match &finish {
        Finish::HandedOver => info!("migration to {} complete: handed over", s.spec.dest),
        Finish::Completed => info!("migration to {} complete", s.spec.dest),
        Finish::Stopped => info!("migration to {} stopped", s.spec.dest),
        Finish::Failed(why) => error!("migration to {} failed: {why}", s.spec.dest),
    }
    {
        let mut p = s.progress.lock().unwrap_or_else(|e| e.into_inner());
        p.finish = Some(finish.clone());
        s.done_cv.notify_all();
    }
    s.hooks.finished(&finish);
}

fn attempts(s: &Arc<Shared>, first: Connection) -> Finish {
    let mut next = Some(first);
    let mut failures = 0u32;
    loop {
        if s.stopped() {
            return Finish::Stopped;
        }
        let conn = match next.take() {
            Some(c) => Ok(c),
            None => connect(&s.spec, s.export.size()).map_err(|e| e.to_string()),
        };
        let outcome = match conn {
            Ok(c) => {
                s.progress
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .attempts += 1;
                attempt(s, c)
            }
            Err(e) => Err(Stop::Retry(e)),
        };
        match outcome {
            Ok(Done::HandedOver) => return Finish::HandedOver,
            Ok(Done::Completed) => return Finish::Completed,
            Err(Stop::Stopped) => return Finish::Stopped,
            Err(Stop::Fatal(why)) => return Finish::Failed(why),
            Err(Stop::Retry(why)) => {
                failures += 1;
                if s.spec.retries.is_some_and(|n| failures > n) {
                    return Finish::Failed(format!(
                        "{why} (gave up after {failures} failed attempts)"
                    ));
                }
                let delay = backoff(failures);
                warn!(
                    "migration attempt failed: {why}; retrying from scratch in {}s",
                    delay.as_secs()
                );
                if s.sleep(delay) {
                    return Finish::Stopped;
                }
            }
        }
    }
}

/// One full copy over a fresh connection.
fn attempt(s: &Arc<Shared>, conn: Connection) -> Result<Done, Stop> {
    let link = Link::start(conn, s.dirty.clone(), s.spec.request_timeout)
        .map_err(|e| Stop::Retry(e.to_string()))?;
    *s.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(link.clone());
    let r = copy_all(s, &link);
    s.observer.idle();
    link.close(match &r {
        Ok(_) => "migration finished",
        Err(_) => "migration attempt ended",
    });
    *s.link.lock().unwrap_or_else(|e| e.into_inner()) = None;
    r
}

fn link_failed(s: &Shared, link: &Link) -> Stop {
    if s.stopped() {
        return Stop::Stopped;
    }
    Stop::Retry(
        link.failure()
            .unwrap_or_else(|| "connection to the destination failed".into()),
    )
}

fn copy_all(s: &Arc<Shared>, link: &Arc<Link>) -> Result<Done, Stop> {
    // Track first, then forget old marks: the sweep reads everything after this.
    s.observer.track();
    s.dirty.clear_all();
    s.set_phase(Phase::Sweep);
    sweep(s, link)?;

    s.set_phase(Phase::Passes);
    let mut conv = Convergence::new();
    loop {
        pass(s, link)?;
        if !link.drain() {
            return Err(link_failed(s, link));
        }
        let left = s.dirty.dirty_bytes();
        if conv.after_pass(left) {
            info!(
                "migration: {left} bytes dirty after {} passes; mirroring writes actively",
                conv.passes()
            );
            break;
        }
    }

    s.set_phase(Phase::Active);
    s.observer.forward(link.clone());
    drain_dirty(s, link, HANDOVER_REMAINDER)?;
    handover(s, link)
}

/// Sends the whole image once: data as WRITEs, holes as WRITE_ZEROES.
fn sweep(s: &Shared, link: &Link) -> Result<(), Stop> {
    let size = s.export.size();
    let storage = s.export.storage();
    let mut pos = 0u64;
    while pos < size {
        if s.stopped() {
            return Err(Stop::Stopped);
        }
        let extents = storage
            .extents(pos, size - pos, SWEEP_EXTENTS)
            .map_err(|e| Stop::Fatal(format!("cannot read the image's allocation: {e}")))?;
        if extents.is_empty() {
            break;
        }
        for e in extents {
            let end = pos + e.len;
            if e.hole {
                send_zeroes(s, link, pos, e.len)?;
            } else {
                send_data(s, link, pos, e.len, true)?;
            }
            pos = end;
        }
    }
    Ok(())
}

/// One pass over the dirty map, from the start to the end of the image.
fn pass(s: &Shared, link: &Link) -> Result<(), Stop> {
    let mut cursor = 0u64;
    loop {
        if s.stopped() {
            return Err(Stop::Stopped);
        }
        let piece = s
            .limit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .piece(MAX_WRITE);
        let Some((off, len)) = s.dirty.take_after(cursor, piece) else {
            return Ok(());
        };
        send_data(s, link, off, len, false)?;
        cursor = off + len;
    }
}

/// Passes over the dirty map until at most `left` bytes are dirty and
/// everything sent is confirmed. In active mirroring a block that clients keep
/// rewriting can stay dirty, so the hand-over (clients held) sends the rest.
fn drain_dirty(s: &Shared, link: &Link, left: u64) -> Result<(), Stop> {
    loop {
        pass(s, link)?;
        if !link.drain() {
            return Err(link_failed(s, link));
        }
        if s.dirty.dirty_bytes() <= left {
            return Ok(());
        }
    }
}

/// Waits as the speed limit requires before sending `bytes`.
fn pace(s: &Shared, bytes: u64) -> Result<(), Stop> {
    let wait = s
        .limit
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .reserve(bytes, Instant::now());
    if wait > Duration::ZERO && s.sleep(wait) {
        return Err(Stop::Stopped);
    }
    Ok(())
}

/// Records that the first sweep has sent everything before `pos`.
fn swept(s: &Shared, pos: u64) {
    s.progress.lock().unwrap_or_else(|p| p.into_inner()).unswept = s.export.size() - pos;
}

/// Sends the current contents of `[off, off + len)` (`sweeping`: as part of
/// the first sweep, whose progress it reports).
fn send_data(s: &Shared, link: &Link, off: u64, len: u64, sweeping: bool) -> Result<(), Stop> {
    let mut buf = Vec::new();
    let end = off + len;
    let mut pos = off;
    while pos < end {
        let piece = s
            .limit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .piece(MAX_WRITE);
        let n = (end - pos).min(piece);
        pace(s, n)?;
        // Claim before reading, so no forwarded client write to these blocks is in flight.
        let Some(claim) = link.inflight.claim(pos, n) else {
            s.dirty.mark(pos, end - pos);
            return Err(link_failed(s, link));
        };
        buf.resize(n as usize, 0);
        if let Err(e) = s.export.storage().read_at(&mut buf, pos) {
            return Err(Stop::Fatal(format!("cannot read the image: {e}")));
        }
        let zero = link.can_write_zeroes() && is_zero(&buf);
        let sent = if zero {
            link.send(Some((pos, n)), 0, Some(claim), None, |snd, c| {
                snd.write_zeroes(c, pos, n, false)
            })
        } else {
            link.send(Some((pos, n)), n, Some(claim), None, |snd, c| {
                snd.write(c, pos, &buf, false)
            })
        };
        if !sent {
            if end > pos + n {
                s.dirty.mark(pos + n, end - pos - n);
            }
            return Err(link_failed(s, link));
        }
        s.sent(n);
        pos += n;
        if sweeping {
            swept(s, pos);
        }
    }
    Ok(())
}

/// Makes `[off, off + len)` zero on the destination, keeping it sparse when it can.
fn send_zeroes(s: &Shared, link: &Link, off: u64, len: u64) -> Result<(), Stop> {
    if !link.can_write_zeroes() {
        return send_data(s, link, off, len, true);
    }
    let end = off + len;
    let mut pos = off;
    while pos < end {
        if s.stopped() {
            return Err(Stop::Stopped);
        }
        let n = (end - pos).min(MAX_ZEROES);
        let Some(claim) = link.inflight.claim(pos, n) else {
            return Err(link_failed(s, link));
        };
        if !link.send(Some((pos, n)), 0, Some(claim), None, |snd, c| {
            snd.write_zeroes(c, pos, n, false)
        }) {
            return Err(link_failed(s, link));
        }
        s.sent(n);
        pos += n;
        swept(s, pos);
    }
    Ok(())
}

/// Stops taking client requests, sends what is left, flushes the destination
/// and hands the image over (or, with `nothing`, resumes service).
fn handover(s: &Arc<Shared>, link: &Arc<Link>) -> Result<Done, Stop> {
    s.set_phase(Phase::Handover);
    s.hooks.handover_started();
    let gate = s.export.gate();
    while !gate.close(Duration::from_millis(200)) {
        if s.stopped() {
            reopen(s);
            return Err(Stop::Stopped);
        }
    }
    let r = finish_copy(s, link);
    if let Err(e) = r {
        reopen(s);
        return Err(e);
    }
    if s.spec.action == MirrorAction::Nothing {
        reopen(s);
        return Ok(Done::Completed);
    }
    if s.spec.action == MirrorAction::Unlink {
        match std::fs::remove_file(&s.spec.file) {
            Ok(()) => info!("removed {}", s.spec.file.display()),
            Err(e) => error!("cannot remove {}: {e}", s.spec.file.display()),
        }
    }
    s.observer.idle();
    if let Err(e) = link.disconnect() {
        // The destination may or may not have taken over: keep the data served here.
        reopen(s);
        return Err(Stop::Fatal(format!(
            "sending the final disconnect failed ({e}); the destination may not have taken over"
        )));
    }
    Ok(Done::HandedOver)
}

fn finish_copy(s: &Shared, link: &Link) -> Result<(), Stop> {
    drain_dirty(s, link, 0)?;
    if !link.flush() {
        return Err(link_failed(s, link));
    }
    if !s.dirty.is_clean() {
        return Err(Stop::Retry("image changed during the hand-over".into()));
    }
    Ok(())
}

fn reopen(s: &Shared) {
    s.export.gate().open();
    s.hooks.handover_abandoned();
}
