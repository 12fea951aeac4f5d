//! Log lines on stderr in the form `LEVEL:PID THREAD FILE:LINE: MSG`.
//!
//! Levels D, I, W, E, F. The default shows W and up; `--verbose` shows I and up
//! (D too in debug builds); `--quiet` shows only F.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug = 0,
    Info = 1,
    Warn = 2,
    Error = 3,
    Fatal = 4,
}

impl Level {
    fn letter(self) -> char {
        match self {
            Level::Debug => 'D',
            Level::Info => 'I',
            Level::Warn => 'W',
            Level::Error => 'E',
            Level::Fatal => 'F',
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Warn as u8);

/// Sets the lowest level that is printed.
pub fn set_level(l: Level) {
    LEVEL.store(l as u8, Ordering::Relaxed);
}

/// The level `--verbose` selects: D in debug builds, I otherwise.
pub fn verbose_level() -> Level {
    if cfg!(debug_assertions) {
        Level::Debug
    } else {
        Level::Info
    }
}

pub fn enabled(l: Level) -> bool {
    l as u8 >= LEVEL.load(Ordering::Relaxed)
}

/// Writes one log line; use the macros instead.
pub fn write(l: Level, file: &str, line: u32, args: fmt::Arguments<'_>) {
    let t = std::thread::current();
    let name = t.name().unwrap_or("thread");
    let msg = format!(
        "{}:{} {} {}:{}: {}\n",
        l.letter(),
        std::process::id(),
        name,
        file,
        line,
        args
    );
    let _ = std::io::stderr().lock().write_all(msg.as_bytes());
}

#[macro_export]
macro_rules! log_at {
    ($lvl:expr, $($arg:tt)*) => {
        if $crate::log::enabled($lvl) {
            $crate::log::write($lvl, file!(), line!(), format_args!($($arg)*))
        }
    };
}

#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Debug, $($arg)*) };
}

#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Info, $($arg)*) };
}

#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Warn, $($arg)*) };
}

#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Error, $($arg)*) };
}

#[macro_export]
macro_rules! fatal {
    ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Fatal, $($arg)*) };
}
