"""sqlite state: schema migrations, WAL, and a kill -9 of the server losing nothing."""
import signal
import sqlite3

import cao
from conftest import kill_pid, wait_for


def test_schema_is_migrated_once_and_uses_wal(tmp_path):
    store = cao.Store(tmp_path / "cao.db")
    assert store.one("PRAGMA user_version")["user_version"] == len(cao.MIGRATIONS)
    assert store.one("PRAGMA journal_mode")["journal_mode"] == "wal"
    seq = store.emit("status", "cao-x", "abcdef12", status="idle")
    store.close()
    again = cao.Store(tmp_path / "cao.db")  # reopening runs no migration twice
    assert again.events_after(seq - 1)[0]["data"] == {"status": "idle"}
    again.close()


def test_newer_schema_is_refused(tmp_path):
    db = sqlite3.connect(tmp_path / "cao.db")
    db.execute(f"PRAGMA user_version={len(cao.MIGRATIONS) + 1}")
    db.close()
    try:
        cao.Store(tmp_path / "cao.db")
    except cao.ConfigError as e:
        assert "newer cao" in str(e)
    else:
        raise AssertionError("a newer schema must be refused")


def test_events_wait_wakes_on_emit(tmp_path):
    import threading
    store = cao.Store(tmp_path / "cao.db")
    start = store.last_event_seq()
    threading.Timer(0.05, lambda: store.emit("ping")).start()
    events = store.events_after(start, wait=10)
    assert [e["kind"] for e in events] == ["ping"]
    store.close()


def test_kill_9_of_the_server_loses_nothing(cao_env):
    proc = cao_env.start_server()
    code, term = cao_env.request("POST", "/sessions?agent_profile=developer&provider=demo"
                                         "&session_name=durable")
    assert code == 201
    assert cao_env.request("POST", f"/terminals/{term['id']}/input", {"message": "before"})[0] == 200
    wait_for(lambda: cao_env.request("GET", f"/terminals/{term['id']}")[1]["status"] == "completed",
             what="first answer")
    kill_pid(proc.pid, signal.SIGKILL)

    cao_env.start_server()
    code, info = cao_env.request("GET", "/sessions/cao-durable")
    assert code == 200
    assert [t["id"] for t in info["terminals"]] == [term["id"]]
    wait_for(lambda: cao_env.request("GET", f"/terminals/{term['id']}")[1]["status"] == "completed",
             what="status re-read from the screen after restart")
    # The restarted server re-attached its status stream: a new turn is seen.
    assert cao_env.request("POST", f"/terminals/{term['id']}/input", {"message": "after"})[0] == 200
    wait_for(lambda: cao_env.request("GET", f"/terminals/{term['id']}/output?mode=last")[1]
             == {"output": "done: after", "mode": "last"}, what="answer after restart")
    wait_for(lambda: cao_env.request("GET", f"/terminals/{term['id']}")[1]["status"] == "completed",
             what="completed after restart")


def test_restart_forgets_windows_closed_while_down(cao_env):
    proc = cao_env.start_server()
    code, term = cao_env.request("POST", "/sessions?agent_profile=developer&provider=demo"
                                         "&session_name=gone")
    assert code == 201
    code, other = cao_env.request("POST", "/sessions/cao-gone/terminals?agent_profile=reviewer"
                                          "&provider=demo")
    assert code == 201
    kill_pid(proc.pid, signal.SIGKILL)
    cao_env.tmux("kill-window", "-t", f"=cao-gone:{other['name']}")
    cao_env.start_server()
    assert cao_env.request("GET", f"/terminals/{other['id']}")[0] == 404
    assert [t["id"] for t in cao_env.request("GET", "/sessions/cao-gone")[1]["terminals"]] \
        == [term["id"]]  # a whole session gone is lost and resumed instead (test_resume.py)


def test_closing_a_window_by_hand_removes_the_terminal(server):
    code, term = server.request("POST", "/sessions?agent_profile=developer&provider=demo"
                                        "&session_name=manual")
    code, other = server.request("POST", "/sessions/cao-manual/terminals?agent_profile=reviewer"
                                         "&provider=demo")
    server.tmux("kill-window", "-t", f"=cao-manual:{other['name']}")
    wait_for(lambda: server.request("GET", f"/terminals/{other['id']}")[0] == 404,
             what="terminal removed after its window was closed")
    assert [s["name"] for s in server.request("GET", "/sessions")[1]] == ["cao-manual"]
