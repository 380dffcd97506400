"""The provider table: demo status patterns and answer extraction, user-defined
providers from settings.json, and input that survives a CLI's sticky Enter."""
import json
import sys
from pathlib import Path

import pytest

import cao
from conftest import ROOT, wait_for

DEMO = cao.PROVIDERS["demo"]
BANNER = "cao demo agent (profile: developer). Type a message; Ctrl-D exits."
SCREENS = {
    "unknown": "\n\n",
    "idle": f"{BANNER}\n>\n\n\n",
    "idle_typing": f"{BANNER}\n> half typed\n",
    "processing": f"{BANNER}\n> do it\n/ working...\n\n",
    "completed": f"{BANNER}\n> do it\ndone: do it\n>\n\n",
    "completed_twice": f"{BANNER}\n> a\ndone: a\n> b\ndone: b\n>",
}


@pytest.mark.parametrize("name,screen", SCREENS.items())
def test_demo_status_patterns(name, screen):
    expected = name.split("_")[0]
    assert cao.detect_status(DEMO, screen) == expected


def test_demo_answer_is_the_text_after_the_last_input():
    assert cao.extract_answer(DEMO, SCREENS["completed_twice"]) == "done: b"
    assert cao.extract_answer(DEMO, SCREENS["idle"]) is None
    multi = f"{BANNER}\n> q\nline one\n\nline three\n>\n"
    assert cao.extract_answer(DEMO, multi) == "line one\n\nline three"


def test_launch_plan_fills_templates_per_feature():
    spec = {"command": ["tool", "--profile", "{profile}"],
            "args": {"always": ["--mcp", {"json": {"servers": "{mcp_servers}"}}],
                     "system_prompt": ["--prompt", "{system_prompt}"], "model": ["-m", "{model}"],
                     "yolo": ["--yes"], "restricted": ["--deny", "{disallowed_tools}"]},
            "env": {"ALWAYS": "{terminal_id}", "ONLY_YOLO": {"when": "yolo", "value": "1"}},
            "files": {"conf.toml": {"prefix": "notify=", "toml": "{hook}"}}}
    fields = {"profile": "dev", "system_prompt": 'say "hi"', "model": "", "terminal_id": "ab12cd34",
              "mcp_servers": {"cao": {"command": "py"}}, "hook": ["py", "cao.py", "hook"],
              "disallowed_tools": ["Bash", "Edit"], "restricted": True}
    argv, env, files = cao.launch_plan(spec, fields)
    assert argv == ["tool", "--profile", "dev", "--mcp", '{"servers": {"cao": {"command": "py"}}}',
                    "--prompt", 'say "hi"', "--deny", "Bash", "Edit"]
    assert env == {"ALWAYS": "ab12cd34"}
    assert files == {"conf.toml": 'notify=["py", "cao.py", "hook"]'}
    argv, env, _ = cao.launch_plan(spec, {**fields, "yolo": True, "restricted": False})
    assert "--yes" in argv and "--deny" not in argv and env["ONLY_YOLO"] == "1"
    assert cao.launch_plan(DEMO, {"profile": "x", "cao": cao.self_command()})[0][:2] == \
        cao.self_command()


def _settings(env, providers, **extra):
    env.home.mkdir(parents=True, exist_ok=True)
    (env.home / "settings.json").write_text(json.dumps({"providers": providers, **extra}))


@pytest.mark.parametrize("spec,message", [
    ({"command": "not a list"}, '"command" must be a non-empty list'),
    ({"command": ["x"], "status": [["busy", "x"]]}, "status 'busy' is not one of"),
    ({"command": ["x"], "status": [["idle", "("]]}, "\"status\" bad regex '('"),
    ({"command": ["x"], "colour": "red"}, "unknown field(s) colour"),
    ({"command": ["x", "--p={nosuch}"]}, "uses nosuch; known fields"),
    ({"command": ["x"], "args": {"colour": ["--red"]}}, '"args" must map features'),
    ({"command": ["x"], "mcp_server_keys": 5}, '"mcp_server_keys" must be an object'),
])
def test_bad_user_provider_is_a_clear_error(cao_env, spec, message):
    _settings(cao_env, {"mine": spec})
    result = cao_env.run("install", "developer", "--provider", "mine")
    assert result.returncode == 1
    assert message in result.stderr and "settings.json: provider 'mine'" in result.stderr


