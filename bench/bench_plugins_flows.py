"""Plugin bus under load and flow start-up delay (cao only; real server, tmux, demo agents).

    /work/main/.venv/bin/python bench/bench_plugins_flows.py [--rate 1000] [--seconds 10]
        [--receivers 4] [--flow-samples 5] [--natural] [--json out.json]

Needs the repo's venv (croniter for flows). Everything runs in a private CaoEnv
(tests/conftest.py): own CAO_HOME_DIR, tmux socket and port; cleanup by PID.

1. Plugin bus. Events come from the inbox: the bench POSTs inbox messages (sender
   "bench") round-robin to N demo terminals (CAO_DEMO_DELAY=0). cao delivers each
   receiver's queue in batches of up to 100 when it turns idle/completed and emits
   one `message_sent` row per message, which every plugin gets as post_send_message.
   Two servers get the same load: one without plugins, one with two plugins from
   CAO_HOME_DIR/plugins:
     - sleepy:  @hook("post_send_message"), time.sleep(5) (blocking) per event;
     - counter: @hook("post_send_message"), appends "<time> <message index>" per event.
   Measured: POST rate reached, message_sent rate, counter lag (GET /plugins `behind`
   every 0.5 s; POST -> counter per message; time from the last POST until the counter
   has seen every message), sleepy's backlog, and p50/p95 of GET /health and
   GET /sessions (one kept-alive connection, one request every 10 ms) idle, under load
   without plugins and under load with plugins.
2. Flows. A flow (demo provider, developer, "* * * * *") is added through POST /flows.
   Per sample the bench writes next_run = now + 2 s into the flows table (the server
   keeps running) and wakes the scheduler by enabling a second flow (POST
   /flows/wake/enable, which sets the scheduler's wake event); the scheduler then reads
   the new MIN(next_run) and sleeps until it, as it does for a cron time. Delay =
   `ts` of the flow_run event (written after the session is created) and of the
   session's terminal_created event minus that next_run. --natural also takes one
   sample at a real minute boundary first (waits up to 60 s).
"""
import argparse
import http.client
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import CAO, CaoEnv  # noqa: E402
from _common import percentile  # noqa: E402

SLEEPY = '''
import os, time
from cli_agent_orchestrator.plugins import CaoPlugin, hook


class sleepy(CaoPlugin):
    @hook("post_send_message")
    async def slow(self, event):
        with open(os.environ["BENCH_SLEEPY_LOG"], "a") as f:
            f.write(f"{time.time():.6f} {event.message.split()[0]}\\n")
        time.sleep(5)  # blocking, on purpose
'''

# --probe-loss: a third plugin that is only a little slow (50 ms per event), so within
# the run it gets past the 500-row batch the follower reads at once and shows whether
# events that were pruned from the log (EVENTS_KEPT) under its cursor are skipped.
LAGGER = SLEEPY.replace("class sleepy", "class lagger").replace(
    "BENCH_SLEEPY_LOG", "BENCH_LAGGER_LOG").replace("time.sleep(5)", "time.sleep(0.05)")

COUNTER = '''
import os, time
from cli_agent_orchestrator.plugins import CaoPlugin, hook


class counter(CaoPlugin):
    async def setup(self):
        self.out = open(os.environ["BENCH_COUNTER_LOG"], "a", buffering=1)

    @hook("post_send_message")
    async def count(self, event):
        self.out.write(f"{time.time():.6f} {event.message.split()[0]}\\n")
'''


def log(*args):
    print("[bench]", *args, file=sys.stderr, flush=True)


class Env(CaoEnv):
    """CaoEnv whose server writes to a log file (nobody reads a pipe here)."""

    def start_server(self, cmd=None):
        import subprocess
        self.logfile = self.home.parent / f"server-{len(self.servers)}.log"
        out = open(self.logfile, "ab")
        proc = subprocess.Popen((cmd or CAO) + ["server", "--port", str(self.port)], env=self.env,
                                cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        out.close()
        self.servers.append(proc.pid)
        deadline = time.monotonic() + 20
        while not self.healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.log_tail()}")
            time.sleep(0.02)
        self.proc = proc
        return proc

    def cleanup(self):
        if getattr(self, "cleaned", False):
            return
        self.cleaned = True
        super().cleanup()
        self.servers.clear()
        if getattr(self, "proc", None) is not None:
            try:
                self.proc.wait(timeout=10)  # reap it
            except Exception:
                pass

    def log_tail(self, n=8):
        try:
            return " | ".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def db(self):
        path = next((self.home / "db").glob("*.db"))
        conn = sqlite3.connect(str(path), timeout=5)
        conn.row_factory = sqlite3.Row
        return conn


