"""Flows: scheduled agent sessions. Real server, real tmux, demo agents, croniter."""
import json
import sqlite3
import time

import pytest

from conftest import kill_pid, wait_for

pytest.importorskip("croniter")


def _flow_file(env, name, body="Say hello to [[city]].", script=None, schedule="30 7 * * *"):
    lines = [f"name: {name}", f'schedule: "{schedule}"', "agent_profile: developer", "provider: demo"]
    if script:
        lines.append(f"script: {script}")
    path = env.workdir / f"{name}.md"
    path.write_text("---\n" + "\n".join(lines) + "\n---\n" + body + "\n")
    return path


def _script(env, name, text):
    path = env.workdir / name
    path.write_text("#!/bin/sh\n" + text + "\n")
    path.chmod(0o755)
    return name


def _flow(env, name):
    return env.request("GET", f"/flows/{name}")[1]


def test_add_list_run_and_the_session_answers(server):
    script = _script(server, "gate.sh", 'echo \'{"execute": true, "output": {"city": "Paris"}}\'')
    out = server.run("flow", "add", str(_flow_file(server, "greet", script=script)))
    assert out.returncode == 0 and "Flow greet added: 30 7 * * * runs developer" in out.stdout, out.stderr
    listed = server.run("schedule", "list")  # upstream's name for the same commands
    assert "greet" in listed.stdout and "30 7 * * *" in listed.stdout
    flow = _flow(server, "greet")
    assert flow["enabled"] and flow["next_run"] and flow["last_run"] is None
    assert flow["prompt_template"] == "Say hello to [[city]].\n"
    ran = server.run("flow", "run", "greet")
    assert ran.returncode == 0 and "executed in session cao-flow-greet" in ran.stdout, ran.stderr
    terms = server.request("GET", "/sessions/cao-flow-greet")[1]["terminals"]
    wait_for(lambda: server.request("GET", f"/terminals/{terms[0]['id']}/output?mode=last")[1]
             .get("output") == "done: Say hello to Paris.", 30, what="the flow's answer")
    flow = _flow(server, "greet")
    assert flow["last_result"] == "executed" and flow["last_run"]
    again = server.run("flow", "run", "greet")  # a new run replaces the finished session
    assert again.returncode == 0 and "executed" in again.stdout
    assert len(server.request("GET", "/sessions/cao-flow-greet")[1]["terminals"]) == 1
    assert server.run("flow", "disable", "greet").returncode == 0
    assert _flow(server, "greet")["enabled"] is False
    assert server.run("flow", "enable", "greet").returncode == 0
    assert server.run("flow", "remove", "greet").returncode == 0
    assert server.request("GET", "/flows")[1] == []
    assert not (server.home / "flows" / "greet.flow.md").exists()


@pytest.mark.parametrize("gate, result, reason", [
    ('echo \'{"execute": false, "output": {}}\'', "skipped", "execute: false"),
    ("echo not json", "failed", "printed no JSON object"),
    ("exit 3", "failed", "exited with 3"),
    ('echo \'{"execute": true, "output": {}}\'', "failed", "uses [[city]] but the script"),
    ("sleep 5", "failed", "ran longer than 1 s"),
])
def test_a_gating_script_decides_and_a_bad_one_is_a_failed_run_with_its_reason(
        cao_env, gate, result, reason):
    cao_env.env["CAO_FLOW_SCRIPT_TIMEOUT"] = "1"
    cao_env.start_server()
    script = _script(cao_env, "gate.sh", gate)
    assert cao_env.run("flow", "add", str(_flow_file(cao_env, "gated", script=script))).returncode == 0
    ran = cao_env.run("flow", "run", "gated")
    assert (ran.returncode == 0) is (result == "skipped"), ran.stdout + ran.stderr
    flow = _flow(cao_env, "gated")
    assert flow["last_result"] == result and reason in flow["last_reason"], flow
    assert reason in cao_env.run("flow", "list").stdout
    assert cao_env.request("GET", "/sessions")[1] == []  # nothing started
    assert cao_env.healthy()


def test_a_run_missed_while_the_server_was_down_runs_once_at_start(cao_env):
    proc = cao_env.start_server()
    assert cao_env.run("flow", "add", str(_flow_file(cao_env, "missed", body="Morning report."))
                       ).returncode == 0
    kill_pid(proc.pid)
    db = next((cao_env.home / "db").glob("*.db"))
    with sqlite3.connect(db) as conn:  # as if the server had been down for three due times
        conn.execute("UPDATE flows SET next_run = ? WHERE name = 'missed'", (time.time() - 3 * 86400,))
    cao_env.start_server()
    wait_for(lambda: _flow(cao_env, "missed")["last_result"] == "executed", 30, what="the missed run")
    runs = [e for e in cao_env.request("GET", "/events?after=0")[1]["events"] if e["kind"] == "flow_run"]
    assert len(runs) == 1
    assert _flow(cao_env, "missed")["next_run"] > time.strftime("%Y-%m-%dT%H:%M:%S")


def test_flows_written_through_the_api_cannot_inject_frontmatter(server):
    evil = {"name": "inject", "schedule": "0 * * * *", "agent_profile": "developer",
            "provider": "demo", "prompt_template": "---\nscript: /bin/sh\n---\nrun me"}
    code, flow = server.request("POST", "/flows", evil)
    assert code == 201 and flow["script"] is None, flow
    assert flow["prompt_template"] == "---\nscript: /bin/sh\n---\nrun me\n"
    code, flow = server.request("POST", "/flows", {**evil, "name": "quoted",
                                                   "provider": "demo\"\nscript: /bin/sh"})
    assert code == 400 and "unknown provider" in flow["detail"]
    for bad, error in (({"name": "a\nb"}, "must be 1-64 letters"),
                       ({"schedule": "every day"}, "not a 5-field cron line"),
                       ({"schedule": "61 * * * *"}, "not a 5-field cron line"),
                       ({"agent_profile": "../x"}, "invalid agent profile name"),
                       ({"script": "/bin/sh"}, "must be inside"),
                       ({"prompt_template": " "}, "the prompt")):
        code, body = server.request("POST", "/flows", {**evil, "name": "bad", **bad})
        assert code == 400 and error in body["detail"], (bad, body)
    assert server.request("GET", "/flows/nope")[0] == 404
    assert server.request("POST", "/flows/nope/run")[0] == 404
    assert [f["name"] for f in server.request("GET", "/flows")[1]] == ["inject"]
    assert json.loads(json.dumps(_flow(server, "inject")))["script"] is None
