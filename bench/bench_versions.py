#!/usr/bin/env python3
"""Two or more cao.py files side by side, interleaved so that machine load hits each
alike: server start -> first 200 on /health, then keep-alive GET /sessions latency.

    python3 bench/bench_versions.py old=/tmp/old/cao.py new=cao.py --rounds 12

Each start gets a fresh CAO_HOME_DIR and its own tmux socket; servers are stopped by
process group and their tmux servers with `tmux -L <socket> kill-server`.
"""
import argparse
import http.client
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one(path, requests, tag):
    home, port, sock = tempfile.mkdtemp(prefix="cao-bv-"), _free_port(), f"cao-bv-{tag}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAO_", "TMUX"))}
    env.update(CAO_HOME_DIR=home, CAO_TMUX_SOCKET=sock)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, path, "server", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = started + 15
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"{path}: server did not start")
                time.sleep(0.002)
            finally:
                conn.close()
        start = time.monotonic() - started
        conn, latencies = http.client.HTTPConnection("127.0.0.1", port), []
        for _ in range(requests):
            t = time.perf_counter()
            conn.request("GET", "/sessions")
            conn.getresponse().read()
            latencies.append(time.perf_counter() - t)
        conn.close()
        return start, latencies
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("versions", nargs="+", metavar="NAME=PATH")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--requests", type=int, default=600, help="GET /sessions per start")
    args = ap.parse_args()
    versions = dict(v.split("=", 1) for v in args.versions)
    starts = {name: [] for name in versions}
    gets = {name: [] for name in versions}
    for round_ in range(args.rounds):
        for name, path in versions.items():
            start, latencies = _one(path, args.requests, f"{os.getpid()}-{round_}")
            starts[name].append(start)
            gets[name].extend(latencies)
    for name in versions:
        g = sorted(gets[name])
        print(f"{name}: start median {statistics.median(starts[name]) * 1000:.0f} ms "
              f"(n={len(starts[name])}), GET /sessions p50 {g[len(g) // 2] * 1000:.3f} ms "
              f"p99 {g[int(len(g) * 0.99)] * 1000:.3f} ms")


if __name__ == "__main__":
    main()
