"""The web dashboard: the real cao server serves web_static/ and nothing outside it.

Each test module run starts its own `cao server` on a free port with a private
CAO_HOME_DIR and tmux socket, and tears both down by PID / socket name.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
STATIC_DIR = REPO_ROOT / "web_static"
EXPECTED_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port, method, path, body=None, timeout=10):
    """Send `path` exactly as given (no client-side normalisation of '..')."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    """One real cao server for this module (self-contained; independent of conftest.py)."""
    home = tmp_path_factory.mktemp("cao-home")
    sock = f"cao-test-{uuid.uuid4().hex[:12]}"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAO_", "TMUX"))}
    env.update(CAO_HOME_DIR=str(home), CAO_TMUX_SOCKET=sock, CAO_API_HOST="127.0.0.1",
               CAO_API_PORT=str(port), CAO_DEMO_DELAY="0.3")
    log_path = home / "server-test.log"
    with open(log_path, "wb") as log:  # a file, not a pipe nobody drains
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "cao.py"), "server", "--port", str(port)],
                                env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"cao server exited early: {log_path.read_text(errors='replace')}")
            try:
                if _request(port, "GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("cao server did not answer /health within 20 s")
            time.sleep(0.05)
        yield {"port": port, "home": home, "socket": sock}
    finally:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        subprocess.run(["tmux", "-L", sock, "kill-server"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        # tmux may leave its socket file behind; remove ours (and only ours).
        sock_dir = Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}"
        (sock_dir / sock).unlink(missing_ok=True)


def _referenced_files(html):
    """Local files named by src=/href= in index.html (data: URLs excluded)."""
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    return [r for r in refs if not r.startswith("data:")]


def test_index_is_html_and_references_js(web_server):
    status, ctype, body = _request(web_server["port"], "GET", "/")
    assert status == 200
    assert ctype.startswith("text/html")
    html = body.decode("utf-8")
    assert html.lower().startswith("<!doctype html>")
    assert re.search(r'<script src="[^"]+\.js"', html)
    assert body == (STATIC_DIR / "index.html").read_bytes()


def test_referenced_static_files_are_served_with_their_type(web_server):
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    refs = _referenced_files(html)
    assert refs, "index.html references no files"
    for ref in refs:
        assert re.fullmatch(r"(vendor/)?[A-Za-z0-9_-]+(\.[a-z0-9]+)+", ref), f"{ref}: not a servable name"
        expected = EXPECTED_TYPES[os.path.splitext(ref)[1]]
        for path in (f"/{ref}", f"/static/{ref}"):
            status, ctype, body = _request(web_server["port"], "GET", path)
            assert status == 200, path
            assert ctype.split(";")[0].strip() == expected, (path, ctype)
            assert body == (STATIC_DIR / ref).read_bytes(), path


def test_dashboard_works_offline_and_inserts_no_html():
    """No CDN, no external fonts, no innerHTML; ASCII so the charset-less JS/CSS types are safe."""
    for path in STATIC_DIR.iterdir():
        if path.is_dir():
            continue  # vendor/: third-party files, checked by test_vendored_terminal_is_pinned
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), path.name
        assert "@import" not in text and "url(" not in text, path.name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text, path.name
        assert text.isascii(), f"{path.name} has non-ASCII characters"


@pytest.mark.parametrize("path", [
    "/../cao.py", "/static/../cao.py", "/static/..%2fcao.py", "/static/%2e%2e%2fcao.py",
    "/..%2fcao.py", "/%2e%2e/cao.py", "/cao.py", "/static/cao.py", "/static/web_static%2findex.html",
    "/..%2f..%2fetc%2fpasswd", "/static/..%5ccao.py", "/vendor/../cao.py", "/vendor/%2e%2e/cao.py",
    "/vendor/..%2fcao.py", "/vendor/vendor/xterm-6.0.0.js", "/vendor/", "/static/vendor/..%2f..%2fcao.py",
    "/vendor/.%2fxterm-6.0.0.js",
])
def test_path_traversal_is_refused(web_server, path):
    status, ctype, body = _request(web_server["port"], "GET", path)
    assert status == 404, (path, status)
    assert ctype.startswith("application/json")
    assert b"__version__" not in body and b"root:" not in body
    assert "detail" in json.loads(body)


def test_missing_static_file_is_404(web_server):
    assert _request(web_server["port"], "GET", "/nope.js")[0] == 404
    assert _request(web_server["port"], "GET", "/static/")[0] == 404


def test_api_shapes_the_dashboard_relies_on(web_server):
    port = web_server["port"]
    status, _, body = _request(port, "GET", "/events")
    first = json.loads(body)
    assert status == 200 and first["events"] == [] and isinstance(first["next"], int)
    status, _, body = _request(port, "GET", f"/events?after={first['next']}&wait=0")
    assert status == 200 and json.loads(body) == {"events": [], "next": first["next"]}
    profiles = json.loads(_request(port, "GET", "/agents/profiles")[2])
    assert {"developer"} <= {p["name"] for p in profiles}
    providers = json.loads(_request(port, "GET", "/agents/providers")[2])
    assert any(p["name"] == "demo" and p["installed"] for p in providers)
    assert json.loads(_request(port, "GET", "/sessions")[2]) == []
    # Errors come back as {"detail": ...} with a 4xx, which the dashboard shows.
    status, ctype, body = _request(port, "POST", "/sessions", {"provider": "demo"})
    assert 400 <= status < 500 and json.loads(body)["detail"]
    status, _, body = _request(port, "GET", "/terminals/00000000/output?mode=last")
    assert status == 404 and json.loads(body)["detail"]


def test_session_lifecycle_produces_the_events_the_dashboard_follows(web_server, tmp_path):
    port = web_server["port"]
    cursor = json.loads(_request(port, "GET", "/events")[2])["next"]
    workdir = tmp_path / "work"
    workdir.mkdir()
    status, _, body = _request(port, "POST", "/sessions", {
        "agent_profile": "developer", "provider": "demo", "session_name": "webtest",
        "working_directory": str(workdir)}, timeout=90)
    assert status == 201, body
    term = json.loads(body)
    try:
        info = json.loads(_request(port, "GET", f"/sessions/{term['session_name']}")[2])
        assert [t["id"] for t in info["terminals"]] == [term["id"]]
        for key in ("id", "name", "provider", "agent_profile", "status", "caller_id"):
            assert key in info["terminals"][0]
        status, _, body = _request(port, "POST", f"/terminals/{term['id']}/input", {"message": "hi"})
        assert status == 200, body
        kinds, deadline = [], time.monotonic() + 30
        while ("status", "completed") not in kinds and time.monotonic() < deadline:
            page = json.loads(_request(port, "GET", f"/events?after={cursor}&wait=5", timeout=20)[2])
            cursor = page["next"]
            kinds += [(e["kind"], e["data"].get("status")) for e in page["events"]]
        assert ("session_created", None) in kinds and ("terminal_created", None) in kinds
        assert ("status", "completed") in kinds, kinds
        out = json.loads(_request(port, "GET", f"/terminals/{term['id']}/output?mode=full")[2])
        assert "done: hi" in out["output"]
        last = json.loads(_request(port, "GET", f"/terminals/{term['id']}/output?mode=last")[2])
        assert "done: hi" in last["output"]
        assert _request(port, "POST", f"/terminals/{term['id']}/key", {"key": "C-c"})[0] == 200
    finally:
        status, _, body = _request(port, "DELETE", f"/sessions/{term['session_name']}", timeout=60)
    assert status == 200, body
    page = json.loads(_request(port, "GET", f"/events?after={cursor}&wait=0")[2])
    assert "session_deleted" in [e["kind"] for e in page["events"]]


VENDORED = {  # name -> sha256 of @xterm/xterm 6.0.0 from the npm registry, unmodified
    "xterm-6.0.0.js": "14903579ff54664cd72f8e8699e6961a6272c21863ec1c3b118cdc8af5d4a972",
    "xterm-6.0.0.css": "854a7c0fb70e8b1a083c16797ab827299fb18744f5ad34f227b48337e33293c6",
}


def test_vendored_terminal_is_pinned_and_carries_its_licence():
    import hashlib
    vendor = STATIC_DIR / "vendor"
    for name, digest in VENDORED.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    assert "xterm.js authors" in (vendor / "xterm-6.0.0.LICENSE.txt").read_text()
    assert sorted(p.name for p in vendor.iterdir()) == sorted([*VENDORED, "xterm-6.0.0.LICENSE.txt"])


def _get(port, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_static_files_carry_etags_gzip_and_cache_headers(web_server):
    import gzip
    port = web_server["port"]
    raw = (STATIC_DIR / "vendor" / "xterm-6.0.0.js").read_bytes()
    status, headers, body = _get(port, "/vendor/xterm-6.0.0.js", {"Accept-Encoding": "gzip, br"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == raw and len(body) < len(raw) // 3
    assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert headers["Vary"] == "Accept-Encoding"
    status, headers, body = _get(port, "/vendor/xterm-6.0.0.js", {"Accept-Encoding": "gzip;q=0"})
    assert status == 200 and "Content-Encoding" not in headers and body == raw
    # Our own files are revalidated on every load: an unchanged one costs a 304.
    status, headers, body = _get(port, "/app.js")
    assert status == 200 and headers["Cache-Control"] == "no-cache" and headers["ETag"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    status, again, body = _get(port, "/app.js", {"If-None-Match": headers["ETag"]})
    assert status == 304 and body == b"" and again["ETag"] == headers["ETag"]
    status, _, body = _get(port, "/app.js", {"If-None-Match": '"stale"'})
    assert status == 200 and body == (STATIC_DIR / "app.js").read_bytes()
    # API answers are never cached.
    assert _get(port, "/sessions")[1]["Cache-Control"] == "no-store"


def test_page_weight_stays_small(web_server):
    """What a first visit transfers, gzipped; docs/web-ui.md reports it."""
    port = web_server["port"]
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    total = len(_get(port, "/", {"Accept-Encoding": "gzip"})[2])
    for ref in _referenced_files(html):
        status, _, body = _get(port, "/" + ref, {"Accept-Encoding": "gzip"})
        assert status == 200, ref
        total += len(body)
    assert total < 200 * 1024, total
