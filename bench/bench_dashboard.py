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
from _common import Sandbox, free_port, wait_healthy  # noqa: E402
from bench_status import client, cpu_seconds, helper_pids  # noqa: E402

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


def start_chromium(profile_dir):
    proc = subprocess.Popen([CHROMIUM, *CHROMIUM_ARGS, f"--user-data-dir={profile_dir}", "about:blank"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, text=True)
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--terminals", type=int, default=20)
    parser.add_argument("--busy", type=int, default=5)
    args = parser.parse_args()
    window = 10 if args.quick else 30
    from playwright.sync_api import expect, sync_playwright

    with Sandbox("dashboard") as box, tempfile.TemporaryDirectory() as profile:
        (box.cao_home / "settings.json").write_text(json.dumps({"providers": {"bench": {
            "command": [sys.executable, str(ROOT / "bench/_bench_agent.py")],
            "status": [["processing", r"working\.\.\.\Z"], ["completed", r"^done: .*\n>( .*)?\Z"],
                       ["idle", r"^>( .*)?\Z"]],
            "answer": {"start": r"^> \S", "end": r"^>( .*)?$"}}}}))
        port = free_port()
        env = box.env(BENCH_MARKS=str(box.root / "marks"), BENCH_DELAY="3600", CAO_API_PORT=str(port))
        server = box.spawn([sys.executable, str(ROOT / "cao.py"), "server", "--port", str(port)], env=env)
        wait_healthy(port, server)
        api = client(port)
        work = box.root / "work"
        work.mkdir()
        ids = []
        for i in range(args.terminals):
            session = f"fleet{i // 5}"
            if i % 5 == 0:
                term = api("POST", f"/sessions?agent_profile=developer&provider=bench"
                                   f"&session_name={session}&working_directory={work}")
            else:
                term = api("POST", f"/sessions/cao-{session}/terminals?agent_profile=reviewer"
                                   f"&provider=bench")
            ids.append(term["id"])
        busy = ids[:args.busy]
        for tid in busy:
            api("POST", f"/terminals/{tid}/input", {"message": "work for an hour"})
        deadline = time.monotonic() + 30
        while {api("GET", f"/terminals/{t}")["status"] for t in busy} != {"processing"}:
            if time.monotonic() > deadline:
                raise SystemExit("the busy agents did not start working")
            time.sleep(0.05)

        chromium, endpoint = start_chromium(profile)
        box.procs.append(chromium)
        with sync_playwright() as p:
            browser = p.chromium.connect_over_cdp(endpoint)
            page = browser.contexts[0].new_page()
            page.set_viewport_size({"width": 1600, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.locator("#conn")).to_have_text("live", timeout=20000)
            expect(page.locator(".tree .node")).to_have_count(args.terminals, timeout=20000)
            weight = page_weight(page)
            for tid in busy + [t for t in ids if t not in busy]:  # an idle one ends in front
                page.locator(f".tree .node[data-id='{tid}']").click()
            expect(page.locator(".tab")).to_have_count(args.terminals)
            expect(page.locator(".pane:not([hidden]) .xterm-rows")).to_contain_text("bench agent")
            groups = {
                "server + pipe helpers": lambda: [server.pid] + helper_pids(box.cao_home / "fifos"),
                "chromium (all processes)": lambda: group_pids(chromium.pid),
            }
            tmux_pid = int(subprocess.run(["tmux", "-L", box.socket, "display-message", "-p", "#{pid}"],
                                          capture_output=True, text=True, env=env).stdout.strip())
            groups["tmux server"] = lambda: [tmux_pid]
            time.sleep(3)  # the tabs' first draws settle before the quiet window
            tabs = measure(window, groups)
            page.keyboard.press("\\")
            expect(page.locator(".pane:not([hidden])")).to_have_count(args.terminals)
            expect(page.locator(".pane:not([hidden]) .xterm-rows").first).to_contain_text("bench agent",
                                                                                          timeout=20000)
            time.sleep(3)
            split = measure(window, groups)
            browser.close()

    print(f"cao web console, {args.terminals} terminals open as tabs, {args.busy} busy (quiet), "
          f"{window} s windows; % of one core")
    print(f"  page weight, first visit: {weight / 1024:.1f} KiB transferred")
    print(f"  {'':28} {'tabs':>8} {'side by side':>14}")
    for name in tabs:
        print(f"  {name:28} {tabs[name]:8.2f} {split[name]:14.2f}")
    total = [sum(v for k, v in m.items() if k != "tmux server") for m in (tabs, split)]
    print(f"  {'browser + server':28} {total[0]:8.2f} {total[1]:14.2f}   (target < 5)")


if __name__ == "__main__":
    main()
