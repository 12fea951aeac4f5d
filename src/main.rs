//! The `flexnbd` binary: parse the command line, run it, report the outcome.

use clap::error::ErrorKind;
use clap::Parser;
use flexnbd::cli::{run, Cli};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                let _ = e.print();
                std::process::exit(0);
            }
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                eprint!("{}", e.render());
                std::process::exit(1);
            }
            _ => {
                eprintln!("{} (see 'flexnbd help')", one_line(&e.render().to_string()));
                std::process::exit(1);
            }
        },
    };
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
