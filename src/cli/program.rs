//! The programs' entry points: parse the command line, run it, report the
//! outcome. `flexnbd` invoked as `flexnbd-proxy` (a link to it) is the proxy,
//! as is the `flexnbd-proxy` program installed beside it.

use super::proxy::ProxyCli;
use super::{run, Cli};
use clap::error::ErrorKind;
use clap::Parser;

/// Exits with clap's verdict on the command line: help and version on
/// stdout (0); a missing subcommand or argument shows the help on stderr (1);
/// any other mistake is one line on stderr (1).
fn bad_args(e: clap::Error, program: &str) -> ! {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            std::process::exit(0);
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprint!("{}", e.render());
            std::process::exit(1);
        }
        _ => {
            let hint = match program {
                "flexnbd" => "flexnbd help".to_owned(),
                p => format!("{p} --help"),
            };
            eprintln!("{} (see '{hint}')", one_line(&e.render().to_string()));
            std::process::exit(1);
        }
    }
}

/// The proxy's own program (`flexnbd-proxy`).
pub fn proxy_main() -> ! {
    let cli = ProxyCli::try_parse().unwrap_or_else(|e| bad_args(e, "flexnbd-proxy"));
    match super::proxy::run(cli.args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("flexnbd-proxy: {e:#}");
            std::process::exit(1);
        }
    }
}

/// `flexnbd`.
pub fn main() -> ! {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name() == Some("flexnbd-proxy".as_ref()) {
        proxy_main();
    }
    let cli = Cli::try_parse().unwrap_or_else(|e| bad_args(e, "flexnbd"));
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("flexnbd: {e:#}");
            std::process::exit(1);
        }
    }
}

/// clap's message up to its usage part, on one line.
fn one_line(text: &str) -> String {
    let msg: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim_start().starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("tip:") && !l.starts_with("For more information")
        })
        .collect();
    if msg.is_empty() {
        "error: bad arguments".into()
    } else {
        msg.join(" ")
    }
}
