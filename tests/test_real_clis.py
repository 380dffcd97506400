"""Real agent CLIs, installed from npm and PyPI, driven by cao against tests/mock_llm.py.

The CLIs live under $CAO_TEST_CLIS (default ~/.cache/cao-clis; .ci/run installs them
there at pinned versions). A CLI that is not installed is skipped with the reason.
Each test plays a user who has set the CLI up once (its API endpoint and key point at
the mock); everything else - trust dialogs, the MCP server, hooks, the system prompt -
is cao's job.
"""
import json
import re
import os
import shutil
import signal
import sys
import subprocess
import time
from pathlib import Path

import pytest

import cao

from conftest import CaoEnv, call_tool, kill_pid, wait_for
from mock_llm import MockLLM
from real_cli_setup import (APPROVAL, BINARIES, BIN_DIRS, CLIS, ask_before_commands, ci_setup, installed,
                            user_setup, write)

pytestmark = pytest.mark.real_cli
def _needs(*providers):
    missing = [p for p in providers if not installed(p)]
    return pytest.mark.skipif(bool(missing), reason=f"not installed under {CLIS}: "
                              f"{', '.join(BINARIES[p] for p in missing)} (.ci/run installs them)")



class RealEnv(CaoEnv):
    """A cao server whose agents see a fresh HOME set up for the mock."""

    def __init__(self, tmp_path, mock, providers):
        super().__init__(tmp_path)  # cao's home lies below /tmp, which Gemini distrusts
        self.user_home = tmp_path / "user-home"
        self.user_home.mkdir()
        path = os.pathsep.join([str(d) for d in BIN_DIRS] + [os.environ.get("PATH", "")])
        # A CLI that updates itself (qwen does, unless cao stops it) installs here.
        self.npm_global = tmp_path / "npm-global"
        self.env.update(HOME=str(self.user_home), PATH=path, CAO_PROVIDER_INIT_TIMEOUT="90",
                        npm_config_prefix=str(self.npm_global))
        for provider in providers:
            self.env.update(user_setup(provider, self.user_home, mock.url, updates_off=False))
        profiles = self.home / "agent-store"
        profiles.mkdir(parents=True)
        self.profiles = profiles

    def profile(self, name, provider, prompt, **front):
        lines = [f"name: {name}", f"description: e2e {name}", f"provider: {provider}"]
        lines += [f"{k}: {json.dumps(v)}" for k, v in front.items()]
        write(self.profiles / f"{name}.md", "---\n" + "\n".join(lines) + "\n---\n" + prompt + "\n")

    def cleanup(self):
        # A CLI's own children (MCP servers, shells) share its process group.
        for pid in self.tmux_pids():
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        super().cleanup()

    def start(self, provider, profile="agent", session="e2e"):
        code, body = self.request("POST", f"/sessions?agent_profile={profile}&provider={provider}"
                                          f"&session_name={session}", timeout=120)
        assert code == 201, body
        return body

    def status(self, terminal_id):
        return self.request("GET", f"/terminals/{terminal_id}")[1]["status"]

    def wait_status(self, terminal_id, wanted, timeout=90):
        wanted = (wanted,) if isinstance(wanted, str) else wanted
        return wait_for(lambda: self.status(terminal_id) in wanted and self.status(terminal_id),
                        timeout, 0.05, f"terminal {terminal_id} status {wanted} "
                        f"(screen: {self.screen(terminal_id)[-1500:]!r})")

    def screen(self, terminal_id):
        code, body = self.request("GET", f"/terminals/{terminal_id}/output?mode=full")
        return body.get("output", "") if code == 200 else str(body)

    def send(self, terminal_id, message):
        code, body = self.request("POST", f"/terminals/{terminal_id}/input", {"message": message},
                                  timeout=60)
        assert code == 200, body

    def statuses_since(self, seq, terminal_id):
        events = self.request("GET", f"/events?after={seq}")[1]["events"]
        return [e["data"]["status"] for e in events if e["kind"] == "status"
                and e["terminal_id"] == terminal_id]

    def last_seq(self):
        return self.request("GET", "/events?wait=0")[1]["next"]


