"""Status-detection figures for cao: how long after an agent's screen changes does
`GET /events` report the new status, and what do 50 idle terminals cost the server.

    python3 bench/bench_status.py [--quick]

Method: a provider defined in settings.json runs bench/_bench_agent.py, which
records the wall time at which it printed each answer. The latency of one turn
is (ts of the `status: completed` event) - (that print time). Idle cost is the
CPU time (utime+stime) of the server plus its pipe-pane `cat` helpers over a
quiet window, as % of one core. Targets: p50 <= 50 ms, p99 <= 150 ms, <= 1 %.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import http.client  # noqa: E402

from _common import Sandbox, free_port, percentile, wait_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK
    except OSError:
        return 0.0


def helper_pids(fifo_dir):
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:  # the helpers are `cat >> <fifo>`: find them by their open fifo
                targets = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
            except OSError:
                continue
            if any(t.startswith(str(fifo_dir)) for t in targets):
                pids.append(int(proc.name))
    return pids


def client(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(method, path, body=None):
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"} if body is not None else {})
        resp = conn.getresponse()
        data = json.loads(resp.read() or b"null")
        if resp.status >= 400:
            raise RuntimeError(f"{method} {path}: {resp.status} {data}")
        return data
    return call


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    turns, idle_terms, idle_window = (40, 20, 5) if args.quick else (200, 50, 20)
    with Sandbox("status") as box:
        marks = box.root / "marks.txt"
        home = box.cao_home
        (home / "settings.json").write_text(json.dumps({"providers": {"bench": {
            "command": [sys.executable, str(ROOT / "bench/_bench_agent.py")],
            "status": [["processing", r"working\.\.\.\Z"], ["completed", r"^done: .*\n>( .*)?\Z"],
                       ["idle", r"^>( .*)?\Z"]],
            "answer": {"start": r"^> \S", "end": r"^>( .*)?$"}}}}))
        port = free_port()
        env = box.env(BENCH_MARKS=str(marks), BENCH_DELAY="0.2", CAO_API_PORT=str(port))
        proc = box.spawn([sys.executable, str(ROOT / "cao.py"), "server", "--port", str(port)], env=env)
        wait_healthy(port, proc)
        server = proc.pid
        api = client(port)
        (box.root / "work").mkdir()

        term = api("POST", f"/sessions?agent_profile=developer&provider=bench&session_name=lat"
                           f"&working_directory={box.root / 'work'}")
        latencies = []
        for i in range(turns):
            cursor = api("GET", "/events")["next"]
            api("POST", f"/terminals/{term['id']}/input", {"message": f"turn {i}"})
            done_ts = None
            while done_ts is None:
                page = api("GET", f"/events?after={cursor}&wait=10")
                cursor = page["next"]
                for ev in page["events"]:
                    if ev["kind"] == "status" and ev["data"]["status"] == "completed":
                        done_ts = ev["ts"]
            printed = float(marks.read_text().split()[-1])
            latencies.append((done_ts - printed) * 1000)

        for i in range(idle_terms - 1):
            api("POST", "/sessions/cao-lat/terminals?agent_profile=reviewer&provider=bench")
        time.sleep(2)  # let start-up output settle before the quiet window
        cats = helper_pids(home / "fifos")
        before = cpu_seconds(server) + sum(cpu_seconds(p) for p in cats)
        t0 = time.monotonic()
        time.sleep(idle_window)
        elapsed = time.monotonic() - t0
        after = cpu_seconds(server) + sum(cpu_seconds(p) for p in cats)
        idle_pct = 100 * (after - before) / elapsed

    print(f"cao status detection ({turns} turns, agent prints then cao reports)")
    print(f"  printed -> status completed event: p50 {percentile(latencies, 50):.1f} ms, "
          f"p99 {percentile(latencies, 99):.1f} ms, max {max(latencies):.1f} ms "
          f"(targets p50 <= 50, p99 <= 150)")
    print(f"  {idle_terms} idle terminals over {idle_window} s: server + {len(cats)} pipe helpers "
          f"used {idle_pct:.2f} % of one core (target <= 1 %)")


if __name__ == "__main__":
    main()
