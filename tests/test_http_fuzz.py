"""Fuzzing the HTTP server over raw sockets. Seeded, so a failure replays: the seed is
in the assertion message, and CAO_FUZZ_SEED=<seed> reruns that case first.

1. Framing: pipelined requests, bodies that are themselves requests, bad framing.
   No request may run after a refusal: the refusal is the last answer on its
   connection, which then closes, and no smuggled request leaves a trace.
2. Parameters: every route with odd values, in the query or a JSON body. Every
   answer is JSON, and none is a 500."""
import json
import os
import random
from urllib.parse import quote, urlencode

from raw_http import exchange, request_bytes, responses

CASES = int(os.environ.get("CAO_FUZZ_CASES") or 400)
JSON = ("Content-Type", "application/json")
BAD_HOSTS = ["evil.example", "localhost:9889@evil", "[::1]evil.com", "localhost:abc", "",
             "127.0.0.1:99999", "localhost.", "localhost localhost", "*"]
BAD_LENGTHS = ["-1", "+5", "5, 5", "0x10", "1e3", " ", "²", "1²", "99999999999999999"]


def _seeds():
    base = [int(os.environ["CAO_FUZZ_SEED"])] if os.environ.get("CAO_FUZZ_SEED") else []
    return base + list(range(1000, 1000 + CASES))


def _case_headers(rng, headers):
    """Header names in random case, with unrelated headers mixed in."""
    mixed = [("".join(c.upper() if rng.random() < 0.5 else c.lower() for c in n), v)
             for n, v in headers]
    for _ in range(rng.randint(0, 2)):
        mixed.insert(rng.randint(0, len(mixed)), (f"X-Fuzz-{rng.randint(0, 99)}", "1"))
    return mixed


def _smuggled(rng, port, mark):
    """Bytes of a request that leaves a trace (a session, or a victim's message) if run."""
    kind = rng.choice(["session", "message", "delete"])
    if kind == "session":
        data = request_bytes("POST", f"/sessions?agent_profile=developer&provider=demo"
                                     f"&session_name=fz{mark}", port, [("Content-Length", "0")])
    elif kind == "message":
        body = json.dumps({"sender_id": "fuzz", "message": f"SMUGGLED {mark}"}).encode()
        data = request_bytes("POST", "/terminals/{victim}/inbox/messages", port, [JSON], body)
    else:
        data = request_bytes("DELETE", "/sessions/cao-victim", port)
    if rng.random() < 0.3:
        data = data.replace(b"\r\n", b"\n")
    return data


def _refused(rng, port, inner):
    """(request bytes carrying inner, allowed statuses) for one kind of refusal."""
    kind = rng.randrange(13)
    post = lambda headers, body=inner, target="/sessions", host=None, method="POST": \
        request_bytes(method, target, port, _case_headers(rng, headers), body, host=host)
    if kind == 0:
        origin = rng.choice(["http://evil.example", "null", "http://127.0.0.1.evil.example",
                             f"http://localhost:{port}.evil", "file://"])
        ctype = rng.choice(["text/plain", "application/json", "multipart/form-data; boundary=x"])
        return post([("Origin", origin), ("Content-Type", ctype)]), {403}
    if kind == 1:
        return post([JSON], target=rng.choice(["/nope", "/sessions/x/y/z", "/terminals/x/y"])), {404}
    if kind == 2:
        return post([JSON], method=rng.choice(["PUT", "PATCH"])), {405}
    if kind == 3:
        return post([JSON, ("Content-Length", str(rng.randint(1 << 20 | 1, 1 << 30)))],
                    body=b"") + inner, {413}
    if kind == 4:
        return request_bytes(rng.choice(["GET", "HEAD"]), rng.choice(["/health", "/sessions", "/"]),
                             port, _case_headers(rng, []), inner), {400}
    if kind == 5:
        ctype = rng.choice([None, "text/plain", "application/x-www-form-urlencoded"])
        return post([("Content-Type", ctype)] if ctype else []), {415}
    if kind == 6:
        return post([JSON, ("Content-Length", rng.choice(BAD_LENGTHS))], body=b"") + inner, {400}
    if kind == 7:
        return post([JSON, ("Content-Length", "0"), ("Content-Length", str(len(inner)))]), {400}
    if kind == 8:
        te = rng.choice(["chunked", "gzip, chunked", "identity", " chunked"])
        chunked = b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n"
        extra = [("Content-Length", str(len(chunked)))] if rng.random() < 0.5 else []
        return post([JSON, ("Transfer-Encoding", te)] + extra, body=chunked), {501}
    if kind == 9:
        return post([JSON], host=rng.choice(BAD_HOSTS)), {400}
    if kind == 10:
        return post([JSON, ("Host", "evil.example")]), {400}
    if kind == 11:
        method = rng.choice(["FOO", "OPTIONS", "TRACE", "CONNECT"])
        return post([JSON], method=method), {501}
    first = rng.choice([b"GET / HTTP/9.9", b"POST /sessions HTTP/1.x", b"POST / HTTP/1.1 x",
                        b"GET http://evil/sessions HTTP/1.1", b"POST\t/sessions\tHTTP/1.1 z"])
    return first + b"\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(inner) + inner, \
        {400, 505}


