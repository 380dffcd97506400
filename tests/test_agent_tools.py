"""The agent tools added for upstream 2.5.4: run-step handoffs and get_handoff_result,
answer_user_prompt, list_siblings, and model / description / use_worktree, through the
real MCP chain against a real server with demo agents."""
import subprocess

import pytest

from conftest import call_tool, demo_session, kill_pid, wait_for

pytest.importorskip("mcp")


def _session(env, name, profile="code_supervisor"):
    return demo_session(env, name, profile)


def _status(env, tid):
    return env.request("GET", f"/terminals/{tid}")[1].get("status")


def _profile(env, name, front):
    store = env.home / "agent-store"
    store.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{k}: {v}\n" for k, v in front.items())
    (store / f"{name}.md").write_text(f"---\nname: {name}\ndescription: {name}\n{lines}---\nWork.\n")


def test_run_step_answers_and_removes_its_worker(server):
    code, step = server.request("POST", "/terminals/run-step", {
        "agent": "developer", "provider": "demo", "prompt": "build it", "timeout": 30})
    assert code == 200 and step["last_message"] == "done: build it" and step["status"] == "completed"
    assert server.request("GET", f"/terminals/{step['terminal_id']}")[0] == 404
    job = server.request("GET", f"/handoff-results/{step['job_id']}")[1]
    assert job["state"] == "completed" and job["last_message"] == "done: build it"
    code, body = server.request("POST", "/terminals/run-step", {"agent": "developer", "prompt": "x",
                                                                "job_id": step["job_id"]})
    assert code == 409 and "already exists" in body["detail"]
    code, body = server.request("POST", "/terminals/run-step", {"agent": "developer", "prompt": "x",
                                                                "job_id": "short"})
    assert code == 400 and "32 lowercase hex" in body["detail"]
    assert server.request("GET", "/handoff-results/" + "0" * 32)[0] == 404


def test_a_handoff_that_times_out_still_yields_its_answer(cao_env):
    cao_env.env["CAO_DEMO_DELAY"] = "10"  # outlasts the second MCP call on a loaded machine
    cao_env.start_server()
    sup = _session(cao_env, "late")
    _, result = call_tool(cao_env, "handoff", {"agent_profile": "developer", "message": "slow work",
                                               "timeout": 1}, sup)
    assert result["success"] is False and result["pending"] is True, result
    assert "get_handoff_result" in result["message"] and result["job_id"]
    _, early = call_tool(cao_env, "get_handoff_result", {"job_id": result["job_id"]}, sup)
    assert early["success"] and early["state"] == "running"

    def finished():
        _, job = call_tool(cao_env, "get_handoff_result", {"job_id": result["job_id"]}, sup)
        return job if job["state"] != "running" else None
    job = wait_for(finished, 60, 0.5, "the late answer")
    assert job["state"] == "completed" and job["last_message"] == "done: slow work"
    assert _status(cao_env, result["terminal_id"]) == "completed"  # kept: the caller had left


def test_a_handoff_outlives_a_server_crash_and_returns_its_answer(cao_env):
    """cao-server is SIGKILLed while a handoff's worker is busy: the tool call waits
    for the restarted server, which kept the job and followed the worker."""
    import signal
    import threading
    cao_env.env["CAO_DEMO_DELAY"] = "8"
    proc = cao_env.start_server()
    sup = _session(cao_env, "crash")
    outcome = {}
    call = threading.Thread(target=lambda: outcome.update(result=call_tool(
        cao_env, "handoff", {"agent_profile": "developer", "message": "survive it"}, sup)[1]))
    call.start()
    try:
        wait_for(lambda: [t for t in cao_env.request("GET", "/sessions/cao-crash")[1]["terminals"]
                          if t["agent_profile"] == "developer" and t["status"] == "processing"],
                 60, what="the worker busy")
        kill_pid(proc.pid, signal.SIGKILL)
        cao_env.start_server()
    finally:
        call.join(120)
    result = outcome.get("result")
    assert result and result["success"] and result["output"] == "done: survive it", result


def test_answer_user_prompt_answers_a_waiting_worker_only(server):
    sup = _session(server, "ask")
    _, assigned = call_tool(server, "assign", {"agent_profile": "developer",
                                               "message": "/ask delete the build folder?"}, sup)
    worker = assigned["terminal_id"]
    wait_for(lambda: _status(server, worker) == "waiting_user_answer", 20, what="the question")
    _, bad = call_tool(server, "answer_user_prompt", {"terminal_id": worker, "answer": " "}, sup)
    assert bad["success"] is False and "non-empty" in bad["error"]
    _, ok = call_tool(server, "answer_user_prompt", {"terminal_id": worker, "answer": "y"}, sup)
    assert ok["success"], ok
    wait_for(lambda: _status(server, worker) == "completed", 20, what="the answered worker")
    answer = server.request("GET", f"/terminals/{worker}/output?mode=last")[1]["output"]
    assert answer.endswith("[y/n] y\ndone: answered y"), answer
    _, idle = call_tool(server, "answer_user_prompt", {"terminal_id": worker, "answer": "y"}, sup)
    assert idle["success"] is False and "not waiting_user_answer" in idle["error"]


