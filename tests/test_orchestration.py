"""handoff, assign and send_message through the real stdio MCP chain: demo agents
spawn `cao mcp` with the MCP SDK's client, exactly as an agent CLI would."""
import asyncio
import json

import pytest

from conftest import CAO, call_tool as _call_tool, wait_for

pytest.importorskip("mcp")


def _session(env, name):
    code, sup = env.request("POST", f"/sessions?agent_profile=code_supervisor&provider=demo"
                                    f"&session_name={name}")
    assert code == 201, sup
    return sup


def _status(env, tid):
    return env.request("GET", f"/terminals/{tid}")[1].get("status")


def _ask(env, tid, text, timeout=30):
    assert env.request("POST", f"/terminals/{tid}/input", {"message": text})[0] == 200
    wait_for(lambda: _status(env, tid) == "completed", timeout, what=f"answer to {text!r}")
    return env.request("GET", f"/terminals/{tid}/output?mode=last")[1]["output"]


def test_handoff_returns_the_workers_answer_and_removes_it(server):
    sup = _session(server, "ho")
    assert _ask(server, sup["id"], "/handoff developer build the parser") == "done: done: build the parser"
    screen = server.request("GET", f"/terminals/{sup['id']}/output")[1]["output"]
    assert "worker " not in screen  # nothing but the agent itself draws on its screen
    terms = server.request("GET", "/sessions/cao-ho")[1]["terminals"]
    assert [t["id"] for t in terms] == [sup["id"]]  # the worker window is gone
    snaps = list((server.home / "logs" / "terminal").glob("*.snapshot.json"))
    assert len(snaps) == 1
    snap = json.loads(snaps[0].read_text())
    assert snap["agent_profile"] == "developer" and snap["caller_id"] == sup["id"]


def test_assign_then_callback_without_receiver_reaches_the_assigner(server):
    sup = _session(server, "as")
    answer = _ask(server, sup["id"], "/assign reviewer /send - review finished")
    assert answer.startswith("done: assigned ")
    worker_id = answer.split()[-1]
    assert server.request("GET", f"/terminals/{worker_id}")[1]["caller_id"] == sup["id"]
    wait_for(lambda: [m["status"] for m in server.request(
        "GET", f"/terminals/{sup['id']}/inbox/messages")[1]] == ["delivered"], 30,
        what="callback delivered to the supervisor")
    wait_for(lambda: "done: review finished" in server.request(
        "GET", f"/terminals/{sup['id']}/output")[1]["output"], 15, what="callback on screen")
    msg = server.request("GET", f"/terminals/{sup['id']}/inbox/messages")[1][0]
    assert msg["sender_id"] == worker_id and f"[Message from terminal {worker_id}." in msg["message"]


def test_three_level_chain(server):
    sup = _session(server, "chain")
    answer = _ask(server, sup["id"], "/handoff developer /assign reviewer deepest task")
    assert answer.startswith("done: done: assigned ")
    b_id = answer.split()[-1]
    wait_for(lambda: _status(server, b_id) == "completed", 30, what="level-3 worker")
    assert server.request("GET", f"/terminals/{b_id}/output?mode=last")[1]["output"] == "done: deepest task"


def test_mcp_offers_only_the_orchestration_tools_and_rejects_bad_input(server):
    sup = _session(server, "badmcp")
    tools, result = _call_tool(server, "send_message", {"message": "hi"})
    assert set(tools) == {"handoff", "assign", "send_message", "delete_terminal", "get_handoff_result",
                          "answer_user_prompt", "list_siblings", "load_skill", "memory_store",
                          "memory_recall", "memory_forget"}
    assert not result["success"] and "CAO_TERMINAL_ID is not set" in result["error"]
    cases = [
        ("handoff", {"agent_profile": "nobody", "message": "x"}, "agent profile 'nobody' not found"),
        ("handoff", {"agent_profile": "developer", "message": "x", "timeout": 0}, "out of range"),
        ("handoff", {"agent_profile": "developer", "message": "x", "timeout": 4000}, "out of range"),
        ("assign", {"agent_profile": "../x", "message": "x"}, "invalid agent profile name"),
        ("send_message", {"message": "x", "receiver_id": "abcdef12"}, "not found"),
        ("send_message", {"message": "x", "receiver_id": sup["id"]}, "cannot send a message to itself"),
        ("send_message", {"message": "x"}, "no terminal assigned this one"),
        ("delete_terminal", {"terminal_id": "nope"}, "invalid terminal id"),
    ]
    for name, args, text in cases:
        _, result = _call_tool(server, name, args, sup["id"])
        assert result["success"] is False and text in (result.get("error") or result.get("message")), result
    assert [t["id"] for t in server.request("GET", "/sessions/cao-badmcp")[1]["terminals"]] == [sup["id"]]
    assert server.request("GET", f"/terminals/{sup['id']}/inbox/messages")[1] == []


def test_handoff_timeout_keeps_the_worker_and_says_so(cao_env):
    cao_env.env["CAO_DEMO_DELAY"] = "20"
    cao_env.start_server()
    code, sup = cao_env.request("POST", "/sessions?agent_profile=code_supervisor&provider=demo"
                                        "&session_name=slowho")
    assert code == 201
    _, result = _call_tool(cao_env, "handoff", {"agent_profile": "developer", "message": "slow",
                                                "timeout": 1}, sup["id"])
    assert result["success"] is False and "timed out after 1 seconds" in result["message"]
    worker = result["terminal_id"]
    assert _status(cao_env, worker) == "processing"  # kept for inspection
    _, deleted = _call_tool(cao_env, "delete_terminal", {"terminal_id": worker}, sup["id"])
    assert deleted["success"] and cao_env.request("GET", f"/terminals/{worker}")[0] == 404


def test_working_directory_is_offered_only_with_its_flag(server):
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    async def schemas(flag):
        params = StdioServerParameters(command=CAO[0], args=CAO[1:] + ["mcp"],
                                       env={**server.env, "CAO_ENABLE_WORKING_DIRECTORY": flag})
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = (await session.list_tools()).tools
                return {t.name: set((getattr(t, "input_schema", None) or t.inputSchema)["properties"])
                        for t in tools}
    off, on = asyncio.run(schemas("false")), asyncio.run(schemas("true"))
    assert off["handoff"] == {"agent_profile", "message", "timeout", "model", "description",
                              "use_worktree"}
    assert on["handoff"] == off["handoff"] | {"working_directory"}
    assert on["assign"] - off["assign"] == {"working_directory"}
    assert on["send_message"] == off["send_message"] == {"message", "receiver_id"}
