#!/usr/bin/env bash
# Set up cao on this machine.
#   bash install.sh          install tmux if missing, build dist/cao.pyz, put `cao` on PATH
#   bash install.sh --demo   ... then run a demo session with the built-in demo agent
#   bash install.sh --test   install the test dependencies and run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-install}"
BIN_DIR="${CAO_BIN_DIR:-$HOME/.local/bin}"
SHARE_DIR="${CAO_SHARE_DIR:-$HOME/.local/share/cao}"
say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root to run: $*"; fi; }

python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
  || die "cao needs python3 >= 3.10 on PATH; install it (apt install python3 / brew install python)"

if ! command -v tmux >/dev/null; then
  say "installing tmux"
  if command -v apt-get >/dev/null; then as_root apt-get update -qq && as_root apt-get install -y -qq tmux
  elif command -v dnf >/dev/null; then as_root dnf install -y tmux
  elif command -v brew >/dev/null; then brew install tmux
  else die "tmux is missing and no apt-get/dnf/brew was found; install tmux 3.2+ yourself"; fi
fi

if [ "$mode" = "--test" ]; then
  say "creating .venv with the test dependencies"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q pytest pyyaml "mcp>=1.23" "croniter>=2" playwright
  say "running the test suite"
  set +e
  .venv/bin/python -m pytest -q -p no:cacheprovider tests
  rc=$?
  set -e
  [ "$rc" = 5 ] && die "pytest collected no tests; the tests/ folder is missing or broken"
  exit "$rc"
fi

say "building dist/cao.pyz"
if ! python3 build_zipapp.py --with-mcp 2>/dev/null; then
  say "could not vendor mcp (no PyPI?); building without it (cao mcp will need 'pip install mcp')"
  python3 build_zipapp.py
fi
mkdir -p "$BIN_DIR" "$SHARE_DIR"
cp dist/cao.pyz "$SHARE_DIR/cao.pyz"
for cmd in cao cao-server cao-mcp-server cao-ops-mcp-server; do
  case $cmd in cao-server) sub=server;; cao-mcp-server) sub=mcp;; cao-ops-mcp-server) sub=ops-mcp;; *) sub="";; esac
  printf '#!/bin/sh\nexec python3 "%s" %s "$@"\n' "$SHARE_DIR/cao.pyz" "$sub" > "$BIN_DIR/$cmd"
  chmod +x "$BIN_DIR/$cmd"
done
say "installed $BIN_DIR/cao, cao-server, cao-mcp-server and cao-ops-mcp-server ($("$BIN_DIR/cao" --version))"
case ":$PATH:" in *":$BIN_DIR:"*) ;; *) say "add $BIN_DIR to your PATH: export PATH=\"$BIN_DIR:\$PATH\"";; esac

if [ "$mode" = "--demo" ]; then
  cao="$BIN_DIR/cao"
  workdir="${TMPDIR:-/tmp}/cao-demo"; mkdir -p "$workdir"; cd "$workdir"
  say "demo: launching a supervisor (demo agent, no LLM needed)"
  "$cao" launch --agents code_supervisor --provider demo --headless --session-name demo
  say "demo: the supervisor hands a task to a developer and waits for the answer (handoff)"
  "$cao" session send cao-demo "/handoff developer write the parser"
  say "demo: the supervisor assigns a review; the reviewer reports back by send_message"
  "$cao" session send cao-demo "/assign reviewer /send - review done, two nits"
  for _ in $(seq 50); do
    "$cao" session inbox cao-demo --status delivered | grep -q "review done" && break
    sleep 0.2
  done
  "$cao" session inbox cao-demo
  "$cao" session status cao-demo --workers
  say "demo: shutting the session down"
  "$cao" shutdown --session cao-demo
  say "done. Attach to a live session with: cao launch --agents code_supervisor --provider demo"
fi
