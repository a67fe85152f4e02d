#!/usr/bin/env python3
"""natter against the servers people would otherwise write: FastAPI + uvicorn (in memory, and
durable with SQLite) and Node + ws, and against bare axum + tungstenite (stores nothing: the
hardware's edge); optionally against another natter binary (A/B).

Builds natter and the axum peer (bench/peers/axum, a Cargo project of its own, into its
target/) in release, starts each server pinned to CPU 0 (taskset -c 0) and `natter bench`
pinned to CPU 1 (taskset -c 1), and measures every kind of server in two layouts:

- fresh: a fresh server process for every scenario (connect, idle, chat), one user owning
  every bot (natter) — the layout of the earlier tables;
- realistic: ONE server process per kind and round that serves connects, then holds
  `idle_conns` idle sockets, then runs the chat, laid out as `users` × `bots` public echo bots
  (`natter bench … --users U --bots B`: every socket its own conversation, the chat on the first
  `chat_conns` of them), so the chat runs on a server that already holds every conversation
  and its ledger rows.

Rounds (two by default) take medians, and the table goes into docs/performance.md between the
`compare:begin` and `compare:end` markers; the raw reports go to bench/results/compare.json.

    python3 bench/compare.py                  # about 20 minutes on 2 cores
    python3 bench/compare.py --quick          # small numbers, to check the script itself
    python3 bench/compare.py --baseline /tmp/natter-before --kinds natter-sqlite,natter-memory \\
        --rounds 3 --no-storm                 # A/B: the two binaries interleaved, after ÷ before

With --baseline, every natter measurement (each scenario of the fresh layout, each whole run of
the realistic one) is made a second time right before or after (the order alternates between rounds) with the other binary as the server (the load generator is
always this tree's), and a table of after ÷ before ratios, the median and the range over
rounds, is printed and written to bench/results/ab.json; docs/performance.md is left alone.

natter runs with raised per-user and rate limits (--max-connections-per-user,
--messages-per-second, --message-burst, their per-user and per-frame kin): one load generator
plays many users, and the peers have no such limits. Loopback only; every step has a timeout.
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
BASELINE = "@baseline"
KINDS = ["natter-sqlite", "natter-memory", "fastapi", "fastapi-sqlite", "node", "axum"]
LABELS = {"natter-sqlite": "natter (SQLite)", "natter-memory": "natter (memory:)",
          "fastapi": "FastAPI + uvicorn", "fastapi-sqlite": "FastAPI + aiosqlite (WAL)", "node": "Node + ws",
          "axum": "bare axum + tungstenite (stores nothing)"}
PYTHON_PEERS = {"fastapi": "fastapi", "fastapi-sqlite": "fastapi-sqlite"}
AXUM_DIR = os.path.join(PEERS, "axum")
AXUM_TARGET = os.path.join(AXUM_DIR, "target")  # gitignored; never natter's target dir
AXUM = os.path.join(AXUM_TARGET, "release", "natter-bench-peer-axum")
SCENARIOS = ["connect", "idle", "chat"]


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


def is_natter(kind):
    return kind.startswith("natter")


class Server:
    """One server process pinned to the server CPU. `kind` may end in @baseline: the
    baseline natter binary."""

    def __init__(self, kind, binaries):
        base = kind.removesuffix(BASELINE)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = tempfile.mkdtemp(prefix=f"natter-compare-{base}-")
        env = dict(os.environ, BENCH_JWT_SECRET=SECRET, RUST_LOG="warn", PORT=str(self.port),
                   BENCH_DB=os.path.join(self.tmp, "chat.db"))
        cwd = ROOT
        if is_natter(base):
            binary = binaries["baseline"] if kind.endswith(BASELINE) else binaries["natter"]
            cmd = [binary, "serve", "--bind", f"127.0.0.1:{self.port}", "--data-dir", self.tmp,
                   "--log-format", "json", *LIMITS]
            if base == "natter-memory":
                cmd += ["--database-url", "memory:"]
        elif base in PYTHON_PEERS:
            cwd = os.path.join(PEERS, PYTHON_PEERS[base])
            cmd = [os.path.join(cwd, ".venv", "bin", "uvicorn"), "app:app", "--host", "127.0.0.1",
                   "--port", str(self.port), "--no-access-log", "--log-level", "warning"]
        elif base == "node":
            cwd = os.path.join(PEERS, "node")
            cmd = ["node", "server.js"]
        elif base == "axum":
            cwd = AXUM_DIR
            cmd = [AXUM]
        else:
            raise ValueError(kind)
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
    """Runs `natter bench ARGS --json`; returns its reports, a list (one per scenario)."""
    cmd = ["taskset", "-c", BENCH_CPU, NATTER, "bench", *args, "--json"]
    log("  $", " ".join(cmd[3:]))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    try:
        out = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"bench failed ({p.returncode}): {p.stderr[-2000:]}")
    reports = out if isinstance(out, list) else [out]
    for r in reports:
        r["exit_code"] = p.returncode
    return reports


def auth(kind, srv):
    # natter: in the fresh layout one registered user owns every bot (the peers take minted
    # tokens and have no users at all); registering a user per 20 sockets would measure argon2.
    if is_natter(kind):
        return ["--url", srv.url, "--conns-per-user", "1000000"]
    return ["--url", srv.url, "--jwt-secret", SECRET]


def measure_fresh(kind, scenario, sizes, binaries):
    """One scenario on a fresh server."""
    srv = Server(kind, binaries)
    try:
        common = [*auth(kind, srv), "--server-pid", str(srv.proc.pid)]
        if scenario == "chat":
            args = ["chat", "-c", str(sizes["chat_conns"]), "-d", str(sizes["chat_secs"]),
                    "--warmup", "2", "--message-bytes", "64"]
        elif scenario == "connect":
            args = ["connect", "--concurrency", "32", "-d", str(sizes["connect_secs"]), "--warmup", "1"]
        elif scenario == "idle":
            args = ["idle", "-c", str(sizes["idle_conns"]), "-d", "3"]
        else:
            raise ValueError(scenario)
        return {scenario: bench([*args, *common])[0]}
    finally:
        srv.stop()


def measure_realistic(kind, sizes, binaries):
    """connect → idle → chat on ONE server, users × bots."""
    srv = Server(kind, binaries)
    try:
        common = ["--url", srv.url, "--server-pid", str(srv.proc.pid),
                  "--users", str(sizes["users"]), "--bots", str(sizes["bots"]), "--message-bytes", "64"]
        if not is_natter(kind):
            common += ["--jwt-secret", SECRET]
        steps = [f"connect:concurrency=32,d={sizes['connect_secs']},warmup=1",
                 f"idle:c={sizes['idle_conns']},d=3",
                 f"chat:c={sizes['chat_conns']},d={sizes['chat_secs']},warmup=2"]
        reports = bench([*steps, *common], timeout=900)
        out = {r["scenario"]: r for r in reports}
        out["setup"] = reports[0].get("setup") or {}
        return out
    finally:
        srv.stop()


def storm(sizes, handover):
    args = ["storm", "--spawn", "--server-bin", NATTER, "--server-cpus", SERVER_CPU,
            "-c", str(sizes["storm_clients"]), "--storm-after", "3", "--storm-interval-ms", "2000"]
    if handover:
        args.append("--storm-handover")
    return bench(args, timeout=600)[0]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=0):
    if x is None:
        return "–"
    return f"{x:,.{digits}f}".replace(",", " ")


def ratio(a, b):
    return None if a is None or not b else a / b


def rs(r):
    return "–" if r is None else f"{r:.2f}×"


def get(report, path):
    v = report
    for p in path:
        v = v.get(p) if isinstance(v, dict) else None
    return v


# Each metric: key, label (with {sizes}), scenario, path in the report, digits.
METRICS = [
    ("rt", "chat round trips/s, {chat_conns} connections, 64 B", "chat", ["ops_per_s"], 0),
    ("p50", "chat p50 latency, ms", "chat", ["latency_ms", "p50"], 1),
    ("p99", "chat p99 latency, ms", "chat", ["latency_ms", "p99"], 1),
    ("rt_cpu", "server CPU µs per chat round trip", "chat", ["server_cpu_us_per_op"], 1),
    ("cps", "authenticated connects/s (32 at a time)", "connect", ["ops_per_s"], 0),
    ("cp99", "connect p99, ms", "connect", ["latency_ms", "p99"], 1),
    ("c_cpu", "server CPU µs per connect", "connect", ["server_cpu_us_per_op"], 1),
    ("kib", "server KiB per idle connection, {idle_conns} connections", "idle", ["server_kib_per_connection"], 2),
    ("held", "idle connections held", "idle", ["connected"], 0),
]


def medians(rounds):
    """rounds: a list of {scenario: report}; the median of every metric over them."""
    m = {key: median([get(r.get(sc, {}), path) for r in rounds]) for key, _, sc, path, _ in METRICS}
    for sc in SCENARIOS:
        m[f"{sc}_err"] = sum((r.get(sc) or {}).get("error_total", 0) for r in rounds)
    m["rss_fresh"] = median([get(r, ["setup", "server_rss_before_kib"]) for r in rounds])
    m["rss_setup"] = median([get(r, ["setup", "server_rss_after_kib"]) for r in rounds])
    return m


def table(m, kinds, sizes, layout):
    def row(label, key, digits):
        cells = [fmt(m[k][key], digits) for k in kinds]
        g = lambda k: m.get(k, {}).get(key)
        return (f"| {label} | " + " | ".join(cells)
                + f" | {rs(ratio(g('natter-memory'), g('fastapi')))} / {rs(ratio(g('natter-sqlite'), g('fastapi')))}"
                + f" | {rs(ratio(g('natter-memory'), g('node')))} / {rs(ratio(g('natter-sqlite'), g('node')))}"
                + f" | {rs(ratio(g('natter-sqlite'), g('fastapi-sqlite')))}"
                + f" | {rs(ratio(g('natter-memory'), g('axum')))} |")

    lines = [
        "| metric | " + " | ".join(LABELS[k] for k in kinds)
        + " | natter ÷ FastAPI (memory / SQLite) | natter ÷ Node (memory / SQLite)"
        " | natter SQLite ÷ FastAPI + aiosqlite | natter memory: ÷ bare axum |",
        "|---|" + "---:|" * (len(kinds) + 4),
    ]
    lines += [row(label.format(**sizes), key, digits) for key, label, _, _, digits in METRICS]
    if layout == "realistic":
        mib = lambda kib: None if kib is None else kib / 1024
        lines.append(f"| server RSS, MiB: fresh → after {sizes['users']} logins and {sizes['bots']} bots | "
                     + " | ".join(f"{fmt(mib(m[k]['rss_fresh']), 1)} → {fmt(mib(m[k]['rss_setup']), 1)}"
                                  for k in kinds) + " | | | | |")
    lines.append("| errors (chat / connect / idle, all rounds) | "
                 + " | ".join(f"{m[k]['chat_err']} / {m[k]['connect_err']} / {m[k]['idle_err']}" for k in kinds)
                 + " | | | | |")
    return lines


def ab_table(runs, kinds, layouts, sizes):
    """after ÷ before for every natter kind, layout and metric: the median of the per-round
    ratios and their range, with each binary's own median."""
    lines = [
        "| server, layout | metric | after | before | after ÷ before (median of rounds) | range over rounds |",
        "|---|---|---:|---:|---:|---|",
    ]
    raw = []
    for kind in kinds:
        if not is_natter(kind):
            continue
        for layout in layouts:
            after, before = runs[kind][layout], runs[kind + BASELINE][layout]
            for key, label, sc, path, digits in METRICS:
                if key == "held":
                    continue
                ra = [ratio(get(a.get(sc, {}), path), get(b.get(sc, {}), path)) for a, b in zip(after, before)]
                ra = [r for r in ra if r is not None]
                med_a = median([get(a.get(sc, {}), path) for a in after])
                med_b = median([get(b.get(sc, {}), path) for b in before])
                spread = f"{min(ra):.3f}× – {max(ra):.3f}×" if ra else "–"
                lines.append(f"| {LABELS[kind]}, {layout} | {label.format(**sizes)} | {fmt(med_a, digits)} "
                             f"| {fmt(med_b, digits)} | {'–' if not ra else f'{median(ra):.3f}×'} | {spread} |")
                raw.append(dict(kind=kind, layout=layout, metric=key, after=med_a, before=med_b, ratios=ra))
    errs = [f"{k}{BASELINE if b else ''} {lay}: {sum((r.get(sc) or {}).get('error_total', 0) for r in runs[k + (BASELINE if b else '')][lay] for sc in SCENARIOS)}"
            for k in kinds if is_natter(k) for lay in layouts for b in (False, True)]
    lines += ["", "Errors, all rounds: " + "; ".join(errs) + "."]
    return lines, raw


