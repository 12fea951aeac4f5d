#!/usr/bin/env bash
# Runs the whole test suite: installs the Debian packages the tests drive when
# they are missing, then checks formatting and lints, runs every unit and
# integration test (release build: the integration tests move gigabytes), and
# builds, installs and checks the Debian package (scripts/deb-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root to install: $*" >&2; return 1; fi
}

need=()
for tool in nbdinfo nbdcopy nbdsh; do command -v "$tool" >/dev/null || need+=(libnbd-bin); done
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need+=(python3-libnbd)
for tool in qemu-img qemu-io qemu-nbd; do command -v "$tool" >/dev/null || need+=(qemu-utils); done
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v fio >/dev/null || need+=(fio)
command -v strace >/dev/null || need+=(strace)
command -v systemd-socket-activate >/dev/null || need+=(systemd)
command -v man >/dev/null || need+=(man-db)
command -v promtool >/dev/null || need+=(prometheus)
(command -v nc >/dev/null && nc -h 2>&1 | grep -- "-N" >/dev/null) || need+=(netcat-openbsd)
if [ ${#need[@]} -gt 0 ]; then
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get install -y -q --no-install-recommends "${need[@]}" ||
        { as_root apt-get update -q && as_root apt-get install -y -q --no-install-recommends "${need[@]}"; }
fi

if command -v rustup >/dev/null; then
    rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
    rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
cargo test --release --all-targets
# The Debian package: built, installed, checked, removed.
./scripts/deb-check.sh
