"""What the web console costs while nothing changes on screen.

    python3 bench/bench_dashboard.py [--quick] [--terminals 20] [--busy 5]

A cao server runs N agents of a settings.json provider (bench/_bench_agent.py):
N - B idle, B busy (each was sent a task and prints "working..." once, then works
quietly for an hour). Debian's chromium (headless, started by this script so its
process group is known, driven by Playwright over CDP) opens the console and opens
every terminal as a tab. Then, over a quiet window, the CPU time (utime + stime from
/proc) of the server and its pipe-pane helpers, of every chromium process and of
the tmux server is summed and shown as % of one core. Two layouts: tabs (one
terminal drawn, an idle one) and side by side (all N drawn at once, each
long-polling its screen). Target: browser + server < 5 % of a core.

It also reports the page weight (bytes on the wire for a first visit, gzipped).
Needs the `playwright` Python package and /usr/bin/chromium.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Sandbox, free_port, stop_group, wait_healthy  # noqa: E402
from bench_status import client, cpu_seconds, helper_pids  # noqa: E402

try:
    from playwright.sync_api import expect
except ImportError:
    raise SystemExit("bench_dashboard.py needs the playwright package: pip install playwright")

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync",
                 "--disable-dev-shm-usage", "--remote-debugging-port=0"]


def group_pids(pgid):
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.getpgid(int(proc.name)) == pgid:
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def _die_with_parent():
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no browser outlives the bench


def start_chromium(profile_dir):
    proc = subprocess.Popen([CHROMIUM, *CHROMIUM_ARGS, f"--user-data-dir={profile_dir}", "about:blank"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, text=True,
                            preexec_fn=_die_with_parent)
    deadline = time.monotonic() + 30
    for line in proc.stderr:  # chromium says where its DevTools endpoint listens
        match = re.search(r"DevTools listening on (ws://\S+)", line)
        if match:
            return proc, match.group(1)
        if time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("chromium did not start its DevTools endpoint")


def cpu_of(pids):
    return sum(cpu_seconds(p) for p in pids)


def measure(window, groups):
    """% of one core per group over `window` seconds of quiet."""
    before = {name: cpu_of(pids()) for name, pids in groups.items()}
    started = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - started
    return {name: 100 * (cpu_of(pids()) - before[name]) / elapsed for name, pids in groups.items()}


def page_weight(page):
    return page.evaluate("""() => performance.getEntriesByType('navigation')
        .concat(performance.getEntriesByType('resource'))
        .reduce((n, e) => n + (e.transferSize || 0), 0)""")


BENCH_PROVIDER = {"bench": {
    "command": [sys.executable, str(ROOT / "bench/_bench_agent.py")],
    "status": [["processing", r"working\.\.\.\Z"], ["completed", r"^done: .*\n>( .*)?\Z"],
               ["idle", r"^>( .*)?\Z"]],
    "answer": {"start": r"^> \S", "end": r"^>( .*)?$"}}}


def build_fleet(api, terminals, busy, provider, work, session_path):
    """`terminals` agents in sessions of five; the first `busy` get an hour's task."""
    ids = []
    for i in range(terminals):
        session = f"fleet{i // 5}"
        if i % 5 == 0:
            term = api("POST", f"/sessions?agent_profile=developer&provider={provider}"
                               f"&session_name={session}&working_directory={work}")
        else:
            term = api("POST", f"/sessions/{session_path(session)}/terminals?agent_profile=reviewer"
                               f"&provider={provider}")
        ids.append(term["id"])
    for tid in ids[:busy]:
        api("POST", f"/terminals/{tid}/input?message=work+for+an+hour")
    deadline = time.monotonic() + 60
    while {api("GET", f"/terminals/{t}")["status"] for t in ids[:busy]} != {"processing"}:
        if time.monotonic() > deadline:
            statuses = {t: api("GET", f"/terminals/{t}")["status"] for t in ids[:busy]}
            raise SystemExit(f"the busy agents did not start working: {statuses}")
        time.sleep(0.05)
    return ids


