"""Resume after tmux dies: terminals are kept as lost, then come back with the same ids,
windows, links and inbox, each CLI continuing its conversation (the demo agent keeps
its turns under the conversation id, as real CLIs do)."""
import json
import signal
import threading

import pytest

from conftest import ask, demo_session, kill_pid, wait_for

pytest.importorskip("mcp")


def _terminal(env, tid):
    return env.request("GET", f"/terminals/{tid}")[1]


def _kill_tmux(env):
    pids = env.tmux_pids()
    env.tmux("kill-server")
    return pids


def _lost(env, *tids):
    wait_for(lambda: all(_terminal(env, t)["lost"] for t in tids), 15, what="terminals lost")


def _supervisor_and_worker(env, name):
    """A demo supervisor and a reviewer worker it started, in session cao-<name>."""
    sup = demo_session(env, name, "code_supervisor")
    code, worker = env.request("POST", f"/sessions/cao-{name}/terminals",
                               {"agent_profile": "reviewer", "provider": "demo", "caller_id": sup})
    assert code == 201, worker
    return sup, worker


def test_a_session_whose_tmux_died_comes_back_whole(server):
    sup, worker = _supervisor_and_worker(server, "whole")
    assert ask(server, sup, "first turn") == "done: first turn"
    assert ask(server, worker["id"], "review the parser") == "done: review the parser"
    before = {t["id"]: t for t in server.request("GET", "/sessions/cao-whole")[1]["terminals"]}
    assert all(t["conversation_id"] for t in before.values())

    _kill_tmux(server)
    _lost(server, sup, worker["id"])
    term = _terminal(server, sup)
    assert term["status"] == "error" and "tmux session ended" in term["lost"]["reason"]
    assert server.request("GET", "/sessions")[1][0]["status"] == "lost"
    # A message for a lost terminal waits for it.
    code, queued = server.request("POST", f"/terminals/{sup}/inbox/messages",
                                  {"sender_id": worker["id"], "message": "while you were out"})
    assert code == 200, queued

    done = server.run("session", "resume", "whole", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("conversation resumed") == 2, done.stdout
    after = {t["id"]: t for t in server.request("GET", "/sessions/cao-whole")[1]["terminals"]}
    assert set(after) == set(before)
    for tid, old in before.items():
        new = after[tid]
        for key in ("name", "agent_profile", "provider", "caller_id", "allowed_tools",
                    "working_directory", "conversation_id"):
            assert new[key] == old[key], key
        assert new["lost"] is None and new["resumed"] == "conversation"
    windows = server.tmux("list-windows", "-t", "=cao-whole", "-F", "#{window_name}").stdout.split()
    assert sorted(windows) == sorted(t["name"] for t in before.values())
    wait_for(lambda: [m["status"] for m in server.request(
        "GET", f"/terminals/{sup}/inbox/messages")[1]] == ["delivered"], 30,
        what="the message queued while lost, delivered after resume")
    wait_for(lambda: _terminal(server, sup)["status"] == "completed", 15, what="its answer")
    assert ask(server, sup, "/history") == "done: history (2): first turn | while you were out"
    assert ask(server, worker["id"], "/history") == "done: history (1): review the parser"


def test_a_server_start_resumes_sessions_whose_tmux_is_gone(cao_env):
    proc = cao_env.start_server()
    tid = demo_session(cao_env, "boot")
    assert ask(cao_env, tid, "remember this") == "done: remember this"
    kill_pid(proc.pid, signal.SIGKILL)
    _kill_tmux(cao_env)
    cao_env.start_server()
    wait_for(lambda: _terminal(cao_env, tid)["resumed"] == "conversation"
             and _terminal(cao_env, tid)["status"] in ("idle", "completed"), 30,
             what="the terminal resumed at server start")
    assert ask(cao_env, tid, "/history") == "done: history (1): remember this"
    kinds = [e["kind"] for e in cao_env.request("GET", "/events?after=0")[1]["events"]]
    assert "terminal_lost" in kinds and "terminal_resumed" in kinds


def test_a_handoff_cut_by_tmux_dying_fails_clearly_and_tells_its_caller(cao_env):
    cao_env.env["CAO_DEMO_DELAY"] = "30"
    cao_env.start_server()
    sup = demo_session(cao_env, "cut", "code_supervisor")
    job = "ab" * 16
    result = {}

    def run_step():
        result["answer"] = cao_env.request("POST", "/terminals/run-step", {
            "agent": "developer", "prompt": "a long task", "provider": "demo",
            "session_name": "cao-cut", "caller_id": sup, "job_id": job}, timeout=120)
    thread = threading.Thread(target=run_step)
    thread.start()
    worker = wait_for(lambda: next((t["id"] for t in cao_env.request(
        "GET", "/sessions/cao-cut")[1]["terminals"] if t["id"] != sup
        and t["status"] == "processing"), None), 30, what="the worker at work")
    _kill_tmux(cao_env)
    thread.join(60)
    code, body = result["answer"]
    assert code == 502 and f"worker {worker} was lost before it answered" in body["detail"]["message"], body
    state = cao_env.request("GET", f"/handoff-results/{job}")[1]
    # It waits for the caller (lost too) to come back; a paste cut by tmux is re-queued.
    inbox = wait_for(lambda: [m for m in cao_env.request(
        "GET", f"/terminals/{sup}/inbox/messages")[1] if m["status"] == "queued"], 30,
        what="the failure queued for the caller")
    assert len(inbox) == 1 and inbox[0]["sender_id"] == "cao"
    assert f"(job {job}) failed: worker {worker} was lost" in inbox[0]["message"]
    assert state["state"] == "error" and "was lost" in state["error_message"]


def test_a_conversation_its_cli_cannot_resume_starts_fresh_and_says_why(server):
    sup, worker = _supervisor_and_worker(server, "gone")
    wid = worker["id"]
    assert ask(server, wid, "a turn the CLI never saved") == "done: a turn the CLI never saved"
    conversation = _terminal(server, wid)["conversation_id"]
    (server.home / "demo-conversations" / f"{conversation}.jsonl").unlink()

    _kill_tmux(server)
    _lost(server, sup, wid)
    done = server.run("session", "resume", "gone", "--json", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    terms = {t["terminal_id"]: t for t in json.loads(done.stdout)[0]["terminals"]}
    assert terms[sup]["resumed"] == "conversation"
    term = terms[wid]
    assert term["resumed"] == "fresh" and term["status"] in ("idle", "completed"), term
    assert f"its conversation {conversation} could not be resumed" in term["detail"]
    assert "No conversation found" in term["detail"]
    after = _terminal(server, wid)
    assert after["resumed"] == "fresh" and after["conversation_id"] not in (None, conversation)
    assert ask(server, wid, "/history") == "done: history (0):"
    windows = server.tmux("list-windows", "-t", "=cao-gone", "-F", "#{window_name}").stdout.split()
    assert sorted(windows) == sorted([_terminal(server, sup)["name"], after["name"]])
    # Its first window's exit was part of the repair, not a stop to report to its caller.
    assert _cao_messages(server, sup) == []


def test_resume_session_id_starts_a_cli_on_an_earlier_conversation(server):
    tid = demo_session(server, "first")
    assert ask(server, tid, "the first session's turn") == "done: the first session's turn"
    conversation = _terminal(server, tid)["conversation_id"]
    done = server.run("launch", "--agents", "developer", "--provider", "demo", "--headless",
                      "--session-name", "second", "--resume-session-id", conversation,
                      "/history", timeout=60)
    assert done.returncode == 0, done.stderr
    assert "history (1): the first session's turn" in done.stdout


@pytest.mark.parametrize("body, fix", [
    ({"resume_session_id": "--help"}, "invalid conversation id"),
    ({"resume_session_id": "a/b"}, "invalid conversation id"),
])
def test_a_bad_resume_session_id_is_a_400(server, body, fix):
    code, answer = server.request("POST", "/sessions?agent_profile=developer&provider=demo",
                                  body)
    assert code == 400 and fix in answer["detail"]


def test_resume_of_nothing_and_of_an_unknown_session(server):
    demo_session(server, "alive")
    done = server.run("session", "resume", "alive")
    assert done.returncode == 0 and "nothing to resume" in done.stdout
    done = server.run("session", "resume", "nope")
    assert done.returncode != 0 and "session cao-nope not found" in done.stderr
    done = server.run("session", "resume")
    assert done.returncode != 0 and "--all" in done.stderr
    assert json.loads(server.run("session", "resume", "--all", "--json").stdout) == []


def test_a_terminal_beyond_max_agents_fails_at_once_or_waits_for_room(server):
    (server.home / "settings.json").write_text(json.dumps({"max_agents": 2}))
    first = demo_session(server, "one")
    demo_session(server, "two")
    code, body = server.request("POST", "/sessions?agent_profile=developer&provider=demo"
                                        "&session_name=three&wait_for_room=false")
    assert code == 429 and "max_agents in settings.json is 2" in body["detail"], body
    assert server.request("GET", "/fleet")[1]["agents"] == 2
    result = {}
    waiter = threading.Thread(target=lambda: result.update(answer=server.request(
        "POST", "/sessions?agent_profile=developer&provider=demo&session_name=three")))
    waiter.start()
    wait_for(lambda: server.request("GET", "/fleet")[1]["agents"] == 2, 5, what="fleet read")
    assert waiter.is_alive()  # it waits for room
    assert server.request("DELETE", f"/terminals/{first}")[0] == 200
    waiter.join(30)
    assert result["answer"][0] == 201, result


def test_a_memory_ceiling_names_itself(server):
    demo_session(server, "mem")
    (server.home / "settings.json").write_text(json.dumps({"max_agents_memory_mb": 1}))
    fleet = server.request("GET", "/fleet")[1]
    assert fleet["agents_memory_mb"] > 1
    code, body = server.request("POST", "/sessions/cao-mem/terminals?wait_for_room=false",
                                {"agent_profile": "developer", "provider": "demo"})
    assert code == 429 and "MiB are held by the agents and max_agents_memory_mb" in body["detail"]
    (server.home / "settings.json").write_text(json.dumps({"max_agents": "many"}))
    code, body = server.request("POST", "/sessions/cao-mem/terminals",
                                {"agent_profile": "developer", "provider": "demo"})
    assert code == 400 and "max_agents must be a number above 0" in body["detail"]


def _cao_messages(env, tid):
    return [m for m in env.request("GET", f"/terminals/{tid}/inbox/messages?limit=50")[1]
            if m["sender_id"] == "cao"]


def test_a_worker_whose_cli_exits_is_reported_to_its_caller_once(server):
    sup = demo_session(server, "exits", "code_supervisor")
    code, worker = server.request("POST", "/sessions/cao-exits/terminals",
                                  {"agent_profile": "reviewer", "provider": "demo",
                                   "caller_id": sup})
    assert code == 201
    server.request("POST", f"/terminals/{worker['id']}/keys", {"data": "\x04"})
    told = wait_for(lambda: [m for m in _cao_messages(server, sup) if m["status"] == "delivered"],
                    20, what="the caller told")
    assert f"Worker {worker['id']} (reviewer) stopped: its CLI exited" in told[0]["message"]
    wait_for(lambda: _terminal(server, sup)["status"] == "completed", 15, what="its reply")
    assert len(_cao_messages(server, sup)) == 1
    events = [e for e in server.request("GET", "/events?after=0")[1]["events"]
              if e["kind"] == "agent_stopped"]
    assert len(events) == 1 and events[0]["terminal_id"] == worker["id"]


def _worker_of_a_cli_of_our_own(env, name, provider, **settings):
    """Start the server with `provider` defined in settings.json, then a demo supervisor
    in session cao-<name> and a reviewer worker of it that runs that provider."""
    env.home.mkdir(parents=True, exist_ok=True)
    (env.home / "settings.json").write_text(json.dumps({"providers": {name: provider},
                                                        **settings}))
    env.start_server()
    sup = demo_session(env, name, "code_supervisor")
    code, worker = env.request("POST", f"/sessions/cao-{name}/terminals",
                               {"agent_profile": "reviewer", "provider": name, "caller_id": sup})
    assert code == 201, worker
    return sup, worker


def test_a_hung_worker_is_reported_never_removed(cao_env):
    stuck = {"command": ["sh", "-c", "printf '> '; read x; printf 'working...'; exec sleep 600"],
             "status": [["processing", r"working\.\.\.\Z"], ["idle", r"^> ?\Z"]]}
    cao_env.env["CAO_HUNG_CHECK"] = "0.3"
    sup, worker = _worker_of_a_cli_of_our_own(cao_env, "hung", stuck, hung_after=1)
    assert cao_env.request("POST", f"/terminals/{worker['id']}/input", {"message": "go"})[0] == 200
    told = wait_for(lambda: _cao_messages(cao_env, sup), 20, what="the caller told")
    assert "stopped: it has printed nothing for" in told[0]["message"]
    assert "hung_after in settings.json is 1 s" in told[0]["message"]
    term = _terminal(cao_env, worker["id"])
    assert term["status"] == "processing" and term["lost"] is None  # reported, never removed


@pytest.mark.parametrize("pasted", [True, False])
def test_a_handoff_prompt_cut_by_a_server_crash_is_given_exactly_once(cao_env, pasted):
    """The server died while it gave a handoff's worker its prompt: after the paste
    (the text waits in the input line; its tmux buffer says so) or before it."""
    import sqlite3
    import time
    audit = cao_env.home.parent / "demo.log"
    cao_env.env["CAO_DEMO_LOG"] = str(audit)
    proc = cao_env.start_server()
    sup = demo_session(cao_env, "crash", "code_supervisor")
    code, worker = cao_env.request("POST", "/sessions/cao-crash/terminals",
                                   {"agent_profile": "developer", "provider": "demo",
                                    "caller_id": sup})
    assert code == 201
    kill_pid(proc.pid, signal.SIGKILL)
    job = "cd" * 16
    with sqlite3.connect(cao_env.home / "db" / "cao.db") as db:
        db.execute("INSERT INTO handoff_jobs(job_id, caller_id, terminal_id, agent_profile,"
                   " state, created_at, prompt, submitted) VALUES (?,?,?,?,?,?,?,0)",
                   (job, sup, worker["id"], "developer", "running", time.time(), "cut task"))
    if pasted:
        cao_env.tmux("send-keys", "-t", f"=cao-crash:{worker['name']}", "-l", "cut task")
        cao_env.tmux("set-buffer", "-b", f"cao-job-{job}", "pasted")
    cao_env.start_server()
    result = wait_for(lambda: (lambda r: r if r["state"] != "running" else None)(
        cao_env.request("GET", f"/handoff-results/{job}")[1]), 30, what="the job ended")
    assert result["state"] == "completed" and result["last_message"] == "done: cut task", result
    inputs = [json.loads(line)["input"] for line in audit.read_text().splitlines()
              if json.loads(line)["terminal_id"] == worker["id"]]
    assert inputs == ["cut task"]


def test_a_handoff_whose_worker_was_starting_when_the_server_died_still_answers(cao_env):
    """The job names its worker before the worker's CLI starts, so a restart finds
    it, waits until it is ready and gives it the prompt once."""
    cao_env.env["CAO_DEMO_START_DELAY"] = "4"
    audit = cao_env.home.parent / "demo.log"
    cao_env.env["CAO_DEMO_LOG"] = str(audit)
    proc = cao_env.start_server()
    sup = demo_session(cao_env, "slow", "code_supervisor")
    job = "ab" * 16

    def run_step():
        try:
            cao_env.request("POST", "/terminals/run-step", {
                "agent": "developer", "prompt": "started late", "session_name": "cao-slow",
                "caller_id": sup, "provider": "demo", "job_id": job}, timeout=60)
        except OSError:
            pass  # cut by the kill, as it should be
    cut = threading.Thread(target=run_step)
    cut.start()
    try:
        wid = wait_for(lambda: cao_env.request("GET", f"/handoff-results/{job}")[1]
                       .get("terminal_id"), 20, what="the job names its worker")
        wait_for(lambda: cao_env.request("GET", f"/terminals/{wid}")[0] == 200, 20,
                 what="the worker's record")
        assert _terminal(cao_env, wid)["status"] == "unknown"  # its CLI is still loading
        kill_pid(proc.pid, signal.SIGKILL)
    finally:
        cut.join(60)
    cao_env.start_server()
    result = wait_for(lambda: (lambda r: r if r["state"] != "running" else None)(
        cao_env.request("GET", f"/handoff-results/{job}")[1]), 60, what="the job ended")
    assert result["state"] == "completed" and result["last_message"] == "done: started late", \
        result["error_message"]
    inputs = [json.loads(line)["input"] for line in audit.read_text().splitlines()
              if json.loads(line)["terminal_id"] == wid]
    assert inputs == ["started late"]
    wait_for(lambda: cao_env.request("GET", f"/terminals/{wid}")[0] == 404, 30,
             what="the worker removed after its answer, as the step asked (teardown)")


def test_a_handoff_answer_that_tmux_cut_on_its_way_reaches_the_caller_after_resume(server):
    """The worker answered, then tmux died before the caller could show the answer:
    the caller's inbox gets it after the resume."""
    sup = demo_session(server, "inflight", "code_supervisor")
    code, step = server.request("POST", "/terminals/run-step", {
        "agent": "developer", "prompt": "answered in time", "session_name": "cao-inflight",
        "caller_id": sup, "provider": "demo", "teardown": False}, timeout=60)
    assert code == 200 and step["last_message"] == "done: answered in time", step
    _kill_tmux(server)
    _lost(server, sup)
    done = server.run("session", "resume", "inflight", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    told = wait_for(lambda: [m for m in _cao_messages(server, sup) if m["status"] == "delivered"],
                    30, what="the answer in the caller's inbox")
    assert "answered" in told[0]["message"] and "done: answered in time" in told[0]["message"]


def test_a_handoff_answer_is_not_sent_again_to_a_caller_that_took_new_input_since(server):
    """A caller given new input after its handoff answered had the answer: its loss
    soon after brings no copy of it (the soak saw such copies of an older chain's answer)."""
    sup = demo_session(server, "moved-on", "code_supervisor")
    code, step = server.request("POST", "/terminals/run-step", {
        "agent": "developer", "prompt": "answered earlier", "session_name": "cao-moved-on",
        "caller_id": sup, "provider": "demo", "teardown": False}, timeout=60)
    assert code == 200, step
    assert ask(server, sup, "the next task") == "done: the next task"
    _kill_tmux(server)
    _lost(server, sup)
    done = server.run("session", "resume", "moved-on", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _cao_messages(server, sup) == []


def test_an_assigned_worker_lost_mid_turn_is_reported_to_its_caller_and_by_resume(server):
    """The caller of an assigned worker waits for a callback the cut turn will never
    send: it hears of the loss in its inbox, and the resume names the cut turn."""
    sup, worker = _supervisor_and_worker(server, "midturn")
    assert server.request("POST", f"/terminals/{worker['id']}/input",
                          {"message": "/ask may I delete the build folder?"})[0] == 200
    wait_for(lambda: _terminal(server, worker["id"])["status"] == "waiting_user_answer", 15,
             what="the worker in the middle of its turn")
    _kill_tmux(server)
    _lost(server, sup, worker["id"])
    told = wait_for(lambda: _cao_messages(server, sup), 15, what="the caller told")
    assert len(told) == 1 and told[0]["status"] == "queued"  # the caller is lost as well
    assert (f"Worker {worker['id']} (reviewer) stopped: it was lost before it finished a turn: "
            "its tmux session ended") in told[0]["message"]
    assert "send it the task again with send_message" in told[0]["message"]

    done = server.run("session", "resume", "midturn", "--json", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    by_id = {t["terminal_id"]: t for t in json.loads(done.stdout)[0]["terminals"]}
    assert by_id[worker["id"]]["interrupted"] is True and "interrupted" not in by_id[sup], by_id
    resumed = [e for e in server.request("GET", "/events?after=0")[1]["events"]
               if e["kind"] == "terminal_resumed" and e["terminal_id"] == worker["id"]]
    assert resumed and resumed[0]["data"]["interrupted"] is True, resumed
    wait_for(lambda: [m["status"] for m in _cao_messages(server, sup)] == ["delivered"], 30,
             what="the notice delivered to the resumed caller")


def test_resume_says_which_terminal_lost_its_running_turn(server):
    tid = demo_session(server, "cutturn")
    assert server.request("POST", f"/terminals/{tid}/input", {"message": "/ask go on?"})[0] == 200
    wait_for(lambda: _terminal(server, tid)["status"] == "waiting_user_answer", 15,
             what="a turn under way")
    _kill_tmux(server)
    _lost(server, tid)
    done = server.run("session", "resume", "cutturn", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"cao-cutturn {tid}: conversation resumed, status idle; the turn it was running " \
           "when it was lost is gone: send it again" in done.stdout, done.stdout
    assert not _cao_messages(server, tid)  # no caller: nobody else to tell


def test_a_pane_that_drew_its_screen_before_it_was_followed_counts_as_quiet(cao_env, monkeypatch,
                                                                            tmp_path):
    """A resumed CLI may draw its whole screen before cao's pipe is on it; it has been
    quiet since it was followed (not "never quiet", which held a resume 20 s and kept
    the hung check off such a pane)."""
    import cao
    monkeypatch.setenv("CAO_TMUX_SOCKET", cao_env.socket)
    pane = cao_env.tmux("new-session", "-d", "-s", "q", "-P", "-F", "#{pane_id}", "--",
                        "sh", "-c", "printf 'ready> '; exec sleep 600").stdout.strip()
    wait_for(lambda: "ready>" in cao_env.tmux("capture-pane", "-p", "-t", pane).stdout, 10,
             what="the screen drawn before any pipe")
    (tmp_path / "fifos").mkdir()
    (tmp_path / "logs").mkdir()
    watcher = cao.PaneWatcher(tmp_path / "fifos", tmp_path / "logs", lambda terminal_id: None)
    watcher.start()
    try:
        watcher.add("0123abcd", pane)
        wait_for(lambda: watcher.quiet_for("0123abcd") >= 0.5, 10, what="quiet since followed")
        assert watcher.output_count("0123abcd") == 0
    finally:
        watcher.stop()
        watcher.join(5)


def test_a_terminal_whose_tmux_dies_while_it_starts_fails_with_a_503_and_leaves_nothing(cao_env):
    cao_env.env["CAO_DEMO_START_DELAY"] = "30"
    cao_env.start_server()
    result = {}
    create = threading.Thread(target=lambda: result.update(answer=cao_env.request(
        "POST", "/sessions?agent_profile=developer&provider=demo&session_name=slow",
        timeout=120)))
    create.start()
    wait_for(lambda: cao_env.tmux("has-session", "-t", "=cao-slow").returncode == 0, 30,
             what="the window open, its agent still loading")
    _kill_tmux(cao_env)
    create.join(60)
    code, body = result["answer"]
    assert code == 503 and "tmux died while the agent in terminal" in body["detail"], body
    assert body["detail"].endswith("start it again"), body
    # It failed, so nothing of it is left to come back at the next resume.
    assert cao_env.request("GET", "/sessions")[1] == []
    assert cao_env.request("GET", "/terminals")[1] == []


def test_a_message_taken_just_before_tmux_died_is_flagged_and_its_turn_counted_cut(cao_env):
    """The receiver took the message but died before it showed a turn for it: the
    message stays delivered (never typed twice) with a reason, and the resume says the
    turn is gone."""
    deaf = {"command": ["sh", "-c", "printf '> '; while read x; do printf '> '; done"],
            "status": [["idle", r"^> ?\Z"]]}  # takes input, never shows a turn for it
    sup, worker = _worker_of_a_cli_of_our_own(cao_env, "unseen", deaf)
    code, sent = cao_env.request("POST", f"/terminals/{worker['id']}/inbox/messages",
                                 {"sender_id": sup, "message": "review the parser"})
    assert code == 200, sent
    wait_for(lambda: cao_env.request("GET", f"/terminals/{worker['id']}/inbox/messages")[1][0]
             ["status"] == "delivered", 20, what="the message delivered")
    _kill_tmux(cao_env)
    _lost(cao_env, worker["id"])
    message = cao_env.request("GET", f"/terminals/{worker['id']}/inbox/messages")[1][0]
    assert message["status"] == "delivered" and "it may not have acted on it" in message["reason"]
    done = cao_env.run("session", "resume", "unseen", "--json", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    by_id = {t["terminal_id"]: t for t in json.loads(done.stdout)[0]["terminals"]}
    assert by_id[worker["id"]]["interrupted"] is True and "interrupted" not in by_id[sup], by_id
    assert by_id[worker["id"]]["resumed"] == "fresh"  # its provider has no resume args
    assert "lost before it finished a turn" in _cao_messages(cao_env, sup)[0]["message"]