def test_missing_binary_names_the_install_command(cao_env):
    _settings(cao_env, {"ghost": {"command": ["ghost-cli"], "binary": "ghost-cli-not-here",
                                  "install": "npm i -g ghost-cli"}})
    cao_env.start_server()
    code, body = cao_env.request("POST", "/sessions?agent_profile=developer&provider=ghost")
    assert code == 400
    assert "needs `ghost-cli-not-here` on PATH; install it: npm i -g ghost-cli" in body["detail"]
    providers = {p["name"]: p for p in cao_env.request("GET", "/agents/providers")[1]}
    assert providers["ghost"]["installed"] is False


@pytest.mark.parametrize("late_echo", ["0", "0.6"], ids=["enter-as-newline", "late-echo"])
def test_user_provider_with_sticky_enter_gets_its_input_submitted(cao_env, late_echo):
    _settings(cao_env, {"sticky": {
        "command": [sys.executable, str(ROOT / "tests/fixtures/sticky_agent.py")],
        "env": {"STICKY_LATE_ECHO": late_echo},
        "status": [["completed", r"^ok: .*\n>( .*)?\Z"], ["idle", r"^>( .*)?\Z"]],
        "answer": {"start": r"^> \S", "end": r"^>( .*)?$"},
        "exit": {"keys": ["C-d"]}}}, default_provider="sticky")
    cao_env.start_server()
    code, term = cao_env.request("POST", "/sessions?agent_profile=developer&session_name=sticky")
    assert code == 201 and term["provider"] == "sticky" and term["status"] == "idle"
    assert cao_env.request("POST", f"/terminals/{term['id']}/input",
                           {"message": "two\nlines"})[0] == 200
    wait_for(lambda: cao_env.request("GET", f"/terminals/{term['id']}")[1]["status"] == "completed",
             what="sticky agent to take the input")
    screen = cao_env.request("GET", f"/terminals/{term['id']}/output")[1]["output"]
    answers = [line for line in screen.splitlines() if line.startswith("ok: ")]
    assert len(answers) == 1 and answers[0].startswith("ok: two")
    assert "enters=1)" not in answers[0]  # the first Enter was swallowed and re-sent


def test_multiline_message_is_one_input_for_the_demo(server):
    code, term = server.request("POST", "/sessions?agent_profile=developer&provider=demo"
                                        "&session_name=paste")
    message = "line one\nline two\nline three"
    assert server.request("POST", f"/terminals/{term['id']}/input", {"message": message})[0] == 200
    wait_for(lambda: server.request("GET", f"/terminals/{term['id']}")[1]["status"] == "completed",
             what="answer")
    screen = server.request("GET", f"/terminals/{term['id']}/output")[1]["output"]
    assert [l for l in screen.splitlines() if l.startswith("done:")] == ["done: line one"]
    assert "line one\u21b5line two\u21b5line three" in screen


@pytest.mark.parametrize("settle,first,late,expected", [
    (0, "first half", "1.0", "go first half"),  # without settle the test sees the bug
    (1.5, "first half", "1.0", "go first half, second half"),
    (0, "", "0.5", "go first half, second half"),  # a done screen without its answer waits
    (0, "", "30", None),  # ... but not forever (cao.NO_ANSWER_WAIT)
], ids=["no-settle", "settle", "answer-after-done", "answer-never-drawn"])
def test_completed_waits_for_an_answer_drawn_after_the_done_screen(cao_env, settle, first, late,
                                                                   expected):
    _settings(cao_env, {"late": {
        "command": [sys.executable, str(ROOT / "tests/fixtures/late_answer_agent.py")],
        "env": {"LATE_FIRST": first, "LATE_DRAW": late},
        "status": [["processing", r"^working\.\.\."], ["completed", r"^answer:.*\n>\s*\Z"],
                   ["idle", r"^>\s*\Z"]],
        "answer": {"start": r"^answer: ?", "keep_start": True, "end": r"^>"},
        "settle": settle, "exit": {"keys": ["C-d"]}}}, default_provider="late")
    cao_env.start_server()
    code, term = cao_env.request("POST", "/sessions?agent_profile=developer&session_name=late")
    assert code == 201 and term["status"] == "idle", term
    assert cao_env.request("POST", f"/terminals/{term['id']}/input", {"message": "go"})[0] == 200
    wait_for(lambda: cao_env.request("GET", f"/terminals/{term['id']}")[1]["status"] == "completed",
             what="the late agent's done screen")
    code, body = cao_env.request("GET", f"/terminals/{term['id']}/output?mode=last")
    assert (code, body.get("output")) == ((200, expected) if expected else (404, None)), body