class Conn:
    """One kept-alive HTTP connection; reconnects after an error."""

    def __init__(self, port):
        self.port, self.c = port, None

    def call(self, method, path, body=None):
        for attempt in (0, 1):
            if self.c is None:
                self.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                data = json.dumps(body).encode() if body is not None else None
                self.c.request(method, path, body=data,
                               headers={"Content-Type": "application/json"} if data else {})
                r = self.c.getresponse()
                raw = r.read()
                return r.status, raw
            except (OSError, http.client.HTTPException):
                self.c.close()
                self.c = None
                if attempt:
                    raise

    def close(self):
        if self.c:
            self.c.close()


def stats_ms(values):
    if not values:
        return "n/a"
    return (f"p50 {percentile(values, 50) * 1e3:.2f} ms, p95 {percentile(values, 95) * 1e3:.2f} ms, "
            f"max {max(values) * 1e3:.1f} ms (n={len(values)})")


def latency_probe(port, stop, out):
    """GET /health and GET /sessions alternately, every 10 ms, over one connection."""
    conn = Conn(port)
    i = 0
    while not stop.is_set():
        path = "/health" if i % 2 == 0 else "/sessions"
        t = time.perf_counter()
        status, _ = conn.call("GET", path)
        out.setdefault(path, []).append(time.perf_counter() - t)
        if status != 200:
            out.setdefault("errors", []).append((path, status))
        i += 1
        stop.wait(0.01)
    conn.close()


def measure_idle(port, seconds):
    stop, out = threading.Event(), {}
    th = threading.Thread(target=latency_probe, args=(port, stop, out))
    th.start()
    time.sleep(seconds)
    stop.set()
    th.join()
    return out


def producer(port, receivers, rate, seconds, first_index, step, t0, result):
    """Open-loop: message k is due at t0 + k/rate; a late one goes at once."""
    conn = Conn(port)
    k, sent, took, errors = first_index, 0, [], 0
    end = t0 + seconds
    while True:
        due = t0 + k / rate
        if due >= end:
            break
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        receiver = receivers[k % len(receivers)]
        body = {"sender_id": "bench", "message": f"b{k} {time.time():.6f}"}
        t = time.perf_counter()
        status, raw = conn.call("POST", f"/terminals/{receiver}/inbox/messages", body)
        took.append(time.perf_counter() - t)
        if status == 200:
            sent += 1
        else:
            errors += 1
            if errors <= 3:
                log(f"POST inbox -> {status}: {raw[:200]!r}")
        k += step
    conn.close()
    result.append({"sent": sent, "errors": errors, "took": took,
                   "last": time.perf_counter()})


def inbox_counts(env):
    with env.db() as db:
        rows = db.execute("SELECT status, COUNT(*) AS n, MAX(delivered_at) AS last FROM inbox"
                          " GROUP BY status").fetchall()
    return {r["status"]: (r["n"], r["last"]) for r in rows}


def plugins_info(port):
    conn = Conn(port)
    try:
        status, raw = conn.call("GET", "/plugins")
        return {p["name"]: p for p in json.loads(raw)["plugins"]} if status == 200 else {}
    finally:
        conn.close()


def read_lines(path):
    try:
        return [l.split() for l in Path(path).read_text().splitlines() if l.strip()]
    except OSError:
        return []


