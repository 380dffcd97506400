#!/usr/bin/env python3
"""Eager inbox delivery with the real CLIs: the inter-turn latency it saves.

cao's Inbox normally types a message into a terminal only once its status is idle or
completed. With CAO_EAGER_INBOX_DELIVERY=true on the server and a provider whose entry
says "eager_input": True (Kimi CLI; Claude Code until 2026-12-03) it also types it while the agent is
`processing`; the CLI queues the text and starts the next turn by itself as soon as
the running turn ends, without waiting for cao to see `completed`.

One run (the flow of tests/test_real_clis.py's
test_real_eager_inbox_message_mid_turn_is_answered_once_in_the_next_turn, timed):

  1. a fresh tests/mock_llm.py MockLLM, a fresh RealEnv (private HOME set up for the
     mock, CAO_HOME_DIR, tmux socket) and a cao server with
     CAO_EAGER_INBOX_DELIVERY=true ("eager") or false ("off");
  2. POST /sessions for the provider, POST /terminals/{id}/input "TURN-ONE please";
     the mock streams its answer in 8 (Claude, Anthropic SSE) or 7 (Kimi, OpenAI chat
     SSE) gaps of chunk_delay, about 3 s from first to last byte;
  3. once the mock has the TURN-ONE request and GET /terminals/{id} says
     `processing`, POST /terminals/{id}/inbox/messages {"sender_id": "bench",
     "message": "TURN-TWO please"};
  4. wait (deadlines, 20 ms polls) for the TURN-TWO request at the mock and for the
     terminal to be completed with its answer drawn; then everything is stopped.

Gap = the mock's arrival time of the TURN-TWO request (`time`, taken when its body
has been read) minus the `last_byte_at` of the TURN-ONE answer (after the last SSE
event was written and flushed). Both are the mock's own time.time() stamps, so the
MockLLM needs no wrapper. "off" pays cao's status detection (last byte -> completed),
then the paste and submit of the message; "eager" pays only the CLI's own step from
one turn to its queued input. Also recorded: last byte -> delivered (the ts of cao's
message_delivered event, stamped once the submit is confirmed; negative = the message
went in mid-turn, which eager must show), last byte -> cao's first `completed` status
event after it (--json only; with eager that is turn 2's), the stream's length, and
how often TURN-TWO reached the model (must be once).

Runs interleave the modes (eager/off, then off/eager, ...) so that machine load hits
both alike; one untimed warm-up run per provider comes first (--warmup 0 drops it).
Cleanup per run: RealEnv.cleanup (SIGKILL to the process groups of every pane and
the tmux server, the cao server by PID), the private tmux socket file, then SIGKILL by
PID to any process still carrying the run's private dirs in its environment (Claude
Code's detached `cao hook`s), then the private CAO_HOME_DIR and the temp dir.

    .venv/bin/python bench/bench_eager.py [--runs N] [--providers kimi_cli]
                                          [--warmup N] [--json out.json]

Progress on stderr, the table on stdout. See bench/README.md, "Eager inbox delivery".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(REPO / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import cao  # noqa: E402
from conftest import kill_pid  # noqa: E402
from mock_llm import MockLLM  # noqa: E402
from real_cli_setup import BINARIES, CLIS, installed  # noqa: E402
from test_real_clis import RealEnv  # noqa: E402

STREAM_S = 3.0
# SSE events of the TURN-ONE answer (4 text chunks): Anthropic 9 events, OpenAI chat 8;
# chunk_delay goes between events, so the stream lasts (events - 1) * chunk_delay.
STREAM_GAPS = {"claude_code": 8, "kimi_cli": 7}
TURN_ONE_TEXT = "ANSWER-ONE " + " ".join(f"w{i}" for i in range(60))
POLL_S = 0.02
TIMEOUT = 90.0


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(POLL_S)


def one_run(provider, eager):
    """Run the flow once; returns a dict of figures (seconds) or raises."""
    tmp = Path(tempfile.mkdtemp(prefix="cao-bench-eager-"))
    mock = MockLLM().start()
    env = None
    try:
        mock.reply("TURN-ONE", text=TURN_ONE_TEXT,
                   chunk_delay=STREAM_S / STREAM_GAPS.get(provider, 8))
        mock.reply("TURN-TWO", text="ANSWER-TWO")
        env = RealEnv(tmp, mock, [provider])
        env.env["CAO_EAGER_INBOX_DELIVERY"] = "true" if eager else "false"
        env.start_server()
        env.profile("agent", provider, "You answer.")
        term = env.start(provider)["id"]
        env.send(term, "TURN-ONE please")

        def main_with(marker):
            return [r for r in mock.main_requests() if marker in r["user_text"]]
        wait_until(lambda: main_with("TURN-ONE"), TIMEOUT, "TURN-ONE request at the mock")
        wait_until(lambda: env.status(term) == "processing", TIMEOUT, "status processing")
        code, posted = env.request("POST", f"/terminals/{term}/inbox/messages",
                                   {"sender_id": "bench", "message": "TURN-TWO please"})
        if code != 200:
            raise RuntimeError(f"inbox POST: {code} {posted}")
        try:
            second = wait_until(lambda: main_with("TURN-TWO"), TIMEOUT,
                                "TURN-TWO request at the mock")[0]
        except TimeoutError as e:
            inbox = env.request("GET", f"/terminals/{term}/inbox/messages")[1]
            raise TimeoutError(f"{e}; inbox row {inbox[0]['status'] if inbox else None}, status "
                               f"{env.status(term)}, screen end {env.screen(term)[-400:]!r}") from None
        first = main_with("TURN-ONE")[0]
        wait_until(lambda: first["last_byte_at"], TIMEOUT, "end of the TURN-ONE stream")
        wait_until(lambda: env.status(term) == "completed" and "ANSWER-TWO" in env.screen(term),
                   TIMEOUT, "the TURN-TWO answer on a completed screen")
        events, after = [], 0
        while True:  # /events pages by 500
            page = env.request("GET", f"/events?after={after}")[1]
            if not page["events"]:
                break
            events += [e for e in page["events"] if e["terminal_id"] == term]
            after = page["next"]
        delivered_ts = next((e["ts"] for e in events if e["kind"] == "message_delivered"), None)
        last = first["last_byte_at"]
        # cao's first `completed` after the TURN-ONE stream ended (off: what delivery waits for)
        completed_ts = next((e["ts"] for e in events if e["kind"] == "status" and e["ts"] >= last
                             and e["data"]["status"] == "completed"), None)
        return {"gap": second["time"] - last,
                "one_to_two": second["time"] - first["time"],
                "stream": last - first["first_byte_at"],
                "delivered_after_last_byte": delivered_ts - last if delivered_ts else None,
                "completed_after_last_byte": completed_ts - last if completed_ts else None,
                "mid_turn": bool(delivered_ts and delivered_ts < last),
                "turn_two_requests": len(main_with("TURN-TWO"))}
    finally:
        if env is not None:
            env.cleanup()
            sock = Path(env.env.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}" / env.socket
            sock.unlink(missing_ok=True)
            stop_leftovers((str(tmp), str(env.home)))
            shutil.rmtree(env.home, ignore_errors=True)
        mock.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def stop_leftovers(markers):
    """SIGKILL, by PID, processes whose environment names this run's private dirs.

    Claude Code runs cao's hooks (`cao hook`) detached from the pane's process group,
    so RealEnv.cleanup's killpg misses one that is still running; such a hook then
    recreates CAO_HOME_DIR after it was removed. Only this run's processes carry
    these (random) paths."""
    needles = [m.encode() for m in markers]
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if any(n in environ for n in needles):
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmd = "?"
            pids.append((int(entry.name), cmd[:80].strip()))
    for pid, _ in pids:
        kill_pid(pid, signal.SIGKILL)
    if pids:
        log(f"killed {len(pids)} leftover process(es) of the run by PID: {pids}")


def fmt(x):
    return f"{x:.3f} s"


def table(rows, header):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per provider and mode (5)")
    ap.add_argument("--providers", default="kimi_cli")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per provider first (1)")
    ap.add_argument("--json", help="also write every run's figures here")
    args = ap.parse_args(argv)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    results, notes = {}, []
    for provider in providers:
        if provider not in BINARIES or not cao.PROVIDERS.get(provider, {}).get("eager_input"):
            notes.append(f"{provider}: not a provider with eager_input; skipped")
            continue
        if not installed(provider):
            notes.append(f"{provider}: {BINARIES[provider]} not installed under {CLIS}; skipped")
            continue
        for i in range(args.warmup):
            try:
                one_run(provider, eager=False)
                log(f"{provider} warm-up {i + 1} done")
            except Exception as e:  # noqa: BLE001 - a failed warm-up is only a note
                notes.append(f"{provider}: warm-up {i + 1} failed: {e}")
        for i in range(args.runs):
            order = (True, False) if i % 2 == 0 else (False, True)
            for eager in order:
                mode = "eager" if eager else "off"
                try:
                    r = one_run(provider, eager)
                except Exception as e:  # noqa: BLE001 - keep going, report it
                    notes.append(f"{provider} {mode} run {i + 1}: failed: {e}")
                    log(f"{provider} {mode} run {i + 1}: FAILED {e}")
                    continue
                results.setdefault(provider, {}).setdefault(mode, []).append(r)
                log(f"{provider} {mode} run {i + 1}: gap {r['gap']:.3f} s, stream {r['stream']:.2f} s,"
                    f" delivered {'mid-turn' if r['mid_turn'] else 'after the turn'}, TURN-TWO asked "
                    f"{r['turn_two_requests']}x")
    rows = []
    for provider, modes in results.items():
        for mode in ("off", "eager"):
            runs = modes.get(mode, [])
            if not runs:
                continue
            gaps = [r["gap"] for r in runs]
            dl = [r["delivered_after_last_byte"] for r in runs if r["delivered_after_last_byte"] is not None]
            saving = ""
            if mode == "eager" and modes.get("off"):
                saving = fmt(statistics.median(r["gap"] for r in modes["off"]) - statistics.median(gaps))
            mid = sum(r["mid_turn"] for r in runs)
            once = sum(r["turn_two_requests"] == 1 for r in runs)
            rows.append([provider, mode, len(runs), fmt(statistics.median(gaps)), fmt(min(gaps)),
                         fmt(max(gaps)), saving,
                         f"{statistics.median(dl):+.3f} s" if dl else "-",
                         f"{mid}/{len(runs)}", f"{once}/{len(runs)}",
                         f"{statistics.median(r['stream'] for r in runs):.2f} s"])
    print("eager inbox delivery: the TURN-ONE answer's last byte -> the TURN-TWO request at the mock")
    print(table(rows, ["cli", "mode", "n", "gap p50", "min", "max", "saving (p50 off - eager)",
                       "delivered - last byte p50", "delivered mid-turn",
                       "TURN-TWO asked once", "stream p50"]))
    if notes:
        print("\nnotes:")
        for n in notes:
            print(f"- {n}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "notes": notes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