@pytest.fixture
def mock():
    with MockLLM() as server:
        yield server


def _env(tmp_path, mock, *providers, **server_env):
    env = RealEnv(tmp_path, mock, providers)
    env.env.update(server_env)
    env.start_server()
    return env


@pytest.fixture
def real_env(tmp_path, mock):
    envs = []

    def make(*providers, **server_env):
        env = _env(tmp_path, mock, *providers, **server_env)
        envs.append(env)
        return env
    yield make
    for env in envs:
        env.cleanup()


TURN_CLIS = list(BINARIES)


@pytest.mark.parametrize("provider", TURN_CLIS)
def test_real_cli_turn_status_and_answer(real_env, mock, provider):
    if not installed(provider):
        pytest.skip(f"{BINARIES[provider]} is not installed under {CLIS} (.ci/run installs it)")
    env = real_env(provider)
    env.profile("agent", provider, "You are the e2e agent. PROMPT-MARKER-31.")
    mock.reply("please answer", text=f"REAL-ANSWER-{provider}", delay=1.0)
    term = env.start(provider)["id"]
    assert env.status(term) in ("idle", "completed")
    seq = env.last_seq()
    env.send(term, "please answer the question")
    env.wait_status(term, "completed")
    seen = env.statuses_since(seq, term)
    assert "processing" in seen and seen[-1] == "completed", seen
    code, body = env.request("GET", f"/terminals/{term}/output?mode=last")
    assert code == 200 and body["output"] == f"REAL-ANSWER-{provider}", env.screen(term)[-2000:]
    main = mock.wait_for(lambda r: r["kind"] == "main" and "please answer" in r["user_text"])
    assert "PROMPT-MARKER-31" in main["system_text"] + json.dumps(main["body"])
    # A second turn: the status cycles again, and by now the CLI has connected to
    # cao's MCP server (CLIs do not wait for MCP servers before their first prompt).
    mock.reply("second question", text=f"SECOND-ANSWER-{provider}")
    seq = env.last_seq()
    env.send(term, "the second question")
    env.wait_status(term, "completed")
    seen = env.statuses_since(seq, term)
    assert seen[0] == "processing", (seen, env.screen(term)[-2500:])
    assert env.request("GET", f"/terminals/{term}/output?mode=last")[1]["output"] == \
        f"SECOND-ANSWER-{provider}"
    second = mock.wait_for(lambda r: r["kind"] == "main" and "second question" in r["user_text"])
    if provider != "hermes":  # hermes reads MCP servers only from its own config.yaml
        # Qwen Code defers MCP tools: it names them in the request and loads them on use.
        assert any(name.endswith("handoff") for name in second["tool_names"]) or \
            "mcp__cao-mcp-server__handoff" in json.dumps(second["body"]), second["tool_names"]
    assert not env.npm_global.exists(), "the CLI ran npm install -g: " + \
        " ".join(str(p) for p in env.npm_global.rglob("*"))[:500]


def _tool_ready(mock, name):
    """CLIs connect to MCP servers in the background; wait until one offered `name`."""
    return lambda r: r["kind"] == "main" and any(t.endswith(name) for t in r["tool_names"])


def _warm_up(env, mock, term, tool, timeout=90):
    """Turns until the CLI has connected to cao's MCP server, before the real work. A
    CLI connects in the background, and `cao mcp` takes ~1 s to start (more on a
    loaded CI machine) while a warm-up turn against the mock takes a fraction of that,
    so the turns go on until the tool is offered or the deadline passes."""
    deadline, attempt = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        env.send(term, f"warm up {attempt}")
        env.wait_status(term, "completed")
        if any(_tool_ready(mock, tool)(r) for r in mock.requests):
            return
        attempt += 1
    raise AssertionError(f"the CLI never offered the {tool} tool in {attempt} turns ({timeout} s)")


