#!/usr/bin/env python3
"""Real agent CLIs against tests/mock_llm.py: cao vs upstream cli-agent-orchestrator 2.5.4.

For every installed CLI (tests/real_cli_setup.py) and each side (cao, upstream) this
measures, in one run, against the same mock LLM (reply delay 3 s):

  create -> ready        POST /sessions ... until GET /terminals/{id} first says idle
  CLI start (floor)      the bare CLI in a bare tmux window until cao's idle pattern
                         shows (a first-run dialog answered with cao's keys on the
                         way); cao's target is floor + 0.3 s
  input -> model         just before POST /terminals/{id}/input until the mock
                         receives the turn's request (the one holding its marker);
                         for the bare CLI from tmux paste-buffer + Enter
  last byte -> completed the mock's last byte of the answer until GET /terminals/{id}
                         (polled every 10 ms, kept-alive) first says completed; for
                         cao also from its own `status` event timestamps; for the
                         bare CLI until cao's patterns match on capture-pane

Progress goes to stderr, tables to stdout; exit code 0 even when a side fails for a
CLI (a note says why). Stdlib only. See bench/README.md, "Real CLIs".

    python3 bench/bench_providers.py                  # all installed CLIs, both sides
    python3 bench/bench_providers.py --quick          # 3 turns, 1 create, 2 bare turns
    python3 bench/bench_providers.py --cli claude_code,codex --side cao --json out.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(REPO / "tests"), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import _common as C  # noqa: E402
import cao  # noqa: E402
import real_cli_setup as R  # noqa: E402
from mock_llm import MockLLM  # noqa: E402

MOCK_DELAY = 3.0
POLL_S = 0.010
READY = ("idle", "completed", "waiting_user_answer")
PROFILE = "bench"
PROFILE_TEXT = "You are a benchmark agent. Answer the user's question briefly."
TURN_TIMEOUT = 120.0
CREATE_TIMEOUT = 150.0
TARGET_INPUT = 0.100
TARGET_DONE_P50 = 0.050
TARGET_DONE_P99 = 0.150
TARGET_READY_SLACK = 0.300


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# processes: pane process groups, tmux servers, leftovers
# --------------------------------------------------------------------------

def kill_tree_groups(pids) -> None:
    """SIGKILL the process groups of the given pids and of all their descendants.

    Only used on tmux pane processes of our private tmux servers: every process
    below a pane is one we started (through cao, upstream or the bare launch)."""
    groups = set()
    for pid in pids:
        for p in C.descendants(pid):
            try:
                groups.add(os.getpgid(p))
            except OSError:
                pass
    for g in groups:
        if g > 1:
            try:
                os.killpg(g, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def tmux_stop(prefix: list, env: dict) -> None:
    """Kill every pane's process groups, then the tmux server itself (and wait
    for it to be gone)."""
    r = subprocess.run(prefix + ["list-panes", "-a", "-F", "#{pane_pid}"], env=env,
                       capture_output=True, text=True)
    kill_tree_groups(int(x) for x in r.stdout.split() if x.isdigit())
    r = subprocess.run(prefix + ["display-message", "-p", "#{pid}"], env=env,
                       capture_output=True, text=True)
    server = int(r.stdout.strip()) if r.stdout.strip().isdigit() else None
    subprocess.run(prefix + ["kill-server"], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    end = time.time() + 3
    while server and time.time() < end:
        try:
            os.kill(server, 0)
        except OSError:
            break
        time.sleep(0.01)


def sweep_leftovers(marker: str) -> list:
    """SIGKILL processes whose environment names our private run directory.

    Some CLIs double-fork helpers (daemons, MCP servers) that leave the pane's
    process tree; they still carry HOME/CAO_HOME_DIR below the run directory,
    which is unique to this run, so this touches nothing of anybody else's."""
    needle = marker.encode()
    killed = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env:
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
                os.kill(int(d), signal.SIGKILL)
                killed.append(" ".join(a.decode(errors="replace") for a in argv[:3])[:120])
            except OSError:
                pass
    return killed


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------

class StatusPoller(threading.Thread):
    """GET /terminals/{id} every POLL_S over one kept-alive connection; keeps
    (t_sent, t_received, status) for every answer (wall clock, time.time())."""

    def __init__(self, port: int, terminal_id: str):
        super().__init__(daemon=True)
        self.port, self.terminal_id = port, terminal_id
        self.samples: list[tuple[float, float, str]] = []
        self.reconnects = 0
        self.stop_event = threading.Event()

    def run(self):
        conn = None
        path = f"/terminals/{self.terminal_id}"
        next_at = time.time()
        while not self.stop_event.is_set():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            t_sent = time.time()
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                raw = resp.read()
                t_recv = time.time()
                if resp.status == 200:
                    status = json.loads(raw).get("status", "?")
                else:
                    status = f"http-{resp.status}"
                self.samples.append((t_sent, t_recv, status))
                if resp.will_close:
                    conn.close()
                    conn = None
                    self.reconnects += 1
            except (OSError, http.client.HTTPException, ValueError):
                if conn is not None:
                    conn.close()
                conn = None
                self.reconnects += 1
            next_at = max(next_at + POLL_S, time.time())
            self.stop_event.wait(max(0.0, next_at - time.time()))
        if conn is not None:
            conn.close()

    def stop(self):
        self.stop_event.set()
        self.join(5)

    def last(self):
        return self.samples[-1][2] if self.samples else None

    def completed_after(self, t_start: float):
        """(time the status first became completed after t_start, time it first
        left idle/completed after t_start), over samples sent after t_start.
        A completed right after the pre-turn status "completed" is still the old
        turn, so then the status must first leave idle/completed; after "idle" a
        direct change to completed counts (some detectors skip processing)."""
        before = [st for ts, _, st in list(self.samples) if ts < t_start]
        need_busy = not before or before[-1] != "idle"
        busy_at = None
        for t_sent, t_recv, status in list(self.samples):
            if t_sent < t_start:
                continue
            if busy_at is None and status not in ("idle", "completed"):
                busy_at = t_recv
            if status == "completed" and (busy_at is not None or not need_busy):
                return t_recv, busy_at
        return None, busy_at


