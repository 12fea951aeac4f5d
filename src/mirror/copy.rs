//! One migration from start to end: the first connection, attempts (a full
//! copy each), passes over the dirty map, active mirroring, and the
//! hand-over.

use super::link::{Class, Drained, Link, NotSent, Op};
use super::planner::{backoff, Convergence};
use super::progress::State;
use super::MirrorAction;
use super::{connect, Finish, Shared, StartError};
use crate::client::Connection;
use crate::gate::Hold;
use crate::storage::is_zero;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Dirty data left for the hand-over to send while clients wait.
const HANDOVER_REMAINDER: u64 = 4 << 20;
/// Largest single WRITE sent to the destination.
const MAX_WRITE: u64 = 8 << 20;
/// During active mirroring: the copier's largest WRITE, and how much of its
/// data may be unconfirmed, so forwarded client writes wait behind little.
const ACTIVE_WRITE: u64 = 256 << 10;
const ACTIVE_IN_FLIGHT: u64 = 2 << 20;
/// Largest single WRITE_ZEROES sent to a destination without extended headers.
const MAX_ZEROES: u64 = 1 << 30;
/// Extents looked up at a time during the first sweep.
const SWEEP_EXTENTS: usize = 1024;
/// Time the first hand-over may hold clients' requests; a destination too
/// slow for it is given another chance later, with twice the time (up to
/// the request timeout), while clients are served again.
const HANDOVER_BUDGET: Duration = Duration::from_secs(1);
/// While the image is paused, the hand-over is tried again this often
/// (the dirty ranges are sent meanwhile).
const PAUSED_RETRY: Duration = Duration::from_millis(100);

/// How the copier sends: piece size, its share of the window, pacing, and
/// a deadline.
#[derive(Debug, Clone, Copy)]
struct Lane {
    piece: u64,
    in_flight: u64,
    /// Honour the speed limit (not while clients are held).
    paced: bool,
    /// Give up (with [`Stop::Slow`]) at this instant.
    until: Option<Instant>,
}

impl Lane {
    /// The sweep and the passes: large pieces, the whole window.
    const COPY: Lane = Lane {
        piece: MAX_WRITE,
        in_flight: u64::MAX,
        paced: true,
        until: None,
    };
    /// Active mirroring: client writes have priority.
    const ACTIVE: Lane = Lane {
        piece: ACTIVE_WRITE,
        in_flight: ACTIVE_IN_FLIGHT,
        paced: true,
        until: None,
    };

    /// The hand-over: clients are held, so no pacing, and a deadline.
    fn handover(deadline: Instant) -> Lane {
        Lane {
            paced: false,
            until: Some(deadline),
            ..Lane::COPY
        }
    }

    fn class(&self) -> Class {
        Class::Bulk {
            in_flight: self.in_flight,
        }
    }
}

/// Why an attempt ended without success.
enum Stop {
    /// `break` was asked for.
    Stopped,
    /// The destination failed; try again from scratch.
    Retry(String),
    /// Nothing more can be done.
    Fatal(String),
    /// The hand-over ran out of time; serve clients again and retry it.
    Slow,
    /// The image is paused: the hand-over waits for the resume.
    Paused,
}

enum Done {
    HandedOver,
    Completed,
}

/// The migration thread.
pub(super) fn run(s: Arc<Shared>) {
    s.progress().attempt_begins(Instant::now());
    let finish = match connect(&s) {
        Err(f) => {
            let kind = if s.stopped() {
                StartError::Stopped
            } else {
                f.kind
            };
            s.set_start(Err(kind.clone()));
            let finish = match kind {
                StartError::Stopped => Finish::Stopped,
                k => Finish::Failed(k.to_string()),
            };
            end(&s, finish, false);
            return;
        }
        Ok(_) if s.stopped() => {
            s.set_start(Err(StartError::Stopped));
            end(&s, Finish::Stopped, false);
            return;
        }
        Ok(first) => {
            s.export.set_observer(Some(s.observer.clone()));
            info!("migration to {} started", s.spec.dest);
            s.set_start(Ok(()));
            attempts(&s, first)
        }
    };
    s.observer.idle();
    s.export.set_observer(None);
    *s.link.lock().unwrap_or_else(|e| e.into_inner()) = None;
    match &finish {
        Finish::HandedOver => info!("migration to {} complete: handed over", s.spec.dest),
        Finish::Completed => info!("migration to {} complete", s.spec.dest),
        Finish::Stopped => info!("migration to {} stopped", s.spec.dest),
        Finish::Failed(why) => error!("migration to {} failed: {why}", s.spec.dest),
    }
    end(&s, finish, true);
}

