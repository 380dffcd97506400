"""Shared fixtures: every test gets a private CAO_HOME_DIR, a private tmux server
(tmux -L <unique socket>) and, when it asks, a real cao server on a free port.
Everything a test starts is stopped by PID in teardown."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CAO = [sys.executable, str(ROOT / "cao.py")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Poll predicate until it returns a truthy value; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def kill_pid(pid, sig=signal.SIGTERM, timeout=5.0):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def call_tool(env, name, arguments, terminal_id=None):
    """Call one tool of `cao mcp` through the MCP SDK's stdio client, as an agent CLI
    would; returns (offered tool names, the result's JSON)."""
    import asyncio
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client
    child_env = dict(env.env)
    if terminal_id:
        child_env["CAO_TERMINAL_ID"] = terminal_id

    async def call():
        params = StdioServerParameters(command=CAO[0], args=CAO[1:] + ["mcp"], env=child_env)
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = [t.name for t in (await session.list_tools()).tools]
                result = await session.call_tool(name, arguments)
                text = "".join(getattr(part, "text", "") for part in result.content)
                try:
                    return tools, json.loads(text)
                except ValueError:  # a tool whose result is text (load_skill)
                    return tools, text
    return asyncio.run(call())


def demo_session(env, name, profile="developer"):
    """A new session of one demo agent; returns its terminal id."""
    code, body = env.request("POST", f"/sessions?agent_profile={profile}&provider=demo"
                                     f"&session_name={name}")
    assert code == 201, body
    return body["id"]


def ask(env, terminal_id, text, timeout=30):
    """Send text to a terminal and return its answer once it is completed."""
    assert env.request("POST", f"/terminals/{terminal_id}/input", {"message": text})[0] == 200
    wait_for(lambda: env.request("GET", f"/terminals/{terminal_id}")[1]["status"] == "completed",
             timeout, what=f"answer to {text!r}")
    return env.request("GET", f"/terminals/{terminal_id}/output?mode=last")[1]["output"]


class CaoEnv:
    """A private cao installation: home dir, tmux socket, API port."""

    def __init__(self, tmp_path):
        self.home = tmp_path / "cao-home"
        self.workdir = tmp_path / "project"
        self.workdir.mkdir()
        self.socket = f"cao-test-{uuid.uuid4().hex[:10]}"
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("CAO_", "TMUX"))}
        self.env.update(CAO_HOME_DIR=str(self.home), CAO_TMUX_SOCKET=self.socket,
                        CAO_API_PORT=str(self.port), CAO_DEMO_DELAY="0.3")
        self.servers = []

    def run(self, *args, timeout=60, cmd=None, **kw):
        """Run the cao CLI; returns CompletedProcess with text output."""
        return subprocess.run((cmd or CAO) + list(args), env=self.env, cwd=self.workdir,
                              capture_output=True, text=True, timeout=timeout, **kw)

    def tmux(self, *args):
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True)

    def start_server(self, cmd=None):
        proc = subprocess.Popen((cmd or CAO) + ["server", "--port", str(self.port)], env=self.env,
                                cwd=self.workdir, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append(proc.pid)
        wait_for(lambda: self.healthy() or proc.poll() is not None, 15, what="cao-server /health")
        assert proc.poll() is None, proc.stdout.read().decode()
        return proc

    def healthy(self):
        try:
            return self.request("GET", "/health")[0] == 200
        except OSError:
            return False

    def request(self, method, path, body=None, headers=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = dict(headers or {})
            if data is not None:
                headers.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                payload = json.loads(raw) if raw else None
            except ValueError:
                payload = raw.decode(errors="replace")
            return resp.status, payload
        finally:
            conn.close()

    def tmux_pids(self):
        """PIDs of the private tmux server and every pane process in it."""
        out = self.tmux("list-panes", "-a", "-F", "#{pane_pid}").stdout.split()
        server = self.tmux("display-message", "-p", "#{pid}").stdout.strip()
        return {int(p) for p in out + [server] if p.isdigit()}

    def cleanup(self):
        pids = self.tmux_pids()
        for pid in self.servers:
            kill_pid(pid)
        server_json = self.home / "server.json"
        if server_json.exists():  # a server that `cao launch` started in the background
            try:
                kill_pid(json.loads(server_json.read_text())["pid"])
            except (ValueError, KeyError):
                pass
        for pid in pids:
            kill_pid(pid, signal.SIGKILL)
        for pid in self.home_pids():  # e.g. a CLI's hook that runs outside its pane's group
            kill_pid(pid, signal.SIGKILL)

    def home_pids(self):
        """PIDs of processes (other than this one) whose environment names this home."""
        marker = f"CAO_HOME_DIR={self.home}".encode()
        found = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.add(int(entry.name))
            except OSError:
                pass
        return found


@pytest.fixture
def cao_env(tmp_path):
    env = CaoEnv(tmp_path)
    yield env
    env.cleanup()


@pytest.fixture
def server(cao_env):
    cao_env.start_server()
    return cao_env