@pytest.mark.parametrize("boss,worker", [("claude_code", "codex"), ("codex", "gemini_cli")])
def test_real_supervisor_hands_off_to_a_real_worker(real_env, mock, boss, worker):
    for provider in (boss, worker):
        if not installed(provider):
            pytest.skip(f"{BINARIES[provider]} is not installed under {CLIS}")
    env = real_env(boss, worker)
    env.profile("boss", boss, "You supervise. Delegate with handoff.")
    env.profile("helper", worker, "You are the worker.")
    mock.reply("warm up", text="warm")
    mock.reply("TASK-FOR-WORKER", text="WORKER-RESULT-77")
    mock.reply("delegate the task", tool="handoff",
               arguments={"agent_profile": "helper", "message": "TASK-FOR-WORKER: add 2 and 5",
                          "timeout": 300},
               then="BOSS-GOT {result}")
    boss_term = env.start(boss, profile="boss")["id"]
    _warm_up(env, mock, boss_term, "handoff")
    env.send(boss_term, "delegate the task")
    env.wait_status(boss_term, "completed", timeout=240)
    answer = env.request("GET", f"/terminals/{boss_term}/output?mode=last")[1]["output"]
    assert answer.startswith("BOSS-GOT") and "WORKER-RESULT-77" in answer, answer
    created = [e["data"] for e in env.request("GET", "/events?after=0")[1]["events"]
               if e["kind"] == "terminal_created" and e["terminal_id"] != boss_term]
    assert [c["provider"] for c in created] == [worker], created
    assert mock.wait_for(lambda r: "TASK-FOR-WORKER" in r["user_text"] and r["kind"] == "main")


@_needs("claude_code")
def test_real_assigned_worker_sends_its_result_back(real_env, mock):
    env = real_env("claude_code")
    env.profile("boss", "claude_code", "You supervise.")
    env.profile("helper", "claude_code", "You are the worker.")
    mock.reply("warm up", text="warm")
    mock.reply("ASSIGNED-JOB", tool="send_message", arguments={"message": "CALLBACK-55 done"},
               then="worker finished")
    mock.reply("assign the job", tool="assign",
               arguments={"agent_profile": "helper", "message": "ASSIGNED-JOB: count files"},
               then="assigned {result}")
    boss = env.start("claude_code", profile="boss")["id"]
    _warm_up(env, mock, boss, "assign")
    env.send(boss, "assign the job")
    # The worker starts, connects to MCP in the background, and may need a nudge: its
    # first request can come before cao's tools are connected.
    inbox = mock.wait_for(lambda r: r["kind"] == "main" and "CALLBACK-55" in r["user_text"]
                          and "Message from terminal" in r["user_text"], timeout=180)
    assert inbox["headers"].get("x-claude-code-session-id")
    # The row is marked once cao has confirmed the submit, which can be after the model
    # already has the message.
    wait_for(lambda: any("CALLBACK-55" in m["message"] and m["status"] == "delivered" for m in
                         env.request("GET", f"/terminals/{boss}/inbox/messages")[1]),
             30, 0.05, "the inbox row to show delivered")


@pytest.mark.parametrize("provider", TURN_CLIS)
def test_real_approval_shows_waiting_and_answering_resumes(real_env, mock, provider):
    if not installed(provider):
        pytest.skip(f"{BINARIES[provider]} is not installed under {CLIS} (.ci/run installs it)")
    env = real_env(provider)
    ask_before_commands(provider, env.user_home)
    env.profile("agent", provider, "You are careful.")
    tool, arguments = APPROVAL[provider]
    mock.reply("make a file", tool=tool, arguments=arguments, then="FILE-MADE {result}")
    term = env.start(provider)["id"]
    env.send(term, "make a file please")
    env.wait_status(term, "waiting_user_answer")
    assert not (env.workdir / "cao-approved-file").exists()
    assert not any(r["has_tool_result"] for r in mock.main_requests())
    code, body = env.request("POST", f"/terminals/{term}/key", {"key": "Enter"})
    assert code == 200, body
    env.wait_status(term, "completed")
    assert mock.wait_for(lambda r: r["kind"] == "main" and r["has_tool_result"])
    if provider != "hermes":  # hermes asks only for "dangerous" commands: an rm of nothing
        assert (env.workdir / "cao-approved-file").exists()
    assert env.request("GET", f"/terminals/{term}/output?mode=last")[1]["output"].startswith(
        "FILE-MADE"), env.screen(term)[-2000:]


