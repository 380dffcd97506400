"""The fake LLM server (tests/mock_llm.py), spoken to over raw HTTP in each dialect."""
import http.client
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import free_port, kill_pid, wait_for
from mock_llm import MockLLM

TOOLS = {  # one offered MCP tool "handoff" per dialect, in the shape each CLI sends it
    "anthropic": [{"name": "Bash", "input_schema": {}}, {"name": "mcp__cao__handoff", "input_schema": {}}],
    "openai_chat": [{"type": "function", "function": {"name": "bash"}},
                    {"type": "function", "function": {"name": "cao_handoff"}}],
    "openai_responses": [{"type": "function", "name": "exec_command"},
                         {"type": "namespace", "name": "mcp__cao",
                          "tools": [{"type": "function", "name": "handoff"}]}],
    "gemini": [{"functionDeclarations": [{"name": "read_file"}, {"name": "mcp_cao_handoff"}]}],
}
PATHS = {"anthropic": "/v1/messages?beta=true", "openai_chat": "/v1/chat/completions",
         "openai_responses": "/v1/responses", "gemini": "/v1beta/models/gemini-x:streamGenerateContent?alt=sse"}


@pytest.fixture
def mock():
    m = MockLLM().start()
    yield m
    m.stop()


def post(mock, path, body, method="POST"):
    """Raw HTTP call; returns (status, headers, bytes, seconds until the status line)."""
    conn = http.client.HTTPConnection("127.0.0.1", urlsplit(mock.url).port, timeout=30)
    try:
        started = time.monotonic()
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "X-Test": "yes"})
        resp = conn.getresponse()
        first = time.monotonic() - started
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read(), first
    finally:
        conn.close()