def wait_ready(port: int, terminal_id: str, timeout: float):
    """Poll GET /terminals/{id} every POLL_S until a ready status; (t, status)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    end = time.time() + timeout
    status = None
    try:
        while time.time() < end:
            try:
                conn.request("GET", f"/terminals/{terminal_id}")
                resp = conn.getresponse()
                raw = resp.read()
                if resp.status == 200:
                    status = json.loads(raw).get("status")
                    if status in READY:
                        return time.time(), status
                    if status == "error":
                        raise RuntimeError("the terminal's status is error while starting")
                if resp.will_close:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            time.sleep(POLL_S)
    finally:
        conn.close()
    raise RuntimeError(f"not ready within {timeout:.0f}s (last status {status})")


# --------------------------------------------------------------------------
# environment of one CLI
# --------------------------------------------------------------------------

class CliContext:
    """A prepared user HOME (user_setup aimed at the mock) + project dir for one CLI.

    HOME and the CAO home dirs live below ~/.cache: Gemini CLI ignores settings
    below a world-writable directory such as /tmp.
    Each side (floor, cao, upstream) gets its own copy of the freshly set-up HOME,
    so nothing one side writes (trusted folders, settings) helps or hurts another."""

    def __init__(self, cli: str, root: Path, projects: Path, mock: MockLLM):
        self.cli, self.mock = cli, mock
        self.root = root / cli
        self.root.mkdir(mode=0o700, parents=True)
        self.projects = projects / cli
        self.projects.mkdir(mode=0o700, parents=True)
        self.pristine = self.root / "home-pristine"
        self.pristine.mkdir(mode=0o700)
        self.user_env = R.user_setup(cli, self.pristine, mock.url)
        # Upstream starts each CLI by typing its command into a login shell, and
        # /etc/profile resets PATH: put the CLIs' bin dirs on it as their user would.
        bins = ":".join(str(d) for d in R.BIN_DIRS)
        (self.pristine / ".profile").write_text(f'export PATH="{bins}:$PATH"\n')
        self.spec = cao.PROVIDERS[cli]

    def side_dirs(self, side: str):
        base = self.root / side
        base.mkdir(mode=0o700)
        home = base / "home"
        shutil.copytree(self.pristine, home, symlinks=True)
        os.chmod(home, 0o700)
        # upstream refuses working directories below /root (its blocked subtrees), so
        # the projects live below /tmp (allowed by both; Gemini reads no settings there)
        project = self.projects / side
        project.mkdir()
        return base, home, project

    def env(self, home: Path, **extra) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("TMUX", "CAO_", "XDG_"))}
        env["PATH"] = os.pathsep.join([str(d) for d in R.BIN_DIRS] + [env.get("PATH", "")])
        env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
                   XDG_DATA_HOME=str(home / ".local" / "share"),
                   XDG_CACHE_HOME=str(home / ".cache"),
                   XDG_STATE_HOME=str(home / ".local" / "state"))
        env.update(self.user_env)
        env.update(extra)
        return env


# --------------------------------------------------------------------------
# the floor: the bare CLI in a bare tmux window
# --------------------------------------------------------------------------

def bare_launch(ctx: CliContext):
    """argv and env of the CLI as its user would start it: cao's command without
    cao's templated arguments, plus the provider's fixed env settings (e.g.
    Gemini's CI=false) but nothing that names cao's MCP server or prompt."""
    argv, cmd = [], list(ctx.spec["command"])
    for i, a in enumerate(cmd):
        templated = not isinstance(a, str) or "{" in a
        nxt = cmd[i + 1] if i + 1 < len(cmd) else None
        if templated or (a.startswith("-") and nxt is not None
                         and (not isinstance(nxt, str) or "{" in nxt)):
            continue  # a templated value, or the flag that takes one
        argv.append(a)
    env = {k: v for k, v in ctx.spec.get("env", {}).items()
           if isinstance(v, str) and "{" not in v}
    return argv, env


class BareCli:
    """The bare CLI in a bare tmux window on a private socket (no cao, no upstream)."""

    def __init__(self, ctx: CliContext, home: Path, project: Path):
        self.ctx, self.project = ctx, project
        argv, extra = bare_launch(ctx)
        self.argv = argv
        self.env = ctx.env(home, **extra)
        self.tmux = ["tmux", "-L", f"cao-bench-bare-{os.getpid()}-{uuid.uuid4().hex[:8]}",
                     "-f", "/dev/null"]
        self.pane = None

    def run(self, *args, **kw):
        return subprocess.run(self.tmux + list(args), env=self.env, capture_output=True,
                              text=True, **kw)

    def screen(self):
        c = self.run("capture-pane", "-p", "-J", "-t", self.pane)
        if c.returncode:
            raise RuntimeError("the CLI exited (its tmux pane is gone)")
        return c.stdout

    def start(self, timeout=60.0):
        """Launch; (seconds until cao's idle pattern matches on capture-pane, polled
        every 10 ms; seconds until a first-run dialog showed, or None). A dialog is
        answered with cao's keys, as cao does, and the clock runs on until idle."""
        t0 = time.perf_counter()
        r = self.run("new-session", "-d", "-x", "220", "-y", "50", "-c", str(self.project),
                     "-P", "-F", "#{pane_id}", "--", *self.argv)
        if r.returncode:
            raise RuntimeError(f"tmux new-session failed: {r.stderr.strip()}")
        self.pane = r.stdout.strip()
        return self.wait_idle(t0, timeout)

    def wait_idle(self, t0, timeout=60.0):
        screen, answered, dialog_at = "", 0.0, None
        while time.perf_counter() - t0 < timeout:
            try:
                screen = self.screen()
            except RuntimeError:
                raise RuntimeError(f"the CLI exited while starting; screen: "
                                   f"{cao._screen_tail(screen, 3)!r}") from None
            keys = cao.pending_dialog(self.ctx.spec, screen)
            if keys is not None:
                if dialog_at is None:
                    dialog_at = time.perf_counter() - t0
                if time.perf_counter() - answered > 1.0:
                    answered = time.perf_counter()
                    for key in keys:
                        self.run("send-keys", "-t", self.pane, key)
            elif cao.detect_status(self.ctx.spec, screen) == "idle":
                return time.perf_counter() - t0, dialog_at
            time.sleep(POLL_S)
        raise RuntimeError(f"no idle screen within {timeout:.0f}s; screen ends: "
                           f"{cao._screen_tail(screen, 3)!r}")

    def turn(self):
        """Paste a message and press Enter as cao does (tmux paste-buffer -p, then
        send-keys Enter), without any server. Returns seconds until the mock receives
        it, seconds from the answer's last byte until cao's patterns see completed
        on capture-pane (polled every 10 ms; None if not within 20 s), Enters used."""
        mock = self.ctx.mock
        marker = f"BMK{uuid.uuid4().hex[:10]}"
        answer = f"Answer {marker} ok"
        mock.reply(marker, text=answer, delay=MOCK_DELAY)
        buf = "bench-" + marker
        self.run("load-buffer", "-b", buf, "-", input=f"please answer the question {marker}")
        t0 = time.time()
        self.run("paste-buffer", "-p", "-d", "-b", buf, "-t", self.pane)
        self.run("send-keys", "-t", self.pane, "Enter")
        arrival, last_byte, enters = None, None, 1
        needle = marker[-24:]
        changed, screen = time.time(), None
        end = t0 + 60
        while time.time() < end:
            reqs = [r for r in list(mock.requests)
                    if r["kind"] == "main" and marker in r["user_text"]]
            if reqs and arrival is None:
                arrival = min(r["time"] for r in reqs)
            done = [r["last_byte_at"] for r in reqs
                    if r.get("answer") == answer and r.get("last_byte_at")]
            if done:
                last_byte = max(done)
                break
            if arrival is None and enters < 3:
                # as cao's _submit: once the screen is quiet for 80 ms, Enter again if the
                # text still sits in the input line (some CLIs drop an Enter that comes
                # right after a paste)
                now_screen = self.screen()
                if now_screen != screen:
                    screen, changed = now_screen, time.time()
                elif time.time() - changed >= 0.08 \
                        and needle in cao._screen_tail(screen, self.ctx.spec.get("input_lines", 1)) \
                        and cao.detect_status(self.ctx.spec, screen) != "processing":
                    self.run("send-keys", "-t", self.pane, "Enter")
                    enters += 1
                    screen, changed = None, time.time()
            time.sleep(0.005)
        else:
            raise RuntimeError("the bare CLI's turn got no answer within 60 s")
        # the screen itself: capture-pane every 10 ms until cao's patterns say completed
        done_s = None
        end = time.time() + 20
        while time.time() < end:
            status = cao.detect_status(self.ctx.spec, self.screen())
            if status == "completed":
                done_s = time.time() - last_byte
                break
            time.sleep(POLL_S)
        time.sleep(0.5)
        return arrival - t0, done_s, enters

    def stop(self):
        tmux_stop(self.tmux, self.env)
        self.pane = None


def measure_bare(ctx: CliContext, args, out):
    """The CLI's own figures: start (floor) and input -> request, no orchestrator.

    One untimed warm-up launch (page cache, first-run files; dialogs answered as a
    user does once), then `creates` timed launches; the last one also takes
    `bare_turns` turns pasted straight into tmux."""
    base, home, project = ctx.side_dirs("floor")
    bare = BareCli(ctx, home, project)
    n = max(1, args.creates)
    try:
        for i in range(n + 1):
            secs, dialog_at = bare.start()
            if i == 0:
                time.sleep(1.0)  # let it write what it keeps (trust, caches)
            else:
                out["floor"].append(secs)
                if dialog_at is not None:
                    out["floor_dialog"].append(dialog_at)
                log(f"  bare: launch {i}/{n}: idle after {secs:.3f} s"
                    + (f" (first-run dialog after {dialog_at:.3f} s, answered)"
                       if dialog_at is not None else ""))
            if i < n or not args.bare_turns:
                bare.stop()
        time.sleep(1.0)
        for k in range(args.bare_turns):
            secs, done_s, enters = bare.turn()
            out["bare_input"].append(secs)
            if done_s is not None:
                out["bare_done"].append(done_s)
            log(f"  bare: turn {k + 1}/{args.bare_turns}: input->model {secs:.3f} s, "
                f"screen completed {fmt_ms(done_s)} after the last byte"
                + (f" ({enters} Enters)" if enters > 1 else ""))
    finally:
        bare.stop()


# --------------------------------------------------------------------------
# one side: a server, creates, turns
# --------------------------------------------------------------------------

class Side:
    name = "?"

    def __init__(self, ctx: CliContext, args):
        self.ctx, self.args = ctx, args
        self.base, self.home, self.project = ctx.side_dirs(self.name)
        self.cao_home = self.base / "cao-home"
        self.cao_home.mkdir(mode=0o700)
        self.port = C.free_port()
        self.proc = None
        self.notes: list[str] = []

    # -- to override
    def start_server(self):
        raise NotImplementedError

    def tmux_prefix(self):
        raise NotImplementedError

    def input_path(self, terminal_id, message):
        raise NotImplementedError

    def input_body(self, message):
        return None

    def event_seq(self):
        return None

    def event_completed(self, seq, terminal_id):
        return None

    # -- common
    def profile_text(self, extra=""):
        return (f"---\nname: {PROFILE}\ndescription: bench agent\nprovider: {self.ctx.cli}\n"
                f"{extra}---\n{PROFILE_TEXT}\n")

    def wait_server(self):
        C.wait_healthy(self.port, self.proc, deadline_s=60)

    def log_tail(self):
        try:
            lines = (self.base / "server.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(l.strip() for l in lines[-4:] if l.strip())[-400:]

    def spawn(self, argv, env):
        logf = open(self.base / "server.log", "ab")
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=str(self.project))
        logf.close()

    def stop(self):
        env = self.tmux_env()
        if self.proc is not None:
            # panes first: once the server is gone nobody would ask tmux for them
            tmux_stop(self.tmux_prefix(), env)
            C.stop_group(self.proc)
        tmux_stop(self.tmux_prefix(), env)

    def tmux_env(self):
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home)}

    def create(self, index):
        """One session; seconds until ready and the terminal id."""
        name = f"bench{index}"
        path = (f"/sessions?agent_profile={PROFILE}&provider={self.ctx.cli}"
                f"&session_name={name}&working_directory="
                + urllib.parse.quote(str(self.project)))
        t0 = time.time()
        code, body = C.http_json(self.port, "POST", path, timeout=CREATE_TIMEOUT)
        if code != 201 or not isinstance(body, dict) or "id" not in body:
            raise RuntimeError(f"POST /sessions -> {code}: {str(body)[:300]}")
        t_ready, status = wait_ready(self.port, body["id"], CREATE_TIMEOUT)
        if status != "idle":
            self.notes.append(f"create {index}: first ready status was {status}, not idle")
        return t_ready - t0, body["id"], body.get("session_name") or f"cao-{name}"

    def delete_session(self, session):
        try:
            C.http_json(self.port, "DELETE", f"/sessions/{session}", timeout=60)
        except OSError:
            pass

    def turn(self, terminal_id, index):
        """One turn; a dict with what was measured. A turn that did not finish has
        an "error" and keeps what it got (e.g. the input figure)."""
        mock = self.ctx.mock
        marker = f"BMK{uuid.uuid4().hex[:10]}"
        answer = f"Answer {marker} ok"
        mock.reply(marker, text=answer, delay=MOCK_DELAY)
        message = f"please answer the question {marker}"
        seq = self.event_seq()
        poller = StatusPoller(self.port, terminal_id)
        poller.start()
        time.sleep(0.05)  # a few samples of the pre-turn status

        def mine(r):
            return r["kind"] == "main" and marker in r["user_text"]
        out = {"marker": marker, "t_post": None, "post_s": None, "input_s": None,
               "last_byte": None, "done_s": None, "done_event_s": None, "error": None}
        try:
            t_post = out["t_post"] = time.time()
            code, body = C.http_json(self.port, "POST", self.input_path(terminal_id, message),
                                 self.input_body(message), timeout=60)
            out["post_s"] = time.time() - t_post
            if code != 200:
                raise RuntimeError(f"POST input -> {code}: {str(body)[:300]}")
            deadline = t_post + TURN_TIMEOUT
            completed_at = last_byte = None
            while True:
                reqs = [r for r in list(mock.requests) if mine(r)]
                if reqs and out["input_s"] is None:
                    out["input_s"] = min(r["time"] for r in reqs) - t_post
                done = [r for r in reqs if r.get("answer") == answer and r.get("last_byte_at")]
                if done:
                    last_byte = out["last_byte"] = max(r["last_byte_at"] for r in done)
                completed_at, busy_at = poller.completed_after(t_post)
                if completed_at is not None and last_byte is not None \
                        and all(r.get("last_byte_at") for r in reqs):
                    break
                status = poller.last()
                if status == "error":
                    raise RuntimeError("the terminal's status became error during the turn")
                if last_byte is not None and time.time() - last_byte > 12:
                    raise RuntimeError(f"no completed status within 12 s of the model's last "
                                       f"byte (status stays {status})")
                if time.time() > deadline:
                    raise RuntimeError(
                        f"turn not done within {TURN_TIMEOUT:.0f}s (model got the request: "
                        f"{out['input_s'] is not None}, status {status})")
                time.sleep(0.02)
            out["done_s"] = completed_at - last_byte
            event_ts = self.event_completed(seq, terminal_id)
            if event_ts is not None:
                out["done_event_s"] = event_ts - last_byte
        except (RuntimeError, OSError, http.client.HTTPException) as e:
            out["error"] = str(e)
        finally:
            poller.stop()
        out.update(main_requests=len([r for r in mock.requests if mine(r)]),
                   polls=len(poller.samples), reconnects=poller.reconnects)
        return out

    def run(self):
        res = {"creates": [], "turns": [], "errors": []}
        self.start_server()
        self.wait_server()
        n_creates = self.args.creates
        term = None
        for i in range(n_creates):
            secs, tid, sess = self.create(i)
            res["creates"].append(secs)
            log(f"  {self.name}: create {i + 1}/{n_creates}: ready after {secs:.3f} s")
            if i < n_creates - 1:
                self.delete_session(sess)
                time.sleep(1.0)  # let the old CLI wind down before the next start
            else:
                term = tid
        time.sleep(1.0)  # let the CLI finish its start-up work (MCP connect etc.)
        failures = 0
        for k in range(self.args.turns):
            t = self.turn(term, k)
            res["turns"].append(t)
            if not t["error"]:
                failures = 0
            else:
                failures += 1
                res["errors"].append(f"turn {k + 1}: {t['error']}")
                inp = f" (input->model {t['input_s']:.3f} s)" if t["input_s"] is not None else ""
                log(f"  {self.name}: turn {k + 1} failed: {t['error']}{inp}")
                if failures >= 2:
                    res["errors"].append("stopped after 2 failed turns in a row")
                    break
                time.sleep(2.0)
                continue
            ev = f", event {t['done_event_s'] * 1000:.0f} ms" if t["done_event_s"] is not None else ""
            log(f"  {self.name}: turn {k + 1}/{self.args.turns}: input->model "
                f"{t['input_s']:.3f} s, last byte->completed {t['done_s'] * 1000:.0f} ms{ev}")
            time.sleep(0.5)
        res["notes"] = self.notes
        return res


