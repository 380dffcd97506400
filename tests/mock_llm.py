#!/usr/bin/env python3
"""A fake LLM HTTP server (stdlib only) for driving the real AI coding CLIs offline.

MockLLM listens on 127.0.0.1 and speaks the four wire dialects those CLIs use:

* Anthropic Messages  POST .../v1/messages[?beta=true]           Claude Code
    SSE: message_start, content_block_start/_delta/_stop, message_delta, message_stop
    POST .../v1/messages/count_tokens -> {"input_tokens": N}
* OpenAI Chat         POST .../chat/completions                  opencode, Copilot, Qwen Code, kimi, hermes
    SSE: "data: <chunk>" lines, a usage-only chunk, then "data: [DONE]"
* OpenAI Responses    POST .../responses                         Codex
    SSE: response.created, response.output_item.added, response.content_part.added,
    response.output_text.delta..., response.output_text.done, response.output_item.done, response.completed.
    MCP tools arrive grouped as {"type": "namespace", "name": "mcp__srv", "tools": [...]}.
* Gemini              POST ...:streamGenerateContent (SSE "data:" lines), ...:generateContent (JSON),
                      ...:countTokens -> {"totalTokens": N}                  Gemini CLI

GET .../models and .../models/<id> return an OpenAI-style list / model object; anything else gets 200 {}.
Every response is sent with "Connection: close"; streams are flushed event by event, then closed.

What to answer is decided from the user's typed text (the last user message that has real text;
<system-reminder> blocks and leading tag-wrapped context such as Gemini's <session_context> or
Copilot's <current_datetime> are dropped) by rules added with MockLLM.reply(). A rule may answer with a call to an offered tool; the request that
brings that tool's result back is answered with the rule's `then` text. Requests the CLIs make
besides the turn itself (session titles, Gemini's router, Qwen's memory extractor, any request that
offers no tools) are logged as kind "aux" and answered without touching the rules.

Standalone: python tests/mock_llm.py --port 18080 [--rules rules.json]
"""
import argparse
import gzip
import json
import re
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEFAULT_THEN = "MOCK-TOOL-DONE {result}"
AUX_TEXT = "Mock title"
REMINDER = "<system-reminder>"
# context a CLI wraps in tags before the typed text: Gemini <session_context>, Copilot <current_datetime>
LEADING_CONTEXT = re.compile(r"(?:\s*<([\w-]+)>.*?</\1>)+\s*", re.S)
MODEL = "mock-model"


# ----------------------------------------------------------------------------- request parsing

_ROUTES = [("/messages/count_tokens", "anthropic", "count"), ("/messages", "anthropic", "generate"),
           ("/chat/completions", "openai_chat", "generate"), ("/responses", "openai_responses", "generate"),
           (":streamGenerateContent", "gemini", "generate"), (":generateContent", "gemini", "generate"),
           (":countTokens", "gemini", "count")]


def _route(path):
    """(dialect, operation) from the URL path; operation is "generate", "count" or None."""
    p = path.split("?", 1)[0].rstrip("/")
    return next(((d, op) for suffix, d, op in _ROUTES if p.endswith(suffix)), ("other", None))