def run_load(env, args, with_plugins):
    """One server, N receivers, idle latency, then the load; returns the figures."""
    tag = "plugins" if with_plugins else "no plugins"
    res = {"with_plugins": with_plugins}
    if with_plugins:
        pdir = env.home / "plugins"
        pdir.mkdir(parents=True, exist_ok=True)
        (pdir / "sleepy.py").write_text(SLEEPY)
        (pdir / "counter.py").write_text(COUNTER)
        if args.probe_loss:
            (pdir / "lagger.py").write_text(LAGGER)
            env.env["BENCH_LAGGER_LOG"] = str(env.home.parent / "lagger.log")
        env.env.update(BENCH_SLEEPY_LOG=str(env.home.parent / "sleepy.log"),
                       BENCH_COUNTER_LOG=str(env.home.parent / "counter.log"))
    env.env["CAO_DEMO_DELAY"] = "0"
    env.start_server()
    port = env.port
    receivers = []
    for i in range(args.receivers):
        status, body = env.request("POST", f"/sessions?agent_profile=developer&provider=demo"
                                           f"&session_name=recv{i}")
        if status != 201:
            raise RuntimeError(f"create receiver: {status} {body}")
        receivers.append(body["id"])
    log(f"[{tag}] {len(receivers)} receivers ready; idle latency {args.idle_seconds:g} s")
    res["idle"] = measure_idle(port, args.idle_seconds)

    # load
    stop, lat = threading.Event(), {}
    probe = threading.Thread(target=latency_probe, args=(port, stop, lat))
    behind_samples = []

    def monitor():
        while not stop.is_set():
            info = plugins_info(port)
            behind_samples.append((time.perf_counter(), {k: (v["behind"], v["delivered"])
                                                        for k, v in info.items()}))
            stop.wait(0.5)

    mon = threading.Thread(target=monitor) if with_plugins else None
    seq0 = json.loads(Conn(port).call("GET", "/events?after=0&wait=0")[1])["next"]
    results = []
    threads = []
    t0 = time.perf_counter() + 0.05
    wall0 = time.time() + 0.05
    for j in range(args.producers):
        threads.append(threading.Thread(target=producer, args=(
            port, receivers, args.rate, args.seconds, j, args.producers, t0, results)))
    probe.start()
    if mon:
        mon.start()
    log(f"[{tag}] load: {args.rate} msg/s for {args.seconds:g} s over {args.producers} connections")
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t_end = max(r["last"] for r in results)
    wall_end = time.time()
    stop.set()
    probe.join()
    sent = sum(r["sent"] for r in results)
    res.update(sent=sent, errors=sum(r["errors"] for r in results),
               post_rate=sent / (t_end - t0), post_took=[x for r in results for x in r["took"]],
               load_latency=lat)
    log(f"[{tag}] sent {sent} in {t_end - t0:.2f} s; draining the inbox")

    # drain: every message delivered (message_sent emitted)
    deadline = time.monotonic() + 120
    while True:
        counts = inbox_counts(env)
        pending = sum(counts.get(s, (0, 0))[0] for s in ("queued", "delivering"))
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    counts = inbox_counts(env)
    delivered, last_delivered = counts.get("delivered", (0, None))
    res.update(delivered=delivered, failed=counts.get("failed", (0, 0))[0], pending=pending,
               drain_s=(last_delivered or wall_end) - wall_end,
               msg_rate=delivered / ((last_delivered or wall_end) - wall0))
    with env.db() as db:
        last_seq = db.execute("SELECT MAX(seq) FROM events").fetchone()[0]
        kinds = dict(db.execute("SELECT kind, COUNT(*) FROM events WHERE seq > ? GROUP BY kind",
                                (seq0,)).fetchall())
    res["event_rows"] = last_seq - seq0
    res["event_kinds_kept"] = kinds

    if with_plugins:
        counter_log = env.env["BENCH_COUNTER_LOG"]
        deadline = time.monotonic() + 60
        while len(read_lines(counter_log)) < delivered and time.monotonic() < deadline:
            time.sleep(0.05)
        seen = read_lines(counter_log)
        res["counter_seen"] = len(seen)
        if seen:
            res["counter_all_after_last_post_s"] = float(seen[-1][0]) - wall_end
        # POST -> counter, per message (the message carries its POST time)
        sent_at = {}
        with env.db() as db:
            for row in db.execute("SELECT message, delivered_at FROM inbox"):
                idx, t = row["message"].split()
                sent_at[idx] = (float(t), row["delivered_at"])
            emitted = {}
            for row in db.execute("SELECT ts, data FROM events WHERE kind = 'message_sent'"):
                emitted[json.loads(row["data"])["message"].split()[0]] = row["ts"]
        res["post_to_counter"] = [float(t) - sent_at[i][0] for t, i in seen if i in sent_at]
        res["emit_to_counter"] = [float(t) - emitted[i] for t, i in seen if i in emitted]
        res["post_to_emit"] = [emitted[i] - sent_at[i][0] for i in emitted if i in sent_at]
        # sleepy: keep watching its backlog, then see which messages it got
        log("[plugins] watching sleepy for another 12 s")
        t_watch = time.perf_counter() + 12
        while time.perf_counter() < t_watch:
            behind_samples.append((time.perf_counter(), {
                k: (v["behind"], v["delivered"]) for k, v in plugins_info(port).items()}))
            time.sleep(0.5)
        res["behind"] = [(round(t - t0, 2), s) for t, s in behind_samples]
        res["plugins_final"] = plugins_info(port)
        order = {idx: n for n, (_t, idx) in enumerate(seen)}
        got = read_lines(env.env["BENCH_SLEEPY_LOG"])
        res["sleepy_got"] = [(round(float(t) - wall0, 2), idx, order.get(idx)) for t, idx in got]
        if args.probe_loss:
            lag = [order.get(idx) for _t, idx in read_lines(env.env["BENCH_LAGGER_LOG"])]
            jumps = [(k, pos) for k, pos in enumerate(lag) if pos is not None and pos != k]
            res["lagger"] = {"got": len(lag), "first_jump": jumps[0] if jumps else None,
                             "missed": (lag[-1] + 1 - len(lag)) if lag and lag[-1] is not None
                             else None}
        if mon:
            mon.join()
    env.cleanup()
    return res


