"""The inbox: durable, delivered only to an idle receiver, batched per sender, exactly once."""
import signal

from conftest import kill_pid, wait_for


def _terminal(env, session, profile="developer", new=False):
    if new:
        code, term = env.request("POST", f"/sessions?agent_profile={profile}&provider=demo"
                                         f"&session_name={session}")
    else:
        code, term = env.request("POST", f"/sessions/cao-{session}/terminals?agent_profile={profile}"
                                         "&provider=demo")
    assert code == 201, term
    return term


def _messages(env, tid, status=None):
    query = f"?limit=100&status={status}" if status else "?limit=100"
    code, rows = env.request("GET", f"/terminals/{tid}/inbox/messages{query}")
    assert code == 200
    return rows


def _screen_answers(env, tid):
    screen = env.request("GET", f"/terminals/{tid}/output")[1]["output"]
    return [line for line in screen.splitlines() if line.startswith("done: ")]


def test_message_to_idle_receiver_is_delivered_once(server):
    a = _terminal(server, "ib", new=True)
    b = _terminal(server, "ib", "reviewer")
    code, sent = server.request("POST", f"/terminals/{b['id']}/inbox/messages",
                                {"sender_id": a["id"], "message": "hello b"})
    assert code == 200 and sent["success"] and sent["receiver_id"] == b["id"]
    wait_for(lambda: [m["status"] for m in _messages(server, b["id"])] == ["delivered"],
             what="delivery")
    wait_for(lambda: _screen_answers(server, b["id"]) == ["done: hello b"], what="answer on screen")


def test_busy_receiver_waits_and_consecutive_messages_share_one_paste(cao_env):
    cao_env.env["CAO_DEMO_DELAY"] = "1.5"
    cao_env.start_server()
    a = _terminal(cao_env, "busy", new=True)
    b = _terminal(cao_env, "busy", "reviewer")
    assert cao_env.request("POST", f"/terminals/{b['id']}/input", {"message": "long job"})[0] == 200
    for text in ("first note", "second note"):
        code, _ = cao_env.request("POST", f"/terminals/{b['id']}/inbox/messages",
                                  {"sender_id": a["id"], "message": text})
        assert code == 200
    assert cao_env.request("GET", f"/terminals/{b['id']}")[1]["status"] == "processing"
    assert [m["status"] for m in _messages(cao_env, b["id"])] == ["queued", "queued"]
    wait_for(lambda: {m["status"] for m in _messages(cao_env, b["id"])} == {"delivered"},
             timeout=15, what="delivery after the job")
    wait_for(lambda: _screen_answers(cao_env, b["id"]) == ["done: long job", "done: first note"],
             timeout=15, what="one answer for the batch")
    screen = cao_env.request("GET", f"/terminals/{b['id']}/output")[1]["output"]
    assert "first note\u21b5second note" in screen  # one paste


def test_bad_messages_change_nothing(server):
    a = _terminal(server, "bad", new=True)
    cases = [
        ({"sender_id": a["id"], "message": "hi"}, "abcdef12", 404, "not found"),
        ({"sender_id": a["id"], "message": "hi"}, a["id"], 400, "cannot send a message to itself"),
        ({"sender_id": a["id"], "message": " "}, a["id"], 400, "message is empty"),
        ({"message": "hi"}, a["id"], 400, "missing required parameter 'sender_id'"),
    ]
    for body, receiver, status, text in cases:
        code, payload = server.request("POST", f"/terminals/{receiver}/inbox/messages", body)
        assert code == status and text in payload["detail"], payload
    assert _messages(server, a["id"]) == []
    code, payload = server.request("GET", f"/terminals/{a['id']}/inbox/messages?status=lost")
    assert code == 400 and "unknown message status" in payload["detail"]


def test_queued_messages_survive_kill_9(cao_env):
    cao_env.env["CAO_DEMO_DELAY"] = "2"
    proc = cao_env.start_server()
    a = _terminal(cao_env, "crash", new=True)
    b = _terminal(cao_env, "crash", "reviewer")
    cao_env.request("POST", f"/terminals/{b['id']}/input", {"message": "busy"})
    cao_env.request("POST", f"/terminals/{b['id']}/inbox/messages",
                    {"sender_id": a["id"], "message": "kept across a crash"})
    kill_pid(proc.pid, signal.SIGKILL)
    cao_env.start_server()
    wait_for(lambda: [m["status"] for m in _messages(cao_env, b["id"])] == ["delivered"],
             timeout=20, what="delivery after restart")
    wait_for(lambda: _screen_answers(cao_env, b["id"]) == ["done: busy", "done: kept across a crash"],
             timeout=10, what="exactly one delivery")