def _victim(server):
    code, term = server.request("POST", "/sessions?agent_profile=developer&provider=demo"
                                          "&session_name=victim")
    assert code == 201, term
    return term["id"]


def test_no_request_runs_after_a_refusal(server):
    victim = _victim(server)
    port = server.port
    for seed in _seeds():
        rng = random.Random(seed)
        inner = _smuggled(rng, port, seed).replace(b"{victim}", victim.encode())
        prefix_count = rng.choice([0, 0, 1, 2])
        prefix = b"".join(request_bytes("GET", "/health", port) for _ in range(prefix_count))
        outer, statuses = _refused(rng, port, inner)
        data = prefix + outer + (inner if rng.random() < 0.5 else b"")
        chunks = sorted(rng.sample(range(1, len(data)), min(3, len(data) - 1))) \
            if rng.random() < 0.3 else None
        sizes = [b - a for a, b in zip([0] + chunks, chunks)] if chunks else None
        raw, closed = exchange(port, data, chunks=sizes)
        answers = [a for a in responses(raw) if a[0] != 100]
        codes = [a[0] for a in answers]
        assert codes[:prefix_count] == [200] * prefix_count, (seed, codes)
        assert len(codes) == prefix_count + 1 and codes[-1] in statuses, (seed, codes, data[:400])
        assert closed, (seed, "connection left open after a refusal")
        if not outer.startswith(b"HEAD "):  # an answer to HEAD has no body
            assert json.loads(answers[-1][2])["detail"], seed
    sessions = [s["name"] for s in server.request("GET", "/sessions")[1]]
    assert sessions == ["cao-victim"], sessions
    messages = server.request("GET", f"/terminals/{victim}/inbox/messages?limit=100")[1]
    assert messages == [], messages


ROUTES = [("POST", "/sessions"), ("GET", "/sessions/{name}"), ("DELETE", "/sessions/{name}"),
          ("POST", "/sessions/{name}/terminals"), ("GET", "/sessions/{name}/terminals"),
          ("GET", "/terminals/{id}"), ("DELETE", "/terminals/{id}"),
          ("POST", "/terminals/{id}/input"), ("GET", "/terminals/{id}/output"),
          ("POST", "/terminals/{id}/exit"), ("POST", "/terminals/{id}/key"),
          ("POST", "/terminals/{id}/signal"), ("GET", "/terminals/{id}/working-directory"),
          ("POST", "/terminals/{id}/inbox/messages"), ("GET", "/terminals/{id}/inbox/messages"),
          ("GET", "/agents/profiles/{profile}"), ("GET", "/events")]
PARAMS = ["agent_profile", "provider", "session_name", "working_directory", "allowed_tools",
          "caller_id", "message", "mode", "key", "status", "sender_id", "limit", "after", "wait",
          "initial_message"]


def _odd_value(rng):
    return rng.choice([
        "", " ", "\x00", "../../etc/passwd", "/etc", "a" * 300, "é✓\u202e", "%00", "-1", "nan",
        "1e400", "9" * 40, "0x10", "true", "null", "*", "@cao-mcp-server", "developer", "demo",
        "cao-victim", "abcdef12", "C-c", "idle", "last", rng.randint(-2**63, 2**63), -0.0,
        1e308, True, None, [], ["*"], [1, "x"], {}, {"a": [1]}, [[[[]]]]])


def _odd_segment(rng, victim):
    return quote(rng.choice(["cao-victim", "victim", "cao-nope", victim, "abcdef12", "ABC", "..", "%2e%2e",
                       "x" * 100, "%00", "%ff%fe", "a%2Fb", "cao-", "é", "developer", "nope-x"]), safe="%")


def test_odd_parameters_get_json_answers_and_never_a_500(server):
    victim = _victim(server)
    port = server.port
    for seed in _seeds():
        rng = random.Random(seed)
        method, template = rng.choice(ROUTES)
        path = template.format(name=_odd_segment(rng, victim), id=_odd_segment(rng, victim),
                               profile=_odd_segment(rng, victim))
        chosen = {p: _odd_value(rng) for p in rng.sample(PARAMS, rng.randint(0, 4))}
        if method == "POST" and "agent_profile" in chosen:  # never start a real agent
            chosen["agent_profile"] = rng.choice(["nope-x", "../x", "", 5])
        in_query = method != "POST" or rng.random() < 0.5
        if in_query:
            query = urlencode({k: v if isinstance(v, str) else json.dumps(v)
                               for k, v in chosen.items()})
            data = request_bytes(method, path + ("?" + query if query else ""), port,
                                 [("Connection", "close")])
        else:
            body = json.dumps(chosen).encode()
            data = request_bytes(method, path, port, [JSON, ("Connection", "close")], body)
        raw, _ = exchange(port, data, timeout=30)
        answers = responses(raw)
        assert len(answers) == 1, (seed, raw[:300])
        status, headers, body = answers[0]
        assert status != 500 and headers.get("content-type") == "application/json", \
            (seed, method, path, chosen, status, body[:300])
        if status >= 400:
            assert json.loads(body)["detail"], seed
    sessions = [s["name"] for s in server.request("GET", "/sessions")[1]]
    assert set(sessions) <= {"cao-victim"}, sessions