def print_load(a, b, args):
    out = []
    p = out.append
    p(f"plugin bus: inbox messages POSTed round-robin to {args.receivers} demo terminals, target "
      f"{args.rate}/s for {args.seconds:g} s over {args.producers} kept-alive connections")
    for r in (a, b):
        tag = "with sleepy+counter" if r["with_plugins"] else "no plugins         "
        p(f"  {tag}: POSTed {r['sent']} ({r['post_rate']:.0f}/s, {r['errors']} errors); "
          f"message_sent (post_send_message) {r['delivered']} = {r['msg_rate']:.0f}/s, last "
          f"{r['drain_s']:+.2f} s after the last POST; event rows {r['event_rows']}")
        p(f"      POST inbox: {stats_ms(r['post_took'])}")
    p("  request latency (GET every 10 ms on one kept-alive connection):")
    for label, lat in (("idle, no plugins", a["idle"]), ("idle, plugins loaded", b["idle"]),
                       ("load, no plugins", a["load_latency"]),
                       ("load, sleepy+counter", b["load_latency"])):
        for path in ("/health", "/sessions"):
            p(f"    {label:22s} {path:9s} {stats_ms(lat.get(path, []))}")
        if lat.get("errors"):
            p(f"    {label}: non-200: {lat['errors'][:5]}")
    p(f"  counter: saw {b.get('counter_seen')} of {b['delivered']} messages; the last one "
      f"{b.get('counter_all_after_last_post_s', float('nan')):+.2f} s after the last POST")
    p(f"    POST -> counter:        {stats_ms(b.get('post_to_counter', []))}")
    p(f"    POST -> message_sent:   {stats_ms(b.get('post_to_emit', []))} (rows still in the log)")
    p(f"    message_sent -> counter:{stats_ms(b.get('emit_to_counter', []))} (rows still in the log)")
    beh = b.get("behind", [])
    if beh:
        worst = max(s.get("counter", (0, 0))[0] for _t, s in beh)
        p(f"    GET /plugins behind (counter): max {worst} over {len(beh)} samples every 0.5 s")
        pick = [x for n, x in enumerate(beh) if n % 4 == 0] + [beh[-1]]
        p("  sleepy backlog (t since load start: behind, delivered):")
        p("    " + "; ".join(f"{t:.1f}s {s.get('sleepy', ('?', '?'))[0]}/{s.get('sleepy', ('?', '?'))[1]}"
                            for t, s in pick))
    got = b.get("sleepy_got", [])
    p(f"  sleepy got {len(got)} events (t, message, its place in the counter's order): {got}")
    skipped = [(k, pos) for k, (_t, _i, pos) in enumerate(got) if pos is not None and pos != k]
    if skipped:
        k, pos = skipped[0]
        p(f"  !! sleepy's event #{k} was message_sent #{pos} of the log: {pos - k} events in "
          f"between were never handed to it (pruned from the event log, EVENTS_KEPT)")
    lg = b.get("lagger")
    if lg:
        p(f"  lagger (50 ms per event, --probe-loss): got {lg['got']} events; first out of order: "
          f"{lg['first_jump']} (its n-th event was message_sent #m); messages skipped up to its "
          f"last one: {lg['missed']}")
    fin = b.get("plugins_final", {})
    for name in ("sleepy", "counter", "lagger"):
        if name in fin:
            v = fin[name]
            p(f"  /plugins {name}: delivered {v['delivered']} failed {v['failed']} "
              f"timed_out {v['timed_out']} behind {v['behind']}")
    return "\n".join(out)


# -- flows -----------------------------------------------------------------------

def flow_events(env, after):
    evs = []
    while True:
        status, body = env.request("GET", f"/events?after={after}")
        evs += body["events"]
        if not body["events"]:
            return evs
        after = body["next"]


