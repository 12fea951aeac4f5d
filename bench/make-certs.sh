#!/usr/bin/env bash
# Makes a throw-away certificate directory in the layout nbdkit, qemu and
# flexnbd use: DIR/ca-cert.pem (and its key), DIR/server-cert.pem and
# DIR/server-key.pem (for 127.0.0.1 and localhost), DIR/client-cert.pem and
# DIR/client-key.pem, all valid for two days. For benchmarks and checks,
# never for production.
#
#   bench/make-certs.sh DIR
set -euo pipefail
DIR=${1:?usage: make-certs.sh DIR}
command -v openssl >/dev/null || { echo "openssl is needed to make the certificates" >&2; exit 1; }
mkdir -p "$DIR"
cd "$DIR"
{
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=throw-away CA" -keyout ca-key.pem -out ca-cert.pem \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
    for who in server client; do
        eku=$([ $who = server ] && echo serverAuth || echo clientAuth)
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -subj "/CN=throw-away $who" -keyout $who-key.pem -out $who.csr
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=%s\n' $eku > $who.ext
        openssl x509 -req -in $who.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
            -days 2 -extfile $who.ext -out $who-cert.pem
        rm -f $who.csr $who.ext
    done
} >/dev/null 2>&1
