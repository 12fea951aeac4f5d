//! `flexnbd pause`, `resume` and `snapshot`: consistent copies of running
//! images. Every pause is a lease on the server (it ends by itself at its
//! timeout); `snapshot` holds its pauses on open control connections, so
//! they end whatever happens to it, even SIGKILL.

use super::serve::seconds_arg;
use super::Global;
use crate::control::client::{print_reply, request, Conversation, DEFAULT_TIMEOUT};
use crate::control::grammar::{parse_status, unescape_value};
use crate::control::Reply;
use anyhow::{anyhow, bail, Context};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Pause request processing on one or more servers (answers once requests
/// in flight are done and each image is flushed).
///
/// With several --sock, all are paused or none: if one fails, those
/// already paused are resumed and the error names the one that failed.
#[derive(Debug, Clone, clap::Args)]
pub struct PauseArgs {
    /// The control socket of a server to pause (repeat for several).
    #[arg(short = 's', long, value_name = "SOCK", required = true)]
    pub sock: Vec<PathBuf>,
    /// The pause ends by itself after this many seconds.
    #[arg(short = 't', long, value_name = "SECONDS", default_value = "60", value_parser = seconds_arg)]
    pub timeout: Duration,
    /// Stay in the foreground holding the pause: it ends when this process
    /// ends (or is killed), or at the timeout, whichever is first.
    #[arg(long)]
    pub hold: bool,
    #[command(flatten)]
    pub global: Global,
}

/// End the pauses of one or more servers.
#[derive(Debug, Clone, clap::Args)]
pub struct ResumeArgs {
    /// The control socket of a server to resume (repeat for several).
    #[arg(short = 's', long, value_name = "SOCK", required = true)]
    pub sock: Vec<PathBuf>,
    /// End only this pause (its id, from the reply to `pause`).
    #[arg(long, value_name = "ID")]
    pub id: Option<u64>,
    #[command(flatten)]
    pub global: Global,
}

/// Pause one or more servers, run COMMAND, then resume them, whatever the
/// command does.
///
/// The command sees FLEXNBD_FILE and FLEXNBD_SIZE (the first server's image
/// and its size) and FLEXNBD_FILE_N / FLEXNBD_SIZE_N for the N-th --sock
/// (from 1). It runs in a process group of its own; past --timeout the whole
/// group is killed. SIGINT, SIGTERM and SIGHUP kill the command and resume;
/// SIGKILL closes the control connections, which ends the pauses.
#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotArgs {
    /// The control socket of a server to pause (repeat for several).
    #[arg(short = 's', long, value_name = "SOCK", required = true)]
    pub sock: Vec<PathBuf>,
    /// Seconds the command may run; then it is killed and the servers resume.
    #[arg(short = 't', long, value_name = "SECONDS", default_value = "60", value_parser = seconds_arg)]
    pub timeout: Duration,
    /// The command and its arguments (after `--`).
    #[arg(required = true, last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
    #[command(flatten)]
    pub global: Global,
}

/// Extra lease beyond the command's timeout: the command is killed before
/// the servers resume by themselves.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// How long a killed command's group gets after SIGTERM before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// One server paused by this process.
struct Paused {
    sock: PathBuf,
    id: u64,
    file: String,
    size: u64,
    /// The held pause's connection (`None` for a timed pause).
    conn: Option<Conversation>,
}

impl Paused {
    /// Ends this pause: `resume ID`, then the held connection is closed.
    fn resume(mut self) -> anyhow::Result<()> {
        let id = self.id.to_string();
        let r = request(&self.sock, &["resume", &id]);
        self.conn.take();
        match r {
            Ok(r) if r.code == 0 => Ok(()),
            // Already over (its timeout): nothing left to end.
            Ok(r) if r.text.starts_with("no pause") => Ok(()),
            Ok(r) => Err(anyhow!(
                "{}: resume failed: {}",
                self.sock.display(),
                r.text
            )),
            Err(e) => Err(anyhow!(e).context(format!("{}: cannot resume", self.sock.display()))),
        }
    }
}

