"""Agent profiles: the frontmatter parser and the built-in profiles.

PyYAML serves only as a test oracle: every valid fixture and every built-in
profile must parse to exactly what ``yaml.safe_load`` gives for the same
frontmatter text, types included.  The fixtures under ``invalid/`` use YAML
features outside the supported subset; each names, in a ``# expect-line: N``
comment, the 1-based file line where the parser must report the problem.
"""

import re
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import cao  # noqa: E402

BUILTIN_DIR = REPO_ROOT / "profiles"
FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "profiles"
INVALID_DIR = FIXTURE_DIR / "invalid"

VALID_FILES = sorted(BUILTIN_DIR.glob("*.md")) + sorted(FIXTURE_DIR.glob("*.md"))
INVALID_FILES = sorted(INVALID_DIR.glob("*.md"))
BUILTIN_ROLES = {
    "code_supervisor": "supervisor",
    "developer": "developer",
    "reviewer": "reviewer",
}
CAO_MCP_ENTRY = {"type": "stdio", "command": "cao-mcp-server", "args": []}


# --- helpers -----------------------------------------------------------------

def _read(path):
    """Read a file exactly as stored (no newline translation)."""
    with open(path, encoding="utf-8", newline="") as handle:
        return handle.read()


def _split(text):
    """Independently split a profile into (frontmatter text, body text).

    The opening line and the first later line that is exactly ``---`` are the
    delimiters; the body is everything after the closing delimiter line.
    """
    lines = [line for line in re.split(r"(?<=\n)", text) if line]
    assert lines and lines[0].rstrip("\r\n") == "---", "fixture must open with ---"
    for index in range(1, len(lines)):
        if lines[index].rstrip("\r\n") == "---":
            return "".join(lines[1:index]), "".join(lines[index + 1:])
    raise AssertionError("fixture has no closing --- line")


def _typed(value):
    """Pair every scalar with its type so that True != 1 and 1 != 1.0."""
    if isinstance(value, dict):
        return {_typed(key): _typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_typed(item) for item in value]
    return (type(value).__name__, value)


def _ids(paths):
    return [str(path.relative_to(REPO_ROOT)) for path in paths]


@pytest.fixture
def yaml():
    return pytest.importorskip("yaml")


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """Keep locally installed profiles from shadowing the built-ins."""
    monkeypatch.setenv("CAO_HOME_DIR", str(tmp_path / "cao-home"))
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


# --- (a) valid files agree with the PyYAML oracle ------------------------------

def test_fixture_sets_are_present():
    assert {path.stem for path in BUILTIN_DIR.glob("*.md")} >= set(BUILTIN_ROLES)
    assert len(list(FIXTURE_DIR.glob("upstream_*.md"))) >= 6
    assert len(INVALID_FILES) >= 4


@pytest.mark.parametrize("path", VALID_FILES, ids=_ids(VALID_FILES))
def test_frontmatter_matches_pyyaml(path, yaml):
    text = _read(path)
    frontmatter_text, body_text = _split(text)
    expected = yaml.safe_load(frontmatter_text)
    assert isinstance(expected, dict), "oracle must see a mapping"

    meta, body = cao.parse_frontmatter(text, source=str(path))

    assert meta == expected
    assert _typed(meta) == _typed(expected)
    assert list(meta) == list(expected), "key order must follow the file"
    assert body == body_text


# --- (b) unsupported YAML is rejected with file:line --------------------------

@pytest.mark.parametrize("path", INVALID_FILES, ids=_ids(INVALID_FILES))
def test_invalid_frontmatter_reports_location(path):
    text = _read(path)
    second_line = text.splitlines()[1]
    match = re.fullmatch(r"# expect-line: (\d+)", second_line)
    assert match, "invalid fixture must start its frontmatter with # expect-line: N"
    location = f"{path}:{match.group(1)}"

    with pytest.raises(cao.ProfileError) as excinfo:
        cao.parse_frontmatter(text, source=str(path))

    assert re.search(re.escape(location) + r"(?!\d)", str(excinfo.value)), (
        f"expected {location!r} in {str(excinfo.value)!r}"
    )


def test_profile_error_is_a_cao_error():
    assert issubclass(cao.ProfileError, cao.CaoError)


def test_default_source_appears_in_error():
    with pytest.raises(cao.ProfileError) as excinfo:
        cao.parse_frontmatter("---\nname: x\nvalue: !!str 1\n---\nbody\n")
    assert re.search(r"<string>:3(?!\d)", str(excinfo.value))


# --- (c) built-in profiles ----------------------------------------------------

def test_load_developer(isolated_home):
    profile = cao.load_profile("developer")
    assert profile["name"] == "developer"
    assert profile["system_prompt"].strip()


@pytest.mark.parametrize("name, role", sorted(BUILTIN_ROLES.items()))
def test_builtin_profile_shape(name, role, isolated_home):
    profile = cao.load_profile(name)
    _, body = cao.parse_frontmatter(_read(BUILTIN_DIR / f"{name}.md"))

    assert profile["name"] == name
    assert profile["role"] == role
    assert profile["description"]
    assert profile["mcpServers"]["cao-mcp-server"] == CAO_MCP_ENTRY
    assert profile.get("provider") is None, "built-ins must not pin a provider"
    assert profile["system_prompt"] == body.strip()


# --- (d) small inline cases ---------------------------------------------------

def test_empty_frontmatter():
    assert cao.parse_frontmatter("---\n---\nbody") == ({}, "body")


def test_no_frontmatter_returns_text_unchanged():
    text = "# Just Markdown\n\nname: not frontmatter\n"
    assert cao.parse_frontmatter(text) == ({}, text)


def test_crlf_line_endings():
    text = "---\r\nname: crlf\r\ntags: [a, b]\r\nenv:\r\n  KEY: value\r\n---\r\nbody\r\n"
    meta, body = cao.parse_frontmatter(text)
    assert meta == {"name": "crlf", "tags": ["a", "b"], "env": {"KEY": "value"}}
    assert body.replace("\r\n", "\n") == "body\n"