def tmux_server_pid(box, env, socket_name):
    out = subprocess.run(["tmux", "-L", socket_name, "display-message", "-p", "#{pid}"],
                         capture_output=True, text=True, env=env).stdout.strip()
    return [int(out)] if out.isdigit() else []


def run_cao(args, window, browser_page):
    with Sandbox("dashboard") as box:
        (box.cao_home / "settings.json").write_text(json.dumps({"providers": BENCH_PROVIDER}))
        port = free_port()
        env = box.env(BENCH_MARKS=str(box.root / "marks"), BENCH_DELAY="3600", CAO_API_PORT=str(port))
        server = box.spawn([sys.executable, str(ROOT / "cao.py"), "server", "--port", str(port)], env=env)
        wait_healthy(port, server)
        (box.root / "work").mkdir()
        ids = build_fleet(client(port), args.terminals, args.busy, "bench", box.root / "work",
                          lambda s: f"cao-{s}")
        with browser_page() as (page, chromium_pids):
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.locator("#conn")).to_have_text("live", timeout=20000)
            expect(page.locator(".tree .node")).to_have_count(args.terminals, timeout=20000)
            weight = page_weight(page)
            busy = ids[:args.busy]
            for tid in busy + [t for t in ids if t not in busy]:  # an idle one ends in front
                page.locator(f".tree .node[data-id='{tid}']").click()
            expect(page.locator(".tab")).to_have_count(args.terminals)
            expect(page.locator(".pane:not([hidden]) .xterm-rows")).to_contain_text("bench agent")
            tmux_pid = tmux_server_pid(box, env, box.socket)
            groups = {"server": lambda: [server.pid] + helper_pids(box.cao_home / "fifos"),
                      "browser": chromium_pids, "tmux server": lambda: tmux_pid}
            time.sleep(3)  # the tabs' first draws settle before the quiet window
            tabs = measure(window, groups)
            page.keyboard.press("\\")
            expect(page.locator(".pane:not([hidden])")).to_have_count(args.terminals)
            expect(page.locator(".pane:not([hidden]) .xterm-rows").first).to_contain_text(
                "bench agent", timeout=20000)
            time.sleep(3)
            split = measure(window, groups)
            lags = status_lags(page, client(port), ids[args.busy:][-10:])
    return {"cao, tabs (1 drawn)": tabs, f"cao, side by side ({args.terminals} drawn)": split}, \
        weight, lags


WATCH_STATUS = """([id, wanted]) => {
    const seen = () => document.querySelector(`.tree .node[data-id="${id}"] .st`)?.textContent === wanted;
    window.__shown = new Promise((resolve) => {
        const observer = new MutationObserver(() => {
            if (seen()) { observer.disconnect(); resolve(Date.now() / 1000); }
        });
        observer.observe(document.querySelector("#tree"), {childList: true, subtree: true});
    });
}"""


def status_lags(page, api, ids):
    """ms from the server's `status: processing` event to the tree showing it, per agent."""
    lags = []
    for tid in ids:
        cursor = api("GET", "/events")["next"]
        page.evaluate(WATCH_STATUS, [tid, "processing"])
        api("POST", f"/terminals/{tid}/input?message=work+for+an+hour")
        drawn = page.evaluate("window.__shown")
        events = api("GET", f"/events?after={cursor}&wait=0")["events"]
        ts = [e["ts"] for e in events if e["kind"] == "status" and e["terminal_id"] == tid
              and e["data"]["status"] == "processing"]
        lags.append(1000 * (drawn - ts[0]))
    return lags


