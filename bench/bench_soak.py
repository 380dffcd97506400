"""Soak: demo agents, inbox traffic and handoff chains while tmux and the server are killed.

    /work/main/.venv/bin/python bench/bench_soak.py [--minutes 10] [--agents 50] [--chains 10]
        [--rate 10] [--delay 0.5] [--tmux-kills 2] [--server-kills 2] [--seed N]
        [--json out.json] [--keep]

Needs the repo's venv (the demo agent's /handoff runs the real MCP stdio chain). One
private CaoEnv (tests/conftest.py): own CAO_HOME_DIR, tmux socket and port, the server's
output in a file; everything is stopped by PID at the end (cao servers, every tmux server
PID seen during the run, pane processes, processes whose environment names the home).

- Agents: `--agents` demo agents. `--chains` of them are supervisors in session
  cao-chains; the others take inbox traffic, 10 per session (cao-soak0, cao-soak1, ...).
- Inbox: one poster, `--rate` messages/s to random inbox agents, each message
  "<token> from <sender id>" with a unique token (t000123). A POST cut by a server kill is
  looked up in the inbox table after the restart and sent again only if it is not there.
- Chains: one thread per supervisor, one chain at a time, 0.5-2 s apart. Even slots type
  "/handoff developer /handoff reviewer <token>" into the supervisor (two MCP handoffs;
  answer "done: done: done: <token>"). Odd slots call POST /terminals/run-step (developer
  worker whose prompt is "/handoff reviewer <token>", caller_id = the supervisor, a
  job_id; answer "done: done: <token>"); a cut call is followed by GET /handoff-results.
  Outcome: answered; failed visibly (an error answer, a 5xx with a message, a job in
  state error, or a "[cao] Your handoff ... failed" inbox message to the supervisor);
  silent (nothing within --chain-timeout).
- Chaos: `--tmux-kills` SIGKILLs of the tmux server PID and `--server-kills` SIGKILLs of
  the cao server at random times in the middle 70 % of the run, at least a sixth of that
  window apart. After a tmux kill: wait until every terminal shows lost, then POST
  /sessions/resume; resume time = from that POST until every terminal is back (not lost,
  status idle/completed/processing/waiting_user_answer). After a server kill: start a new
  server at once; restart time = Popen -> GET /health 200, and -> every terminal ready.
- End: stop traffic, wait for quiescence (no queued/delivering inbox row, every chain
  ended, every terminal ready and not processing), then count from the inbox table and
  the demo agents' log (CAO_DEMO_LOG, one line per input they answered).
"""
import argparse
import collections
import http.client
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import CAO, CaoEnv, kill_pid, pid_alive  # noqa: E402
from _common import percentile  # noqa: E402

READY = ("idle", "completed", "processing", "waiting_user_answer")
TOKEN_RE = re.compile(r"\b(t\d{6}) from ([0-9a-f]{8})\b")
T0 = time.monotonic()


def log(*args):
    print(f"[soak {time.monotonic() - T0:7.1f}s]", *args, file=sys.stderr, flush=True)


