"""Memory: memory_store / memory_recall / memory_forget through the real MCP chain, the
<cao-memory> block in each new terminal's first message, the REST routes and `cao memory`."""
import json

import pytest

import cao

from conftest import ask as _ask, call_tool, demo_session as _session

pytest.importorskip("mcp")


def test_a_stored_fact_reaches_the_first_message_of_a_terminal_in_another_session(server):
    first = _session(server, "mem-a")
    answer = _ask(server, first, '/tool memory_store {"content": "Run the tests with make check", '
                                 '"key": "how-to-test", "tags": "testing"}')
    stored = json.loads(answer.removeprefix("done: "))
    assert stored["success"] and stored["key"] == "how-to-test" and stored["action"] == "created"
    assert stored["scope"] == "project" and stored["scope_id"] == str(server.workdir)
    session_only = json.loads(_ask(server, first, '/tool memory_store {"content": "scratch note '
                                                  'for this session", "scope": "session"}')[6:])
    assert session_only["scope_id"] == "cao-mem-a" and session_only["key"] == "scratch-note-for-this-session"

    second = _session(server, "mem-b")
    assert _ask(server, second, "how do I run the tests?") == "done: how do I run the tests?"
    context = server.request("GET", f"/terminals/{second}/memory-context")[1]
    assert context["injected"] and "<cao-memory>" in context["context"]
    assert "[how-to-test] Run the tests with make check" in context["context"]
    assert "scratch note" not in context["context"]  # another session's note stays there
    # The block went to the agent itself, ahead of the message, once.
    screen = server.request("GET", f"/terminals/{second}/output")[1]["output"]
    assert "<cao-memory>" in screen
    _ask(server, second, "second message")
    assert server.request("GET", f"/terminals/{second}/memory-context")[1] == context
    assert server.request("GET", f"/terminals/{first}/memory-context")[1]["injected"] is False


def test_recall_ranks_updates_forgets_and_counts_uses(server):
    tid = _session(server, "mem-r")
    facts = {"db": "The database is PostgreSQL 16 on port 5433",
             "style": "Use black with line length 100",
             "deploy": "Deploy with the deploy.sh script after tests pass"}
    for key, content in facts.items():
        _, result = call_tool(server, "memory_store", {"content": content, "key": key}, tid)
        assert result["success"], result
    _, found = call_tool(server, "memory_recall", {"query": "which database port"}, tid)
    assert found["memories"][0]["key"] == "db" and found["count"] >= 1
    _, found = call_tool(server, "memory_recall", {"query": "database", "search_mode": "substring"}, tid)
    assert [m["key"] for m in found["memories"]] == ["db"]
    _, updated = call_tool(server, "memory_store", {"content": "The database is SQLite now",
                                                    "key": "db"}, tid)
    assert updated["action"] == "updated"
    _, found = call_tool(server, "memory_recall", {"query": "postgresql"}, tid)
    assert found["memories"] == []
    _, newest = call_tool(server, "memory_recall", {"limit": 1}, tid)
    assert [m["key"] for m in newest["memories"]] == ["db"]
    _, used = call_tool(server, "memory_recall", {"sort_by": "usage", "limit": 1}, tid)
    assert used["memories"][0]["key"] == "db" and used["memories"][0]["access_count"] >= 3
    _, gone = call_tool(server, "memory_forget", {"key": "style"}, tid)
    assert gone["success"] and gone["action"] == "deleted"
    _, again = call_tool(server, "memory_forget", {"key": "style"}, tid)
    assert again["success"] is False and "no project memory with key 'style'" in again["error"]


@pytest.mark.parametrize("arguments, error", [
    ({"content": "  "}, "memory content is empty"),
    ({"content": "x", "scope": "everywhere"}, "unknown memory scope 'everywhere'"),
    ({"content": "x", "memory_type": "gossip"}, "unknown memory type 'gossip'"),
    ({"content": "x", "key": "../etc/passwd"}, "is not a slug"),
    ({"content": "x" * (cao.MAX_MEMORY + 1)}, "the limit is"),
])
def test_bad_memory_input_is_a_one_line_error(server, arguments, error):
    tid = _session(server, "mem-bad")
    _, result = call_tool(server, "memory_store", arguments, tid)
    assert result["success"] is False and error in result["error"] and "\n" not in result["error"]


