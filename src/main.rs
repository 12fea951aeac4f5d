//! The `flexnbd` program (see `cli::program`).

fn main() {
    flexnbd::cli::program::main()
}
