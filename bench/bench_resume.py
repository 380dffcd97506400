"""Resume after tmux dies: how long until a fleet of demo agents is back.

    /work/main/.venv/bin/python bench/bench_resume.py [--agents 80] [--per-session 10]
        [--rounds 3] [--json out.json]

One private CaoEnv (tests/conftest.py): own home, tmux socket and port. It starts
`--agents` demo agents, `--per-session` to a session, waits until all are idle, then per
round: SIGKILLs the tmux server's PID, waits until every terminal shows lost, and times
`POST /sessions/resume` (the server answers once every terminal is ready) and, from the
same start, every terminal idle again in `GET /terminals`. Everything is stopped by PID.
Upstream 2.5.4 has no resume after tmux dies, so there is no side-by-side figure.
"""
import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_soak import Env, snapshot_cao  # noqa: E402
from _common import percentile  # noqa: E402


def wait(predicate, limit, what):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def start_fleet(env, agents, per_session):
    for i in range(agents):
        session = f"resume{i // per_session}"
        if i % per_session == 0:
            code, body = env.call("POST", f"/sessions?agent_profile=developer&provider=demo"
                                          f"&session_name={session}", timeout=120)
        else:
            code, body = env.call("POST", f"/sessions/cao-{session}/terminals",
                                  {"agent_profile": "developer", "provider": "demo"}, timeout=120)
        if code != 201:
            raise RuntimeError(f"create agent {i}: {code} {body}")


def one_round(env, agents):
    pid = env.tmux_server_pid()
    env.remember_tmux()
    os.kill(pid, signal.SIGKILL)
    wait(lambda: (lambda t: len(t) == agents and all(x["lost"] for x in t))(env.terminals()),
         60, "every terminal lost")
    t0 = time.monotonic()
    code, body = env.call("POST", "/sessions/resume", timeout=900)
    post = time.monotonic() - t0
    if code != 200:
        raise RuntimeError(f"resume: {code} {body}")
    modes = [x["resumed"] for s in body["sessions"] for x in s["terminals"]]
    if modes.count("conversation") != agents:
        raise RuntimeError(f"not all resumed their conversation: {body}")
    wait(lambda: all(x["status"] == "idle" and not x["lost"] for x in env.terminals()),
         300, "every terminal idle")
    env.tmux_server_pid()
    return {"resume_post_s": round(post, 2), "all_idle_s": round(time.monotonic() - t0, 2),
            "load1": round(os.getloadavg()[0], 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=80)
    ap.add_argument("--per-session", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cao-bench-resume-"))
    env = Env(tmp)
    env.cmd, version = snapshot_cao(tmp)
    result = {"cao": version, "agents": args.agents, "cores": os.cpu_count(), "rounds": []}
    try:
        env.start_server()
        t = time.monotonic()
        start_fleet(env, args.agents, args.per_session)
        wait(lambda: all(x["status"] == "idle" for x in env.terminals()), 300, "fleet idle")
        result["create_s"] = round(time.monotonic() - t, 1)
        for n in range(args.rounds):
            result["rounds"].append(one_round(env, args.agents))
            print(f"round {n + 1}: {result['rounds'][-1]}", file=sys.stderr, flush=True)
        posts = [r["resume_post_s"] for r in result["rounds"]]
        result["resume_post_median_s"] = round(percentile(posts, 50), 2)
        result["per_terminal_ms"] = round(1000 * result["resume_post_median_s"] / args.agents)
    finally:
        env.cleanup()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
