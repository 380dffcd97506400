"""Shared helpers for the cao benchmarks (stdlib only).

Everything a benchmark starts runs in a throw-away sandbox: a fresh HOME, a
fresh CAO_HOME_DIR, a unique CAO_TMUX_SOCKET and a private TMUX_TMPDIR (the
upstream package ignores CAO_TMUX_SOCKET and talks to tmux's *default* socket
through libtmux, so TMUX_TMPDIR is what keeps it off the user's tmux server).
Processes are started in their own session and stopped by process group id;
nothing is ever killed by name.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

UPSTREAM_PKG = "cli-agent-orchestrator"
UPSTREAM_VERSION = "2.5.4"
CACHE_DIR = Path(os.path.expanduser("~/.cache/cao-bench"))
UPSTREAM_VENV = CACHE_DIR / f"upstream-{UPSTREAM_VERSION}"
_MARKER = ".cao-bench-installed"

REPO = Path(__file__).resolve().parent.parent
CAO_PY = REPO / "cao.py"
CAO_PYZ = REPO / "dist" / "cao.pyz"


_PY3 = None


def python3() -> str:
    """The real interpreter behind `python3` on PATH.

    `python3` may be a wrapper script (pyenv shim: +~60 ms per start), which
    would be charged to cao but not to upstream's venv entry points, whose
    shebang names the interpreter directly. So resolve it once.
    """
    global _PY3
    if _PY3 is None:
        exe = shutil.which("python3")
        _PY3 = sys.executable
        if exe:
            try:
                r = subprocess.run([exe, "-c", "import sys; print(sys.executable)"],
                                   capture_output=True, text=True, timeout=30)
                if r.returncode == 0 and r.stdout.strip():
                    _PY3 = r.stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                pass
    return _PY3


# --------------------------------------------------------------------------
# ports, statistics
# --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, p: float) -> float:
    """Percentile with linear interpolation (numpy's default); p in 0..100."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of empty sequence")
    if len(xs) == 1:
        return float(xs[0])
    k = (len(xs) - 1) * (p / 100.0)
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values) -> float:
    return percentile(values, 50)


# --------------------------------------------------------------------------
# upstream venv
# --------------------------------------------------------------------------

def ensure_upstream_venv(log=sys.stderr) -> Path:
    """Create (once) the venv holding the upstream package; return its path."""
    venv = UPSTREAM_VENV
    if (venv / _MARKER).exists() and (venv / "bin" / "cao-server").exists():
        return venv
    if venv.exists():
        shutil.rmtree(venv)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    print(f"[bench] creating {venv} (one-time) ...", file=log, flush=True)
    subprocess.run([python3(), "-m", "venv", str(venv)], check=True)
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
         "--disable-pip-version-check", f"{UPSTREAM_PKG}=={UPSTREAM_VERSION}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    if r.returncode != 0:
        tail = "\n".join(r.stdout.strip().splitlines()[-5:])
        raise OSError(f"pip install failed ({r.returncode}): {tail}")
    (venv / _MARKER).write_text(f"{UPSTREAM_PKG}=={UPSTREAM_VERSION}\n")
    return venv


def site_packages(venv: Path) -> Path:
    hits = sorted((venv / "lib").glob("python3*/site-packages"))
    if not hits:
        raise FileNotFoundError(f"no site-packages under {venv}")
    return hits[0]


