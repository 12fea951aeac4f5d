//! `flexnbd mirror`: ask a running server to migrate its image to another server.

use super::serve::{ip_arg, port_arg};
use super::Global;
use crate::control::client::{print_reply, request, Conversation};
use crate::control::grammar::{parse_status, unescape_value};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Start a migration from the server with control socket SOCK to the server
/// listening at ADDR:PORT. Returns "Migration started" once the local server has
/// connected to the destination and checked its greeting and size.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The address of the remote server to migrate to.
    #[arg(short = 'l', long, value_name = "ADDR", value_parser = ip_arg)]
    pub addr: IpAddr,
    /// The port of the remote server to migrate to.
    #[arg(short = 'p', long, value_name = "PORT", value_parser = port_arg)]
    pub port: u16,
    /// The control socket of the local server to migrate from.
    #[arg(short = 's', long, value_name = "SOCK")]
    pub sock: PathBuf,
    /// The local address to bind to (for a remote access control list).
    #[arg(short = 'b', long, value_name = "BIND_ADDR", value_parser = ip_arg)]
    pub bind: Option<IpAddr>,
    /// Remove the source file just before handing over.
    #[arg(short = 'u', long)]
    pub unlink: bool,
    /// Limit the migration to this many bytes per second.
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub max_speed: Option<u64>,
    /// Give up after this many failed attempts (default: retry forever).
    #[arg(long, value_name = "N")]
    pub retries: Option<u32>,
    /// Keep running with a progress display until the migration ends; exit 0 only on success.
    #[arg(short = 'w', long)]
    pub wait: bool,
    /// Migrate over TLS. The directory (default: the server's own
    /// --tls-certificates) holds the ca-cert.pem that signed the
    /// destination's certificate, and client-cert.pem and client-key.pem
    /// when the destination checks who is sending.
    #[arg(long)]
    pub tls: bool,
    /// The certificate directory, as the server sees it.
    #[arg(long, value_name = "DIR", requires = "tls")]
    pub tls_certificates: Option<PathBuf>,
    /// The name the destination's certificate must carry (default: ADDR).
    #[arg(long, value_name = "NAME", requires = "tls")]
    pub tls_hostname: Option<String>,
    /// The export to ask the destination for (its --export-name; default:
    /// the empty name).
    #[arg(long, value_name = "NAME", value_parser = control_line_name)]
    pub export_name: Option<String>,
    #[command(flatten)]
    pub global: Global,
}

/// An export name that fits on a control line (no line break).
fn control_line_name(s: &str) -> Result<String, String> {
    let s = super::names::export_name_arg(s)?;
    if s.contains(['\n', '\r']) {
        return Err("contains a line break".into());
    }
    Ok(s)
}

pub fn run(args: Args) -> anyhow::Result<i32> {
    args.global.apply();
    let mut lines = vec![
        "mirror".to_string(),
        args.addr.to_string(),
        args.port.to_string(),
        if args.unlink { "unlink" } else { "exit" }.to_string(),
        args.bind.map_or_else(|| "0".to_string(), |b| b.to_string()),
        args.max_speed.unwrap_or(0).to_string(),
    ];
    match (args.retries, args.wait) {
        (Some(n), _) => lines.push(n.to_string()),
        (None, true) => lines.push("forever".into()),
        (None, false) => {}
    }
    if args.wait {
        // The outcome comes as a second line on this connection, before
        // the server exits at a hand-over.
        lines.push("wait".into());
    }
    // TLS lines come last (after the positional ones).
    if args.tls {
        lines.push("tls".into());
        if let Some(d) = &args.tls_certificates {
            // The server may run elsewhere in the tree: it gets an absolute path.
            let d = std::path::absolute(d).unwrap_or_else(|_| d.clone());
            lines.push(format!("tls-certificates={}", d.display()));
        }
        if let Some(h) = &args.tls_hostname {
            lines.push(format!("tls-hostname={h}"));
        }
    }
    if let Some(n) = &args.export_name {
        lines.push(format!("export-name={n}"));
    }
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let mut conv = Conversation::open(&args.sock, &refs, Instant::now() + START_TIMEOUT)?;
    let reply = conv.reply(Some(Instant::now() + START_TIMEOUT))?;
    if reply.code != 0 {
        return Ok(print_reply(&reply));
    }
    println!("Migration started");
    if !args.wait {
        return Ok(0);
    }
    wait(&args.sock, conv)
}