/// Records the end; `started`: the migration had started (hooks are told).
fn end(s: &Shared, finish: Finish, started: bool) {
    {
        let mut p = s.progress();
        p.finish = Some(finish.clone());
        s.done_cv.notify_all();
    }
    if started {
        s.hooks.finished(&finish);
    }
}

fn attempts(s: &Arc<Shared>, first: Connection) -> Finish {
    let mut next = Some(first);
    // All failed attempts (for --retries), and those since the last one
    // that got data through (for the back-off).
    let mut failures = 0u32;
    let mut streak = 0u32;
    loop {
        if s.stopped() {
            return Finish::Stopped;
        }
        let conn = match next.take() {
            Some(c) => Ok(c),
            None => {
                s.progress().attempt_begins(Instant::now());
                connect(s).map_err(|f| f.detail)
            }
        };
        let (outcome, progressed) = match conn {
            Ok(c) => attempt(s, c),
            Err(e) => (Err(Stop::Retry(e)), false),
        };
        let why = match outcome {
            Ok(Done::HandedOver) => return Finish::HandedOver,
            Ok(Done::Completed) => return Finish::Completed,
            Err(Stop::Stopped) => return Finish::Stopped,
            Err(Stop::Fatal(why)) => return Finish::Failed(why),
            Err(_) if s.stopped() => return Finish::Stopped,
            Err(Stop::Retry(why)) => why,
            Err(Stop::Slow) => "the destination was too slow".into(),
            Err(Stop::Paused) => "the image stayed paused".into(),
        };
        failures += 1;
        streak = if progressed { 1 } else { streak + 1 };
        if s.spec.retries.is_some_and(|n| failures > n) {
            return Finish::Failed(format!("{why} (gave up after {failures} failed attempts)"));
        }
        let delay = backoff(streak);
        let attempt = {
            let mut p = s.progress();
            p.retrying(&why, Instant::now() + delay);
            p.attempts()
        };
        warn!(
            "migration attempt {attempt} failed: {why}; retrying from scratch in {}s",
            delay.as_secs()
        );
        if s.sleep(delay) {
            return Finish::Stopped;
        }
    }
}

/// One full copy over a fresh connection; also whether the destination
/// confirmed any data (the link worked for a while).
fn attempt(s: &Arc<Shared>, conn: Connection) -> (Result<Done, Stop>, bool) {
    let s2 = s.clone();
    let confirmed = Box::new(move |bytes| s2.sent(bytes));
    let link = match Link::start(conn, s.dirty.clone(), s.spec.request_timeout, confirmed) {
        Ok(l) => l,
        Err(e) => return (Err(Stop::Retry(e.to_string())), false),
    };
    s.progress().copying();
    *s.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(link.clone());
    let r = copy_all(s, &link);
    s.observer.idle();
    link.close(match &r {
        Ok(_) => "migration finished",
        Err(_) => "migration attempt ended",
    });
    *s.link.lock().unwrap_or_else(|e| e.into_inner()) = None;
    (r, link.confirmed_bytes() > 0)
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

/// What a wait on the link means for the attempt.
fn waited(s: &Shared, link: &Link, d: Drained) -> Result<(), Stop> {
    match d {
        Drained::Done => Ok(()),
        Drained::Failed => Err(link_failed(s, link)),
        Drained::TimedOut => Err(Stop::Slow),
    }
}

fn copy_all(s: &Arc<Shared>, link: &Arc<Link>) -> Result<Done, Stop> {
    // Track first, then forget old marks: the sweep reads everything after this.
    s.observer.track();
    s.dirty.clear_all();
    sweep(s, link)?;
    s.progress().sweep_done();

    let mut conv = Convergence::new();
    loop {
        pass(s, link, Lane::COPY)?;
        waited(s, link, link.drain(None))?;
        let left = s.dirty.dirty_bytes();
        if conv.after_pass(left) {
            info!(
                "migration: {left} bytes dirty after {} passes; mirroring writes actively",
                conv.passes()
            );
            break;
        }
    }

    s.progress().set_state(State::Active);
    s.observer.forward(link.clone());
    let mut budget = HANDOVER_BUDGET;
    let mut paused_logged = false;
    loop {
        drain_dirty(s, link, HANDOVER_REMAINDER)?;
        match handover(s, link, budget) {
            Err(Stop::Slow) => {
                warn!(
                    "hand-over: the destination took over {}s; serving clients again and \
                     trying again",
                    budget.as_secs_f64()
                );
                budget = (budget * 2).min(s.spec.request_timeout);
                s.progress().set_state(State::Active);
            }
            Err(Stop::Paused) => {
                if !paused_logged {
                    info!("hand-over: the image is paused; waiting for the resume");
                    paused_logged = true;
                }
                s.progress().set_state(State::Active);
                if !s.sleep(PAUSED_RETRY) {
                    continue;
                }
                return Err(Stop::Stopped);
            }
            r => return r,
        }
    }
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
                send_data(s, link, pos, e.len, true, Lane::COPY)?;
            }
            pos = end;
        }
    }
    Ok(())
}

