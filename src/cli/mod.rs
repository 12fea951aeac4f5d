//! Command-line interface: one module per subcommand, each with its `Args` and `run()`.

use clap::{Args, Parser, Subcommand};

pub mod acl;
pub mod break_cmd;
pub mod listen;
pub mod mirror;
pub mod mirror_speed;
pub mod names;
pub mod pause;
pub mod program;
pub mod proxy;
pub mod read;
pub mod serve;
pub mod status;
pub mod tls;
pub mod write;

/// flexnbd - a fast NBD server with live migration.
#[derive(Debug, Parser)]
#[command(
    name = "flexnbd",
    version,
    disable_help_subcommand = false,
    subcommand_required = true,
    arg_required_else_help = true,
    after_help = "Run 'flexnbd help COMMAND' for the options of a command."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a file over NBD.
    Serve(serve::Args),
    /// Listen for an inbound migration, then serve the file once it has arrived.
    Listen(listen::Args),
    /// Start migrating the image of a running server to another server.
    Mirror(mirror::Args),
    /// Change the speed limit of a running migration.
    MirrorSpeed(mirror_speed::Args),
    /// Stop a running migration.
    Break(break_cmd::Args),
    /// Replace the access control list of a running server.
    Acl(acl::Args),
    /// Print the status of a running server.
    Status(status::Args),
    /// Pause request processing (for a consistent copy of the image).
    Pause(pause::PauseArgs),
    /// End a pause.
    Resume(pause::ResumeArgs),
    /// Pause, run a command (a copy of the image), then resume whatever happens.
    Snapshot(pause::SnapshotArgs),
    /// Proxy NBD clients to a server, riding out its restarts and migrations.
    Proxy(proxy::Args),
    /// Read bytes from an NBD server to stdout in a single request.
    Read(read::Args),
    /// Write bytes from stdin to an NBD server in a single request.
    Write(write::Args),
}

/// Options every subcommand takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Output all available log information to stderr.
    #[arg(short, long, overrides_with = "quiet")]
    pub verbose: bool,
    /// Output as little log information as possible to stderr.
    #[arg(short, long, overrides_with = "verbose")]
    pub quiet: bool,
}

impl Global {
    /// Applies `--verbose`/`--quiet` (the last one given wins).
    pub fn apply(&self) {
        use crate::log::{set_level, verbose_level, Level};
        if self.quiet {
            set_level(Level::Fatal);
        } else if self.verbose {
            set_level(verbose_level());
        }
    }
}

/// Runs the parsed command; the returned value is the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Listen(a) => listen::run(a),
        Command::Mirror(a) => mirror::run(a),
        Command::MirrorSpeed(a) => mirror_speed::run(a),
        Command::Break(a) => break_cmd::run(a),
        Command::Acl(a) => acl::run(a),
        Command::Status(a) => status::run(a),
        Command::Pause(a) => pause::run_pause(a),
        Command::Resume(a) => pause::run_resume(a),
        Command::Snapshot(a) => pause::run_snapshot(a),
        Command::Proxy(a) => proxy::run(a),
        Command::Read(a) => read::run(a),
        Command::Write(a) => write::run(a),
    }
}