def tree_bytes(path: Path) -> int:
    """Total st_size of regular files under path (symlinks not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if not os.path.islink(os.path.join(root, f)):
                total += st.st_size
    return total


def empty_venv_site_packages_bytes() -> int:
    """Size of site-packages of a brand-new empty venv (pip etc. only)."""
    with tempfile.TemporaryDirectory(prefix="cao-bench-emptyvenv-") as d:
        subprocess.run([python3(), "-m", "venv", os.path.join(d, "v")], check=True)
        return tree_bytes(site_packages(Path(d) / "v"))


# --------------------------------------------------------------------------
# sandbox: isolated environment + cleanup
# --------------------------------------------------------------------------

class Sandbox:
    """Private HOME / CAO_HOME_DIR / tmux socket + TMUX_TMPDIR.

    Use as a context manager; on exit every process started through
    ``spawn`` is killed by process group and the private tmux servers
    (our socket name and the "default" socket inside our TMUX_TMPDIR,
    which is what upstream uses) are killed, then the temp dir is removed.
    """

    def __init__(self, tag: str = "bench"):
        self.root = Path(tempfile.mkdtemp(prefix=f"cao-bench-{tag}-"))
        self.home = self.root / "home"
        self.cao_home = self.root / "cao-home"
        self.tmux_tmpdir = self.root / "tmux"
        for d in (self.home, self.cao_home, self.tmux_tmpdir):
            d.mkdir(mode=0o700)
        self.socket = f"cao-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.procs: list[subprocess.Popen] = []

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TMUX", "CAO_"))}
        env.update(
            HOME=str(self.home),
            CAO_HOME_DIR=str(self.cao_home),
            CAO_TMUX_SOCKET=self.socket,
            TMUX_TMPDIR=str(self.tmux_tmpdir),
            XDG_CONFIG_HOME=str(self.home / ".config"),
            XDG_DATA_HOME=str(self.home / ".local" / "share"),
            XDG_CACHE_HOME=str(self.home / ".cache"),
            XDG_STATE_HOME=str(self.home / ".local" / "state"),
            NO_COLOR="1",
        )
        env.update(extra)
        return env

    def spawn(self, argv, log_name: str = "server.log", **popen_kw) -> subprocess.Popen:
        log = open(self.root / log_name, "ab")
        p = subprocess.Popen(
            argv, env=popen_kw.pop("env", None) or self.env(),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=popen_kw.pop("cwd", str(self.root)),
            **popen_kw,
        )
        log.close()
        self.procs.append(p)
        return p

    def log_tail(self, log_name: str = "server.log", n: int = 6) -> str:
        try:
            lines = (self.root / log_name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(l.strip() for l in lines[-n:] if l.strip())

    def kill_tmux(self) -> None:
        tmux = shutil.which("tmux")
        if not tmux:
            return
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "TMUX_TMPDIR": str(self.tmux_tmpdir), "HOME": str(self.home)}
        for sock in (self.socket, "default"):
            subprocess.run([tmux, "-L", sock, "kill-server"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self) -> None:
        for p in self.procs:
            stop_group(p)
        self.procs.clear()
        self.kill_tmux()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def exit_code(p: subprocess.Popen):
    """Exit code of p if it has exited, else None -- WITHOUT reaping it.

    An exited but unreaped leader stays a zombie, so its PID (and with it our
    process group id) cannot be reused by anyone else until stop_group() reaps
    it. With pid_max = 32768 and busy neighbours, PIDs do get reused quickly.
    """
    if p.returncode is not None:
        return p.returncode
    try:
        info = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return p.poll()
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def stop_group(p: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop the process group we started (start_new_session=True): SIGTERM,
    wait up to grace s for the leader, SIGKILL what is left, then reap.

    The group is signalled only while its leader is unreaped (alive or
    zombie), so the group id is still ours; once reaped we never signal it.
    """
    if p.returncode is not None:
        return
    if exit_code(p) is None:
        _killpg(p.pid, signal.SIGTERM)
        end = time.monotonic() + grace
        while exit_code(p) is None and time.monotonic() < end:
            time.sleep(0.01)
    _killpg(p.pid, signal.SIGKILL)  # leftovers (and the leader if it hung)
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------
# HTTP / process measurements
# --------------------------------------------------------------------------

def http_get(port: int, path: str, timeout: float = 2.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def http_json(port: int, method: str, path: str, body=None, timeout: float = 30.0):
    """One JSON request to a local server: (status, parsed body or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode(errors="replace")
        return resp.status, payload
    finally:
        conn.close()


def wait_healthy(port: int, proc: subprocess.Popen, deadline_s: float = 30.0,
                 poll_s: float = 0.005, t0: float | None = None):
    """Poll GET /health every poll_s until 200; return seconds since t0
    (a time.perf_counter() value, default: now) and the parsed JSON body.

    Raises RuntimeError if the process exits or the deadline passes.
    """
    if t0 is None:
        t0 = time.perf_counter()
    end = t0 + deadline_s
    while True:
        rc = exit_code(proc)
        if rc is not None:
            raise RuntimeError(f"server exited with code {rc} "
                               "before /health answered")
        try:
            status, body = http_get(port, "/health", timeout=1.0)
            if status == 200:
                elapsed = time.perf_counter() - t0
                try:
                    doc = json.loads(body)
                except ValueError:
                    raise RuntimeError(f"/health is not JSON: {body[:80]!r}")
                return elapsed, doc
        except (OSError, http.client.HTTPException):
            pass
        if time.perf_counter() > end:
            raise RuntimeError(f"no healthy /health within {deadline_s:.0f}s")
        time.sleep(poll_s)


def _children(pid: int) -> list[int]:
    """Direct children of pid (children of any of its threads)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(_children(p))
    return seen


def vmrss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mb(pid: int) -> float:
    """VmRSS of pid plus all its descendants, in MiB."""
    return sum(vmrss_kb(p) for p in descendants(pid)) / 1024.0
