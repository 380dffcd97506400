"""The REST API: routes and JSON as upstream, Host/Origin checks, 4xx for bad input."""
import threading
import time

from conftest import wait_for


def _create(server, name="api", profile="developer"):
    code, term = server.request("POST", f"/sessions?agent_profile={profile}&provider=demo"
                                         f"&session_name={name}")
    assert code == 201, term
    return term


def test_health_and_session_lifecycle(server):
    code, health = server.request("GET", "/health")
    assert code == 200 and health["status"] == "ok" and health["terminal_backend"] == "tmux"
    term = _create(server)
    assert term["session_name"] == "cao-api" and term["status"] == "idle"
    assert set(term) >= {"id", "name", "provider", "session_name", "agent_profile", "caller_id",
                         "allowed_tools", "status", "last_active"}
    code, sessions = server.request("GET", "/sessions")
    assert code == 200
    assert [(s["name"], s["status"], s["agent_profile"]) for s in sessions] == \
        [("cao-api", "detached", "developer")]

    code, worker = server.request("POST", "/sessions/cao-api/terminals",
                                  {"agent_profile": "reviewer", "provider": "demo",
                                   "caller_id": term["id"]})
    assert code == 201 and worker["caller_id"] == term["id"]
    code, terms = server.request("GET", "/sessions/cao-api/terminals")
    assert [t["id"] for t in terms] == [term["id"], worker["id"]]
    size = server.tmux("display-message", "-p", "-t", f"=cao-api:{worker['name']}",
                       "#{window_width}x#{window_height}").stdout.strip()
    assert size == "220x50"

    code, wd = server.request("GET", f"/terminals/{term['id']}/working-directory")
    assert (code, wd) == (200, {"working_directory": str(server.workdir)})

    code, _ = server.request("POST", f"/terminals/{term['id']}/input", {"message": "ping"})
    assert code == 200
    wait_for(lambda: server.request("GET", f"/terminals/{term['id']}")[1]["status"] == "completed",
             what="completed")
    code, full = server.request("GET", f"/terminals/{term['id']}/output?mode=full")
    assert code == 200 and "done: ping" in full["output"] and full["mode"] == "full"

    assert server.request("POST", f"/terminals/{worker['id']}/exit")[0] == 200
    wait_for(lambda: server.request("GET", f"/terminals/{worker['id']}")[1]["status"] == "error",
             what="exited worker to show error")
    code, body = server.request("POST", f"/terminals/{worker['id']}/input", {"message": "x"})
    assert code == 409 and "has exited" in body["detail"]

    code, deleted = server.request("DELETE", "/sessions/cao-api")
    assert (code, deleted) == (200, {"success": True, "deleted": ["cao-api"], "errors": []})
    assert server.request("GET", "/sessions")[1] == []
    assert server.tmux("has-session", "-t", "=cao-api").returncode != 0
    kinds = [e["kind"] for e in server.request("GET", "/events?after=0")[1]["events"]]
    assert kinds.count("session_created") == 1 and kinds.count("session_deleted") == 1


def test_terminal_env_and_key(server):
    term = _create(server, "keys")
    pid = server.tmux("display-message", "-p", "-t", f"=cao-keys:{term['name']}", "#{pane_pid}").stdout.strip()
    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    assert f"CAO_TERMINAL_ID={term['id']}".encode() in environ
    assert f"CAO_API_PORT={server.port}".encode() in environ
    assert server.request("POST", f"/terminals/{term['id']}/key?key=C-d")[0] == 200
    wait_for(lambda: server.request("GET", f"/terminals/{term['id']}")[1]["status"] == "error",
             what="Ctrl-D to end the demo agent")


def test_host_and_origin_checks(server):
    code, body = server.request("GET", "/sessions", headers={"Host": "evil.example:9889"})
    assert code == 400 and "host" in body["detail"].lower()
    for host in ("localhost", f"127.0.0.1:{server.port}", f"[::1]:{server.port}"):
        assert server.request("GET", "/health", headers={"Host": host})[0] == 200
    code, body = server.request("POST", "/sessions?agent_profile=developer&provider=demo",
                                headers={"Origin": "http://evil.example"})
    assert (code, body) == (403, {"detail": "Cross-origin request blocked"})
    assert server.request("GET", "/sessions")[1] == []  # nothing was created
    same = f"http://127.0.0.1:{server.port}"
    code, _ = server.request("DELETE", "/sessions/cao-none",
                             headers={"Origin": same, "Host": f"127.0.0.1:{server.port}"})
    assert code == 404  # same-origin passes the check and reaches the route
    assert server.request("GET", "/sessions", headers={"Origin": "http://evil.example"})[0] == 200


