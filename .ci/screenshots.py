"""Takes the screenshots in docs/img/ of the web console, with demo agents.

    .venv/bin/python .ci/screenshots.py

Starts its own cao server (private home, private tmux socket, free port), builds a
small fleet, drives Debian's chromium with Playwright and stops everything by PID.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port, method, path, body=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read() or b"null")


def wait_status(port, tid, wanted, timeout=30):
    deadline = time.monotonic() + timeout
    while call(port, "GET", f"/terminals/{tid}")["status"] not in wanted:
        if time.monotonic() > deadline:
            raise SystemExit(f"terminal {tid} never reached {wanted}")
        time.sleep(0.05)


def build_fleet(port, work):
    """A supervisor with three workers (one asks a question) and a second session; the
    agents are busy for CAO_DEMO_DELAY s after their task, long enough for the pictures."""
    sup = call(port, "POST", "/sessions", {"agent_profile": "code_supervisor", "provider": "demo",
                                           "session_name": "release", "working_directory": str(work)})
    workers = [call(port, "POST", "/sessions/cao-release/terminals", {
        "agent_profile": profile, "provider": "demo", "caller_id": sup["id"]})
        for profile in ("developer", "developer", "reviewer")]
    docs = call(port, "POST", "/sessions", {"agent_profile": "developer", "provider": "demo",
                                            "session_name": "docs", "working_directory": str(work)})
    for term in [sup, docs, *workers]:
        wait_status(port, term["id"], ("idle",))
    call(port, "POST", f"/terminals/{workers[1]['id']}/input",
         {"message": "/ask Delete the stale release branch?"})
    wait_status(port, workers[1]["id"], ("waiting_user_answer",), timeout=60)
    for term, task in ((sup, "Plan the 2.6 release"), (workers[0], "Implement the changelog generator"),
                       (workers[2], "Review the changelog generator"),
                       (docs, "Update the getting-started page")):
        call(port, "POST", f"/terminals/{term['id']}/input", {"message": task})
    call(port, "POST", f"/terminals/{workers[0]['id']}/inbox/messages",
         {"sender_id": sup["id"], "message": "Also cover the --json flag"})
    call(port, "POST", "/flows", {"name": "nightly-review", "schedule": "0 3 * * *",
                                  "agent_profile": "reviewer", "provider": "demo",
                                  "prompt_template": "Review yesterday's merged changes"})
    return sup, workers


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="cao-shots-"))
    port, sock = free_port(), f"cao-shots-{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAO_", "TMUX"))}
    env.update(CAO_HOME_DIR=str(tmp / "home"), CAO_TMUX_SOCKET=sock, CAO_DEMO_DELAY="20")
    (tmp / "work").mkdir()
    server = subprocess.Popen([sys.executable, str(ROOT / "cao.py"), "server", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                call(port, "GET", "/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("cao server did not start")
                time.sleep(0.05)
        sup, workers = build_fleet(port, tmp / "work")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync"])
            for scheme in ("dark", "light"):
                page = browser.new_page(viewport={"width": 1440, "height": 860}, color_scheme=scheme)
                page.goto(f"http://127.0.0.1:{port}/")
                expect(page.locator("#conn")).to_have_text("live", timeout=20000)
                page.locator(f".tree .node[data-id='{sup['id']}']").click()
                expect(page.locator(".pane:not([hidden]) .xterm-rows")).to_contain_text("working", timeout=20000)
                if scheme == "dark":
                    page.screenshot(path=str(OUT / "web-ui-overview.png"))
                    for term in workers:
                        page.locator(f".tree .node[data-id='{term['id']}']").click()
                    page.keyboard.press("\\")
                    page.keyboard.press("a")
                    page.wait_for_timeout(800)  # the last drawn frame, for the picture only
                    page.screenshot(path=str(OUT / "web-ui-side-by-side.png"))
                    page.keyboard.press("?")
                    page.screenshot(path=str(OUT / "web-ui-help.png"))
                else:
                    page.keyboard.press("f")
                    expect(page.locator("#flows .card")).to_have_count(1)
                    page.screenshot(path=str(OUT / "web-ui-light-flows.png"))
                page.close()
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=10)
        subprocess.run(["tmux", "-L", sock, "kill-server"], stderr=subprocess.DEVNULL)
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(str(p.relative_to(ROOT)) for p in sorted(OUT.glob("web-ui-*.png"))))


if __name__ == "__main__":
    main()
