//! Wiring: builds the export, starts listeners, control socket and mirror; handles signals.

use crate::cli::listen::Rebind;
use crate::cli::serve::ServeOpts;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Listen,
}

pub fn run(_mode: Mode, _opts: &ServeOpts, _rebind: Option<Rebind>) -> anyhow::Result<i32> {
    anyhow::bail!("not yet")
}
