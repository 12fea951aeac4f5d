#!/usr/bin/env bash
# Checks kernel TLS end to end in a small VM, for machines whose own kernel
# has no `tls` module: boots Debian's kernel (downloaded with apt) with an
# initramfs holding flexnbd, nbdcopy and busybox, serves an image with
# `--tls require`, and copies it in and out with nbdcopy (gnutls) and
# flexnbd read/write --tls (rustls); the checksums must match, the log must
# say the kernel runs the record layer, and /proc/net/tls_stat must count
# the sessions. Needs root (apt), qemu-system-x86 (software emulation;
# KTLS_VM_KVM=1 tries KVM),
# busybox-static, kmod, cpio, openssl, libnbd-bin (missing ones are installed;
# on Debian 12, qemu-system-x86 replaces a backported qemu-utils with the
# release one). Prints PASS or FAIL.
#
#   scripts/ktls-vm-check.sh            # uses target/release/flexnbd
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${FLEXNBD_BIN:-$ROOT/target/release/flexnbd}
[ -x "$BIN" ] || (cd "$ROOT" && cargo build --release --quiet)
W=$(mktemp -d /tmp/ktls-vm.XXXXXX)
trap 'rm -rf "$W"' EXIT
export DEBIAN_FRONTEND=noninteractive
for p in qemu-system-x86:qemu-system-x86_64 busybox-static:busybox kmod:depmod cpio:cpio openssl:openssl libnbd-bin:nbdcopy; do
    command -v "${p#*:}" >/dev/null || apt-get install -y -q --no-install-recommends "${p%%:*}" >/dev/null
done
cd "$W"
KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
apt-get download "$KPKG" >/dev/null 2>&1
dpkg-deb -x ./*.deb k
KVER=${KPKG#linux-image-}
depmod -b k "$KVER"

R=$W/root
mkdir -p "$R"/{bin,sbin,proc,sys,dev,tmp,certs/server,certs/client,lib/modules}
cp /usr/bin/busybox "$R/bin/"
for t in sh mount ip dd md5sum sleep cat grep echo modprobe insmod poweroff head cmp ls; do
    ln -s busybox "$R/bin/$t"
done
ln -s ../bin/modprobe "$R/sbin/modprobe"
cp -a "k/lib/modules/$KVER" "$R/lib/modules/"
rm -rf "$R/lib/modules/$KVER/kernel/drivers" "$R/lib/modules/$KVER/kernel/sound" "$R/lib/modules/$KVER/kernel/fs"
cp "$BIN" "$R/bin/flexnbd"
cp "$(command -v nbdcopy)" "$R/bin/"
for b in "$BIN" "$(command -v nbdcopy)"; do
    ldd "$b" | awk '/=>/{print $3} /ld-linux/{print $1}' | while read -r lib; do
        [ -f "$lib" ] && mkdir -p "$R$(dirname "$lib")" && cp -L "$lib" "$R$lib"
    done
done
mkdir -p "$R/lib64" && cp -L /lib64/ld-linux-x86-64.so.2 "$R/lib64/"

"$ROOT/bench/make-certs.sh" "$W/pki"
for who in server client; do
    cp "$W/pki/ca-cert.pem" "$W/pki/$who-cert.pem" "$W/pki/$who-key.pem" "$R/certs/$who/"
done

cat > "$R/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
ip link set lo up
for m in gcm ghash-generic aesni-intel chacha20poly1305 tls; do modprobe $m 2>/dev/null; done
fail() { echo "KTLS-CHECK FAIL: $*"; cat /tmp/server.log; poweroff -f; }
dd if=/dev/urandom of=/tmp/disk.img bs=1M count=16 2>/dev/null
dd if=/dev/urandom of=/tmp/src.img bs=1M count=16 2>/dev/null
flexnbd serve --addr 127.0.0.1 --port 10809 --file /tmp/disk.img --tls require \
    --tls-certificates /certs/server -v 2>/tmp/server.log &
sleep 1
URI='nbds://127.0.0.1:10809/?tls-certificates=/certs/client'
nbdcopy "$URI" /tmp/back.img || fail "nbdcopy out"
[ "$(md5sum < /tmp/back.img)" = "$(md5sum < /tmp/disk.img)" ] || fail "copied out differs"
nbdcopy --flush /tmp/src.img "$URI" || fail "nbdcopy in"
[ "$(md5sum < /tmp/src.img)" = "$(md5sum < /tmp/disk.img)" ] || fail "copied in differs"
head -c 3145728 /tmp/src.img > /tmp/part
flexnbd read --addr 127.0.0.1 --port 10809 --from 0 --size 3145728 --tls \
    --tls-certificates /certs/client > /tmp/got || fail "flexnbd read --tls"
cmp /tmp/part /tmp/got || fail "flexnbd read --tls differs"
dd if=/dev/urandom of=/tmp/w bs=1M count=2 2>/dev/null
flexnbd write --addr 127.0.0.1 --port 10809 --from 1048576 --size 2097152 --tls \
    --tls-certificates /certs/client < /tmp/w || fail "flexnbd write --tls"
dd if=/tmp/disk.img of=/tmp/wback bs=1M skip=1 count=2 2>/dev/null
cmp /tmp/w /tmp/wback || fail "flexnbd write --tls differs"
grep -q "kernel TLS is not available" /tmp/server.log && fail "kernel TLS not used"
grep -q "TLSv1.3" /tmp/server.log || fail "no TLS session in the log"
cat /proc/net/tls_stat
grep -Eq "TlsTxSw[[:space:]]+[1-9]" /proc/net/tls_stat || fail "no kernel TLS TX session counted"
grep -Eq "TlsRxSw[[:space:]]+[1-9]" /proc/net/tls_stat || fail "no kernel TLS RX session counted"
grep -Eq "TlsDecryptError[[:space:]]+0$" /proc/net/tls_stat || fail "kernel TLS decrypt errors"
echo "KTLS-CHECK PASS"
poweroff -f
INIT
chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > initrd.gz
# Software emulation: nested KVM is not reliable enough to count on.
ACCEL=(-cpu max)
[ -n "${KTLS_VM_KVM:-}" ] && ACCEL=(-enable-kvm -cpu host)
timeout 600 qemu-system-x86_64 "${ACCEL[@]}" -m 2048 -smp 2 -nographic -no-reboot \
    -kernel "k/boot/vmlinuz-$KVER" -initrd initrd.gz \
    -append "console=ttyS0 panic=-1 loglevel=4" > vm.log 2>&1 || true
grep -E "KTLS-CHECK|Tls" vm.log || { tail -40 vm.log; echo FAIL; exit 1; }
grep -q "KTLS-CHECK PASS" vm.log && echo PASS || { tail -60 vm.log; echo FAIL; exit 1; }
