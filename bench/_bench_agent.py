"""Agent used by bench_status.py: like the demo agent, but it appends the wall
time at which it printed each answer to $BENCH_MARKS, so the bench can measure
how long cao takes to report `completed` after the screen changed."""
import os
import sys
import time

marks = os.environ["BENCH_MARKS"]
delay = float(os.environ.get("BENCH_DELAY", "0.2"))
out = sys.stdout
out.write("bench agent\n> ")
out.flush()
for line in sys.stdin:
    if not line.strip():
        out.write("> ")
        out.flush()
        continue
    out.write("| working...")
    out.flush()
    time.sleep(delay)
    out.write(f"\r\x1b[Kdone: {line.strip()}\n")
    out.flush()
    with open(marks, "a") as f:
        f.write(f"{os.environ['CAO_TERMINAL_ID']} {time.time()}\n")
    out.write("> ")
    out.flush()