/// One pass over the dirty map, from the start to the end of the image.
fn pass(s: &Shared, link: &Link, lane: Lane) -> Result<(), Stop> {
    let mut cursor = 0u64;
    loop {
        if s.stopped() {
            return Err(Stop::Stopped);
        }
        let piece = s
            .limit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .piece(lane.piece);
        let Some((off, len)) = s.dirty.take_after(cursor, piece) else {
            return Ok(());
        };
        send_data(s, link, off, len, false, lane)?;
        cursor = off + len;
    }
}

/// Passes over the dirty map until at most `left` bytes are dirty and
/// everything sent is confirmed. In active mirroring a block that clients keep
/// rewriting can stay dirty, so the hand-over (clients held) sends the rest.
fn drain_dirty(s: &Shared, link: &Link, left: u64) -> Result<(), Stop> {
    loop {
        pass(s, link, Lane::ACTIVE)?;
        waited(s, link, link.drain(None))?;
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

/// Sends the current contents of `[off, off + len)` (`sweeping`: as part of
/// the first sweep, whose progress it reports) as `lane` says.
fn send_data(
    s: &Shared,
    link: &Link,
    off: u64,
    len: u64,
    sweeping: bool,
    lane: Lane,
) -> Result<(), Stop> {
    let end = off + len;
    let mut pos = off;
    let until = lane.until;
    while pos < end {
        let piece = s
            .limit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .piece(lane.piece);
        let n = (end - pos).min(piece);
        if lane.paced {
            pace(s, n)?;
        }
        // Claim before reading, so no forwarded client write to these blocks is in flight.
        let Some(claim) = link.inflight.claim(pos, n, until) else {
            s.dirty.mark(pos, end - pos);
            return Err(match link.inflight.is_closed() {
                true => link_failed(s, link),
                false => Stop::Slow,
            });
        };
        let mut buf = link.buffer(n as usize);
        if let Err(e) = s.export.storage().read_at(&mut buf, pos) {
            return Err(Stop::Fatal(format!("cannot read the image: {e}")));
        }
        let range = Some((pos, n));
        let sent = if link.can_write_zeroes() && is_zero(&buf) {
            link.recycle(buf);
            let op = Op::Zeroes { off: pos, len: n };
            link.send(range, 0, Some(claim), None, op, lane.class(), until)
        } else {
            let op = Op::Write {
                off: pos,
                data: buf,
            };
            link.send(range, n, Some(claim), None, op, lane.class(), until)
        };
        if let Err(e) = sent {
            s.dirty.mark(pos, end - pos);
            return Err(match e {
                NotSent::Failed => link_failed(s, link),
                NotSent::NoRoom => Stop::Slow,
            });
        }
        pos += n;
        if sweeping {
            s.progress().swept(pos);
        }
    }
    Ok(())
}

/// Makes `[off, off + len)` zero on the destination, keeping it sparse when it can.
fn send_zeroes(s: &Shared, link: &Link, off: u64, len: u64) -> Result<(), Stop> {
    if !link.can_write_zeroes() {
        return send_data(s, link, off, len, true, Lane::COPY);
    }
    // With extended headers a hole of any size goes in one request.
    let most = match link.max_zeroes() > u64::from(u32::MAX) {
        true => link.max_zeroes(),
        false => MAX_ZEROES,
    };
    let end = off + len;
    let mut pos = off;
    while pos < end {
        if s.stopped() {
            return Err(Stop::Stopped);
        }
        let n = (end - pos).min(most);
        let Some(claim) = link.inflight.claim(pos, n, None) else {
            return Err(link_failed(s, link));
        };
        let op = Op::Zeroes { off: pos, len: n };
        let class = Lane::COPY.class();
        if link
            .send(Some((pos, n)), 0, Some(claim), None, op, class, None)
            .is_err()
        {
            return Err(link_failed(s, link));
        }
        pos += n;
        s.progress().swept(pos);
    }
    Ok(())
}

/// The gate held for a hand-over. Dropped on any failure, it lets clients
/// in again; [`Closed::keep`] keeps it closed for as long as the migration
/// exists (after a hand-over, nothing may be written here any more).
struct Closed<'a> {
    s: &'a Shared,
    hold: Option<Hold>,
}

impl Closed<'_> {
    fn keep(mut self) {
        *self.s.kept.lock().unwrap_or_else(|p| p.into_inner()) = self.hold.take();
    }
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.hold.take() {
            drop(h);
            self.s.hooks.handover_abandoned();
        }
    }
}

