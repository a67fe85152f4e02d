#!/usr/bin/env python3
"""Slowloris and open-file exhaustion against `natter serve` (issue 14). Loopback only.

    cargo build -p natter && python3 bench/slowloris.py target/debug/natter [-- SERVER ARGS...]
    e.g. python3 bench/slowloris.py target/debug/natter -- --http-header-timeout-ms 1000

Starts `natter serve --database-url memory:` on a loopback port under `prlimit --nofile=N`
(default 64), then
1. sends half a request line and times how long the server keeps that connection open;
2. opens SOCKETS (default 150) connections that never send a byte — more than the server has
   files — and times how long until a new `GET /api/health` is answered, while the flood is
   still open; checks the server is alive and counts its accept-error log lines.
Each wait has a timeout (--give-up seconds), so a server without the fixes reports "still open"
and "answered=False" instead of hanging.
"""

import argparse
import re
import shutil
import socket
import subprocess
import tempfile
import time


def health(host, port, timeout):
    s = socket.create_connection((host, port))
    s.settimeout(timeout)
    try:
        s.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return s.recv(100).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
    finally:
        s.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("server_args", nargs="*")
    ap.add_argument("--nofile", type=int, default=64)
    ap.add_argument("--sockets", type=int, default=150)
    ap.add_argument("--give-up", type=float, default=70.0)
    a = ap.parse_args()
    data = tempfile.mkdtemp(prefix="natter-slowloris-")
    cmd = ["prlimit", f"--nofile={a.nofile}:{a.nofile}", "--", a.binary, "serve", "--bind", "127.0.0.1:0",
           "--database-url", "memory:", "--data-dir", data] + a.server_args
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={"RUST_LOG": "warn", "PATH": "/usr/bin:/bin"})
    try:
        host, port = re.search(r"http://([\d.]+):(\d+)", p.stdout.readline()).groups()
        port = int(port)
        assert health(host, port, 5), "the server answers before the test"

        s = socket.create_connection((host, port))
        s.sendall(b"GET /api/hea")
        s.settimeout(a.give_up)
        t = time.time()
        try:
            s.recv(100)
            print(f"half a request line: closed after {time.time() - t:.2f} s")
        except OSError:
            print(f"half a request line: still open after {time.time() - t:.2f} s")
        s.close()

        t = time.time()
        flood = [socket.create_connection((host, port)) for _ in range(a.sockets)]
        during = health(host, port, 0.5)
        ok = health(host, port, a.give_up)
        print(f"{a.sockets} silent sockets, nofile {a.nofile}: /api/health within 0.5 s: {during}; "
              f"answered={ok} after {time.time() - t:.2f} s; server alive={p.poll() is None}")
        for f in flood:
            f.close()
    finally:
        p.terminate()
        err = p.communicate(timeout=15)[1]
        shutil.rmtree(data, ignore_errors=True)
    print(f"accept-error log lines: {err.count('cannot accept connections') + err.count('accept error')}")


if __name__ == "__main__":
    main()