@pytest.mark.parametrize("provider", TURN_CLIS)
def test_real_restrictions_reach_the_cli(real_env, mock, provider):
    if not installed(provider):
        pytest.skip(f"{BINARIES[provider]} is not installed under {CLIS} (.ci/run installs it)")
    env = real_env(provider)
    env.profile("reader", provider, "You only read.", role="reviewer")  # upstream's read-only role
    term = env.start(provider, profile="reader")["id"]
    env.send(term, "what tools do you have")
    env.wait_status(term, "completed")
    main = mock.wait_for(lambda r: r["kind"] == "main" and "what tools" in r["user_text"])
    native = cao.PROVIDERS[provider].get("tools")
    if native:  # hard: the denied tools are not even offered to the model
        offered = set(main["tool_names"])
        assert offered & set(native["fs_read"]), " ".join(sorted(offered))
        denied = {n for tool in ("execute_bash", "fs_write", "web_fetch") for n in native.get(tool, [])}
        assert not denied & offered, main["tool_names"]
    else:  # soft: the model is told
        assert "Only use these tools: @builtin, fs_read, fs_list, @cao-mcp-server" in \
            main["system_text"] + json.dumps(main["body"]), main["system_text"][-500:]


SKILL_FIXTURE = Path(__file__).parent / "fixtures" / "skills" / "review-helper"


@pytest.mark.parametrize("provider", TURN_CLIS)
def test_real_skills_reach_the_model(real_env, mock, provider):
    if not installed(provider):
        pytest.skip(f"{BINARIES[provider]} is not installed under {CLIS} (.ci/run installs it)")
    env = real_env(provider)
    shutil.copytree(SKILL_FIXTURE, env.home / "skills" / "review-helper")
    env.profile("reviewer", provider, "You review.", skills=["review-*"])
    term = env.start(provider, profile="reviewer")["id"]
    env.send(term, "which skills do you know")
    env.wait_status(term, "completed")
    main = mock.wait_for(lambda r: r["kind"] == "main" and "which skills" in r["user_text"])
    seen = json.dumps(main["body"])
    assert "review-helper" in seen and "Review a change set for correctness" in seen, seen[:2000]
    native = cao.PROVIDERS[provider].get("skills_dir")
    catalog = "call the load_skill tool" in seen
    assert catalog is not bool(native)  # the CLI lists native skills itself
    assert "cao-supervisor-protocols" not in seen  # filtered out by the profile's skills


@_needs("claude_code")
def test_real_memory_stored_in_one_session_reaches_a_new_terminal_in_another(real_env, mock):
    env = real_env("claude_code")
    env.profile("agent", "claude_code", "You remember things.")
    mock.reply("warm up", text="warm")
    mock.reply("remember the port", tool="memory_store",
               arguments={"content": "The staging database listens on port 6543",
                          "key": "staging-db-port"}, then="stored {result}")
    first = env.start("claude_code", session="mem-one")["id"]
    _warm_up(env, mock, first, "memory_store")
    env.send(first, "remember the port")
    env.wait_status(first, "completed", timeout=120)
    code, stored = env.request("GET", "/memory/staging-db-port")
    assert code == 200 and stored[0]["source_terminal_id"] == first, stored
    second = env.start("claude_code", session="mem-two")["id"]
    env.send(second, "which port does staging use")
    env.wait_status(second, "completed", timeout=120)
    main = mock.wait_for(lambda r: r["kind"] == "main" and "which port does staging use"
                         in json.dumps(r["body"]))
    first_request = json.dumps(main["body"])
    assert "<cao-memory>" in first_request and "listens on port 6543" in first_request
    assert "staging-db-port" in env.request("GET", f"/terminals/{second}/memory-context")[1]["context"]