/// The `key=value` fields of a `pause` reply (`paused id=N ... file=F`).
fn parse_paused(sock: &Path, r: &Reply, conn: Option<Conversation>) -> anyhow::Result<Paused> {
    let fields = parse_status(r.text.trim_start_matches("paused"))
        .map_err(|e| anyhow!("{}: unexpected reply {:?}: {e}", sock.display(), r.text))?;
    let get = |k: &str| {
        fields
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let id = get("id").and_then(|v| v.parse().ok());
    let size = get("size").and_then(|v| v.parse().ok());
    match (id, size, get("file")) {
        (Some(id), Some(size), Some(file)) => Ok(Paused {
            sock: sock.to_path_buf(),
            id,
            size,
            file: unescape_value(file),
            conn,
        }),
        _ => bail!(
            "{}: unexpected reply to pause: {:?}",
            sock.display(),
            r.text
        ),
    }
}

/// Pauses every server in order; on a failure resumes those already paused
/// and names the one that failed.
fn pause_all(socks: &[PathBuf], timeout: Duration, hold: bool) -> anyhow::Result<Vec<Paused>> {
    let mut done: Vec<Paused> = Vec::new();
    for sock in socks {
        match pause_one(sock, timeout, hold) {
            Ok(p) => done.push(p),
            Err(e) => {
                for p in done.into_iter().rev() {
                    let s = p.sock.clone();
                    if let Err(re) = p.resume() {
                        eprintln!(
                            "flexnbd: {re:#} (while undoing the pause of {})",
                            s.display()
                        );
                    }
                }
                return Err(e.context(format!("cannot pause {}", sock.display())));
            }
        }
    }
    Ok(done)
}

fn pause_one(sock: &Path, timeout: Duration, hold: bool) -> anyhow::Result<Paused> {
    let secs = format!("{:.3}", timeout.as_secs_f64());
    let mut lines = vec!["pause", secs.as_str()];
    if hold {
        lines.push("hold");
    }
    // Draining and flushing can take up to the timeout itself.
    let deadline = Instant::now() + timeout + DEFAULT_TIMEOUT;
    let mut c = Conversation::open(sock, &lines, deadline)?;
    let r = c.reply(Some(deadline))?;
    if r.code != 0 {
        bail!("{}", r.text);
    }
    parse_paused(sock, &r, hold.then_some(c))
}

pub fn run_pause(args: PauseArgs) -> anyhow::Result<i32> {
    args.global.apply();
    let paused = pause_all(&args.sock, args.timeout, args.hold)?;
    for p in &paused {
        println!("{}: paused (pause {})", p.sock.display(), p.id);
    }
    if !args.hold {
        return Ok(0);
    }
    // Held until this process ends or the servers end the pauses (timeout,
    // `resume`): each connection then says so, or closes.
    let stop = Arc::new(AtomicUsize::new(0));
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        signal_hook::flag::register_usize(sig, stop.clone(), sig as usize)
            .context("cannot install signal handlers")?;
    }
    let mut paused = paused;
    while !paused.is_empty() && stop.load(SeqCst) == 0 {
        paused.retain_mut(|p| {
            let Some(c) = p.conn.as_mut() else {
                return false;
            };
            match c.reply(Some(Instant::now() + Duration::from_millis(100))) {
                Err(crate::control::client::ControlClientError::Timeout { .. }) => true,
                Ok(r) => {
                    eprintln!("{}: {}", p.sock.display(), r.text);
                    false
                }
                Err(_) => {
                    eprintln!("{}: pause ended (connection closed)", p.sock.display());
                    false
                }
            }
        });
    }
    let sig = stop.load(SeqCst);
    for p in paused {
        p.resume()?;
    }
    Ok(if sig == 0 { 0 } else { 128 + sig as i32 })
}

pub fn run_resume(args: ResumeArgs) -> anyhow::Result<i32> {
    args.global.apply();
    let id = args.id.map(|i| i.to_string());
    let mut worst = 0;
    for sock in &args.sock {
        let mut lines = vec!["resume"];
        if let Some(i) = &id {
            lines.push(i);
        }
        let r =
            request(sock, &lines).with_context(|| format!("cannot resume {}", sock.display()))?;
        if args.sock.len() > 1 {
            print!("{}: ", sock.display());
        }
        worst = worst.max(print_reply(&r));
    }
    Ok(worst)
}

/// How the command ended.
enum Outcome {
    Exited(ExitStatus),
    TimedOut,
    Signalled(i32),
}

/// Kills the command's process group: SIGTERM, then SIGKILL after a grace.
fn kill_group(child: &mut Child) {
    crate::child::kill_group(child, KILL_GRACE);
}

pub fn run_snapshot(args: SnapshotArgs) -> anyhow::Result<i32> {
    args.global.apply();
    let stop = Arc::new(AtomicUsize::new(0));
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        signal_hook::flag::register_usize(sig, stop.clone(), sig as usize)
            .context("cannot install signal handlers")?;
    }
    let Some((prog, rest)) = args.command.split_first() else {
        bail!("snapshot: no command given (after --)");
    };
    let paused = pause_all(&args.sock, args.timeout + LEASE_MARGIN, true)?;
    let mut cmd = Command::new(prog);
    cmd.args(rest).process_group(0);
    cmd.env("FLEXNBD_FILE", &paused[0].file)
        .env("FLEXNBD_SIZE", paused[0].size.to_string());
    for (i, p) in paused.iter().enumerate() {
        cmd.env(format!("FLEXNBD_FILE_{}", i + 1), &p.file)
            .env(format!("FLEXNBD_SIZE_{}", i + 1), p.size.to_string());
    }
    let outcome = match cmd.spawn() {
        Err(e) => Err(anyhow!(e).context(format!("cannot run {}", prog.to_string_lossy()))),
        Ok(mut child) => {
            let end = Instant::now() + args.timeout;
            let o = loop {
                match child.try_wait() {
                    Ok(Some(st)) => break Outcome::Exited(st),
                    Ok(None) => {}
                    Err(_) => {
                        kill_group(&mut child);
                        break Outcome::Exited(ExitStatus::from_raw(1 << 8));
                    }
                }
                let sig = stop.load(SeqCst);
                if sig != 0 {
                    kill_group(&mut child);
                    break Outcome::Signalled(sig as i32);
                }
                if Instant::now() >= end {
                    kill_group(&mut child);
                    break Outcome::TimedOut;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            Ok(o)
        }
    };
    // Resume whatever happened.
    let mut resume_err = None;
    for p in paused {
        if let Err(e) = p.resume() {
            eprintln!("flexnbd: {e:#}");
            resume_err.get_or_insert(e);
        }
    }
    let code = match outcome? {
        Outcome::Exited(st) => crate::child::exit_code(st),
        Outcome::TimedOut => {
            eprintln!(
                "flexnbd: snapshot: {} did not finish within {:.3} s; killed it",
                prog.to_string_lossy(),
                args.timeout.as_secs_f64()
            );
            124
        }
        Outcome::Signalled(s) => {
            eprintln!("flexnbd: snapshot: stopped by signal {s}; killed the command");
            128 + s
        }
    };
    if let Some(e) = resume_err {
        return Err(e.context("the command ran, but resuming failed"));
    }
    Ok(code)
}