def wait_flow_run(env, after, name, deadline_s):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        evs = flow_events(env, after)
        run = next((e for e in evs if e["kind"] == "flow_run" and e["data"].get("flow") == name), None)
        if run:
            created = next((e for e in evs if e["kind"] == "terminal_created"
                            and e["session_name"] == f"cao-flow-{name}"), None)
            return run, created
        time.sleep(0.05)
    raise RuntimeError(f"no flow_run for {name} within {deadline_s} s")


def run_flows(env, args):
    env.env["CAO_DEMO_DELAY"] = "0.3"
    env.start_server()
    flow = {"name": "tick", "schedule": "* * * * *", "agent_profile": "developer",
            "provider": "demo", "prompt_template": "Flow tick."}
    status, body = env.request("POST", "/flows", flow)
    if status != 201:
        raise RuntimeError(f"POST /flows: {status} {body}")
    status, body = env.request("POST", "/flows", {**flow, "name": "wake", "schedule": "0 0 1 1 *"})
    if status != 201:
        raise RuntimeError(f"POST /flows wake: {status} {body}")
    samples = []

    def next_run():
        with env.db() as db:
            return db.execute("SELECT next_run FROM flows WHERE name = 'tick'").fetchone()[0]

    def record(kind, due, after):
        run, created = wait_flow_run(env, after, "tick", 90)
        s = {"kind": kind, "due": due, "flow_run": run["ts"] - due, "result": run["data"]["result"],
             "terminal_created": created["ts"] - due if created else None}
        samples.append(s)
        log(f"[flows] {kind}: flow_run {s['flow_run'] * 1e3:.0f} ms after due, terminal_created "
            f"{(s['terminal_created'] or float('nan')) * 1e3:.0f} ms, result {s['result']}")

    if args.natural:
        due = next_run()
        after = json.loads(Conn(env.port).call("GET", "/events")[1])["next"]
        log(f"[flows] natural sample: waiting {due - time.time():.0f} s for the minute boundary")
        record("cron minute", due, after)
        time.sleep(1.0)
    for i in range(args.flow_samples):
        # after a run the flow's session is busy for CAO_DEMO_DELAY; keep clear of it
        time.sleep(1.0)
        after = json.loads(Conn(env.port).call("GET", "/events")[1])["next"]
        due = time.time() + 2.0
        with env.db() as db:
            db.execute("UPDATE flows SET next_run = ? WHERE name = 'tick'", (due,))
        status, body = env.request("POST", "/flows/wake/enable")
        if status != 200:
            raise RuntimeError(f"wake: {status} {body}")
        record("edited next_run", due, after)
    env.cleanup()
    return samples


def print_flows(samples):
    out = ["flows: a due flow -> its session starts (delay after next_run)"]
    for s in samples:
        out.append(f"  {s['kind']:16s} flow_run {s['flow_run'] * 1e3:7.1f} ms   terminal_created "
                   f"{(s['terminal_created'] or float('nan')) * 1e3:7.1f} ms   {s['result']}")
    for key in ("terminal_created", "flow_run"):
        xs = [s[key] for s in samples if s[key] is not None]
        if xs:
            out.append(f"  {key}: p50 {percentile(xs, 50) * 1e3:.0f} ms, max {max(xs) * 1e3:.0f} ms "
                       f"over {len(xs)} (target: session within 1 s)")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--receivers", type=int, default=4)
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--idle-seconds", type=float, default=3)
    ap.add_argument("--flow-samples", type=int, default=5)
    ap.add_argument("--natural", action="store_true")
    ap.add_argument("--probe-loss", action="store_true",
                    help="add a 50 ms/event plugin to show events pruned under a slow cursor")
    ap.add_argument("--skip-bus", action="store_true")
    ap.add_argument("--skip-flows", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    raw, report = {}, []
    with tempfile.TemporaryDirectory(prefix="cao-bench-pf-") as tmp:
        envs = []
        try:
            if not args.skip_bus:
                for name, plugged in (("a", False), ("b", True)):
                    d = Path(tmp) / name
                    d.mkdir()
                    env = Env(d)
                    envs.append(env)
                    raw[name] = run_load(env, args, plugged)
                report.append(print_load(raw["a"], raw["b"], args))
            if not args.skip_flows:
                d = Path(tmp) / "flows"
                d.mkdir()
                env = Env(d)
                envs.append(env)
                raw["flows"] = run_flows(env, args)
                report.append(print_flows(raw["flows"]))
        finally:
            for env in envs:
                env.cleanup()
    print("\n\n".join(report))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
