//! The README's command table and the CLI agree: every subcommand `flexnbd
//! help` lists is in the table, and the table names no other. (The man
//! pages and completions are generated from the same definitions by `cargo
//! xtask assets`; `scripts/deb-check.sh` checks the installed ones.)

use clap::CommandFactory;
use std::collections::BTreeSet;

#[test]
fn the_readme_lists_every_command_and_no_other() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("## Commands").expect("a Commands section");
    let mut in_table = BTreeSet::new();
    // The first table of the section.
    let table = readme[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'));
    for line in table {
        let Some(cell) = line.strip_prefix("| ").and_then(|l| l.split(" |").next()) else {
            continue;
        };
        for name in cell.split(", ") {
            if let Some(n) = name
                .strip_prefix('`')
                .and_then(|n| n.split(['`', ' ']).next())
            {
                in_table.insert(n.to_owned());
            }
        }
    }
    let cli: BTreeSet<String> = flexnbd::cli::Cli::command()
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .chain(["help".to_owned()])
        .collect();
    assert_eq!(in_table, cli, "README command table vs the CLI");
}