def _texts(content):
    """The text pieces of a message content: a string or a list of text parts."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [p if isinstance(p, str) else p["text"] for p in content
            if isinstance(p, str) or (isinstance(p, dict) and isinstance(p.get("text"), str)
                                      and p.get("type", "text") in ("text", "input_text", "output_text")
                                      and not p.get("thought"))]


def _real(texts):
    """The texts a user typed: system reminders dropped, leading tag-wrapped context cut off."""
    typed = [t[_context_end(t):] for t in texts if not t.lstrip().startswith(REMINDER)]
    return [t for t in typed if t.strip()]


def _context_end(text):
    m = LEADING_CONTEXT.match(text)
    return m.end() if m else 0


def _output_text(output):
    """Text of a tool result payload (string, list of parts, or Gemini's response object)."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "\n".join(_texts(output))
    if isinstance(output, dict):
        for key in ("output", "content", "result"):
            if key in output:
                return _output_text(output[key])
        return json.dumps(output)
    return ""


def _conversation(dialect, body):
    """Messages as (role, texts, tool_results) with roles user/assistant/system and
    tool_results = [(call_id, tool_name, result_text)]."""
    msgs = []
    if dialect == "anthropic":
        for m in body.get("messages") or []:
            content = m.get("content")
            blocks = content if isinstance(content, list) else []
            results = [(b.get("tool_use_id"), None, _output_text(b.get("content"))) for b in blocks
                       if isinstance(b, dict) and b.get("type") == "tool_result"]
            msgs.append((m.get("role"), _texts(content), results))
    elif dialect == "openai_chat":
        for m in body.get("messages") or []:
            if m.get("role") == "tool":
                msgs.append(("user", [], [(m.get("tool_call_id"), m.get("name"),
                                           _output_text(m.get("content")))]))
            else:
                role = "system" if m.get("role") == "developer" else m.get("role")
                msgs.append((role, _texts(m.get("content")), []))
    elif dialect == "openai_responses":
        items = body.get("input")
        for it in [{"role": "user", "content": items}] if isinstance(items, str) else items or []:
            kind = it.get("type", "message")
            if kind == "message":
                role = "system" if it.get("role") == "developer" else it.get("role")
                msgs.append((role, _texts(it.get("content")), []))
            elif kind.endswith("_call_output"):
                msgs.append(("user", [], [(it.get("call_id"), None, _output_text(it.get("output")))]))
            elif kind.endswith("_call"):
                msgs.append(("assistant", [], []))
    elif dialect == "gemini":
        for c in body.get("contents") or []:
            parts = c.get("parts") or []
            results = [(p["functionResponse"].get("id"), p["functionResponse"].get("name"),
                        _output_text(p["functionResponse"].get("response"))) for p in parts
                       if isinstance(p.get("functionResponse"), dict)]
            msgs.append(("assistant" if c.get("role") == "model" else "user", _texts(parts), results))
    return msgs


def _user_text(dialect, msgs):
    for role, texts, _ in reversed(msgs):
        real = _real(texts) if role == "user" else []
        if real:
            return real[-1] if dialect == "anthropic" else "\n".join(real)
    return ""


def _system_text(dialect, body, msgs):
    top = {"anthropic": body.get("system"), "openai_responses": body.get("instructions"),
           "gemini": body.get("systemInstruction") or body.get("system_instruction")}.get(dialect)
    if isinstance(top, dict):
        top = top.get("parts")
    texts = _texts(top) + [t for role, texts, _ in msgs if role == "system" for t in texts]
    return "\n".join(texts)


def _pending_results(msgs):
    """Tool results sent since the last assistant message (i.e. answers to the mock's last calls)."""
    found = []
    for role, texts, results in reversed(msgs):
        if role == "assistant":
            break
        found.extend(results)
        if role == "user" and not results and _real(texts):
            break
    return found


def _tools(dialect, body):
    """Offered tools as (flat_name, call_name, namespace, description)."""
    out = []
    for t in body.get("tools") or []:
        if not isinstance(t, dict):
            continue
        if dialect == "gemini":
            for f in t.get("functionDeclarations") or t.get("function_declarations") or []:
                out.append((f["name"], f["name"], None, f.get("description") or ""))
        elif t.get("type") == "namespace":
            for f in t.get("tools") or []:
                out.append((f"{t['name']}.{f['name']}", f["name"], t["name"], f.get("description") or ""))
        else:
            f = t.get("function") or t.get("custom") or t
            if isinstance(f.get("name"), str):
                out.append((f["name"], f["name"], None, f.get("description") or ""))
    return out


def _tool_score(flat, wanted):
    if flat == wanted:
        return 3
    if any(flat.endswith(sep + wanted) for sep in ("__", "_", "-", ".")):
        return 2
    return 1 if flat.endswith(wanted) else 0


def _find_tool(tools, wanted):
    best = max(tools, key=lambda t: _tool_score(t[0], wanted), default=None)
    return best if best and _tool_score(best[0], wanted) else None


def _json_schema(dialect, body):
    """The schema a structured-output (title / router) request asks for, else None."""
    if dialect == "anthropic":
        fmt = (body.get("output_config") or {}).get("format") or {}
        return fmt.get("schema", {}) if fmt.get("type") == "json_schema" else None
    if dialect == "openai_chat":
        fmt = body.get("response_format") or {}
        return (fmt.get("json_schema") or {}).get("schema", {}) if fmt.get("type") == "json_schema" else None
    if dialect == "openai_responses":
        fmt = (body.get("text") or {}).get("format") or {}
        return fmt.get("schema", {}) if fmt.get("type") == "json_schema" else None
    cfg = body.get("generationConfig") or {}
    schema = cfg.get("responseJsonSchema") or cfg.get("responseSchema")
    if schema is None and cfg.get("responseMimeType") == "application/json":
        schema = {}
    return schema


def _fill_schema(schema, key=""):
    """A plausible value for a JSON schema: every property filled in by its type."""
    if not isinstance(schema, dict):
        return "simple"
    if schema.get("enum"):
        return schema["enum"][0]
    for alt in ("anyOf", "oneOf"):
        if schema.get(alt):
            return _fill_schema(schema[alt][0], key)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    kind = kind.lower()
    if kind == "object":
        return {k: _fill_schema(v, k) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_fill_schema(schema.get("items"), key) for _ in range(schema.get("minItems", 0))]
    if kind in ("integer", "number"):
        return max(1, schema.get("minimum", 1))
    if kind == "boolean":
        return False
    return AUX_TEXT if "title" in key.lower() else "simple"


def _chunks(text, pieces=4):
    """Split text on spaces into about `pieces` parts that join back to the text."""
    words = re.findall(r"\S*\s*", text)[:-1] or [text]
    size = max(1, -(-len(words) // pieces))
    return ["".join(words[i:i + size]) for i in range(0, len(words), size)]


def _sse(data, event=None):
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + (data if isinstance(data, str) else json.dumps(data)) + "\n\n").encode()


# ----------------------------------------------------------------------------- answer encoding

def _anthropic(ans, model, usage, stream):
    mid = "msg_" + uuid.uuid4().hex[:24]
    if ans["type"] == "text":
        block, stop = {"type": "text", "text": ans["text"]}, "end_turn"
    else:
        block = {"type": "tool_use", "id": ans["call_id"], "name": ans["name"], "input": ans["arguments"]}
        stop = "tool_use"
    use = {"input_tokens": usage[0], "output_tokens": usage[1]}
    if not stream:
        return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": [block],
                "stop_reason": stop, "stop_sequence": None, "usage": use}
    start = dict(block, text="") if ans["type"] == "text" else dict(block, input={})
    deltas = ([{"type": "text_delta", "text": c} for c in _chunks(ans["text"])] if ans["type"] == "text"
              else [{"type": "input_json_delta", "partial_json": json.dumps(ans["arguments"])}])
    events = [("message_start", {"type": "message_start", "message": {
        "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": dict(use, output_tokens=1)}}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": start})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d}) for d in deltas]
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                  "usage": {"output_tokens": usage[1]}}),
               ("message_stop", {"type": "message_stop"})]
    return [_sse(data, name) for name, data in events]


