"""`cao ops-mcp`: the MCP server for an agent outside any cao session, through the MCP
SDK's stdio client against a real server with demo agents."""
import asyncio
import json

import pytest

from conftest import CAO, wait_for

pytest.importorskip("mcp")

OPS_TOOLS = {"list_profiles", "get_profile_details", "install_profile", "launch_session",
             "send_session_message", "read_session_output", "get_terminal_status",
             "get_terminal_output", "list_sessions", "get_session_info", "shutdown_session"}


def ops_calls(env, calls, command=None):
    """Run `calls` [(tool, arguments)] in one ops MCP session; (tool names, results)."""
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client
    command = command or CAO + ["ops-mcp"]

    async def run():
        params = StdioServerParameters(command=command[0], args=command[1:], env=env.env)
        results = []
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                names = {t.name for t in (await session.list_tools()).tools}
                for name, arguments in calls:
                    result = await session.call_tool(name, arguments)
                    text = "".join(getattr(p, "text", "") for p in result.content)
                    results.append(json.loads(text))
        return names, results
    return asyncio.run(run())


def test_every_ops_tool_drives_a_session_of_demo_agents(server):
    names, (launched,) = ops_calls(server, [("launch_session", {
        "agent_profile": "developer", "provider": "demo", "session_name": "ops",
        "initial_message": "first task", "env_vars": {"TEAM": "blue"}})])
    assert names == OPS_TOOLS
    assert launched["success"] and launched["session_name"] == "cao-ops", launched
    tid = launched["terminal_id"]
    wait_for(lambda: server.request("GET", f"/terminals/{tid}")[1]["status"] == "completed", 30,
             what="the first task's answer")
    _, results = ops_calls(server, [
        ("list_profiles", {}), ("get_profile_details", {"name": "reviewer"}),
        ("list_sessions", {}), ("get_session_info", {"session_name": "ops"}),
        ("get_terminal_status", {"terminal_id": tid}),
        ("get_terminal_output", {"terminal_id": tid}),
        ("read_session_output", {"session_name": "ops", "mode": "full", "max_chars": 40}),
        ("send_session_message", {"terminal_id": tid, "message": "second task"}),
        ("install_profile", {"source": "reviewer", "env_vars": {"REVIEW_DEPTH": "deep"}}),
    ])
    profiles, detail, sessions, info, status, output, screen, sent, installed = results
    assert {"developer", "reviewer"} <= {p["name"] for p in profiles["profiles"]}
    assert detail["profile"]["name"] == "reviewer"
    assert [s["name"] for s in sessions["sessions"]] == ["cao-ops"]
    assert info["terminals"][0]["id"] == tid and info["session"]["name"] == "cao-ops"
    assert status["status"] == "completed"
    assert output["output"] == "done: first task"
    assert screen["truncated"] and len(screen["output"]) == 40 and screen["total_chars"] > 40
    assert sent["success"] and sent["sender_id"] == "cao-ops-mcp"
    assert installed["success"] and installed["agent_name"] == "reviewer"
    assert "REVIEW_DEPTH=deep" in (server.home / ".env").read_text()
    wait_for(lambda: server.request("GET", f"/terminals/{tid}/output?mode=last")[1].get("output")
             == "done: second task", 30, what="the inbox message's answer")
    _, (ended,) = ops_calls(server, [("shutdown_session", {"session_name": "ops"})])
    assert ended["success"] and server.request("GET", "/sessions")[1] == []


def test_ops_tools_report_bad_input_in_one_line(server):
    _, results = ops_calls(server, [
        ("launch_session", {"agent_profile": "../etc", "provider": "demo"}),
        ("launch_session", {"agent_profile": "developer", "provider": "demo",
                            "env_vars": {"CAO_API_PORT": "1"}}),
        ("install_profile", {"source": "/etc/passwd"}),
        ("read_session_output", {}),
        ("get_terminal_status", {"terminal_id": "abcdef12"}),
        ("shutdown_session", {"session_name": "nope"}),
    ])
    errors = [r["error"] for r in results]
    assert all(r["success"] is False for r in results)
    assert "invalid agent profile name" in errors[0]
    assert "CAO_API_PORT is reserved" in errors[1]
    assert "must be a profile name or an https:// URL" in errors[2]
    assert "pass terminal_id or session_name" in errors[3]
    assert "not found" in errors[4] and "not found" in errors[5]
    assert all("\n" not in e for e in errors)