class CaoSide(Side):
    name = "cao"

    def __init__(self, ctx, args):
        super().__init__(ctx, args)
        self.socket = f"cao-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def start_server(self):
        py = REPO / ".venv" / "bin" / "python"
        if not py.exists():
            py = Path(C.python3())
            self.notes.append(f"no {REPO}/.venv; cao run with {py} (needs the mcp package)")
        (self.cao_home / "agent-store").mkdir()
        (self.cao_home / "agent-store" / f"{PROFILE}.md").write_text(self.profile_text())
        env = self.ctx.env(self.home, CAO_HOME_DIR=str(self.cao_home),
                           CAO_TMUX_SOCKET=self.socket, CAO_PROVIDER_INIT_TIMEOUT="90")
        self.spawn([str(py), str(REPO / "cao.py"), "server", "--host", "127.0.0.1",
                    "--port", str(self.port)], env)

    def tmux_prefix(self):
        return ["tmux", "-L", self.socket]

    def input_path(self, terminal_id, message):
        return f"/terminals/{terminal_id}/input"

    def input_body(self, message):
        return {"message": message}

    def event_seq(self):
        return C.http_json(self.port, "GET", "/events?wait=0")[1]["next"]

    def event_completed(self, seq, terminal_id):
        events = C.http_json(self.port, "GET", f"/events?after={seq}")[1]["events"]
        for e in events:
            if e["kind"] == "status" and e["terminal_id"] == terminal_id \
                    and e["data"].get("status") == "completed":
                return e["ts"]
        return None


