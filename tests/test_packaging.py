"""cao.pyz runs on a bare CPython (no site-packages) and pip install gives the scripts."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, kill_pid

BARE = [getattr(sys, "_base_executable", sys.executable), "-I", "-S"]


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "cao.pyz"
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "-o", str(out)], check=True,
                   capture_output=True)
    return out


def test_pyz_holds_the_program_and_its_data(pyz):
    names = set(zipfile.ZipFile(pyz).namelist())
    assert {"__main__.py", "cao.py", "profiles/developer.md", "web_static/index.html"} <= names


def test_bare_python_runs_version_server_launch_session_shutdown(cao_env, pyz):
    cmd = BARE + [str(pyz)]
    version = cao_env.run("--version", cmd=cmd)
    assert version.returncode == 0 and version.stdout.startswith("cao ")
    cao_env.start_server(cmd=cmd)
    launched = cao_env.run("launch", "--agents", "developer", "--provider", "demo", "--headless",
                           "--session-name", "pyz", "from the zipapp", cmd=cmd)
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.rstrip().endswith("done: from the zipapp")
    # The demo agent itself runs from the archive too.
    pane_cmd = cao_env.tmux("list-panes", "-a", "-F", "#{pane_start_command}").stdout
    assert str(pyz) in pane_cmd and "demo-agent" in pane_cmd
    listed = cao_env.run("session", "list", cmd=cmd)
    assert "cao-pyz" in listed.stdout
    down = cao_env.run("shutdown", "--session", "cao-pyz", cmd=cmd)
    assert down.returncode == 0 and cao_env.tmux("has-session", "-t", "=cao-pyz").returncode != 0


@pytest.mark.parametrize("version", ["3.10", "3.12", "3.13"])
def test_pyz_on_other_pythons(pyz, version):
    found = sorted(Path("~/.pyenv/versions").expanduser().glob(f"{version}.*/bin/python3"))
    python = str(found[-1]) if found else shutil.which(f"python{version}")
    if python and "/shims/" in python:
        python = None
    if not python:
        pytest.skip(f"python{version} is not installed here")
    result = subprocess.run([python, "-I", "-S", str(pyz), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "launch" in result.stdout


@pytest.mark.slow
def test_pip_install_gives_console_scripts(tmp_path, cao_env):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps",
                          str(ROOT)], capture_output=True, text=True)
    if pip.returncode and "hatchling" in pip.stderr and "No matching distribution" in pip.stderr:
        pytest.skip("hatchling is not reachable (no package index)")
    assert pip.returncode == 0, pip.stderr
    assert subprocess.run([str(venv / "bin/cao"), "--version"], capture_output=True,
                          text=True).stdout.startswith("cao ")
    proc = subprocess.Popen([str(venv / "bin/cao-server"), "--port", str(cao_env.port)],
                            env=cao_env.env, cwd=cao_env.workdir, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from conftest import wait_for
        wait_for(cao_env.healthy, 15, what="installed cao-server")
        profiles = [p["name"] for p in cao_env.request("GET", "/agents/profiles")[1]]
        assert "developer" in profiles  # built-ins ship inside the wheel
        code, _ = cao_env.request("GET", "/")
        assert code == 200
    finally:
        kill_pid(proc.pid)


@pytest.fixture(scope="module")
def pyz_with_mcp(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-mcp") / "cao.pyz"
    built = subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "--with-mcp", "-o", str(out)],
                           capture_output=True, text=True)
    if built.returncode and "No matching distribution" in built.stderr:
        pytest.skip("mcp is not reachable (no package index)")
    assert built.returncode == 0, built.stderr
    return out


def _python(version):
    """A real interpreter of that version here (pyenv's or on PATH, not a shim), or None."""
    found = sorted(Path("~/.pyenv/versions").expanduser().glob(f"{version}.*/bin/python3"))
    python = str(found[-1]) if found else shutil.which(f"python{version}")
    return None if not python or "/shims/" in python else python


@pytest.mark.slow
def test_one_pyz_carries_mcp_for_every_target_within_the_size_budget(pyz_with_mcp):
    import json
    with zipfile.ZipFile(pyz_with_mcp) as z:
        targets = json.loads(z.read("_vendor/manifest.json"))["targets"]
        names = z.namelist()
    assert sorted(targets) == sorted(f"cp3{v}-{m}" for v in (10, 11, 12, 13)
                                     for m in ("x86_64", "aarch64"))
    for target, layers in targets.items():  # each target has its own compiled pydantic-core
        version = target[2:].split("-")[0]
        machine = target.split("-")[1]
        assert any(n.startswith(tuple(f"_vendor/{n}/" for n in layers)) and
                   f"_pydantic_core.cpython-{version}-{machine}-linux-gnu.so" in n for n in names), target
    assert pyz_with_mcp.stat().st_size < 30 * 1024 * 1024


@pytest.mark.slow
@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13"])
def test_pyz_with_vendored_mcp_serves_mcp_on_each_bare_cpython(cao_env, tmp_path, pyz_with_mcp, version):
    python = _python(version)
    if not python:
        pytest.skip(f"python{version} is not installed here")
    env = dict(cao_env.env, XDG_CACHE_HOME=str(tmp_path / "cache"), CAO_TERMINAL_ID="abcdef12")
    init = ('{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":'
            '"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}\n')
    proc = subprocess.run([python, "-I", "-S", str(pyz_with_mcp), "mcp"], input=init,
                          capture_output=True, text=True, env=env, timeout=120)
    first = proc.stdout.splitlines()[0] if proc.stdout else proc.stderr
    assert '"serverInfo"' in first and "cao-mcp-server" in first, first
    assert len(list((tmp_path / "cache" / "cao").glob("vendor-*/.complete"))) == 1


def test_a_python_the_pyz_has_no_mcp_for_gets_one_line(cao_env, tmp_path):
    import json
    fake = tmp_path / "cao.pyz"
    with zipfile.ZipFile(fake, "w") as z:
        z.write(ROOT / "cao.py", "cao.py")
        z.writestr("__main__.py", "import cao\ncao.cli_main()\n")
        z.writestr("_vendor/manifest.json", json.dumps({"targets": {"cp39-sparc64": [0]}}))
    env = dict(cao_env.env, XDG_CACHE_HOME=str(tmp_path / "cache"), CAO_TERMINAL_ID="abcdef12")
    proc = subprocess.run(BARE + [str(fake), "mcp"], capture_output=True, text=True, env=env,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "carries mcp for cp39-sparc64, not for this Python" in proc.stderr
    assert "pip install mcp" in proc.stderr
