//! The `flexnbd-proxy` program: `flexnbd proxy` under the C version's name.

fn main() {
    flexnbd::cli::program::proxy_main()
}