/// Stops taking client requests, sends what is left, flushes the destination
/// and hands the image over (or, with `nothing`, resumes service). Gives up
/// with [`Stop::Slow`] (clients served again) when the destination needs
/// more than `budget` for it, and with [`Stop::Paused`] while the image is
/// paused.
fn handover(s: &Arc<Shared>, link: &Arc<Link>, budget: Duration) -> Result<Done, Stop> {
    if !s.hooks.handover_started() {
        return Err(Stop::Paused);
    }
    s.progress().set_state(State::Handover);
    let closed = Closed {
        s,
        hold: Some(s.export.gate().hold()),
    };
    while !closed
        .hold
        .as_ref()
        .is_some_and(|h| h.drain_for(Duration::from_millis(200)))
    {
        if s.stopped() {
            return Err(Stop::Stopped);
        }
    }
    let deadline = Instant::now() + budget;
    finish_copy(s, link, deadline)?;
    if s.spec.action == MirrorAction::Nothing {
        return Ok(Done::Completed);
    }
    if link.is_oldstyle() {
        // The listen-era C flexnbd takes control only after ENTRUST; later
        // versions answer it as an empty read.
        if let Err(e) = waited(s, link, link.entrust(Some(deadline))) {
            return Err(match e {
                Stop::Retry(why) => Stop::Retry(format!("ENTRUST was not accepted: {why}")),
                e => e,
            });
        }
    }
    if s.spec.action == MirrorAction::Unlink {
        match std::fs::remove_file(&s.spec.file) {
            Ok(()) => info!("removed {}", s.spec.file.display()),
            Err(e) => error!("cannot remove {}: {e}", s.spec.file.display()),
        }
    }
    s.observer.idle();
    if !link.disconnect() {
        // The destination may or may not have taken over: keep the data served here.
        return Err(Stop::Fatal(format!(
            "sending the final disconnect failed ({}); the destination may not have taken over",
            link.failure().unwrap_or_default()
        )));
    }
    closed.keep();
    Ok(Done::HandedOver)
}

fn finish_copy(s: &Shared, link: &Link, deadline: Instant) -> Result<(), Stop> {
    pass(s, link, Lane::handover(deadline))?;
    waited(s, link, link.drain(Some(deadline)))?;
    waited(s, link, link.flush(Some(deadline)))?;
    if !s.dirty.is_clean() {
        return Err(Stop::Retry("image changed during the hand-over".into()));
    }
    Ok(())
}