@_needs("claude_code")
def test_real_supervisor_answers_a_claude_workers_approval(real_env, mock):
    env = real_env("claude_code")
    ask_before_commands("claude_code", env.user_home)
    env.profile("agent", "claude_code", "You are careful.")
    tool, arguments = APPROVAL["claude_code"]
    mock.reply("make a file", tool=tool, arguments=arguments, then="FILE-MADE {result}")
    supervisor = env.start("claude_code", session="approve")["id"]
    code, worker = env.request("POST", "/sessions/cao-approve/terminals", {
        "agent_profile": "agent", "provider": "claude_code", "caller_id": supervisor}, timeout=120)
    assert code == 201, worker
    env.send(worker["id"], "make a file please")
    env.wait_status(worker["id"], "waiting_user_answer")
    _, answered = call_tool(env, "answer_user_prompt", {"terminal_id": worker["id"], "answer": "1"},
                            supervisor)
    assert answered["success"], answered
    env.wait_status(worker["id"], "completed")
    assert (env.workdir / "cao-approved-file").exists()


@pytest.mark.parametrize("provider", TURN_CLIS)
def test_real_multi_line_first_message_is_submitted(real_env, mock, provider):
    """A first message of several lines (a memory block, an assign footer) sent the
    moment the CLI is ready reaches the model: none waits unsent in the input box."""
    if not installed(provider):
        pytest.skip(f"{BINARIES[provider]} is not installed under {CLIS} (.ci/run installs it)")
    env = real_env(provider)
    env.profile("agent", provider, "You answer.")
    term = env.start(provider)["id"]
    env.send(term, "Context:\nline one\nline two\n\nMULTI-LINE-77 what now")
    env.wait_status(term, "completed")
    assert mock.wait_for(lambda r: r["kind"] == "main" and "MULTI-LINE-77" in r["user_text"])


EAGER = [p for p in TURN_CLIS if cao.PROVIDERS[p].get("eager_input")]


def test_eager_providers_are_the_ones_that_queue_input_safely():
    # docs/providers/<cli>.md says why the others are not: Codex folds mid-turn input
    # into the running turn and drops that turn's answer, opencode drops a turn's
    # post-tool answer, Copilot starts an extra turn, Hermes interrupts the turn,
    # Gemini CLI and Qwen Code handed input sent at a turn's start back to the input
    # box, and Claude Code now and then dropped a message queued while it streamed.
    assert EAGER == ["kimi_cli"]


@pytest.mark.parametrize("provider", EAGER)
def test_real_eager_inbox_message_mid_turn_is_answered_once_in_the_next_turn(real_env, mock, provider):
    if not installed(provider):
        pytest.skip(f"{BINARIES[provider]} is not installed under {CLIS} (.ci/run installs it)")
    env = real_env(provider, CAO_EAGER_INBOX_DELIVERY="true")
    env.profile("agent", provider, "You answer.")
    # Varied words: Gemini stops a reply that repeats itself as a loop.
    mock.reply("TURN-ONE", text="ANSWER-ONE " + " ".join(f"w{i}" for i in range(60)), chunk_delay=0.15)
    mock.reply("TURN-TWO", text="ANSWER-TWO")
    term = env.start(provider)["id"]
    env.send(term, "TURN-ONE please")
    mock.wait_for(lambda r: r["kind"] == "main" and "TURN-ONE" in r["user_text"])
    code, posted = env.request("POST", f"/terminals/{term}/inbox/messages",
                               {"sender_id": "tester", "message": "TURN-TWO please"})
    assert code == 200, posted
    wait_for(lambda: env.request("GET", f"/terminals/{term}/inbox/messages")[1][0]["status"]
             == "delivered", 30, 0.05, "the eager delivery")
    status = None  # what the agent was doing when the message went in: busy, which is the point
    for event in env.request("GET", "/events?after=0")[1]["events"]:
        if event["terminal_id"] == term and event["kind"] == "status":
            status = event["data"]["status"]
        elif event["terminal_id"] == term and event["kind"] == "message_delivered":
            break
    assert status == "processing"
    second = mock.wait_for(lambda r: r["kind"] == "main" and "TURN-TWO" in r["user_text"], timeout=90)
    first = next(r for r in mock.main_requests() if "TURN-ONE" in r["user_text"])
    assert mock.requests.index(second) > mock.requests.index(first)
    wait_for(lambda: env.status(term) == "completed" and "ANSWER-TWO" in env.screen(term), 90, 0.1,
             "the answer to the message")
    asked = [r for r in mock.main_requests() if "TURN-TWO" in r["user_text"]]
    assert len(asked) == 1, [r["user_text"][:80] for r in asked]  # answered once, never twice


