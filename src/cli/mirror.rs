//! `flexnbd mirror`: ask a running server to migrate its image to another server.

use super::serve::{ip_arg, port_arg};
use super::Global;
use crate::control::client::{print_reply, request, request_with_timeout};
use crate::control::grammar::parse_status;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::Path;
use std::path::PathBuf;
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
    #[command(flatten)]
    pub global: Global,
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
    if let Some(n) = args.retries {
        lines.push(n.to_string());
    }
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let reply = request_with_timeout(&args.sock, &refs, START_TIMEOUT)?;
    if reply.code != 0 {
        return Ok(print_reply(&reply));
    }
    println!("Migration started");
    if !args.wait {
        return Ok(0);
    }
    wait(&args.sock)
}

/// Time for the server to connect to the destination and check its greeting.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How often progress is refreshed.
const POLL: Duration = Duration::from_millis(500);

/// Shows progress until the migration ends; 0 only when it succeeded.
fn wait(sock: &Path) -> anyhow::Result<i32> {
    let (tx, rx) = mpsc::channel();
    let s = sock.to_path_buf();
    std::thread::spawn(move || {
        let r = request_with_timeout(&s, &["mirror_wait"], Duration::from_secs(u32::MAX as u64));
        let _ = tx.send(r);
    });
    let mut progress = Progress::new();
    loop {
        match rx.recv_timeout(POLL) {
            Ok(r) => {
                progress.finish();
                return match r {
                    Ok(reply) => Ok(print_reply(&reply)),
                    Err(e) => anyhow::bail!("lost contact with the server while waiting: {e}"),
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
        let Ok(pairs) = parse_status(status) else {
            return;
        };
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .and_then(|(_, v)| v.parse::<u64>().ok())
        };
        let (Some(size), Some(left)) = (get("size"), get("migration_bytes_left")) else {
            return;
        };
        let speed = get("migration_speed").unwrap_or(0);
        let eta = get("migration_seconds_left").unwrap_or(0);
        let done = size.saturating_sub(left);
        match &self.bar {
            Some(b) => {
                b.set_length(size);
                b.set_position(done);
                b.set_message(format!("{}/s, ETA {eta}s", HumanBytes(speed)));
            }
            None => {
                if self.last_line.elapsed() >= Duration::from_secs(2) {
                    self.last_line = Instant::now();
                    eprintln!(
                        "migrated {done} of {size} bytes, {speed} bytes/s, about {eta}s left"
                    );
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
