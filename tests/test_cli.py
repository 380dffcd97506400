"""End to end through the CLI: launch, status, send, shutdown, restore, errors."""
import json

from conftest import CAO, pid_alive, wait_for


def test_launch_headless_demo_answers_and_shutdown_leaves_nothing(cao_env):
    # No server runs yet: launch must start one in the background and say so.
    launched = cao_env.run("launch", "--agents", "developer", "--provider", "demo",
                           "--headless", "--session-name", "e2e", "hello from the test")
    assert launched.returncode == 0, launched.stderr
    assert "started it in the background" in launched.stderr
    assert "Session created: cao-e2e" in launched.stdout
    assert launched.stdout.rstrip().endswith("done: hello from the test")

    status = cao_env.run("session", "status", "cao-e2e", "--workers")
    assert status.returncode == 0, status.stderr
    assert "status=completed" in status.stdout
    assert "done: hello from the test" in status.stdout

    code, info = cao_env.request("GET", "/sessions/cao-e2e")
    assert code == 200
    terminal = info["terminals"][0]
    code, out = cao_env.request("GET", f"/terminals/{terminal['id']}/output?mode=last")
    assert (code, out) == (200, {"output": "done: hello from the test", "mode": "last"})

    server_pid = json.loads((cao_env.home / "server.json").read_text())["pid"]
    agent_pids = cao_env.tmux_pids()
    assert agent_pids and pid_alive(server_pid)

    down = cao_env.run("shutdown", "--all")
    assert down.returncode == 0, down.stderr
    assert "Shut down cao-e2e" in down.stdout
    assert "Stopped the background cao-server" in down.stdout
    assert cao_env.tmux("has-session", "-t", "=cao-e2e").returncode != 0
    wait_for(lambda: not pid_alive(server_pid), 5, what="server exit")
    for pid in agent_pids:
        wait_for(lambda: not pid_alive(pid), 5, what=f"process {pid} to exit")


def test_session_send_and_list(server):
    assert server.run("launch", "--agents", "reviewer", "--provider", "demo", "--headless",
                      "--session-name", "s1").returncode == 0
    listed = server.run("session", "list", "--json")
    rows = json.loads(listed.stdout)
    assert [(r["session"], r["status"], r["terminals"]) for r in rows] == [("cao-s1", "idle", 1)]

    sent = server.run("session", "send", "cao-s1", "first task\nwith a second line")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "done: first task"
    again = server.run("session", "send", "s1", "second task")
    assert again.stdout.strip() == "done: second task"

    fired = server.run("session", "send", "cao-s1", "third", "--async")
    assert fired.returncode == 0 and "Sent to terminal" in fired.stdout
    tid = rows[0]["conductor"]
    wait_for(lambda: server.request("GET", f"/terminals/{tid}")[1]["status"] == "completed",
             what="async send to complete")
    assert server.request("GET", f"/terminals/{tid}/output?mode=last")[1]["output"] == "done: third"


def _slow_agent_session(cao_env, name):
    cao_env.env["CAO_DEMO_DELAY"] = "30"  # the agents inherit the server's CAO_* environment
    cao_env.start_server()
    cao_env.run("launch", "--agents", "developer", "--provider", "demo", "--headless",
                "--session-name", name)
    return cao_env


def test_session_send_refuses_a_busy_agent(cao_env):
    server = _slow_agent_session(cao_env, "busy")
    tid = server.request("GET", "/sessions/cao-busy")[1]["terminals"][0]["id"]
    assert server.run("session", "send", "cao-busy", "long job", "--async").returncode == 0
    refused = server.run("session", "send", "cao-busy", "more")
    assert refused.returncode == 1
    assert f"terminal {tid} is processing" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_send_timeout_is_reported(cao_env):
    server = _slow_agent_session(cao_env, "slow")
    result = server.run("session", "send", "cao-slow", "job", "--timeout", "0.5")
    assert result.returncode == 4  # EXIT_TIMEOUT: docs/cli.md, "Exit codes"
    assert "timed out after 0.5 s" in result.stderr


def test_terminal_restore_reopens_scrollback(server):
    server.run("launch", "--agents", "developer", "--provider", "demo", "--headless",
               "--session-name", "r", "remember me")
    terms = server.request("GET", "/sessions/cao-r")[1]["terminals"]
    code, worker = server.request("POST", "/sessions/cao-r/terminals?agent_profile=reviewer&provider=demo")
    assert code == 201
    assert server.request("DELETE", f"/terminals/{worker['id']}")[0] == 200
    snap = json.loads((server.home / "logs" / "terminal" / f"{worker['id']}.snapshot.json").read_text())
    assert snap["agent_profile"] == "reviewer" and snap["session_name"] == "cao-r"
    restored = server.run("terminal", "restore", worker["id"])
    assert restored.returncode == 0, restored.stderr
    window = f"restored-{worker['name']}"
    wait_for(lambda: "cao demo agent (profile: reviewer)" in server.tmux(
        "capture-pane", "-p", "-S", "-", "-t", f"=cao-r:{window}").stdout, what="restored scrollback")
    assert terms[0]["id"] != worker["id"]


