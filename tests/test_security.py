"""What the server and CLI promise an attacker on the same machine (docs/security.md):
no request runs out of a refused one's body, no file outside cao's folders, no
working directory in a system tree, no CLI call that does more than was asked, and
a server that hostile connections cannot hold or crash."""
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CAO, CaoEnv, kill_pid, wait_for
from raw_http import exchange, request_bytes, responses


def _smuggled(port, name="smuggled"):
    """A complete request that would create session cao-<name> if it ever ran."""
    return request_bytes("POST", f"/sessions?agent_profile=developer&provider=demo"
                                 f"&session_name={name}", port, [("Content-Length", "0")])


def _no_session(server, name="smuggled"):
    return server.request("GET", f"/sessions/cao-{name}")[0] == 404


# -- 1. a refused request's body never runs -------------------------------------

def _refusals(port, inner):
    """(label, bytes, expected status): requests the server refuses, each carrying
    a full request in its body or right after its headers."""
    json_type = ("Content-Type", "application/json")
    return [
        ("cross-origin text/plain", request_bytes(
            "POST", "/sessions", port, [("Origin", "http://evil.example"),
                                        ("Content-Type", "text/plain")], inner), 403),
        ("unknown path", request_bytes("POST", "/nope", port, [json_type], inner), 404),
        ("wrong method", request_bytes("PUT", "/sessions", port, [json_type], inner), 405),
        ("body over the limit", request_bytes(
            "POST", "/sessions", port, [json_type, ("Content-Length", str(2 << 20))]) + inner, 413),
        ("GET with a body", request_bytes("GET", "/health", port, [], inner), 400),
        ("form body", request_bytes(
            "POST", "/sessions", port, [("Content-Type", "application/x-www-form-urlencoded")],
            inner), 415),
        ("two Content-Lengths", request_bytes(
            "POST", "/sessions", port, [json_type, ("Content-Length", "0"),
                                        ("Content-Length", str(len(inner)))], inner), 400),
        ("chunked", request_bytes(
            "POST", "/sessions", port, [json_type, ("Transfer-Encoding", "chunked")],
            b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n"), 501),
        ("bad host", request_bytes("POST", "/sessions", port, [json_type], inner,
                                   host="evil.example"), 400),
        ("unsupported method", request_bytes("FOO", "/sessions", port, [json_type], inner), 501),
    ]


def test_a_refused_requests_body_never_runs_as_a_request(server):
    inner = _smuggled(server.port)
    for label, data, status in _refusals(server.port, inner):
        raw, closed = exchange(server.port, data)
        answers = responses(raw)
        assert [a[0] for a in answers] == [status], (label, raw[:300])
        assert closed, f"{label}: the connection stayed open after a refusal"
        assert "detail" in json.loads(answers[0][2]), label
    assert _no_session(server), "a request hidden in a refused body created a session"
    assert server.request("GET", "/sessions")[1] == []


def test_pipelined_requests_still_work(server):
    port = server.port
    body = json.dumps({"sender_id": "x"}).encode()
    data = (request_bytes("GET", "/health", port) +
            request_bytes("POST", "/terminals/abcdef12/inbox/messages", port,
                          [("Content-Type", "application/json")], body) +
            request_bytes("GET", "/sessions", port, [("Connection", "close")]))
    raw, closed = exchange(port, data)
    assert [a[0] for a in responses(raw)] == [200, 400, 200] and closed


def test_expect_continue_is_not_answered_for_a_refused_request(server):
    data = request_bytes("POST", "/sessions", server.port,
                         [("Origin", "http://evil.example"), ("Content-Type", "application/json"),
                          ("Expect", "100-continue"), ("Content-Length", "10")])
    raw, closed = exchange(server.port, data)
    assert [a[0] for a in responses(raw)] == [403] and closed


# -- 2. files outside cao's folders ----------------------------------------------

def test_profile_symlinks_out_of_cao_are_not_followed(server, tmp_path):
    secret = tmp_path / "secret.md"
    secret.write_text("---\nname: leak\n---\nTOP-SECRET-LINE\n")
    store = server.home / "agent-store"
    (store / "leak.md").symlink_to(secret)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "agent.md").write_text(secret.read_text())
    (store / "leakdir").symlink_to(tmp_path / "outside")
    os.mkfifo(store / "fifo.md")
    for name in ("leak", "leakdir"):
        code, body = server.request("GET", f"/agents/profiles/{name}", timeout=10)
        assert code == 400 and "leads out of" in body["detail"], body
        assert "TOP-SECRET" not in json.dumps(body)
    code, body = server.request("GET", "/agents/profiles/fifo", timeout=10)
    assert code == 400 and "not a regular file" in body["detail"]
    listed = {p["name"]: p for p in server.request("GET", "/agents/profiles", timeout=10)[1]}
    assert "leads out of" in listed["leak"]["error"] and "TOP-SECRET" not in json.dumps(listed)
    code, body = server.request("POST", "/sessions?agent_profile=leak&provider=demo")
    assert code == 400 and server.request("GET", "/sessions")[1] == []
    # A link that stays inside cao's folders is fine.
    (store / "alias.md").symlink_to(store.parent / "agent-context" / "alias-target.md")
    (store.parent / "agent-context" / "alias-target.md").write_text("---\nname: alias\n---\nok\n")
    assert server.request("GET", "/agents/profiles/alias")[0] == 200


def test_install_never_writes_through_a_planted_link(cao_env, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    source = tmp_path / "mine.md"
    source.write_text("---\nname: mine\n---\nmy agent\n")
    for folder in ("agent-store", "agent-context"):
        (cao_env.home / folder).mkdir(parents=True)
        for planted in ("developer.tmp", "mine.tmp", "mine.md"):  # temp names and the target
            (cao_env.home / folder / planted).symlink_to(victim)
    for source_arg in ("developer", str(source)):
        result = cao_env.run("install", source_arg)
        assert result.returncode == 0, result.stderr
    assert victim.read_text() == "untouched"
    for folder in ("agent-store", "agent-context"):
        installed = cao_env.home / folder / "mine.md"
        assert installed.is_file() and not installed.is_symlink()
        assert "my agent" in installed.read_text()
    # A whole folder that leads out of cao's home is refused, not written into.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (cao_env.home / "agent-context").rename(tmp_path / "old-context")
    (cao_env.home / "agent-context").symlink_to(outside)
    result = cao_env.run("install", "reviewer")
    assert result.returncode == 1 and "leads out of" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and list(outside.iterdir()) == []


def test_working_directories_in_system_trees_are_refused(cao_env, tmp_path):
    home = tmp_path / "home"
    (home / ".cache").mkdir(parents=True)
    (home / "code").mkdir()
    (tmp_path / "project" / "etc-link").symlink_to("/etc/ssh" if os.path.isdir("/etc/ssh") else "/etc")
    cao_env.env["HOME"] = str(home)
    cao_env.start_server()
    refused = ["/etc", "/etc/ssh", "/var/log", "/usr/local", "/usr/lib", "/proc/self", "/", "/tmp",
               str(home / ".cache"), str(tmp_path / "project" / "etc-link"), str(cao_env.home / "db")]
    for path in refused:
        if not os.path.isdir(path):
            continue
        code, body = cao_env.request("POST", "/sessions", {
            "agent_profile": "developer", "provider": "demo", "working_directory": path})
        assert code == 400 and "use a project directory" in body["detail"], (path, body)
    assert cao_env.request("GET", "/sessions")[1] == []
    for name, path in (("homedir", home), ("code", home / "code"), ("proj", cao_env.workdir)):
        code, term = cao_env.request("POST", "/sessions", {
            "agent_profile": "developer", "provider": "demo", "working_directory": str(path),
            "session_name": name})
        assert code == 201, (path, term)


def test_a_working_directory_name_never_runs_as_a_tmux_command(server):
    marker = Path(str(server.home) + ".pwned")  # $CAO_HOME_DIR, expanded by the shell
    odd = server.workdir / "#(touch $CAO_HOME_DIR.pwned)#{pane_id}"
    odd.mkdir()
    code, term = server.request("POST", "/sessions", {
        "agent_profile": "developer", "provider": "demo", "working_directory": str(odd),
        "session_name": "odd"})
    assert code == 201, term
    pid = server.tmux("display-message", "-p", "-t", "=cao-odd:", "#{pane_pid}").stdout.strip()
    assert not marker.exists(), "tmux ran a command named in the directory"
    assert os.readlink(f"/proc/{pid}/cwd") == str(odd)
    # The same through a profile's free-text name, which becomes the window name.
    (server.home / "agent-store").mkdir(exist_ok=True)
    (server.home / "agent-store" / "named.md").write_text(
        '---\nname: "#(touch $CAO_HOME_DIR.pwned)"\n---\nhello\n')
    code, term = server.request("POST", "/sessions?agent_profile=named&provider=demo")
    assert code == 201 and not marker.exists(), term


# -- 3. the CLI does what was asked, or says why not -----------------------------

def test_shutdown_with_an_empty_or_unknown_name_shuts_nothing(server):
    assert server.run("launch", "--agents", "developer", "--provider", "demo", "--headless",
                      "--session-name", "keep").returncode == 0
    for name in ("", "nosuch"):
        result = server.run("shutdown", "--session", name)
        assert result.returncode != 0 and result.stderr.count("\n") == 1, result
        assert "Traceback" not in result.stderr
    assert server.request("GET", "/sessions/cao-keep")[0] == 200
    for args in (["--session-name", ""], ["--working-directory", ""], ["--provider", ""]):
        result = server.run("launch", "--agents", "developer", "--headless", *args)
        assert result.returncode == 2 and "empty value" in result.stderr
    assert [s["name"] for s in server.request("GET", "/sessions")[1]] == ["cao-keep"]


def test_session_send_puts_the_message_in_the_body(server, monkeypatch, capsys):
    assert server.run("launch", "--agents", "developer", "--provider", "demo", "--headless",
                      "--session-name", "big").returncode == 0
    long_text = "long message\n" + "x" * 100_000  # over the 64 KiB a request line may hold
    sent = server.run("session", "send", "cao-big", long_text, "--async")
    assert sent.returncode == 0, sent.stderr
    term = server.request("GET", "/sessions/cao-big")[1]["terminals"][0]
    try:
        wait_for(lambda: server.request("GET", f"/terminals/{term['id']}")[1]["status"]
                 == "completed", 60, what="the long message answered")
    except AssertionError as e:
        status = server.request("GET", f"/terminals/{term['id']}")[1]["status"]
        screen = server.tmux("capture-pane", "-p", "-t", f"=cao-big:{term['name']}").stdout
        raise AssertionError(f"{e}; status {status}, screen ends {screen.strip()[-300:]!r}")
    code, out = server.request("GET", f"/terminals/{term['id']}/output?mode=last")
    assert out["output"] == "done: long message"
    # Past the limit: one line from the CLI (argv cannot carry 300 KB, so call main()).
    import cao
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    assert cao.main(["session", "send", "cao-big", "y" * 300_000]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "over the limit" in err and "<" not in err
    # Upstream's clients put the message in the query; that still works.
    code, _ = server.request("POST", f"/terminals/{term['id']}/input?message=short")
    assert code == 200
    code, body = server.request("POST", f"/terminals/{term['id']}/input",
                                {"message": "z" * 300_000})
    assert code == 413 and "over the limit" in body["detail"]


def test_bad_arguments_are_one_line_errors_not_tracebacks(cao_env):
    for args in ([b"session", b"status", b"\xff\xfe"], ["server", "--port", "99999"],
                 ["server", "--port", "0"], ["launch", "--agents", "developer", "--timeout", "nan"],
                 ["shutdown", "--session", ""]):
        result = subprocess.run([*CAO, *args], env=cao_env.env, capture_output=True, timeout=30)
        err = result.stderr.decode("utf-8", "replace")
        assert result.returncode == 2, (args, err)
        assert "Traceback" not in err and err.count("\n") == 1, (args, err)


# -- 4. the HTTP server under hostile clients ------------------------------------

@pytest.fixture
def quick_server(cao_env):
    cao_env.env["CAO_HTTP_REQUEST_TIMEOUT"] = "1"
    cao_env.start_server()
    return cao_env


def _closed_by_server(sock):
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""  # EOF (a 408-style answer would be data)
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_slow_and_silent_connections_are_dropped_and_health_answers(quick_server):
    port = quick_server.port
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    try:
        started = time.monotonic()
        for s in slow:
            s.sendall(b"G")
        assert quick_server.request("GET", "/health", timeout=2)[0] == 200
        for s in slow:  # one more byte each: the request still may not take longer in total
            try:
                s.sendall(b"E")
            except OSError:
                pass
        wait_for(lambda: all(_closed_by_server(s) for s in silent + slow), 10,
                 what="the server to drop connections that did not send a request in time")
        assert time.monotonic() - started < 10
        assert quick_server.request("GET", "/health", timeout=2)[0] == 200
    finally:
        for s in silent + slow:
            s.close()


def test_idle_connections_make_room_for_new_clients(server):
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(140)]
    try:
        for _ in range(5):  # every request gets through, the oldest idle ones are dropped
            assert server.request("GET", "/health", timeout=5)[0] == 200
        wait_for(lambda: sum(_closed_by_server(s) for s in held) >= 12, 10,
                 what="the oldest idle connections to be dropped for room")
        assert not _closed_by_server(held[-1])  # the newest are kept
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize("host", ["localhost:9889@evil.example", "[::1]evil.com", "localhost:abc",
                                  "localhost:99999", "127.0.0.1.evil.example", "localhost:",
                                  "evil.example#localhost", "LOCALHOST:1:2", ""])
def test_loose_host_headers_are_refused(server, host):
    raw, closed = exchange(server.port, request_bytes("GET", "/sessions", server.port, host=host))
    [(status, _, body)] = responses(raw)
    assert status == 400 and "Invalid host header" in json.loads(body)["detail"] and closed


def test_two_host_headers_are_refused(server):
    data = request_bytes("GET", "/sessions", server.port, [("Host", "evil.example")])
    raw, closed = exchange(server.port, data)
    assert [a[0] for a in responses(raw)] == [400] and closed
    for host in ("LocalHost", f"localhost:{server.port}", "127.0.0.1", f"[::1]:{server.port}"):
        raw, _ = exchange(server.port, request_bytes("GET", "/health", server.port,
                                                     [("Connection", "close")], host=host))
        assert responses(raw)[0][0] == 200, host


@pytest.mark.parametrize("data,status", [
    (b"FOO / HTTP/1.1\r\nHost: localhost\r\n\r\n", 501),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"X-A: b\r\n" * 120 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/9.9\r\nHost: localhost\r\n\r\n", 505),
    (b"GET / HTTP/1.x\r\nHost: localhost\r\n\r\n", 400),
    (b"GET / HTTP/1.1 extra\r\nHost: localhost\r\n\r\n", 400),
    (b"GET http://evil.example/sessions HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
])
def test_the_standard_librarys_errors_are_json(server, data, status):
    raw, closed = exchange(server.port, data)
    [(code, headers, body)] = responses(raw)
    assert code == status and headers["content-type"] == "application/json" and closed
    assert json.loads(body)["detail"]


def test_clients_that_vanish_leave_no_traceback(cao_env):
    proc = cao_env.start_server()
    linger = (1).to_bytes(4, "little") + (0).to_bytes(4, "little")  # close with RST
    for target in ("/health", "/agents/profiles", "/events?wait=0.2", "/"):
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", cao_env.port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            s.sendall(request_bytes("GET", target, cao_env.port))
            s.close()
    for target in ("/health", "/terminals/abcdef12"):  # read the answer, then reset
        s = socket.create_connection(("127.0.0.1", cao_env.port))
        s.sendall(request_bytes("GET", target, cao_env.port))
        wait_for(lambda: s.recv(65536), 5, what="an answer")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.close()
    assert cao_env.healthy()
    cao_env.servers.remove(proc.pid)
    kill_pid(proc.pid, signal.SIGTERM)
    output = proc.stdout.read().decode(errors="replace")
    assert "Traceback" not in output and "Error" not in output, output


def test_bad_security_settings_stop_the_server(tmp_path):
    env = CaoEnv(tmp_path)
    try:
        for name, value in (("CAO_ALLOWED_HOSTS", "*"), ("CAO_ALLOWED_HOSTS", "evil.example/x"),
                            ("CAO_CORS_ORIGINS", "evil.example"),
                            ("CAO_HTTP_REQUEST_TIMEOUT", "0")):
            env.env[name] = value
            result = env.run("server", "--port", str(env.port), timeout=30)
            del env.env[name]
            assert result.returncode == 1 and name in result.stderr, (name, value, result.stderr)
            assert "Traceback" not in result.stderr
    finally:
        env.cleanup()


# -- 5. tool restrictions fail closed -----------------------------------------------

def _profile(env, name, front):
    (env.home / "agent-store").mkdir(parents=True, exist_ok=True)
    (env.home / "agent-store" / f"{name}.md").write_text(f"---\nname: {name}\n{front}---\nhi\n")


def test_unknown_roles_and_tool_names_are_errors_never_no_restriction(server):
    _profile(server, "scout", "role: workflow_scout\n")
    _profile(server, "mystery", "role: nosuch\n")
    _profile(server, "oddtools", "allowedTools: [fs_read, Bash]\n")
    code, term = server.request("POST", "/sessions?agent_profile=scout&provider=demo&session_name=s1")
    assert code == 201 and term["allowed_tools"] == ["@builtin", "fs_read", "execute_bash",
                                                     "@cao-mcp-server"]
    for profile, text in (("mystery", "unknown role 'nosuch'"), ("oddtools", "unknown tool 'Bash'")):
        code, body = server.request("POST", f"/sessions?agent_profile={profile}&provider=demo")
        assert code == 400 and text in body["detail"], body
    for tools in ("read,grep", "fs_read,rm -rf", ""):
        code, body = server.request("POST", "/sessions", {
            "agent_profile": "developer", "provider": "demo", "allowed_tools": tools})
        assert code == 400, (tools, body)
    # A worker started by handoff/assign goes through the same check.
    code, worker = server.request("POST", "/sessions/cao-s1/terminals?agent_profile=mystery"
                                          "&provider=demo")
    assert code == 400 and "unknown role" in worker["detail"]
    assert [s["name"] for s in server.request("GET", "/sessions")[1]] == ["cao-s1"]
    code, term = server.request("POST", "/sessions", {
        "agent_profile": "developer", "provider": "demo", "session_name": "s2",
        "allowed_tools": "fs_read,fs_list,@cao-mcp-server"})
    assert code == 201 and term["allowed_tools"] == ["fs_read", "fs_list", "@cao-mcp-server"]


def test_custom_roles_come_from_settings_in_both_shapes(server):
    import json as _json
    _profile(server, "auditor", "role: auditor\n")
    _profile(server, "legacy", "role: legacy_reader\n")
    for settings, expected in (
            ({"agents": {"roles": {"auditor": ["fs_read", "fs_list"]}}}, {"auditor": ["fs_read", "fs_list"]}),
            ({"roles": {"legacy_reader": ["fs_read"]}}, {"legacy": ["fs_read"]})):
        (server.home / "settings.json").write_text(_json.dumps(settings))
        for profile, tools in expected.items():
            code, term = server.request("POST", f"/sessions?agent_profile={profile}&provider=demo")
            assert code == 201 and term["allowed_tools"] == tools, term
    for bad, text in (({"agents": {"roles": {"auditor": "fs_read"}}}, "agents.roles.auditor must be"),
                      ({"agents": {"roles": {"auditor": ["Read"]}}}, "unknown tool 'Read'"),
                      ({"roles": ["auditor"]}, "roles must map role names"),
                      ({"agents": "x"}, '"agents" must be an object')):
        (server.home / "settings.json").write_text(_json.dumps(bad))
        code, body = server.request("POST", "/sessions?agent_profile=auditor&provider=demo")
        assert code == 400 and text in body["detail"], (bad, body)