def sse(raw):
    """[(event name or None, data)] from an SSE body; data is JSON-decoded unless [DONE]."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        name = next((ln[7:] for ln in block.splitlines() if ln.startswith("event: ")), None)
        data = "".join(ln[6:] for ln in block.splitlines() if ln.startswith("data: "))
        events.append((name, data if data == "[DONE]" else json.loads(data)))
    return events


def user_body(dialect, text, tools=True, stream=True, extra=None):
    tools = TOOLS[dialect] if tools else []
    if dialect == "anthropic":
        body = {"model": "m", "stream": stream, "tools": tools, "system": [{"type": "text", "text": "SYS"}],
                "messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>x"},
                                                          {"type": "text", "text": text}]},
                             {"role": "system", "content": "agents list"}]}
    elif dialect == "openai_chat":
        body = {"model": "m", "stream": stream, "tools": tools,
                "messages": [{"role": "system", "content": "SYS"},
                             {"role": "user", "content": [{"type": "text", "text": text}]}]}
    elif dialect == "openai_responses":
        body = {"model": "m", "stream": stream, "tools": tools, "instructions": "SYS",
                "input": [{"type": "message", "role": "developer",
                           "content": [{"type": "input_text", "text": "DEV"}]},
                          {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}]}
    else:
        body = {"contents": [{"role": "user", "parts": [{"text": text}]}], "tools": tools,
                "systemInstruction": {"parts": [{"text": "SYS"}]}}
    body.update(extra or {})
    return body


def answer_of(dialect, raw, stream=True):
    """('text', text) or ('tool', name, arguments, call_id, namespace) from a response body."""
    if not stream:
        doc = json.loads(raw)
        if dialect == "anthropic":
            block = doc["content"][0]
            return ("text", block["text"]) if block["type"] == "text" else \
                ("tool", block["name"], block["input"], block["id"], None)
        if dialect == "openai_chat":
            msg = doc["choices"][0]["message"]
            if msg.get("tool_calls"):
                call = msg["tool_calls"][0]
                return "tool", call["function"]["name"], json.loads(call["function"]["arguments"]), call["id"], None
            return "text", msg["content"]
        if dialect == "gemini":
            return "text", "".join(p["text"] for p in doc["candidates"][0]["content"]["parts"])
        item = doc["output"][0]
        return "text", item["content"][0]["text"]
    events = sse(raw)
    if dialect == "anthropic":
        start = events[1][1]["content_block"]
        deltas = [e[1]["delta"] for e in events if e[0] == "content_block_delta"]
        if start["type"] == "tool_use":
            return "tool", start["name"], json.loads(deltas[0]["partial_json"]), start["id"], None
        assert events[-1][0] == "message_stop"
        return "text", "".join(d["text"] for d in deltas)
    if dialect == "openai_chat":
        assert events[-1][1] == "[DONE]" and events[-2][1]["choices"] == [] and "usage" in events[-2][1]
        deltas = [e[1]["choices"][0]["delta"] for e in events[:-2] if e[1]["choices"]]
        calls = [c for d in deltas for c in d.get("tool_calls") or []]
        if calls:
            args = json.loads("".join(c["function"]["arguments"] for c in calls))
            return "tool", calls[0]["function"]["name"], args, calls[0]["id"], None
        return "text", "".join(d.get("content") or "" for d in deltas)
    if dialect == "openai_responses":
        assert events[-1][0] == "response.completed" and events[-1][1]["response"]["usage"]["total_tokens"] > 0
        item = [e[1]["item"] for e in events if e[0] == "response.output_item.done"][0]
        if item["type"] == "function_call":
            return "tool", item["name"], json.loads(item["arguments"]), item["call_id"], item.get("namespace")
        return "text", "".join(e[1]["delta"] for e in events if e[0] == "response.output_text.delta")
    parts = [p for _, e in events for p in e["candidates"][0]["content"]["parts"]]
    assert events[-1][1]["candidates"][0]["finishReason"] == "STOP"
    if "functionCall" in parts[0]:
        return "tool", parts[0]["functionCall"]["name"], parts[0]["functionCall"]["args"], None, None
    return "text", "".join(p["text"] for p in parts)


def follow_up_body(dialect, first, call, result):
    """The request a CLI sends after running the mock's tool call `call`."""
    body = user_body(dialect, first)
    _, name, args, call_id, namespace = call
    if dialect == "anthropic":
        body["messages"][1:] = [
            {"role": "assistant", "content": [{"type": "tool_use", "id": call_id, "name": name, "input": args}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id,
                                          "content": [{"type": "text", "text": result}]},
                                         {"type": "text", "text": "<system-reminder>y"}]}]
    elif dialect == "openai_chat":
        body["messages"] += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]},
            {"role": "tool", "tool_call_id": call_id, "content": result}]
    elif dialect == "openai_responses":
        body["input"] += [{"type": "function_call", "call_id": call_id, "name": name, "namespace": namespace,
                           "arguments": json.dumps(args)},
                          {"type": "function_call_output", "call_id": call_id, "output": result}]
    else:
        body["contents"] += [{"role": "model", "parts": [{"functionCall": {"name": name, "args": args}}]},
                             {"role": "user", "parts": [{"functionResponse": {"name": name,
                                                                              "response": {"output": result}}}]}]
    return body


@pytest.mark.parametrize("dialect", list(PATHS))
@pytest.mark.parametrize("stream", [True, False])
def test_text_answer_in_every_dialect(mock, dialect, stream):
    mock.reply("greet", "Hello there from the mock server, friend")
    path = PATHS[dialect] if stream or dialect != "gemini" else "/v1beta/models/g:generateContent"
    status, headers, raw, _ = post(mock, path, user_body(dialect, "please greet me", stream=stream))
    assert status == 200 and headers["connection"] == "close"
    assert headers["content-type"] == ("text/event-stream" if stream else "application/json")
    assert answer_of(dialect, raw, stream) == ("text", "Hello there from the mock server, friend")
    if stream and dialect != "openai_responses":
        assert len(sse(raw)) >= 4  # streamed in several pieces
    req = mock.requests[-1]
    assert (req["dialect"], req["kind"], req["user_text"]) == (dialect, "main", "please greet me")
    assert req["answer"] == "Hello there from the mock server, friend"


def test_default_answer_and_responses_event_order(mock):
    _, _, raw, _ = post(mock, PATHS["openai_responses"], user_body("openai_responses", "anything"))
    names = [e[0] for e in sse(raw)]
    assert names[:3] == ["response.created", "response.output_item.added", "response.content_part.added"]
    assert names[-3:] == ["response.content_part.done", "response.output_item.done", "response.completed"] \
        or names[-2:] == ["response.output_item.done", "response.completed"]
    assert "response.output_text.done" in names
    assert answer_of("openai_responses", raw) == ("text", "MOCK-ANSWER")
    mock.default_text = "OTHER"
    _, _, raw, _ = post(mock, PATHS["anthropic"], user_body("anthropic", "anything"))
    assert answer_of("anthropic", raw) == ("text", "OTHER")


