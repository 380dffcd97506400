"""Orchestration figures: `cao mcp` start-up, handoff overhead, inbox delivery latency.

    python3 bench/bench_orchestration.py [--quick]

- MCP start: spawn -> answer to `initialize` (median of N), for `cao mcp`, upstream
  2.5.4's `cao-mcp-server`, and a bare MCP SDK server with one tool (the import
  floor). All three use the mcp package of one venv
  (~/.cache/cao-bench/mcp-venv, created once) except upstream, which uses its own.
- handoff overhead: wall time of a `handoff` tool call to a demo worker with
  CAO_DEMO_DELAY=0 (the worker's own work is ~0), measured through the real MCP
  chain (SDK client -> cao mcp -> server -> tmux -> demo agent).
- delivery latency: POST of an inbox message to an idle demo agent -> the agent
  reads it (the time it writes to CAO_DEMO_LOG).
Upstream has no agent that runs offline, so handoff and delivery are cao only.
Target for MCP start: <= 0.6 s.
"""
import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (CACHE_DIR, Sandbox, ensure_upstream_venv, free_port, median,  # noqa: E402
                     percentile, wait_healthy)

ROOT = Path(__file__).resolve().parent.parent
MCP_VENV = CACHE_DIR / "mcp-venv"
BARE_SERVER = '''
try:
    from mcp.server.mcpserver import MCPServer
except ImportError:
    from mcp.server.fastmcp import FastMCP as MCPServer
server = MCPServer("bare")
@server.tool()
def ping() -> str:
    """ping"""
    return "pong"
server.run()
'''
INIT = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "bench", "version": "0"}}}) + "\n"


def ensure_mcp_venv():
    python = MCP_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(MCP_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "mcp>=1.23"], check=True)
    return str(python)


def time_initialize(argv, env):
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    proc.stdin.write(INIT.encode())
    proc.stdin.flush()
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - started
    proc.kill()
    proc.wait()
    if b'"result"' not in line:
        raise RuntimeError(f"{argv[0]}: no initialize result: {line[:200]!r}")
    return elapsed


def api(port, method, path, body=None):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=json.dumps(body) if body is not None else None)
    resp = conn.getresponse()
    data = json.loads(resp.read() or b"null")
    conn.close()
    if resp.status >= 400:
        raise RuntimeError(f"{method} {path}: {resp.status} {data}")
    return data


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    runs = 3 if args.quick else 10
    python = ensure_mcp_venv()
    upstream = ensure_upstream_venv()
    rows = []
    with Sandbox("orch") as box:
        env = box.env(CAO_TERMINAL_ID="abcdef12")
        (box.root / "bare.py").write_text(BARE_SERVER)
        for label, argv in [("cao mcp", [python, str(ROOT / "cao.py"), "mcp"]),
                            ("upstream cao-mcp-server 2.5.4", [str(upstream / "bin/cao-mcp-server")]),
                            ("bare MCP SDK server (floor)", [python, str(box.root / "bare.py")])]:
            time_initialize(argv, env)  # warm the page cache
            times = [time_initialize(argv, env) for _ in range(runs)]
            rows.append((label, median(times)))

        port = free_port()
        audit = box.root / "audit.jsonl"
        senv = box.env(CAO_API_PORT=str(port), CAO_DEMO_DELAY="0", CAO_DEMO_LOG=str(audit))
        senv["PATH"] = f"{Path(python).parent}:{senv['PATH']}"
        work = box.root / "work"
        work.mkdir()
        server = box.spawn([python, str(ROOT / "cao.py"), "server", "--port", str(port)], env=senv)
        wait_healthy(port, server)
        sup = api(port, "POST", f"/sessions?agent_profile=code_supervisor&provider=demo"
                                f"&session_name=bench&working_directory={work}")
        handoffs = []
        client_env = dict(senv, CAO_TERMINAL_ID=sup["id"])
        for _ in range(runs):
            handoffs.append(asyncio.run(_handoff(python, client_env)))
        other = api(port, "POST", "/sessions/cao-bench/terminals?agent_profile=reviewer&provider=demo")
        delivery = []
        for i in range(runs * 3):
            before = len(audit.read_text().splitlines()) if audit.exists() else 0
            posted = time.time()
            api(port, "POST", f"/terminals/{other['id']}/inbox/messages",
                {"sender_id": sup["id"], "message": f"ping {i}"})
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                lines = audit.read_text().splitlines() if audit.exists() else []
                if len(lines) > before:
                    delivery.append((json.loads(lines[-1])["t"] - posted) * 1000)
                    break
                time.sleep(0.002)
            # Let the delivery finish (its submit check and status) before the next one.
            while api(port, "GET", f"/terminals/{other['id']}/inbox/messages?limit=1")[0][
                    "status"] != "delivered" or api(
                    port, "GET", f"/terminals/{other['id']}")["status"] != "completed":
                time.sleep(0.01)

    print("MCP server: spawn -> initialize answered (median of %d)" % runs)
    for label, value in rows:
        print(f"  {label:<32} {value:.3f} s")
    print(f"  cao/upstream ratio {rows[1][1] / rows[0][1]:.2f}x faster; target <= 0.600 s")
    print(f"handoff to a demo worker with delay 0 (whole MCP chain): median "
          f"{median(handoffs):.3f} s, max {max(handoffs):.3f} s over {runs}")
    print(f"inbox message to an idle agent -> agent reads it: p50 {percentile(delivery, 50):.1f} ms, "
          f"p99 {percentile(delivery, 99):.1f} ms over {len(delivery)}")


async def _handoff(python, env):
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client
    params = StdioServerParameters(command=python, args=[str(ROOT / "cao.py"), "mcp"], env=env)
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            started = time.perf_counter()
            result = await session.call_tool("handoff", {"agent_profile": "developer",
                                                         "message": "bench"})
            elapsed = time.perf_counter() - started
            assert json.loads(result.content[0].text)["success"], result
            return elapsed


if __name__ == "__main__":
    main()
