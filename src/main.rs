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
                let text = e.render().to_string();
                let first = text.lines().next().unwrap_or("error: bad arguments");
                eprintln!("{first} (see 'flexnbd help')");
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