@_needs("claude_code")
def test_real_claude_drives_cao_through_the_ops_mcp_server(real_env, mock):
    env = real_env("claude_code")
    cao_cmd = [sys.executable, str(Path(cao.__file__).resolve())]
    write(env.profiles / "operator.md", "\n".join([
        "---", "name: operator", "description: drives cao from outside", "provider: claude_code",
        'allowedTools: ["*"]', "mcpServers:", "  cao-ops:", f"    command: {json.dumps(cao_cmd[0])}",
        f"    args: {json.dumps(cao_cmd[1:] + ['ops-mcp'])}", "---", "You run agent sessions.", ""]))
    mock.reply("warm up", text="warm")
    mock.reply("start a reviewer", tool="launch_session",
               arguments={"agent_profile": "reviewer", "provider": "demo", "session_name": "opsrun",
                          "initial_message": "look at the diff"}, then="LAUNCHED {result}")
    mock.reply("how is it going", tool="get_session_info", arguments={"session_name": "opsrun"},
               then="INFO {result}")
    term = env.start("claude_code", profile="operator", session="operator")["id"]
    _warm_up(env, mock, term, "launch_session")
    env.send(term, "start a reviewer")
    env.wait_status(term, "completed", timeout=120)
    code, session = env.request("GET", "/sessions/cao-opsrun")
    assert code == 200 and session["terminals"][0]["agent_profile"] == "reviewer", session
    env.send(term, "how is it going")
    env.wait_status(term, "completed", timeout=120)
    result = mock.wait_for(lambda r: r["kind"] == "main" and r["has_tool_result"]
                           and "cao-opsrun" in json.dumps(r["body"]) and "terminals" in json.dumps(r["body"]))
    assert session["terminals"][0]["id"] in json.dumps(result["body"])


@_needs("claude_code")
def test_real_claude_from_a_fresh_home_with_only_a_key_and_a_base_url(real_env, mock, tmp_path):
    """A new CI runner: no ~/.claude.json, nobody ran claude; only the two variables a CI
    secret gives. Claude's onboarding checks api.anthropic.com, which cannot pass here."""
    env = real_env()  # no user_setup: the HOME is empty
    assert not any(env.user_home.iterdir())
    env.env.update(ANTHROPIC_API_KEY="sk-ant-mock-key-0123456789abcdefghij",
                   ANTHROPIC_BASE_URL=mock.url)
    kill_pid(env.servers.pop())
    env.start_server()
    env.profile("agent", "claude_code", "You are the e2e agent.")
    mock.reply("fresh home", text="FRESH-HOME-ANSWER")
    term = env.start("claude_code")["id"]
    first_run = json.loads((env.user_home / ".claude.json").read_text())
    assert first_run["hasCompletedOnboarding"] is True
    assert re.fullmatch(r"\d+\.\d+\.\d+", first_run["lastOnboardingVersion"])
    env.send(term, "hello from a fresh home")
    env.wait_status(term, "completed")
    assert env.request("GET", f"/terminals/{term}/output?mode=last")[1]["output"] == "FRESH-HOME-ANSWER"