def test_list_siblings_needs_discovery(server):
    _profile(server, "scout", {"allowedTools": '["fs_read", "@cao-mcp-server", "discovery"]'})
    _profile(server, "closed", {"allowedTools": '["fs_read", "@cao-mcp-server"]'})
    sup = _session(server, "sib", profile="scout")
    _, a = call_tool(server, "assign", {"agent_profile": "developer", "message": "a",
                                        "description": "writes the parser"}, sup)
    _, b = call_tool(server, "assign", {"agent_profile": "closed", "message": "b"}, sup)
    _, seen = call_tool(server, "list_siblings", {}, sup)
    assert seen["success"] and {s["id"] for s in seen["siblings"]} == {a["terminal_id"], b["terminal_id"]}
    first = next(s for s in seen["siblings"] if s["id"] == a["terminal_id"])
    assert first["group"] == "cao-sib" and first["metadata"]["description"] == "writes the parser"
    _, near = call_tool(server, "list_siblings", {"depth": 0}, sup)
    assert near["siblings"] == []
    _, refused = call_tool(server, "list_siblings", {}, b["terminal_id"])
    assert refused["success"] is False and "add `discovery`" in refused["error"]


def test_model_and_use_worktree_reach_the_worker(server):
    sup = _session(server, "wt")
    _, outside = call_tool(server, "assign", {"agent_profile": "developer", "message": "x",
                                              "use_worktree": True}, sup)
    assert outside["success"] is False and "needs a git repository" in outside["error"]
    repo = server.workdir
    for args in (["init", "-q"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q",
                                  "--allow-empty", "-m", "start"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True)
    _, assigned = call_tool(server, "assign", {"agent_profile": "developer", "message": "x",
                                               "use_worktree": True, "model": "mock-model-2"}, sup)
    worker = server.request("GET", f"/terminals/{assigned['terminal_id']}")[1]
    assert worker["model"] == "mock-model-2" and worker["worktree"] == worker["working_directory"]
    branch = f"cao/developer-{worker['id']}"
    listed = subprocess.run(["git", "-C", str(repo), "worktree", "list"], capture_output=True,
                            text=True).stdout
    assert worker["worktree"] in listed and branch in listed
    _, bad = call_tool(server, "assign", {"agent_profile": "developer", "message": "x",
                                          "model": "x; rm -rf /"}, sup)
    assert bad["success"] is False and "is not a model id" in bad["error"]
    call_tool(server, "delete_terminal", {"terminal_id": worker["id"]}, sup)
    listed = subprocess.run(["git", "-C", str(repo), "worktree", "list"], capture_output=True,
                            text=True).stdout
    assert worker["worktree"] not in listed
    branches = subprocess.run(["git", "-C", str(repo), "branch"], capture_output=True, text=True).stdout
    assert branch not in branches  # no commits of its own: the branch goes too


def test_an_agent_that_hangs_up_ends_cao_mcp_quietly(cao_env):
    """An agent that exits (or dies with its tmux) closes the pipes under `cao mcp`:
    it ends with status 0 and no traceback in the agent's MCP log."""
    import json
    import os
    from conftest import CAO
    proc = subprocess.Popen(CAO + ["mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**cao_env.env, "CAO_TERMINAL_ID": "0" * 8})
    try:
        def send(message):
            proc.stdin.write((json.dumps({"jsonrpc": "2.0", **message}) + "\n").encode())
            proc.stdin.flush()
        send({"id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "gone-agent", "version": "1"}}})
        assert b'"id":1' in proc.stdout.readline()
        send({"method": "notifications/initialized"})
        proc.stdout.close()  # the agent is gone: the next answer has nowhere to go
        send({"id": 2, "method": "tools/list"})
        proc.stdin.close()
        assert proc.wait(30) == 0
        err = proc.stderr.read().decode()
        assert "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            kill_pid(proc.pid)


def test_a_tool_call_waits_for_a_restarting_server_and_only_when_refused(cao_env, monkeypatch):
    """A tool call that finds cao-server restarting (the connection is refused, so the
    request never left) waits for it instead of failing; the soak saw a handoff fail
    that way in the second a killed server took to come back."""
    import cao
    monkeypatch.setenv("CAO_API_PORT", str(cao_env.port))
    monkeypatch.setenv("CAO_HOME_DIR", str(cao_env.home))
    client = cao.Client()
    with pytest.raises(cao.ServerUnavailable, match="cao-server is not running"):
        client.health()  # a CLI command is not patient: one line at once
    refused = []

    def server_comes_back(seconds):
        if not refused:
            refused.append(seconds)
            cao_env.start_server()
    monkeypatch.setattr(cao.Client, "patience", 60.0)
    monkeypatch.setattr(cao.Client, "_pause", staticmethod(server_comes_back))
    assert client.health()["status"] == "ok"
    assert refused == [0.25]
