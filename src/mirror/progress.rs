//! What a migration reports about itself, with time passed in: its state,
//! attempts, the last error, speed, bytes left and the time left. Pure.
//!
//! - Bytes left are exact and never above the size: while retrying (or
//!   connecting) everything is left, since a partial copy is never resumed;
//!   during the first sweep of an attempt, the unswept part plus the dirty
//!   blocks before the sweep position; afterwards, the dirty blocks.
//! - Speed is measured per attempt and is 0 while nothing is being sent.
//! - Time left is known only while data moves; otherwise it is absent.

use super::planner::SpeedMeter;
use super::Finish;
use super::{MigrationState, MigrationStatus};
use std::time::{Duration, Instant};

/// Window of the speed estimate.
const SPEED_WINDOW: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum State {
    /// Opening a connection for an attempt.
    Connecting,
    /// Sending the image, or the passes over the dirty map.
    Copying,
    /// Client writes are forwarded.
    Active,
    /// Requests are held while the rest goes out.
    Handover,
    /// Waiting for the next attempt, due at `at`.
    Retrying { at: Instant },
}

#[derive(Debug)]
pub(super) struct Progress {
    started: Instant,
    attempt_started: Instant,
    attempts: u32,
    state: State,
    /// During an attempt's first sweep: everything before this was sent.
    swept: Option<u64>,
    meter: SpeedMeter,
    last_error: Option<String>,
    pub finish: Option<Finish>,
}

impl Progress {
    pub fn new(now: Instant) -> Progress {
        Progress {
            started: now,
            attempt_started: now,
            attempts: 0,
            state: State::Connecting,
            swept: None,
            meter: SpeedMeter::new(SPEED_WINDOW),
            last_error: None,
            finish: None,
        }
    }

    /// An attempt begins (its connection is being opened).
    pub fn attempt_begins(&mut self, now: Instant) {
        self.attempts += 1;
        self.state = State::Connecting;
        self.swept = None;
        self.attempt_started = now;
        self.meter = SpeedMeter::new(SPEED_WINDOW);
    }

    /// The attempt's connection is up; its sweep starts at 0.
    pub fn copying(&mut self) {
        self.state = State::Copying;
        self.swept = Some(0);
    }

    /// The first sweep has sent everything before `pos`.
    pub fn swept(&mut self, pos: u64) {
        if self.swept.is_some() {
            self.swept = Some(pos);
        }
    }

    /// The first sweep is over.
    pub fn sweep_done(&mut self) {
        self.swept = None;
    }

    pub fn set_state(&mut self, s: State) {
        self.state = s;
    }

    /// The attempt failed for `why`; the next one is due at `at`.
    pub fn retrying(&mut self, why: &str, at: Instant) {
        self.last_error = Some(why.to_owned());
        self.state = State::Retrying { at };
        self.swept = None;
    }

