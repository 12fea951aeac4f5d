//! Commands flexnbd runs and waits for (`snapshot`'s command, `serve
//! --run`): each in a process group of its own, so stopping it stops what
//! it started; its exit status as a shell gives it.

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// The exit code a shell reports for `st`: the command's own, or 128 plus
/// the signal that killed it.
pub fn exit_code(st: ExitStatus) -> i32 {
    match (st.code(), st.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    }
}

/// Stops `child`'s process group (it was started with `process_group(0)`):
/// SIGTERM, then SIGKILL to whatever is left after `grace`; reaps it.
pub fn kill_group(child: &mut Child, grace: Duration) {
    let pgid = child.id();
    let _ = crate::sys::kill_group(pgid, libc::SIGTERM);
    let end = Instant::now() + grace;
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Whatever is left of the group (the command may have started others).
    let _ = crate::sys::kill_group(pgid, libc::SIGKILL);
    let _ = child.wait();
}
