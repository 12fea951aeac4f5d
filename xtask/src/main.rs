//! `cargo xtask assets [DIR]` (default `target/assets`): writes the man
//! pages and shell completions of `flexnbd` and `flexnbd-proxy`, generated
//! from the same clap definitions as their `--help`, so nothing is written
//! by hand twice:
//!
//! - `man/flexnbd.1.gz`, one `man/flexnbd-COMMAND.1.gz` per subcommand
//!   (`flexnbd-proxy.1.gz` is the `flexnbd-proxy` program's page, whose
//!   options are those of `flexnbd proxy`);
//! - `completions/flexnbd.bash`, `completions/_flexnbd`,
//!   `completions/flexnbd.fish`, and the same for `flexnbd-proxy`.

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;
use flate2::{write::GzEncoder, Compression};
use std::io::Write;
use std::path::{Path, PathBuf};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("assets") => {
            let out = match args.next() {
                Some(d) => PathBuf::from(d),
                None => workspace_root().join("target/assets"),
            };
            assets(&out)?;
            println!("wrote {}", out.display());
            Ok(())
        }
        _ => bail!("usage: cargo xtask assets [DIR]"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn assets(out: &Path) -> Result<()> {
    let man = out.join("man");
    let comp = out.join("completions");
    for d in [&man, &comp] {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let flexnbd = flexnbd::cli::Cli::command();
    let proxy = flexnbd::cli::proxy::ProxyCli::command();
    man_pages(&flexnbd, &man)?;
    man_page(&proxy, "flexnbd-proxy", &man)?;
    for cmd in [flexnbd, proxy] {
        completions(cmd, &comp)?;
    }
    Ok(())
}

/// `flexnbd.1` and `flexnbd-SUB.1` for every subcommand.
fn man_pages(cmd: &clap::Command, dir: &Path) -> Result<()> {
    let name = cmd.get_name().to_owned();
    man_page(cmd, &name, dir)?;
    for sub in cmd.get_subcommands() {
        // `proxy`'s page is the flexnbd-proxy program's (same options).
        if matches!(sub.get_name(), "help" | "proxy") {
            continue;
        }
        let page = format!("{name}-{}", sub.get_name());
        // The page's title and usage line name the whole command.
        let sub = sub
            .clone()
            .name(page.clone())
            .bin_name(format!("{name} {}", sub.get_name()));
        man_page(&sub, &page, dir)?;
    }
    Ok(())
}

fn man_page(cmd: &clap::Command, page: &str, dir: &Path) -> Result<()> {
    let mut roff = Vec::new();
    let man = clap_mangen::Man::new(cmd.clone())
        .title(page.to_uppercase())
        .section("1")
        .source(format!("flexnbd {}", env!("CARGO_PKG_VERSION")))
        .manual("flexnbd manual");
    man.render(&mut roff)?;
    let path = dir.join(format!("{page}.1.gz"));
    let f = std::fs::File::create(&path).with_context(|| format!("{}", path.display()))?;
    let mut gz = GzEncoder::new(f, Compression::best());
    gz.write_all(&roff)?;
    gz.finish()?;
    Ok(())
}

fn completions(mut cmd: clap::Command, dir: &Path) -> Result<()> {
    let name = cmd.get_name().to_owned();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, dir)?;
    }
    Ok(())
}