@pytest.mark.parametrize("dialect", list(PATHS))
def test_tool_call_then_follow_up_with_result(mock, dialect):
    mock.reply("delegate", tool="handoff", arguments={"agent": "reviewer"}, then="got: {result}")
    _, _, raw, _ = post(mock, PATHS[dialect], user_body(dialect, "delegate this"))
    call = answer_of(dialect, raw)
    expected = {"anthropic": "mcp__cao__handoff", "openai_chat": "cao_handoff",
                "openai_responses": "handoff", "gemini": "mcp_cao_handoff"}[dialect]
    assert call[:3] == ("tool", expected, {"agent": "reviewer"})
    assert call[4] == ("mcp__cao" if dialect == "openai_responses" else None)
    flat = "mcp__cao.handoff" if dialect == "openai_responses" else expected
    assert mock.requests[-1]["answer"] == "tool:" + flat and flat in mock.requests[-1]["tool_names"]

    _, _, raw, _ = post(mock, PATHS[dialect], follow_up_body(dialect, "delegate this", call, "ECHO:42"))
    assert answer_of(dialect, raw) == ("text", "got: ECHO:42")
    req = mock.requests[-1]
    assert req["has_tool_result"] and req["tool_result_text"] == "ECHO:42" and req["kind"] == "main"
    assert req["user_text"] == "delegate this"


def test_default_then_and_missing_tool(mock):
    mock.reply("go", tool="handoff")
    mock.reply("nothing", tool="no_such_tool")
    _, _, raw, _ = post(mock, PATHS["anthropic"], user_body("anthropic", "go", stream=False))
    call = answer_of("anthropic", raw, stream=False)
    _, _, raw, _ = post(mock, PATHS["anthropic"], follow_up_body("anthropic", "go", call, "R"))
    assert answer_of("anthropic", raw) == ("text", "MOCK-TOOL-DONE R")
    _, _, raw, _ = post(mock, PATHS["openai_chat"], user_body("openai_chat", "nothing"))
    assert answer_of("openai_chat", raw) == ("text", "MOCK-NO-TOOL no_such_tool")


def test_qwen_deferred_tool_goes_through_tool_search(mock):
    mock.reply("delegate", tool="handoff", then="done {result}")
    body = user_body("openai_chat", "delegate it")
    body["tools"] = [{"type": "function", "function": {"name": "tool_search"}},
                     {"type": "function", "function": {"name": "run_shell_command"}}]
    body["messages"][0]["content"] = "## Deferred Tools\n- mcp__cao__handoff: hand work over\n"
    _, _, raw, _ = post(mock, PATHS["openai_chat"], body)
    search = answer_of("openai_chat", raw)
    assert search[:3] == ("tool", "tool_search", {"query": "select:mcp__cao__handoff"})

    body = follow_up_body("openai_chat", "delegate it", search, "Loaded 1 tool(s)")
    body["tools"] = [{"type": "function", "function": {"name": "tool_search"}},
                     {"type": "function", "function": {"name": "mcp__cao__handoff"}}]
    _, _, raw, _ = post(mock, PATHS["openai_chat"], body)
    call = answer_of("openai_chat", raw)
    assert call[:2] == ("tool", "mcp__cao__handoff")

    body["messages"] += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call[3], "type": "function", "function": {"name": call[1], "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": call[3], "content": [{"type": "text", "text": "OK"}]}]
    _, _, raw, _ = post(mock, PATHS["openai_chat"], body)
    assert answer_of("openai_chat", raw) == ("text", "done OK")
    assert [r["answer"] for r in mock.main_requests()] == ["tool:tool_search", "tool:mcp__cao__handoff", "done OK"]


