"""Upstream cli-agent-orchestrator 2.5.4's own clients against cao's server: a user who
switches keeps the MCP server their agents run. .ci/install-upstream puts 2.5.4 in
$CAO_UPSTREAM_VENV (default ~/.cache/cao-upstream-2.5.4)."""
import asyncio
import json
import os
from pathlib import Path

import pytest

from conftest import wait_for

pytest.importorskip("mcp")
VENV = Path(os.environ.get("CAO_UPSTREAM_VENV", Path.home() / ".cache" / "cao-upstream-2.5.4"))
UPSTREAM_MCP = VENV / "bin" / "cao-mcp-server"
pytestmark = pytest.mark.skipif(not UPSTREAM_MCP.exists(),
                                reason=f"upstream 2.5.4 is not in {VENV} (.ci/install-upstream)")


def _upstream_tools(env, terminal_id, calls):
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    async def run():
        params = StdioServerParameters(command=str(UPSTREAM_MCP), args=[], env={
            **env.env, "CAO_TERMINAL_ID": terminal_id, "CAO_API_HOST": "127.0.0.1"})
        results = []
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                for name, arguments in calls:
                    result = await session.call_tool(name, arguments)
                    text = "".join(getattr(p, "text", "") for p in result.content)
                    try:
                        results.append(json.loads(text))
                    except ValueError:
                        results.append(text)
        return results
    return asyncio.run(run())


def test_upstream_agent_mcp_server_hands_off_assigns_messages_and_loads_skills(server):
    code, sup = server.request("POST", "/sessions?agent_profile=code_supervisor&provider=demo"
                                       "&session_name=upstream")
    assert code == 201, sup
    handoff, assign, skill = _upstream_tools(server, sup["id"], [
        ("handoff", {"agent_profile": "developer", "message": "hello from upstream", "timeout": 60}),
        ("assign", {"agent_profile": "developer", "message": "background job"}),
        ("load_skill", {"name": "cao-worker-protocols"}),
    ])
    assert handoff["success"] and handoff["output"] == "done: hello from upstream", handoff
    assert server.request("GET", f"/terminals/{handoff['terminal_id']}")[0] == 404
    assert assign["success"], assign
    worker = assign["terminal_id"]
    assert server.request("GET", f"/terminals/{worker}")[1]["caller_id"] == sup["id"]
    assert skill.startswith("# Working for a supervisor in cao")
    wait_for(lambda: server.request("GET", f"/terminals/{worker}")[1]["status"] == "completed", 30,
             what="the assigned worker")
    sent, = _upstream_tools(server, worker, [("send_message", {"message": "result: 42"})])
    assert sent["success"], sent
    wait_for(lambda: any(m["status"] == "delivered" and m["message"].startswith("result: 42")
                         for m in server.request("GET", f"/terminals/{sup['id']}/inbox/messages")[1]),
             30, what="the worker's report in the supervisor's inbox")


UPSTREAM_CAO = VENV / "bin" / "cao"


def _pane_env(env, session, name):
    """A variable as the agent process of a session's first pane sees it."""
    for line in env.tmux("list-panes", "-a", "-F", "#{pane_pid} #{session_name}").stdout.splitlines():
        pid, pane_session = line.split()
        if pane_session == session:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            return next((v.split(b"=", 1)[1].decode() for v in environ
                         if v.startswith(name.encode() + b"=")), None)
    return None