def run_upstream(args, window, browser_page):
    from _common import ensure_upstream_venv
    venv = ensure_upstream_venv()
    with Sandbox("dashboard-up") as box:
        # upstream's mock_cli provider runs a `mock_cli` binary that its wheel does not
        # ship; ours stands in. Its windows start a login shell, which reads ~/.profile.
        bindir = box.root / "bin"
        bindir.mkdir()
        (bindir / "mock_cli").write_text(f"#!/bin/sh\nexec {sys.executable} "
                                         f"{ROOT / 'bench/_upstream_mock_cli.py'} \"$@\"\n")
        (bindir / "mock_cli").chmod(0o755)
        (box.home / ".profile").write_text(f'export PATH="{bindir}:$PATH"\n')
        port = free_port()
        env = box.env(PATH=f"{bindir}:{os.environ['PATH']}", LANG="C.UTF-8")
        server = box.spawn([str(venv / "bin/cao-server"), "--host", "127.0.0.1", "--port", str(port)],
                           env=env)
        wait_healthy(port, server, deadline_s=60)
        (box.root / "work").mkdir()
        build_fleet(client(port), args.terminals, args.busy, "mock_cli", box.root / "work",
                    lambda s: f"cao-{s}")
        with browser_page() as (page, chromium_pids):
            page.goto(f"http://127.0.0.1:{port}/")
            terminal_buttons = page.get_by_role("button", name="Terminal", exact=True)
            expect(terminal_buttons).to_have_count(args.terminals, timeout=30000)
            weight = page_weight(page)
            terminal_buttons.last.click()  # the last one listed is an idle agent
            tmux_pid = tmux_server_pid(box, env, "default")
            groups = {"server": lambda: group_pids(server.pid) + helper_pids(box.cao_home / "fifos"),
                      "browser": chromium_pids, "tmux server": lambda: tmux_pid}
            time.sleep(3)
            one = measure(window, groups)
    return {"upstream 2.5.4 (1 terminal open)": one}, weight, None


def main():
    # A SIGTERM (`timeout`, Ctrl-C in a wrapper) unwinds the with-blocks, so the sandbox's
    # server, tmux and chromium are stopped rather than left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--terminals", type=int, default=20)
    parser.add_argument("--busy", type=int, default=5)
    parser.add_argument("--side", choices=["cao", "upstream", "both"], default="both")
    args = parser.parse_args()
    window = 10 if args.quick else 30
    from contextlib import contextmanager

    from playwright.sync_api import sync_playwright

    @contextmanager
    def browser_page():
        with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
            chromium, endpoint = start_chromium(profile)
            try:
                browser = p.chromium.connect_over_cdp(endpoint)
                page = browser.contexts[0].new_page()
                page.set_viewport_size({"width": 1600, "height": 1000})
                yield page, lambda: group_pids(chromium.pid)
                browser.close()
            finally:
                stop_group(chromium)

    results, weights, status_lag = {}, {}, None
    for side, run in (("cao", run_cao), ("upstream", run_upstream)):
        if args.side in (side, "both"):
            figures, weights[side], lags = run(args, window, browser_page)
            results.update(figures)
            if lags:
                status_lag = lags

    print(f"Web console, {args.terminals} agents of which {args.busy} busy (working quietly), "
          f"{window} s windows while nothing changes on screen; % of one core")
    print("  page weight, first visit: " + ", ".join(f"{side} {w / 1024:.1f} KiB"
                                                    for side, w in weights.items()))
    names = list(results)
    print(f"  {'':18}" + "".join(f"{n:>36}" for n in names))
    for row in ("server", "browser", "tmux server"):
        print(f"  {row:18}" + "".join(f"{results[n][row]:36.2f}" for n in names))
    print(f"  {'browser + server':18}" + "".join(
        f"{results[n]['server'] + results[n]['browser']:36.2f}" for n in names) + "   (target < 5)")
    if status_lag:
        lag = sorted(status_lag)
        print(f"  cao: a status change reaches the tree {lag[len(lag) // 2]:.0f} ms (p50), "
              f"{lag[-1]:.0f} ms (max) after the server records it ({len(lag)} agents; target 500)")


if __name__ == "__main__":
    main()