def test_bad_input_is_4xx_never_500(server):
    term = _create(server, "bad")
    tid = term["id"]
    cases = [
        ("POST", "/sessions", None, 400, "missing required parameter 'agent_profile'"),
        ("POST", "/sessions?agent_profile=../etc/passwd", None, 400, "invalid agent profile name"),
        ("POST", "/sessions?agent_profile=nope", None, 404, "not found"),
        ("POST", "/sessions?agent_profile=developer&provider=nope", None, 400, "unknown provider"),
        ("POST", "/sessions?agent_profile=developer&provider=demo&session_name=a:b", None, 400,
         "invalid session name"),
        ("POST", "/sessions?agent_profile=developer&provider=demo&session_name=bad", None, 409,
         "already exists"),
        ("POST", "/sessions?agent_profile=developer&provider=demo&working_directory=/etc", None, 400,
         "system directory"),
        ("POST", "/sessions?agent_profile=developer&provider=demo&working_directory=/nonexistent",
         None, 400, "does not exist"),
        ("POST", "/sessions/cao-nope/terminals?agent_profile=developer", None, 404, "not found"),
        ("POST", "/sessions/cao-bad/terminals?agent_profile=developer&caller_id=zz", None, 400,
         "invalid terminal id"),
        ("GET", "/terminals/ABC", None, 400, "invalid terminal id"),
        ("GET", "/terminals/abcdef12", None, 404, "not found"),
        ("GET", "/sessions/cao-nope", None, 404, "not found"),
        ("DELETE", "/terminals/abcdef12", None, 404, "not found"),
        ("POST", f"/terminals/{tid}/input", None, 400, "missing required parameter 'message'"),
        ("POST", f"/terminals/{tid}/input?message=", None, 400, "message is empty"),
        ("POST", f"/terminals/{tid}/input", {"message": 5}, 400, "'message' must be a string"),
        ("POST", f"/terminals/{tid}/key?key=rm%20-rf", None, 400, "unsupported key"),
        ("GET", f"/terminals/{tid}/output?mode=weird", None, 400, "unknown output mode"),
        ("GET", f"/terminals/{tid}/output?mode=last", None, 404, "no answer yet"),
        ("GET", "/events?wait=1000", None, 400, "out of range"),
        ("GET", "/events?after=x", None, 400, "must be a number"),
        ("PUT", "/sessions", None, 405, "not allowed"),
        ("GET", "/no/such/thing", None, 404, "no such endpoint"),
    ]
    for method, path, body, status, text in cases:
        code, payload = server.request(method, path, body)
        assert code == status, (method, path, code, payload)
        assert text in payload["detail"], (path, payload)
    # a body that is not JSON
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.port)
    conn.request("POST", f"/terminals/{tid}/input", body=b"{not json",
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 400 and b"not valid JSON" in resp.read()
    conn.close()
    assert server.request("GET", f"/terminals/{tid}")[1]["status"] == "idle"  # nothing changed


def test_events_long_poll_returns_when_an_event_arrives(server):
    cursor = server.request("GET", "/events")[1]["next"]
    result = {}

    def poll():
        started = time.monotonic()
        result["body"] = server.request("GET", f"/events?after={cursor}&wait=20")[1]
        result["elapsed"] = time.monotonic() - started

    waiter = threading.Thread(target=poll)
    waiter.start()
    _create(server, "ev")
    waiter.join(25)
    kinds = [e["kind"] for e in result["body"]["events"]]
    assert kinds[0] == "session_created" and result["elapsed"] < 15
    assert result["body"]["next"] == result["body"]["events"][-1]["seq"]
    code, later = server.request("GET", f"/events?after={cursor}")
    assert code == 200 and [e["kind"] for e in later["events"]][:2] == ["session_created",
                                                                        "terminal_created"]


def test_profiles_and_providers(server):
    profiles = {p["name"]: p for p in server.request("GET", "/agents/profiles")[1]}
    assert {"code_supervisor", "developer", "reviewer"} <= set(profiles)
    providers = server.request("GET", "/agents/providers")[1]
    demo = [p for p in providers if p["name"] == "demo"][0]
    assert demo["installed"] is True


def test_an_agent_that_dies_silently_shows_error(server):
    term = _create(server, "silent")
    pid = int(server.tmux("display-message", "-p", "-t", f"=cao-silent:{term['name']}",
                          "#{pane_pid}").stdout.strip())
    import os
    import signal
    os.kill(pid, signal.SIGKILL)  # no output at all on the way out
    wait_for(lambda: server.request("GET", f"/terminals/{term['id']}")[1]["status"] == "error",
             what="status error after the agent was killed")