class Env(CaoEnv):
    """CaoEnv with the server's output in a file, its PIDs and tmux PIDs remembered."""

    def __init__(self, tmp):
        super().__init__(tmp)
        self.proc = None
        self.cmd = CAO
        self.tmux_seen = set()
        self.lock = threading.Lock()
        self.http_errors = collections.Counter()  # "METHOD route -> code"
        self.http_500 = []

    def start_server(self, cmd=None):
        n = len(self.servers)
        self.logfile = self.home.parent / f"server-stdout-{n}.log"
        out = open(self.logfile, "ab")
        t = time.monotonic()
        proc = subprocess.Popen((cmd or self.cmd) + ["server", "--port", str(self.port)], env=self.env,
                                cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        out.close()
        self.servers.append(proc.pid)
        deadline = t + 30
        while not self.healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.logfile.read_text()[-800:]}")
            time.sleep(0.01)
        self.proc = proc
        return time.monotonic() - t

    def kill_server(self):
        proc = self.proc
        os.kill(proc.pid, signal.SIGKILL)  # proc is unreaped, so the PID is still ours
        proc.wait(10)

    def tmux_server_pid(self):
        out = self.tmux("display-message", "-p", "#{pid}").stdout.strip()
        if out.isdigit():
            with self.lock:
                self.tmux_seen.add(int(out))
            return int(out)
        return None

    def remember_tmux(self):
        try:
            pids = self.tmux_pids()
        except Exception:
            return
        with self.lock:
            self.tmux_seen |= pids

    def call(self, method, path, body=None, timeout=30):
        """One request; counts 5xx answers. Raises OSError/HTTPException when cut."""
        code, payload = self.request(method, path, body, timeout=timeout)
        if code >= 500:
            route = re.sub(r"[0-9a-f]{8,32}", "ID", path.split("?")[0])
            with self.lock:
                self.http_errors[f"{method} {route} -> {code}"] += 1
                if code == 500 and len(self.http_500) < 10:
                    self.http_500.append((method, path, str(payload)[:400]))
        return code, payload

    def call_retry(self, method, path, body=None, timeout=30, give_up=None):
        """Like call, but waits for a server that is down (a kill in progress)."""
        while True:
            try:
                return self.call(method, path, body, timeout)
            except (OSError, http.client.HTTPException):
                if give_up is not None and time.monotonic() > give_up:
                    raise
                time.sleep(0.2)

    def db(self):
        conn = sqlite3.connect(f"file:{self.home / 'db' / 'cao.db'}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def db_query(self, sql, args=()):
        for attempt in range(20):
            try:
                with self.db() as conn:
                    return conn.execute(sql, args).fetchall()
            except sqlite3.OperationalError:
                time.sleep(0.1)
        raise RuntimeError(f"db busy: {sql}")

    def terminals(self, give_up=None):
        code, body = self.call_retry("GET", "/terminals", give_up=give_up)
        return body if code == 200 else []

    def cleanup(self):
        self.remember_tmux()
        super().cleanup()
        if self.proc is not None and self.proc.poll() is None:
            kill_pid(self.proc.pid)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except Exception:
                pass
        with self.lock:
            pids = set(self.tmux_seen)
        for pid in pids:  # tmux servers of earlier lives and their panes
            if pid_alive(pid):
                kill_pid(pid, signal.SIGKILL)


def snapshot_cao(tmp):
    """A copy of cao.py (with the profiles and web files beside it) to run, so an edit
    of the checkout during a long run cannot reach the server or a new agent."""
    import hashlib
    import py_compile
    import shutil
    dest = tmp / "cao-snapshot"
    dest.mkdir()
    for _ in range(30):  # someone may be saving the file right now
        shutil.copy2(ROOT / "cao.py", dest / "cao.py")
        try:
            py_compile.compile(str(dest / "cao.py"), doraise=True)
            break
        except py_compile.PyCompileError:
            time.sleep(1)
    else:
        raise RuntimeError("cao.py does not compile")
    for sub in ("profiles", "web_static"):
        if (ROOT / sub).is_dir():
            shutil.copytree(ROOT / sub, dest / sub)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "cao.py"],
                           capture_output=True, text=True).stdout.strip()
    sha = hashlib.sha256((dest / "cao.py").read_bytes()).hexdigest()[:12]
    return [sys.executable, str(dest / "cao.py")], f"git {head}{' + uncommitted cao.py' if dirty else ''}, sha256 {sha}"


def all_ready(terms):
    return bool(terms) and all(t.get("lost") is None and t.get("status") in READY for t in terms)


def ready_ids(env):
    return {t["id"] for t in env.terminals() if all_ready([t])}


def wait_all_ready(env, since, ids, ev, key, limit=120):
    """Seconds from `since` until every terminal of `ids` (those ready before the kill;
    one removed meanwhile counts as done) is back and ready; None if not within limit."""
    deadline = time.monotonic() + limit
    terms = []
    while time.monotonic() < deadline:
        try:
            terms = [t for t in env.terminals(give_up=deadline) if t["id"] in ids]
        except (OSError, http.client.HTTPException):
            break
        if all(all_ready([t]) for t in terms):
            ev[key] = round(time.monotonic() - since, 2)
            return
        time.sleep(0.1)
    ev[key] = None
    ev[key + "_missing"] = [(t["id"], t["status"], bool(t["lost"])) for t in terms
                            if not all_ready([t])]


# -- inbox traffic ---------------------------------------------------------------------