def test_upstream_cli_launches_sends_installs_and_shuts_down(server, tmp_path):
    home = tmp_path / "upstream-home"  # upstream writes agent files under HOME
    home.mkdir()
    env = {**server.env, "CAO_API_HOST": "127.0.0.1", "HOME": str(home)}

    def upstream(*args):
        import subprocess
        done = subprocess.run([str(UPSTREAM_CAO), *args], env=env, cwd=server.workdir,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (args, done.stdout[-800:], done.stderr[-800:])
        return done.stdout
    assert "done: hello there" in upstream("launch", "--agents", "developer", "--headless",
                                           "--auto-approve", "--session-name", "u1", "hello there")
    # Upstream's --resume-session-id: a new session continues u1's conversation.
    u1 = server.request("GET", "/sessions/cao-u1")[1]["terminals"][0]["conversation_id"]
    assert "history (1): hello there" in upstream(
        "launch", "--agents", "developer", "--headless", "--auto-approve", "--session-name", "u1b",
        "--resume-session-id", u1, "/history")
    upstream("launch", "--agents", "developer", "--headless", "--auto-approve", "--session-name",
             "u2", "--async", "background task")
    upstream("launch", "--agents", "developer", "--headless", "--auto-approve", "--session-name",
             "u3", "--env", "TEAM_COLOR=blue")
    assert _pane_env(server, "cao-u3", "TEAM_COLOR") == "blue"
    # A worker started later in that session gets the variable too.
    code, worker = server.request("POST", "/sessions/cao-u3/terminals",
                                  {"agent_profile": "developer", "provider": "demo"})
    assert code == 201, worker
    pids = server.tmux("list-panes", "-s", "-t", "=cao-u3", "-F", "#{pane_pid}").stdout.split()
    assert all(b"TEAM_COLOR=blue" in Path(f"/proc/{p}/environ").read_bytes() for p in pids)
    assert len(pids) == 2
    listed = upstream("session", "list")
    assert all(s in listed for s in ("cao-u1", "cao-u2", "cao-u3"))
    assert "done: hello there" in upstream("session", "status", "u1")
    assert "done: again" in upstream("session", "send", "u1", "again")
    assert "installed" in upstream("install", "developer")
    assert "cao-worker-protocols" in upstream("skills", "list")
    upstream("shutdown", "--all")
    assert server.request("GET", "/sessions")[1] == []


def test_upstream_ops_mcp_server_runs_every_tool(server):
    from test_ops_mcp import OPS_TOOLS, ops_calls
    command = [str(VENV / "bin" / "cao-ops-mcp-server")]
    server.env.update(CAO_API_HOST="127.0.0.1")
    names, (launched,) = ops_calls(server, [("launch_session", {
        "agent_profile": "developer", "session_name": "upops", "initial_message": "first"})],
        command=command)
    assert OPS_TOOLS <= names
    assert launched["success"], launched
    tid = launched["terminal_id"]
    wait_for(lambda: server.request("GET", f"/terminals/{tid}")[1]["status"] == "completed", 30,
             what="the first answer")
    _, results = ops_calls(server, [
        ("list_profiles", {}), ("get_profile_details", {"name": "developer"}),
        ("install_profile", {"source": "reviewer"}), ("list_sessions", {}),
        ("get_session_info", {"session_name": "cao-upops"}),
        ("get_terminal_status", {"terminal_id": tid}), ("get_terminal_output", {"terminal_id": tid}),
        ("read_session_output", {"terminal_id": tid, "mode": "last"}),
        ("send_session_message", {"terminal_id": tid, "message": "second"}),
        ("shutdown_session", {"session_name": "cao-upops"})], command=command)
    texts = [json.dumps(r) for r in results]
    assert "developer" in texts[0] and "developer" in texts[1]
    assert results[2]["success"], results[2]  # POST /agents/profiles/install
    assert "cao-upops" in texts[3] and tid in texts[4]
    assert "completed" in texts[5] and "done: first" in texts[6] and "done: first" in texts[7]
    assert "success" in texts[8] and results[8].get("success") is not False, results[8]
    assert results[9].get("success") is not False, results[9]


def test_a_flow_added_with_upstreams_cli_is_taken_in_by_cao(server, tmp_path):
    import subprocess
    flow = server.workdir / "nightly.md"
    flow.write_text('---\nname: nightly\nschedule: "0 2 * * *"\nagent_profile: developer\n'
                    "provider: claude_code\n---\nCheck the build.\n")
    done = subprocess.run([str(UPSTREAM_CAO), "schedule", "add", str(flow)], cwd=server.workdir,
                          env={**server.env, "HOME": str(tmp_path)}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    flows = {f["name"]: f for f in server.request("GET", "/flows")[1]}
    assert flows["nightly"]["schedule"] == "0 2 * * *" and flows["nightly"]["enabled"]
    assert flows["nightly"]["prompt_template"] == "Check the build.\n"
    assert "nightly" in server.run("schedule", "list").stdout