/// Time for the server to connect to the destination and check its greeting.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How often progress is refreshed.
const POLL: Duration = Duration::from_millis(500);

/// Shows progress until the server sends the outcome; 0 only when it succeeded.
fn wait(sock: &Path, mut conv: Conversation) -> anyhow::Result<i32> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(conv.reply(None));
    });
    let mut progress = Progress::new();
    loop {
        match rx.recv_timeout(POLL) {
            Ok(r) => {
                progress.finish();
                return match r {
                    Ok(reply) => Ok(print_reply(&reply)),
                    Err(e) => anyhow::bail!(
                        "lost contact with the server before it reported the outcome: {e}"
                    ),
                };
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(reply) = request(sock, &["status"]) {
                    if reply.code == 0 {
                        progress.update(&reply.text);
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("lost contact with the server")
            }
        }
    }
}

/// A progress bar on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    last_line: Instant,
}

/// What one status line says about a migration.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    size: u64,
    left: u64,
    speed: u64,
    eta: Option<u64>,
    state: String,
    attempts: u64,
    retry_in: Option<u64>,
    error: Option<String>,
}

impl Seen {
    fn parse(status: &str) -> Option<Seen> {
        let pairs = parse_status(status).ok()?;
        let text = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let num = |k: &str| text(k).and_then(|v| v.parse::<u64>().ok());
        Some(Seen {
            size: num("size")?,
            left: num("migration_bytes_left")?,
            speed: num("migration_speed").unwrap_or(0),
            eta: num("migration_seconds_left"),
            state: text("migration_state").unwrap_or_default(),
            attempts: num("migration_attempts").unwrap_or(0),
            retry_in: num("migration_retry_in"),
            error: text("migration_last_error").map(|e| unescape_value(&e)),
        })
    }

    /// What to say after the byte counts.
    fn message(&self) -> String {
        if self.state == "retrying" {
            let reason = self.error.as_deref().unwrap_or("the last attempt failed");
            return format!(
                "retrying in {}s (attempt {}): {reason}",
                self.retry_in.unwrap_or(0),
                self.attempts
            );
        }
        let eta = match self.eta {
            Some(s) => format!("ETA {s}s"),
            None => "ETA unknown".into(),
        };
        let state = match self.state.as_str() {
            "" | "copying" => String::new(),
            s => format!(", {s}"),
        };
        format!("{}/s, {eta}{state}", HumanBytes(self.speed))
    }
}

impl Progress {
    fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        });
        Progress {
            bar,
            last_line: Instant::now() - Duration::from_secs(60),
        }
    }

    fn update(&mut self, status: &str) {
        let Some(seen) = Seen::parse(status) else {
            return;
        };
        let done = seen.size.saturating_sub(seen.left);
        match &self.bar {
            Some(b) => {
                b.set_length(seen.size);
                b.set_position(done);
                b.set_message(seen.message());
            }
            None => {
                if self.last_line.elapsed() >= Duration::from_secs(2) {
                    self.last_line = Instant::now();
                    eprintln!("migrated {done} of {} bytes, {}", seen.size, seen.message());
                }
            }
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_messages() {
        let base = "pid=1 size=100 is_mirroring=true clients_allowed=true num_clients=0 \
                    has_control=true migration_speed=10 migration_duration=3";
        let s = Seen::parse(&format!(
            "{base} migration_seconds_left=6 migration_bytes_left=60 migration_attempts=1 \
             migration_state=copying"
        ))
        .unwrap();
        assert_eq!(s.message(), "10 B/s, ETA 6s");
        let s = Seen::parse(&format!(
            "{base} migration_bytes_left=60 migration_attempts=1 migration_state=active"
        ))
        .unwrap();
        assert_eq!(s.message(), "10 B/s, ETA unknown, active");
        let s = Seen::parse(&format!(
            "{base} migration_bytes_left=100 migration_attempts=2 migration_state=retrying \
             migration_retry_in=4 migration_last_error=connection%20closed"
        ))
        .unwrap();
        assert_eq!(s.message(), "retrying in 4s (attempt 2): connection closed");
    }
}
