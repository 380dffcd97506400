#!/usr/bin/env python3
"""Core benchmark: cao (this repo) vs upstream cli-agent-orchestrator 2.5.4.

Measures, for both, in one run on this machine:
  * server start -> first healthy GET /health (median of N starts)
  * server RSS (process + children) after ~2 s idle, and after the latency run
  * GET /sessions latency over ONE keep-alive connection (p50 / p99)
  * `cao --help` wall time (median)
  * install size

Usage: python3 bench/bench_core.py [--quick] [--json FILE]
Every process runs in a private sandbox (HOME, CAO_HOME_DIR, tmux socket,
TMUX_TMPDIR) and is stopped by process group when done.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # keep bench/ free of __pycache__
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGETS = {"start": 0.15, "rss": 30.0, "p50": 0.5}  # s, MiB, ms


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# server measurements
# --------------------------------------------------------------------------

def measure_server(name: str, argv_for_port, n_starts: int, n_req: int,
                   warmup: int, idle_s: float) -> dict:
    """Start the server n_starts times (same sandbox: first start has a fresh
    CAO_HOME_DIR, later ones a warm one); keep the last one up for RSS and
    latency. Raises RuntimeError with a reason on failure."""
    res: dict = {}
    with C.Sandbox(name) as sb:
        starts = []
        proc = port = None
        for i in range(n_starts):
            port = C.free_port()
            t0 = time.perf_counter()
            proc = sb.spawn(argv_for_port(port))
            try:
                elapsed, health = C.wait_healthy(port, proc, t0=t0)
            except RuntimeError as e:
                tail = sb.log_tail()
                raise RuntimeError(f"{e}; log: {tail}" if tail else str(e))
            starts.append(elapsed)
            log(f"{name}: start {i + 1}/{n_starts}: {elapsed * 1000:.1f} ms")
            if i < n_starts - 1:
                C.stop_group(proc)
                sb.procs.remove(proc)
        res["health"] = health
        res["start_all_s"] = starts
        res["start_first_s"] = starts[0]
        res["start_median_s"] = C.median(starts)

        # RSS + latency on the last server; if it dies under us (e.g. someone
        # else's SIGTERM), start one more and measure again, once.
        for attempt in (1, 2):
            try:
                time.sleep(idle_s)
                rc = C.exit_code(proc)
                if rc is not None:
                    raise ServerDied(f"exit code {rc} while idle")
                res["rss_idle_mb"] = C.tree_rss_mb(proc.pid)
                res["rss_pids"] = len(C.descendants(proc.pid))
                lat, reconnects, bad = sessions_latency(port, n_req, warmup, proc)
                res["rss_after_load_mb"] = C.tree_rss_mb(proc.pid)
                break
            except ServerDied as e:
                if attempt == 2:
                    raise RuntimeError(f"server died during the RSS/latency phase twice ({e})")
                tail = sb.log_tail(n=2)
                res["restarted"] = f"{e}; server log: {tail}" if tail else str(e)
                log(f"{name}: server died during the RSS/latency phase ({e}); restarting once")
                C.stop_group(proc)
                sb.procs.remove(proc)
                port = C.free_port()
                proc = sb.spawn(argv_for_port(port))
                C.wait_healthy(port, proc)
        res["sessions_n"] = len(lat)
        res["sessions_p50_ms"] = C.percentile(lat, 50) * 1000
        res["sessions_p99_ms"] = C.percentile(lat, 99) * 1000
        res["sessions_mean_ms"] = sum(lat) / len(lat) * 1000
        res["sessions_reconnects"] = reconnects
        res["sessions_non200"] = bad
    return res


class ServerDied(Exception):
    pass


def sessions_latency(port: int, n: int, warmup: int, proc=None):
    """Sequential GET /sessions on one reused HTTPConnection.

    Returns (latencies_s, reconnects, non_200_count). A reconnect is counted
    whenever the server closed the connection after a response (i.e. no
    keep-alive); http.client then reopens it transparently on the next call.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    lat: list[float] = []
    reconnects = bad = 0
    perf = time.perf_counter
    try:
        for i in range(warmup + n):
            t = perf()
            try:
                conn.request("GET", "/sessions")
                r = conn.getresponse()
                r.read()
            except (OSError, http.client.HTTPException) as e:
                rc = None if proc is None else C.exit_code(proc)
                if proc is not None and rc is None:
                    time.sleep(0.2)
                    rc = C.exit_code(proc)
                if rc is not None:
                    raise ServerDied(f"exit code {rc} after {i} requests") from e
                raise
            dt = perf() - t
            if r.status != 200:
                bad += 1
            if i >= warmup:
                lat.append(dt)
                if conn.sock is None:
                    reconnects += 1
    finally:
        conn.close()
    return lat, reconnects, bad


# --------------------------------------------------------------------------
# --help and size
# --------------------------------------------------------------------------

