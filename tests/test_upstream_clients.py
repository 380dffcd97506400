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
