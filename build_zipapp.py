#!/usr/bin/env python3
"""Build dist/cao.pyz: cao.py, the web dashboard and the built-in profiles in one
zipapp that runs on a bare CPython >= 3.10.

    python3 build_zipapp.py              # stdlib-only pyz (everything but `cao mcp`)
    python3 build_zipapp.py --with-mcp   # also vendor mcp + croniter for this platform

With --with-mcp the packages are installed with pip into _vendor/ inside the
archive. Compiled dependencies (pydantic-core) cannot be imported from a zip, so
cao extracts _vendor/ once to ~/.cache/cao/vendor-<hash>/ on first use; the pyz
is then tied to this Python version and platform (see docs/packaging.md).
"""
import argparse
import py_compile
import shutil
import subprocess
import sys
import tempfile
import zipapp
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENDORED = ["mcp>=1.23", "croniter>=2"]


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
        vendor = target / "_vendor"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
                        "--target", str(vendor), *VENDORED], check=True)
        for junk in vendor.glob("**/__pycache__"):
            shutil.rmtree(junk, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--with-mcp", action="store_true", help="vendor mcp and croniter")
    parser.add_argument("-o", "--output", default=str(ROOT / "dist" / "cao.pyz"))
    args = parser.parse_args()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage(Path(tmp), args.with_mcp)
        zipapp.create_archive(tmp, output, interpreter="/usr/bin/env python3", compressed=True)
    print(f"wrote {output} ({output.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
