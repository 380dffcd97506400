"""cao.pyz runs on a bare CPython (no site-packages) and pip install gives the scripts;
the dev container feature installs it on a bare Debian, where agents orchestrate."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, free_port, kill_pid

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


# -- a bare Debian: the dev container feature and a demo orchestration ---------
# The root is Debian's minbase with neither python3 nor tmux: the feature's install
# script puts them in, as it would in a bare image. trixie brings Python 3.13, a
# different one from the builder's. The root is made once and kept (about 40 s).

DEBIAN_ROOT_CACHE = Path(os.environ.get("CAO_TEST_DEBIAN_ROOT",
                                        "~/.cache/cao-test/debian-trixie-minbase")).expanduser()
DEBIAN_MIRROR = os.environ.get("CAO_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def _needs_a_chroot():
    missing = [tool for tool in ("debootstrap", "unshare", "chroot") if not shutil.which(tool)]
    reason = ("the chroot test runs as root" if os.geteuid() != 0 else
              f"{', '.join(missing)} not installed (apt install debootstrap)" if missing else None)
    if reason and os.environ.get("CI"):
        pytest.fail(f"{reason}; .ci/run must give CI what this test needs")
    if reason:
        pytest.skip(reason)


def _bare_debian_root():
    if (DEBIAN_ROOT_CACHE / ".complete").exists():
        return DEBIAN_ROOT_CACHE
    partial = DEBIAN_ROOT_CACHE.with_name(DEBIAN_ROOT_CACHE.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["debootstrap", "--variant=minbase", "trixie", str(partial), DEBIAN_MIRROR],
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    (partial / ".complete").touch()
    partial.rename(DEBIAN_ROOT_CACHE)
    return DEBIAN_ROOT_CACHE


@pytest.mark.slow
def test_the_feature_installs_cao_on_a_bare_debian_and_a_demo_orchestration_runs(tmp_path, pyz_with_mcp):
    _needs_a_chroot()
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(_bare_debian_root()), str(root)], check=True)
    assert not (root / "usr/bin/python3").exists() and not (root / "usr/bin/tmux").exists()
    feature = root / "tmp/cao-feature"
    shutil.copytree(ROOT / ".devcontainer-feature/cao", feature)
    shutil.copy(pyz_with_mcp, feature / "cao.pyz")
    shutil.copy(ROOT / "tests/fixtures/chroot_orchestration.py", root / "tmp/orchestrate.py")
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")  # apt-get inside reaches the mirror
    inside = ("sh /tmp/cao-feature/install.sh && python3 --version && mkdir -p /work && cd /work"
              " && python3 /tmp/orchestrate.py")
    # Own mount and PID namespaces: the mounts vanish with them, and every process the
    # run started (tmux, the server, agents) dies with its first process.
    script = (f"mount --rbind /dev {root}/dev && mount -t proc proc {root}/proc && "
              f"exec chroot {root} /usr/bin/env -i HOME=/root LANG=C.UTF-8 "
              f"PATH=/usr/local/bin:/usr/bin:/bin CAO_API_PORT={free_port()} /bin/sh -c '{inside}'")
    proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--kill-child",
                             "/bin/sh", "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        kill_pid(proc.pid)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "installed cao " in out and "Python 3.13." in out, out
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["handoff"] == "done: done: add 2 and 5"
    assert seen["assign"].startswith("done: assigned ") and seen["callback"] == "done: review finished"
    assert seen["inbox"] == ["delivered"] and seen["shutdown"] == 0 and seen["tmux_after"] == ""