def test_recall_rejects_unknown_modes_and_needs_a_terminal(server):
    tid = _session(server, "mem-modes")
    for arguments, error in (({"search_mode": "vibes"}, "unknown search_mode"),
                             ({"sort_by": "size"}, "unknown sort_by"),
                             ({"limit": 0}, "out of range")):
        _, result = call_tool(server, "memory_recall", arguments, tid)
        assert result["success"] is False and error in result["error"], result
    _, result = call_tool(server, "memory_recall", {})
    assert result["success"] is False and "CAO_TERMINAL_ID is not set" in result["error"]
    code, body = server.request("POST", "/internal/memory/recall", {"terminal_context": {}})
    assert code == 400 and "terminal id" in body["detail"]


def test_rest_routes_and_the_cli_list_show_delete_and_clear(server):
    tid = _session(server, "mem-cli")
    for key in ("alpha", "beta"):
        call_tool(server, "memory_store", {"content": f"{key} fact", "key": key}, tid)
    call_tool(server, "memory_store", {"content": "global fact", "key": "alpha", "scope": "global"}, tid)
    code, listed = server.request("GET", "/memory?scope=project")
    assert code == 200 and sorted(m["key"] for m in listed) == ["alpha", "beta"]
    assert server.request("GET", "/memory?scope=nowhere")[0] == 400
    assert len(server.request("GET", "/memory/alpha")[1]) == 2
    assert server.request("GET", "/memory/missing")[0] == 404
    out = server.run("memory", "list")
    assert out.returncode == 0 and "alpha" in out.stdout and "global fact" in out.stdout
    out = server.run("memory", "show", "beta", "--json")
    assert json.loads(out.stdout)[0]["content"] == "beta fact"
    ambiguous = server.run("memory", "delete", "alpha", "--yes")
    assert ambiguous.returncode != 0 and "2 memories have key 'alpha'" in ambiguous.stderr
    assert server.run("memory", "delete", "alpha", "--scope", "global", "--yes").returncode == 0
    unconfirmed = server.run("memory", "clear", "--scope", "project")
    assert unconfirmed.returncode != 0 and "pass --yes" in unconfirmed.stderr
    out = server.run("memory", "clear", "--scope", "project", "--yes")
    assert out.returncode == 0 and "Deleted 2 memories" in out.stdout
    assert server.request("GET", "/memory")[1] == []
    assert server.request("GET", "/settings/memory")[1] == {"enabled": True, "learning_enabled": False}


def test_memory_off_in_settings_is_said_plainly(cao_env):
    cao_env.home.mkdir(parents=True, exist_ok=True)
    (cao_env.home / "settings.json").write_text(json.dumps({"memory": {"enabled": False}}))
    cao_env.start_server()
    tid = _session(cao_env, "mem-off")
    _, result = call_tool(cao_env, "memory_store", {"content": "x"}, tid)
    assert result["success"] is False and "memory is off" in result["error"]
    assert cao_env.request("GET", "/memory")[0] == 409
    _ask(cao_env, tid, "hello")
    assert cao_env.request("GET", f"/terminals/{tid}/memory-context")[1]["injected"] is False


def _row(store, terminal_id, workdir):
    return {"id": terminal_id, "working_directory": str(workdir), "session_name": "cao-s",
            "agent_profile": "developer", "provider": "demo"}


def test_search_falls_back_to_like_without_fts5(tmp_path, monkeypatch):
    monkeypatch.setenv("CAO_HOME_DIR", str(tmp_path / "home"))
    store = cao.Store(tmp_path / "db.sqlite")
    memory = cao.MemoryStore(store)
    row = _row(store, "abcdef12", tmp_path)
    memory.put(row, "Deploys go through the staging cluster first", key="deploy")
    memory.put(row, "Tests need docker running", key="tests")
    memory.fts = False  # as on a sqlite built without FTS5
    assert [m["key"] for m in memory.recall(row, "staging")] == ["deploy"]
    assert [m["key"] for m in memory.recall(row, "100%_sure")] == []  # LIKE wildcards are literal
    store.close()


def test_project_is_the_git_remote_else_the_path(tmp_path, monkeypatch):
    import subprocess
    monkeypatch.setenv("CAO_HOME_DIR", str(tmp_path / "home"))
    monkeypatch.delenv("CAO_PROJECT_ID", raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "remote", "add", "origin",
                    "git@GitHub.com:acme/widgets.git"], check=True)
    store = cao.Store(tmp_path / "db.sqlite")
    memory = cao.MemoryStore(store)
    assert memory.project_of(str(repo)) == "github.com/acme/widgets"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert memory.project_of(str(plain)) == str(plain.resolve())
    assert cao._git_remote(str(plain)) is None
    monkeypatch.setenv("CAO_PROJECT_ID", "shared-id")
    assert memory.project_of(str(plain)) == "shared-id"
    store.close()