class Poster(threading.Thread):
    def __init__(self, env, agents, rate, rng, stop):
        super().__init__(name="poster", daemon=True)
        self.env, self.agents, self.rate, self.rng, self.stop = env, agents, rate, rng, stop
        self.accepted = {}      # token -> receiver
        self.rejected = []      # (token, code, detail)
        self.confirmed_after_cut = 0
        self.resent_after_cut = 0
        self.k = 0

    def stored(self, token):
        return bool(self.env.db_query("SELECT 1 FROM inbox WHERE message LIKE ?", (token + " %",)))

    def post(self, receiver, sender, token):
        body = {"sender_id": sender, "message": f"{token} from {sender}"}
        while True:
            try:
                code, reply = self.env.call("POST", f"/terminals/{receiver}/inbox/messages", body,
                                            timeout=15)
            except (OSError, http.client.HTTPException):
                # Cut by a server kill: the row may or may not be stored. Ask the next server.
                while not self.env.healthy():
                    time.sleep(0.1)
                if self.stored(token):
                    self.confirmed_after_cut += 1
                    return "accepted"
                self.resent_after_cut += 1
                continue
            if code == 200:
                return "accepted"
            self.rejected.append((token, code, str(reply)[:200]))
            return "rejected"

    def run(self):
        start = time.monotonic()
        while not self.stop.is_set():
            due = start + self.k / self.rate
            now = time.monotonic()
            if due > now:
                self.stop.wait(due - now)
                continue
            if now - due > 2:  # after an outage do not burst: start the clock again
                start, self.k = now, 0
                continue
            receiver, sender = self.rng.sample(self.agents, 2)
            token = f"t{len(self.accepted) + len(self.rejected):06d}"
            if self.post(receiver, sender, token) == "accepted":
                self.accepted[token] = receiver
            self.k += 1


# -- handoff chains ---------------------------------------------------------------------

