"""Refresh the screen corpus (tests/fixtures/screens/) from the real CLIs.

    python3 bench/capture_screens.py                      # every installed CLI, 220x50 and 80x24
    python3 bench/capture_screens.py --cli codex --sizes 80x24

For each CLI this starts a cao server on a private tmux socket, points the CLI at
tests/mock_llm.py (tests/real_cli_setup.py), and drives one terminal per size through
idle -> processing -> completed -> waiting_user_answer. Each screen is saved plain and
with escapes as <state>-<W>x<H>.txt / .ansi.txt under <cli>-<version>/, and labelled in
labels.json from what the mock knows, not from cao's patterns: processing is captured
while the mock holds the answer back, completed after the mock's last byte once the
screen is still, waiting after the mock asked for a tool that needs approval and no
result came back. The review table compares each label with what cao reads; a CLI
update is this command, a look at the table, and `pytest tests/test_screens.py`.

The CLIs come from $CAO_TEST_CLIS (see .ci/install-clis). Needs the `mcp` package in
the interpreter that runs this (cao gives each agent its MCP server).
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(Path(__file__).parent)]

import cao  # noqa: E402
from _common import free_port, http_json, stop_group, wait_healthy  # noqa: E402
from mock_llm import MockLLM  # noqa: E402
from real_cli_setup import (APPROVAL, BINARIES, BIN_DIRS, ask_before_commands,  # noqa: E402
                            installed, user_setup)

CORPUS = REPO / "tests" / "fixtures" / "screens"
FOLDER_PREFIX = {"claude_code": "claude", "codex": "codex", "gemini_cli": "gemini",
                 "opencode_cli": "opencode", "copilot_cli": "copilot", "qwen_code": "qwen-code",
                 "kimi_cli": "kimi-cli", "hermes": "hermes-agent"}
ANSWER = "CAPTURE-ANSWER-7"
STILL_FOR = 1.5   # a screen unchanged this long counts as settled
SETTLE_LIMIT = 20.0


class CaptureRun:
    """One cao server with a fresh HOME aimed at the mock, on a private tmux socket."""

    def __init__(self, provider, mock):
        self.provider = provider
        # Gemini CLI ignores a settings file below a world-writable directory such as /tmp.
        self.root = Path.home() / ".cache" / "cao-capture" / uuid.uuid4().hex[:10]
        self.cao_home = self.root / "cao-home"
        self.workdir = self.root / "work"
        for d in (self.cao_home / "agent-store", self.workdir, self.root / "home"):
            d.mkdir(parents=True)
        self.socket = f"cao-capture-{uuid.uuid4().hex[:8]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TMUX", "CAO_"))}
        env.update(HOME=str(self.root / "home"), CAO_HOME_DIR=str(self.cao_home),
                   CAO_TMUX_SOCKET=self.socket, CAO_PROVIDER_INIT_TIMEOUT="90",
                   PATH=os.pathsep.join([str(d) for d in BIN_DIRS] + [env.get("PATH", "")]))
        env.update(user_setup(provider, self.root / "home", mock.url))
        ask_before_commands(provider, self.root / "home")
        self.env = env
        (self.cao_home / "agent-store" / "capture.md").write_text(
            f"---\nname: capture\ndescription: screen capture\nprovider: {provider}\n---\n"
            "You answer briefly.\n", encoding="utf-8")
        self.port = free_port()
        self.server = subprocess.Popen(
            [sys.executable, str(REPO / "cao.py"), "server", "--port", str(self.port)],
            env=env, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_healthy(self.port, self.server)

    def request(self, method, path, body=None, timeout=120):
        return http_json(self.port, method, path, body, timeout)

    def tmux(self, *args):
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, env=self.env).stdout

    def close(self):
        for pid in self.tmux("list-panes", "-a", "-F", "#{pane_pid}").split():
            try:  # a CLI's children (MCP servers, shells) share its process group
                os.killpg(os.getpgid(int(pid)), signal.SIGKILL)
            except (ProcessLookupError, PermissionError, ValueError):
                pass
        stop_group(self.server)
        self.tmux("kill-server")
        shutil.rmtree(self.root, ignore_errors=True)


def _capture(run, target):
    plain = run.tmux("capture-pane", "-p", "-J", "-t", target)
    return plain, run.tmux("capture-pane", "-p", "-e", "-J", "-t", target)


def _settled(run, target, since=None):
    """The screen once it has not changed for STILL_FOR s (or at SETTLE_LIMIT)."""
    start = since or time.monotonic()
    last, changed = None, time.monotonic()
    while True:
        shot = _capture(run, target)
        now = time.monotonic()
        if last is None or shot[0] != last[0]:
            last, changed = shot, now
        if now - changed >= STILL_FOR or now - start > SETTLE_LIMIT:
            return last
        time.sleep(0.1)


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def capture_size(provider, mock, size):
    """{state name: (plain, ansi, label)} for one CLI at one window size."""
    width, height = size
    run = CaptureRun(provider, mock)
    shots = {}
    try:
        code, term = run.request("POST", "/sessions?agent_profile=capture&session_name=capture"
                                         f"&provider={provider}")
        if code != 201:
            raise RuntimeError(f"POST /sessions answered {code}: {term}")
        target = f"={term['tmux_session']}:{term['tmux_window']}"
        run.tmux("resize-window", "-t", target, "-x", str(width), "-y", str(height))
        shots["idle"] = (*_settled(run, target), {"status": "idle"})

        slow = f"capture slow question {uuid.uuid4().hex[:6]}"
        mock.reply(slow, text=ANSWER, delay=6.0, times=1)
        run.request("POST", f"/terminals/{term['id']}/input", {"message": slow})
        request = mock.wait_for(lambda r: r["kind"] == "main" and slow in r["user_text"], 60)
        _wait(lambda: time.time() - request["time"] >= 1.5, 10, "the answer to be held")
        shots["processing"] = (*_capture(run, target), {"status": "processing"})
        _wait(lambda: request["last_byte_at"] is not None, 30, "the mock's answer")
        shots["completed"] = (*_settled(run, target), {"status": "completed", "answer": ANSWER})

        if provider in APPROVAL:
            tool, arguments = APPROVAL[provider]
            ask = f"capture approval question {uuid.uuid4().hex[:6]}"
            mock.reply(ask, tool=tool, arguments=arguments, then="approved", times=1)
            run.request("POST", f"/terminals/{term['id']}/input", {"message": ask})
            asked = mock.wait_for(lambda r: r["kind"] == "main" and ask in r["user_text"], 60)
            _wait(lambda: asked["last_byte_at"] is not None, 30, "the tool call")
            plain, ansi = _settled(run, target)
            if any(r["has_tool_result"] and ask in r["user_text"] for r in mock.main_requests()):
                print(f"  {provider}: the {tool} call ran without asking; no waiting screen",
                      file=sys.stderr)
            else:
                shots["waiting_user_answer"] = (plain, ansi, {"status": "waiting_user_answer"})
    finally:
        run.close()
    return shots


def version_folder(provider):
    binary = next(d / BINARIES[provider] for d in BIN_DIRS if (d / BINARIES[provider]).exists())
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    found = re.search(r"\d+\.\d+\.\d+", out.stdout + out.stderr)
    if not found:
        raise RuntimeError(f"{binary} --version printed no version: {out.stdout[:80]!r}")
    return f"{FOLDER_PREFIX[provider]}-{found.group()}"


def review(provider, name, plain, label):
    spec = cao.PROVIDERS[provider]
    seen = cao.detect_status(spec, plain)
    verdict = "ok" if seen == label["status"] else f"MISMATCH: cao reads {seen}"
    if label.get("answer") and seen == "completed":
        got = cao.extract_answer(spec, plain)
        if got != label["answer"]:
            verdict = f"MISMATCH: cao extracts {got!r}"
    print(f"  {provider:13} {name:34} {label['status']:20} {verdict}")
    return verdict == "ok"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cli", default=",".join(BINARIES),
                        help="comma-separated providers (default: every registry CLI)")
    parser.add_argument("--sizes", default="220x50,80x24", help="window sizes, WxH,WxH")
    parser.add_argument("--out", type=Path, default=CORPUS, help="corpus directory")
    args = parser.parse_args(argv)
    sizes = [tuple(int(n) for n in s.split("x")) for s in args.sizes.split(",")]
    labels_path = args.out / "labels.json"
    labels = json.loads(labels_path.read_text(encoding="utf-8")) if labels_path.exists() else {}
    all_ok = True
    for provider in args.cli.split(","):
        if provider not in BINARIES:
            parser.error(f"unknown CLI {provider!r}; choose from {', '.join(BINARIES)}")
        if not installed(provider):
            print(f"skip {provider}: {BINARIES[provider]} is not installed "
                  "(bash .ci/install-clis)", file=sys.stderr)
            continue
        folder = version_folder(provider)
        entry = labels.setdefault(folder, {"provider": provider, "screens": {}})
        for size in sizes:
            print(f"{provider} {size[0]}x{size[1]} -> {folder}", file=sys.stderr)
            with MockLLM() as mock:
                try:
                    shots = capture_size(provider, mock, size)
                except (RuntimeError, AssertionError) as error:
                    print(f"  {provider} {size[0]}x{size[1]} failed: {error}", file=sys.stderr)
                    all_ok = False
                    continue
            for state, (plain, ansi, label) in shots.items():
                name = f"{state}-{size[0]}x{size[1]}"
                (args.out / folder).mkdir(parents=True, exist_ok=True)
                (args.out / folder / f"{name}.txt").write_text(plain, encoding="utf-8")
                (args.out / folder / f"{name}.ansi.txt").write_text(ansi, encoding="utf-8")
                entry["screens"][name] = label
                all_ok &= review(provider, name, plain, label)
        labels_path.write_text(json.dumps(labels, indent=1, ensure_ascii=False), encoding="utf-8")
    print("all captures read as labelled" if all_ok else
          "review the MISMATCH lines: fix the provider entry, or the label if the capture is wrong")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
