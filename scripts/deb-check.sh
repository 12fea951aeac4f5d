#!/usr/bin/env bash
# Builds the Debian package (`cargo xtask assets`, then `cargo deb`),
# installs it, and checks what it installed: the files, the installed
# binaries, every man page rendering, the bash completion loading, and a
# socket-activated serve of the installed binary read by nbdinfo. Removes
# the package afterwards. Needs root (or sudo) for dpkg.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root for: $*" >&2; return 1; fi
}
fail() { echo "deb-check: $*" >&2; exit 1; }

command -v cargo-deb >/dev/null || cargo install --quiet --locked cargo-deb
cargo xtask assets
cargo deb --quiet
deb=$(ls -t target/debian/flexnbd_*.deb | head -1)
echo "deb-check: installing $deb"
as_root dpkg -i "$deb" >/dev/null
trap 'as_root dpkg -r flexnbd >/dev/null' EXIT

files=$(dpkg -L flexnbd)
subs=(serve listen mirror mirror-speed break acl status pause resume snapshot proxy read write)
want=(/usr/bin/flexnbd /usr/bin/flexnbd-proxy /usr/share/man/man1/flexnbd.1.gz
      /usr/share/man/man1/flexnbd-proxy.1.gz
      /usr/share/bash-completion/completions/flexnbd /usr/share/zsh/vendor-completions/_flexnbd
      /usr/share/fish/vendor_completions.d/flexnbd.fish
      /lib/systemd/system/flexnbd@.service /lib/systemd/system/flexnbd@.socket
      /usr/share/doc/flexnbd/README.md)
for s in "${subs[@]}"; do want+=("/usr/share/man/man1/flexnbd-$s.1.gz"); done
for f in "${want[@]}"; do
    grep -qx -- "$f" <<<"$files" || fail "the package lacks $f"
    [ -e "$f" ] || fail "$f not installed"
done

version=$(/usr/bin/flexnbd --version)
[ "$version" = "flexnbd $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)" ] ||
    fail "unexpected version: $version"
/usr/bin/flexnbd-proxy --version | grep -q '^flexnbd-proxy ' || fail "flexnbd-proxy --version"

# Every page renders, and says what the help says.
for page in flexnbd flexnbd-proxy "${subs[@]/#/flexnbd-}"; do
    out=$(MANWIDTH=100 man -l "/usr/share/man/man1/$page.1.gz" 2>&1) || fail "man -l $page: $out"
    grep -q "${page^^}" <<<"$out" || fail "$page.1 has no title"
done
man_serve=$(MANWIDTH=200 man -l /usr/share/man/man1/flexnbd-serve.1.gz 2>/dev/null)
for opt in $(/usr/bin/flexnbd help serve | grep -o -- '--[a-z][a-z-]*' | sort -u); do
    grep -q -- "$opt" <<<"$man_serve" || fail "flexnbd-serve.1 lacks $opt (in the help)"
done
if command -v mandb >/dev/null; then
    MANWIDTH=100 man flexnbd >/dev/null 2>&1 || fail "man flexnbd"
fi

# The bash completion loads and completes subcommands.
bash -c '. /usr/share/bash-completion/completions/flexnbd && complete -p flexnbd' >/dev/null ||
    fail "the bash completion does not load"

# A socket-activated serve of the installed binary.
dir=$(mktemp -d)
trap 'rm -rf "$dir"; as_root dpkg -r flexnbd >/dev/null' EXIT
truncate -s 4M "$dir/disk.img"
systemd-socket-activate -l "$dir/nbd.sock" /usr/bin/flexnbd serve --file "$dir/disk.img" -q &
act=$!
ok=
for _ in $(seq 100); do
    if size=$(nbdinfo --size "nbd+unix:///?socket=$dir/nbd.sock" 2>/dev/null); then ok=1; break; fi
    sleep 0.1
done
kill "$act" 2>/dev/null || true
wait "$act" 2>/dev/null || true
[ -n "$ok" ] && [ "$size" = 4194304 ] || fail "socket-activated serve of the installed binary"
echo "deb-check: $deb installs and works"