    pub fn sent(&mut self, bytes: u64, now: Instant) {
        self.meter.add(bytes, now);
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The status keys at `now`, for an image of `size` bytes with `dirty`
    /// dirty bytes (`dirty_below(pos)`: those before `pos`) and an optional
    /// speed limit.
    pub fn status(
        &mut self,
        now: Instant,
        size: u64,
        dirty: u64,
        dirty_below: impl Fn(u64) -> u64,
        limit: Option<u64>,
    ) -> MigrationStatus {
        let moving = matches!(self.state, State::Copying | State::Active | State::Handover);
        let bytes_left = match (&self.state, self.swept) {
            (State::Connecting | State::Retrying { .. }, _) => size,
            (_, Some(pos)) => size.saturating_sub(pos) + dirty_below(pos),
            (_, None) => dirty,
        }
        .min(size);
        let speed = match moving {
            true => self.meter.rate(now, self.attempt_started),
            false => 0,
        };
        let expected = match limit {
            Some(l) => speed.min(l),
            None => speed,
        };
        let seconds_left = (expected > 0).then(|| bytes_left.div_ceil(expected));
        let (state, retry_in) = match &self.state {
            State::Connecting if self.attempts <= 1 => (MigrationState::Copying, None),
            State::Connecting => (MigrationState::Retrying, Some(0)),
            State::Copying => (MigrationState::Copying, None),
            State::Active => (MigrationState::Active, None),
            State::Handover => (MigrationState::Handover, None),
            State::Retrying { at } => (
                MigrationState::Retrying,
                Some(at.saturating_duration_since(now).as_secs_f64().ceil() as u64),
            ),
        };
        MigrationStatus {
            speed,
            duration: now.duration_since(self.started).as_secs(),
            seconds_left,
            bytes_left,
            speed_limit: limit,
            attempts: self.attempts,
            state,
            retry_in,
            last_error: self.last_error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 2 << 30;

    fn status(p: &mut Progress, now: Instant, dirty: u64) -> MigrationStatus {
        p.status(now, SIZE, dirty, |pos| dirty.min(pos), None)
    }

    #[test]
    fn bytes_left_never_exceed_the_size_and_retries_count_everything() {
        let t0 = Instant::now();
        let mut p = Progress::new(t0);
        p.attempt_begins(t0);
        p.copying();
        p.swept(SIZE / 2);
        // Dirty blocks behind the sweep count once; ahead of it, not again.
        let s = p.status(t0, SIZE, SIZE, |pos| pos / 4, None);
        assert_eq!(s.bytes_left, SIZE / 2 + SIZE / 8);
        p.sweep_done();
        assert_eq!(status(&mut p, t0, 3 << 30).bytes_left, SIZE);
        // A failed attempt: everything is left, whatever the dirty map says.
        p.retrying("connection closed", t0 + Duration::from_secs(4));
        let s = status(&mut p, t0 + Duration::from_millis(1500), SIZE / 3);
        assert_eq!(s.bytes_left, SIZE);
        assert_eq!((s.state, s.retry_in), (MigrationState::Retrying, Some(3)));
        assert_eq!(s.last_error.as_deref(), Some("connection closed"));
        assert_eq!((s.speed, s.seconds_left), (0, None));
        p.attempt_begins(t0 + Duration::from_secs(4));
        let s = status(&mut p, t0 + Duration::from_secs(4), 0);
        assert_eq!(
            (s.attempts, s.state, s.bytes_left),
            (2, MigrationState::Retrying, SIZE)
        );
    }

    #[test]
    fn time_left_only_while_data_moves() {
        let t0 = Instant::now();
        let mut p = Progress::new(t0);
        p.attempt_begins(t0);
        p.copying();
        let s = p.status(t0, SIZE, 0, |_| 0, Some(1000));
        assert_eq!(
            s.seconds_left, None,
            "no measurement yet, even with a limit"
        );
        p.sent(1 << 20, t0 + Duration::from_millis(500));
        p.swept(1 << 20);
        let s = status(&mut p, t0 + Duration::from_secs(1), 0);
        assert_eq!(s.speed, 1 << 20);
        assert_eq!(s.seconds_left, Some((SIZE - (1 << 20)).div_ceil(1 << 20)));
        // Nothing sent for longer than the window: speed 0, no ETA.
        let s = status(&mut p, t0 + Duration::from_secs(90), 0);
        assert_eq!((s.speed, s.seconds_left), (0, None));
        // A limit below the speed bounds the estimate.
        p.sent(1 << 20, t0 + Duration::from_secs(91));
        let s = p.status(t0 + Duration::from_secs(91), SIZE, 0, |_| 0, Some(1 << 10));
        assert!(s.seconds_left.unwrap() > SIZE >> 11);
    }

    #[test]
    fn speed_is_per_attempt() {
        let t0 = Instant::now();
        let mut p = Progress::new(t0);
        p.attempt_begins(t0);
        p.copying();
        p.sent(100 << 20, t0 + Duration::from_secs(1));
        p.retrying("x", t0 + Duration::from_secs(2));
        p.attempt_begins(t0 + Duration::from_secs(2));
        p.copying();
        let s = status(&mut p, t0 + Duration::from_secs(3), 0);
        assert_eq!(s.speed, 0, "the failed attempt's bytes are not this one's");
        assert_eq!(s.state, MigrationState::Copying);
    }
}
