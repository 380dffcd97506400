"""Soak: 1,000 messages among 10 demo agents while the server is kill -9ed and
restarted 5 times at random moments. Every message must reach its receiver
exactly once, and never while the receiver is busy (the demo agent's audit log
records any input that arrived while it was answering)."""
import http.client
import json
import os
import random
import re
import signal
import threading
import time

import pytest

from conftest import kill_pid, wait_for

pytestmark = pytest.mark.soak
AGENTS, MESSAGES, KILLS = 10, 1000, 5


def _post_until_stored(env, receiver, sender, token, stop):
    body = {"sender_id": sender, "message": f"{token} from {sender}"}
    while not stop.is_set():
        try:
            code, reply = env.request("POST", f"/terminals/{receiver}/inbox/messages", body, timeout=10)
            assert code == 200, reply
            return
        except (OSError, http.client.HTTPException):
            pass
        # The server died mid-request: the row may or may not be stored. Ask the
        # next server (which may die too, so keep asking).
        while True:
            try:
                wait_for(env.healthy, 30, what="server back")
                rows = env.request("GET", f"/terminals/{receiver}/inbox/messages?limit=100")[1]
                break
            except (OSError, http.client.HTTPException):
                continue
        if any(r["message"].startswith(token + " ") for r in rows):
            return


def test_exactly_once_across_kill_9(cao_env, tmp_path):
    audit = tmp_path / "audit.jsonl"
    cao_env.env.update(CAO_DEMO_DELAY="0.02", CAO_DEMO_LOG=str(audit))
    proc = cao_env.start_server()
    code, first = cao_env.request("POST", "/sessions?agent_profile=developer&provider=demo"
                                          "&session_name=soak")
    assert code == 201
    ids = [first["id"]] + [cao_env.request("POST", "/sessions/cao-soak/terminals?agent_profile="
                                                  "reviewer&provider=demo")[1]["id"]
                           for _ in range(AGENTS - 1)]
    rng = random.Random(int(os.environ.get("CAO_SOAK_SEED", "1234")))
    plan = []
    for n in range(MESSAGES):
        receiver, sender = rng.sample(ids, 2)
        plan.append((receiver, sender, f"m{n:04d}"))

    stop = threading.Event()
    posted = []

    def poster():
        for receiver, sender, token in plan:
            _post_until_stored(cao_env, receiver, sender, token, stop)
            posted.append(token)
            time.sleep(rng.uniform(0, 0.01))

    thread = threading.Thread(target=poster)
    thread.start()
    kill_times = sorted(rng.uniform(0.5, 12) for _ in range(KILLS))
    started = time.monotonic()
    for at in kill_times:
        time.sleep(max(0, at - (time.monotonic() - started)))
        kill_pid(proc.pid, signal.SIGKILL)
        proc = cao_env.start_server()
    thread.join(300)
    assert len(posted) == MESSAGES

    def settled():
        for tid in ids:
            for state in ("queued", "delivering"):
                if cao_env.request("GET", f"/terminals/{tid}/inbox/messages?status={state}")[1]:
                    return False
        return True
    wait_for(settled, 300, interval=0.5, what="every message delivered")
    for tid in ids:
        failed = cao_env.request("GET", f"/terminals/{tid}/inbox/messages?status=failed")[1]
        assert failed == []

    wait_for(lambda: len(re.findall(r"m\d{4}", audit.read_text())) >= MESSAGES, 60,
             what="every message in the agents' audit log")
    counts, busy = {}, 0
    for line in audit.read_text().splitlines():
        entry = json.loads(line)
        busy += entry["busy_input"]
        for token in re.findall(r"\b(m\d{4}) from ([0-9a-f]{8})", entry["input"]):
            counts[token[0]] = counts.get(token[0], 0) + 1
            receiver = dict((t, r) for r, _, t in plan)[token[0]]
            assert entry["terminal_id"] == receiver
    duplicates = {t: c for t, c in counts.items() if c != 1}
    missing = [t for _, _, t in plan if t not in counts]
    print(f"\nsoak: {MESSAGES} messages, {AGENTS} agents, {KILLS} kill -9 restarts: "
          f"{len(counts)} delivered, {len(duplicates)} duplicated, {len(missing)} missing, "
          f"{busy} inputs into a busy agent")
    if missing:  # say where a lost message was last seen
        import sqlite3
        db = sqlite3.connect(cao_env.home / "db" / "cao.db")
        for token in missing:
            print(token, db.execute("SELECT id, receiver_id, status, reason, batch_id FROM inbox "
                                    "WHERE message LIKE ?", (token + " %",)).fetchall())
    assert not missing and not duplicates and busy == 0