@_needs("claude_code")
def test_real_claude_with_an_unfinished_first_run_fails_at_once_with_the_fix(real_env, mock):
    env = real_env()
    write(env.user_home / ".claude.json", json.dumps({"firstStartTime": "2026-12-01T00:00:00Z"}))
    env.profile("agent", "claude_code", "You are the e2e agent.")
    started = time.monotonic()
    code, body = env.request("POST", "/sessions?agent_profile=agent&provider=claude_code"
                                     "&session_name=unfinished", timeout=60)
    assert code == 400 and time.monotonic() - started < 10
    assert body["detail"] == ("claude_code has not finished its first run in this HOME: "
                              "~/.claude.json has no hasCompletedOnboarding; run `claude` once and "
                              "finish its screens, or remove ~/.claude.json so that cao writes it")
    assert json.loads((env.user_home / ".claude.json").read_text()) == {
        "firstStartTime": "2026-12-01T00:00:00Z"}  # the user's file is left as it was


# Claude Code has its own two tests above.
FRESH_HOME_CLIS = ["codex", "gemini_cli", "opencode_cli", "qwen_code", "copilot_cli", "kimi_cli", "hermes"]


@pytest.mark.parametrize("provider", FRESH_HOME_CLIS)
def test_real_cli_from_a_fresh_home(real_env, mock, provider):
    """HOME holds nothing but what ci_setup gives (what a CI secret would): cao gets the
    CLI past its first-run screens to its prompt, and a turn is answered."""
    if not installed(provider):
        pytest.skip(f"{BINARIES[provider]} is not installed under {CLIS} (.ci/run installs it)")
    env = real_env()
    env.env.update(ci_setup(provider, env.user_home, mock.url))
    kill_pid(env.servers.pop())
    env.start_server()
    env.profile("agent", provider, "You are the e2e agent.")
    mock.reply("fresh machine", text=f"FRESH-{provider}")
    term = env.start(provider)["id"]
    if provider == "codex":
        # Its sign-in screen is gone because cao ran `codex login --with-api-key`. Its
        # built-in OpenAI provider then streams over a transport the mock does not serve,
        # so a turn against the mock needs a model_provider in config.toml instead.
        assert json.loads((env.user_home / ".codex" / "auth.json").read_text())["auth_mode"] == "apikey"
        assert env.status(term) in ("idle", "completed")
        assert "Sign in" not in env.screen(term)
        return
    env.send(term, "hello from a fresh machine")
    env.wait_status(term, "completed")
    code, answer = env.request("GET", f"/terminals/{term}/output?mode=last")
    assert code == 200 and answer["output"] == f"FRESH-{provider}", \
        (code, answer, env.screen(term)[-2000:])


NO_LOGIN_CLIS = [name for name in BINARIES if cao.PROVIDERS[name].get("login_screen")]


@pytest.mark.parametrize("provider", NO_LOGIN_CLIS)
def test_real_cli_with_no_credentials_fails_at_once_naming_the_fix(real_env, provider):
    """A fresh HOME and no key at all: the CLI shows its login screen (most at start,
    Codex after it drew its prompt), and `cao launch --headless` says so in one line
    within seconds instead of waiting out a timeout."""
    if not installed(provider):
        pytest.skip(f"{BINARIES[provider]} is not installed under {CLIS} (.ci/run installs it)")
    env = real_env()
    for name in cao.PROVIDERS[provider].get("credentials", {}).get("env", []):
        env.env.pop(name, None)
    kill_pid(env.servers.pop())
    env.start_server()
    env.profile("agent", provider, "You are the e2e agent.")
    started = time.monotonic()
    done = env.run("launch", "--agents", "agent", "--provider", provider, "--headless",
                   "--session-name", "nologin", "hello", timeout=120)
    took = time.monotonic() - started
    fix = cao.PROVIDERS[provider].get("credentials", {}).get("fix") or \
        f"run `{BINARIES[provider]}` once by hand"
    errors = [line for line in done.stderr.splitlines() if line.startswith("cao: error:")]
    assert done.returncode == 1 and len(errors) == 1, done
    assert f"{provider} has no credentials here" in errors[0] and fix in errors[0], errors
    assert took < 45, (took, done)