def test_bad_input_gives_one_line_errors(cao_env):
    cases = [
        (["launch", "--agents", "no such"], "invalid agent profile name"),
        (["launch", "--agents", "developer", "--async"], "--async needs a MESSAGE"),
        (["session", "send", "x", "msg", "--timeout", "-3"], "not a positive number"),
        (["terminal", "restore", "XYZ"], "invalid terminal id"),
        (["terminal", "restore", "abcdef12"], "no snapshot for terminal abcdef12"),
        (["session", "list"], "cao-server is not running"),
        (["install", "./missing.md"], "does not exist"),
        (["install", "nosuch"], "no built-in or installed profile named 'nosuch'"),
        (["install", "https://evil.example/x.md"], "must be https on"),
    ]
    for args, expected in cases:
        result = cao_env.run(*args)
        assert result.returncode != 0, args
        assert expected in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_install_local_profile_and_launch_it(server, tmp_path):
    profile = tmp_path / "helper.md"
    profile.write_text("---\nname: helper\ndescription: a helper\nprovider: demo\n---\nBe helpful.\n")
    installed = server.run("install", str(profile))
    assert installed.returncode == 0, installed.stderr
    assert (server.home / "agent-store" / "helper.md").exists()
    assert (server.home / "agent-context" / "helper.md").exists()
    names = {p["name"]: p for p in server.request("GET", "/agents/profiles")[1]}
    assert names["helper"]["provider"] == "demo" and "developer" in names
    launched = server.run("launch", "--agents", "helper", "--headless", "--session-name", "h", "hi")
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.rstrip().endswith("done: hi")


def test_info_and_version(server):
    info = server.run("info")
    assert "running" in info.stdout and str(server.home) in info.stdout
    assert server.run("--version").stdout.strip().startswith("cao ")
    assert CAO  # the CLI under test is this checkout's cao.py


def test_headless_launch_reports_for_ci_as_json_and_by_exit_code(server):
    ok = server.run("launch", "--agents", "developer", "--provider", "demo", "--headless", "--json",
                    "--session-name", "ci1", "summarise the repo")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)  # nothing else on stdout
    assert report["answer"] == "done: summarise the repo" and report["status"] == "completed"
    assert report["session_name"] == "cao-ci1" and len(report["terminal_id"]) == 8
    assert report["statuses"][-1] == "completed" and "processing" in report["statuses"]
    assert report["start_seconds"] > 0 and report["answer_seconds"] > 0 and report["error"] is None
    assert "Session created: cao-ci1" in ok.stderr

    asks = server.run("launch", "--agents", "developer", "--provider", "demo", "--headless",
                      "--session-name", "ci2", "/ask Overwrite the lockfile?")
    assert asks.returncode == 3, asks
    assert asks.stderr.strip().splitlines()[-1].startswith("cao: error: the agent in terminal ")
    assert "waits for an answer (? Overwrite the lockfile? [y/n])" in asks.stderr

    slow = server.run("launch", "--agents", "developer", "--provider", "demo", "--headless",
                      "--json", "--timeout", "0.1", "--session-name", "ci3", "think long")
    assert slow.returncode == 4, slow
    assert json.loads(slow.stdout)["status"] == "timeout"
    assert "timed out after 0.1 s" in slow.stderr.strip().splitlines()[-1]

    bad = server.run("launch", "--agents", "developer", "--provider", "demo", "--json")
    assert bad.returncode == 1 and "--json reports an answer" in bad.stderr


def test_doctor_names_each_problem_with_its_fix(cao_env, tmp_path):
    import os
    import shutil
    import subprocess
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, version in (("claude", "2.1.0 (Claude Code)"), ("codex", "codex-cli 0.1.0")):
        (bin_dir / name).write_text(f"#!/bin/sh\necho '{version}'\n")
        (bin_dir / name).chmod(0o755)
    os.symlink(shutil.which("tmux"), bin_dir / "tmux")
    env = dict(cao_env.env, PATH=f"{bin_dir}:/usr/bin:/bin", HOME=str(tmp_path),
               ANTHROPIC_API_KEY="sk-test-not-shown")
    for var in ("OPENAI_API_KEY",):
        env.pop(var, None)
    def run(*args, path=None):
        return subprocess.run([*CAO, "doctor", *args], capture_output=True, text=True, timeout=60,
                              env=dict(env, PATH=path or env["PATH"]))
    report = run("--json")
    assert report.returncode == 0, report.stderr
    checks = {c["name"]: c for c in json.loads(report.stdout)}
    assert checks["tmux"]["state"] == "ok" and checks["python"]["state"] == "ok"
    assert checks["server"]["state"] == "note" and "cao-server" in checks["server"]["fix"]
    claude = checks["claude_code"]
    assert claude["state"] == "ok" and "2.1.0 (Claude Code)" in claude["detail"]
    assert "credentials: ANTHROPIC_API_KEY" in claude["detail"]
    assert "sk-test-not-shown" not in report.stdout  # names, never values
    codex = checks["codex"]
    assert codex["state"] == "problem" and "codex login" in codex["fix"]
    assert checks["gemini_cli"]["state"] == "note" and "npm install" in checks["gemini_cli"]["fix"]

    no_tmux = tmp_path / "empty"
    no_tmux.mkdir()
    text = run(path=str(no_tmux))
    assert text.returncode == 1
    assert "[!!] tmux           not found on PATH; install tmux 3.2 or newer" in text.stdout
