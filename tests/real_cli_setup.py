"""How a user points each real agent CLI at tests/mock_llm.py (shared by the
real-CLI tests, bench/bench_providers.py and bench/capture_screens.py).

The CLIs live under $CAO_TEST_CLIS (default ~/.cache/cao-clis; .ci/install-clis
puts them there at pinned versions).
"""
import json
import os
from pathlib import Path

CLIS = Path(os.environ.get("CAO_TEST_CLIS", Path.home() / ".cache" / "cao-clis"))
BIN_DIRS = [CLIS / "npm" / "node_modules" / ".bin", CLIS / "kimi-venv" / "bin",
            CLIS / "hermes-venv" / "bin"]
BINARIES = {"claude_code": "claude", "codex": "codex", "gemini_cli": "gemini",
            "opencode_cli": "opencode", "copilot_cli": "copilot", "qwen_code": "qwen",
            "kimi_cli": "kimi", "hermes": "hermes"}


def installed(provider):
    return any((d / BINARIES[provider]).exists() for d in BIN_DIRS)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def user_setup(provider, home, mock_url, updates_off=True):
    """What a user does once per CLI (log in, pick an endpoint), aimed at the mock.
    Returns the environment variables the user would export. updates_off=False
    leaves Gemini's and Qwen's self-update on, as a user who never looked at it
    (cao must keep them from updating themselves)."""
    v1 = mock_url + "/v1"
    if provider == "claude_code":
        write(home / ".claude.json", json.dumps({"hasCompletedOnboarding": True, "theme": "dark"}))
        return {"ANTHROPIC_BASE_URL": mock_url, "ANTHROPIC_AUTH_TOKEN": "mock-key",
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1",
                "DISABLE_ERROR_REPORTING": "1"}
    if provider == "codex":
        write(home / ".codex" / "config.toml", "\n".join([
            'model = "gpt-5"', 'model_provider = "mock"', "check_for_update_on_startup = false",
            "[model_providers.mock]", 'name = "mock"', f'base_url = "{v1}"',
            'env_key = "MOCK_API_KEY"', 'wire_api = "responses"', "[analytics]", "enabled = false", ""]))
        return {"MOCK_API_KEY": "mock-key"}
    if provider in ("gemini_cli", "qwen_code"):
        qwen = provider == "qwen_code"
        settings = {"security": {"auth": {"selectedType": "openai" if qwen else "gemini-api-key"}},
                    "privacy": {"usageStatisticsEnabled": False}, "telemetry": {"enabled": False},
                    "ui": {"theme": "Default"}}
        if updates_off:
            settings["general"] = {"enableAutoUpdate": False, "enableAutoUpdateNotification": False}
        if qwen:
            settings["model"] = {"name": "mock-model"}
            write(home / ".qwen" / "settings.json", json.dumps(settings))
            return {"OPENAI_API_KEY": "mock-key", "OPENAI_BASE_URL": v1, "OPENAI_MODEL": "mock-model"}
        write(home / ".gemini" / "settings.json", json.dumps(settings))
        return {"GEMINI_API_KEY": "mock-key", "GOOGLE_GEMINI_BASE_URL": mock_url,
                "COLORTERM": "truecolor"}
    if provider == "opencode_cli":
        write(home / ".config" / "opencode" / "opencode.json", json.dumps({
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
        write(home / ".kimi" / "config.toml", "\n".join([
            'default_model = "mock"', "[providers.mockp]", 'type = "openai_legacy"',
            f'base_url = "{v1}"', 'api_key = "mock-key"', "[models.mock]", 'provider = "mockp"',
            'model = "mock-model"', "max_context_size = 128000", ""]))
        return {}
    if provider == "hermes":
        write(home / ".hermes" / "config.yaml", "\n".join([
            "model:", "  provider: custom", f"  base_url: {v1}", "  api_key: mock-key",
            "  default: mock-model", "  api_mode: chat_completions", ""]))
        return {}
    raise AssertionError(provider)


def ci_setup(provider, home, mock_url):
    """The least a CI job gives each CLI, from its own docs for non-interactive use:
    environment variables where the CLI reads them, a config file only where it has no
    other way (hermes). No first-run flags, no theme: cao must get past those itself."""
    v1 = mock_url + "/v1"
    if provider == "claude_code":
        return {"ANTHROPIC_API_KEY": "sk-ant-mock-key-0123456789abcdefghij",
                "ANTHROPIC_BASE_URL": mock_url}
    if provider == "codex":
        return {"OPENAI_API_KEY": "mock-key", "OPENAI_BASE_URL": v1}
    if provider == "gemini_cli":
        return {"GEMINI_API_KEY": "mock-key", "GOOGLE_GEMINI_BASE_URL": mock_url}
    if provider == "qwen_code":
        return {"OPENAI_API_KEY": "mock-key", "OPENAI_BASE_URL": v1, "OPENAI_MODEL": "mock-model"}
    if provider == "opencode_cli":
        return {"OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
                "OPENCODE_CONFIG_CONTENT": json.dumps({"model": "mock/mock-model", "provider": {"mock": {
            "npm": "@ai-sdk/openai-compatible", "name": "Mock",
            "options": {"baseURL": v1, "apiKey": "mock-key"},
            "models": {"mock-model": {"name": "Mock Model", "tool_call": True,
                                      "limit": {"context": 128000, "output": 4096}}}}}})}
    if provider == "copilot_cli":
        return {"COPILOT_PROVIDER_BASE_URL": v1, "COPILOT_PROVIDER_TYPE": "openai",
                "COPILOT_PROVIDER_API_KEY": "mock-key", "COPILOT_MODEL": "gpt-4o"}
    if provider == "kimi_cli":
        return {"KIMI_API_KEY": "mock-key", "KIMI_BASE_URL": v1, "KIMI_MODEL_NAME": "mock-model"}
    if provider == "hermes":
        user_setup(provider, home, mock_url)  # hermes reads its endpoint only from config.yaml
        return {}
    raise AssertionError(provider)


# A native tool call that each CLI asks a person to approve (with no yolo flag).
APPROVAL = {
    "opencode_cli": ("bash", {"command": "touch cao-approved-file", "description": "make a file"}),
    "claude_code": ("Bash", {"command": "touch cao-approved-file", "description": "make a file"}),
    "codex": ("exec_command", {"cmd": "touch cao-approved-file",
                               "sandbox_permissions": "require_escalated",
                               "justification": "make a file"}),
    "gemini_cli": ("run_shell_command", {"command": "touch cao-approved-file",
                                         "description": "make a file"}),
    "qwen_code": ("run_shell_command", {"command": "touch cao-approved-file",
                                        "description": "make a file"}),
    "copilot_cli": ("bash", {"command": "touch cao-approved-file", "description": "make a file"}),
    "kimi_cli": ("Shell", {"command": "touch cao-approved-file"}),
    # hermes asks only for commands it deems dangerous; this path does not exist.
    "hermes": ("terminal", {"command": "rm -rf /cao-no-such-dir"}),
}


def ask_before_commands(provider, home):
    """The user's choice to approve commands, for the two CLIs that run them unasked by default."""
    if provider == "codex":
        config = home / ".codex" / "config.toml"
        config.write_text('approval_policy = "on-request"\n' + config.read_text(), "utf-8")
    if provider == "opencode_cli":
        config = home / ".config" / "opencode" / "opencode.json"
        settings = json.loads(config.read_text(encoding="utf-8"))
        config.write_text(json.dumps({**settings, "permission": {"bash": "ask"}}), "utf-8")