class UpstreamSide(Side):
    name = "upstream"

    def __init__(self, ctx, args, venv):
        super().__init__(ctx, args)
        self.venv = venv
        self.tmux_tmpdir = self.base / "tmux"
        self.tmux_tmpdir.mkdir(mode=0o700)

    def env(self):
        return self.ctx.env(self.home, CAO_HOME_DIR=str(self.cao_home),
                            TMUX_TMPDIR=str(self.tmux_tmpdir))

    def start_server(self):
        env = self.env()
        src = self.base / f"{PROFILE}.md"
        extra = ""
        if self.ctx.cli == "claude_code" and os.geteuid() == 0:
            # Upstream launches `claude --dangerously-skip-permissions`, which Claude
            # refuses as root; this makes it launch Claude in its default mode, as cao does.
            extra = "permissionMode: default\n"
            self.notes.append("profile has permissionMode: default (as root, Claude refuses "
                              "upstream's default --dangerously-skip-permissions)")
        src.write_text(self.profile_text(extra))
        # `cao install` copies the profile into CAO_HOME_DIR/agent-store and writes the
        # provider's own agent file where it needs one (Copilot, opencode).
        r = subprocess.run([str(self.venv / "bin" / "cao"), "install", str(src),
                            "--provider", self.ctx.cli], env=env, cwd=str(self.project),
                           capture_output=True, text=True, timeout=120)
        if r.returncode:
            tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])
            self.notes.append(f"`cao install` failed ({tail[:200]}); profile copied by hand")
            store = self.cao_home / "agent-store"
            store.mkdir(exist_ok=True)
            shutil.copy(src, store / src.name)
        self.spawn([str(self.venv / "bin" / "cao-server"), "--host", "127.0.0.1",
                    "--port", str(self.port)], env)

    def tmux_prefix(self):
        return ["tmux", "-L", "default"]

    def tmux_env(self):
        return dict(super().tmux_env(), TMUX_TMPDIR=str(self.tmux_tmpdir))

    def input_path(self, terminal_id, message):
        return f"/terminals/{terminal_id}/input?message=" + urllib.parse.quote(message)