def test_aux_requests_do_not_consume_rules(mock):
    mock.reply("hello", "RULE", times=1)
    claude_title = user_body("anthropic", "hello", extra={"output_config": {"format": {
        "type": "json_schema", "schema": {"type": "object", "properties": {"title": {"type": "string"}},
                                          "required": ["title"]}}}})
    _, _, raw, _ = post(mock, PATHS["anthropic"], claude_title)
    assert json.loads(answer_of("anthropic", raw)[1]) == {"title": "Mock title"}

    router = user_body("gemini", "hello", extra={"generationConfig": {
        "responseMimeType": "application/json", "responseJsonSchema": {
            "type": "object", "required": ["complexity_reasoning", "complexity_score"],
            "properties": {"complexity_reasoning": {"type": "string"}, "complexity_score": {"type": "integer"},
                           "flag": {"type": "boolean"}}}}})
    _, _, raw, _ = post(mock, "/v1beta/models/flash-lite:generateContent", router)
    assert json.loads(answer_of("gemini", raw, stream=False)[1]) == \
        {"complexity_reasoning": "simple", "complexity_score": 1, "flag": False}

    for dialect in PATHS:  # a request offering no tools is a title / helper call
        _, _, raw, _ = post(mock, PATHS[dialect], user_body(dialect, "hello", tools=False))
        assert answer_of(dialect, raw) == ("text", "Mock title")
    _, _, raw, _ = post(mock, PATHS["openai_chat"], user_body("openai_chat", "Managed memory directory: /x hello"))
    assert answer_of("openai_chat", raw) == ("text", "Mock title")
    assert [r["kind"] for r in mock.requests] == ["aux"] * 7 and mock.main_requests() == []

    _, _, raw, _ = post(mock, PATHS["openai_chat"], user_body("openai_chat", "hello"))
    assert answer_of("openai_chat", raw) == ("text", "RULE")


def test_times_and_rule_order(mock):
    mock.reply("x", "first", times=1)
    mock.reply(re.compile(r"^x\d$"), "regex")
    mock.reply("x", "second")
    mock.reply("t", tool="handoff", times=1)
    answers = []
    for text in ["x", "x1", "x"]:
        _, _, raw, _ = post(mock, PATHS["openai_chat"], user_body("openai_chat", text))
        answers.append(answer_of("openai_chat", raw)[1])
    assert answers == ["first", "regex", "second"]
    _, _, raw, _ = post(mock, PATHS["gemini"], user_body("gemini", "t"))
    call = answer_of("gemini", raw)
    _, _, raw, _ = post(mock, PATHS["gemini"], follow_up_body("gemini", "t", call, "R"))
    assert answer_of("gemini", raw) == ("text", "MOCK-TOOL-DONE R")  # follow-up is not a new firing
    _, _, raw, _ = post(mock, PATHS["gemini"], user_body("gemini", "t"))
    assert answer_of("gemini", raw) == ("text", "MOCK-ANSWER")  # times=1 used up


def test_delay_holds_first_byte_and_chunk_delay_spreads_stream(mock):
    mock.reply("slow", "a b c d e f g h", delay=0.6, chunk_delay=0.05)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=post(mock, PATHS["anthropic"],
                                                             user_body("anthropic", "slow please"))))
    t.start()
    req = mock.wait_for(lambda r: r["user_text"] == "slow please", timeout=5)
    assert req["first_byte_at"] is None  # logged on arrival, answer still held back
    t.join(10)
    status, _, raw, first = result["r"]
    assert status == 200 and first >= 0.55
    assert answer_of("anthropic", raw) == ("text", "a b c d e f g h")
    assert req["first_byte_at"] - req["time"] >= 0.55
    assert req["last_byte_at"] - req["first_byte_at"] >= 0.05 * 5


