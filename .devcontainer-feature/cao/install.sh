#!/bin/sh
# Dev container feature "cao": runs as root while the image is built. Options arrive
# as environment variables (PYZ, SHA256, INSTALLPREFIX); see devcontainer-feature.json.
# POSIX sh on purpose: a minimal image may have no bash.
set -eu

say() { printf 'cao feature: %s\n' "$*"; }
die() { printf 'cao feature: error: %s\n' "$*" >&2; exit 1; }

FEATURE_DIR=$(cd "$(dirname "$0")" && pwd)
PYZ="${PYZ:-}"
SHA256="${SHA256:-}"
PREFIX="${INSTALLPREFIX:-/usr/local}"

[ "$(id -u)" = 0 ] || die "run this as root (dev container features install as root)"

install_packages() {
    if command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
        rm -rf /var/lib/apt/lists/*
    elif command -v apk >/dev/null 2>&1; then
        apk add --no-cache "$@"
    elif command -v dnf >/dev/null 2>&1; then
        dnf install -y "$@"
    elif command -v microdnf >/dev/null 2>&1; then
        microdnf install -y "$@"
    elif command -v yum >/dev/null 2>&1; then
        yum install -y "$@"
    else
        die "no apt-get, apk, dnf or yum here to install $*; install them in the image first"
    fi
}

python_ok() {
    command -v python3 >/dev/null 2>&1 &&
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null
}

missing=""
python_ok || missing="python3"
command -v tmux >/dev/null 2>&1 || missing="$missing tmux"
case "$PYZ" in
    https://*) [ -e /etc/ssl/certs/ca-certificates.crt ] || missing="$missing ca-certificates" ;;
esac
if [ -n "$missing" ]; then
    say "installing$missing"
    # shellcheck disable=SC2086  # one word per package
    install_packages $missing
fi
python_ok || die "cao needs python3 >= 3.10; this image has $(python3 --version 2>&1). Use a newer base image"

mkdir -p "$PREFIX/share/cao" "$PREFIX/bin"
target="$PREFIX/share/cao/cao.pyz"
staged="$target.new"
case "$PYZ" in
    "")
        [ -f "$FEATURE_DIR/cao.pyz" ] || die "no cao.pyz beside install.sh and no pyz option:" \
            "build it into the feature (python3 build_zipapp.py --with-mcp -o $FEATURE_DIR/cao.pyz)" \
            "or set the pyz option to its URL"
        cp "$FEATURE_DIR/cao.pyz" "$staged" ;;
    http://*|https://*)
        say "downloading $PYZ"
        python3 - "$PYZ" "$staged" <<'PY' || { rm -f "$staged"; exit 1; }
import shutil, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=120) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
except (OSError, ValueError) as e:
    sys.exit(f"cao feature: error: could not download {sys.argv[1]}: {e}")
PY
        ;;
    *)
        [ -f "$PYZ" ] || die "pyz option $PYZ is not a file; give a path inside the image or a URL"
        cp "$PYZ" "$staged" ;;
esac

if [ -n "$SHA256" ]; then
    actual=$(python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$staged")
    if [ "$actual" != "$SHA256" ]; then
        rm -f "$staged"
        die "cao.pyz has sha256 $actual, not the $SHA256 the sha256 option expects"
    fi
fi
version=$(python3 "$staged" --version 2>&1) || { rm -f "$staged"; die "cao.pyz does not run: $version"; }
mv "$staged" "$target"
chmod 0644 "$target"

for command in cao cao-server cao-mcp-server cao-ops-mcp-server; do
    case "$command" in
        cao) sub="" ;;
        cao-server) sub="server" ;;
        cao-mcp-server) sub="mcp" ;;
        cao-ops-mcp-server) sub="ops-mcp" ;;
    esac
    printf '#!/bin/sh\nexec python3 "%s" %s "$@"\n' "$target" "$sub" > "$PREFIX/bin/$command"
    chmod 0755 "$PREFIX/bin/$command"
done
say "installed $version: $PREFIX/bin/cao, cao-server, cao-mcp-server, cao-ops-mcp-server"