# --------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------

NPM_PACKAGES = {"claude_code": "@anthropic-ai/claude-code", "codex": "@openai/codex",
                "gemini_cli": "@google/gemini-cli", "opencode_cli": "opencode-ai",
                "copilot_cli": "@github/copilot", "qwen_code": "@qwen-code/qwen-code"}
PIP_PACKAGES = {"kimi_cli": ("kimi-venv", "kimi_cli"), "hermes": ("hermes-venv", "hermes_agent")}


def cli_version(cli: str) -> str:
    """The installed version, from npm's package.json or the venv's dist-info."""
    try:
        if cli in NPM_PACKAGES:
            pkg = R.CLIS / "npm" / "node_modules" / NPM_PACKAGES[cli] / "package.json"
            return json.loads(pkg.read_text())["version"]
        venv, dist = PIP_PACKAGES[cli]
        hits = sorted((R.CLIS / venv / "lib").glob(f"python3*/site-packages/{dist}-*.dist-info"))
        return hits[0].name[len(dist) + 1:-len(".dist-info")] if hits else "?"
    except (OSError, ValueError, KeyError):
        return "?"


def cao_revision():
    """(git commit, whether cao.py differs from it, sha256 of cao.py)."""
    import hashlib
    digest = hashlib.sha256((REPO / "cao.py").read_bytes()).hexdigest()[:12]
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or "?"
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                     "cao.py"], capture_output=True, text=True).stdout.strip())
    except OSError:
        head, dirty = "?", False
    return head, dirty, digest


