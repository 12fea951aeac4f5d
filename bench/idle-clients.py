#!/usr/bin/env python3
"""Resources under many idle clients, and the --max-clients cap.

Starts `flexnbd serve` on a 64 MiB tmpfs image with a control socket, opens
N connections that finish the handshake (NBD_OPT_GO) and then stay idle, and
prints the server's threads, RSS and open descriptors (from /proc), how many
connections were admitted and how many were closed at accept, and whether a
control `status` and a read on an admitted connection are still answered.

    bench/idle-clients.py [--bin target/release/flexnbd] [--clients 1000]
                          [--max-clients 2000]

Runs on loopback and stops everything it starts.
"""

import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054


def proc(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split()[1]
    return "?"


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def control(sock, line):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(sock)
    s.sendall(line.encode() + b"\n")
    s.shutdown(socket.SHUT_WR)
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    s.close()
    return out.decode()


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed")
        b += c
    return b


def negotiated(port):
    """A connection after NBD_OPT_GO, or None if the server closed it."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        g = recv_exact(s, 18)
    except (EOFError, ConnectionResetError):
        s.close()
        return None
    assert struct.unpack(">Q", g[:8])[0] == NBDMAGIC
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, 6) + struct.pack(">IH", 0, 0))
    while True:
        h = recv_exact(s, 20)
        _, _, kind, ln = struct.unpack(">QIII", h)
        recv_exact(s, ln)
        if kind == 1:
            return s
        assert kind == 3, hex(kind)


def read_ok(s, cookie):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, 0, 4096))
    h = recv_exact(s, 16)
    magic, err, c = struct.unpack(">IIQ", h)
    recv_exact(s, 4096)
    return magic == 0x67446698 and err == 0 and c == cookie


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/flexnbd")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--max-clients", type=int, default=None)
    a = ap.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    d = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    img, ctl = os.path.join(d, "img"), os.path.join(d, "ctl")
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    args = [a.bin, "serve", "--addr", "127.0.0.1", "--port", str(port), "--file", img,
            "--sock", ctl]
    if a.max_clients is not None:
        args += ["--max-clients", str(a.max_clients)]
    log = open(os.path.join(d, "log"), "w+")
    srv = subprocess.Popen(args, stderr=log)
    conns = []
    try:
        deadline = time.time() + 20
        while not os.path.exists(ctl):
            if time.time() > deadline or srv.poll() is not None:
                sys.exit("server did not start")
            time.sleep(0.05)
        base = (proc(srv.pid, "Threads"), proc(srv.pid, "VmRSS"), fds(srv.pid))
        refused = 0
        t0 = time.time()
        for _ in range(a.clients):
            c = negotiated(port)
            if c is None:
                refused += 1
            else:
                conns.append(c)
        took = time.time() - t0
        time.sleep(3)  # let extra workers retire (2 s idle)
        st = control(ctl, "status")
        num = [f for f in st.split() if f.startswith("num_clients=")]
        t1 = time.time()
        st_ok = "size=" in control(ctl, "status")
        st_ms = (time.time() - t1) * 1000
        reads = all(read_ok(c, i) for i, c in enumerate(conns[:: max(1, len(conns) // 10)]))
        print(f"clients tried {a.clients}, admitted {len(conns)}, closed at accept {refused} "
              f"(in {took:.1f} s); control status: {num[0] if num else st!r}")
        print(f"before: threads {base[0]}, RSS {base[1]} kB, fds {base[2]}")
        print(f"idle:   threads {proc(srv.pid, 'Threads')}, RSS {proc(srv.pid, 'VmRSS')} kB, "
              f"fds {fds(srv.pid)}")
        print(f"status answered: {st_ok} ({st_ms:.1f} ms); reads on admitted connections: {reads}")
    finally:
        for c in conns:
            c.close()
        srv.terminate()
        try:
            srv.wait(10)
        except subprocess.TimeoutExpired:
            srv.kill()
        log.seek(0)
        err = log.read()
        lines = [l for l in err.splitlines() if "max-clients" in l]
        print(f"log lines about the limit: {len(lines)}" + (f": {lines[0]}" if lines else ""))
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