@pytest.mark.parametrize("via", ["handoff", "headless launch"])
def test_a_turn_drawn_after_the_grace_still_yields_its_answer(cao_env, via):
    """Seen in CI with Codex: the worker took the message but drew its turn only after
    the tracker's turn_start_grace, so it looked idle with no answer for a while."""
    _settings(cao_env, {"late": {
        "command": [sys.executable, str(ROOT / "tests/fixtures/late_answer_agent.py")],
        "env": {"LATE_START": "3", "LATE_DRAW": "0.2"}, "turn_start_grace": 0.5, "settle": 0.5,
        "status": [["processing", r"^working\.\.\."], ["completed", r"^answer:.*\n>\s*\Z"],
                   ["idle", r"^>\s*\Z"]],
        "answer": {"start": r"^answer: ?", "keep_start": True, "end": r"^>"},
        "exit": {"keys": ["C-d"]}}}, default_provider="late")
    cao_env.start_server()
    if via == "handoff":
        code, step = cao_env.request("POST", "/terminals/run-step", {
            "agent": "developer", "provider": "late", "prompt": "go", "timeout": 60}, timeout=90)
        assert code == 200 and step["last_message"] == "go first half, second half", step
    else:
        done = cao_env.run("launch", "--agents", "developer", "--headless", "--session-name", "l",
                           "go", timeout=90)
        assert done.returncode == 0 and done.stdout.endswith("\ngo first half, second half\n"), done


def test_the_answer_is_none_while_the_newest_one_is_still_drawn():
    spec = {"answer": {"start": r"^A: ", "keep_start": True, "end": r"^>"}}
    screen = "> q1\nA: one\n> q2\nA: two, still dra"
    assert cao.extract_answer(spec, screen) is None  # never the previous turn's answer
    assert cao.extract_answer(spec, screen + "wn\n>") == "two, still drawn"
    skip_open = {"answer": {**spec["answer"], "skip_open": True}}  # opencode's input box
    assert cao.extract_answer(skip_open, screen) == "one"


def test_every_builtin_entry_passes_the_field_schema_and_every_field_is_documented():
    for name, spec in cao.PROVIDERS.items():
        assert cao._check_provider(name, spec, "built-in") is spec
    text = (ROOT / "docs" / "providers.md").read_text()
    table = text[text.index("## The fields"):].split("\n## ")[0]
    documented = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            documented |= {cell.strip(" `") for cell in line.split("|")[1].split(", ")}
    assert documented == set(cao.PROVIDER_FIELDS)


def test_opencode_done_line_may_share_its_row_with_the_sidebar():
    spec = cao.PROVIDERS["opencode_cli"]
    screen = ("  ┃  MULTI-LINE-77 what now                                       $0.00 spent\n"
              "     MOCK-ANSWER                                                 • cao-mcp-server Connected\n"
              "     ▣  Build · Mock Model · 2.0s                                LSP\n"
              "  ┃\n  ┃  Build · Mock Model Mock\n")
    assert cao.detect_status(spec, screen) == "completed"
    assert cao.extract_answer(spec, screen) == "MOCK-ANSWER"


def test_a_paste_placeholder_counts_as_text_still_in_the_input_box():
    claude = cao.PROVIDERS["claude_code"]
    assert cao._still_in_input(claude, "❯ [Pasted text #1 +4 lines]\n", "what now")
    assert not cao._still_in_input(claude, "❯ \n", "what now")
    assert cao._still_in_input(cao.PROVIDERS["opencode_cli"], "┃ [Pasted ~5 lines]\n", "x")