class Chain(threading.Thread):
    def __init__(self, env, slot, sup, session, args, rng, stop, outcomes):
        super().__init__(name=f"chain-{slot}", daemon=True)
        self.env, self.slot, self.sup, self.session = env, slot, sup, session
        self.args, self.rng, self.stop, self.outcomes = args, rng, stop, outcomes
        self.kind = "mcp" if slot % 2 == 0 else "run-step"
        self.conversation = None

    def sup_turns(self):
        if not self.conversation:
            return []
        path = self.env.home / "demo-conversations" / f"{self.conversation}.jsonl"
        try:
            return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        except (OSError, ValueError):
            return []

    def wait_sup_ready(self):
        while not self.stop.is_set():
            try:
                code, term = self.env.call("GET", f"/terminals/{self.sup}")
                if code == 200 and term["lost"] is None and term["status"] in ("idle", "completed"):
                    self.conversation = term.get("conversation_id")
                    pending = self.env.call("GET", f"/terminals/{self.sup}/inbox/messages?status=queued")
                    if pending[0] == 200 and not pending[1]:
                        return True
            except (OSError, http.client.HTTPException):
                pass
            self.stop.wait(0.3)
        return False

    def record(self, token, started, outcome, detail="", **extra):
        self.outcomes.append({"slot": self.slot, "kind": self.kind, "token": token,
                              "started": round(started - T0, 1),
                              "wall": round(time.time() - (time.monotonic() - started), 2),
                              "took": round(time.monotonic() - started, 2),
                              "outcome": outcome, "detail": detail[:300], **extra})

    def run(self):
        n = 0
        while not self.stop.is_set():
            if not self.wait_sup_ready():
                return
            token = f"c{self.slot}x{n:04d}"
            n += 1
            started = time.monotonic()
            if self.kind == "mcp":
                self.run_mcp(token, started)
            else:
                self.run_step(token, started)
            self.stop.wait(self.rng.uniform(0.5, 2.0))

    def run_mcp(self, token, started):
        seen = len(self.sup_turns())
        try:
            code, reply = self.env.call("POST", f"/terminals/{self.sup}/input",
                                        {"message": f"/handoff developer /handoff reviewer {token}"})
            if code != 200:
                return self.record(token, started, "failed", f"input -> {code} {reply}")
        except (OSError, http.client.HTTPException) as e:
            log(f"chain {self.slot}: input cut ({e}); following the supervisor anyway")
        deadline = started + self.args.chain_timeout
        while time.monotonic() < deadline:
            turns = self.sup_turns()[seen:]
            for turn in turns:
                if turn["input"].startswith("[cao] Your handoff") and \
                        f"done: done: {token}" in turn["input"]:  # answered as tmux died
                    return self.record(token, started, "answered", "", via_inbox=True)
                if token in turn["input"]:
                    ok = turn["answer"] == f"done: done: done: {token}"
                    return self.record(token, started, "answered" if ok else "failed",
                                       "" if ok else turn["answer"])
                if turn["input"].startswith("[cao] Your handoff"):
                    return self.record(token, started, "failed", "inbox: " + turn["input"])
            time.sleep(0.3)
        since = time.time() - (time.monotonic() - started)
        cut = self.env.db_query("SELECT 1 FROM events WHERE kind = 'terminal_resumed' AND "
                                "terminal_id = ? AND ts >= ? AND data LIKE '%\"interrupted\": true%'",
                                (self.sup, since))
        if cut:  # the resume said the supervisor's running turn was gone
            return self.record(token, started, "failed", "resume: its turn was cut")
        jobs = self.env.db_query("SELECT job_id, state, error_message FROM handoff_jobs WHERE "
                                 "caller_id = ? AND created_at >= ?", (self.sup, since))
        self.record(token, started, "silent", "no answer and no notice",
                    jobs=[dict(j) for j in jobs])

    def run_step(self, token, started):
        job = uuid.uuid4().hex
        body = {"agent": "developer", "prompt": f"/handoff reviewer {token}", "provider": "demo",
                "session_name": self.session, "caller_id": self.sup, "job_id": job,
                "timeout": self.args.chain_timeout}
        try:
            code, reply = self.env.call("POST", "/terminals/run-step", body,
                                        timeout=self.args.chain_timeout + 30)
            if code == 200:
                ok = reply.get("last_message") == f"done: done: {token}"
                return self.record(token, started, "answered" if ok else "failed",
                                   "" if ok else f"answer {reply.get('last_message')!r}")
            detail = reply.get("detail") if isinstance(reply, dict) else reply
            if isinstance(detail, dict):
                detail = detail.get("message") or json.dumps(detail)
            return self.record(token, started, "failed", f"run-step -> {code} {detail}")
        except (OSError, http.client.HTTPException) as e:
            log(f"chain {self.slot}: run-step cut ({type(e).__name__}); following job {job[:8]}")
        deadline = started + self.args.chain_timeout + 30
        state = None
        while time.monotonic() < deadline:
            try:
                code, state = self.env.call("GET", f"/handoff-results/{job}")
            except (OSError, http.client.HTTPException):
                time.sleep(0.3)
                continue
            if code == 200 and state["state"] == "completed":
                ok = state.get("last_message") == f"done: done: {token}"
                return self.record(token, started, "answered" if ok else "failed",
                                   "" if ok else f"late answer {state.get('last_message')!r}",
                                   after_cut=True)
            if code == 200 and state["state"] == "error":
                return self.record(token, started, "failed", "job: " + str(state.get("error_message")),
                                   after_cut=True)
            if code == 404:
                return self.record(token, started, "silent", "job unknown after the cut",
                                   after_cut=True)
            time.sleep(0.5)
        self.record(token, started, "silent", f"job still {state}", after_cut=True)


# -- chaos ------------------------------------------------------------------------------

def kill_tmux(env, events):
    pid = env.tmux_server_pid()
    env.remember_tmux()
    before = ready_ids(env)
    t = time.monotonic()
    log(f"KILL tmux server pid {pid}")
    os.kill(pid, signal.SIGKILL)
    ev = {"what": "tmux kill", "at": round(t - T0, 1), "wall": time.time(), "pid": pid}
    # every terminal marked lost
    deadline = t + 60
    while time.monotonic() < deadline:
        terms = env.terminals()
        if terms and all(x["lost"] for x in terms):
            ev["all_lost_after"] = round(time.monotonic() - t, 2)
            break
        time.sleep(0.1)
    else:
        ev["not_lost"] = [x["id"] for x in env.terminals() if not x["lost"]]
    r0 = time.monotonic()
    try:
        code, body = env.call("POST", "/sessions/resume", timeout=600)
    except (OSError, http.client.HTTPException) as e:
        code, body = None, str(e)
    ev["resume_post"] = round(time.monotonic() - r0, 2)
    ev["resume_code"] = code
    if code == 200:
        terms = [x for s in body["sessions"] for x in s["terminals"]]
        ev["resumed"] = collections.Counter(x["resumed"] for x in terms)
        ev["resume_problems"] = [x for x in terms if x["resumed"] == "failed" or x.get("detail")]
    else:
        ev["resume_body"] = str(body)[:500]
    ev["terminals"] = len(before)
    wait_all_ready(env, r0, before, ev, "resume_all_ready")
    env.tmux_server_pid()
    env.remember_tmux()
    log(f"tmux kill done: {ev}")
    events.append(ev)


