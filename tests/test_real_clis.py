"""Real agent CLIs, installed from npm and PyPI, driven by cao against tests/mock_llm.py.

The CLIs live under $CAO_TEST_CLIS (default ~/.cache/cao-clis; .ci/run installs them
there at pinned versions). A CLI that is not installed is skipped with the reason.
Each test plays a user who has set the CLI up once (its API endpoint and key point at
the mock); everything else - trust dialogs, the MCP server, hooks, the system prompt -
is cao's job.
"""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import CaoEnv, kill_pid, pid_alive, wait_for
from mock_llm import MockLLM

pytestmark = pytest.mark.real_cli
CLIS = Path(os.environ.get("CAO_TEST_CLIS", Path.home() / ".cache" / "cao-clis"))
BIN_DIRS = [CLIS / "npm" / "node_modules" / ".bin", CLIS / "kimi-venv" / "bin",
            CLIS / "hermes-venv" / "bin"]
BINARIES = {"claude_code": "claude", "codex": "codex", "gemini_cli": "gemini",
            "opencode_cli": "opencode", "copilot_cli": "copilot", "qwen_code": "qwen",
            "kimi_cli": "kimi", "hermes": "hermes"}


def _installed(provider):
    return any((d / BINARIES[provider]).exists() for d in BIN_DIRS)


def _needs(*providers):
    missing = [p for p in providers if not _installed(p)]
    return pytest.mark.skipif(bool(missing), reason=f"not installed under {CLIS}: "
                              f"{', '.join(BINARIES[p] for p in missing)} (.ci/run installs them)")


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def user_setup(provider, home, mock_url):
    """What a user does once per CLI (log in, pick an endpoint), aimed at the mock.
    Returns the environment variables the user would export."""
    v1 = mock_url + "/v1"
    if provider == "claude_code":
        _write(home / ".claude.json", json.dumps({"hasCompletedOnboarding": True, "theme": "dark"}))
        return {"ANTHROPIC_BASE_URL": mock_url, "ANTHROPIC_AUTH_TOKEN": "mock-key",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1",
                "DISABLE_ERROR_REPORTING": "1"}
    if provider == "codex":
        _write(home / ".codex" / "config.toml", "\n".join([
            'model = "gpt-5"', 'model_provider = "mock"', "check_for_update_on_startup = false",
            "[model_providers.mock]", 'name = "mock"', f'base_url = "{v1}"',
            'env_key = "MOCK_API_KEY"', 'wire_api = "responses"', "[analytics]", "enabled = false", ""]))
        return {"MOCK_API_KEY": "mock-key"}
    if provider in ("gemini_cli", "qwen_code"):
        qwen = provider == "qwen_code"
        settings = {"security": {"auth": {"selectedType": "openai" if qwen else "gemini-api-key"}},
                    "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False},
                    "privacy": {"usageStatisticsEnabled": False}, "telemetry": {"enabled": False},
                    "ui": {"theme": "Default"}}
        if qwen:
            settings["model"] = {"name": "mock-model"}
            _write(home / ".qwen" / "settings.json", json.dumps(settings))
            return {"OPENAI_API_KEY": "mock-key", "OPENAI_BASE_URL": v1, "OPENAI_MODEL": "mock-model"}
        _write(home / ".gemini" / "settings.json", json.dumps(settings))
        return {"GEMINI_API_KEY": "mock-key", "GOOGLE_GEMINI_BASE_URL": mock_url,
                "COLORTERM": "truecolor"}
    if provider == "opencode_cli":
        _write(home / ".config" / "opencode" / "opencode.json", json.dumps({
            "model": "mock/mock-model", "small_model": "mock/mock-model", "autoupdate": False,
            "share": "disabled", "provider": {"mock": {
                "npm": "@ai-sdk/openai-compatible", "name": "Mock",
                "options": {"baseURL": v1, "apiKey": "mock-key"},
                "models": {"mock-model": {"name": "Mock Model", "tool_call": True,
                                          "limit": {"context": 128000, "output": 4096}}}}}}))
        return {"OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
                "OPENCODE_DISABLE_SHARE": "1"}
    if provider == "copilot_cli":
        return {"COPILOT_OFFLINE": "true", "COPILOT_PROVIDER_BASE_URL": v1,
                "COPILOT_PROVIDER_TYPE": "openai", "COPILOT_PROVIDER_API_KEY": "mock-key",
                "COPILOT_MODEL": "gpt-4o"}
    if provider == "kimi_cli":
        _write(home / ".kimi" / "config.toml", "\n".join([
            'default_model = "mock"', "[providers.mockp]", 'type = "openai_legacy"',
            f'base_url = "{v1}"', 'api_key = "mock-key"', "[models.mock]", 'provider = "mockp"',
            'model = "mock-model"', "max_context_size = 128000", ""]))
        return {}
    if provider == "hermes":
        _write(home / ".hermes" / "config.yaml", "\n".join([
            "model:", "  provider: custom", f"  base_url: {v1}", "  api_key: mock-key",
            "  default: mock-model", "  api_mode: chat_completions", ""]))
        return {}
    raise AssertionError(provider)