def upstream_providers(venv: Path):
    d = C.site_packages(venv) / "cli_agent_orchestrator" / "providers"
    return {p.stem for p in d.glob("*.py")}


def bench_cli(cli, args, mock, root, projects, venv, up_providers):
    out = {"cli": cli, "version": cli_version(cli), "floor": [], "floor_dialog": [],
           "bare_input": [], "bare_done": [], "notes": []}
    ctx = CliContext(cli, root, projects, mock)
    try:
        measure_bare(ctx, args, out)
    except (RuntimeError, OSError) as e:
        out["notes"].append(f"bare CLI failed: {e}")
        log(f"  bare CLI failed: {e}")
    sweep(ctx.root / "floor", "bare CLI", out["notes"])
    for side_name in args.sides:
        if side_name == "upstream":
            if venv is None:
                out["upstream"] = {"na": "upstream venv not available"}
                continue
            if cli not in up_providers:
                out["upstream"] = {"na": "no upstream provider"}
                continue
            side = UpstreamSide(ctx, args, venv)
        else:
            side = CaoSide(ctx, args)
        log(f"{cli}: {side_name} ...")
        try:
            out[side_name] = side.run()
        except Exception as e:  # a side that cannot run: note it and go on
            reason = f"{type(e).__name__}: {e}"
            tail = side.log_tail()
            out[side_name] = {"failed": reason + (f" (server log: {tail})" if tail else ""),
                              "notes": side.notes}
            log(f"  {side_name} failed: {reason}")
        finally:
            side.stop()
            sweep(side.base, side_name, out["notes"])
    return out


def sweep(base: Path, label: str, notes: list) -> None:
    """Kill what outlived the tmux panes of one side, and say so."""
    swept = sweep_leftovers(str(base) + os.sep)
    if swept:
        log(f"  {label}: killed {len(swept)} process(es) that outlived their tmux pane: "
            f"{'; '.join(swept)}")
        notes.append(f"{label}: {len(swept)} process(es) outlived their tmux pane and were "
                     f"killed afterwards: {'; '.join(swept)}")


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

def fmt_s(v):
    return "-" if v is None else f"{v:.3f} s"


def fmt_ms(v):
    return "-" if v is None else f"{v * 1000:.0f} ms"


def ratio(up, ca):
    if up is None or ca is None or ca <= 0:
        return "-"
    return f"{up / ca:.1f}x"


def table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) if i == 0 else str(h).rjust(w)
                     for i, (h, w) in enumerate(zip(headers, widths)))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return "\n".join(out)


def side_state(res, side):
    """(data dict or None, why-not text)."""
    s = res.get(side)
    if s is None:
        return None, "not run"
    if "na" in s:
        return None, f"n/a ({s['na']})"
    if "failed" in s:
        return None, "failed"
    return s, ""


def stats(values):
    if not values:
        return None
    return {"p50": C.median(values), "p99": C.percentile(values, 99), "max": max(values),
            "n": len(values)}


