"""A stand-in for upstream's `mock_cli` test binary (not shipped in its wheel), so
its `mock_cli` provider can run in bench_dashboard.py: a prompt, then for each line
"> MOCK: <line>" after --delay-ms; a line holding "work for an hour" keeps it busy for an
hour, quietly, as the cao side's busy agents are."""
import sys
import time

delay = float(sys.argv[sys.argv.index("--delay-ms") + 1]) / 1000 if "--delay-ms" in sys.argv else 0.05
out = sys.stdout
while True:
    out.write("\u276f ")
    out.flush()
    line = sys.stdin.readline()
    if not line:
        break
    time.sleep(3600 if "work for an hour" in line else delay)
    out.write(f"> MOCK: {line.strip()}\n")