class RealEnv(CaoEnv):
    """A cao server whose agents see a fresh HOME set up for the mock."""

    def __init__(self, tmp_path, mock, providers):
        super().__init__(tmp_path)
        self.user_home = tmp_path / "user-home"
        self.user_home.mkdir()
        path = os.pathsep.join([str(d) for d in BIN_DIRS] + [os.environ.get("PATH", "")])
        self.env.update(HOME=str(self.user_home), PATH=path, CAO_PROVIDER_INIT_TIMEOUT="90")
        for provider in providers:
            self.env.update(user_setup(provider, self.user_home, mock.url))
        profiles = self.home / "agent-store"
        profiles.mkdir(parents=True)
        self.profiles = profiles

    def profile(self, name, provider, prompt, **front):
        lines = [f"name: {name}", f"description: e2e {name}", f"provider: {provider}"]
        lines += [f"{k}: {json.dumps(v)}" for k, v in front.items()]
        _write(self.profiles / f"{name}.md", "---\n" + "\n".join(lines) + "\n---\n" + prompt + "\n")

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


def _env(tmp_path, mock, *providers):
    env = RealEnv(tmp_path, mock, providers)
    env.start_server()
    return env


@pytest.fixture
def real_env(tmp_path, mock):
    envs = []

    def make(*providers):
        env = _env(tmp_path, mock, *providers)
        envs.append(env)
        return env
    yield make
    for env in envs:
        env.cleanup()


TURN_CLIS = list(BINARIES)


@pytest.mark.parametrize("provider", TURN_CLIS)
def test_real_cli_turn_status_and_answer(real_env, mock, provider):
    if not _installed(provider):
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
    assert seen[0] == "processing" and seen[-1] == "completed", seen
    code, body = env.request("GET", f"/terminals/{term}/output?mode=last")
    assert code == 200 and body["output"] == f"REAL-ANSWER-{provider}", env.screen(term)[-2000:]
    main = mock.wait_for(lambda r: r["kind"] == "main" and "please answer" in r["user_text"])
    if provider != "opencode_cli":  # opencode adds the prompt as an instructions file
        assert "PROMPT-MARKER-31" in main["system_text"] + json.dumps(main["body"])
    # A second turn: the status cycles again, and by now the CLI has connected to
    # cao's MCP server (CLIs do not wait for MCP servers before their first prompt).
    mock.reply("second question", text=f"SECOND-ANSWER-{provider}")
    seq = env.last_seq()
    env.send(term, "the second question")
    env.wait_status(term, "completed")
    assert env.statuses_since(seq, term)[0] == "processing"
    assert env.request("GET", f"/terminals/{term}/output?mode=last")[1]["output"] == \
        f"SECOND-ANSWER-{provider}"
    second = mock.wait_for(lambda r: r["kind"] == "main" and "second question" in r["user_text"])
    if provider != "hermes":  # hermes reads MCP servers only from its own config.yaml
        assert any(name.endswith("handoff") for name in second["tool_names"]) or \
            "handoff" in second["system_text"], second["tool_names"]