def _openai_chat(ans, model, usage, stream):
    base = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "created": int(time.time()), "model": model}
    use = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    call = {"id": ans.get("call_id"), "type": "function",
            "function": {"name": ans.get("name"), "arguments": json.dumps(ans.get("arguments"))}}
    finish = "stop" if ans["type"] == "text" else "tool_calls"
    if not stream:
        message = ({"role": "assistant", "content": ans["text"]} if ans["type"] == "text"
                   else {"role": "assistant", "content": None, "tool_calls": [call]})
        return dict(base, object="chat.completion", usage=use,
                    choices=[{"index": 0, "message": message, "finish_reason": finish}])
    if ans["type"] == "text":
        deltas = [{"role": "assistant", "content": ""}] + [{"content": c} for c in _chunks(ans["text"])]
    else:
        deltas = [{"role": "assistant", "content": None, "tool_calls": [
                      {"index": 0, "id": call["id"], "type": "function",
                       "function": {"name": ans["name"], "arguments": ""}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": call["function"]["arguments"]}}]}]
    chunk = dict(base, object="chat.completion.chunk")
    events = [dict(chunk, choices=[{"index": 0, "delta": d, "finish_reason": None}]) for d in deltas]
    events += [dict(chunk, choices=[{"index": 0, "delta": {}, "finish_reason": finish}]),
               dict(chunk, choices=[], usage=use)]
    return [_sse(e) for e in events] + [_sse("[DONE]")]


def _openai_responses(ans, model, usage, stream):
    rid = "resp_" + uuid.uuid4().hex[:24]
    response = {"id": rid, "object": "response", "created_at": int(time.time()), "model": model,
                "status": "in_progress", "output": []}
    use = {"input_tokens": usage[0], "input_tokens_details": {"cached_tokens": 0}, "output_tokens": usage[1],
           "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": sum(usage)}
    if ans["type"] == "text":
        item = {"type": "message", "id": "msg_" + uuid.uuid4().hex[:24], "role": "assistant",
                "status": "completed", "content": [{"type": "output_text", "text": ans["text"], "annotations": []}]}
    else:
        item = {"type": "function_call", "id": "fc_" + uuid.uuid4().hex[:24], "call_id": ans["call_id"],
                "name": ans["name"], "arguments": json.dumps(ans["arguments"]), "status": "completed"}
        if ans.get("namespace"):
            item["namespace"] = ans["namespace"]
    done = dict(response, status="completed", output=[item], usage=use)
    if not stream:
        return done
    events = [{"type": "response.created", "response": response}]
    if ans["type"] == "text":
        ref = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        events += [{"type": "response.output_item.added", "output_index": 0, "item": dict(item, content=[],
                                                                                          status="in_progress")},
                   dict(ref, type="response.content_part.added",
                        part={"type": "output_text", "text": "", "annotations": []})]
        events += [dict(ref, type="response.output_text.delta", delta=c) for c in _chunks(ans["text"])]
        events += [dict(ref, type="response.output_text.done", text=ans["text"]),
                   dict(ref, type="response.content_part.done", part=item["content"][0])]
    else:
        events.append({"type": "response.output_item.added", "output_index": 0, "item": dict(item, arguments="")})
    events += [{"type": "response.output_item.done", "output_index": 0, "item": item},
               {"type": "response.completed", "response": done}]
    return [_sse(e, e["type"]) for e in events]


def _gemini(ans, model, usage, stream):
    meta = {"promptTokenCount": usage[0], "candidatesTokenCount": usage[1], "totalTokenCount": sum(usage)}
    if ans["type"] == "text":
        parts_list = [[{"text": c}] for c in _chunks(ans["text"])] if stream else [[{"text": ans["text"]}]]
    else:
        parts_list = [[{"functionCall": {"name": ans["name"], "args": ans["arguments"]}}]]
    events = [{"candidates": [{"content": {"role": "model", "parts": parts}, "index": 0}],
               "usageMetadata": meta, "modelVersion": model} for parts in parts_list]
    events[-1]["candidates"][0]["finishReason"] = "STOP"
    return [_sse(e) for e in events] if stream else events[0]


_ENCODERS = {"anthropic": _anthropic, "openai_chat": _openai_chat,
             "openai_responses": _openai_responses, "gemini": _gemini}


# ----------------------------------------------------------------------------- the server

class MockLLM:
    """A scripted fake LLM endpoint; see the module docstring."""

    def __init__(self, port=0, host="127.0.0.1"):
        self.host, self.port = host, port
        self.default_text = "MOCK-ANSWER"
        self.requests = []
        self.on_request = None          # optional callback(request_dict) after each answer
        self._rules = []
        self._calls = {}                # call id -> {"rule", "stage", "name"} for calls the mock made
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = self._thread = None

    # -- lifecycle
    def start(self):
        mock = self

        class Handler(_Handler):
            owner = mock
        self._stopping.clear()
        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="mock-llm", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server:
            self._stopping.set()
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    # -- scripting and inspection
    def reply(self, match, text=None, *, tool=None, arguments=None, then=None, delay=0.0,
              chunk_delay=0.0, times=None):
        """Add a rule (first match wins): a main request whose user text contains `match` (str) or
        matches it (re.Pattern, search) is answered with `text`, or with a call to the offered tool
        whose name ends with `tool` (Qwen: via tool_search first); the request bringing that tool's
        result back gets `then` with "{result}" replaced. `delay` holds the rule's first answer back,
        `chunk_delay` spaces all its streamed events; `times` caps how often it fires."""
        with self._lock:
            self._rules.append({"match": match, "text": "MOCK-ANSWER" if text is None else text,
                                "tool": tool, "arguments": arguments or {},
                                "then": DEFAULT_THEN if then is None else then, "delay": delay,
                                "chunk_delay": chunk_delay, "times": times, "fired": 0})
        return self

    def main_requests(self):
        return [r for r in list(self.requests) if r["kind"] == "main"]

    def wait_for(self, predicate, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            for r in list(self.requests):
                if predicate(r):
                    return r
            if time.monotonic() > deadline:
                seen = "\n".join(f"  {r['dialect']} {r['kind']} {r['method']} {r['path']} "
                                 f"user={r['user_text'][:80]!r} -> {str(r.get('answer'))[:80]!r}"
                                 for r in list(self.requests)) or "  (no requests)"
                raise AssertionError(f"no matching request within {timeout}s; received:\n{seen}")
            time.sleep(0.02)

    # -- request handling (called from handler threads)
    def _handle(self, handler, body):
        dialect, op = _route(handler.path)
        entry = {"time": time.time(), "method": handler.command, "path": handler.path,
                 "dialect": dialect, "headers": {k.lower(): v for k, v in handler.headers.items()},
                 "body": body, "kind": "aux", "user_text": "", "system_text": "", "tool_names": [],
                 "has_tool_result": False, "tool_result_text": None, "answer": None,
                 "first_byte_at": None, "last_byte_at": None}
        in_tokens = max(1, len(json.dumps(body)) // 4) if body is not None else 1
        if op == "generate" and isinstance(body, dict):
            answer, rule, delay = self._decide(dialect, body, entry)
            with self._lock:
                self.requests.append(entry)
            model = body.get("model") or handler.path.split("/models/")[-1].split(":")[0] or MODEL
            stream = ":streamGenerateContent" in handler.path or bool(body.get("stream"))
            text_len = len(answer.get("text") or "") or 20
            payload = _ENCODERS[dialect](answer, model, (in_tokens, max(1, text_len // 4)), stream)
            if self._stopping.wait(delay):
                return
            if stream:
                handler.send_stream(payload, entry, rule["chunk_delay"] if rule else 0.0, self._stopping)
            else:
                handler.send_json(payload, entry)
        else:
            with self._lock:
                self.requests.append(entry)
            payload = self._aux_payload(handler, op, in_tokens)
            entry["answer"] = json.dumps(payload)
            handler.send_json(payload, entry)
        if self.on_request:
            self.on_request(entry)

    def _aux_payload(self, handler, op, in_tokens):
        path = handler.path.split("?", 1)[0].rstrip("/")
        if op == "count":
            return {"input_tokens": in_tokens} if path.endswith("count_tokens") else {"totalTokens": in_tokens}
        if handler.command == "GET" and path.endswith("/models"):
            return {"object": "list", "has_more": False,
                    "data": [{"id": MODEL, "object": "model", "type": "model", "display_name": "Mock Model",
                              "created": 0, "owned_by": "mock"}]}
        if handler.command == "GET" and "/models/" in path:
            return {"id": path.split("/models/", 1)[1], "object": "model", "created": 0, "owned_by": "mock"}
        return {}

    def _decide(self, dialect, body, entry):
        """Fill the entry's parsed fields and pick (answer, rule, delay) for a generation request."""
        msgs = _conversation(dialect, body)
        tools = _tools(dialect, body)
        pending = _pending_results(msgs)
        entry.update(user_text=_user_text(dialect, msgs), system_text=_system_text(dialect, body, msgs),
                     tool_names=[t[0] for t in tools], has_tool_result=bool(pending),
                     tool_result_text="\n".join(r[2] for r in pending) if pending else None)
        schema = _json_schema(dialect, body)
        answer, rule, delay, kind = None, None, 0.0, "main"
        with self._lock:
            if schema is not None:
                answer, kind = self._text(json.dumps(_fill_schema(schema))), "aux"
            elif pending:
                answer, rule = self._follow_up(dialect, pending, tools)
            elif not tools or entry["user_text"].startswith("Managed memory directory"):
                answer, kind = self._text(AUX_TEXT), "aux"
            else:
                rule = next((r for r in self._rules if self._matches(r, entry["user_text"])), None)
                if rule is None:
                    answer = self._text(self.default_text)
                else:
                    rule["fired"] += 1
                    delay = rule["delay"]
                    answer = (self._text(rule["text"]) if rule["tool"] is None
                              else self._call_tool(dialect, rule, tools, entry["system_text"]))
        entry["kind"] = kind
        entry["answer"] = answer["text"] if answer["type"] == "text" else "tool:" + answer["flat"]
        return answer, rule, delay

    @staticmethod
    def _matches(rule, user_text):
        if rule["times"] is not None and rule["fired"] >= rule["times"]:
            return False
        if isinstance(rule["match"], re.Pattern):
            return bool(rule["match"].search(user_text))
        return rule["match"] in user_text

    @staticmethod
    def _text(text):
        return {"type": "text", "text": text}

    def _call_tool(self, dialect, rule, tools, system_text, stage="call"):
        """Answer with a call to rule["tool"], going through Qwen's tool_search when it is deferred."""
        found = _find_tool(tools, rule["tool"])
        args = rule["arguments"]
        if found is None and stage == "call" and _find_tool(tools, "tool_search"):
            haystack = system_text + "\n" + "\n".join(t[3] for t in tools)
            names = [n for n in re.findall(r"mcp__[\w\-]+", haystack) if _tool_score(n, rule["tool"])]
            if names:
                found, stage = _find_tool(tools, "tool_search"), "search"
                args = {"query": "select:" + max(names, key=lambda n: _tool_score(n, rule["tool"]))}
        if found is None and stage == "call" and _find_tool(tools, "WaitForMcpServers"):
            # Claude Code answers before its MCP servers connect and offers this tool to wait.
            found, stage, args = _find_tool(tools, "WaitForMcpServers"), "search", {}
        if found is None:
            print(f"mock_llm: MOCK-NO-TOOL {rule['tool']} (offered: {[t[0] for t in tools]})", file=sys.stderr)
            return self._text(f"MOCK-NO-TOOL {rule['tool']}")
        call_id = ("toolu_mock_" if dialect == "anthropic" else "call_mock_") + uuid.uuid4().hex[:20]
        self._calls[call_id] = {"rule": rule, "stage": stage, "name": found[1]}
        return {"type": "tool", "name": found[1], "namespace": found[2], "flat": found[0],
                "arguments": args, "call_id": call_id}

    def _follow_up(self, dialect, pending, tools):
        """Answer a request that carries tool results: the rule's `then`, or Qwen's real call."""
        calls = [self._calls.get(cid) for cid, _, _ in pending if cid in self._calls]
        if not calls:  # Gemini sends results without our ids: match on the tool name
            by_name = {c["name"]: c for c in self._calls.values()}
            calls = [by_name[name] for _, name, _ in pending if name in by_name]
        if not calls:
            return self._text(DEFAULT_THEN.replace("{result}", "\n".join(r[2] for r in pending))), None
        call = calls[-1]
        if call["stage"] == "search":
            return self._call_tool(dialect, call["rule"], tools, "", stage="searched"), call["rule"]
        result = "\n".join(r[2] for r in pending)
        return self._text(call["rule"]["then"].replace("{result}", result)), call["rule"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner = None  # the MockLLM, set on a per-server subclass

    def log_message(self, *args):
        pass

    def _handle(self):
        self.close_connection = True
        try:
            raw = self._read_body()
            body = json.loads(raw) if raw.strip() else None
        except (ValueError, OSError, EOFError):
            body = None
        try:
            self.owner._handle(self, body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                raw += self.rfile.read(size) if size else b""
                self.rfile.readline()
                if not size:
                    break
        else:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return gzip.decompress(raw) if self.headers.get("Content-Encoding", "").lower() == "gzip" else raw

    def _begin(self, content_type, length=None):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

    def send_json(self, payload, entry):
        data = json.dumps(payload).encode()
        entry["first_byte_at"] = time.time()
        self._begin("application/json", len(data))
        self.wfile.write(data)
        self.wfile.flush()
        entry["last_byte_at"] = time.time()

    def send_stream(self, events, entry, chunk_delay, stopping):
        entry["first_byte_at"] = time.time()
        self._begin("text/event-stream")
        for i, event in enumerate(events):
            if i and chunk_delay and stopping.wait(chunk_delay):
                return
            self.wfile.write(event)
            self.wfile.flush()
        entry["last_byte_at"] = time.time()


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description="Serve a fake LLM (Anthropic/OpenAI/Gemini dialects).")
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--rules", help='JSON list of reply() keyword objects, e.g. [{"match": "hi", '
                                    '"text": "hello"}]; add "regex": true to treat match as a regex')
    args = ap.parse_args(argv)
    mock = MockLLM(port=args.port)
    if args.rules:
        with open(args.rules) as f:
            for rule in json.load(f):
                if rule.pop("regex", False):
                    rule["match"] = re.compile(rule["match"])
                mock.reply(**rule)
    mock.on_request = lambda r: print(f"{time.strftime('%H:%M:%S')} {r['dialect']:16} {r['kind']:4} "
                                      f"{r['method']} {r['path']} user={r['user_text'][:70]!r} "
                                      f"-> {str(r['answer'])[:70]!r}", flush=True)
    mock.start()
    print(f"mock LLM listening on {mock.url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        mock.stop()


if __name__ == "__main__":
    main()