def ensure_peers(kinds, build):
    for kind in kinds:
        if kind in PYTHON_PEERS:
            d = os.path.join(PEERS, PYTHON_PEERS[kind])
            if not os.path.exists(os.path.join(d, ".venv", "bin", "uvicorn")):
                subprocess.run([sys.executable, "-m", "venv", ".venv"], cwd=d, check=True)
                subprocess.run([".venv/bin/pip", "install", "-q", "-r", "requirements.txt"], cwd=d, check=True)
        if kind == "node" and not os.path.exists(os.path.join(PEERS, "node", "node_modules")):
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=os.path.join(PEERS, "node"), check=True)
        # Built like natter (a no-op when up to date), and when missing even with --no-build;
        # CARGO_TARGET_DIR set, as an exported one would put the binary elsewhere.
        if kind == "axum" and (build or not os.path.exists(AXUM)):
            log("building the axum peer (release)…")
            subprocess.run(["cargo", "build", "--release", "--locked"], cwd=AXUM_DIR, check=True, timeout=3600,
                           env=dict(os.environ, CARGO_TARGET_DIR=AXUM_TARGET))


def private_copy(path, name):
    # Other builds in the same target dir must not swap the binary mid-run.
    copy = os.path.join(tempfile.mkdtemp(prefix="natter-compare-bin-"), name)
    shutil.copy2(path, copy)
    return copy


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny numbers, one round: checks the script")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"servers to measure, of {','.join(KINDS)}")
    ap.add_argument("--layouts", default="fresh,realistic", help="fresh, realistic or both")
    ap.add_argument("--baseline", metavar="NATTER", help="another natter binary, measured in the same rounds (A/B)")
    ap.add_argument("--no-storm", action="store_true", help="skip the storms (restart of 10 000 clients)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "performance.md"))
    opts = ap.parse_args()
    kinds = [k for k in opts.kinds.split(",") if k]
    layouts = [x for x in opts.layouts.split(",") if x]
    if unknown := [k for k in kinds if k not in KINDS] + [x for x in layouts if x not in ("fresh", "realistic")]:
        ap.error(f"unknown kind or layout: {', '.join(unknown)}")
    if opts.baseline and not any(is_natter(k) for k in kinds):
        ap.error("--baseline needs a natter kind in --kinds")
    sizes = dict(chat_conns=1000, chat_secs=10, connect_secs=5, idle_conns=10000, storm_clients=10000,
                 users=100, bots=100)
    if opts.quick:
        sizes = dict(chat_conns=50, chat_secs=2, connect_secs=2, idle_conns=200, storm_clients=100,
                     users=10, bots=20)
        opts.rounds = 1
    assert sizes["users"] * sizes["bots"] >= sizes["idle_conns"] >= sizes["chat_conns"]

    if not opts.no_build:
        log("building natter (release)…")
        subprocess.run(["cargo", "build", "--release", "-p", "natter"], cwd=ROOT, check=True, timeout=3600)
    global NATTER
    NATTER = private_copy(NATTER, "natter")
    binaries = {"natter": NATTER}
    if opts.baseline:
        binaries["baseline"] = private_copy(opts.baseline, "natter-baseline")
    ensure_peers(kinds, build=not opts.no_build)

    measured = kinds + [k + BASELINE for k in kinds if is_natter(k) and opts.baseline]
    runs = {k: {lay: [] for lay in layouts} for k in measured}
    storms = {"sigterm": [], "hand-over": []}
    do_storm = not opts.no_storm and "natter-sqlite" in kinds
    started = time.time()
    for rnd in range(opts.rounds):
        for kind in kinds:
            # A/B: the baseline right before or after, alternating between rounds.
            pair = [kind, kind + BASELINE] if is_natter(kind) and opts.baseline else [kind]
            if rnd % 2:
                pair.reverse()
            for layout in layouts:
                if layout == "realistic":
                    for k in pair:
                        log(f"round {rnd + 1}: {k}, realistic layout")
                        runs[k][layout].append(measure_realistic(k, sizes, binaries))
                    continue
                ones = {k: {} for k in pair}
                for scenario in SCENARIOS:
                    for k in pair:
                        log(f"round {rnd + 1}: {k}, fresh layout, {scenario}")
                        ones[k].update(measure_fresh(k, scenario, sizes, binaries))
                for k in pair:
                    runs[k][layout].append(ones[k])
        if do_storm:
            for how in storms:
                log(f"round {rnd + 1}: natter storm, restart by {how}")
                storms[how].append(storm(sizes, handover=how == "hand-over"))
    elapsed = time.time() - started

    m = {lay: {k: medians(runs[k][lay]) for k in measured} for lay in layouts}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Measured {now}, {opts.rounds} round(s), medians; {elapsed / 60:.1f} minutes. "
        f"Servers on CPU {SERVER_CPU}, `natter bench` on CPU {BENCH_CPU}"
        + (" (**--quick: tiny numbers, not a measurement**)" if opts.quick else "") + ".",
        "",
    ]
    headings = {
        "fresh": "**Fresh layout**: a fresh server process for every scenario; natter's bots all owned "
                 "by the one user that chats with them.",
        "realistic": f"**Realistic layout**: ONE server process per server and round serves connects, then "
                     f"holds {sizes['idle_conns']} idle sockets, then the chat; {sizes['users']} users × "
                     f"{sizes['bots']} public echo bots, every socket its own conversation (the chat on the "
                     f"first {sizes['chat_conns']}: {sizes['chat_conns'] // sizes['bots']} users × "
                     f"{sizes['bots']} bots), so the chat runs on a server that already holds "
                     f"{sizes['idle_conns']} conversations and their ledger rows.",
    }
    for lay in layouts:
        lines += [headings[lay], "", *table(m[lay], kinds, sizes, lay), ""]
    how_text = {
        "sigterm": "SIGTERM, then the new process started (connects refused meanwhile)",
        "hand-over": "hand-over: the new process started on the same port (`--reuse-port`), then SIGTERM to the old one",
    }
    for how, reports in storms.items():
        if not reports:
            continue
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
    lines.append("Reproduce: `python3 bench/compare.py` (raw reports: `bench/results/compare.json`).")
    text = "\n".join(lines)
    print(text)

    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    # compare.json holds the raw reports of the table in docs/performance.md: only a full run
    # (every kind, both layouts, no baseline) replaces it.
    full = not opts.quick and not opts.baseline and kinds == KINDS and layouts == ["fresh", "realistic"]
    raw = os.path.join(ROOT, "bench", "results",
                       "compare.json" if full else "compare-quick.json" if opts.quick else "compare-partial.json")
    with open(raw, "w") as f:
        json.dump({"measured": now, "sizes": sizes, "kinds": measured, "runs": runs, "storms": storms,
                   "medians": m}, f, indent=1)

    if opts.baseline:
        ab, ab_raw = ab_table(runs, kinds, layouts, sizes)
        ab = [f"A/B, {opts.rounds} round(s) interleaved: after = {os.path.abspath(os.path.join(ROOT, 'target', 'release', 'natter'))}"
              f", before = {os.path.abspath(opts.baseline)}.", "", *ab]
        print("\n" + "\n".join(ab))
        with open(os.path.join(ROOT, "bench", "results", "ab-quick.json" if opts.quick else "ab.json"), "w") as f:
            json.dump({"measured": now, "sizes": sizes, "rounds": opts.rounds, "ratios": ab_raw}, f, indent=1)
    elif full and os.path.exists(opts.out):
        doc = open(opts.out).read()
        b, e = "<!-- compare:begin -->", "<!-- compare:end -->"
        if b in doc and e in doc:
            doc = doc[: doc.index(b) + len(b)] + "\n" + text + "\n" + doc[doc.index(e):]
            open(opts.out, "w").write(doc)
            log(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