def help_time(argv, runs: int) -> float:
    with C.Sandbox("help") as sb:
        env = sb.env()
        ts = []
        for i in range(runs + 1):  # first run = warm-up (page cache, pyc)
            t = time.perf_counter()
            r = subprocess.run(argv, env=env, cwd=str(sb.root),
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, timeout=60)
            dt = time.perf_counter() - t
            if r.returncode != 0:
                raise RuntimeError(f"exit {r.returncode}: "
                                   f"{r.stderr.decode(errors='replace').strip()[-200:]}")
            if i:
                ts.append(dt)
        return C.median(ts)


# --------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------

def fmt(v, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "s":
        return f"{v:.3f} s"
    if unit == "ms":
        return f"{v:.3f} ms"
    if unit == "MiB":
        return f"{v:.1f} MiB"
    if unit == "B":  # sizes: adaptive
        if v >= 1024 * 1024:
            return f"{v / (1024 * 1024):.1f} MiB"
        return f"{v / 1024:.1f} KiB"
    return str(v)


def ratio(up, cao) -> str:
    if up is None or cao is None or cao == 0:
        return "n/a"
    return f"{up / cao:.1f}x"


def print_table(rows) -> None:
    head = ("metric", "upstream 2.5.4", "cao", "upstream/cao", "cao target")
    table = [head] + [
        (m, fmt(u, unit), fmt(c, unit), ratio(u, c),
         "" if tgt is None else
         f"<= {fmt(tgt, unit)} {'OK' if c is not None and c <= tgt else ('MISS' if c is not None else '')}".rstrip())
        for (m, u, c, unit, tgt) in rows
    ]
    w = [max(len(r[i]) for r in table) for i in range(len(head))]
    line = "  ".join("-" * x for x in w)
    for k, r in enumerate(table):
        print("  ".join(r[i].ljust(w[i]) if i == 0 else r[i].rjust(w[i])
                        for i in range(len(head))))
        if k == 0:
            print(line)


def machine_info() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for l in f:
                if l.startswith("model name"):
                    cpu = l.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    tmux = "none"
    if shutil.which("tmux"):
        tmux = subprocess.run(["tmux", "-V"], capture_output=True, text=True).stdout.strip()
    return (f"{datetime.date.today().isoformat()}  {platform.system()} {platform.release()}  "
            f"{os.cpu_count()} cores  {cpu}  Python {platform.python_version()}  {tmux}")


def cao_version(cao_py: Path) -> str:
    if not cao_py.exists():
        return "missing"
    import hashlib
    digest = hashlib.sha256(cao_py.read_bytes()).hexdigest()[:12]
    git = ""
    try:
        head = subprocess.run(["git", "-C", str(cao_py.parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(cao_py.parent), "status", "--porcelain", "--",
                                cao_py.name], capture_output=True, text=True, timeout=10).stdout.strip()
        if head:
            git = f", git {head}{' + uncommitted changes' if dirty else ''}"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"sha256 {digest}{git}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--json", metavar="FILE", help="also write raw results as JSON")
    ap.add_argument("--cao", metavar="PATH", default=str(C.CAO_PY),
                    help="cao.py to benchmark (default: the repo's cao.py)")
    ap.add_argument("--build-pyz", action="store_true",
                    help="run build_zipapp.py first so dist/cao.pyz matches cao.py")
    ap.add_argument("--skip-upstream", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    n_starts = 3 if args.quick else 5
    n_req, warmup = (300, 50) if args.quick else (2000, 200)
    help_runs = 3 if args.quick else 10
    idle_s = 2.0

    py = C.python3()
    cao_py = Path(args.cao).resolve()
    cao_pyz = cao_py.parent / "dist" / "cao.pyz"
    out: dict = {"machine": machine_info(), "quick": args.quick,
                 "n_starts": n_starts, "n_requests": n_req, "help_runs": help_runs,
                 "upstream": {}, "cao": {}}
    notes: list[str] = []
    up, cao = out["upstream"], out["cao"]

    if args.build_pyz:
        builder = cao_py.parent / "build_zipapp.py"
        r = subprocess.run([py, str(builder)], cwd=str(cao_py.parent),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            notes.append(f"cao: build_zipapp.py failed ({r.stderr.strip()[-200:]})")

    # ---------------- upstream ----------------
    venv = None
    if not args.skip_upstream:
        try:
            venv = C.ensure_upstream_venv()
        except (subprocess.CalledProcessError, OSError) as e:
            notes.append(f"upstream: not available (venv install failed: {e})")
    if venv is not None:
        srv = str(venv / "bin" / "cao-server")
        try:
            up.update(measure_server(
                "upstream", lambda p: [srv, "--host", "127.0.0.1", "--port", str(p)],
                n_starts, n_req, warmup, idle_s))
        except Exception as e:  # report, never crash: the other side still counts
            notes.append(f"upstream: server not available ({type(e).__name__}: {e})")
        try:
            up["help_s"] = help_time([str(venv / "bin" / "cao"), "--help"], help_runs)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            notes.append(f"upstream: --help failed ({e})")
        try:
            sp = C.tree_bytes(C.site_packages(venv))
            base = C.empty_venv_site_packages_bytes()
            up["size_bytes"] = sp - base
            up["site_packages_bytes"] = sp
            up["empty_venv_site_packages_bytes"] = base
        except (OSError, subprocess.CalledProcessError) as e:
            notes.append(f"upstream: size failed ({e})")

    # ---------------- cao ----------------
    if not cao_py.exists():
        notes.append(f"cao: not available ({cao_py} not found)")
    else:
        try:
            cao.update(measure_server(
                "cao", lambda p: [py, str(cao_py), "server", "--host", "127.0.0.1",
                                  "--port", str(p)],
                n_starts, n_req, warmup, idle_s))
        except Exception as e:  # report, never crash: upstream still counts
            notes.append(f"cao: not available (server: {type(e).__name__}: {e})")
        for key, target in (("help_s", cao_py), ("help_pyz_s", cao_pyz)):
            if not target.exists():
                continue
            try:
                cao[key] = help_time([py, str(target), "--help"], help_runs)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                notes.append(f"cao: {target.name} --help failed ({e})")
        cao["size_py_bytes"] = cao_py.stat().st_size
        if cao_pyz.exists():
            cao["size_pyz_bytes"] = cao_pyz.stat().st_size

    # ---------------- report ----------------
    g = lambda d, k: d.get(k)  # noqa: E731
    rows = [
        (f"start -> healthy /health (median of {n_starts})",
         g(up, "start_median_s"), g(cao, "start_median_s"), "s", TARGETS["start"]),
        ("first start, fresh CAO_HOME_DIR", g(up, "start_first_s"), g(cao, "start_first_s"), "s", None),
        (f"RSS idle ({idle_s:.0f} s after healthy)", g(up, "rss_idle_mb"), g(cao, "rss_idle_mb"), "MiB", TARGETS["rss"]),
        ("RSS after /sessions run", g(up, "rss_after_load_mb"), g(cao, "rss_after_load_mb"), "MiB", None),
        (f"GET /sessions p50 ({n_req} seq, keep-alive)",
         g(up, "sessions_p50_ms"), g(cao, "sessions_p50_ms"), "ms", TARGETS["p50"]),
        ("GET /sessions p99", g(up, "sessions_p99_ms"), g(cao, "sessions_p99_ms"), "ms", None),
        (f"cao --help (median of {help_runs}), cao.py", g(up, "help_s"), g(cao, "help_s"), "s", None),
    ]
    if "help_pyz_s" in cao:
        rows.append(("cao --help, dist/cao.pyz", g(up, "help_s"), cao["help_pyz_s"], "s", None))
    if "size_pyz_bytes" in cao:
        rows.append(("install size (upstream: venv - empty venv), cao.pyz",
                     g(up, "size_bytes"), cao["size_pyz_bytes"], "B", None))
    rows.append(("install size (upstream: venv - empty venv), cao.py",
                 g(up, "size_bytes"), g(cao, "size_py_bytes"), "B", None))

    print(f"cao core benchmark vs {C.UPSTREAM_PKG}=={C.UPSTREAM_VERSION}"
          f"{'  (--quick)' if args.quick else ''}")
    print(f"machine: {out['machine']}")
    print(f"cao runs under {py}; upstream under {venv or '(no venv)'}")
    print(f"cao.py: {cao_version(cao_py)}")
    print()
    print_table(rows)
    for side, d in (("upstream", up), ("cao", cao)):
        if d.get("sessions_reconnects"):
            notes.append(f"{side}: server closed the connection after "
                         f"{d['sessions_reconnects']}/{d['sessions_n']} /sessions responses (no keep-alive)")
        if 35 <= (d.get("sessions_p50_ms") or 0) <= 50:
            notes.append(f"{side}: /sessions p50 ~40 ms looks like a Nagle/delayed-ACK stall "
                         "(headers and body sent in separate writes on a keep-alive "
                         "connection); write the response once or set TCP_NODELAY")
        if d.get("restarted"):
            notes.append(f"{side}: server died during the first RSS/latency run "
                         f"({d['restarted']}); figures are from a second server")
        if d.get("sessions_non200"):
            notes.append(f"{side}: {d['sessions_non200']} /sessions responses were not 200")
        if "start_all_s" in d:
            notes.append(f"{side}: starts (s) = " + ", ".join(f"{x:.3f}" for x in d["start_all_s"]))
    if notes:
        print()
        for n in notes:
            print(n)
    out["notes"] = notes
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