def kill_server(env, events):
    env.remember_tmux()
    before = ready_ids(env)
    t = time.monotonic()
    log(f"KILL cao server pid {env.proc.pid}")
    env.kill_server()
    ev = {"what": "server kill", "at": round(t - T0, 1), "wall": time.time(), "pid": env.proc.pid}
    r0 = time.monotonic()
    ev["restart_healthy"] = round(env.start_server(), 3)
    ev["terminals"] = len(before)
    wait_all_ready(env, r0, before, ev, "restart_all_ready")
    log(f"server kill done: {ev}")
    events.append(ev)


def chaos(env, plan, stop, events):
    for at, what in plan:
        while time.monotonic() - T_RUN[0] < at:
            if stop.wait(0.5):
                return
        try:
            (kill_tmux if what == "tmux" else kill_server)(env, events)
        except Exception as e:  # report, do not hide
            log(f"chaos {what} failed: {type(e).__name__}: {e}")
            events.append({"what": what, "error": f"{type(e).__name__}: {e}"})


T_RUN = [0.0]


# -- analysis ---------------------------------------------------------------------------

def analyse(env, poster, outcomes, events, args, audit, timings):
    rows = env.db_query("SELECT id, receiver_id, message, status, reason, created_at, "
                        "delivered_at FROM inbox")
    by_token = collections.defaultdict(list)
    for r in rows:
        m = TOKEN_RE.match(r["message"])
        if m:
            by_token[m.group(1)].append(r)
    seen, busy, busy_kinds, wrong_receiver = collections.Counter(), 0, collections.Counter(), 0
    lines = audit.read_text().splitlines() if audit.exists() else []
    entries = [json.loads(line) for line in lines]
    busy_examples = []
    tmux_walls = [e["wall"] for e in events if e["what"] == "tmux kill" and "wall" in e]
    server_walls = [e["wall"] for e in events if e["what"] == "server kill" and "wall" in e]

    def near(t, walls, before=10, after=30):
        return any(w - before <= t <= w + after for w in walls)
    for i, entry in enumerate(entries):
        tokens = TOKEN_RE.findall(entry["input"])
        for token, _ in tokens:
            seen[token] += 1
            if poster.accepted.get(token) not in (None, entry["terminal_id"]):
                wrong_receiver += 1
        if entry["busy_input"]:
            busy += 1
            kind = ("inbox" if tokens else "cao notice" if entry["input"].startswith("[cao]")
                    else "chain" if "/handoff" in entry["input"] else "other")
            busy_kinds[kind] += 1
            nxt = next((e for e in entries[i + 1:] if e["terminal_id"] == entry["terminal_id"]), None)
            busy_examples.append({"terminal": entry["terminal_id"], "input": entry["input"][:100],
                                  "t": entry["t"], "next_input": nxt and nxt["input"][:100],
                                  "next_after": nxt and round(nxt["t"] - entry["t"], 2),
                                  "near_tmux_kill": near(entry["t"], tmux_walls),
                                  "near_server_kill": near(entry["t"], server_walls)})
    accepted = poster.accepted
    status = {t: [r["status"] for r in by_token.get(t, [])] for t in accepted}
    delivered = [t for t, s in status.items() if "delivered" in s]
    failed = [t for t, s in status.items() if "failed" in s and "delivered" not in s]
    lost = [t for t, s in status.items() if "delivered" not in s and "failed" not in s]
    unanswered = [t for t in delivered if not seen[t]]
    # cao marks a paste that tmux's death cut as delivered (never pasted twice), with
    # this reason; the agent died before it could answer.
    unanswered_at_kill = [t for t in unanswered if any(
        "tmux died just after the paste" in (r["reason"] or "") or
        (r["delivered_at"] and near(r["delivered_at"], tmux_walls, 5, 0)) for r in by_token[t])]
    # cao says on the row that its receiver was lost before it finished that turn.
    unanswered_flagged = [t for t in unanswered if any(r["reason"] for r in by_token[t])]
    dup = {t: c for t, c in seen.items() if c > 1}
    first_answer = {}
    for entry in entries:
        for token, _ in TOKEN_RE.findall(entry["input"]):
            first_answer.setdefault(token, entry["t"])
    dup_at_kill = [t for t in dup if near(first_answer[t], tmux_walls, 5, 2)]
    stored_twice = [t for t, rs in by_token.items() if len(rs) > 1]
    fail_reasons = collections.Counter(
        re.sub(r"[0-9a-f]{8}", "ID", r["reason"] or "")[:120]
        for t in failed for r in by_token[t] if r["status"] == "failed")
    for o in outcomes:
        if o["outcome"] == "silent":
            o["tmux_kill_during"] = near(o["wall"], tmux_walls, o["took"], 0)
            o["server_kill_during"] = near(o["wall"], server_walls, o["took"], 0)
    chains = collections.Counter(o["outcome"] for o in outcomes)
    chain_fail = collections.Counter(re.sub(r"[0-9a-f]{8,32}|c\d+x\d+", "X", o["detail"])[:140]
                                     for o in outcomes if o["outcome"] == "failed")
    bad_log = []
    for f in sorted((env.home / "logs").glob("*.log")):  # server.log (if any), mcp.log
        bad_log += [f"{f.name}: {l}" for l in f.read_text(errors="replace").splitlines()
                    if re.search(r"Traceback|ERROR|Error:| 500 ", l)]
    stdout_bad = []
    for f in sorted(env.home.parent.glob("server-stdout-*.log")):
        stdout_bad += [f"{f.name}: {l}" for l in f.read_text(errors="replace").splitlines()
                       if re.search(r"Traceback|Error|Exception", l)]
    summary = {
        "config": {k: getattr(args, k) for k in ("minutes", "agents", "chains", "rate", "delay",
                                                 "tmux_kills", "server_kills", "seed")},
        "timings": timings, "cao": args.cao_version,
        "messages": {
            "posted": len(accepted), "rejected": len(poster.rejected),
            "rejected_examples": poster.rejected[:5],
            "post_cut_then_found": poster.confirmed_after_cut,
            "post_cut_then_resent": poster.resent_after_cut,
            "delivered": len(delivered), "failed": len(failed), "lost": len(lost),
            "lost_examples": [(t, accepted[t], [dict(r) for r in by_token.get(t, [])])
                              for t in lost[:10]],
            "delivered_never_answered": len(unanswered),
            "delivered_never_answered_within_5s_before_a_tmux_kill": len(unanswered_at_kill),
            "delivered_never_answered_with_a_reason": len(unanswered_flagged),
            "delivered_never_answered_examples": [(t, [dict(r) for r in by_token[t]])
                                                  for t in unanswered[:10]],
            "duplicated": len(dup), "duplicated_examples": dict(list(dup.items())[:10]),
            "duplicated_first_answer_within_5s_of_a_tmux_kill": len(dup_at_kill),
            "stored_twice": len(stored_twice), "wrong_receiver": wrong_receiver,
            "fail_reasons": dict(fail_reasons),
        },
        "busy_inputs": busy, "busy_inputs_by_kind": dict(busy_kinds),
        "busy_examples": busy_examples[:20],
        "demo_log_lines": len(lines),
        "chains": {"started": len(outcomes), "answered": chains["answered"],
                   "failed_visibly": chains["failed"], "silent": chains["silent"],
                   "by_kind": {k: dict(collections.Counter(o["outcome"] for o in outcomes
                                                           if o["kind"] == k))
                               for k in ("mcp", "run-step")},
                   "answer_time_p50": percentile([o["took"] for o in outcomes
                                                  if o["outcome"] == "answered"], 50)
                   if chains["answered"] else None,
                   "failure_messages": dict(chain_fail.most_common(8)),
                   "silent_no_job_cut_by_tmux_kill": sum(
                       1 for o in outcomes if o["outcome"] == "silent" and o.get("tmux_kill_during")
                       and not o.get("jobs") and o["kind"] == "mcp"),
                   "silent_job_failed_caller_not_told": sum(
                       1 for o in outcomes if o["outcome"] == "silent" and o.get("jobs")
                       and all(j["state"] == "error" for j in o["jobs"])),
                   "silent_examples": [o for o in outcomes if o["outcome"] == "silent"][:10],
                   "all": outcomes},
        "events": events,
        "http_5xx": dict(env.http_errors), "http_500_examples": env.http_500,
        "server_log_errors": len(bad_log), "server_log_error_examples": bad_log[:15],
        "server_stdout_errors": stdout_bad[:15],
        "terminals_at_end": len(env.terminals()),
    }
    return summary


