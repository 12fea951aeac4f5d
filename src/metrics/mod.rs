//! What a fleet's Prometheus scrapes (`--metrics ADDR:PORT`, [`http`]):
//! requests, bytes and latency by command, errors by errno, kept in atomics
//! so the request path takes no lock; gauges (clients, migration, pause)
//! are read from the server's status when scraped.
//!
//! The text format (0.0.4) is written here: prometheus-client's histogram
//! locks on every observation and its encoder writes OpenMetrics, while
//! this format is a few lines of `# HELP`, `# TYPE` and samples.

pub mod http;

use crate::proto::{Command, NbdErrno};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Commands counted, in the order of their labels.
const COMMANDS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "block_status",
    "cache",
];

/// Errnos counted, in the order of their labels.
const ERRNOS: [(NbdErrno, &str); 8] = [
    (NbdErrno::Perm, "EPERM"),
    (NbdErrno::Io, "EIO"),
    (NbdErrno::NoMem, "ENOMEM"),
    (NbdErrno::Inval, "EINVAL"),
    (NbdErrno::NoSpc, "ENOSPC"),
    (NbdErrno::Overflow, "EOVERFLOW"),
    (NbdErrno::NotSup, "ENOTSUP"),
    (NbdErrno::Shutdown, "ESHUTDOWN"),
];

/// Upper bounds of the latency buckets, in seconds (then +Inf).
const BUCKETS: [f64; 16] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
    250e-3, 500e-3, 1.0,
];

fn command_index(c: Command) -> Option<usize> {
    match c {
        Command::Read => Some(0),
        Command::Write => Some(1),
        Command::Flush => Some(2),
        Command::Trim => Some(3),
        Command::WriteZeroes => Some(4),
        Command::BlockStatus => Some(5),
        Command::Cache => Some(6),
        Command::Disc | Command::Unknown(_) => None,
    }
}

/// A latency histogram in atomics (cumulative buckets are summed when
/// scraped).
#[derive(Debug, Default)]
struct Histogram {
    /// Per bucket (not cumulative); the last one is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }
}

#[derive(Debug, Default)]
struct PerCommand {
    requests: AtomicU64,
    bytes: AtomicU64,
    latency: Histogram,
}

/// The request counters of one server.
#[derive(Debug, Default)]
pub struct Metrics {
    commands: [PerCommand; COMMANDS.len()],
    errors: [AtomicU64; ERRNOS.len()],
}

impl Metrics {
    /// A request executed: its command, the bytes it covered (read, written,
    /// trimmed, zeroed, queried) and how long it took until its reply was
    /// ready.
    pub fn request(&self, c: Command, bytes: u64, took: Duration) {
        if let Some(i) = command_index(c) {
            let m = &self.commands[i];
            m.requests.fetch_add(1, Relaxed);
            m.bytes.fetch_add(bytes, Relaxed);
            m.latency.observe(took);
        }
    }

    /// A request answered with an error.
    pub fn error(&self, e: NbdErrno) {
        if let Some(i) = ERRNOS.iter().position(|(n, _)| *n == e) {
            self.errors[i].fetch_add(1, Relaxed);
        }
    }

    /// The counters in the text format.
    pub fn encode(&self, out: &mut String) {
        let by_command = |f: fn(&PerCommand) -> &AtomicU64| {
            COMMANDS
                .iter()
                .zip(&self.commands)
                .map(move |(n, m)| (*n, f(m).load(Relaxed)))
        };
        counters(
            out,
            "flexnbd_requests_total",
            "Requests executed, by command.",
            "command",
            by_command(|m| &m.requests),
        );
        counters(
            out,
            "flexnbd_request_bytes_total",
            "Bytes covered by executed requests (read, written, trimmed, zeroed, queried), by command.",
            "command",
            by_command(|m| &m.bytes),
        );
        counters(
            out,
            "flexnbd_request_errors_total",
            "Requests answered with an error, by errno.",
            "errno",
            ERRNOS
                .iter()
                .zip(&self.errors)
                .map(|((_, n), c)| (*n, c.load(Relaxed))),
        );
        family(
            out,
            "flexnbd_request_duration_seconds",
            "histogram",
            "Time from the start of a request's execution until its reply was ready, by command.",
        );
        for (name, m) in COMMANDS.iter().zip(&self.commands) {
            let mut cum = 0u64;
            for (i, b) in BUCKETS.iter().enumerate() {
                cum += m.latency.counts[i].load(Relaxed);
                let le = format!("{b}");
                sample(
                    out,
                    "flexnbd_request_duration_seconds_bucket",
                    &[("command", name), ("le", &le)],
                    cum as f64,
                );
            }
            cum += m.latency.counts[BUCKETS.len()].load(Relaxed);
            sample(
                out,
                "flexnbd_request_duration_seconds_bucket",
                &[("command", name), ("le", "+Inf")],
                cum as f64,
            );
            let sum = m.latency.sum_ns.load(Relaxed) as f64 / 1e9;
            sample(
                out,
                "flexnbd_request_duration_seconds_sum",
                &[("command", name)],
                sum,
            );
            sample(
                out,
                "flexnbd_request_duration_seconds_count",
                &[("command", name)],
                cum as f64,
            );
        }
    }
}

/// A counter family with one sample per value of `label`.
fn counters<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: impl Iterator<Item = (&'a str, u64)>,
) {
    family(out, name, "counter", help);
    for (v, n) in values {
        sample(out, name, &[(label, v)], n as f64);
    }
}

/// `# HELP` and `# TYPE` of a metric family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One gauge family with one unlabelled sample.
pub fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    family(out, name, "gauge", help);
    sample(out, name, &[], value);
}

/// One sample line.
pub fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", number(value));
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_add_up() {
        let m = Metrics::default();
        m.request(Command::Write, 4096, Duration::from_micros(30));
        m.request(Command::Write, 8192, Duration::from_millis(3));
        m.request(Command::Read, 512, Duration::from_secs(2));
        m.request(Command::Disc, 0, Duration::ZERO);
        m.error(NbdErrno::Io);
        let mut s = String::new();
        m.encode(&mut s);
        for line in [
            "flexnbd_requests_total{command=\"write\"} 2",
            "flexnbd_request_bytes_total{command=\"write\"} 12288",
            "flexnbd_request_bytes_total{command=\"read\"} 512",
            "flexnbd_request_errors_total{errno=\"EIO\"} 1",
            "flexnbd_request_errors_total{errno=\"EPERM\"} 0",
            "flexnbd_request_duration_seconds_bucket{command=\"write\",le=\"0.00005\"} 1",
            "flexnbd_request_duration_seconds_bucket{command=\"write\",le=\"0.005\"} 2",
            "flexnbd_request_duration_seconds_bucket{command=\"read\",le=\"1\"} 0",
            "flexnbd_request_duration_seconds_bucket{command=\"read\",le=\"+Inf\"} 1",
            "flexnbd_request_duration_seconds_count{command=\"write\"} 2",
        ] {
            assert!(s.lines().any(|l| l == line), "{line} not in\n{s}");
        }
        assert!(s.contains("flexnbd_request_duration_seconds_sum{command=\"write\"} 0.00303"));
    }

    #[test]
    fn labels_are_escaped() {
        let mut s = String::new();
        sample(&mut s, "x", &[("a", "q\"b\\n\n")], 1.0);
        assert_eq!(s, "x{a=\"q\\\"b\\\\n\\n\"} 1\n");
    }
}
