"""Plugins (upstream's shape, from an entry point and from ~/.cao/plugins) and webhooks,
against a real server with demo agents and a real local HTTP receiver."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import free_port, wait_for

RECORDER = '''
import json, os
from cli_agent_orchestrator.plugins import CaoPlugin, PostSendMessageEvent, hook


class Recorder(CaoPlugin):
    async def setup(self):
        self.path = os.environ["RECORDER_LOG"]

    def _log(self, event):
        fields = {k: v for k, v in vars(event).items() if k != "timestamp"}
        fields["utc"] = event.timestamp.utcoffset().total_seconds() == 0
        with open(self.path, "a") as f:
            f.write(json.dumps(fields) + "\\n")

    @hook("post_create_session")
    async def on_session(self, event):
        self._log(event)

    @hook("post_create_terminal")
    async def on_terminal(self, event):
        self._log(event)

    @hook("post_send_message")
    async def on_message(self, event):
        assert isinstance(event, PostSendMessageEvent)
        self._log(event)

    @hook("post_kill_terminal")
    async def on_kill_terminal(self, event):
        self._log(event)

    @hook("post_kill_session")
    async def on_kill_session(self, event):
        self._log(event)
'''

TROUBLE = '''
import asyncio, time
from cli_agent_orchestrator.plugins import CaoPlugin, hook


class Crasher(CaoPlugin):
    @hook("post_create_session")
    async def boom(self, event):
        raise RuntimeError("plugin bug")


class Sleeper(CaoPlugin):
    @hook("post_create_session")
    async def slow(self, event):
        await asyncio.sleep(30)

    @hook("post_create_terminal")
    async def blocks(self, event):
        time.sleep(3)
'''


def _install_package(root, name, module, entry):
    """A real installed distribution: a module and its dist-info with an entry point."""
    (root / f"{name}.py").write_text(module)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[cao.plugins]\n{entry}\n")


def _events(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_an_upstream_shaped_plugin_sees_every_event_and_a_bad_one_slows_nothing(cao_env, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _install_package(site, "cao_recorder", RECORDER, "recorder = cao_recorder:Recorder")
    (cao_env.home / "plugins").mkdir(parents=True)
    (cao_env.home / "plugins" / "trouble.py").write_text(TROUBLE)
    log = tmp_path / "events.jsonl"
    cao_env.env.update(PYTHONPATH=str(site), RECORDER_LOG=str(log), CAO_PLUGIN_TIMEOUT="1")
    cao_env.start_server()
    started = time.monotonic()
    code, sup = cao_env.request("POST", "/sessions?agent_profile=code_supervisor&provider=demo"
                                        "&session_name=plug")
    assert code == 201 and time.monotonic() - started < 10
    assert cao_env.request("POST", f"/terminals/{sup['id']}/input",
                           {"message": "/assign developer /send - all done"})[0] == 200
    wait_for(lambda: any(e["event_type"] == "post_send_message" and e["orchestration_type"]
                         == "send_message" for e in _events(log)), 30, what="the callback event")
    assert cao_env.request("DELETE", "/sessions/cao-plug")[0] == 200
    wait_for(lambda: any(e["event_type"] == "post_kill_session" for e in _events(log)), 10,
             what="the kill events")
    events = _events(log)
    kinds = [e["event_type"] for e in events]
    assert kinds[:2] == ["post_create_session", "post_create_terminal"]
    assert kinds.count("post_create_terminal") == 2 and kinds.count("post_kill_terminal") == 2
    assert all(e["utc"] for e in events)
    assert events[0]["session_name"] == "cao-plug" and events[0]["session_id"] == "cao-plug"
    assigned = next(e for e in events if e.get("orchestration_type") == "assign")
    assert assigned["sender"] == sup["id"] and assigned["message"].startswith("/send - all done")
    report = next(e for e in events if e.get("orchestration_type") == "send_message")
    assert report["receiver"] == sup["id"] and report["message"].startswith("all done")
    status = cao_env.request("GET", "/plugins")[1]
    by_name = {p["name"]: p for p in status["plugins"]}
    assert by_name["recorder"]["source"] == "entry point cao_recorder:Recorder"
    assert by_name["recorder"]["failed"] == 0 and by_name["recorder"]["delivered"] == len(events)
    assert by_name["Crasher"]["failed"] >= 1 and "plugin bug" in by_name["Crasher"]["last_error"]
    assert wait_for(lambda: cao_env.request("GET", "/plugins")[1]["plugins"][2]["timed_out"] >= 1
                    if cao_env.request("GET", "/plugins")[1]["plugins"][2]["name"] == "Sleeper"
                    else True, 10, what="the sleeper's timeout")


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        server.hits.setdefault(self.path, []).append(body)
        if self.path == "/flaky" and len(server.hits[self.path]) < 3:
            self.send_response(500)
        elif self.path == "/slow" and len(server.hits[self.path]) == 1:
            time.sleep(1.5)
            self.send_response(200)
        else:
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.hits = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_webhooks_post_each_services_format_and_retry_a_receiver_that_fails(cao_env, receiver):
    base = f"http://127.0.0.1:{receiver.server_address[1]}"
    fast = {"retries": 3, "backoff": 0.1, "timeout": 0.5}
    cao_env.home.mkdir(parents=True, exist_ok=True)
    (cao_env.home / "settings.json").write_text(json.dumps({"webhooks": [
        {"url": f"{base}/generic", "events": ["post_create_session"]},
        {"url": f"{base}/discord", "format": "discord", "events": ["post_create_session"]},
        {"url": f"{base}/slack", "format": "slack", "events": ["post_create_session"]},
        {"url": f"{base}/telegram", "format": "telegram", "chat_id": "42",
         "events": ["post_create_session"]},
        {"url": f"{base}/flaky", "events": ["post_create_session"], **fast},
        {"url": f"{base}/slow", "events": ["post_create_session"], **fast},
        {"url": f"http://127.0.0.1:{free_port()}/down", "events": ["post_create_session"], **fast},
    ]}))
    cao_env.start_server()
    code, _ = cao_env.request("POST", "/sessions?agent_profile=developer&provider=demo&session_name=hook")
    assert code == 201
    wait_for(lambda: all(receiver.hits.get(p) for p in ("/generic", "/discord", "/slack", "/telegram"))
             and len(receiver.hits.get("/flaky", [])) == 3 and len(receiver.hits.get("/slow", [])) >= 2,
             15, what="every webhook")
    generic = receiver.hits["/generic"][0]
    assert generic["event_type"] == "post_create_session" and generic["session_name"] == "cao-hook"
    assert "post_create_session" in receiver.hits["/discord"][0]["content"]
    assert "session_name=cao-hook" in receiver.hits["/slack"][0]["text"]
    assert receiver.hits["/telegram"][0]["chat_id"] == "42"
    plugins = wait_for(lambda: (lambda p: p if p["webhook-7"]["failed"] == 1 else None)(
        {p["name"]: p for p in cao_env.request("GET", "/plugins")[1]["plugins"]}), 15,
        what="the down receiver's failure")
    assert plugins["webhook-5"]["delivered"] == 1 and plugins["webhook-5"]["failed"] == 0  # 500, 500, 200
    assert plugins["webhook-6"]["delivered"] == 1  # a timed-out first try, then a retry
    assert "Connection refused" in plugins["webhook-7"]["last_error"]


def test_bad_webhook_settings_stop_the_server_with_one_line(cao_env):
    cao_env.home.mkdir(parents=True, exist_ok=True)
    (cao_env.home / "settings.json").write_text(json.dumps({"webhooks": [{"url": "ftp://x"}]}))
    out = cao_env.run("server", "--port", str(cao_env.port), timeout=30)
    assert out.returncode != 0 and "needs a url starting with http://" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_log_keeps_what_a_slow_plugin_has_not_read_and_counts_what_it_must_drop(
        tmp_path, monkeypatch):
    import cao
    monkeypatch.setenv("CAO_HOME_DIR", str(tmp_path / "home"))
    monkeypatch.setattr(cao, "EVENTS_KEPT", 100)
    monkeypatch.setattr(cao, "EVENTS_HELD_MAX", 2000)
    store = cao.Store(tmp_path / "db.sqlite")
    gate, seen = threading.Event(), []

    class Slow(cao.EventFollower):
        def deliver(self, event_type, fields, event):
            gate.wait()
            seen.append(event["seq"])
    follower = Slow(store, "slow", store.last_event_seq())
    follower.start()
    for i in range(1500):  # pruning runs every 500 emits
        store.emit("session_created", f"cao-s{i}")
    wait_for(lambda: store.holds, 5, what="the follower's hold")
    first = store.one("SELECT MIN(seq) AS s FROM events")["s"]
    assert first <= 2  # everything the slow plugin has not read is still there
    gate.set()
    wait_for(lambda: len(seen) == 1500, 20, what="every event, late")
    gate.clear()
    for i in range(3000):  # now it falls further behind than the log holds for anyone
        store.emit("session_created", f"cao-t{i}")
    gate.set()
    wait_for(lambda: follower.cursor == store.last_event_seq(), 20, what="it to catch up")
    info = follower.info()
    assert info["lost"] > 0 and len(seen) + info["lost"] == 4500, (len(seen), info)
    follower.stopping = True
    store.emit("wake")  # the follower waits for events; this one lets it see it must stop
    follower.join(10)
    assert not follower.is_alive()
    store.close()