def test_a_home_overlay_links_the_users_folder_and_merges_cao_settings_over_theirs(tmp_path):
    user_home, context, cao_home = tmp_path / "user", tmp_path / "cao" / "t1", tmp_path / "cao"
    (user_home / ".gemini" / "extensions").mkdir(parents=True)
    (user_home / ".gemini" / "oauth_creds.json").write_text('{"token": "t"}')
    theirs = ('{\n  // my own server\n  "mcpServers": {"mine": {"command": "x"}},\n'
              '  "tools": {"exclude": ["web_fetch"]}, /* dark */ "ui": {"theme": "a//b"}\n}\n')
    (user_home / ".gemini" / "settings.json").write_text(theirs)
    context.mkdir(parents=True)
    overlay = cao.PROVIDERS["gemini_cli"]["home_overlay"]
    fields = {"mcp_command": "python3", "mcp_args": ["cao.pyz", "mcp"], "mcp_env": {"A": "1"},
              "disallowed_tools": ["run_shell_command"]}
    env = cao.build_home_overlay(overlay, fields, context, user_home, cao_home, {})
    assert env == {"GEMINI_CLI_HOME": str(context / "home")}
    folder = context / "home" / ".gemini"
    assert (folder / "oauth_creds.json").resolve() == user_home / ".gemini" / "oauth_creds.json"
    assert (folder / "extensions").is_symlink() and not (folder / "settings.json").is_symlink()
    merged = json.loads((folder / "settings.json").read_text())
    assert merged["mcpServers"]["mine"] == {"command": "x"}
    assert merged["mcpServers"][cao.CAO_MCP_NAME]["args"] == ["cao.pyz", "mcp"]
    assert merged["tools"]["exclude"] == ["web_fetch", "run_shell_command"]
    assert merged["ui"] == {"theme": "a//b"} and merged["general"]["enableAutoUpdate"] is False
    assert (user_home / ".gemini" / "settings.json").read_text() == theirs  # never changed
    assert "security" not in merged  # no key in the environment: the login picker decides
    key = {"GEMINI_API_KEY": "k"}
    fresh = cao.build_home_overlay(overlay, fields, tmp_path / "cao" / "t2", tmp_path / "nobody",
                                   cao_home, key)  # a fresh HOME and a key, as in CI
    settings = json.loads((Path(fresh["GEMINI_CLI_HOME"]) / ".gemini" / "settings.json").read_text())
    assert settings["mcpServers"].keys() == {cao.CAO_MCP_NAME}
    assert settings["security"] == {"auth": {"selectedType": "gemini-api-key"}}
    (user_home / ".gemini" / "settings.json").write_text(
        '{"security": {"auth": {"selectedType": "oauth-personal"}}}')
    mine = cao.build_home_overlay(overlay, fields, tmp_path / "cao" / "t4", user_home, cao_home, key)
    assert json.loads((Path(mine["GEMINI_CLI_HOME"]) / ".gemini" / "settings.json").read_text())[
        "security"]["auth"]["selectedType"] == "oauth-personal"  # the user's choice wins
    (user_home / ".gemini" / "settings.json").write_text('{"ui": ')
    with pytest.raises(cao.ConfigError, match=r"settings.json: not valid JSON \(.*\); fix it or move it away"):
        cao.build_home_overlay(overlay, fields, tmp_path / "cao" / "t3", user_home, cao_home, {})


def test_a_json_variable_the_user_set_is_merged_not_replaced():
    ours = json.dumps({"mcp": {"cao": {"type": "local"}}, "instructions": ["a.md"]})
    theirs = json.dumps({"model": "mock/m", "mcp": {"mine": {"type": "remote"}}})
    merged = json.loads(cao._json_over_users("OPENCODE_CONFIG_CONTENT", theirs, ours))
    assert merged == {"model": "mock/m", "mcp": {"mine": {"type": "remote"}, "cao": {"type": "local"}},
                      "instructions": ["a.md"]}
    assert cao._json_over_users("X", None, ours) == ours
    with pytest.raises(cao.ConfigError, match=r"\$X is not JSON .*; fix it or unset it"):
        cao._json_over_users("X", "{oops", ours)


def test_copilot_answer_ends_at_a_notice_drawn_after_it():
    """Seen in CI from a fresh HOME: cao's MCP server connected after the first turn."""
    screen = (" ❯ hello from a fresh machine\n\n ● FRESH-copilot_cli\n\n"
              " ● MCP Servers reloaded: 1 server connected\n\n\n"
              " /tmp/pytest-of-root/project\n" + "─" * 40 + "\n❯\n" + "─" * 40 + "\n"
              " ← open sidebar · Interactive · Manual Approval · / commands · ? help\n")
    spec = cao.PROVIDERS["copilot_cli"]
    assert cao.detect_status(spec, screen) == "completed"
    assert cao.extract_answer(spec, screen) == "FRESH-copilot_cli"