def markdown(s):
    m, c = s["messages"], s["chains"]
    tm = [e for e in s["events"] if e["what"].startswith("tmux")]
    sv = [e for e in s["events"] if e["what"].startswith("server")]
    rows = [
        ("inbox messages posted (accepted)", m["posted"]),
        ("... delivered", m["delivered"]),
        ("... failed (with a reason)", m["failed"]),
        ("... lost (accepted, never delivered nor failed)", m["lost"]),
        ("... delivered but never answered by the agent (of which pasted as tmux was killed / "
         "flagged on the row with a reason)",
         f"{m['delivered_never_answered']} ({m['delivered_never_answered_within_5s_before_a_tmux_kill']}"
         f" / {m['delivered_never_answered_with_a_reason']})"),
        ("... duplicated: answered twice (of which first answered -5..+2 s around a tmux kill)",
         f"{m['duplicated']} ({m['duplicated_first_answer_within_5s_of_a_tmux_kill']})"),
        ("POSTs rejected (4xx)", m["rejected"]),
        ("inputs into a busy agent", f"{s['busy_inputs']} {s['busy_inputs_by_kind'] or ''}"),
        ("chains started", c["started"]),
        ("... answered", f"{c['answered']} (p50 {c['answer_time_p50'] or 0:.1f} s)"),
        ("... failed visibly", c["failed_visibly"]),
        ("... silent: no outcome (supervisor died with tmux before any job / job failed, caller not told)",
         f"{c['silent']} ({c['silent_no_job_cut_by_tmux_kill']} / {c['silent_job_failed_caller_not_told']})"),
    ]
    for i, e in enumerate(tm, 1):
        rows.append((f"tmux kill {i} at {e.get('at')} s: all lost after / resume POST / all ready",
                     f"{e.get('all_lost_after')} s / {e.get('resume_post')} s / "
                     f"{e.get('resume_all_ready')} s"))
    for i, e in enumerate(sv, 1):
        rows.append((f"server kill {i} at {e.get('at')} s: restart -> /health / all ready",
                     f"{e.get('restart_healthy')} s / {e.get('restart_all_ready')} s"))
    codes = collections.Counter()
    for k, v in s["http_5xx"].items():
        codes[k.rsplit(" ", 1)[-1]] += v
    rows.append(("terminals at the end (workers of cut handoffs stay)", s["terminals_at_end"]))
    rows.append(("HTTP 5xx answers (by code)", dict(codes) or 0))
    rows.append(("error lines in CAO_HOME_DIR/logs (mcp.log ...)", s["server_log_errors"]))
    out = ["| figure | value |", "| --- | --- |"]
    out += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(out)