def test_parallel_requests_are_served_concurrently(mock):
    mock.reply("p", "par", delay=0.5)
    threads = [threading.Thread(target=post, args=(mock, PATHS["openai_chat"], user_body("openai_chat", "p")))
               for _ in range(6)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert time.monotonic() - started < 2.0
    assert [r["answer"] for r in mock.requests] == ["par"] * 6


def test_request_log_fields_and_other_endpoints(mock):
    post(mock, PATHS["anthropic"], user_body("anthropic", "typed text"))
    req = mock.requests[-1]
    assert req["method"] == "POST" and req["path"] == "/v1/messages?beta=true"
    assert req["headers"]["x-test"] == "yes" and req["body"]["model"] == "m"
    assert req["user_text"] == "typed text" and req["system_text"] == "SYS\nagents list"
    assert req["tool_names"] == ["Bash", "mcp__cao__handoff"] and not req["has_tool_result"]
    assert req["tool_result_text"] is None and req["time"] <= req["first_byte_at"] <= req["last_byte_at"]
    post(mock, PATHS["openai_responses"], user_body("openai_responses", "t"))
    assert mock.requests[-1]["system_text"] == "SYS\nDEV"
    assert mock.requests[-1]["tool_names"] == ["exec_command", "mcp__cao.handoff"]

    assert json.loads(post(mock, "/v1/messages/count_tokens", {"messages": []})[2])["input_tokens"] >= 1
    assert json.loads(post(mock, "/v1beta/models/g:countTokens", {"contents": []})[2])["totalTokens"] >= 1
    models = json.loads(post(mock, "/v1/models", None, "GET")[2])
    assert models["object"] == "list" and models["data"][0]["id"]
    assert json.loads(post(mock, "/v1/models/mock-model", None, "GET")[2])["id"] == "mock-model"
    assert json.loads(post(mock, "/api/show", {"model": "x"})[2]) == {}
    assert [r["dialect"] for r in mock.requests[-5:]] == ["anthropic", "gemini", "other", "other", "other"]
    assert all(r["kind"] == "aux" for r in mock.requests[-5:])
    assert len(mock.main_requests()) == 2


def test_wait_for_times_out_with_summary(mock):
    post(mock, PATHS["openai_chat"], user_body("openai_chat", "seen"))
    with pytest.raises(AssertionError, match="user='seen'"):
        mock.wait_for(lambda r: r["user_text"] == "never", timeout=0.2)


def test_context_manager_stops_server():
    with MockLLM() as m:
        assert post(m, "/api/show", {})[0] == 200
        port = urlsplit(m.url).port
    with pytest.raises(OSError):
        post(m, "/api/show", {})
    assert port


def test_cli_serves_rules_and_prints_requests(tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"match": "^hi$", "regex": True, "text": "from-rules"}]))
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("mock_llm.py")), "--port", str(port),
                             "--rules", str(rules)], stdout=subprocess.PIPE, text=True)
    try:
        assert "listening" in proc.stdout.readline()
        m = MockLLM(port=port)  # only used for its url in post()
        _, _, raw, _ = post(m, PATHS["openai_chat"], user_body("openai_chat", "hi"))
        assert answer_of("openai_chat", raw) == ("text", "from-rules")
        line = proc.stdout.readline()
        assert "openai_chat" in line and "main" in line and "'hi'" in line
    finally:
        kill_pid(proc.pid)
        proc.stdout.close()
        wait_for(lambda: proc.poll() is not None, 5, what="mock CLI exit")


def test_user_text_skips_injected_context_and_result_only_messages(mock):
    mock.reply("typed", "seen-typed", times=1)
    gemini = user_body("gemini", "typed words")
    context = "<session_context>\nThis is the Gemini CLI.\n</session_context>"
    gemini["contents"][0]["parts"].insert(0, {"text": context})
    _, _, raw, _ = post(mock, PATHS["gemini"], gemini)
    assert answer_of("gemini", raw) == ("text", "seen-typed")
    assert mock.requests[-1]["user_text"] == "typed words"
    chat = user_body("openai_chat", "")
    chat["messages"][1]["content"] = "<current_datetime>2026-01-01</current_datetime>\n\nhello copilot"
    post(mock, PATHS["openai_chat"], chat)
    assert mock.requests[-1]["user_text"] == "hello copilot"

    # a tool result for a call the mock never made: answered with the default `then`, no rule consumed
    body = follow_up_body("openai_chat", "typed again", ("tool", "bash", {}, "call_foreign", None), "OUT")
    _, _, raw, _ = post(mock, PATHS["openai_chat"], body)
    assert answer_of("openai_chat", raw) == ("text", "MOCK-TOOL-DONE OUT")
    assert mock.requests[-1]["user_text"] == "typed again"  # taken from before the tool result
