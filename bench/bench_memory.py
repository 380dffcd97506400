#!/usr/bin/env python3
"""memory_recall latency over a store of N memories (default 10,000), cao beside
upstream 2.5.4 where its venv is present.

    python3 bench/bench_memory.py [--memories 10000] [--queries 300]

cao: a real server in a throw-away CAO_HOME_DIR with one demo terminal; the
memories go in through POST /internal/memory/store (as an agent's memory_store
does), then each query is timed as one POST /internal/memory/recall on a
keep-alive connection: HTTP, JSON, the FTS5 query and the use count update. The
server's own recall (MemoryStore.recall in-process, no HTTP) is timed too.

upstream: its MemoryService (what its memory_recall tool runs, in-process) stores
the same notes in a throw-away CAO_HOME_DIR and recalls the same queries; it runs
in the venv that bench/_common.py and .ci/install-upstream make.
"""
import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

WORDS = ("deploy staging database port cache redis queue worker retry timeout token auth "
         "login session cookie header proxy nginx docker image build test pytest fixture "
         "mock schema migration index query join lock thread async await budget latency "
         "metric alert log trace span release branch merge review lint format style").split()


def _notes(count, seed=7):
    rng = random.Random(seed)
    return [(f"note-{i}", " ".join(rng.choice(WORDS) for _ in range(12)) + f" fact {i}")
            for i in range(count)]


def _queries(count, seed=11):
    rng = random.Random(seed)
    return [" ".join(rng.sample(WORDS, 3)) for _ in range(count)]


def _stats(samples):
    samples = sorted(samples)
    return {"p50_ms": round(statistics.median(samples) * 1000, 2),
            "p95_ms": round(samples[int(len(samples) * 0.95) - 1] * 1000, 2),
            "n": len(samples)}


def bench_cao(memories, queries):
    from conftest import CaoEnv
    env = CaoEnv(Path(tempfile.mkdtemp(prefix="cao-bm-")))
    try:
        env.start_server()
        code, term = env.request("POST", "/sessions?agent_profile=developer&provider=demo"
                                         "&session_name=bench")
        assert code == 201, term
        context = {"terminal_id": term["id"]}
        conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=30)
        headers = {"Content-Type": "application/json"}

        def post(path, body):
            conn.request("POST", path, json.dumps(body), headers)
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200, data
            return json.loads(data)
        started = time.perf_counter()
        for key, content in memories:
            post("/internal/memory/store", {"content": content, "key": key,
                                            "terminal_context": context})
        store_s = time.perf_counter() - started
        samples = []
        for query in queries:
            t = time.perf_counter()
            found = post("/internal/memory/recall", {"query": query, "terminal_context": context})
            samples.append(time.perf_counter() - t)
            assert found["memories"], query
        conn.close()
        return {"http": _stats(samples), "store_per_note_ms": round(store_s / len(memories) * 1000, 2),
                "in_process": _in_process(env.home, term["id"], queries)}
    finally:
        env.cleanup()


def _in_process(home, terminal_id, queries):
    os.environ["CAO_HOME_DIR"] = str(home)
    import cao
    store = cao.Store(next(home.glob("db/*.db")))
    memory = cao.MemoryStore(store)
    row = cao.terminal_row(store, terminal_id)
    samples = []
    for query in queries:
        t = time.perf_counter()
        memory.recall(row, query)
        samples.append(time.perf_counter() - t)
    store.close()
    return _stats(samples)


_UPSTREAM = r"""
import asyncio, json, sys, time, statistics
from cli_agent_orchestrator.clients.database import init_db
from cli_agent_orchestrator.services.memory_service import MemoryService
init_db()
notes, queries = json.load(sys.stdin)
context = {"terminal_id": "abcdef12", "session_name": "cao-bench", "agent_profile": "developer",
           "provider": "claude_code", "cwd": sys.argv[1]}
async def main():
    service = MemoryService()
    t = time.perf_counter()
    for key, content in notes:
        await service.store(content=content, scope="project", memory_type="project", key=key,
                            tags="", terminal_context=context)
    store_s = time.perf_counter() - t
    samples = []
    for query in queries:
        t = time.perf_counter()
        await service.recall(query=query, scope=None, memory_type=None, limit=10,
                             terminal_context=context, search_mode="hybrid", sort_by="recency",
                             include_related=False)
        samples.append(time.perf_counter() - t)
    print(json.dumps({"samples": samples, "store_s": store_s}))
asyncio.run(main())
"""


def bench_upstream(memories, queries):
    from _common import UPSTREAM_VENV
    venvs = [Path(os.environ.get("CAO_UPSTREAM_VENV", Path.home() / ".cache" / "cao-upstream-2.5.4")),
             UPSTREAM_VENV]
    python = next((v / "bin" / "python" for v in venvs if (v / "bin" / "python").exists()), None)
    if python is None:
        return {"skipped": "no upstream 2.5.4 venv (.ci/install-upstream)"}
    home = tempfile.mkdtemp(prefix="cao-bm-up-")
    work = tempfile.mkdtemp(prefix="cao-bm-up-cwd-")
    done = subprocess.run([str(python), "-c", _UPSTREAM, work], input=json.dumps([memories, queries]),
                          capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "CAO_HOME_DIR": home, "HOME": home})
    if done.returncode != 0:
        return {"failed": done.stderr.strip().splitlines()[-1:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"in_process": _stats(result["samples"]),
            "store_per_note_ms": round(result["store_s"] / len(memories) * 1000, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memories", type=int, default=10000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--no-upstream", action="store_true")
    args = parser.parse_args()
    memories, queries = _notes(args.memories), _queries(args.queries)
    result = {"memories": args.memories, "cao": bench_cao(memories, queries)}
    if not args.no_upstream:
        result["upstream_2.5.4"] = bench_upstream(memories, queries)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