# -- main -------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--chains", type=int, default=10)
    ap.add_argument("--rate", type=float, default=10, help="inbox messages per second")
    ap.add_argument("--delay", type=float, default=0.5, help="CAO_DEMO_DELAY")
    ap.add_argument("--tmux-kills", type=int, default=2)
    ap.add_argument("--server-kills", type=int, default=2)
    ap.add_argument("--chain-timeout", type=float, default=150)
    ap.add_argument("--settle", type=float, default=300, help="max wait for quiescence (s)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, db)")
    args = ap.parse_args()
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    rng = random.Random(args.seed)
    n_inbox = args.agents - args.chains
    if n_inbox < 2:
        sys.exit("need at least 2 inbox agents (--agents - --chains)")
    tmp = Path(tempfile.mkdtemp(prefix="cao-bench-soak-"))
    env = Env(tmp)
    audit = tmp / "demo-log.jsonl"
    env.env.update(CAO_DEMO_DELAY=str(args.delay), CAO_DEMO_LOG=str(audit))
    env.cmd, args.cao_version = snapshot_cao(tmp)
    log(f"cao {args.cao_version}; seed {args.seed}, home {env.home}, port {env.port}, socket {env.socket}")
    try:
        t = env.start_server()
        timings = {"first_start_healthy": round(t, 3)}
        t = time.monotonic()
        inbox_agents, sups = [], []
        for i in range(n_inbox):
            sess = f"soak{i // 10}"
            if i % 10 == 0:
                code, body = env.call("POST", f"/sessions?agent_profile=developer&provider=demo"
                                              f"&session_name={sess}", timeout=120)
            else:
                code, body = env.call("POST", f"/sessions/cao-{sess}/terminals",
                                      {"agent_profile": "developer", "provider": "demo"},
                                      timeout=120)
            if code != 201:
                raise RuntimeError(f"create agent {i}: {code} {body}")
            inbox_agents.append(body["id"])
        for i in range(args.chains):
            if i == 0:
                code, body = env.call("POST", "/sessions?agent_profile=code_supervisor"
                                              "&provider=demo&session_name=chains", timeout=120)
            else:
                code, body = env.call("POST", "/sessions/cao-chains/terminals",
                                      {"agent_profile": "code_supervisor", "provider": "demo"},
                                      timeout=120)
            if code != 201:
                raise RuntimeError(f"create supervisor {i}: {code} {body}")
            sups.append(body["id"])
        timings["create_agents"] = round(time.monotonic() - t, 1)
        env.tmux_server_pid()
        log(f"{len(inbox_agents)} inbox agents and {len(sups)} supervisors in "
            f"{timings['create_agents']} s")

        duration = args.minutes * 60
        lo, hi = 0.15 * duration, 0.85 * duration
        kinds = ["tmux"] * args.tmux_kills + ["server"] * args.server_kills
        rng.shuffle(kinds)
        gap = (hi - lo) / max(1, len(kinds)) / 2  # kills at least this far apart
        while True:
            times = sorted(rng.uniform(lo, hi) for _ in kinds)
            if all(b - a >= gap for a, b in zip(times, times[1:])):
                break
        plan = list(zip(times, kinds))
        log("chaos plan: " + ", ".join(f"{w} at {a:.0f}s" for a, w in plan))

        stop_traffic, stop_chains, stop_chaos = threading.Event(), threading.Event(), threading.Event()
        events, outcomes = [], []
        T_RUN[0] = time.monotonic()
        poster = Poster(env, inbox_agents, args.rate, random.Random(rng.random()), stop_traffic)
        chains = [Chain(env, i, sup, "cao-chains", args, random.Random(rng.random()), stop_chains,
                        outcomes) for i, sup in enumerate(sups)]
        chaos_thread = threading.Thread(target=chaos, args=(env, plan, stop_chaos, events),
                                        daemon=True)
        poster.start()
        for c in chains:
            c.start()
        chaos_thread.start()
        while time.monotonic() - T_RUN[0] < duration:
            time.sleep(min(30, duration - (time.monotonic() - T_RUN[0])) if duration > 0 else 0)
            log(f"posted {len(poster.accepted)}, chains {collections.Counter(o['outcome'] for o in outcomes)}, "
                f"events {len(events)}")
        chaos_thread.join()  # a kill in progress finishes its recovery
        log("traffic stops; waiting for the chains under way and for quiescence")
        stop_traffic.set()
        stop_chains.set()
        poster.join(120)
        for c in chains:
            c.join(args.chain_timeout + 60)
        t = time.monotonic()
        deadline = t + args.settle
        while time.monotonic() < deadline:
            pending = env.db_query("SELECT COUNT(*) AS n FROM inbox WHERE status IN "
                                   "('queued','delivering')")[0]["n"]
            terms = env.terminals()
            if not pending and not any(x["status"] == "processing" or x["lost"] for x in terms):
                break
            time.sleep(1)
        timings["quiescence"] = round(time.monotonic() - t, 1)
        timings["quiet"] = time.monotonic() < deadline
        time.sleep(2)
        summary = analyse(env, poster, outcomes, events, args, audit, timings)
        summary["home"] = str(env.home)
        print(json.dumps(summary, indent=1, default=str))
        print()
        print(markdown(summary))
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    finally:
        log("cleanup by PID")
        env.cleanup()
        if not args.keep:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