RESUME_CLIS = [p for p, spec in cao.PROVIDERS.items() if p in BINARIES
               and "resume" in spec.get("args", {})]


@pytest.mark.parametrize("provider", RESUME_CLIS)
def test_real_cli_continues_its_conversation_after_tmux_dies(real_env, mock, provider):
    if not installed(provider):
        pytest.skip(f"{BINARIES[provider]} is not installed under {CLIS} (.ci/run installs it)")
    _continue_after_tmux_dies(real_env(provider), mock, provider)


@_needs("copilot_cli")
def test_real_copilot_resumes_a_conversation_whose_lock_names_a_live_process(real_env, mock):
    """Copilot CLI asks "Session in use ... Resume anyway?" when its conversation's lock
    names a live process (a PID reused after a crash, or a dying CLI): cao answers it."""
    holder = subprocess.Popen(["sleep", "600"])
    try:
        def stale_lock(env):
            state = next((env.user_home / ".copilot" / "session-state").glob("*-*-*"))
            (state / f"inuse.{holder.pid}.lock").write_text(str(holder.pid))
        _continue_after_tmux_dies(real_env("copilot_cli"), mock, "copilot_cli", stale_lock)
    finally:
        holder.kill()
        holder.wait()


def _continue_after_tmux_dies(env, mock, provider, before_resume=lambda env: None):
    env.profile("agent", provider, "You are the e2e agent.")
    mock.reply("first turn", text="FIRST-ANSWER")
    term = env.start(provider)["id"]
    env.send(term, "first turn: remember RESUME-MARKER-77")
    env.wait_status(term, "completed")
    # Codex tells its conversation's id in its notify at the end of the turn.
    conversation = wait_for(lambda: env.request("GET", f"/terminals/{term}")[1]["conversation_id"],
                            30, what="the conversation id known")
    if provider == "claude_code":  # it saves the turn a moment after its Stop hook fires
        wait_for(lambda: any("RESUME-MARKER-77" in p.read_text(errors="replace") for p in
                             (env.user_home / ".claude" / "projects").glob("*/*.jsonl")),
                 60, what="Claude Code's transcript saved")
    pids = env.tmux_pids()
    env.tmux("kill-server")
    for pid in pids:  # the CLIs' own children (MCP servers) share their process groups
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    wait_for(lambda: env.request("GET", f"/terminals/{term}")[1]["lost"], 20, what="lost")
    before_resume(env)
    done = env.run("session", "resume", "e2e", timeout=200)
    assert done.returncode == 0 and "conversation resumed" in done.stdout, \
        done.stdout + done.stderr + env.screen(term)[-1500:]
    assert env.request("GET", f"/terminals/{term}")[1]["conversation_id"] == conversation
    mock.reply("second turn", text="SECOND-ANSWER")
    env.send(term, "second turn: what did I ask you to remember?")
    try:
        second = mock.wait_for(lambda r: r["kind"] == "main" and "second turn" in r["user_text"],
                               60)
    except AssertionError as e:
        raise AssertionError(f"{e}\nscreen: {env.screen(term)[-2000:]}") from None
    assert "RESUME-MARKER-77" in json.dumps(second["body"]), second["body"]
    # The resumed screen shows the first answer as completed; wait for the new one.
    wait_for(lambda: env.status(term) == "completed" and env.request(
        "GET", f"/terminals/{term}/output?mode=last")[1].get("output") == "SECOND-ANSWER", 90,
        what=f"the second answer (screen: {env.screen(term)[-1500:]!r})")
