#!/usr/bin/env python3
"""natter against the servers people would otherwise write: FastAPI + uvicorn and Node + ws.

Builds natter in release, starts each server pinned to CPU 0 (taskset -c 0) and `natter bench`
pinned to CPU 1 (taskset -c 1), runs the scenarios two rounds each (a fresh server process for
every measurement), takes medians, and writes the table into docs/performance.md between the
`compare:begin` and `compare:end` markers; the raw reports go to bench/results/compare.json.

    python3 bench/compare.py            # about 10 minutes on 2 cores
    python3 bench/compare.py --quick    # small numbers, to check the script itself

natter runs with raised per-user and rate limits (--max-connections-per-user,
--messages-per-second, --message-burst, their per-user and per-frame kin): one load generator plays many users, and the peers
have no such limits. Loopback only; every step has a timeout.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, "bench", "peers")
NATTER = os.path.join(ROOT, "target", "release", "natter")
SECRET = "bench-shared-secret-for-peers-only"
LIMITS = ["--max-connections-per-user", "1000000", "--messages-per-second", "1000000",
          "--message-burst", "1000000", "--user-messages-per-second", "1000000",
          "--user-message-burst", "1000000", "--frames-per-second", "1000000",
          "--frame-burst", "1000000", "--access-token-ttl-secs", "86400"]
SERVER_CPU = "0"
BENCH_CPU = "1"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, proc, within=30):
    deadline = time.time() + within
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("server did not become healthy")


class Server:
    """One server process pinned to the server CPU."""

    def __init__(self, kind):
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tempfile.mkdtemp(prefix=f"natter-compare-{kind}-")
        env = dict(os.environ, BENCH_JWT_SECRET=SECRET, RUST_LOG="warn", PORT=str(self.port))
        if kind.startswith("natter"):
            cmd = [NATTER, "serve", "--bind", f"127.0.0.1:{self.port}", "--data-dir", self.tmp,
                   "--log-format", "json", *LIMITS]
            if kind == "natter-memory":
                cmd += ["--database-url", "memory:"]
        elif kind == "fastapi":
            venv = os.path.join(PEERS, "fastapi", ".venv", "bin", "uvicorn")
            cmd = [venv, "app:app", "--host", "127.0.0.1", "--port", str(self.port),
                   "--no-access-log", "--log-level", "warning"]
        elif kind == "node":
            cmd = ["node", "server.js"]
        else:
            raise ValueError(kind)
        cwd = {"fastapi": os.path.join(PEERS, "fastapi"), "node": os.path.join(PEERS, "node")}.get(kind, ROOT)
        self.log = open(os.path.join(self.tmp, "server.log"), "wb")
        self.proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *cmd], cwd=cwd, env=env,
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        wait_healthy(self.url, self.proc)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def bench(args, timeout=300):
    cmd = ["taskset", "-c", BENCH_CPU, NATTER, "bench", *args, "--json"]
    log("  $", " ".join(cmd[3:]))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    try:
        report = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"bench failed ({p.returncode}): {p.stderr[-2000:]}")
    report["exit_code"] = p.returncode
    return report


def measure(kind, scenario, sizes):
    """One measurement on a fresh server."""
    srv = Server(kind)
    try:
        # natter: one registered user owns every bot (the peers take minted tokens and have
        # no users at all). Registering hundreds of users would measure argon2, and leave
        # the freed hash memory in glibc's arenas, inflating the idle baseline.
        auth = ["--jwt-secret", SECRET] if not kind.startswith("natter") else ["--conns-per-user", "1000000"]
        common = ["--url", srv.url, *auth]
        if scenario == "chat":
            r = bench(["chat", *common, "-c", str(sizes["chat_conns"]), "-d", str(sizes["chat_secs"]),
                       "--warmup", "2", "--message-bytes", "64"])
        elif scenario == "connect":
            r = bench(["connect", *common, "--concurrency", "32", "-d", str(sizes["connect_secs"]),
                       "--warmup", "1"])
        elif scenario == "idle":
            r = bench(["idle", *common, "-c", str(sizes["idle_conns"]), "-d", "3",
                       "--server-pid", str(srv.proc.pid)])
        else:
            raise ValueError(scenario)
        return r
    finally:
        srv.stop()


def storm(sizes, handover):
    args = ["storm", "--spawn", "--server-bin", NATTER, "--server-cpus", SERVER_CPU,
            "-c", str(sizes["storm_clients"]), "--storm-after", "3", "--storm-interval-ms", "2000"]
    if handover:
        args.append("--storm-handover")
    return bench(args, timeout=600)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=0):
    if x is None:
        return "–"
    return f"{x:,.{digits}f}".replace(",", " ")


def ratio(a, b):
    return None if a is None or not b else a / b


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny numbers, one round: checks the script")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "performance.md"))
    opts = ap.parse_args()
    sizes = dict(chat_conns=1000, chat_secs=10, connect_secs=5, idle_conns=10000, storm_clients=10000)
    if opts.quick:
        sizes = dict(chat_conns=50, chat_secs=2, connect_secs=2, idle_conns=200, storm_clients=100)
        opts.rounds = 1

    if not opts.no_build:
        log("building natter (release)…")
        subprocess.run(["cargo", "build", "--release", "-p", "natter"], cwd=ROOT, check=True, timeout=3600)
    # A private copy: other builds in the same target dir must not swap the binary mid-run.
    global NATTER
    copy = os.path.join(tempfile.mkdtemp(prefix="natter-compare-bin-"), "natter")
    shutil.copy2(NATTER, copy)
    NATTER = copy
    if not os.path.exists(os.path.join(PEERS, "fastapi", ".venv")):
        subprocess.run([sys.executable, "-m", "venv", ".venv"], cwd=os.path.join(PEERS, "fastapi"), check=True)
        subprocess.run([".venv/bin/pip", "install", "-q", "-r", "requirements.txt"],
                       cwd=os.path.join(PEERS, "fastapi"), check=True)
    if not os.path.exists(os.path.join(PEERS, "node", "node_modules")):
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=os.path.join(PEERS, "node"), check=True)

    kinds = ["natter-sqlite", "natter-memory", "fastapi", "node"]
    runs = {k: {"chat": [], "connect": [], "idle": []} for k in kinds}
    storms = {"sigterm": [], "hand-over": []}
    started = time.time()
    for rnd in range(opts.rounds):
        for kind in kinds:
            for scenario in ["chat", "connect", "idle"]:
                log(f"round {rnd + 1}: {kind} {scenario}")
                runs[kind][scenario].append(measure(kind, scenario, sizes))
        for how in storms:
            log(f"round {rnd + 1}: natter storm, restart by {how}")
            storms[how].append(storm(sizes, handover=how == "hand-over"))

    def med(kind, scenario, path):
        vals = []
        for r in runs[kind][scenario]:
            v = r
            for p in path:
                v = v.get(p) if isinstance(v, dict) else None
            vals.append(v)
        return median(vals)

    m = {}
    for k in kinds:
        m[k] = dict(
            rt=med(k, "chat", ["ops_per_s"]), p99=med(k, "chat", ["latency_ms", "p99"]),
            p50=med(k, "chat", ["latency_ms", "p50"]), chat_err=sum(r["error_total"] for r in runs[k]["chat"]),
            cps=med(k, "connect", ["ops_per_s"]), cp99=med(k, "connect", ["latency_ms", "p99"]),
            conn_err=sum(r["error_total"] for r in runs[k]["connect"]),
            kib=med(k, "idle", ["server_kib_per_connection"]), held=med(k, "idle", ["connected"]),
            idle_err=sum(r["error_total"] for r in runs[k]["idle"]),
        )
    elapsed = time.time() - started

    def row(label, key, digits, better="higher"):
        cells = [fmt(m[k][key], digits) for k in kinds]
        rf = ratio(m["natter-sqlite"][key], m["fastapi"][key])
        rn = ratio(m["natter-sqlite"][key], m["node"][key])
        rmf = ratio(m["natter-memory"][key], m["fastapi"][key])
        rmn = ratio(m["natter-memory"][key], m["node"][key])
        rs = lambda r: "–" if r is None else f"{r:.2f}×"
        return f"| {label} | " + " | ".join(cells) + f" | {rs(rmf)} / {rs(rf)} | {rs(rmn)} / {rs(rn)} |"

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Measured {now}, {opts.rounds} round(s), medians; {elapsed / 60:.1f} minutes. "
        f"Servers on CPU {SERVER_CPU}, `natter bench` on CPU {BENCH_CPU}"
        + (" (**--quick: tiny numbers, not a measurement**)" if opts.quick else "") + ".",
        "",
        "| metric | natter (SQLite) | natter (memory:) | FastAPI + uvicorn | Node + ws "
        "| natter ÷ FastAPI (memory / SQLite) | natter ÷ Node (memory / SQLite) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        row(f"chat round trips/s, {sizes['chat_conns']} connections, 64 B", "rt", 0),
        row("chat p50 latency, ms", "p50", 1),
        row("chat p99 latency, ms", "p99", 1),
        row("authenticated connects/s (32 at a time)", "cps", 0),
        row("connect p99, ms", "cp99", 1),
        row(f"server KiB per idle connection, {sizes['idle_conns']} connections", "kib", 2),
        row("idle connections held", "held", 0),
        "| errors (chat / connect / idle, all rounds) | "
        + " | ".join(f"{m[k]['chat_err']} / {m[k]['conn_err']} / {m[k]['idle_err']}" for k in kinds) + " | | |",
        "",
    ]
    how_text = {
        "sigterm": "SIGTERM, then the new process started (connects refused meanwhile)",
        "hand-over": "hand-over: the new process started on the same port (`--reuse-port`), then SIGTERM to the old one",
    }
    for how, reports in storms.items():
        st = [r.get("storm", {}) for r in reports]
        lines += [
            f"Storm (natter, SQLite, {sizes['storm_clients']} clients chatting; restart by {how_text[how]}): "
            + "; ".join(
                f"round {i + 1}: all back {fmt(s.get('all_back_ms'))} ms after the stop signal "
                f"(server down {fmt(s.get('server_down_ms'))} ms, old process stopping "
                f"{fmt(s.get('server_stop_ms'))} ms), not back {s.get('not_back')}, "
                f"sent {s.get('messages_sent')}, lost {s.get('lost')}, doubled {s.get('doubled')}, "
                f"errors {r.get('error_total')}"
                for i, (s, r) in enumerate(zip(st, reports))
            ) + ".",
            "",
        ]
    lines += [
        "Reproduce: `python3 bench/compare.py` (raw reports: `bench/results/compare.json`).",
    ]
    table = "\n".join(lines)
    print(table)

    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    raw = os.path.join(ROOT, "bench", "results", "compare-quick.json" if opts.quick else "compare.json")
    with open(raw, "w") as f:
        json.dump({"measured": now, "sizes": sizes, "runs": runs, "storms": storms, "medians": m}, f, indent=1)
    if not opts.quick and os.path.exists(opts.out):
        doc = open(opts.out).read()
        b, e = "<!-- compare:begin -->", "<!-- compare:end -->"
        if b in doc and e in doc:
            doc = doc[: doc.index(b) + len(b)] + "\n" + table + "\n" + doc[doc.index(e):]
            open(opts.out, "w").write(doc)
            log(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