def summarize(results):
    for res in results:
        for side in ("cao", "upstream"):
            s, _ = side_state(res, side)
            if not s:
                continue
            turns = s["turns"]
            s["summary"] = {
                "create": C.median(s["creates"]) if s["creates"] else None,
                "input": stats([t["input_s"] for t in turns if t["input_s"] is not None]),
                "post": stats([t["post_s"] for t in turns if t["post_s"] is not None]),
                "done": stats([t["done_s"] for t in turns
                               if t["done_s"] is not None and t["done_s"] >= 0]),
                "done_event": stats([t["done_event_s"] for t in turns
                                     if t["done_event_s"] is not None and t["done_event_s"] >= 0]),
                "premature": sum(1 for t in turns if t["done_s"] is not None and t["done_s"] < 0),
            }
        res["floor_median"] = C.median(res["floor"]) if res["floor"] else None


def report(results, args):
    lines = []
    n_creates = args.creates
    lines.append(f"cao vs upstream {C.UPSTREAM_VERSION}, real CLIs against tests/mock_llm.py "
                 f"(reply delay {MOCK_DELAY:.0f} s); {args.turns} turns and {n_creates} create(s) per CLI "
                 "and side")
    head, dirty, _ = args.revision
    lines.append(f"cao at git {head}{' + uncommitted changes to cao.py' if dirty else ''}; CLIs: "
                 + ", ".join(f"{r['cli']} {r['version']}" for r in results))
    if args.revision_changed:
        lines.append("WARNING: cao.py changed during the run; later CLIs ran a different cao.py")
    lines.append("")

    def val(res, side, key, sub=None):
        s, why = side_state(res, side)
        if not s:
            return None, why
        v = s["summary"][key]
        if v is None:
            return None, "no data"
        if sub:
            v = v[sub]
        return v, ""

    # 1. create -> ready
    rows = []
    for res in results:
        floor = res["floor_median"]
        ca, cwhy = val(res, "cao", "create")
        up, uwhy = val(res, "upstream", "create")
        target = "-"
        if ca is not None and floor is not None:
            limit = floor + TARGET_READY_SLACK
            target = f"<= {limit:.3f} s {'OK' if ca <= limit else 'MISS'}"
        rows.append([res["cli"], fmt_s(floor), fmt_s(ca) if ca is not None else cwhy,
                     fmt_s(up) if up is not None else uwhy, ratio(up, ca), target])
    lines.append(f"create -> ready (POST /sessions until GET /terminals/{{id}} says idle; "
                 f"median of {n_creates})")
    lines.append(table(["cli", "CLI start (floor)", "cao", f"upstream {C.UPSTREAM_VERSION}",
                        "upstream/cao", "cao target (floor + 0.3 s)"], rows))
    lines.append("")

    # 2. input -> model
    rows = []
    for res in results:
        c50, cwhy = val(res, "cao", "input", "p50")
        cmax, _ = val(res, "cao", "input", "max")
        u50, uwhy = val(res, "upstream", "input", "p50")
        umax, _ = val(res, "upstream", "input", "max")
        b50 = C.median(res["bare_input"]) if res["bare_input"] else None
        target = "-"
        if c50 is not None:
            target = "OK" if c50 <= TARGET_INPUT else "MISS"
        over = fmt_s(c50 - b50) if c50 is not None and b50 is not None else "-"
        rows.append([res["cli"], fmt_s(b50), fmt_s(c50) if c50 is not None else cwhy,
                     fmt_s(cmax), over, fmt_s(u50) if u50 is not None else uwhy, fmt_s(umax),
                     ratio(u50, c50), target])
    lines.append(f"input POST -> the model receives the request (the mock's arrival time of the "
                 f"turn's request); bare CLI: paste + Enter straight into tmux, median of "
                 f"{args.bare_turns}")
    lines.append(table(["cli", "bare CLI", "cao p50", "cao max", "cao - bare", "upstream p50",
                        "upstream max", "upstream/cao", "cao target p50 <= 0.1 s"], rows))
    lines.append("")

    # 2b. how long the input call itself blocks the caller
    rows = []
    for res in results:
        cells = [res["cli"]]
        for side in ("cao", "upstream"):
            st, why = val(res, side, "post")
            cells += [fmt_s(st["p50"]), fmt_s(st["max"])] if st else [why, "-"]
        rows.append(cells)
    lines.append("POST /terminals/{id}/input returns after (the caller waits this long; not a "
                 "target)")
    lines.append(table(["cli", "cao p50", "cao max", "upstream p50", "upstream max"], rows))
    lines.append("")

    # 3. last byte -> completed
    rows = []
    for res in results:
        c50, _ = val(res, "cao", "done", "p50")
        bd = stats(res["bare_done"])
        if bd:
            rows.append([res["cli"], "bare CLI screen", fmt_ms(bd["p50"]), fmt_ms(bd["p99"]),
                         fmt_ms(bd["max"]), bd["n"], "", ""])
        for side, key, label in (("cao", "done", "cao (poll)"),
                                 ("cao", "done_event", "cao (status event ts)"),
                                 ("upstream", "done", "upstream (poll)")):
            st, why = val(res, side, key)
            if st is None:
                if key == "done_event":
                    continue
                rows.append([res["cli"] if side == "cao" and key == "done" and not bd else "",
                             label, why or "no data", "", "", "", "", ""])
                continue
            r = ratio(st["p50"], c50) if side == "upstream" else ""
            target = ""
            if side == "cao" and key == "done":
                missed = [name for name, v, limit in (("p50", st["p50"], TARGET_DONE_P50),
                                                      ("p99", st["p99"], TARGET_DONE_P99))
                          if v > limit]
                target = f"MISS ({', '.join(missed)})" if missed else "OK"
            rows.append([res["cli"] if side == "cao" and key == "done" and not bd else "", label,
                         fmt_ms(st["p50"]), fmt_ms(st["p99"]), fmt_ms(st["max"]), st["n"], r, target])
    lines.append("the model's last byte -> status completed (GET /terminals/{id} every 10 ms, "
                 "kept-alive); bare CLI screen: capture-pane every 10 ms until cao's patterns "
                 "say completed")
    lines.append(table(["cli", "side", "p50", "p99", "max", "n", "upstream/cao p50",
                        "cao target p50 <= 50, p99 <= 150 ms"], rows))

    notes = []
    for res in results:
        for n in res["notes"]:
            notes.append(f"{res['cli']}: {n}")
        if res["floor_dialog"]:
            notes.append(f"{res['cli']}: the bare CLI asked its trust question on "
                         f"{len(res['floor_dialog'])} of {len(res['floor'])} launches (after "
                         f"{C.median(res['floor_dialog']):.3f} s, median); the floor includes "
                         "answering it with cao's keys, as cao does on every create")
        for side in ("cao", "upstream"):
            s = res.get(side)
            if not s or "na" in s:
                continue
            if "failed" in s:
                notes.append(f"{res['cli']}: {side} failed: {s['failed']}")
            for n in s.get("notes", []):
                notes.append(f"{res['cli']}: {side}: {n}")
            for e in s.get("errors", []):
                notes.append(f"{res['cli']}: {side}: {e}")
            summ = s.get("summary")
            if summ and summ["premature"]:
                notes.append(f"{res['cli']}: {side}: {summ['premature']} turn(s) reported "
                             "completed BEFORE the model's last byte (left out of the figures)")
    if notes:
        lines.append("")
        lines.append("notes:")
        lines.extend(f"- {n}" for n in notes)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cli", help="comma-separated providers (default: every installed one)")
    ap.add_argument("--side", choices=("cao", "upstream", "both"), default="both")
    ap.add_argument("--turns", type=int, default=None, help="turns per CLI and side (10)")
    ap.add_argument("--creates", type=int, default=None, help="creates per CLI and side (3)")
    ap.add_argument("--bare-turns", type=int, default=None,
                    help="turns typed straight into the bare CLI (3)")
    ap.add_argument("--quick", action="store_true", help="3 turns, 1 create, 2 bare turns")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args(argv)
    args.turns = args.turns or (3 if args.quick else 10)
    args.creates = args.creates or (1 if args.quick else 3)
    if args.bare_turns is None:
        args.bare_turns = 2 if args.quick else 3
    args.sides = ["cao", "upstream"] if args.side == "both" else [args.side]

    all_clis = list(R.BINARIES)
    wanted = [c.strip() for c in args.cli.split(",")] if args.cli else all_clis
    unknown = [c for c in wanted if c not in R.BINARIES]
    if unknown:
        ap.error(f"unknown CLI(s) {', '.join(unknown)}; choose from {', '.join(all_clis)}")
    if not shutil.which("tmux"):
        print("tmux is not installed; nothing to measure", file=sys.stderr)
        return 0
    clis, skipped = [], []
    for c in wanted:
        (clis if R.installed(c) else skipped).append(c)
    for c in skipped:
        log(f"{c}: {R.BINARIES[c]} not installed under {R.CLIS}; skipped")

    venv = None
    up_providers = set()
    if "upstream" in args.sides:
        try:
            venv = C.ensure_upstream_venv()
            up_providers = upstream_providers(venv)
        except (OSError, subprocess.SubprocessError) as e:
            log(f"upstream venv not available: {e}")

    args.revision = cao_revision()
    C.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    root = C.CACHE_DIR / f"run-{uuid.uuid4().hex[:10]}"
    root.mkdir(mode=0o700)
    projects = Path(tempfile.mkdtemp(prefix="cao-bench-projects-"))
    results = []
    t_start = time.time()
    mock = MockLLM().start()
    try:
        for cli in clis:
            log(f"{cli}: bare CLI ...")
            results.append(bench_cli(cli, args, mock, root, projects, venv, up_providers))
    finally:
        mock.stop()
        swept = sweep_leftovers(str(root))
        if swept:
            log(f"killed {len(swept)} leftover process(es): {'; '.join(swept)}")
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(projects, ignore_errors=True)
    log(f"done in {time.time() - t_start:.0f} s")
    args.revision_changed = cao_revision()[2] != args.revision[2]
    summarize(results)
    print(report(results, args))
    for c in skipped:
        print(f"- {c}: not installed ({R.BINARIES[c]} not under {R.CLIS})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"turns": args.turns, "creates": args.creates, "mock_delay": MOCK_DELAY,
                       "bare_turns": args.bare_turns, "cao_git": args.revision[0],
                       "cao_py_modified": args.revision[1], "cao_py_sha256": args.revision[2],
                       "cao_py_changed_during_run": args.revision_changed,
                       "results": results}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