def test_eager_delivery_only_for_marked_providers_when_turned_on(cao_env):
    import json
    import cao
    eager = dict(cao.PROVIDERS["demo"], eager_input=True)
    cao_env.home.mkdir(parents=True, exist_ok=True)
    (cao_env.home / "settings.json").write_text(json.dumps({"providers": {"eager": eager}}))
    cao_env.env.update(CAO_DEMO_DELAY="3", CAO_EAGER_INBOX_DELIVERY="true")
    cao_env.start_server()
    a = _terminal(cao_env, "eager", new=True)
    code, b = cao_env.request("POST", "/sessions/cao-eager/terminals?agent_profile=reviewer&provider=eager")
    code, c = cao_env.request("POST", "/sessions/cao-eager/terminals?agent_profile=reviewer&provider=demo")
    for term in (b, c):
        cao_env.request("POST", f"/terminals/{term['id']}/input", {"message": "long job"})
        cao_env.request("POST", f"/terminals/{term['id']}/inbox/messages",
                        {"sender_id": a["id"], "message": "while busy"})
    wait_for(lambda: [m["status"] for m in _messages(cao_env, b["id"])] == ["delivered"],
             what="eager delivery to the marked provider")
    assert cao_env.request("GET", f"/terminals/{b['id']}")[1]["status"] == "processing"
    assert [m["status"] for m in _messages(cao_env, c["id"])] == ["queued"]  # demo is not marked


def test_cli_shows_delivery_receipts(server):
    a = _terminal(server, "cli", new=True)
    b = _terminal(server, "cli", "reviewer")
    server.request("POST", f"/terminals/{a['id']}/inbox/messages",
                   {"sender_id": b["id"], "message": "status report"})
    wait_for(lambda: "delivered" in server.run("session", "inbox", "cao-cli").stdout,
             what="receipt in the CLI")
    out = server.run("session", "inbox", "cao-cli").stdout
    assert b["id"] in out and "status report" in out
    rows = __import__("json").loads(server.run("session", "inbox", "cli", "--json").stdout)
    assert [(r["sender_id"], r["status"]) for r in rows] == [(b["id"], "delivered")]
    bad = server.run("session", "inbox", "cao-cli", "--status", "lost")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_messages_to_a_dead_or_removed_receiver_fail_visibly(cao_env):
    cao_env.env["CAO_DEMO_DELAY"] = "3"
    cao_env.start_server()
    a = _terminal(cao_env, "dead", new=True)
    b = _terminal(cao_env, "dead", "reviewer")
    c = _terminal(cao_env, "dead", "reviewer")
    for receiver in (b, c):
        cao_env.request("POST", f"/terminals/{receiver['id']}/input", {"message": "busy"})
        cao_env.request("POST", f"/terminals/{receiver['id']}/inbox/messages",
                        {"sender_id": a["id"], "message": "will not arrive"})
    cao_env.request("POST", f"/terminals/{b['id']}/key?key=C-c")  # the demo agent exits
    wait_for(lambda: [(m["status"], m["reason"]) for m in _messages(cao_env, b["id"])] ==
             [("failed", f"receiver {b['id']}'s agent has exited")], what="failed receipt")
    code, body = cao_env.request("POST", f"/terminals/{b['id']}/inbox/messages",
                                 {"sender_id": a["id"], "message": "too late"})
    assert code == 409 and "has exited" in body["detail"]
    cao_env.request("DELETE", f"/terminals/{c['id']}")
    import sqlite3
    db = sqlite3.connect(cao_env.home / "db" / "cao.db")
    rows = db.execute("SELECT status, reason FROM inbox WHERE receiver_id = ?", (c["id"],)).fetchall()
    assert rows == [("failed", f"receiver {c['id']} was removed (deleted)")]
