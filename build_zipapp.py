#!/usr/bin/env python3
"""Build dist/cao.pyz: cao.py, the web console and the built-in profiles in one
zipapp that runs on a bare CPython >= 3.10.

    python3 build_zipapp.py              # stdlib-only pyz (everything but `cao mcp`)
    python3 build_zipapp.py --with-mcp   # also carry mcp + croniter for CPython 3.10-3.13
                                         # on Linux x86_64 and aarch64

With --with-mcp, pip installs the packages once per target (CPython version x
machine) from wheels. Compiled parts (pydantic-core, rpds-py, cffi, cryptography)
differ per target, the rest is shared: every distinct file is stored once, in a
layer of _vendor/ named in _vendor/manifest.json, and each target lists its layers.
Python cannot load a compiled module out of a zip, so on first use cao extracts its
target's layers to ~/.cache/cao/vendor-<hash>/ (see docs/packaging.md).
"""
import argparse
import hashlib
import json
import py_compile
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENDORED = ["mcp>=1.23", "croniter>=2"]
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
MACHINES = ["x86_64", "aarch64"]
# cryptography ships one abi3 build for every CPython; the one pip picks for the
# oldest Python loads on all of them, so every target of a machine gets that one.
ABI3 = ["cryptography"]


def stage(target, with_mcp):
    shutil.copy2(ROOT / "cao.py", target / "cao.py")
    # Bytecode beside the source: zipimport uses it when this Python's magic
    # number matches and falls back to cao.py otherwise.
    py_compile.compile(str(target / "cao.py"), cfile=str(target / "cao.pyc"), doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    (target / "__main__.py").write_text("import cao\ncao.cli_main()\n")
    for folder in ("web_static", "profiles", ".skills"):
        if (ROOT / folder).is_dir():
            shutil.copytree(ROOT / folder, target / folder,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if with_mcp:
        with tempfile.TemporaryDirectory() as tmp:
            trees = {f"cp{py.replace('.', '')}-{machine}": pip_install(Path(tmp), py, machine)
                     for machine in MACHINES for py in PYTHONS}
            share_abi3(trees)
            layer(trees, target / "_vendor")


def pip_install(tmp, python, machine):
    """The packages as pip installs them for one CPython version on one machine."""
    tree = tmp / f"{python}-{machine}"
    platforms = [f"--platform={p}_{machine}" for p in ("manylinux2014", "manylinux_2_17", "manylinux_2_28")]
    wanted = list(VENDORED)
    while wanted:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
                        "--disable-pip-version-check", "--upgrade", "--target", str(tree),
                        "--only-binary=:all:", f"--python-version={python}", "--implementation=cp",
                        f"--abi=cp{python.replace('.', '')}", *platforms, *wanted],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wanted = missing_for_target(tree, python, machine)
    for junk in [*tree.glob("**/__pycache__"), tree / "bin"]:
        shutil.rmtree(junk, ignore_errors=True)
    return tree


def missing_for_target(tree, python, machine):
    """Requirements whose markers hold on the target but not here. pip evaluates markers
    (python_version < "3.11", platform_machine, ...) for the Python running it, even
    with --python-version, so a 3.10 target would miss exceptiongroup."""
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    env = {"python_version": python, "python_full_version": python + ".0",
           "platform_machine": machine, "sys_platform": "linux", "platform_system": "Linux",
           "os_name": "posix", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "extra": ""}
    installed = {canonicalize_name(d.name.split("-")[0]) for d in tree.glob("*.dist-info")}
    missing = set()
    for metadata in tree.glob("*.dist-info/METADATA"):
        for line in metadata.read_text(encoding="utf-8").splitlines():
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1].strip())
                if canonicalize_name(req.name) not in installed and req.marker \
                        and "extra" not in str(req.marker) and req.marker.evaluate(env):
                    missing.add(f"{req.name}{req.specifier}")
    return sorted(missing)


def share_abi3(trees):
    for machine in MACHINES:
        oldest = trees[f"cp{PYTHONS[0].replace('.', '')}-{machine}"]
        for tag, tree in trees.items():
            if tag.endswith(machine) and tree != oldest:
                for name in ABI3:
                    for path in [*tree.glob(name), *tree.glob(f"{name}-*.dist-info")]:
                        shutil.rmtree(path)
                    for path in [*oldest.glob(name), *oldest.glob(f"{name}-*.dist-info")]:
                        shutil.copytree(path, tree / path.name)


def layer(trees, vendor):
    """Store each distinct file once: files shared by the same set of targets form a
    layer; the manifest lists each target's layers."""
    owners = {}  # (path, digest) -> [tags]
    for tag, tree in trees.items():
        for path in sorted(p for p in tree.rglob("*") if p.is_file()):
            key = (path.relative_to(tree).as_posix(), hashlib.sha256(path.read_bytes()).hexdigest())
            owners.setdefault(key, []).append(tag)
    layers = {}  # tuple of tags -> layer number
    for (rel, _), tags in sorted(owners.items()):
        number = layers.setdefault(tuple(tags), len(layers))
        source = trees[tags[0]] / rel
        dest = vendor / str(number) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
    manifest = {tag: sorted(n for tags, n in layers.items() if tag in tags) for tag in trees}
    (vendor / "manifest.json").write_text(json.dumps({"targets": manifest}, indent=1))


def write_archive(staged, output):
    """A zipapp whose _vendor/ is LZMA-compressed (a third smaller than deflate for
    compiled modules); cao extracts it with zipfile. cao.pyc is stored as it is, since
    inflating it would cost every command ~6 ms; the rest is deflated."""
    with open(output, "wb") as f:
        f.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(f, "w") as archive:
            for path in sorted(p for p in staged.rglob("*") if p.is_file()):
                name = path.relative_to(staged).as_posix()
                archive.write(path, name, zipfile.ZIP_LZMA if name.startswith("_vendor/") else
                              zipfile.ZIP_STORED if name == "cao.pyc" else zipfile.ZIP_DEFLATED)
    output.chmod(0o755)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--with-mcp", action="store_true", help="vendor mcp and croniter")
    parser.add_argument("-o", "--output", default=str(ROOT / "dist" / "cao.pyz"))
    args = parser.parse_args()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage(Path(tmp), args.with_mcp)
        write_archive(Path(tmp), output)
    print(f"wrote {output} ({output.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
